//! The consumer loop: read → decode → coalesce → apply → acknowledge (in [`batch`]), and between
//! batches the periodic tasks (in [`periodic`]): reclaim, expiry, housekeeping, sampling.

mod batch;
mod periodic;
pub mod watchdog;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::connection::Conn;
use crate::resp::ReadConn;
use tokio_util::sync::CancellationToken;

use crate::ack::Acker;
use crate::apply::Applier;
use crate::breaker::{guard, Breaker, BreakerState};
use crate::config::WorkerConfig;
use crate::connection;
use crate::error::{Error, Result};
use crate::keys::Keys;
use std::collections::HashMap;

use crate::read::{self, Entry, ReadFrom};
use crate::retry;
use crate::snapshot::Flusher;
use crate::stream_id::StreamId;
use tokio::time::Instant;

/// Counters of what a worker did, readable while it runs (tests and the demo use them).
#[derive(Debug, Default)]
pub struct Stats {
    /// Batches processed.
    pub batches: AtomicU64,
    /// Events that changed state (including ones superseded within their batch).
    pub applied: AtomicU64,
    /// Events already applied (same event id).
    pub duplicate: AtomicU64,
    /// Events older than the session's state.
    pub stale: AtomicU64,
    /// Entries sent to the dead-letter stream.
    pub dead_lettered: AtomicU64,
    /// Pending entries whose payload had been trimmed away.
    pub trimmed: AtomicU64,
    /// Entries read under a lease, without the pending-entries list (see [`crate::lease`]).
    pub leased: AtomicU64,
    /// Entries reclaimed from other consumers (pending entries and leases).
    pub reclaimed: AtomicU64,
    /// Sessions expired by this worker.
    pub expired: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_opened: AtomicU64,
    /// Times the circuit breaker closed again.
    pub breaker_closed: AtomicU64,
    /// Consumer loops the watchdog restarted (see [`watchdog`]): should stay 0.
    pub loop_restarts: AtomicU64,
    /// Snapshot requests this worker emitted.
    pub snapshots: AtomicU64,
    /// Where the HTTP listener is bound, once it is.
    pub http_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Stats {
    /// Counts `n` sessions ended by expiry, in these counters and the metric (by an expiry visit,
    /// or by a step making room for a new session).
    pub(crate) fn add_expired(&self, n: u64) {
        self.expired.fetch_add(n, Ordering::Relaxed);
        crate::metrics::sessions_expired(n);
    }
}

/// How often the stream is trimmed and gone consumers are removed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

/// How often a loop looks for its own entries pending too long.
const OWN_CHECK_EVERY: Duration = Duration::from_secs(5);

/// How often outboxes left behind by other replicas are flushed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// How often the gauges (lag, pending, lengths, totals) are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Most documents one expiry round takes on.
const EXPIRE_DOCS_PER_ROUND: usize = 200;

/// Runs a worker until `shutdown` is cancelled; the batch in hand is finished first.
///
/// Fails at start-up when the configuration is invalid or Redis is unreachable.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<()> {
    run_with_stats(config, shutdown, Arc::default()).await
}

/// [`run`], updating `stats` as it goes.
pub async fn run_with_stats(
    config: WorkerConfig,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<()> {
    config.validate()?;
    let client = connection::open(&config.redis_url, &config.connect)?;
    let mut apply_con = connection::connect(&client, config.response_timeout).await?;
    let streams = config.streams();
    for stream in &streams {
        read::ensure_group(&mut apply_con, stream, &config.group, config.group_start).await?;
    }
    tracing::info!(
        stream = %config.stream, shards = config.stream_shards, group = %config.group,
        consumer = %config.consumer, "worker started"
    );
    let breaker = Breaker::new("redis", config.breaker.clone());
    let observed = stats.clone();
    breaker.on_transition(move |_, to| {
        crate::metrics::breaker(to);
        let counter = match to {
            BreakerState::Open => &observed.breaker_opened,
            BreakerState::Closed => &observed.breaker_closed,
            BreakerState::HalfOpen => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let progress: Vec<_> = streams.iter().map(watchdog::Progress::new).collect();
    let handle = crate::metrics::install();
    crate::metrics::breaker_initial(breaker.state());
    tokio::spawn(crate::metrics::upkeep(handle.clone(), shutdown.clone()));
    if let Some(addr) = config.http_addr {
        let health = Arc::new(crate::http::Health {
            client: client.clone(),
            stream: streams[0].clone(),
            group: config.group.clone(),
            breaker: breaker.clone(),
            metrics: handle,
            loops: progress.clone(),
            stall_limit: stall_limit(&config),
        });
        match crate::http::serve(addr, health, shutdown.clone()).await {
            Ok(bound) => {
                let _ = stats.http_addr.set(bound);
            }
            // Several replicas on one host (a laptop, a test) share the default port: the worker
            // matters more than its metrics, so it runs, and says how to expose them.
            Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tracing::warn!(%addr, "HTTP listener not started: address in use (give each replica its own --http-addr)");
            }
            Err(e) => return Err(e),
        }
    }
    let keys = Keys::new(&config.prefix).with_cluster(apply_con.is_cluster());
    let flusher = Flusher::new(keys.clone(), &config.snapshots.stream);
    let applier = Applier::with_snapshots(
        keys,
        config.history.as_millis() as u64,
        config.session_ttl.as_millis() as u64,
        config.snapshots.clone(),
    )
    .with_max_user_sessions(config.max_user_sessions);
    let applier = match &client {
        connection::Client::Single(c) if config.planned => {
            applier.with_planned_path_on(c.clone(), config.response_timeout, config.lean)
        }
        _ => applier,
    };
    match &client {
        connection::Client::Single(c) if config.lean && crate::resp::eligible(c) => {
            tracing::info!("reads and the planned path on lean RESP2 connections")
        }
        _ => tracing::info!("reads and the planned path on redis-rs connections"),
    }
    if let Err(e) = applier.load(&mut apply_con).await {
        tracing::warn!(error = %e, "cannot load the scripts ahead: each is loaded on first use");
    }
    // One consumer loop per stream (shard), each with its own blocking read connection; they
    // share the apply connection, the breaker and the counters. The first one also runs the
    // tasks that concern all streams (expiry, outbox flush, sampling).
    let mut workers = Vec::with_capacity(streams.len());
    for (i, stream) in streams.iter().enumerate() {
        let mut own = config.clone();
        own.stream.clone_from(stream);
        workers.push(Worker {
            breaker: breaker.clone(),
            applier: applier.clone(),
            acker: Acker {
                stream: stream.clone(),
                group: config.group.clone(),
                dead_letter_stream: config.dead_letter_stream.clone(),
            },
            config: own,
            leader: i == 0,
            streams: streams.clone(),
            apply_con: apply_con.clone(),
            read_con: tokio::sync::Mutex::new(
                ReadConn::connect(&client, config.block + config.response_timeout, config.lean)
                    .await?,
            ),
            client: client.clone(),
            progress: progress[i].clone(),
            leases_off: Default::default(),
            shutdown: shutdown.clone(),
            stats: stats.clone(),
            caught_up: false,
            replay_own: false,
            next_own_check: Instant::now() + OWN_CHECK_EVERY,
            next_reclaim: Instant::now(),
            next_expire: Instant::now(),
            next_housekeeping: Instant::now(),
            next_sample: Instant::now(),
            next_flush: Instant::now(),
            flusher: flusher.clone(),
            expiry: None,
        });
    }
    let runs = workers.iter_mut().map(|w| async {
        let result = w.supervised().await;
        if result.is_err() {
            // A fatal error stops every loop, each after its batch in hand.
            w.shutdown.cancel();
        }
        result
    });
    futures_util::future::join_all(runs)
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()
        .map(|_| ())
}

struct Worker {
    /// This loop's configuration: `stream` is the one stream (shard) it consumes.
    config: WorkerConfig,
    /// Whether this loop also runs the tasks that concern all streams.
    leader: bool,
    /// Every stream of the worker (for sampling).
    streams: Vec<String>,
    applier: Applier,
    acker: Acker,
    apply_con: Conn,
    /// Reads new entries (lean where it can: see [`crate::resp`]); one read at a time, the lock
    /// only lets a read ahead borrow it while the loop holds `&self`.
    read_con: tokio::sync::Mutex<ReadConn>,
    /// Where Redis is: a loop restarted by the watchdog opens fresh connections.
    client: connection::Client,
    /// This loop's liveness, watched by [`Worker::supervised`].
    progress: Arc<watchdog::Progress>,
    /// Set once a lease could not be recorded: backlog reads use the pending list from then on.
    leases_off: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    /// Guards every Redis call: while open, nothing is sent.
    breaker: Breaker,
    /// Whether the last read of new entries returned less than a full batch: only then does
    /// expiry run, so a backlog of heartbeats is applied before silence is judged.
    caught_up: bool,
    /// Set when this consumer has entries pending too long (see [`reclaim::has_stale_own`]):
    /// the loop replays its pending entries next.
    replay_own: bool,
    next_own_check: Instant,
    next_reclaim: Instant,
    next_expire: Instant,
    next_housekeeping: Instant,
    next_sample: Instant,
    next_flush: Instant,
    flusher: Flusher,
    /// The expiry round running beside the loop's batches, if any (the first loop's).
    expiry: Option<tokio::task::JoinHandle<Result<bool>>>,
}

/// Most batches committed in a row during a backlog before the periodic tasks run.
const WINDOW: usize = 8;

/// How a window of batches ended.
enum Window {
    /// The backlog goes on: the next batch, read and prepared.
    Next(batch::Prepared),
    /// Caught up (a short or empty read) or shutting down: everything read is committed.
    Done,
    /// A read ahead failed: whatever it delivered is in our pending list.
    ReadFailed,
}

/// How long a read may take before it is given up even if its connection's response timeout has
/// not ended it: twice that timeout. A backstop for liveness: after a Redis restart under load a
/// worker was once seen waiting on a read for over a minute, without a reply or an error.
fn read_limit(c: &WorkerConfig) -> Duration {
    c.block + c.response_timeout * 2
}

/// How long a consumer loop may go without a mark (a Redis call started or ended, a step
/// entered) before the watchdog restarts it: three of its longest reads plus a breaker cooldown
/// and 5 s, and at least 30 s. No loop that works waits that long: every call is bounded by a
/// timeout, every retry sleep by a cooldown.
pub fn stall_limit(c: &WorkerConfig) -> Duration {
    let cooldown = c.breaker.cooldown.mul_f64(1.0 + c.breaker.jitter.max(0.0));
    (read_limit(c) * 3 + cooldown + Duration::from_secs(5)).max(Duration::from_secs(30))
}

/// `read`, or an I/O error (transient: the read is retried, its entries replayed) when it takes
/// longer than `limit`.
async fn bounded<T>(
    limit: Duration,
    read: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, read).await.unwrap_or_else(|_| {
        tracing::warn!(?limit, "a read outlived its response timeout: given up");
        Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "read outlived its response timeout",
        )))
    })
}

/// Waits for every commit in flight; the first error ends the wait (the others' entries stay
/// pending, to be replayed).
async fn finish_all<F>(inflight: &mut futures_util::stream::FuturesUnordered<F>) -> Result<()>
where
    F: std::future::Future<Output = Result<()>>,
{
    use futures_util::StreamExt as _;
    while let Some(done) = inflight.next().await {
        done?;
    }
    Ok(())
}

impl Worker {
    /// [`Worker::run`] under the watchdog: when the loop is silent for [`stall_limit`], it is
    /// dropped wherever it waits (what it read stays pending), logged with the step it was in,
    /// and started again on fresh connections (replaying its pending entries first).
    async fn supervised(&mut self) -> Result<()> {
        let limit = stall_limit(&self.config);
        loop {
            let progress = self.progress.clone();
            if let Some(result) = watchdog::supervise(&progress, limit, self.run()).await {
                return result;
            }
            crate::metrics::loop_restarted();
            self.stats.loop_restarts.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                stream = %progress.name(), step = progress.step(), silent = ?progress.silent_for(),
                "consumer loop stalled without an error: restarting it on fresh connections"
            );
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
            self.reconnect().await;
        }
    }

    /// Replaces this loop's connections (after a stall: the old ones are suspect); keeps the old
    /// ones when Redis cannot be reached now (their own reconnection goes on).
    async fn reconnect(&mut self) {
        let c = &self.config;
        let fresh = async {
            let read =
                ReadConn::connect(&self.client, c.block + c.response_timeout, c.lean).await?;
            let apply = connection::connect(&self.client, c.response_timeout).await?;
            Ok::<_, Error>((read, apply))
        };
        match tokio::time::timeout(Duration::from_secs(30), fresh).await {
            Ok(Ok((read, apply))) => {
                *self.read_con.get_mut() = read;
                self.apply_con = apply;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot open fresh connections: keeping the old ones")
            }
            Err(_) => tracing::warn!("opening fresh connections timed out: keeping the old ones"),
        }
    }

    async fn run(&mut self) -> Result<()> {
        // Start by replaying our own pending entries: a previous run (or a read that timed out on
        // our side) may have left some. `None` once they are done and we read new entries.
        let mut pending = Some(StreamId::default());
        let mut delays = retry::backoff();
        while !self.shutdown.is_cancelled() {
            // A replay starts with this consumer's own leases, then its pending entries: a batch
            // from the pending list (the end of a backlog) may have been read after a leased one,
            // and acknowledging it first would show "nothing pending" too early.
            if pending == Some(StreamId::default()) {
                if let Err(e) = self.replay_leases(true).await {
                    if retry::is_fatal(&e) {
                        return Err(e);
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(2));
                    tracing::warn!(error = %e, retry_in = ?delay, "replaying own leases failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
            }
            let c = &self.config;
            let from = match pending {
                Some(after) => ReadFrom::Pending(after),
                None => ReadFrom::New(c.block),
            };
            watchdog::enter(if pending.is_some() {
                "replay pending"
            } else {
                "read"
            });
            let limit = read_limit(c);
            let read = guard(
                &self.breaker,
                bounded(
                    limit,
                    read::read(
                        self.read_con.get_mut(),
                        &c.stream,
                        &c.group,
                        &c.consumer,
                        c.batch,
                        from,
                    ),
                ),
            );
            let result = if pending.is_some() {
                read.await
            } else {
                tokio::select! {
                    // Cancel only here, while waiting for input: a batch in hand is finished.
                    _ = self.shutdown.cancelled() => break,
                    r = read => r,
                }
            };
            match result {
                Ok(entries) if entries.is_empty() => {
                    if pending.take().is_none() {
                        self.caught_up = true;
                    }
                }
                Ok(entries) => {
                    delays = retry::backoff();
                    if pending.is_none() {
                        self.caught_up = entries.len() < self.config.batch;
                    }
                    let last = entries.last().map(|e| e.id).unwrap_or_default();
                    let done = if pending.is_some() {
                        self.process(entries, true).await.map(|()| true)
                    } else {
                        self.backlog(entries).await
                    };
                    match done {
                        Ok(true) => pending = pending.map(|_| last),
                        // A read ahead failed: whatever it delivered is in our pending list.
                        Ok(false) => pending = Some(StreamId::default()),
                        Err(e) if retry::is_fatal(&e) => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %e, "batch left pending, it will be replayed");
                            pending = Some(StreamId::default());
                        }
                    }
                }
                Err(Error::Redis(e)) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")) => {
                    // The stream or the group was deleted under us: create them again.
                    tracing::warn!(error = %e, "consumer group missing, creating it again");
                    let c = &self.config;
                    let create =
                        read::ensure_group(&mut self.apply_con, &c.stream, &c.group, c.group_start);
                    if let Err(e) = guard(&self.breaker, create).await {
                        tracing::warn!(error = %e, "cannot create the consumer group");
                        tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(2))).await;
                    }
                    pending = Some(StreamId::default());
                }
                Err(e) if retry::is_fatal(&e) => return Err(e),
                Err(e) => {
                    // Whatever a failed read delivered is in our pending list: replay it.
                    pending = Some(StreamId::default());
                    let delay = match e {
                        Error::BreakerOpen(retry_in) => retry_in,
                        _ => delays.next().unwrap_or(Duration::from_secs(2)),
                    };
                    tracing::warn!(error = %e, retry_in = ?delay, "read failed");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            if pending.is_none() && !self.shutdown.is_cancelled() {
                self.periodic().await;
                if std::mem::take(&mut self.replay_own) {
                    pending = Some(StreamId::default());
                }
            }
        }
        if let Some(round) = self.expiry.take() {
            // A round is short (its scripts' replies); let it end rather than cut it off.
            let _ = round.await;
        }
        self.drain_pending().await;
        tracing::info!(consumer = %self.config.consumer, "worker stopped");
        Ok(())
    }

    /// On shutdown: entries a read we stopped waiting for may still have put in our pending list
    /// are processed too, within the drain timeout, so a clean stop leaves nothing pending.
    async fn drain_pending(&mut self) {
        watchdog::enter("drain");
        let deadline = Instant::now() + self.config.drain_timeout;
        let mut after = StreamId::default();
        while Instant::now() < deadline {
            let c = &self.config;
            let from = ReadFrom::Pending(after);
            let read = read::read(
                &mut self.apply_con,
                &c.stream,
                &c.group,
                &c.consumer,
                c.batch,
                from,
            );
            let entries = match tokio::time::timeout_at(deadline, guard(&self.breaker, read)).await
            {
                Ok(Ok(entries)) if !entries.is_empty() => entries,
                Ok(Ok(_)) => return,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot drain pending entries: they will be replayed");
                    return;
                }
                Err(_) => return,
            };
            after = entries.last().map(|e| e.id).unwrap_or_default();
            if let Err(e) = self.process(entries, true).await {
                tracing::warn!(error = %e, "pending entries left for the next run");
                return;
            }
        }
    }

    /// Applies new entries; while reads come back full (a backlog), reads and decodes the next
    /// batch while the current ones are applied, with two batches' commits in flight at a time
    /// (one's acknowledgement overlaps the next one's scripts), so the worker's CPU and Redis's
    /// overlap (Redis still waits for the worker about 6% of the time in the benchmark: see
    /// [`Worker::window`]). Order does not matter for the
    /// result (each session is last-writer-wins), and every batch is acknowledged only once
    /// applied. Returns false when a read ahead failed (its entries may be in our pending list,
    /// to be replayed).
    async fn backlog(&mut self, first: Vec<Entry>) -> Result<bool> {
        let c = &self.config;
        let mut current = batch::prepare(first, &c.limits, c.max_deliveries, &HashMap::new());
        loop {
            let (next, caught_up) = self.window(current).await?;
            self.caught_up = caught_up;
            match next {
                Window::Next(next) => current = next,
                Window::Done => return Ok(true),
                Window::ReadFailed => return Ok(false),
            }
            if !self.shutdown.is_cancelled() {
                self.periodic().await;
            }
        }
    }

    /// Commits `first` and the batches read after it, up to [`WINDOW`] of them, two in flight
    /// at a time; then, when the backlog goes on, returns the next batch (read and prepared, not
    /// committed) with everything before it committed, so that the periodic tasks can run. Also
    /// returns whether the last batch committed came from a short read (caught up).
    ///
    /// The next read starts as soon as the batch before it is in hand, and a batch read is
    /// committed as soon as fewer than two commits are in flight: so a batch's scripts are
    /// queued at Redis while the previous batch's still run. (Reading only once a commit was
    /// sent made the read come back when that commit's scripts were done: Redis sends a large
    /// reply 64 KB per turn of its event loop, between the scripts. It then sat idle while the
    /// worker prepared the batch, an eighth to a fifth of the time in the benchmark.)
    ///
    /// After a short batch (live traffic) the next read does not block: it takes what arrived
    /// meanwhile, while the short batch is committed, and the window ends at the first empty
    /// read. A blocking read returns as soon as one entry arrives: when a producer pipelines 50
    /// events, it returns the first of them alone, and the other 49 used to wait for that one's
    /// script and acknowledgement before they were read (in the benchmark's delay run, four
    /// alternating pairs: p99 5.2-6.7 ms before, 5.0-5.3 after).
    async fn window(&self, first: batch::Prepared) -> Result<(Window, bool)> {
        use futures_util::StreamExt as _;
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        // A batch read and prepared, not committed yet; the read in progress (only while no
        // batch waits); the batches committed; whether the last batch taken up was short.
        let mut ready = Some(first);
        let mut read = None;
        let mut committed = 0;
        let mut short = false;
        loop {
            if let Some(batch) = ready.take() {
                if batch.has_pending() && self.leased() {
                    // Entries from the pending-entries list are acknowledged only after the
                    // leased batches before them: "no lag and nothing pending" must still mean
                    // everything delivered was applied.
                    finish_all(&mut inflight).await?;
                }
                short = batch.size < self.config.batch;
                if self.shutdown.is_cancelled() || (short && committed + 1 >= WINDOW) {
                    inflight.push(self.commit(batch, false));
                    finish_all(&mut inflight).await?;
                    return Ok((Window::Done, short));
                }
                if committed == WINDOW {
                    finish_all(&mut inflight).await?;
                    return Ok((Window::Next(batch), false));
                }
                if inflight.len() < 2 {
                    inflight.push(self.commit(batch, false));
                    committed += 1;
                } else {
                    ready = Some(batch);
                }
            }
            if read.is_none() && ready.is_none() {
                watchdog::enter("read ahead");
                read = Some(Box::pin(self.read_ahead(short)));
            }
            // The read first (biased): polled before the commits, it is queued at Redis first.
            let reading = async {
                match read.as_mut() {
                    Some(r) => r.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                next = reading => {
                    read = None;
                    match next {
                        Ok(next) if next.size == 0 => {
                            finish_all(&mut inflight).await?;
                            return Ok((Window::Done, true));
                        }
                        Ok(next) => ready = Some(next),
                        Err(e) => {
                            finish_all(&mut inflight).await?;
                            tracing::warn!(error = %e, "read failed");
                            return Ok((Window::ReadFailed, false));
                        }
                    }
                }
                Some(done) = inflight.next(), if !inflight.is_empty() => done?,
            }
        }
    }

    /// Whether backlog reads are leased (see [`crate::lease`]): not on a Redis Cluster, nor once
    /// a lease could not be recorded (an ACL without `eval`, say).
    fn leased(&self) -> bool {
        !self.apply_con.is_cluster() && !self.leases_off.load(Ordering::Relaxed)
    }

    /// Reads the next batch of new entries and prepares it: after a short batch (`arrived`),
    /// what has arrived since, without blocking; in a backlog a leased read (without blocking:
    /// there is always something), or on a cluster a blocking read on the read connection.
    async fn read_ahead(&self, arrived: bool) -> Result<batch::Prepared> {
        let c = &self.config;
        let mut con = self.read_con.lock().await;
        let (limits, max) = (&c.limits, c.max_deliveries);
        if arrived || !self.leased() {
            let from = if arrived {
                ReadFrom::Arrived
            } else {
                ReadFrom::New(c.block)
            };
            let read = read::read(&mut *con, &c.stream, &c.group, &c.consumer, c.batch, from);
            let entries = guard(&self.breaker, bounded(read_limit(c), read)).await?;
            return Ok(batch::prepare(entries, limits, max, &HashMap::new()));
        }
        let read = crate::lease::read(&mut *con, &c.stream, &c.group, &c.consumer, c.batch);
        let read = match guard(&self.breaker, bounded(read_limit(c), read)).await {
            // Refused outright (an ACL without `eval`, say): nothing was read.
            Err(Error::Redis(e)) if matches!(e.code(), Some("NOPERM" | "EXECABORT")) => {
                tracing::error!(error = %e, "leased reads refused: turned off until restart");
                self.leases_off.store(true, Ordering::Relaxed);
                return Err(Error::Redis(e));
            }
            r => r?,
        };
        if read.uncovered && !self.leases_off.swap(true, Ordering::Relaxed) {
            tracing::error!("leased reads turned off until restart: a lease could not be recorded");
        }
        let ids = read.pending.iter().map(|e| e.id).collect();
        let n = read.leased.len() as u64;
        self.stats.leased.fetch_add(n, Ordering::Relaxed);
        let mut entries = read.pending;
        entries.extend(read.leased);
        let batch = batch::prepare(entries, limits, max, &HashMap::new());
        Ok(batch.acked_by(ids, read.lease))
    }

    /// Replays leases left behind (see [`crate::lease`]): this consumer's own (`own`: at start
    /// and after a failed batch, when none of its batches is in flight), or other consumers'
    /// older than `--claim-idle`, taken over. Each is taken with one more attempt, its entries
    /// read again with `XRANGE` and applied, then the lease deleted.
    async fn replay_leases(&mut self, own: bool) -> Result<()> {
        if self.apply_con.is_cluster() {
            return Ok(());
        }
        watchdog::enter("replay leases");
        let c = &self.config;
        let list = crate::lease::list(&mut self.apply_con, &c.stream, &c.group);
        let leases = guard(&self.breaker, list).await?;
        let now = crate::ids::now_ms();
        for lease in leases {
            let c = &self.config;
            let mine = lease.consumer == c.consumer;
            let due = if own {
                mine
            } else {
                !mine && !c.claim_idle.is_zero() && lease.older_than(now, c.claim_idle)
            };
            if !due {
                continue;
            }
            let (stream, group) = (&c.stream, &c.group);
            let take = crate::lease::take(&mut self.apply_con, stream, group, &lease, &c.consumer);
            let Some(taken) = guard(&self.breaker, take).await? else {
                continue;
            };
            let read = crate::lease::entries(&mut self.apply_con, stream, &taken);
            let entries = guard(&self.breaker, read).await?;
            tracing::info!(
                entries = entries.len(), from = %lease.consumer, after = %lease.after,
                attempts = taken.attempts, "replaying a lease left behind"
            );
            if !mine {
                self.stats
                    .reclaimed
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                crate::metrics::reclaimed(entries.len() as u64, 0);
            }
            let deliveries = entries.iter().map(|e| (e.id, taken.attempts)).collect();
            let c = &self.config;
            let batch = batch::prepare(entries, &c.limits, c.max_deliveries, &deliveries);
            self.commit(batch.acked_by(Vec::new(), Some(taken.field)), true)
                .await?;
        }
        Ok(())
    }
}
