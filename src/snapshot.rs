//! Snapshot requests and the presence change feed: their configuration, and the flush of each
//! document's outbox to the snapshot stream.
//!
//! The decision is taken in the same atomic script that changes the count (`lua/common.lua`),
//! which queues the request in the document's outbox (under its hash tag). The worker flushes
//! the outboxes of the documents it changed before acknowledging the batch, and every replica
//! flushes any outbox left behind (by a replica that died in between) at start and every second.

use std::time::Duration;

use crate::connection::Conn;
use redis::Script;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::keys::Keys;

/// Moves one document's outbox to the snapshot stream.
const FLUSH_LUA: &str = include_str!("lua/flush.lua");

/// Appends requests to the snapshot stream once each, by id (cluster flush, step 1).
const PUBLISH_ONCE_LUA: &str = include_str!("lua/publish_once.lua");

/// Removes appended requests from an outbox (cluster flush, step 2).
const OUTBOX_DONE_LUA: &str = include_str!("lua/outbox_done.lua");

/// When snapshot requests are emitted and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotConfig {
    /// Counts that trigger a request when reached from below (empty: none).
    pub thresholds: Vec<u64>,
    /// A threshold re-arms only when the count falls below `threshold - hysteresis`.
    pub hysteresis: u64,
    /// Least time between two threshold requests of one document (zero: none).
    pub cooldown: Duration,
    /// A request when a document's last user leaves (or expires).
    pub on_empty: bool,
    /// The snapshot stream.
    pub stream: String,
    /// Most users listed in a request.
    pub users_cap: usize,
    /// Publish membership changes on `sessions:doc:{<doc>}:presence` (SPUBLISH).
    pub publish_changes: bool,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            thresholds: Vec::new(),
            hysteresis: 0,
            cooldown: Duration::ZERO,
            on_empty: false,
            stream: "sessions:snapshots".into(),
            users_cap: 100,
            publish_changes: false,
        }
    }
}

impl SnapshotConfig {
    /// Whether any request can be emitted at all.
    pub fn enabled(&self) -> bool {
        !self.thresholds.is_empty() || self.on_empty
    }

    /// The options map the document scripts read from ARGV[3]; `channel_prefix` is
    /// [`crate::keys::Keys::channel_prefix`], `max_user_sessions` the cap of
    /// [`crate::apply::Applier::with_max_user_sessions`].
    pub fn script_options(&self, channel_prefix: &str, max_user_sessions: usize) -> Vec<u8> {
        let mut thresholds = self.thresholds.clone();
        thresholds.sort_unstable();
        thresholds.dedup();
        let opts = ScriptOptions {
            t: thresholds,
            h: self.hysteresis,
            c: self.cooldown.as_millis() as u64,
            e: u8::from(self.on_empty),
            u: self.users_cap as u64,
            p: u8::from(self.publish_changes),
            cp: channel_prefix,
            s: max_user_sessions as u64,
        };
        // SAFETY of expect: a struct of numbers and strings always encodes.
        rmp_serde::to_vec_named(&opts).expect("options encode")
    }
}

#[derive(Serialize)]
struct ScriptOptions<'a> {
    t: Vec<u64>,
    h: u64,
    c: u64,
    e: u8,
    u: u64,
    p: u8,
    cp: &'a str,
    s: u64,
}

/// Parses `--snapshot-thresholds 10,50,100`.
pub fn parse_thresholds(s: &str) -> std::result::Result<Vec<u64>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|t| match t.trim().parse::<u64>() {
            Ok(0) => Err("a threshold must be at least 1".to_owned()),
            Ok(n) => Ok(n),
            Err(_) => Err(format!("{t:?} is not a whole number")),
        })
        .collect()
}

/// A snapshot request as it appears in the snapshot stream (field `e`, MessagePack map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Schema version, 1.
    pub v: u64,
    /// Stable for one crossing: the same on every re-delivery of the request.
    pub snapshot_id: String,
    /// Document id.
    pub doc: String,
    /// `threshold` or `empty`.
    pub reason: String,
    /// The threshold crossed (0 for `empty`).
    pub threshold: u64,
    /// The count after the step that crossed.
    pub count: u64,
    /// Users present (at most the configured cap), sorted.
    pub users: Vec<String>,
    /// What crossed.
    pub cause: Cause,
    /// Redis server time of the decision, ms.
    pub at: u64,
}

/// The event behind a snapshot request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// Event id (`expiry` when sessions expired).
    pub event_id: String,
    /// Stream entry id (empty for expiry).
    pub entry_id: String,
}

/// A membership change as published on the change feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceChange {
    /// Schema version, 1.
    pub v: u64,
    /// Document id.
    pub doc: String,
    /// User id.
    pub user: String,
    /// `joined` or `left`.
    pub change: String,
    /// The document's count right after this change.
    pub count: u64,
    /// For `left`: `leave` or `expired`.
    #[serde(default)]
    pub reason: Option<String>,
    /// Redis server time, ms.
    pub at: u64,
}

/// Decodes a request from the stream field `e`.
pub fn decode_request(bytes: &[u8]) -> Result<SnapshotRequest> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Protocol(format!("snapshot request: {e}")))
}

/// Flushes document outboxes to the snapshot stream.
#[derive(Debug, Clone)]
pub struct Flusher {
    script: Script,
    publish_once: Script,
    outbox_done: Script,
    keys: Keys,
    stream: String,
}

/// How long the cluster flush remembers the ids of requests it appended (see
/// `lua/publish_once.lua`): far longer than any flush can be interrupted.
const SEEN_FOR_MS: u64 = 24 * 3600 * 1000;

impl Flusher {
    /// A flusher for documents under `keys`, writing to `stream`.
    pub fn new(keys: Keys, stream: impl Into<String>) -> Self {
        Self {
            script: Script::new(FLUSH_LUA),
            publish_once: Script::new(PUBLISH_ONCE_LUA),
            outbox_done: Script::new(OUTBOX_DONE_LUA),
            keys,
            stream: stream.into(),
        }
    }

    /// Flushes the outboxes of `docs`, in pipelined round trips; returns the requests moved.
    pub async fn flush(&self, con: &mut Conn, docs: &[String]) -> Result<u64> {
        if self.keys.is_cluster() {
            let mut moved = 0;
            for doc in docs {
                moved += self.flush_across_slots(con, doc).await?;
            }
            return Ok(moved);
        }
        let outboxes = self.keys.globals().outboxes;
        let cmds: Vec<_> = docs
            .iter()
            .map(|doc| {
                let mut cmd = crate::apply::evalsha(&self.script, 3);
                cmd.arg(self.keys.doc(doc).outbox)
                    .arg(&outboxes)
                    .arg(&self.stream)
                    .arg(doc);
                cmd
            })
            .collect();
        let flushed: Vec<u64> = crate::apply::invoke_pipelined(
            con,
            &self.script,
            cmds,
            crate::apply::CALLS_PER_PIPELINE,
        )
        .await?;
        Ok(flushed.iter().sum())
    }

    /// The seen-ids key of the snapshot stream: in the stream's hash slot.
    fn seen_key(&self) -> Result<String> {
        let stream = &self.stream;
        let slot = crate::keys::key_slot(stream.as_bytes());
        [format!("{stream}:seen"), format!("{{{stream}}}:seen")]
            .into_iter()
            .find(|k| crate::keys::key_slot(k.as_bytes()) == slot)
            .ok_or_else(|| {
                Error::Config(format!(
                    "--snapshot-stream {stream:?}: no key in its hash slot for the ids of \
                     appended requests; use a name without braces or with one hash tag"
                ))
            })
    }

    /// On a cluster the outbox and the snapshot stream are in different hash slots: the requests
    /// are appended once each by id (`lua/publish_once.lua`), then removed from the outbox
    /// (`lua/outbox_done.lua`). A crash in between leaves them queued; the next flush skips
    /// the ids already appended and empties the outbox, so each request still appears once.
    async fn flush_across_slots(&self, con: &mut Conn, doc: &str) -> Result<u64> {
        let outbox = self.keys.doc(doc).outbox;
        let requests: Vec<Vec<u8>> = redis::cmd("LRANGE")
            .arg(&outbox)
            .arg(0)
            .arg(99)
            .query_async(con)
            .await?;
        if !requests.is_empty() {
            let mut publish = self.publish_once.key(&self.stream);
            publish.key(self.seen_key()?).arg(SEEN_FOR_MS);
            for r in &requests {
                // Undecodable bytes (a hand-edited outbox) are their own id.
                match decode_request(r) {
                    Ok(req) => publish.arg(req.snapshot_id),
                    Err(_) => publish.arg(r),
                };
                publish.arg(r);
            }
            publish.invoke_async::<u64>(con).await?;
        }
        let mut done = self.outbox_done.key(&outbox);
        done.key(self.keys.globals_of(doc).outboxes).arg(doc);
        for r in &requests {
            done.arg(r);
        }
        Ok(done.invoke_async(con).await?)
    }

    /// Flushes every outbox left non-empty (by a replica that stopped before flushing).
    pub async fn flush_all(&self, con: &mut Conn) -> Result<u64> {
        let cmds: Vec<(u16, redis::Cmd)> = self
            .keys
            .all_globals()
            .into_iter()
            .map(|(slot, g)| {
                (
                    slot,
                    redis::cmd("SRANDMEMBER")
                        .arg(g.outboxes)
                        .arg(500)
                        .to_owned(),
                )
            })
            .collect();
        let mut docs: Vec<String> = con
            .query_all::<Vec<String>>(&cmds)
            .await?
            .into_iter()
            .flatten()
            .collect();
        docs.truncate(500);
        self.flush(con, &docs).await
    }
}
