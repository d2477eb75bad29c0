//! Worker configuration: a typed struct with defaults, validated before the worker starts.

use std::time::Duration;

use crate::breaker::BreakerConfig;
use crate::connection::ConnectOptions;
use crate::error::Error;
use crate::limits::Limits;
use crate::snapshot::SnapshotConfig;

/// Longest `doc`, `user` or `session` the state can hold (`--max-id-bytes`): a session id is
/// stored with a u16 length.
pub const MAX_STORED_ID: usize = 65_535;
/// Largest `meta` the state can hold (`--max-meta-bytes`): a session record, at most 68 bytes
/// and its meta, is stored with a u16 length.
pub const MAX_STORED_META: usize = 65_535 - 68;
/// Highest `--max-user-sessions`: every event of a user walks and rewrites all of the user's
/// entries in the document, in Redis (about 0.3 µs each).
pub const MAX_USER_SESSIONS: usize = 4096;

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupStart {
    /// From the first entry of the stream (the default: nothing already appended is missed).
    Beginning,
    /// Only entries appended after the group is created.
    End,
}

/// Everything `presence-worker run` needs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Redis URL (`redis://host:port/db`, credentials allowed).
    pub redis_url: String,
    /// Events stream (with `stream_shards`, the base name of the shards).
    pub stream: String,
    /// 0: one events stream, `stream`; N: the N shards `<stream>:{0}` ... (see [`crate::shard`]).
    pub stream_shards: u32,
    /// Consumer group shared by the replicas.
    pub group: String,
    /// This replica's consumer name; stable across restarts so it replays its own pending entries.
    pub consumer: String,
    /// Prefix of every state key.
    pub prefix: String,
    /// Most entries read per batch.
    pub batch: usize,
    /// How long one `XREADGROUP` waits for new entries.
    pub block: Duration,
    /// Dead-letter stream.
    pub dead_letter_stream: String,
    /// How long the ordering history of an ended session is kept.
    pub history: Duration,
    /// Where a newly created group starts.
    pub group_start: GroupStart,
    /// Response timeout of the apply/ack connection (the read connection gets `block` plus this).
    pub response_timeout: Duration,
    /// Input limits.
    pub limits: Limits,
    /// Most sessions one user keeps in one document, live and ended within `history`: see
    /// [`crate::apply::Applier::with_max_user_sessions`].
    pub max_user_sessions: usize,
    /// Whether documents go through the planned path where it applies (see
    /// [`crate::apply::Applier::with_planned_path`]); off: every document through the script.
    pub planned: bool,
    /// Whether the hot path (backlog reads, the planned path) uses lean connections
    /// ([`crate::resp`]) where the client allows; off: redis-rs's connections everywhere.
    pub lean: bool,
    /// A session not refreshed within this time is expired as if it had left (zero: never).
    pub session_ttl: Duration,
    /// Entries pending on another consumer for longer than this are reclaimed (zero: never).
    pub claim_idle: Duration,
    /// An entry delivered more often than this is dead-lettered.
    pub max_deliveries: u64,
    /// Consumers idle longer than this with nothing pending are removed (zero: never).
    pub consumer_idle: Duration,
    /// Entries older than this are trimmed from the events stream, unless a group still needs
    /// them (zero: never trim).
    pub retain: Duration,
    /// How long the batch in hand may still take after shutdown was requested.
    pub drain_timeout: Duration,
    /// The circuit breaker guarding every Redis call.
    pub breaker: BreakerConfig,
    /// Snapshot requests and the change feed.
    pub snapshots: SnapshotConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (`None`: not served).
    pub http_addr: Option<std::net::SocketAddr>,
    /// ACL user, password file and TLS files used beside `redis_url` by every connection.
    pub connect: ConnectOptions,
}

impl WorkerConfig {
    /// The defaults, with `consumer` set to the given name.
    pub fn new(redis_url: impl Into<String>, consumer: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            stream: "sessions:events".into(),
            stream_shards: 0,
            group: "presence".into(),
            consumer: consumer.into(),
            prefix: "sessions".into(),
            batch: 2000,
            block: Duration::from_secs(2),
            dead_letter_stream: "sessions:events:dead".into(),
            history: Duration::from_secs(600),
            group_start: GroupStart::Beginning,
            response_timeout: Duration::from_secs(5),
            limits: Limits::default(),
            max_user_sessions: crate::apply::DEFAULT_USER_SESSIONS,
            planned: true,
            lean: true,
            session_ttl: Duration::from_secs(90),
            claim_idle: Duration::from_secs(60),
            max_deliveries: 5,
            consumer_idle: Duration::from_secs(3600),
            retain: Duration::from_secs(3600),
            drain_timeout: Duration::from_secs(10),
            breaker: BreakerConfig::default(),
            http_addr: None,
            snapshots: SnapshotConfig::default(),
            connect: ConnectOptions::default(),
        }
    }

    /// The events streams this worker consumes: `stream`, or its shards.
    pub fn streams(&self) -> Vec<String> {
        crate::shard::streams(&self.stream, self.stream_shards)
    }

    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("--stream", &self.stream),
            ("--group", &self.group),
            ("--consumer", &self.consumer),
            ("--prefix", &self.prefix),
            ("--dead-letter-stream", &self.dead_letter_stream),
        ] {
            if v.is_empty() || v.chars().any(|c| c.is_control() || c == ' ') {
                return bad(format!(
                    "{name} {v:?} must be non-empty, without spaces or control characters"
                ));
            }
        }
        if self.streams().contains(&self.dead_letter_stream) {
            return bad("--dead-letter-stream must differ from the events stream(s)".into());
        }
        if self.stream_shards > 1024 {
            return bad(format!(
                "--stream-shards {} must be between 0 (one stream) and 1024",
                self.stream_shards
            ));
        }
        if self.batch == 0 || self.batch > 100_000 {
            return bad(format!(
                "--batch {} must be between 1 and 100000",
                self.batch
            ));
        }
        if self.block < Duration::from_millis(1) {
            return bad("--block must be at least 1ms".into());
        }
        if self.max_deliveries == 0 {
            return bad("--max-deliveries must be at least 1".into());
        }
        if !self.claim_idle.is_zero() && self.claim_idle < Duration::from_millis(100) {
            return bad(format!(
                "--claim-idle {:?} must be 0 (off) or at least 100ms",
                self.claim_idle
            ));
        }
        if !self.session_ttl.is_zero() && self.session_ttl < Duration::from_secs(1) {
            return bad(format!(
                "--session-ttl {:?} must be 0 (off) or at least 1s",
                self.session_ttl
            ));
        }
        self.breaker.validate()?;
        let l = &self.limits;
        if l.max_entry_bytes < 64 || l.max_fields < 2 || l.max_id_len == 0 || l.max_meta_keys == 0 {
            return bad(format!(
                "limits too small to accept any event: --max-entry-bytes {} (>= 64), --max-fields {} (>= 2), \
                 --max-id-bytes {} (>= 1), --max-meta-keys {} (>= 1)",
                l.max_entry_bytes, l.max_fields, l.max_id_len, l.max_meta_keys
            ));
        }
        // A session id and its record are stored with u16 lengths (see `lua/common.lua`): a
        // record is at most 68 bytes and its meta.
        if l.max_id_len > MAX_STORED_ID || l.max_meta_bytes > MAX_STORED_META {
            return bad(format!(
                "limits too large to store: --max-id-bytes {} (<= {MAX_STORED_ID}), \
                 --max-meta-bytes {} (<= {MAX_STORED_META})",
                l.max_id_len, l.max_meta_bytes
            ));
        }
        if !(1..=MAX_USER_SESSIONS).contains(&self.max_user_sessions) {
            return bad(format!(
                "--max-user-sessions {} must be 1 to {MAX_USER_SESSIONS}",
                self.max_user_sessions
            ));
        }
        if self.history < Duration::from_secs(1) {
            return bad(format!("--history {:?} must be at least 1s", self.history));
        }
        Ok(())
    }
}
