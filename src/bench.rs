//! `presence-worker bench`: a reproducible benchmark on this machine, from an empty Redis.
//!
//! It starts its own `redis-server` (unless `--redis-url` is given), publishes a realistic mix
//! (Zipf-distributed document popularity, two sessions per user, joins, heartbeats, leaves), then:
//! 1. times `presence-worker run` (a separate process) draining the backlog, with its CPU time,
//!    peak RSS and Redis's CPU time per event;
//! 2. times a baseline that applies the same script once per event, pipelined, on a copy;
//! 3. measures produce-to-applied delay at a fixed offered rate;
//! 4. checks the final state against a sequential model (a benchmark that breaks correctness is
//!    void) and reports Redis memory per live session.

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::connection::Conn;
use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::apply::Applier;
use crate::coalesce::coalesce;
use crate::error::{Error, Result};
use crate::event::{Event, EventType};
use crate::keys::Keys;
use crate::read::{self, ReadFrom};

/// Flags of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Events in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Documents (popularity is Zipf-distributed).
    #[arg(long, default_value_t = 10_000)]
    pub docs: usize,
    /// Users (each with two sessions).
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Events the per-event-script baseline applies (a sample of the backlog; 0: skip).
    #[arg(long, default_value_t = 200_000)]
    pub baseline_events: usize,
    /// Offered rate for the latency run, events/s.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// Duration of the latency run.
    #[arg(long, default_value = "10s", value_parser = crate::cli::duration)]
    pub latency_duration: Duration,
    /// Batch size of the worker.
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Zipf-like sampler over `n` items with exponent 1.1 (inverse CDF on a precomputed table).
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n);
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(1.1);
            cdf.push(acc);
        }
        Zipf(cdf.into_iter().map(|c| c / acc).collect())
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.random();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

/// The workload generator: each user has a home document (Zipf-distributed, so a few documents
/// are crowded and most are quiet) where 95% of their events go.
struct Workload {
    rng: SmallRng,
    zipf: Zipf,
    home: Vec<usize>,
}

impl Workload {
    fn new(seed: u64, docs: usize, users: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let zipf = Zipf::new(docs);
        let home = (0..users).map(|_| zipf.sample(&mut rng)).collect();
        Self { rng, zipf, home }
    }

    fn next(&mut self) -> Event {
        let user = self.rng.random_range(0..self.home.len());
        let doc = if self.rng.random_bool(0.95) {
            self.home[user]
        } else {
            self.zipf.sample(&mut self.rng)
        };
        let kind = match self.rng.random_range(0..100) {
            0..20 => EventType::Join,
            20..90 => EventType::Heartbeat,
            _ => EventType::Leave,
        };
        let mut e = Event::new(kind, format!("doc-{doc}"), format!("user-{user}"));
        e.session = Some(format!("tab-{}", self.rng.random_range(0..2)));
        e.ts = None;
        e
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(common: &crate::cli::Common, args: BenchArgs) -> Result<()> {
    let (url, _server) = if common.redis_url == "redis://127.0.0.1:6379" {
        let (url, guard) = own_redis()?;
        (url, Some(guard))
    } else {
        (common.redis_url.clone(), None)
    };
    let client = crate::connection::client(&url)?;
    let mut con: crate::connection::Conn =
        crate::connection::manager(&client, Duration::from_secs(30))
            .await?
            .into();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
    let mut gen = Workload::new(args.seed, args.docs, args.users);
    let mut model = Model::default();
    println!(
        "bench: {} events, {} documents (Zipf 1.1), {} users x 2 sessions",
        args.events, args.docs, args.users
    );
    let started = Instant::now();
    fill(
        &mut con,
        "sessions:events",
        args.events,
        &mut gen,
        &mut model,
    )
    .await?;
    println!(
        "  backlog written in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mem0 = info_field(&mut con, "memory", "used_memory").await?;
    let cpu0 = redis_cpu(&mut con).await?;
    let (secs, worker_cpu, rss) = drain_with_worker(&url, &mut con, args.batch).await?;
    let redis_cpu_s = redis_cpu(&mut con).await? - cpu0;
    let rate = args.events as f64 / secs;
    println!("\nworker (presence-worker run, batch {}):", args.batch);
    println!(
        "  sustained        {rate:>10.0} events/s  ({secs:.2}s for {} events)",
        args.events
    );
    println!(
        "  worker CPU       {:>10.2} s per million events",
        worker_cpu / args.events as f64 * 1e6
    );
    println!("  worker peak RSS  {:>10.1} MB", rss as f64 / 1e6);
    println!(
        "  Redis CPU        {:>10.2} us per event (single-core limit: {:.0} events/s)",
        redis_cpu_s / args.events as f64 * 1e6,
        args.events as f64 / redis_cpu_s
    );
    let (diffs, live) = model.compare(&mut con, &Keys::new("sessions")).await?;
    let mem = info_field(&mut con, "memory", "used_memory").await?;
    println!(
        "  final state      {}",
        if diffs == 0 {
            "equals the sequential model".to_owned()
        } else {
            format!("VOID: {diffs} documents differ from the model")
        }
    );
    if live > 0 {
        println!(
            "  Redis memory     {:>10.0} bytes per live session ({live} live)",
            (mem - mem0) / live as f64
        );
    }

    if args.baseline_events > 0 {
        let n = args.baseline_events.min(args.events);
        let base = baseline(&mut con, n, args.batch).await?;
        println!("\nbaseline (the same script once per event, pipelined), {n} events:");
        println!(
            "  sustained        {base:>10.0} events/s   ratio {:.2}x",
            rate / base
        );
    }

    let (p50, p99, max) =
        latency(&url, &mut con, args.rate, args.latency_duration, &mut gen).await?;
    println!(
        "\nproduce-to-applied delay at {} events/s for {:?}:",
        args.rate, args.latency_duration
    );
    println!("  p50 {p50:.2} ms   p99 {p99:.2} ms   max {max:.2} ms");
    if diffs != 0 {
        return Err(Error::Protocol("the benchmark broke correctness".into()));
    }
    Ok(())
}

async fn fill(
    con: &mut Conn,
    stream: &str,
    n: usize,
    gen: &mut Workload,
    model: &mut Model,
) -> Result<()> {
    let mut done = 0;
    while done < n {
        let mut pipe = redis::pipe();
        let chunk = (n - done).min(2000);
        for _ in 0..chunk {
            let e = gen.next();
            model.apply(&e);
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("e")
                .arg(e.encode()?)
                .ignore();
        }
        pipe.query_async::<()>(con).await?;
        done += chunk;
    }
    Ok(())
}

/// Runs `presence-worker run` until the group is drained; returns (seconds, CPU seconds, peak RSS).
async fn drain_with_worker(url: &str, con: &mut Conn, batch: usize) -> Result<(f64, f64, u64)> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut child = Command::new(exe)
        .args([
            "run",
            "--consumer",
            "bench",
            "--http-addr",
            "off",
            "--block",
            "100ms",
        ])
        .args(["--batch", &batch.to_string(), "--redis-url", url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    wait_drained(con, "sessions:events", "presence").await?;
    let secs = start.elapsed().as_secs_f64();
    let (cpu, rss) = proc_usage(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok((secs, cpu, rss))
}

/// The baseline: each event applied by its own script call, pipelined in batches.
async fn baseline(con: &mut Conn, n: usize, batch: usize) -> Result<f64> {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("sessions:events")
        .arg("baseline")
        .arg("0")
        .query_async(con)
        .await?;
    let applier = Applier::new(Keys::new("baseline"), 600_000, 90_000);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let entries = read::read(
            con,
            "sessions:events",
            "baseline",
            "b",
            batch.min(n - done),
            ReadFrom::New(Duration::from_millis(10)),
        )
        .await?;
        let mut docs = Vec::with_capacity(entries.len());
        let mut ids = Vec::with_capacity(entries.len());
        for e in &entries {
            ids.push(e.id.to_string());
            if let Some(f) = &e.fields {
                if let Ok(ev) = crate::event::decode_entry(e.id, f, &Default::default()) {
                    docs.extend(coalesce(&[(e.id, ev)]));
                }
            }
        }
        applier.apply(con, &docs).await?;
        let _: i64 = redis::cmd("XACK")
            .arg("sessions:events")
            .arg("baseline")
            .arg(&ids)
            .query_async(con)
            .await?;
        done += entries.len();
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Delay percentiles (ms) at a fixed offered rate, measured from each entry's id time to the
/// moment its document shows the event applied.
async fn latency(
    url: &str,
    con: &mut Conn,
    rate: u64,
    dur: Duration,
    gen: &mut Workload,
) -> Result<(f64, f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "run",
            "--consumer",
            "latency",
            "--http-addr",
            "off",
            "--block",
            "1s",
            "--redis-url",
            url,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut delays = Vec::new();
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut next = tokio::time::Instant::now();
    let end = Instant::now() + dur;
    let mut probe = 0u64;
    while Instant::now() < end {
        next += tick;
        tokio::time::sleep_until(next).await;
        let mut pipe = redis::pipe();
        for _ in 0..per_tick - 1 {
            pipe.cmd("XADD")
                .arg("sessions:events")
                .arg("*")
                .arg("e")
                .arg(gen.next().encode()?)
                .ignore();
        }
        // One probe per tick: a join of a fresh user in its own document, timed until present.
        probe += 1;
        let doc = format!("probe-{probe}");
        let e = Event::new(EventType::Join, doc.clone(), "probe");
        pipe.cmd("XADD")
            .arg("sessions:events")
            .arg("*")
            .arg("e")
            .arg(e.encode()?)
            .ignore();
        let sent = Instant::now();
        pipe.query_async::<()>(con).await?;
        let key = Keys::new("sessions").doc(&doc).count;
        let probe_con = con.clone();
        let task = tokio::spawn(async move {
            let mut con = probe_con;
            loop {
                let c: Option<i64> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut con)
                    .await
                    .ok()?;
                if c.is_some() {
                    return Some(sent.elapsed());
                }
                if sent.elapsed() > Duration::from_secs(10) {
                    return None;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        });
        delays.push(task);
    }
    let mut out = Vec::new();
    for d in delays {
        if let Ok(Some(d)) = d.await {
            out.push(d.as_secs_f64() * 1000.0);
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    out.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        out.get(((out.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Ok((pct(0.5), pct(0.99), out.last().copied().unwrap_or(f64::NAN)))
}

async fn wait_drained(con: &mut Conn, stream: &str, group: &str) -> Result<()> {
    loop {
        let groups = crate::retention::groups(con, stream).await?;
        if let Some(g) = groups.iter().find(|g| g.name == group) {
            if g.lag == Some(0) && g.pending == 0 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds (user + system) and peak RSS (bytes) of process `pid`, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    (cpu, rss)
}

async fn info_field(con: &mut Conn, section: &str, name: &str) -> Result<f64> {
    let info: String = redis::cmd("INFO").arg(section).query_async(con).await?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn redis_cpu(con: &mut Conn) -> Result<f64> {
    Ok(info_field(con, "cpu", "used_cpu_user").await?
        + info_field(con, "cpu", "used_cpu_sys").await?)
}

/// A private redis-server on a free loopback port, without persistence.
fn own_redis() -> Result<(String, crate::demo::LocalRedis)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let redis = crate::demo::LocalRedis::spawn(port, Some(&std::env::temp_dir()))?;
    std::thread::sleep(Duration::from_millis(300));
    Ok((format!("redis://127.0.0.1:{port}"), redis))
}

/// The sequential model (per session: live or not; the stream holds no `seq` here).
#[derive(Default)]
struct Model {
    live: HashMap<(String, String, String), bool>,
}

impl Model {
    fn apply(&mut self, e: &Event) {
        self.live.insert(
            (e.doc.clone(), e.user.clone(), e.session_id().to_owned()),
            e.kind.is_live(),
        );
    }

    /// Compares every document's users and count with the model; returns (documents that
    /// differ, live sessions).
    async fn compare(&self, con: &mut Conn, keys: &Keys) -> Result<(usize, usize)> {
        let mut users: HashMap<&str, BTreeSet<&str>> = HashMap::new();
        let mut live = 0;
        for ((doc, user, _), &l) in &self.live {
            let set = users.entry(doc).or_default();
            if l {
                set.insert(user);
                live += 1;
            }
        }
        let mut diffs = 0;
        for (doc, want) in users {
            let k = keys.doc(doc);
            let (got, count): (BTreeSet<String>, Option<usize>) = redis::pipe()
                .atomic()
                .smembers(&k.users)
                .get(&k.count)
                .query_async(con)
                .await?;
            let got: BTreeSet<&str> = got.iter().map(String::as_str).collect();
            if got != want || count.unwrap_or(0) != got.len() {
                diffs += 1;
            }
        }
        Ok((diffs, live))
    }
}
