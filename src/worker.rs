//! The consumer loop: read → decode → coalesce → apply → acknowledge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::ack::{Acker, DeadLetter};
use crate::apply::{Applier, Outcome};
use crate::breaker::{guard, Breaker, BreakerState};
use crate::coalesce::{coalesce, DocUpdate};
use crate::config::WorkerConfig;
use crate::connection;
use crate::error::{Error, Result};
use crate::event::{decode_entry, Event};
use crate::keys::Keys;
use crate::read::{self, Entry, Fields, ReadFrom};
use crate::stream_id::StreamId;
use crate::{reclaim, retention, retry};
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
    /// Entries reclaimed from other consumers.
    pub reclaimed: AtomicU64,
    /// Sessions expired by this worker.
    pub expired: AtomicU64,
    /// Times the circuit breaker opened.
    pub breaker_opened: AtomicU64,
    /// Times the circuit breaker closed again.
    pub breaker_closed: AtomicU64,
}

/// How often the stream is trimmed and gone consumers are removed.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);

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
    let client = connection::client(&config.redis_url)?;
    let mut apply_con = connection::manager(&client, config.response_timeout).await?;
    let read_con = connection::manager(&client, config.block + config.response_timeout).await?;
    read::ensure_group(
        &mut apply_con,
        &config.stream,
        &config.group,
        config.group_start,
    )
    .await?;
    tracing::info!(
        stream = %config.stream, group = %config.group, consumer = %config.consumer,
        "worker started"
    );
    let breaker = Breaker::new("redis", config.breaker.clone());
    let observed = stats.clone();
    breaker.on_transition(move |_, to| {
        let counter = match to {
            BreakerState::Open => &observed.breaker_opened,
            BreakerState::Closed => &observed.breaker_closed,
            BreakerState::HalfOpen => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let mut worker = Worker {
        breaker,
        applier: Applier::new(
            Keys::new(&config.prefix),
            config.history.as_millis() as u64,
            config.session_ttl.as_millis() as u64,
        ),
        acker: Acker {
            stream: config.stream.clone(),
            group: config.group.clone(),
            dead_letter_stream: config.dead_letter_stream.clone(),
        },
        config,
        apply_con,
        read_con,
        shutdown,
        stats,
        caught_up: false,
        next_reclaim: Instant::now(),
        next_expire: Instant::now(),
        next_housekeeping: Instant::now(),
    };
    worker.run().await
}

struct Worker {
    config: WorkerConfig,
    applier: Applier,
    acker: Acker,
    apply_con: ConnectionManager,
    read_con: ConnectionManager,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    /// Guards every Redis call: while open, nothing is sent.
    breaker: Breaker,
    /// Whether the last read of new entries returned less than a full batch: only then does
    /// expiry run, so a backlog of heartbeats is applied before silence is judged.
    caught_up: bool,
    next_reclaim: Instant,
    next_expire: Instant,
    next_housekeeping: Instant,
}

impl Worker {
    async fn run(&mut self) -> Result<()> {
        // Start by replaying our own pending entries: a previous run (or a read that timed out on
        // our side) may have left some. `None` once they are done and we read new entries.
        let mut pending = Some(StreamId::default());
        let mut delays = retry::backoff();
        while !self.shutdown.is_cancelled() {
            let c = &self.config;
            let from = match pending {
                Some(after) => ReadFrom::Pending(after),
                None => ReadFrom::New(c.block),
            };
            let read = guard(
                &self.breaker,
                read::read(
                    &mut self.read_con,
                    &c.stream,
                    &c.group,
                    &c.consumer,
                    c.batch,
                    from,
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
                    match self.process(entries, pending.is_some()).await {
                        Ok(()) => pending = pending.map(|_| last),
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
            }
        }
        tracing::info!(consumer = %self.config.consumer, "worker stopped");
        Ok(())
    }

    /// The tasks that run between batches: reclaim, expiry, housekeeping. Their failures are
    /// logged and retried at their next turn; they never stop the worker.
    async fn periodic(&mut self) {
        let now = Instant::now();
        let c = &self.config;
        if !c.claim_idle.is_zero() && now >= self.next_reclaim {
            self.next_reclaim = now + (c.claim_idle / 2).max(Duration::from_millis(100));
            if let Err(e) = self.reclaim().await {
                tracing::warn!(error = %e, "reclaim failed");
            }
        }
        if !self.config.session_ttl.is_zero() && self.caught_up && now >= self.next_expire {
            let every = (self.config.session_ttl / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(5));
            self.next_expire = now + every;
            let breaker = self.breaker.clone();
            match guard(&breaker, self.expire()).await {
                Ok(true) => self.next_expire = now, // more are due: go on at the next turn
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "expiry failed"),
            }
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
            let breaker = self.breaker.clone();
            if let Err(e) = guard(&breaker, self.housekeeping()).await {
                tracing::warn!(error = %e, "housekeeping failed");
            }
        }
    }

    /// Takes over entries other consumers left pending longer than `--claim-idle`.
    async fn reclaim(&mut self) -> Result<()> {
        let mut cursor = StreamId::default();
        for _ in 0..16 {
            let c = &self.config;
            let claim = reclaim::autoclaim(
                &mut self.apply_con,
                &c.stream,
                &c.group,
                &c.consumer,
                c.claim_idle,
                cursor,
                c.batch,
            );
            // Guarded call by call: `process` below guards its own calls.
            let claimed = guard(&self.breaker, claim).await?;
            self.stats
                .trimmed
                .fetch_add(claimed.deleted as u64, Ordering::Relaxed);
            if !claimed.entries.is_empty() {
                tracing::info!(
                    entries = claimed.entries.len(),
                    "reclaimed idle pending entries"
                );
                self.stats
                    .reclaimed
                    .fetch_add(claimed.entries.len() as u64, Ordering::Relaxed);
                self.process(claimed.entries, true).await?;
            }
            if claimed.next == StreamId::default() {
                break;
            }
            cursor = claimed.next;
        }
        Ok(())
    }

    /// Expires the silent sessions of documents that are due; true when more may be due.
    async fn expire(&mut self) -> Result<bool> {
        let lease =
            (self.config.session_ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let docs = self
            .applier
            .claim_due(
                &mut self.apply_con,
                lease.as_millis() as u64,
                EXPIRE_DOCS_PER_ROUND,
            )
            .await?;
        if docs.is_empty() {
            return Ok(false);
        }
        let n = self.applier.expire(&mut self.apply_con, &docs).await?;
        self.stats.expired.fetch_add(n, Ordering::Relaxed);
        if n > 0 {
            tracing::debug!(
                sessions = n,
                documents = docs.len(),
                "expired silent sessions"
            );
        }
        Ok(docs.len() == EXPIRE_DOCS_PER_ROUND)
    }

    /// Trims the stream and removes consumers that are gone.
    async fn housekeeping(&mut self) -> Result<()> {
        let c = &self.config;
        if !c.retain.is_zero() {
            let n = retention::trim(&mut self.apply_con, &c.stream, c.retain).await?;
            if n > 0 {
                tracing::debug!(entries = n, "trimmed the events stream");
            }
        }
        if !c.consumer_idle.is_zero() {
            let gone = retention::remove_idle_consumers(
                &mut self.apply_con,
                &c.stream,
                &c.group,
                &c.consumer,
                c.consumer_idle,
            )
            .await?;
            if !gone.is_empty() {
                tracing::info!(consumers = ?gone, "removed idle consumers with nothing pending");
            }
        }
        Ok(())
    }

    /// Decodes, applies and acknowledges one batch. Entries delivered before (replayed or
    /// reclaimed) are checked against `--max-deliveries` first.
    async fn process(&mut self, entries: Vec<Entry>, redelivered: bool) -> Result<()> {
        let span = tracing::debug_span!("batch", size = entries.len());
        let _guard = span.enter();
        let deliveries = if redelivered {
            let c = &self.config;
            let counts = reclaim::delivery_counts(
                &mut self.apply_con,
                &c.stream,
                &c.group,
                &c.consumer,
                &entries,
            );
            guard(&self.breaker, counts).await?
        } else {
            Default::default()
        };
        let mut ids = Vec::with_capacity(entries.len());
        let mut events: Vec<(StreamId, Event)> = Vec::with_capacity(entries.len());
        let mut raw = Vec::with_capacity(entries.len());
        let mut dead = Vec::new();
        for entry in entries {
            ids.push(entry.id);
            let Some(fields) = entry.fields else {
                self.stats.trimmed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
            if delivered > self.config.max_deliveries {
                dead.push(DeadLetter {
                    id: entry.id,
                    fields,
                    reason: format!("too many deliveries ({delivered})"),
                });
                continue;
            }
            match decode_entry(entry.id, &fields, &self.config.limits) {
                Ok(ev) => {
                    events.push((entry.id, ev));
                    raw.push(fields);
                }
                Err(e) => dead.push(DeadLetter {
                    id: entry.id,
                    fields,
                    reason: reason(&e),
                }),
            }
        }
        let docs = coalesce(&events);
        let outcomes = self.apply(&docs, &events, &mut raw, &mut dead).await?;
        self.count(&docs, &events, &outcomes, dead.len());
        let (acker, con, breaker) = (&self.acker, &self.apply_con, &self.breaker);
        let shutdown = self.shutdown.clone();
        retry::until_done("acknowledge", &shutdown, self.config.drain_timeout, || {
            let mut con = con.clone();
            let (dead, ids) = (&dead, &ids);
            async move { guard(breaker, acker.finish(&mut con, dead, ids)).await }
        })
        .await?;
        Ok(())
    }

    /// Applies every document; a document Redis refuses for good is dead-lettered instead.
    async fn apply(
        &mut self,
        docs: &[DocUpdate],
        events: &[(StreamId, Event)],
        raw: &mut [Fields],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<Vec<Vec<Outcome>>> {
        let shutdown = self.shutdown.clone();
        let (applier, con, breaker) = (&self.applier, &self.apply_con, &self.breaker);
        let all = retry::until_done("apply", &shutdown, self.config.drain_timeout, || {
            let mut con = con.clone();
            async move { guard(breaker, applier.apply(&mut con, docs)).await }
        })
        .await;
        match all {
            Ok(o) => return Ok(o),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => tracing::warn!(error = %e, "batch refused, applying document by document"),
        }
        // Isolate the documents Redis refuses (say, a key of the wrong type written by someone
        // else) so that the rest of the batch still applies.
        let mut out = Vec::with_capacity(docs.len());
        for d in docs {
            let one = std::slice::from_ref(d);
            let r = retry::until_done("apply", &shutdown, self.config.drain_timeout, || {
                let mut con = con.clone();
                async move { guard(breaker, applier.apply(&mut con, one)).await }
            })
            .await;
            match r {
                Ok(mut o) => out.push(o.pop().unwrap_or_default()),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    for s in &d.sessions {
                        for &i in &s.events {
                            dead.push(DeadLetter {
                                id: events[i].0,
                                fields: std::mem::take(&mut raw[i]),
                                reason: format!("cannot apply: {e}"),
                            });
                        }
                    }
                    out.push(Vec::new());
                }
            }
        }
        Ok(out)
    }

    fn count(
        &self,
        docs: &[DocUpdate],
        events: &[(StreamId, Event)],
        outcomes: &[Vec<Outcome>],
        dead: usize,
    ) {
        let (mut applied, mut dup, mut stale) = (0, 0, 0);
        for (d, o) in docs.iter().zip(outcomes) {
            for (s, &winner) in d.sessions.iter().zip(o) {
                for &i in &s.events {
                    let (sid, ev) = &events[i];
                    let outcome = if *sid == s.version.sid {
                        winner
                    } else if ev.id == s.event_id {
                        Outcome::Duplicate
                    } else if winner != Outcome::Applied || *sid > s.version.sid {
                        // Older than what Redis holds, or arrived after the winner yet lost to
                        // it on `seq`: stale either way.
                        Outcome::Stale
                    } else {
                        // Superseded within the batch: applied, then overwritten, in order.
                        Outcome::Applied
                    };
                    match outcome {
                        Outcome::Applied => applied += 1,
                        Outcome::Duplicate => dup += 1,
                        Outcome::Stale => stale += 1,
                    }
                }
            }
        }
        let s = &self.stats;
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.applied.fetch_add(applied, Ordering::Relaxed);
        s.duplicate.fetch_add(dup, Ordering::Relaxed);
        s.stale.fetch_add(stale, Ordering::Relaxed);
        s.dead_lettered.fetch_add(dead as u64, Ordering::Relaxed);
        tracing::debug!(
            applied,
            duplicate = dup,
            stale,
            dead_lettered = dead,
            "batch done"
        );
    }
}

/// The dead-letter reason for a decode error: its text without the "invalid event: " prefix.
fn reason(e: &Error) -> String {
    match e {
        Error::InvalidEvent(r) => r.clone(),
        other => other.to_string(),
    }
}
