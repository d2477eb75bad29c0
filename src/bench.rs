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
//!
//! With `--cluster N` (N >= 3) it starts its own Redis Cluster of N masters instead, spreads the
//! backlog over `--stream-shards` shard streams (default 2N), drains it with
//! `presence-worker run --stream-shards`, and reports Redis CPU and memory summed over every
//! node, with the per-node split of Redis CPU. The baseline is skipped in cluster mode.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
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
    /// Batch size of the worker (the worker's default).
    #[arg(long, default_value_t = 2000)]
    pub batch: usize,
    /// Seed of the workload.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Masters of a Redis Cluster to start and benchmark (at least 3; 0: one standalone
    /// redis-server). The backlog goes to `--stream-shards` shard streams (default: 2 per master).
    #[arg(long, default_value_t = 0)]
    pub cluster: usize,
    /// Events carry a per-session `seq` (1, 2, 3, ... in stream order), as the README's producer
    /// examples send.
    #[arg(long)]
    pub seq: bool,
    /// Joins carry a `meta` map (a display name and a colour), as the README's producer examples
    /// send.
    #[arg(long)]
    pub meta: bool,
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
    /// Per session (user * 2 + tab), the last `seq` sent; `None`: events carry none.
    seq: Option<Vec<u64>>,
    /// Whether joins carry meta.
    meta: bool,
}

impl Workload {
    fn new(seed: u64, docs: usize, users: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let zipf = Zipf::new(docs);
        let home = (0..users).map(|_| zipf.sample(&mut rng)).collect();
        Self {
            rng,
            zipf,
            home,
            seq: None,
            meta: false,
        }
    }

    /// Events carry a per-session `seq` (`seq`) and joins a `meta` map (`meta`).
    fn with_fields(mut self, seq: bool, meta: bool) -> Self {
        self.seq = seq.then(|| vec![0; self.home.len() * 2]);
        self.meta = meta;
        self
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
        let tab = self.rng.random_range(0..2);
        e.session = Some(format!("tab-{tab}"));
        e.ts = None;
        if let Some(seqs) = &mut self.seq {
            let s = &mut seqs[user * 2 + tab];
            *s += 1;
            e.seq = Some(*s);
        }
        if self.meta && kind == EventType::Join {
            let colour = format!("#{:06x}", user.wrapping_mul(2_654_435_761) % 0xFF_FFFF);
            e.meta = Some(
                [("name", format!("User {user}")), ("colour", colour)]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
            );
        }
        e
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(common: &crate::cli::Common, args: BenchArgs) -> Result<()> {
    const DEFAULT_URL: &str = "redis://127.0.0.1:6379";
    let cluster_mode = args.cluster > 0;
    let mut _server = None;
    let mut _cluster = None;
    let (url, shards, mut con, mut nodes) = if cluster_mode {
        if args.cluster < 3 {
            return Err(Error::Config(format!(
                "--cluster {}: a Redis Cluster needs at least 3 masters",
                args.cluster
            )));
        }
        if common.redis_url != DEFAULT_URL {
            return Err(Error::Config(
                "--cluster starts its own Redis Cluster on loopback; it takes no --redis-url"
                    .into(),
            ));
        }
        let cluster = LocalCluster::start(args.cluster).await?;
        let url = cluster.url();
        let client = crate::connection::open(&url, &Default::default())?;
        let con = crate::connection::connect(&client, Duration::from_secs(30)).await?;
        let mut nodes = Vec::new();
        for port in &cluster.ports {
            let node_url = format!("redis://127.0.0.1:{port}");
            let client = crate::connection::client(&node_url)?;
            let node: Conn = crate::connection::manager(&client, Duration::from_secs(30))
                .await?
                .into();
            nodes.push((format!("127.0.0.1:{port}"), node));
        }
        _cluster = Some(cluster);
        let shards = if common.stream_shards == 0 {
            2 * args.cluster as u32
        } else {
            common.stream_shards
        };
        (url, shards, con, Nodes(nodes))
    } else {
        let url = if common.redis_url == DEFAULT_URL {
            let (url, guard) = own_redis()?;
            _server = Some(guard);
            url
        } else {
            common.redis_url.clone()
        };
        let client = crate::connection::client(&url)?;
        let con: crate::connection::Conn =
            crate::connection::manager(&client, Duration::from_secs(30))
                .await?
                .into();
        let nodes = Nodes(vec![(url.clone(), con.clone())]);
        (url, 0, con, nodes)
    };
    nodes.flushall().await?;
    let mut gen = Workload::new(args.seed, args.docs, args.users).with_fields(args.seq, args.meta);
    let mut model = Model::default();
    println!(
        "bench: {} events, {} documents (Zipf 1.1), {} users x 2 sessions{}{}",
        args.events,
        args.docs,
        args.users,
        if args.seq { ", with seq" } else { "" },
        if args.meta { ", meta on joins" } else { "" },
    );
    if cluster_mode {
        println!(
            "  Redis Cluster of {} masters (no replicas), {shards} stream shards: {url}",
            args.cluster
        );
    } else if common.stream_shards != 0 {
        println!("  (--stream-shards applies to --cluster mode only: one stream here)");
    }
    let started = Instant::now();
    let streams = fill(
        &mut con,
        "sessions:events",
        shards,
        args.events,
        &mut gen,
        &mut model,
    )
    .await?;
    println!(
        "  backlog written in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The cluster's own background CPU (bus gossip, cron), to judge the per-event figures.
    let idle = if cluster_mode {
        let before = nodes.cpu().await?;
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = nodes.cpu().await?;
        let spent: f64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
        Some(spent / t.elapsed().as_secs_f64())
    } else {
        None
    };

    let mem0 = nodes.used_memory().await?;
    nodes.reset_stats().await?;
    let cpu0 = nodes.cpu().await?;
    let (secs, worker_cpu, rss) =
        drain_with_worker(&url, &mut con, args.batch, shards, &streams).await?;
    let cpu_by_node: Vec<f64> = nodes
        .cpu()
        .await?
        .iter()
        .zip(&cpu0)
        .map(|(a, b)| a - b)
        .collect();
    let redis_cpu_s: f64 = cpu_by_node.iter().sum();
    let by_command = nodes.command_usec().await?;
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
    if cluster_mode {
        println!(
            "  Redis CPU        {:>10.2} us per event, summed over {} nodes",
            redis_cpu_s / args.events as f64 * 1e6,
            nodes.0.len()
        );
        for ((name, _), cpu) in nodes.0.iter().zip(&cpu_by_node) {
            println!(
                "    node {name:<16} {:>6.2} us per event ({:>4.1}%)",
                cpu / args.events as f64 * 1e6,
                cpu / redis_cpu_s * 100.0
            );
        }
        let busiest = cpu_by_node.iter().copied().fold(0.0, f64::max);
        println!(
            "  Redis limit      {:>10.0} events/s (the busiest node at one full core)",
            args.events as f64 / busiest
        );
        if let Some(idle) = idle {
            println!(
                "  Redis idle CPU   {:>10.2} ms/s summed over nodes (bus, cron; {:.3} us per event \
                 of the figure above)",
                idle * 1e3,
                idle * secs / args.events as f64 * 1e6
            );
        }
    } else {
        println!(
            "  Redis CPU        {:>10.2} us per event (single-core limit: {:.0} events/s)",
            redis_cpu_s / args.events as f64 * 1e6,
            args.events as f64 / redis_cpu_s
        );
    }
    println!(
        "  Redis time per command (the commands scripts call are counted both on their own and \
         inside evalsha):"
    );
    for (name, usec, calls) in by_command.iter().take(20) {
        println!(
            "    {name:<14} {:>6.2} us per event  ({calls} calls, {:.1} us per call)",
            usec / args.events as f64,
            usec / *calls as f64
        );
    }
    let (diffs, live) = model.compare(&mut con, &Keys::new("sessions")).await?;
    let mem = nodes.used_memory().await?;
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
            "  Redis memory     {:>10.0} bytes per live session ({live} live{})",
            (mem - mem0) / live as f64,
            if cluster_mode {
                ", used_memory summed over nodes"
            } else {
                ""
            }
        );
    }

    if cluster_mode && args.baseline_events > 0 {
        println!("\nbaseline: skipped in cluster mode");
    } else if args.baseline_events > 0 {
        let n = args.baseline_events.min(args.events);
        // The baseline (one script call per event), then the same script given 64
        // events per call without coalescing them: what batching the calls alone gains.
        for (per_call, what) in [
            (1, "the same script once per event"),
            (64, "the same script, 64 events per call, not coalesced"),
        ] {
            let cpu0: f64 = nodes.cpu().await?.iter().sum();
            let base = baseline(&mut con, n, args.batch, per_call).await?;
            let base_cpu: f64 = nodes.cpu().await?.iter().sum::<f64>() - cpu0;
            println!("\nbaseline ({what}, pipelined), {n} events:");
            println!(
                "  sustained        {base:>10.0} events/s   ratio {:.2}x",
                rate / base
            );
            println!(
                "  Redis CPU        {:>10.2} us per event (ratio {:.2}x)",
                base_cpu / n as f64 * 1e6,
                (base_cpu / n as f64) / (redis_cpu_s / args.events as f64)
            );
        }
    }

    let (p50, p99, max) = latency(
        &url,
        &mut con,
        shards,
        args.rate,
        args.latency_duration,
        &mut gen,
    )
    .await?;
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

/// Appends `n` events of the workload, each to its document's shard of `stream` (`stream` itself
/// when `shards` is 0), one pipeline per stream (a cluster pipeline stays within one slot).
/// Returns the streams written to.
async fn fill(
    con: &mut Conn,
    stream: &str,
    shards: u32,
    n: usize,
    gen: &mut Workload,
    model: &mut Model,
) -> Result<BTreeSet<String>> {
    let mut written = BTreeSet::new();
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(2000);
        let events: Vec<Event> = (0..chunk).map(|_| gen.next()).collect();
        for e in &events {
            model.apply(e);
        }
        for (s, _, pipe) in crate::shard::xadd_by_stream(stream, shards, &events)? {
            pipe.query_async::<()>(con).await?;
            written.insert(s);
        }
        done += chunk;
    }
    Ok(written)
}

/// Runs `presence-worker run` (over `shards` shard streams when not 0) until the group is
/// drained on every one of `streams`; returns (seconds, CPU seconds, peak RSS).
async fn drain_with_worker(
    url: &str,
    con: &mut Conn,
    batch: usize,
    shards: u32,
    streams: &BTreeSet<String>,
) -> Result<(f64, f64, u64)> {
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--consumer",
        "bench",
        "--http-addr",
        "off",
        "--block",
        "100ms",
    ])
    .args(["--batch", &batch.to_string(), "--redis-url", url]);
    if shards > 0 {
        cmd.args(["--stream-shards", &shards.to_string()]);
    }
    let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn()?;
    for stream in streams {
        wait_drained(con, stream, "presence").await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let (cpu, rss) = proc_usage(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    Ok((secs, cpu, rss))
}

/// A baseline: the backlog read `batch` entries at a time, each event applied on its own
/// (not coalesced), `per_call` events per script call, a read's calls in one pipeline, then
/// acknowledged; in a consumer group and under keys of its own.
async fn baseline(con: &mut Conn, n: usize, batch: usize, per_call: usize) -> Result<f64> {
    let name = format!("baseline{per_call}");
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("sessions:events")
        .arg(&name)
        .arg("0")
        .query_async(con)
        .await?;
    let applier = Applier::new(Keys::new(&name), 600_000, 90_000).with_docs_per_call(per_call);
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let entries = read::read(
            con,
            "sessions:events",
            &name,
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
            .arg(&name)
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
    shards: u32,
    rate: u64,
    dur: Duration,
    gen: &mut Workload,
) -> Result<(f64, f64, f64)> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "run",
        "--consumer",
        "latency",
        "--http-addr",
        "off",
        "--block",
        "1s",
        "--redis-url",
        url,
    ]);
    if shards > 0 {
        cmd.args(["--stream-shards", &shards.to_string()]);
    }
    let mut child = cmd.env("RUST_LOG", "warn").stdout(Stdio::null()).spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (probes, watcher) = watch_probes(url)?;
    let tick = Duration::from_millis(10);
    let per_tick = (rate / 100).max(1);
    let mut next = tokio::time::Instant::now();
    let end = Instant::now() + dur;
    let mut probe = 0u64;
    while Instant::now() < end {
        next += tick;
        tokio::time::sleep_until(next).await;
        // One probe per tick: a join of a fresh user in its own document, timed until present.
        probe += 1;
        let doc = format!("probe-{probe}");
        let mut events: Vec<Event> = (1..per_tick).map(|_| gen.next()).collect();
        events.push(Event::new(EventType::Join, doc.clone(), "probe"));
        let pipes = crate::shard::xadd_by_stream("sessions:events", shards, &events)?;
        let sent = Instant::now();
        for (_, _, pipe) in &pipes {
            pipe.query_async::<()>(con).await?;
        }
        let key = Keys::new("sessions").doc(&doc).count;
        if probes.send((key, sent)).is_err() {
            break;
        }
    }
    drop(probes);
    let mut out = watcher
        .join()
        .map_err(|_| Error::Protocol("the probe watcher panicked".into()))??;
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

/// Where the latency run sends each probe: its count key and when its events were sent.
type Probes = std::sync::mpsc::Sender<(String, Instant)>;

/// A thread of its own that watches the probes' count keys (sent to it with the time their
/// events were sent) every 100 us until each shows up, and returns their delays in ms (probes
/// not seen within 10 s are left out). Not a tokio task: tokio's timer ticks in milliseconds,
/// which would add up to a millisecond to every delay measured.
fn watch_probes(url: &str) -> Result<(Probes, std::thread::JoinHandle<Result<Vec<f64>>>)> {
    let (tx, rx) = std::sync::mpsc::channel::<(String, Instant)>();
    let client = crate::connection::open(url, &Default::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let watcher = std::thread::spawn(move || {
        rt.block_on(async move {
            let con = crate::connection::connect(&client, Duration::from_secs(10)).await?;
            let mut waiting: Vec<(String, Instant)> = Vec::new();
            let mut delays = Vec::new();
            let mut open = true;
            while open || !waiting.is_empty() {
                loop {
                    match rx.try_recv() {
                        Ok(probe) => waiting.push(probe),
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
                let gets = waiting.iter().map(|(key, _)| {
                    let mut con = con.clone();
                    async move {
                        redis::cmd("GET")
                            .arg(key)
                            .query_async::<Option<i64>>(&mut con)
                            .await
                    }
                });
                let counts = futures_util::future::join_all(gets).await;
                let seen = Instant::now();
                let mut counts = counts.into_iter();
                let mut failed = None;
                waiting.retain(|(_, sent)| match counts.next() {
                    Some(Ok(Some(_))) => {
                        delays.push(seen.duration_since(*sent).as_secs_f64() * 1000.0);
                        false
                    }
                    Some(Ok(None)) => seen.duration_since(*sent) <= Duration::from_secs(10),
                    Some(Err(e)) => {
                        failed = Some(e);
                        true
                    }
                    None => true,
                });
                if let Some(e) = failed {
                    return Err(e.into());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            Ok(delays)
        })
    });
    Ok((tx, watcher))
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

/// The Redis servers under test, each by its name and its own standalone connection: one server,
/// or every master of a cluster (`INFO` and `FLUSHALL` are per node).
struct Nodes(Vec<(String, Conn)>);

impl Nodes {
    async fn flushall(&mut self) -> Result<()> {
        for (_, con) in &mut self.0 {
            let _: () = redis::cmd("FLUSHALL").query_async(con).await?;
        }
        Ok(())
    }

    /// CPU seconds (user + system) of every node, in order.
    async fn cpu(&mut self) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(self.0.len());
        for (_, con) in &mut self.0 {
            out.push(redis_cpu(con).await?);
        }
        Ok(out)
    }

    /// Resets every node's `INFO commandstats`.
    async fn reset_stats(&mut self) -> Result<()> {
        for (_, con) in &mut self.0 {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query_async(con)
                .await?;
        }
        Ok(())
    }

    /// Microseconds spent inside each command and its number of calls, summed over every node,
    /// the most expensive first (from `INFO commandstats`).
    async fn command_usec(&mut self) -> Result<Vec<(String, f64, u64)>> {
        let mut total: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for (_, con) in &mut self.0 {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query_async(con)
                .await?;
            for line in info.lines() {
                let Some((name, rest)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let field = |key: &str| {
                    rest.split(',')
                        .find_map(|kv| kv.strip_prefix(key))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                let e = total.entry(name.to_owned()).or_default();
                e.0 += field("usec=");
                e.1 += field("calls=") as u64;
            }
        }
        let mut out: Vec<_> = total.into_iter().map(|(n, (u, c))| (n, u, c)).collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(out)
    }

    /// `used_memory` summed over every node.
    async fn used_memory(&mut self) -> Result<f64> {
        let mut total = 0.0;
        for (_, con) in &mut self.0 {
            total += info_field(con, "memory", "used_memory").await?;
        }
        Ok(total)
    }
}

/// A private Redis Cluster of masters only on free loopback ports, without persistence, each
/// node in its own temporary directory; every node is killed (and its directory removed) when
/// dropped.
struct LocalCluster {
    nodes: Vec<crate::demo::LocalRedis>,
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
}

impl LocalCluster {
    /// Starts `masters` (at least 3) cluster-enabled `redis-server`s, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports `cluster_state:ok`.
    async fn start(masters: usize) -> Result<Self> {
        let ports = free_ports(2 * masters)?;
        let (ports, bus_ports) = ports.split_at(masters);
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            ports: Vec::new(),
            dirs: Vec::new(),
        };
        for (i, (&port, &bus)) in ports.iter().zip(bus_ports).enumerate() {
            let dir = std::env::temp_dir().join(format!(
                "presence-bench-{}-node{i}-{port}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            cluster.dirs.push(dir.clone());
            let conf = dir.join("nodes.conf").to_string_lossy().into_owned();
            let bus = bus.to_string();
            let node = crate::demo::LocalRedis::spawn_with(
                port,
                Some(&dir),
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &conf,
                    "--cluster-node-timeout",
                    "5000",
                    "--cluster-port",
                    &bus,
                ],
            )?;
            cluster.nodes.push(node);
            cluster.ports.push(port);
        }
        for &port in &cluster.ports {
            wait_for(port, Duration::from_secs(10), |_| true, &["PING"]).await?;
        }
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::Config(format!(
                    "cannot run redis-cli (apt-get install redis-tools): {e}"
                ))
            })?;
        if !out.status.success() {
            return Err(Error::Config(format!(
                "redis-cli --cluster create failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        for &port in &cluster.ports {
            wait_for(
                port,
                Duration::from_secs(30),
                |info| info.lines().any(|l| l.trim() == "cluster_state:ok"),
                &["CLUSTER", "INFO"],
            )
            .await?;
        }
        Ok(cluster)
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`: every node as a seed.
    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `n` distinct free loopback ports (all bound at once, so none repeats).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok(listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?)
}

/// Sends `cmd` to 127.0.0.1:`port` until its reply (as text) satisfies `ok`, for up to `limit`.
async fn wait_for(
    port: u16,
    limit: Duration,
    ok: impl Fn(&str) -> bool,
    cmd: &[&str],
) -> Result<()> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let deadline = Instant::now() + limit;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let mut con = client.get_multiplexed_async_connection().await?;
            let mut c = redis::cmd(cmd[0]);
            for a in &cmd[1..] {
                c.arg(*a);
            }
            c.query_async::<redis::Value>(&mut con).await
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(v)) => {
                let text = match &v {
                    redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                    other => format!("{other:?}"),
                };
                if ok(&text) {
                    return Ok(());
                }
                last = text;
            }
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Config(format!(
        "redis-server on 127.0.0.1:{port}: `{}` not ready after {limit:?}: {}",
        cmd.join(" "),
        last.trim()
    )))
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
