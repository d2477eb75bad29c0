//! The producer API: append events in wire format v1 (what `presence-worker publish` uses).
//!
//! Transient failures are retried with backoff, bounded in attempts and total time; while the
//! circuit breaker is open, `publish` fails at once with [`Error::BreakerOpen`]. Retrying the
//! same [`Event`] (same `id`, same `seq`) after an error is always safe: a copy that did reach
//! the stream is recognised by the worker.

use std::time::Duration;

use crate::connection::Conn;
use tokio::time::Instant;

use crate::breaker::{guard, Breaker, BreakerConfig};
use crate::connection::{self, ConnectOptions};
use crate::error::{Error, Result};
use crate::event::Event;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// How hard `publish` tries before giving up.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts per call (1: no retry).
    pub max_attempts: u32,
    /// Most time per call, retries included.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(10),
        }
    }
}

/// Appends events to the events stream.
#[derive(Clone)]
pub struct Producer {
    con: Conn,
    stream: String,
    shards: u32,
    limits: Limits,
    breaker: Breaker,
    policy: RetryPolicy,
}

impl Producer {
    /// Connects to `redis_url`, appending to `stream`, with the default retry policy and breaker.
    pub async fn connect(redis_url: &str, stream: impl Into<String>) -> Result<Self> {
        Self::connect_with(redis_url, &ConnectOptions::default(), stream).await
    }

    /// [`Producer::connect`] with an ACL user, a password file or TLS files beside the URL.
    pub async fn connect_with(
        redis_url: &str,
        options: &ConnectOptions,
        stream: impl Into<String>,
    ) -> Result<Self> {
        let client = connection::open(redis_url, options)?;
        let con = connection::connect(&client, Duration::from_secs(5)).await?;
        Ok(Self {
            con,
            stream: stream.into(),
            shards: 0,
            limits: Limits::default(),
            breaker: Breaker::new("producer", BreakerConfig::default()),
            policy: RetryPolicy::default(),
        })
    }

    /// Appends to the `shards` shards of the stream (`<stream>:{k}`, k from the document id; see
    /// [`crate::shard`]) instead of the stream itself (0).
    #[must_use]
    pub fn with_shards(mut self, shards: u32) -> Self {
        self.shards = shards;
        self
    }

    /// The stream an event of `doc` goes to.
    pub fn stream_for(&self, doc: &str) -> String {
        crate::shard::stream_for(&self.stream, self.shards, doc)
    }

    /// Replaces the retry policy.
    #[must_use]
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Replaces the circuit breaker configuration.
    #[must_use]
    pub fn with_breaker(mut self, config: BreakerConfig) -> Self {
        self.breaker = Breaker::new("producer", config);
        self
    }

    /// The producer's circuit breaker (for its state).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Checks and appends one event (`XADD <stream> * e <payload>`); returns its entry id.
    ///
    /// An event the worker would dead-letter is refused here with [`Error::InvalidEvent`].
    pub async fn publish(&mut self, event: &Event) -> Result<StreamId> {
        event.validate(&self.limits)?;
        let payload = event.encode()?;
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.stream_for(&event.doc))
            .arg("*")
            .arg("e")
            .arg(payload);
        let cmd = &cmd;
        let id: String = self
            .with_retries(|mut con| async move { cmd.query_async(&mut con).await })
            .await?;
        parse_id(&id)
    }

    /// Appends many events in one round trip per stream (one in all unless sharded); returns
    /// their entry ids in order.
    pub async fn publish_many(&mut self, events: &[Event]) -> Result<Vec<StreamId>> {
        for ev in events {
            ev.validate(&self.limits)?;
        }
        let by_stream = crate::shard::xadd_by_stream(&self.stream, self.shards, events)?;
        let mut ids = vec![StreamId::default(); events.len()];
        for (_, places, pipe) in &by_stream {
            let got: Vec<String> = self
                .with_retries(|mut con| async move { pipe.query_async(&mut con).await })
                .await?;
            for (&i, id) in places.iter().zip(&got) {
                ids[i] = parse_id(id)?;
            }
        }
        Ok(ids)
    }

    async fn with_retries<T, F, Fut>(&mut self, mut op: F) -> Result<T>
    where
        F: FnMut(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let start = Instant::now();
        let mut delays = crate::retry::backoff();
        let mut attempt = 1;
        loop {
            let fut = op(self.con.clone());
            match guard(&self.breaker, async { Ok(fut.await?) }).await {
                Ok(v) => return Ok(v),
                Err(e @ Error::BreakerOpen(_)) => return Err(e),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(1));
                    let out_of_time = start.elapsed() + delay > self.policy.max_elapsed;
                    if attempt >= self.policy.max_attempts || out_of_time {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, attempt, "publish failed, retrying");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

fn parse_id(id: &str) -> Result<StreamId> {
    id.parse()
        .map_err(|_| Error::Protocol(format!("XADD returned {id:?}")))
}
