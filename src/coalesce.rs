//! Coalescing: reduce a batch to the deciding events per session, grouped by document.
//!
//! Per session, the state is two last-writer-wins registers: liveness (written by every event) and
//! meta (written by events that carry `meta`, and cleared by `leave`). Keeping only the winner of
//! each register per session is therefore exactly equivalent to applying the whole batch in order,
//! and the script compares the winners with what Redis holds using the same [`Version`] order.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use crate::event::{encode_meta, Event};
use crate::keys::session_field;
use crate::stream_id::StreamId;

/// A map with a fast seeded hasher, for the per-batch indexes.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The order in which events of one session supersede each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Producer sequence number, if the event carries one.
    pub seq: Option<u64>,
    /// Stream entry id.
    pub sid: StreamId,
}

impl Version {
    /// Whether `self` supersedes `other`: with a `seq` on both, the higher `seq` wins and, for
    /// equal `seq`, the earlier entry (so a later copy is stale); otherwise the later entry wins.
    /// `apply.lua` implements the same rule.
    pub fn newer_than(&self, other: &Version) -> bool {
        match (self.seq, other.seq) {
            (Some(a), Some(b)) if a != b => a > b,
            (Some(_), Some(_)) => self.sid < other.sid,
            _ => self.sid > other.sid,
        }
    }
}

/// What the batch says about one session.
#[derive(Debug, Clone)]
pub struct SessionUpdate {
    /// `<user>\x1f<session>`, the field in the sessions hash.
    pub field: String,
    /// User id.
    pub user: String,
    /// Version of the deciding event for liveness.
    pub version: Version,
    /// Whether that event leaves the session live.
    pub live: bool,
    /// Event id of the deciding event.
    pub event_id: String,
    /// The winning meta write, if any event wrote meta: its version and the new meta (encoded),
    /// `None` for a clear (by `leave`).
    pub meta: Option<(Version, Option<Vec<u8>>)>,
    /// Indices (into the batch) of every event of this session.
    pub events: Vec<usize>,
}

/// All session updates of one document.
#[derive(Debug, Clone)]
pub struct DocUpdate {
    /// Document id.
    pub doc: String,
    /// Updates, one per session, in first-seen order.
    pub sessions: Vec<SessionUpdate>,
}

/// Groups `events` (with their stream ids, in any order) by document and session, keeping only
/// the deciding events.
pub fn coalesce(events: &[(StreamId, Event)]) -> Vec<DocUpdate> {
    let mut docs: Vec<DocUpdate> = Vec::new();
    // Keyed by the events' own strings (no copy per lookup), hashed with foldhash: a batch is at
    // most a few thousand entries, so SipHash's flooding resistance buys little here, and its
    // cost showed in profiles (foldhash is still seeded per process).
    let mut doc_index: FastMap<&str, usize> = FastMap::default();
    let mut session_index: FastMap<(usize, &str, &str), usize> = FastMap::default();
    for (i, (sid, ev)) in events.iter().enumerate() {
        let d = *doc_index.entry(ev.doc.as_str()).or_insert_with(|| {
            docs.push(DocUpdate {
                doc: ev.doc.clone(),
                sessions: Vec::new(),
            });
            docs.len() - 1
        });
        let version = Version {
            seq: ev.seq,
            sid: *sid,
        };
        let meta_write = match (&ev.meta, ev.kind.is_live()) {
            (Some(m), true) => Some((version, Some(encode_meta(m)))),
            (_, false) => Some((version, None)),
            (None, true) => None,
        };
        // (user, session) names the same session as its field `<user>\x1f<session>`: valid ids
        // hold no control character.
        let sessions = &mut docs[d].sessions;
        match session_index.entry((d, ev.user.as_str(), ev.session_id())) {
            Entry::Vacant(slot) => {
                slot.insert(sessions.len());
                sessions.push(SessionUpdate {
                    field: session_field(&ev.user, ev.session_id()),
                    user: ev.user.clone(),
                    version,
                    live: ev.kind.is_live(),
                    event_id: ev.id.clone(),
                    meta: meta_write,
                    events: vec![i],
                });
            }
            Entry::Occupied(slot) => {
                let u = &mut sessions[*slot.get()];
                u.events.push(i);
                if version.newer_than(&u.version) {
                    u.version = version;
                    u.live = ev.kind.is_live();
                    u.event_id.clone_from(&ev.id);
                }
                if let Some((mv, m)) = meta_write {
                    if u.meta.as_ref().is_none_or(|(old, _)| mv.newer_than(old)) {
                        u.meta = Some((mv, m));
                    }
                }
            }
        }
    }
    docs
}

#[cfg(test)]
mod tests;
