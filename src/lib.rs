//! presence-worker: turns a Redis Stream of `join`/`leave`/`heartbeat` events into exact presence
//! state, consumed by scaled replicas through one consumer group.
//!
//! # Layout
//! The modules follow the data flow of a batch:
//! - [`read`]: the consumer group and `XREADGROUP` (blocking on a connection of its own), and
//!   [`lease`]: in a backlog, reads without the pending-entries list, each batch under a lease;
//! - [`event`]: wire format v1, decoding and validation ([`limits`] bounds the input);
//! - [`coalesce`]: the deciding events per session, grouped by document;
//! - [`apply`]: one atomic step per document: on the planned path the worker decides it (`plan`)
//!   and writes chunks of documents in `MULTI`/`EXEC` under `WATCH`; otherwise, and whenever that
//!   fails, the Lua script (`lua/apply.lua`), pipelined;
//! - [`snapshot`]: snapshot requests decided by the scripts, flushed from per-document outboxes;
//! - [`ack`]: dead letters and `XACK` in one atomic step;
//! - [`reclaim`]: entries other consumers left pending, and delivery counts;
//! - [`worker`]: the loop that ties them together, with [`retry`] and [`shutdown`], and between
//!   batches the expiry of silent sessions (in [`apply`]) and [`retention`] (trimming, consumers).
//!
//! Beside them: [`config`], [`error`], [`keys`] (every key name), [`metrics`] (every metric) and
//! [`http`] (health and metrics endpoints), [`connection`], [`produce`]
//! (the producer API), [`inspect`] (reading state back), [`dlq`] (dead letters), [`ops`]
//! (status, top, repair), [`follow`] (`snapshots`, `watch`), [`bench`], [`cli`] (flags) and [`commands`] and
//! [`demo`].
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod ack;
pub mod apply;
pub mod bench;
pub mod breaker;
pub mod cli;
pub mod coalesce;
pub mod commands;
pub mod config;
pub mod connection;
pub mod demo;
pub mod dlq;
pub mod error;
pub mod event;
pub mod follow;
pub mod http;
pub mod ids;
pub mod inspect;
pub mod keys;
pub mod lease;
pub mod limits;
pub mod metrics;
pub mod ops;
mod plan;
pub mod produce;
pub mod read;
pub mod reclaim;
pub mod redact;
pub mod resp;
pub mod retention;
pub mod retry;
pub mod shard;
pub mod shutdown;
pub mod snapshot;
pub mod stream_id;
#[cfg(test)]
mod test_rng;
pub mod worker;

pub use config::WorkerConfig;
pub use error::{Error, Result};
pub use event::{Event, EventType};
pub use produce::Producer;
pub use stream_id::StreamId;
