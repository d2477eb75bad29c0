//! Apply stage: one atomic script call per document, pipelined.

use redis::aio::ConnectionManager;
use redis::Script;

use crate::coalesce::{DocUpdate, Version};
use crate::error::{Error, Result};
use crate::keys::Keys;

/// The script that applies one document's updates (see the header of `lua/apply.lua`).
const APPLY_LUA: &str = include_str!("lua/apply.lua");

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

/// Applies coalesced updates to Redis.
#[derive(Debug, Clone)]
pub struct Applier {
    script: Script,
    keys: Keys,
    history_ms: u64,
}

impl Applier {
    /// An applier writing under `keys`, keeping ended sessions' history for `history_ms`.
    pub fn new(keys: Keys, history_ms: u64) -> Self {
        Self {
            script: Script::new(APPLY_LUA),
            keys,
            history_ms,
        }
    }

    /// Applies every document's updates; returns, per document, one outcome per session.
    ///
    /// Safe to call again with the same updates after any failure: the script is idempotent.
    pub async fn apply(
        &self,
        con: &mut ConnectionManager,
        docs: &[DocUpdate],
    ) -> Result<Vec<Vec<Outcome>>> {
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
    ) -> Result<Vec<Vec<Outcome>>> {
        let mut pipe = redis::pipe();
        for d in chunk {
            let k = self.keys.doc(&d.doc);
            let mut inv = self.script.prepare_invoke();
            inv.key(k.users)
                .key(k.count)
                .key(k.sessions)
                .key(k.live)
                .key(k.ended);
            inv.arg(self.history_ms).arg(d.sessions.len());
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
        let replies: Vec<Vec<i64>> = pipe.query_async(con).await?;
        if replies.len() != chunk.len() {
            return Err(Error::Protocol(format!(
                "{} replies for {} documents",
                replies.len(),
                chunk.len()
            )));
        }
        Ok(replies
            .into_iter()
            .map(|codes| {
                codes
                    .into_iter()
                    .map(|c| match c {
                        0 => Outcome::Applied,
                        2 => Outcome::Duplicate,
                        _ => Outcome::Stale,
                    })
                    .collect()
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
