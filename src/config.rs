//! Worker configuration: a typed struct with defaults, validated before the worker starts.

use std::time::Duration;

use crate::error::Error;
use crate::limits::Limits;

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
    /// Events stream.
    pub stream: String,
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
}

impl WorkerConfig {
    /// The defaults, with `consumer` set to the given name.
    pub fn new(redis_url: impl Into<String>, consumer: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            stream: "sessions:events".into(),
            group: "presence".into(),
            consumer: consumer.into(),
            prefix: "sessions".into(),
            batch: 500,
            block: Duration::from_secs(2),
            dead_letter_stream: "sessions:events:dead".into(),
            history: Duration::from_secs(600),
            group_start: GroupStart::Beginning,
            response_timeout: Duration::from_secs(5),
            limits: Limits::default(),
        }
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
        if self.stream == self.dead_letter_stream {
            return bad("--dead-letter-stream must differ from --stream".into());
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
        if self.history < Duration::from_secs(1) {
            return bad(format!("--history {:?} must be at least 1s", self.history));
        }
        Ok(())
    }
}
