//! Every metric the worker exports, in one place: names, units, labels, and the functions that
//! record them. Prefix `presence_`, base units in names, no unbounded label values (never a
//! document or user id). The README's catalog lists the same names; a test checks that the
//! dashboards and alert rules in `deploy/` only use these.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::breaker::BreakerState;
use crate::error::Error;

/// Events read, by `type` (`join`, `leave`, `heartbeat`, `unknown`) and `outcome` (`applied`,
/// `duplicate`, `stale`, `dead_lettered`).
pub const EVENTS: &str = "presence_events_total";
/// Batches processed.
pub const BATCHES: &str = "presence_batches_total";
/// Entries per batch.
pub const BATCH_SIZE: &str = "presence_batch_size";
/// Time to apply one batch (all its scripts), seconds.
pub const APPLY_DURATION: &str = "presence_apply_duration_seconds";
/// From an entry's id time (when Redis added it) to its application, seconds.
pub const END_TO_END_DELAY: &str = "presence_end_to_end_delay_seconds";
/// Entries not yet delivered to the group (`XINFO GROUPS` lag), by `group`.
pub const GROUP_LAG: &str = "presence_group_lag";
/// Entries delivered but not acknowledged, by `group`.
pub const GROUP_PENDING: &str = "presence_group_pending";
/// Leases of backlog batches read and not yet acknowledged (see [`crate::lease`]), by `group`:
/// the pending entries of leased reads. One that stays is a replica that died holding it.
pub const GROUP_LEASES: &str = "presence_group_leases";
/// Entries in the events stream.
pub const STREAM_LENGTH: &str = "presence_stream_length";
/// Entries in the dead-letter stream.
pub const DEAD_LETTER_STREAM_LENGTH: &str = "presence_dead_letter_stream_length";
/// Live sessions over all documents.
pub const LIVE_SESSIONS: &str = "presence_live_sessions";
/// Present users over all documents (a user in two documents counts twice).
pub const PRESENT_USERS: &str = "presence_present_users";
/// Sessions ended by expiry: by an expiry visit, or at once to make room for a new session of a
/// user at `--max-user-sessions`.
pub const SESSIONS_EXPIRED: &str = "presence_sessions_expired_total";
/// Entries taken over from other consumers.
pub const RECLAIMED: &str = "presence_reclaimed_entries_total";
/// Pending entries whose payload had been trimmed away.
pub const TRIMMED_PENDING: &str = "presence_trimmed_pending_entries_total";
/// Entries sent to the dead-letter stream, by `reason` (`invalid`, `too_many_deliveries`,
/// `cannot_apply`, `too_many_sessions`).
pub const DEAD_LETTERS: &str = "presence_dead_letters_total";
/// Snapshot requests emitted, by `reason` (`threshold`, `empty`).
pub const SNAPSHOTS: &str = "presence_snapshots_emitted_total";
/// Retries of Redis operations, by `operation`.
pub const RETRIES: &str = "presence_retries_total";
/// Redis errors, by `class` (see [`Error::class`]).
pub const REDIS_ERRORS: &str = "presence_redis_errors_total";
/// Circuit breaker state: 0 closed, 1 open, 2 half-open.
pub const BREAKER_STATE: &str = "presence_breaker_state";
/// Circuit breaker transitions, by the state entered (`to`).
pub const BREAKER_TRANSITIONS: &str = "presence_breaker_transitions_total";
/// Consumer loops restarted by the watchdog after a stall (no progress, no error, for the stall
/// limit). Should stay 0: anything else is a bug to report.
pub const LOOP_RESTARTS: &str = "presence_loop_restarts_total";
/// Documents applied on the planned path (decided by the worker, written in `MULTI`/`EXEC`;
/// see `apply::planned`).
pub const PLANNED_DOCUMENTS: &str = "presence_planned_documents_total";
/// Chunks of documents on the planned path whose `EXEC` found a watched key changed (another
/// replica, an expiry visit, `repair`): the script applied them instead.
pub const PLANNED_CONFLICTS: &str = "presence_planned_conflicts_total";
/// Always 1, with labels `version` and `git_sha`.
pub const BUILD_INFO: &str = "presence_build_info";

/// Every metric name, for the catalog test.
pub const ALL: &[&str] = &[
    EVENTS,
    BATCHES,
    BATCH_SIZE,
    APPLY_DURATION,
    END_TO_END_DELAY,
    GROUP_LAG,
    GROUP_PENDING,
    GROUP_LEASES,
    STREAM_LENGTH,
    DEAD_LETTER_STREAM_LENGTH,
    LIVE_SESSIONS,
    PRESENT_USERS,
    SESSIONS_EXPIRED,
    RECLAIMED,
    TRIMMED_PENDING,
    DEAD_LETTERS,
    SNAPSHOTS,
    RETRIES,
    REDIS_ERRORS,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    LOOP_RESTARTS,
    PLANNED_DOCUMENTS,
    PLANNED_CONFLICTS,
    BUILD_INFO,
];

/// The git commit the binary was built from (`unknown` outside a checkout).
pub const GIT_SHA: &str = env!("PRESENCE_GIT_SHA");

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (once per process) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let secs = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ];
            let sizes = [
                1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
            ];
            // SAFETY of expect: the bucket lists are constant and non-empty.
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(APPLY_DURATION.into()), &secs)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(END_TO_END_DELAY.into()), &secs)
                })
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .expect("constant buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application's): then
            // ours only renders what it records itself.
            let _ = metrics::set_global_recorder(recorder);
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "git_sha" => GIT_SHA)
                .set(1.0);
            // Exported from the start at 0, so that the alert's increase() sees the first one.
            counter!(LOOP_RESTARTS).increment(0);
            handle
        })
        .clone()
}

/// Folds the histograms' recorded samples into their buckets every second until `shutdown`.
/// The recorder keeps every sample until then: without this, a worker nobody scrapes (no
/// Prometheus yet, `--http-addr off`) would grow by 8 bytes per event.
pub async fn upkeep(handle: PrometheusHandle, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Counts events of one `type` with one `outcome`.
pub fn events(kind: &'static str, outcome: &'static str, n: u64) {
    if n > 0 {
        counter!(EVENTS, "type" => kind, "outcome" => outcome).increment(n);
    }
}

/// Records one processed batch.
pub fn batch(size: usize, apply: Duration) {
    counter!(BATCHES).increment(1);
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(APPLY_DURATION).record(apply.as_secs_f64());
}

/// Records the delay of every entry of a batch (their ids' ms) to now: the histogram is looked up
/// once, not once per entry (the lookup hashes the name and took most of the per-entry cost).
pub fn end_to_end_delays(entries_ms: impl Iterator<Item = u64>, now_ms: u64) {
    let h = histogram!(END_TO_END_DELAY);
    for ms in entries_ms {
        h.record(now_ms.saturating_sub(ms) as f64 / 1000.0);
    }
}

/// Counts dead letters by reason class.
pub fn dead_letters(reason: &'static str, n: u64) {
    if n > 0 {
        counter!(DEAD_LETTERS, "reason" => reason).increment(n);
    }
}

/// Counts expired sessions.
pub fn sessions_expired(n: u64) {
    counter!(SESSIONS_EXPIRED).increment(n);
}

/// Counts reclaimed entries and pending entries found trimmed.
pub fn reclaimed(entries: u64, trimmed: u64) {
    counter!(RECLAIMED).increment(entries);
    counter!(TRIMMED_PENDING).increment(trimmed);
}

/// Counts snapshot requests by reason.
pub fn snapshots(reason: &'static str, n: u64) {
    if n > 0 {
        counter!(SNAPSHOTS, "reason" => reason).increment(n);
    }
}

/// Counts a retry of `operation`.
pub fn retry(operation: &'static str) {
    counter!(RETRIES, "operation" => operation).increment(1);
}

/// Counts a Redis error by class.
pub fn redis_error(e: &Error) {
    counter!(REDIS_ERRORS, "class" => e.class()).increment(1);
}

/// Records a breaker transition.
pub fn breaker(to: BreakerState) {
    gauge!(BREAKER_STATE).set(to.as_gauge());
    counter!(BREAKER_TRANSITIONS, "to" => to.as_str()).increment(1);
}

/// Counts documents applied on the planned path and chunks it left to the script after a conflict.
pub fn planned(documents: u64, conflicts: u64) {
    counter!(PLANNED_DOCUMENTS).increment(documents);
    counter!(PLANNED_CONFLICTS).increment(conflicts);
}

/// Counts a consumer loop restarted by the watchdog.
pub fn loop_restarted() {
    counter!(LOOP_RESTARTS).increment(1);
}

/// Sets the breaker gauge at start-up (before any transition).
pub fn breaker_initial(state: BreakerState) {
    gauge!(BREAKER_STATE).set(state.as_gauge());
}

/// Sets the sampled gauges of one group.
pub fn group(group: &str, lag: Option<u64>, pending: u64, leases: u64) {
    gauge!(GROUP_LEASES, "group" => group.to_owned()).set(leases as f64);
    if let Some(lag) = lag {
        gauge!(GROUP_LAG, "group" => group.to_owned()).set(lag as f64);
    }
    gauge!(GROUP_PENDING, "group" => group.to_owned()).set(pending as f64);
}

/// Sets the sampled stream and state gauges.
pub fn sampled(stream_len: u64, dead_len: u64, live_sessions: i64, present_users: i64) {
    gauge!(STREAM_LENGTH).set(stream_len as f64);
    gauge!(DEAD_LETTER_STREAM_LENGTH).set(dead_len as f64);
    gauge!(LIVE_SESSIONS).set(live_sessions as f64);
    gauge!(PRESENT_USERS).set(present_users as f64);
}
