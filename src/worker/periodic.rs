//! Between batches: reclaim, expiry of silent sessions (a task of its own), housekeeping, metric
//! sampling.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{
    watchdog, Stats, Worker, EXPIRE_DOCS_PER_ROUND, FLUSH_EVERY, HOUSEKEEPING_EVERY,
    OWN_CHECK_EVERY, SAMPLE_EVERY,
};
use crate::apply::Applier;
use crate::breaker::{guard, Breaker};
use crate::connection::Conn;
use crate::error::Result;
use crate::snapshot::Flusher;
use crate::stream_id::StreamId;
use crate::{metrics, reclaim, retention};

impl Worker {
    /// The tasks that run between batches: reclaim, expiry, housekeeping. Their failures are
    /// logged and retried at their next turn; they never stop the worker.
    pub(super) async fn periodic(&mut self) {
        let now = Instant::now();
        let c = &self.config;
        if !c.claim_idle.is_zero() && now >= self.next_reclaim {
            self.next_reclaim = now + (c.claim_idle / 2).max(Duration::from_millis(100));
            watchdog::enter("reclaim");
            if let Err(e) = self.reclaim().await {
                tracing::warn!(error = %e, "reclaim failed");
            }
        }
        if now >= self.next_own_check {
            self.next_own_check = now + OWN_CHECK_EVERY;
            watchdog::enter("own pending check");
            let c = &self.config;
            // Longer than any read or batch in hand can take.
            let idle = ((c.block + c.response_timeout) * 3).max(Duration::from_secs(5));
            let check =
                reclaim::has_stale_own(&mut self.apply_con, &c.stream, &c.group, &c.consumer, idle);
            match guard(&self.breaker, check).await {
                Ok(true) => {
                    tracing::warn!("entries delivered to this consumer were never processed (a lost read reply): replaying them");
                    self.replay_own = true;
                }
                Ok(false) => {}
                Err(e) => tracing::debug!(error = %e, "checking own pending entries failed"),
            }
            // Likewise a lease of this consumer older than that (none of its batches is in
            // flight here): one taken over whose batch failed, or a read's reply lost.
            let c = &self.config;
            let list = crate::lease::list(&mut self.apply_con, &c.stream, &c.group);
            match guard(&self.breaker, list).await {
                Ok(leases) => {
                    let now = crate::ids::now_ms();
                    let c = &self.config;
                    let old = |l: &crate::lease::Lease| {
                        l.consumer == c.consumer && l.older_than(now, idle)
                    };
                    if leases.iter().any(old) {
                        tracing::warn!("a lease of this consumer was left behind: replaying it");
                        self.replay_own = true;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "checking own leases failed"),
            }
        }
        if !self.leader {
            // Every loop reclaims and trims its own stream; the rest is the first loop's.
            if now >= self.next_housekeeping {
                self.next_housekeeping = now + HOUSEKEEPING_EVERY;
                watchdog::enter("housekeeping");
                let breaker = self.breaker.clone();
                if let Err(e) = guard(&breaker, self.housekeeping()).await {
                    tracing::warn!(error = %e, "housekeeping failed");
                }
            }
            return;
        }
        // Visits run also without a TTL: they prune the ended sessions of busy documents. A round
        // is a task of its own beside the loop's batches: a visit of a big document, or on a
        // cluster the sweep over every slot's index, would otherwise hold the loop's reads back.
        if let Some(round) = self.expiry.take_if(|round| round.is_finished()) {
            match round.await {
                Ok(Ok(true)) => self.next_expire = now, // more are due: go on at the next turn
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "expiry failed"),
                Err(e) => tracing::warn!(error = %e, "expiry round stopped"),
            }
        }
        if self.expiry.is_none() && self.caught_up && now >= self.next_expire {
            let every = (self.config.session_ttl / 4)
                .clamp(Duration::from_millis(250), Duration::from_secs(5));
            self.next_expire = now + every;
            let round = expire(
                self.applier.clone(),
                self.apply_con.clone(),
                self.flusher.clone(),
                self.breaker.clone(),
                self.stats.clone(),
                self.config.session_ttl,
            );
            let breaker = self.breaker.clone();
            self.expiry = Some(tokio::spawn(async move { guard(&breaker, round).await }));
        }
        if self.config.snapshots.enabled() && now >= self.next_flush {
            // On a cluster the sweep asks every hash slot: less often.
            let every = if self.apply_con.is_cluster() {
                FLUSH_EVERY * 10
            } else {
                FLUSH_EVERY
            };
            self.next_flush = now + every;
            watchdog::enter("flush outboxes");
            let (flusher, breaker) = (self.flusher.clone(), self.breaker.clone());
            match guard(&breaker, flusher.flush_all(&mut self.apply_con)).await {
                Ok(n) if n > 0 => {
                    tracing::info!(requests = n, "flushed snapshot requests left behind")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "flushing snapshot outboxes failed"),
            }
        }
        if now >= self.next_sample {
            let every = if self.apply_con.is_cluster() {
                SAMPLE_EVERY * 6
            } else {
                SAMPLE_EVERY
            };
            self.next_sample = now + every;
            watchdog::enter("sample");
            let breaker = self.breaker.clone();
            if let Err(e) = guard(&breaker, self.sample()).await {
                tracing::debug!(error = %e, "sampling failed");
            }
        }
        if now >= self.next_housekeeping {
            self.next_housekeeping = now + HOUSEKEEPING_EVERY;
            watchdog::enter("housekeeping");
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
            metrics::reclaimed(claimed.entries.len() as u64, claimed.deleted as u64);
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
        self.replay_leases(false).await
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

    /// Samples the gauges: lag and pending of every group (summed over the shards), stream
    /// lengths, and the totals of live sessions and present users.
    async fn sample(&mut self) -> Result<()> {
        // Lag is unknown (None) when any shard cannot tell it.
        let mut groups: std::collections::BTreeMap<String, (Option<u64>, u64, u64)> =
            Default::default();
        let mut len = 0;
        for stream in &self.streams {
            for g in retention::groups(&mut self.apply_con, stream).await? {
                let leases = crate::lease::count(&mut self.apply_con, stream, &g.name).await?;
                let sum = groups.entry(g.name).or_insert((Some(0), 0, 0));
                sum.0 = sum.0.zip(g.lag).map(|(a, b)| a + b);
                sum.1 += g.pending;
                sum.2 += leases;
            }
            len += redis::cmd("XLEN")
                .arg(stream)
                .query_async::<u64>(&mut self.apply_con)
                .await?;
        }
        for (name, (lag, pending, leases)) in &groups {
            metrics::group(name, *lag, *pending, *leases);
        }
        let c = &self.config;
        let dead_stream = &c.dead_letter_stream;
        let dead: u64 = redis::cmd("XLEN")
            .arg(dead_stream)
            .query_async(&mut self.apply_con)
            .await?;
        let keys = crate::keys::Keys::new(&c.prefix).with_cluster(self.apply_con.is_cluster());
        let (live, present) = crate::ops::totals(&mut self.apply_con, &keys).await?;
        metrics::sampled(len, dead, live, present);
        Ok(())
    }

    /// Counts the snapshot requests `emitted` (document, reason) and flushes their outboxes. A
    /// failure only delays them: the periodic flush takes any outbox left behind.
    pub(super) async fn flush_snapshots(&self, emitted: &[(String, String)]) {
        flush_snapshots(
            &self.flusher,
            &self.apply_con,
            &self.breaker,
            &self.stats,
            emitted,
        )
        .await;
    }
}

/// [`Worker::flush_snapshots`] on what it needs.
async fn flush_snapshots(
    flusher: &Flusher,
    con: &Conn,
    breaker: &Breaker,
    stats: &Stats,
    emitted: &[(String, String)],
) {
    if emitted.is_empty() {
        return;
    }
    for reason in ["threshold", "empty"] {
        let n = emitted.iter().filter(|(_, r)| r == reason).count() as u64;
        metrics::snapshots(reason, n);
        stats.snapshots.fetch_add(n, Ordering::Relaxed);
    }
    let docs: Vec<String> = emitted.iter().map(|(d, _)| d.clone()).collect();
    let mut con = con.clone();
    if let Err(e) = guard(breaker, flusher.flush(&mut con, &docs)).await {
        tracing::warn!(error = %e, "flushing snapshot requests failed; they stay queued");
    }
}

/// One expiry round: expires the silent sessions of documents that are due (sessions silent for
/// `ttl`) and prunes their old history; true when more may be due. Runs on clones of the loop's
/// parts, as a task of its own.
async fn expire(
    applier: Applier,
    mut con: Conn,
    flusher: Flusher,
    breaker: Breaker,
    stats: Arc<Stats>,
    ttl: Duration,
) -> Result<bool> {
    let lease = (ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
    let docs = applier
        .claim_due(&mut con, lease.as_millis() as u64, EXPIRE_DOCS_PER_ROUND)
        .await?;
    if docs.is_empty() {
        return Ok(false);
    }
    let (n, emitted) = applier.expire(&mut con, &docs).await?;
    flush_snapshots(&flusher, &con, &breaker, &stats, &emitted).await;
    stats.add_expired(n);
    if n > 0 {
        tracing::debug!(
            sessions = n,
            documents = docs.len(),
            "expired silent sessions"
        );
    }
    Ok(docs.len() == EXPIRE_DOCS_PER_ROUND)
}
