//! Connections to Redis: every client is built here, from the URL and the security options
//! (ACL user, password file, TLS), and then one connection for applying and acknowledging and
//! one of its own for blocking reads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionAddr, IntoConnectionInfo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, Result};
use crate::redact::redact;

/// How to authenticate and encrypt, beside the URL. Every field names files or a user name,
/// never a secret itself, so the options can be logged and cloned freely.
///
/// Credentials may also come from the URL (`redis://user:password@host`); giving the same one
/// both ways is refused rather than silently preferring one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// ACL user (`--redis-username`); without one, Redis's `default` user.
    pub username: Option<String>,
    /// File holding the password (`--redis-password-file`); one trailing newline is stripped.
    pub password_file: Option<PathBuf>,
    /// PEM file of the certificate authorities trusted for the server's certificate
    /// (`--redis-ca-file`, `rediss://` only); without one, the system's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain this client presents for mutual TLS (`--redis-client-cert`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (`--redis-client-key`).
    pub client_key: Option<PathBuf>,
}

impl ConnectOptions {
    /// Whether any TLS file is given.
    fn wants_tls(&self) -> bool {
        self.ca_file.is_some() || self.client_cert.is_some() || self.client_key.is_some()
    }
}

/// Opens a client for `url` with no options beyond the URL, checking it without connecting.
pub fn client(url: &str) -> Result<redis::Client> {
    client_with(url, &ConnectOptions::default())
}

/// Opens a client for `url` with `options`: reads the password and the TLS files and checks
/// them, without connecting. Every error names the flag at fault and never holds a secret.
pub fn client_with(url: &str, options: &ConnectOptions) -> Result<redis::Client> {
    let bad_url = |why: String| Error::Config(format!("--redis-url {}: {why}", redact(url)));
    let info = url.into_connection_info().map_err(|e| {
        bad_url(format!(
            "not a valid Redis URL ({})",
            redact(&e.to_string())
        ))
    })?;
    let tls = match info.addr() {
        ConnectionAddr::TcpTls { insecure: true, .. } => {
            return Err(bad_url(
                "#insecure (no certificate verification) is not supported; trust the server's \
                 CA with --redis-ca-file instead"
                    .into(),
            ))
        }
        ConnectionAddr::TcpTls { .. } => true,
        _ => false,
    };
    // `CLIENT SETINFO` (Redis 7.2+) is skipped: its reply is ignored anyway, and under a
    // least-privilege ACL user it would only add a denial to `ACL LOG` on every connect.
    let mut settings = info.redis_settings().clone().set_skip_set_lib_name();
    if let Some(user) = &options.username {
        match settings.username() {
            Some(in_url) if in_url != user => {
                return Err(Error::Config(format!(
                    "--redis-username {user:?} differs from the user in --redis-url {}",
                    redact(url)
                )))
            }
            _ => settings = settings.set_username(user),
        }
    }
    if let Some(path) = &options.password_file {
        if settings.password().is_some() {
            return Err(Error::Config(format!(
                "the password is given twice, in --redis-url {} and in --redis-password-file",
                redact(url)
            )));
        }
        settings = settings.set_password(read_password(path)?);
    }
    if settings.username().is_some() && settings.password().is_none() {
        return Err(Error::Config(
            "a Redis user name needs a password (in --redis-url or --redis-password-file)".into(),
        ));
    }
    let info = info.set_redis_settings(settings);
    if !tls {
        if options.wants_tls() {
            return Err(bad_url(
                "--redis-ca-file, --redis-client-cert and --redis-client-key need a rediss:// URL"
                    .into(),
            ));
        }
        return redis::Client::open(info).map_err(|e| bad_url(redact(&e.to_string())));
    }
    let certificates = tls_certificates(options)?;
    // redis-rs builds its rustls configuration with the process-wide provider; install ours
    // (ring) unless the application already chose one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    redis::Client::build_with_tls(info, certificates).map_err(|e| bad_url(redact(&e.to_string())))
}

/// The password in `path`, without one trailing newline (`\n` or `\r\n`).
fn read_password(path: &Path) -> Result<String> {
    let flag = || format!("--redis-password-file {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: cannot read it ({e})", flag())))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(Error::Config(format!("{}: the file is empty", flag())));
    }
    Ok(password.to_owned())
}

/// Reads and checks the TLS files, so that a wrong file is reported by its flag at start-up
/// rather than as a failed handshake later.
fn tls_certificates(options: &ConnectOptions) -> Result<redis::TlsCertificates> {
    let root_cert = match &options.ca_file {
        Some(path) => {
            let pem = read_file("--redis-ca-file", path)?;
            certificates_in("--redis-ca-file", path, &pem)?;
            Some(pem)
        }
        None => None,
    };
    let client_tls = match (&options.client_cert, &options.client_key) {
        (Some(cert), Some(key)) => {
            let client_cert = read_file("--redis-client-cert", cert)?;
            certificates_in("--redis-client-cert", cert, &client_cert)?;
            let client_key = read_file("--redis-client-key", key)?;
            PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                Error::Config(format!(
                    "--redis-client-key {}: no usable PEM private key ({e})",
                    key.display()
                ))
            })?;
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        (None, None) => None,
        _ => {
            return Err(Error::Config(
                "--redis-client-cert and --redis-client-key go together".into(),
            ))
        }
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("{flag} {}: cannot read it ({e})", path.display())))
}

/// Checks that `pem` holds at least one certificate and nothing unreadable.
fn certificates_in(flag: &str, path: &Path, pem: &[u8]) -> Result<()> {
    let bad = |why: String| Error::Config(format!("{flag} {}: {why}", path.display()));
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(())
}

/// A reconnecting connection whose replies may take up to `response_timeout`.
///
/// The blocking read gets one of its own with a timeout longer than `BLOCK`: redis-rs's default
/// (500 ms) would cut every `XREADGROUP BLOCK` short, and a blocked multiplexed connection would
/// stall every other command sent on it.
pub async fn manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    let connect_error = |source| Error::Connect {
        url: address(client.get_connection_info().addr()),
        source,
    };
    let mut con = client
        .get_connection_manager_with_config(config)
        .await
        .map_err(connect_error)?;
    // Without a password redis-rs sends nothing while connecting, so a server that refuses us
    // after the TLS handshake (TLS 1.3 checks client certificates then) would only show on the
    // first command, as a retried I/O error. One round trip makes start-up fail clearly
    // instead. Any reply, even a refusal by an ACL without PING, proves the connection works.
    match redis::cmd("PING")
        .query_async::<redis::Value>(&mut con)
        .await
    {
        Err(e) if e.code().is_none() => Err(connect_error(e)),
        _ => Ok(con),
    }
}

/// A client for a standalone Redis or a Redis Cluster.
// Built once per process: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Client {
    /// One Redis server (`redis://`, `rediss://`).
    Single(redis::Client),
    /// A Redis Cluster, found from its seed nodes (`redis+cluster://`, `rediss+cluster://`).
    Cluster {
        /// The seed nodes, with credentials.
        nodes: Vec<redis::ConnectionInfo>,
        /// TLS files, for `rediss+cluster://`.
        tls: Option<redis::TlsCertificates>,
        /// The seed nodes, without credentials, for messages.
        seeds: String,
    },
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Single(c) => write!(f, "Client({})", address(c.get_connection_info().addr())),
            Client::Cluster { seeds, .. } => write!(f, "Client(cluster {seeds})"),
        }
    }
}

/// Whether `url` names a Redis Cluster: `redis+cluster://` or `rediss+cluster://`.
pub fn is_cluster_url(url: &str) -> bool {
    url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://")
}

/// The seed node URLs of a cluster URL: `redis+cluster://[user:password@]host1:port1,host2:port2`
/// gives `redis://[user:password@]host1:port1` and `redis://[user:password@]host2:port2`.
fn seed_urls(url: &str) -> Result<Vec<String>> {
    let (scheme, rest) = url
        .split_once("+cluster://")
        .ok_or_else(|| Error::Config(format!("--redis-url {}: not a cluster URL", redact(url))))?;
    let (credentials, hosts) = match rest.rsplit_once('@') {
        Some((c, h)) => (format!("{c}@"), h),
        None => (String::new(), rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{credentials}{h}"))
        .collect();
    if seeds.is_empty() {
        return Err(Error::Config(format!(
            "--redis-url {}: a cluster URL names at least one seed node (host:port[,host:port...])",
            redact(url)
        )));
    }
    Ok(seeds)
}

/// Opens a client for `url` (a standalone or a cluster URL) with `options`, checking it without
/// connecting. A cluster client follows `MOVED`/`ASK` redirections and slot migrations; every
/// seed node gets the same credentials and TLS files.
pub fn open(url: &str, options: &ConnectOptions) -> Result<Client> {
    if !is_cluster_url(url) {
        return client_with(url, options).map(Client::Single);
    }
    let mut infos = Vec::new();
    let mut addresses = Vec::new();
    for seed in seed_urls(url)? {
        let client = client_with(&seed, options)?;
        addresses.push(address(client.get_connection_info().addr()));
        infos.push(client.get_connection_info().clone());
    }
    let tls = if url.starts_with("rediss+") {
        Some(tls_certificates(options)?)
    } else {
        None
    };
    let client = Client::Cluster {
        nodes: infos,
        tls,
        seeds: addresses.join(","),
    };
    // Checks the settings now, without connecting.
    cluster_client(&client, Duration::from_secs(1))?;
    Ok(client)
}

/// A cluster client whose every request, retries and redirections included, ends within
/// `response_timeout`.
fn cluster_client(
    client: &Client,
    response_timeout: Duration,
) -> Result<redis::cluster::ClusterClient> {
    let Client::Cluster { nodes, tls, seeds } = client else {
        return Err(Error::Config("not a cluster client".into()));
    };
    let first = nodes[0].redis_settings().clone();
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes.clone())
        .response_timeout(response_timeout)
        .connection_timeout(Duration::from_secs(5));
    if let Some(user) = first.username() {
        builder = builder.username(user);
    }
    if let Some(password) = first.password() {
        builder = builder.password(password);
    }
    if let Some(certs) = tls {
        builder = builder
            .tls(redis::cluster::TlsMode::Secure)
            .certs(certs.clone());
    }
    builder.build().map_err(|e| {
        Error::Config(format!(
            "--redis-url redis+cluster://{seeds}: {}",
            redact(&e.to_string())
        ))
    })
}

/// A connection to a standalone Redis or to a Redis Cluster: cheap to clone (clones share one
/// multiplexed connection per node), and it reconnects by itself. In cluster mode every command
/// and every pipeline must stay within one hash slot (see [`Conn::is_cluster`]).
#[derive(Clone)]
pub enum Conn {
    /// One server.
    Single(ConnectionManager),
    /// A cluster.
    Cluster(ClusterHandle),
}

impl Conn {
    /// Whether this is a cluster connection: then pipelines and transactions must not span
    /// hash slots.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

/// How many single-slot commands are in flight at once on a cluster (see [`Conn::query_all`]).
pub const CLUSTER_CONCURRENCY: usize = 64;

impl Conn {
    /// Runs independent commands, each given with the hash slot of its key, and returns their
    /// replies in order: pipelined on a single server (the slots are ignored); on a cluster, one
    /// pipeline per primary, sent to it directly (the commands stay single-key, so a pipeline of
    /// many slots is fine on the node serving them). A sweep over all 16,384 slots thus costs one
    /// round trip per primary. A slot moving meanwhile fails the call with `MOVED`/`ASK`: such
    /// sweeps are periodic, and the next one finds the new owner.
    pub async fn query_all<T: redis::FromRedisValue + Send>(
        &mut self,
        cmds: &[(u16, redis::Cmd)],
    ) -> Result<Vec<T>> {
        let handle = match self {
            Conn::Cluster(handle) => handle.clone(),
            Conn::Single(_) => {
                let mut out = Vec::with_capacity(cmds.len());
                for group in cmds.chunks(1000) {
                    let mut pipe = redis::pipe();
                    for (_, cmd) in group {
                        pipe.add_command(cmd.clone());
                    }
                    out.extend(pipe.query_async::<Vec<T>>(self).await?);
                }
                return Ok(out);
            }
        };
        use redis::cluster_routing::SingleNodeRoutingInfo;
        let (generation, mut con) = handle.current();
        let owners = slot_owners(&mut con).await?;
        let mut by_node: Vec<((String, u16), Vec<usize>)> = Vec::new();
        for (i, (slot, _)) in cmds.iter().enumerate() {
            let owner = owners
                .iter()
                .find(|(first, last, _)| (*first..=*last).contains(slot))
                .map(|(_, _, node)| node.clone())
                .ok_or_else(|| Error::Protocol(format!("no primary serves slot {slot}")))?;
            match by_node.iter_mut().find(|(node, _)| *node == owner) {
                Some((_, places)) => places.push(i),
                None => by_node.push((owner, vec![i])),
            }
        }
        let mut out: Vec<Option<T>> = (0..cmds.len()).map(|_| None).collect();
        for ((host, port), places) in by_node {
            for chunk in places.chunks(1000) {
                let mut pipe = redis::pipe();
                for &i in chunk {
                    pipe.add_command(cmds[i].1.clone());
                }
                let route = SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port,
                };
                let reply = con.route_pipeline(pipe, 0, chunk.len(), route).await;
                handle.observe(generation, &reply).await;
                for (&i, value) in chunk.iter().zip(reply?) {
                    // An error reply (NOSCRIPT, MOVED during a migration) fails the sweep.
                    let value = value.extract_error()?;
                    out[i] = Some(T::from_redis_value(value).map_err(redis::RedisError::from)?);
                }
            }
        }
        out.into_iter()
            .map(|v| v.ok_or_else(|| Error::Protocol("a reply is missing".into())))
            .collect()
    }
}

impl Conn {
    /// Every key matching `pattern`, by `SCAN` (never a blocking `KEYS`): on a cluster, on every
    /// primary in turn.
    pub async fn scan_match(&mut self, pattern: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        match self {
            Conn::Single(con) => {
                let mut scan = redis::cmd("SCAN");
                scan.cursor_arg(0)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000);
                let mut iter: redis::AsyncIter<String> = scan.iter_async(con).await?;
                while let Some(key) = iter.next_item().await {
                    keys.push(key?);
                }
            }
            Conn::Cluster(handle) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let con = &mut handle.current().1;
                for (host, port) in primaries(con).await? {
                    let mut cursor = 0u64;
                    loop {
                        let mut scan = redis::cmd("SCAN");
                        scan.arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(1000);
                        let route = SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port,
                        };
                        let reply = con
                            .route_command(scan, RoutingInfo::SingleNode(route))
                            .await?;
                        let (next, batch): (u64, Vec<String>) =
                            redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
                        keys.extend(batch);
                        if next == 0 {
                            break;
                        }
                        cursor = next;
                    }
                }
            }
        }
        Ok(keys)
    }
}

/// The slot ranges of a cluster and the primary serving each: (first, last, (host, port)).
async fn slot_owners(
    con: &mut redis::cluster_async::ClusterConnection,
) -> Result<Vec<(u16, u16, (String, u16))>> {
    let ranges: Vec<Vec<redis::Value>> =
        redis::cmd("CLUSTER").arg("SLOTS").query_async(con).await?;
    let mut out = Vec::new();
    for range in ranges {
        let (Some(first), Some(last), Some(redis::Value::Array(node))) =
            (range.first(), range.get(1), range.get(2))
        else {
            continue;
        };
        let parse = |v: &redis::Value| -> Result<String> {
            Ok(redis::from_redis_value(v.clone()).map_err(redis::RedisError::from)?)
        };
        let (Some(host), Some(port)) = (node.first(), node.get(1)) else {
            continue;
        };
        out.push((
            parse(first)?.parse().unwrap_or(0),
            parse(last)?.parse().unwrap_or(0),
            (parse(host)?, parse(port)?.parse().unwrap_or(0)),
        ));
    }
    Ok(out)
}

/// The primaries of a cluster (host, port), each once.
async fn primaries(
    con: &mut redis::cluster_async::ClusterConnection,
) -> Result<Vec<(String, u16)>> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for (_, _, node) in slot_owners(con).await? {
        if !out.contains(&node) {
            out.push(node);
        }
    }
    Ok(out)
}

impl From<ConnectionManager> for Conn {
    fn from(con: ConnectionManager) -> Self {
        Conn::Single(con)
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(h) => {
                let h = h.clone();
                Box::pin(async move {
                    let (generation, mut con) = h.current();
                    let reply = con.req_packed_command(cmd).await;
                    h.observe(generation, &reply).await;
                    reply
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(h) => {
                let h = h.clone();
                Box::pin(async move {
                    let (generation, mut con) = h.current();
                    let reply = con.req_packed_commands(pipe, offset, count).await;
                    h.observe(generation, &reply).await;
                    reply
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// Consecutive timed-out requests after which a cluster connection is replaced.
const CLUSTER_TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

/// A cluster connection that replaces itself when requests keep timing out. (After a primary is
/// killed and restarted, redis-rs 1.8's cluster connection can keep routing some requests to a
/// dead node connection, each timing out; a fresh connection does not.)
#[derive(Clone)]
pub struct ClusterHandle {
    shared: std::sync::Arc<ClusterShared>,
}

struct ClusterShared {
    client: redis::cluster::ClusterClient,
    /// The connection in use and its generation (bumped on each replacement).
    con: std::sync::Mutex<(u64, redis::cluster_async::ClusterConnection)>,
    timeouts: std::sync::atomic::AtomicU32,
    reconnecting: tokio::sync::Mutex<()>,
}

impl ClusterHandle {
    /// The connection in use (a cheap clone) and its generation.
    fn current(&self) -> (u64, redis::cluster_async::ClusterConnection) {
        let guard = self.shared.con.lock().unwrap_or_else(|e| e.into_inner());
        (guard.0, guard.1.clone())
    }

    /// Counts consecutive timeouts; past the limit, replaces the connection of `generation`.
    async fn observe<T>(&self, generation: u64, reply: &redis::RedisResult<T>) {
        use std::sync::atomic::Ordering;
        match reply {
            Err(e) if e.is_timeout() => {
                let n = self.shared.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= CLUSTER_TIMEOUTS_BEFORE_RECONNECT {
                    self.reconnect(generation).await;
                }
            }
            Ok(_) => self.shared.timeouts.store(0, Ordering::Relaxed),
            Err(_) => {}
        }
    }

    async fn reconnect(&self, generation: u64) {
        let _one = self.shared.reconnecting.lock().await;
        if self.current().0 != generation {
            return; // another request replaced it already
        }
        match self.shared.client.get_async_connection().await {
            Ok(con) => {
                *self.shared.con.lock().unwrap_or_else(|e| e.into_inner()) = (generation + 1, con);
                self.shared
                    .timeouts
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!("cluster connection replaced after repeated timeouts");
            }
            Err(e) => {
                tracing::warn!(error = %redact(&e.to_string()), "cannot reconnect to the cluster")
            }
        }
    }
}

/// A reconnecting connection from `client` (standalone or cluster) whose replies may take up to
/// `response_timeout`; see [`manager`] for why the blocking read needs its own.
pub async fn connect(client: &Client, response_timeout: Duration) -> Result<Conn> {
    match client {
        Client::Single(c) => manager(c, response_timeout).await.map(Conn::Single),
        Client::Cluster { seeds, .. } => {
            let client = cluster_client(client, response_timeout)?;
            let con = client
                .get_async_connection()
                .await
                .map_err(|source| Error::Connect {
                    url: format!("redis+cluster://{seeds}"),
                    source,
                })?;
            Ok(Conn::Cluster(ClusterHandle {
                shared: std::sync::Arc::new(ClusterShared {
                    client,
                    con: std::sync::Mutex::new((0, con)),
                    timeouts: std::sync::atomic::AtomicU32::new(0),
                    reconnecting: tokio::sync::Mutex::new(()),
                }),
            }))
        }
    }
}

/// Where a client connects, without credentials: `redis://host:port`, `rediss://host:port`
/// or the socket path.
pub fn address(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options_with_password(text: &str) -> (tempfile::TempDir, ConnectOptions) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("password");
        std::fs::write(&path, text).expect("write");
        let options = ConnectOptions {
            username: Some("w".into()),
            password_file: Some(path),
            ..Default::default()
        };
        (dir, options)
    }

    #[test]
    fn cluster_urls_give_one_seed_url_per_node_with_the_same_credentials() {
        assert_eq!(
            seed_urls("redis+cluster://u:p@h1:7000,h2:7001/").unwrap(),
            ["redis://u:p@h1:7000", "redis://u:p@h2:7001"]
        );
        assert_eq!(
            seed_urls("rediss+cluster://h:6380").unwrap(),
            ["rediss://h:6380"]
        );
        let err = seed_urls("redis+cluster://u:s3cret@")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("at least one seed") && !err.contains("s3cret"),
            "{err}"
        );
        assert!(is_cluster_url("redis+cluster://h:1") && !is_cluster_url("redis://h:1"));
        let client = open(
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            &Default::default(),
        )
        .expect("a cluster client is built without connecting");
        assert_eq!(
            format!("{client:?}"),
            "Client(cluster redis://127.0.0.1:7000,redis://127.0.0.1:7001)"
        );
    }

    #[test]
    fn the_password_file_loses_one_trailing_newline_only() {
        for (text, want) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            ("pw \n\n", "pw \n"),
        ] {
            let (_dir, options) = options_with_password(text);
            let client = client_with("redis://127.0.0.1:1", &options).expect("client");
            let settings = client.get_connection_info().redis_settings();
            assert_eq!(settings.password(), Some(want), "{text:?}");
            assert_eq!(settings.username(), Some("w"));
        }
    }

    #[test]
    fn credentials_given_twice_or_half_are_refused_without_echoing_them() {
        let (_dir, options) = options_with_password("s3cret\n");
        let err = client_with("redis://w:other@127.0.0.1:1", &options)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("given twice") && !err.contains("other"),
            "{err}"
        );
        let err = client_with("redis://x:pw@127.0.0.1:1", &options)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differs") && !err.contains("pw@"), "{err}");
        let user_only = ConnectOptions {
            username: Some("w".into()),
            ..Default::default()
        };
        let err = client_with("redis://127.0.0.1:1", &user_only)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a password"), "{err}");
        let (_dir, empty) = options_with_password("\n");
        let err = client_with("redis://127.0.0.1:1", &empty)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
    }
}
