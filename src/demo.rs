//! `presence-worker demo`: a worker and a simulated set of editors against a local Redis, so a
//! newcomer sees presence state change within seconds.

use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::config::WorkerConfig;
use crate::error::{Error, Result};
use crate::event::{Event, EventType, Meta};
use crate::inspect::DocState;
use crate::keys::Keys;
use crate::produce::Producer;
use crate::worker::Stats;

/// Flags of `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo runs.
    #[arg(long, default_value = "15s", value_parser = crate::cli::duration)]
    pub duration: Duration,
    /// Number of documents.
    #[arg(long, default_value_t = 3)]
    pub docs: usize,
    /// Number of simulated users.
    #[arg(long, default_value_t = 6)]
    pub users: usize,
}

/// Runs the demo.
pub async fn run(common: &Common, args: DemoArgs) -> Result<()> {
    let _redis = ensure_redis(&common.redis_url).await?;
    let stats = Arc::new(Stats::default());
    let token = CancellationToken::new();
    crate::shutdown::cancel_on_signals(token.clone());
    let mut config = WorkerConfig::new(&common.redis_url, "demo");
    config.stream.clone_from(&common.stream);
    config.prefix.clone_from(&common.prefix);
    config.block = Duration::from_millis(200);
    let worker = tokio::spawn(crate::worker::run_with_stats(
        config,
        token.clone(),
        stats.clone(),
    ));

    let mut producer = Producer::connect(&common.redis_url, &common.stream)
        .await?
        .with_shards(common.stream_shards);
    let client = crate::connection::open(&common.redis_url, &Default::default())?;
    let mut con = crate::connection::connect(&client, Duration::from_secs(5)).await?;
    let keys = Keys::new(&common.prefix);
    let docs: Vec<String> = (1..=args.docs.max(1))
        .map(|d| format!("demo-doc-{d}"))
        .collect();
    let users = args.users.max(1);
    let mut rng = SmallRng::seed_from_u64(7);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    println!(
        "demo: {users} users moving between {} documents for {:?}",
        docs.len(),
        args.duration
    );
    while start.elapsed() < args.duration && !token.is_cancelled() {
        tick.tick().await;
        for _ in 0..users {
            let kind = match rng.random_range(0..10) {
                0..=3 => EventType::Join,
                4..=6 => EventType::Heartbeat,
                _ => EventType::Leave,
            };
            let doc = &docs[rng.random_range(0..docs.len())];
            let user = format!("user-{}", rng.random_range(0..users));
            let mut ev = Event::new(kind, doc.clone(), user.clone());
            ev.session = Some(format!("tab-{}", rng.random_range(0..2)));
            if kind == EventType::Join {
                ev.meta = Some(Meta::from([("name".to_owned(), user.to_uppercase())]));
            }
            producer.publish(&ev).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut screen = format!("\n--- t={:>2}s ---\n", start.elapsed().as_secs());
        for doc in &docs {
            let state = crate::inspect::inspect(&mut con, &keys, doc).await?;
            screen.push_str(&render(doc, &state));
        }
        print!("{screen}");
    }
    token.cancel();
    worker
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    println!(
        "\ndemo done: {} events applied, {} duplicate, {} stale, {} dead-lettered",
        stats.applied.load(Ordering::Relaxed),
        stats.duplicate.load(Ordering::Relaxed),
        stats.stale.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed),
    );
    Ok(())
}

/// A document's state as a few readable lines.
pub fn render(doc: &str, state: &DocState) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{doc}: count={} users=[{}]",
        state.count.unwrap_or(0),
        state.users.join(", ")
    );
    for sess in state.live_sessions() {
        let meta = sess
            .meta
            .as_ref()
            .map(|m| format!(" {m:?}"))
            .unwrap_or_default();
        let _ = writeln!(s, "  {} / {}{meta}", sess.user, sess.session);
    }
    s
}

/// A Redis server started for the demo (or the benchmark); stopped when dropped.
pub struct LocalRedis(Child);

impl LocalRedis {
    /// Starts `redis-server` on 127.0.0.1:`port` without persistence (in `dir`, if given).
    pub fn spawn(port: u16, dir: Option<&std::path::Path>) -> Result<Self> {
        Self::spawn_with(port, dir, &[])
    }

    /// Like [`LocalRedis::spawn`], with `extra` arguments after the defaults (e.g. cluster mode).
    pub fn spawn_with(port: u16, dir: Option<&std::path::Path>, extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        if let Some(dir) = dir {
            cmd.arg("--dir").arg(dir);
        }
        cmd.args(extra);
        Ok(Self(cmd.stdout(Stdio::null()).spawn()?))
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Returns `None` when Redis answers at `url`; otherwise, for a loopback URL, starts
/// `redis-server` there (installing it with apt-get when it is missing).
pub async fn ensure_redis(url: &str) -> Result<Option<LocalRedis>> {
    if ping(url).await {
        return Ok(None);
    }
    let (host, port) = host_port(url).ok_or_else(|| {
        Error::Config(format!(
            "cannot read host and port from {}",
            crate::redact::redact(url)
        ))
    })?;
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        return Err(Error::Config(format!(
            "no Redis answers at {}, and the demo only starts one on loopback",
            crate::redact::redact(url)
        )));
    }
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("demo: redis-server not found, installing it with apt-get");
        install_redis()?;
    }
    eprintln!("demo: starting redis-server on 127.0.0.1:{port}");
    let guard = LocalRedis::spawn(port, None)?;
    for _ in 0..50 {
        if ping(url).await {
            return Ok(Some(guard));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Config(
        "redis-server started but does not answer".into(),
    ))
}

fn install_redis() -> Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let run = |args: &[&str]| -> Result<()> {
        let (prog, rest) = if root {
            (args[0], &args[1..])
        } else {
            ("sudo", args)
        };
        let status = Command::new(prog)
            .args(rest)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Config(format!("`{}` failed", args.join(" "))))
        }
    };
    run(&["apt-get", "update", "-q"])?;
    run(&["apt-get", "install", "-y", "-q", "redis-server"])
}

async fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let attempt = async {
        let mut con = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut con)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(_))
    )
}

/// Host and port of a `redis://` URL (default port 6379).
fn host_port(url: &str) -> Option<(String, u16)> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(stripped) = hostport.strip_prefix('[') {
        let (h, p) = stripped.split_once(']')?;
        let port = p.strip_prefix(':').map_or(Some(6379), |p| p.parse().ok())?;
        return Some((format!("[{h}]"), port));
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((hostport.to_owned(), 6379)),
    }
}
