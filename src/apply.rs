//! Apply stage: one atomic script call per document, pipelined; and the expiry of silent
//! sessions, which changes documents the same way.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::coalesce::{DocUpdate, Version};
use crate::error::{Error, Result};
use crate::keys::{GlobalKeys, Keys};

/// The script that applies one document's updates (see the headers of the two files).
const APPLY_LUA: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/apply.lua")
);

/// The script that expires one document's silent sessions.
const EXPIRE_LUA: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/expire.lua")
);

/// The script that leases due documents to one replica.
const CLAIM_DUE_LUA: &str = include_str!("lua/claim_due.lua");

/// Most sessions one expiry call ends (the rest are due again at once).
const EXPIRE_PER_CALL: usize = 500;

/// How many documents go in one pipeline round trip.
const PIPELINE_DOCS: usize = 256;

/// What the script decided for one session's deciding event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the session's state.
    Applied,
    /// A newer event of the session was already applied.
    Stale,
    /// The same event (same id) was already the session's deciding event.
    Duplicate,
}

/// What applying one document did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// One outcome per session, in the order of the update's sessions.
    pub outcomes: Vec<Outcome>,
    /// The reason of the snapshot request queued (`threshold`, `empty`), or empty.
    pub snapshot: String,
}

/// Applies coalesced updates to Redis.
#[derive(Debug, Clone)]
pub struct Applier {
    snapshots: crate::snapshot::SnapshotConfig,
    script: Script,
    expire: Script,
    claim_due: Script,
    keys: Keys,
    globals: GlobalKeys,
    history_ms: u64,
    ttl_ms: u64,
}

impl Applier {
    /// An applier writing under `keys`, keeping ended sessions' history for `history_ms` and
    /// expiring sessions silent for `ttl_ms` (0: never).
    pub fn new(keys: Keys, history_ms: u64, ttl_ms: u64) -> Self {
        Self::with_snapshots(keys, history_ms, ttl_ms, Default::default())
    }

    /// [`Applier::new`] with snapshot requests and the change feed configured.
    pub fn with_snapshots(
        keys: Keys,
        history_ms: u64,
        ttl_ms: u64,
        snapshots: crate::snapshot::SnapshotConfig,
    ) -> Self {
        Self {
            snapshots,
            script: Script::new(APPLY_LUA),
            expire: Script::new(EXPIRE_LUA),
            claim_due: Script::new(CLAIM_DUE_LUA),
            globals: keys.globals(),
            keys,
            history_ms,
            ttl_ms,
        }
    }

    /// Leases up to `max` documents with sessions due to expire to the caller for `lease_ms`.
    pub async fn claim_due(
        &self,
        con: &mut ConnectionManager,
        lease_ms: u64,
        max: usize,
    ) -> Result<Vec<String>> {
        let mut inv = self.claim_due.key(&self.globals.expiry);
        inv.arg(lease_ms).arg(max);
        Ok(inv.invoke_async(con).await?)
    }

    /// Expires the silent sessions of `docs`; returns how many sessions ended, and the documents
    /// that queued a snapshot request with its reason.
    pub async fn expire(
        &self,
        con: &mut ConnectionManager,
        docs: &[String],
    ) -> Result<(u64, Vec<(String, String)>)> {
        let mut total = 0;
        let mut emitted = Vec::new();
        for chunk in docs.chunks(PIPELINE_DOCS) {
            let mut pipe = redis::pipe();
            for doc in chunk {
                let mut inv = self.doc_invocation(&self.expire, doc);
                inv.arg(EXPIRE_PER_CALL);
                pipe.invoke_script(&inv);
            }
            let replies: Vec<(u64, String)> = match pipe.query_async(con).await {
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    self.expire.load_async(con).await?;
                    pipe.query_async(con).await?
                }
                r => r?,
            };
            for (doc, (n, reason)) in chunk.iter().zip(replies) {
                total += n;
                if !reason.is_empty() {
                    emitted.push((doc.clone(), reason));
                }
            }
        }
        Ok((total, emitted))
    }

    /// An invocation of a document script with its KEYS and ARGV[1..3] (see `lua/common.lua`).
    fn doc_invocation<'s>(&self, script: &'s Script, doc: &str) -> redis::ScriptInvocation<'s> {
        let k = self.keys.doc(doc);
        let mut inv = script.prepare_invoke();
        for key in k.script_keys(&self.globals) {
            inv.key(key);
        }
        inv.arg(self.history_ms).arg(self.ttl_ms).arg(doc);
        inv.arg(self.snapshots.script_options(&k.presence_channel));
        inv
    }

    /// Applies every document's updates; returns, per document, one outcome per session and the
    /// reason of the snapshot request it queued (empty for none).
    ///
    /// Safe to call again with the same updates after any failure: the script is idempotent.
    pub async fn apply(
        &self,
        con: &mut ConnectionManager,
        docs: &[DocUpdate],
    ) -> Result<Vec<Applied>> {
        let mut out = Vec::with_capacity(docs.len());
        for chunk in docs.chunks(PIPELINE_DOCS) {
            let replies = match self.apply_chunk(con, chunk).await {
                // After a restart or failover the script cache is empty: load it and go again.
                Err(Error::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                    self.script.load_async(con).await?;
                    self.apply_chunk(con, chunk).await?
                }
                r => r?,
            };
            out.extend(replies);
        }
        Ok(out)
    }

    async fn apply_chunk(
        &self,
        con: &mut ConnectionManager,
        chunk: &[DocUpdate],
    ) -> Result<Vec<Applied>> {
        let mut pipe = redis::pipe();
        for d in chunk {
            let mut inv = self.doc_invocation(&self.script, &d.doc);
            inv.arg(d.sessions.len());
            for s in &d.sessions {
                inv.arg(&s.field).arg(&s.user);
                inv.arg(if s.live { "1" } else { "0" });
                push_version(&mut inv, &s.version);
                inv.arg(&s.event_id);
                match &s.meta {
                    None => {
                        inv.arg("").arg("").arg("").arg("").arg("");
                    }
                    Some((v, m)) => {
                        inv.arg(if m.is_some() { "1" } else { "0" });
                        push_version(&mut inv, v);
                        inv.arg(m.as_deref().unwrap_or_default());
                    }
                }
            }
            pipe.invoke_script(&inv);
        }
        let replies: Vec<(Vec<i64>, String)> = pipe.query_async(con).await?;
        if replies.len() != chunk.len() {
            return Err(Error::Protocol(format!(
                "{} replies for {} documents",
                replies.len(),
                chunk.len()
            )));
        }
        Ok(replies
            .into_iter()
            .map(|(codes, snapshot)| Applied {
                outcomes: codes
                    .into_iter()
                    .map(|c| match c {
                        0 => Outcome::Applied,
                        2 => Outcome::Duplicate,
                        _ => Outcome::Stale,
                    })
                    .collect(),
                snapshot,
            })
            .collect())
    }
}

fn push_version(inv: &mut redis::ScriptInvocation<'_>, v: &Version) {
    match v.seq {
        Some(q) => inv.arg(q.to_string()),
        None => inv.arg(""),
    };
    inv.arg(v.sid.ms).arg(v.sid.seq);
}
