//! One batch: decode, coalesce, apply, acknowledge; and what each event's outcome was.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tracing::Instrument;

use super::Worker;
use crate::ack::DeadLetter;
use crate::apply::{Applied, Outcome};
use crate::breaker::guard;
use crate::coalesce::{coalesce, DocUpdate};
use crate::error::{Error, Result};
use crate::event::{decode_entry, Event, EventType};
use crate::limits::Limits;
use crate::read::{Entry, Fields};
use crate::stream_id::StreamId;
use crate::{metrics, reclaim, retry};

/// A batch decoded and coalesced, ready to apply.
pub(super) struct Prepared {
    /// Entries read.
    pub(super) size: usize,
    ids: Vec<StreamId>,
    events: Vec<(StreamId, Event)>,
    raw: Vec<Fields>,
    dead: Vec<DeadLetter>,
    docs: Vec<DocUpdate>,
    /// Pending entries whose payload had been trimmed away.
    trimmed: u64,
    /// The batch's lease, deleted when it is acknowledged (see [`crate::lease`]); its leased
    /// entries are not in `ids`.
    lease: Option<String>,
}

impl Prepared {
    /// Acknowledged by `XACK` of `ids` (the entries read through the pending-entries list) and
    /// by deleting `lease`, instead of `XACK` of every entry.
    pub(super) fn acked_by(mut self, ids: Vec<StreamId>, lease: Option<String>) -> Self {
        self.ids = ids;
        self.lease = lease;
        self
    }

    /// Whether acknowledging it takes entries out of the pending-entries list.
    pub(super) fn has_pending(&self) -> bool {
        !self.ids.is_empty()
    }
}

/// Decodes and coalesces `entries` (no Redis, so it can run while another batch is applied).
/// Entries delivered more than `max_deliveries` times (per `deliveries`) are dead-lettered.
pub(super) fn prepare(
    entries: Vec<Entry>,
    limits: &Limits,
    max_deliveries: u64,
    deliveries: &HashMap<StreamId, u64>,
) -> Prepared {
    let size = entries.len();
    let mut ids = Vec::with_capacity(size);
    let mut events: Vec<(StreamId, Event)> = Vec::with_capacity(size);
    let mut raw = Vec::with_capacity(size);
    let mut dead = Vec::new();
    let mut trimmed = 0;
    for entry in entries {
        ids.push(entry.id);
        let Some(fields) = entry.fields else {
            trimmed += 1;
            continue;
        };
        let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
        if delivered > max_deliveries {
            dead.push(DeadLetter {
                id: entry.id,
                fields,
                reason: format!("too many deliveries ({delivered})"),
                class: "too_many_deliveries",
            });
            continue;
        }
        match decode_entry(entry.id, &fields, limits) {
            Ok(ev) => {
                events.push((entry.id, ev));
                raw.push(fields);
            }
            Err(e) => dead.push(DeadLetter {
                id: entry.id,
                fields,
                reason: reason(&e),
                class: "invalid",
            }),
        }
    }
    let docs = coalesce(&events);
    Prepared {
        size,
        ids,
        events,
        raw,
        dead,
        docs,
        trimmed,
        lease: None,
    }
}

impl Worker {
    /// Decodes, applies and acknowledges one batch. Entries delivered before (replayed or
    /// reclaimed) are checked against `--max-deliveries` first.
    pub(super) async fn process(&mut self, entries: Vec<Entry>, redelivered: bool) -> Result<()> {
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
            HashMap::new()
        };
        let c = &self.config;
        let batch = prepare(entries, &c.limits, c.max_deliveries, &deliveries);
        self.commit(batch, redelivered).await
    }

    /// Applies and acknowledges a prepared batch.
    pub(super) async fn commit(&self, batch: Prepared, redelivered: bool) -> Result<()> {
        let span = tracing::info_span!("batch", size = batch.size, redelivered);
        self.commit_in_span(batch).instrument(span).await
    }

    async fn commit_in_span(&self, batch: Prepared) -> Result<()> {
        let Prepared {
            size,
            ids,
            events,
            mut raw,
            mut dead,
            docs,
            trimmed,
            lease,
        } = batch;
        self.stats.trimmed.fetch_add(trimmed, Ordering::Relaxed);
        let started = Instant::now();
        let outcomes = self.apply(&docs, &events, &mut raw, &mut dead).await?;
        let max = self.config.max_user_sessions;
        refused(&docs, &events, &outcomes, &mut raw, &mut dead, max);
        metrics::batch(size, started.elapsed());
        let now_ms = crate::ids::now_ms().max(0) as u64;
        metrics::end_to_end_delays(events.iter().map(|(sid, _)| sid.ms), now_ms);
        self.count(&docs, &events, &outcomes, &dead);
        let expired: u64 = outcomes.iter().map(|a| a.expired).sum();
        if expired > 0 {
            self.stats.add_expired(expired);
        }
        let emitted: Vec<(String, String)> = docs
            .iter()
            .zip(&outcomes)
            .filter(|(_, a)| !a.snapshot.is_empty())
            .map(|(d, a)| (d.doc.clone(), a.snapshot.clone()))
            .collect();
        self.flush_snapshots(&emitted).await;
        let (acker, con, breaker) = (&self.acker, &self.apply_con, &self.breaker);
        let shutdown = self.shutdown.clone();
        retry::until_done("acknowledge", &shutdown, self.config.drain_timeout, || {
            let mut con = con.clone();
            let (dead, ids, lease) = (&dead, &ids, lease.as_deref());
            async move { guard(breaker, acker.finish(&mut con, dead, ids, lease)).await }
        })
        .await?;
        Ok(())
    }

    /// Applies every document; a document Redis refuses for good is dead-lettered instead.
    async fn apply(
        &self,
        docs: &[DocUpdate],
        events: &[(StreamId, Event)],
        raw: &mut [Fields],
        dead: &mut Vec<DeadLetter>,
    ) -> Result<Vec<Applied>> {
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
                                class: "cannot_apply",
                            });
                        }
                    }
                    out.push(Applied::default());
                }
            }
        }
        Ok(out)
    }

    fn count(
        &self,
        docs: &[DocUpdate],
        events: &[(StreamId, Event)],
        outcomes: &[Applied],
        dead: &[DeadLetter],
    ) {
        let (mut applied, mut dup, mut stale) = (0, 0, 0);
        // Per event type (join, leave, heartbeat) and outcome (applied, duplicate, stale).
        let mut by_kind = [[0u64; 3]; 3];
        for (d, o) in docs.iter().zip(outcomes) {
            for (s, &winner) in d.sessions.iter().zip(&o.outcomes) {
                if winner == Outcome::Refused {
                    continue; // dead-lettered, counted below
                }
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
                    let o = match outcome {
                        Outcome::Applied => {
                            applied += 1;
                            0
                        }
                        Outcome::Duplicate => {
                            dup += 1;
                            1
                        }
                        Outcome::Stale | Outcome::Refused => {
                            stale += 1;
                            2
                        }
                    };
                    by_kind[ev.kind as usize][o] += 1;
                }
            }
        }
        let s = &self.stats;
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.applied.fetch_add(applied, Ordering::Relaxed);
        s.duplicate.fetch_add(dup, Ordering::Relaxed);
        s.stale.fetch_add(stale, Ordering::Relaxed);
        s.dead_lettered
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        for (k, kind) in EventType::ALL.iter().enumerate() {
            for (o, outcome) in ["applied", "duplicate", "stale"].into_iter().enumerate() {
                metrics::events(kind.as_str(), outcome, by_kind[k][o]);
            }
        }
        for class in [
            "invalid",
            "too_many_deliveries",
            "cannot_apply",
            "too_many_sessions",
        ] {
            let n = dead.iter().filter(|d| d.class == class).count() as u64;
            metrics::dead_letters(class, n);
            metrics::events("unknown", "dead_lettered", n);
        }
        tracing::debug!(
            applied,
            duplicate = dup,
            stale,
            dead_lettered = dead.len(),
            "batch done"
        );
    }
}

/// Dead-letters every event of the sessions the script refused (a new session of a user who
/// already has `max` live sessions in the document): nothing of them was applied.
fn refused(
    docs: &[DocUpdate],
    events: &[(StreamId, Event)],
    outcomes: &[Applied],
    raw: &mut [Fields],
    dead: &mut Vec<DeadLetter>,
    max: usize,
) {
    for (d, o) in docs.iter().zip(outcomes) {
        for (s, _) in d
            .sessions
            .iter()
            .zip(&o.outcomes)
            .filter(|(_, &w)| w == Outcome::Refused)
        {
            for &i in &s.events {
                dead.push(DeadLetter {
                    id: events[i].0,
                    fields: std::mem::take(&mut raw[i]),
                    reason: format!(
                        "user {:?} already has {max} live sessions in document {:?} \
                         (--max-user-sessions)",
                        s.user, d.doc
                    ),
                    class: "too_many_sessions",
                });
            }
        }
    }
}

/// The dead-letter reason for a decode error: its text without the "invalid event: " prefix.
fn reason(e: &Error) -> String {
    match e {
        Error::InvalidEvent(r) => r.clone(),
        other => other.to_string(),
    }
}
