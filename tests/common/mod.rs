//! Test harness: real `redis-server` processes on free loopback ports, workers, and a sequential
//! model of the stream to compare Redis state with.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod model;
pub mod proxy;
pub mod workload;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use presence_worker::connection;
use presence_worker::connection::Conn;
use presence_worker::worker::{self, Stats};
use presence_worker::WorkerConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A `redis-server` on a free loopback port, with its own data directory; killed on drop.
pub struct RedisServer {
    child: Child,
    /// The port it listens on (the TLS port for a server from [`RedisServer::start_tls`]).
    pub port: u16,
    dir: tempfile::TempDir,
    /// Whether it speaks TLS only.
    tls: bool,
}

impl RedisServer {
    /// Starts a server with no persistence.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts a server with extra arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for _ in 0..20 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--dir", dir.path().to_str().expect("utf-8 temp path")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (apt-get install redis-server)");
            if wait_for_port(port, &mut child) {
                return Self {
                    child,
                    port,
                    dir,
                    tls: false,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server");
    }

    /// Starts a server speaking TLS only (no plain port), with no persistence. `certs` holds
    /// `server.pem` and `server.key` (its certificate and key) and `ca.pem` (the CA client
    /// certificates must be signed by). With `require_client_auth`, clients without a
    /// certificate signed by that CA are refused (mutual TLS).
    pub fn start_tls(certs: &std::path::Path, require_client_auth: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = |name: &str| certs.join(name).to_str().expect("utf-8 path").to_owned();
        for _ in 0..20 {
            let port = free_port();
            let mut child = Command::new("redis-server")
                .args(["--port", "0", "--bind", "127.0.0.1"])
                .args(["--tls-port", &port.to_string()])
                .args(["--tls-cert-file", &file("server.pem")])
                .args(["--tls-key-file", &file("server.key")])
                .args(["--tls-ca-cert-file", &file("ca.pem")])
                .args([
                    "--tls-auth-clients",
                    if require_client_auth { "yes" } else { "no" },
                ])
                .args(["--dir", dir.path().to_str().expect("utf-8 temp path")])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (apt-get install redis-server)");
            if wait_for_listener(port, &mut child) {
                return Self {
                    child,
                    port,
                    dir,
                    tls: true,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start redis-server with TLS (is it built with TLS support?)");
    }

    /// Restarts the server on the same port and directory (data kept when persistence is on).
    pub fn restart(&mut self, extra: &[&str]) {
        self.kill();
        let port = self.port;
        self.child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", self.dir.path().to_str().expect("utf-8 temp path")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        assert!(
            wait_for_port(port, &mut self.child),
            "redis-server did not restart"
        );
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`-STOP`, `-CONT`, ...) to the server process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    /// `redis://127.0.0.1:<port>` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// A reconnecting connection.
    pub async fn con(&self) -> Conn {
        let client = connection::client(&self.url()).expect("client");
        connection::manager(&client, Duration::from_secs(10))
            .await
            .expect("connect")
            .into()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_port(port: u16, child: &mut Child) -> bool {
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 64];
                if let Ok(n) = s.read(&mut buf) {
                    if buf[..n].starts_with(b"+PONG") {
                        return true;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// Waits until `port` accepts TCP connections (a TLS port cannot answer a plain `PING`).
fn wait_for_listener(port: u16, child: &mut Child) -> bool {
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A worker configuration for tests: short block time, defaults otherwise.
pub fn config(server: &RedisServer, consumer: &str) -> WorkerConfig {
    let mut c = WorkerConfig::new(server.url(), consumer);
    c.block = Duration::from_millis(100);
    c
}

/// A worker running in this process.
pub struct RunningWorker {
    /// Cancel to stop it.
    pub token: CancellationToken,
    /// Its counters.
    pub stats: Arc<Stats>,
    handle: JoinHandle<presence_worker::Result<()>>,
}

impl RunningWorker {
    /// Starts a worker with `config`.
    pub fn spawn(config: WorkerConfig) -> Self {
        // The worker's warnings go to the test's captured output, printed when the test fails.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "presence_worker=info".into()),
            )
            .try_init();
        let token = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let handle = tokio::spawn(worker::run_with_stats(config, token.clone(), stats.clone()));
        Self {
            token,
            stats,
            handle,
        }
    }

    /// Stops it and waits for it to finish, asserting it ended without error.
    pub async fn stop(self) {
        self.token.cancel();
        let r = tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("worker stops within 20s")
            .expect("worker task");
        r.expect("worker ends without error");
        assert_eq!(
            self.stats
                .loop_restarts
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "the watchdog restarted a consumer loop (its log line names the step)"
        );
    }

    /// Kills it abruptly (the task is aborted wherever it is).
    pub async fn abort(self) {
        self.handle.abort();
        let _ = self.handle.await;
    }
}

/// Waits until the group has delivered everything and nothing is pending.
///
/// Delivered means a lag of 0 or, where Redis reports a wrong lag (Redis 7.0 after a stream
/// was moved by `MIGRATE` in a cluster keeps a stale `entries-read`), the group's last delivered
/// id being the stream's last entry.
pub async fn wait_drained(con: &mut Conn, stream: &str, group: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        // "Delivered to the end" is read before the pending counts: read after them, it could
        // see a batch delivered after they were read and not yet applied (a flake seen in
        // hostile.rs under load). Each count read later covers what was delivered by then.
        let delivered = delivered_to_end(con, stream, group).await;
        let (pending, lag) = group_pending_lag(con, stream, group).await;
        // Leases (backlog batches read without the pending-entries list) count as pending.
        let leases: u64 = redis::cmd("HLEN")
            .arg(presence_worker::lease::key(stream, group))
            .query_async(con)
            .await
            .expect("HLEN leases");
        if pending == 0 && leases == 0 && (lag == 0 || delivered) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            // What is stuck, for the failure's report: the pending entries (id, consumer, idle
            // ms, deliveries), the group and its consumers.
            let mut detail = Vec::new();
            for words in [
                vec!["XPENDING", stream, group, "-", "+", "10"],
                vec!["XINFO", "GROUPS", stream],
                vec!["XINFO", "CONSUMERS", stream, group],
            ] {
                let v: redis::Value = query(con, &words).await;
                detail.push(format!("{}: {v:?}", words.join(" ")));
            }
            panic!(
                "not drained: pending={pending} lag={lag}\n{}",
                detail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `group` was delivered the last entry of `stream`.
async fn delivered_to_end(con: &mut Conn, stream: &str, group: &str) -> bool {
    let last: Vec<(String, Fields)> = redis::cmd("XREVRANGE")
        .arg(stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(con)
        .await
        .unwrap_or_default();
    let groups = presence_worker::retention::groups(con, stream)
        .await
        .unwrap_or_default();
    match (last.first(), groups.iter().find(|g| g.name == group)) {
        (Some((id, _)), Some(g)) => g.last_delivered.to_string() == *id,
        _ => false,
    }
}

/// `pending` and `lag` of `group` from `XINFO GROUPS` (Redis 7).
pub async fn group_pending_lag(con: &mut Conn, stream: &str, group: &str) -> (i64, i64) {
    let groups = presence_worker::retention::groups(con, stream)
        .await
        .unwrap_or_default();
    groups
        .iter()
        .find(|g| g.name == group)
        .map_or((-1, -1), |g| {
            (g.pending as i64, g.lag.map_or(-1, |l| l as i64))
        })
}

/// Field/value pairs of a stream entry.
pub type Fields = Vec<(String, Vec<u8>)>;

/// Every entry of stream `key`.
pub async fn xrange(con: &mut Conn, key: &str) -> Vec<(String, Fields)> {
    redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(con)
        .await
        .expect("XRANGE")
}

/// The value of `field` in `fields`, as text.
pub fn field(fields: &Fields, name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// `XGROUP CREATE <stream> <group> 0`.
pub async fn create_group(con: &mut Conn, stream: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(con)
        .await
        .expect("XGROUP CREATE");
}

/// Reads up to `count` new entries as `consumer` of `group` (as a replica that then crashes
/// would); returns their ids.
pub async fn read_as(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Vec<String> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(con)
        .await
        .expect("XREADGROUP");
    presence_worker::read::parse_read_reply(reply)
        .expect("entries")
        .iter()
        .map(|e| e.id.to_string())
        .collect()
}

/// Replays the whole group from the start (`XGROUP SETID <stream> <group> 0`): every entry is
/// delivered again.
pub async fn replay_group(con: &mut Conn, stream: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream)
        .arg(group)
        .arg("0")
        .query_async(con)
        .await
        .expect("XGROUP SETID");
}

/// `XLEN key`.
pub async fn xlen(con: &mut Conn, key: &str) -> usize {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(con)
        .await
        .expect("XLEN")
}

/// One command given as its words (`["ZCARD", "sessions:top"]`), and its reply.
pub async fn query<T: redis::FromRedisValue>(con: &mut Conn, words: &[&str]) -> T {
    redis::cmd(words[0])
        .arg(&words[1..])
        .query_async(con)
        .await
        .unwrap_or_else(|e| panic!("{words:?}: {e}"))
}
