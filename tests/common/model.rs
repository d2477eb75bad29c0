//! A sequential model of the stream, written from the spec alone: apply the events in stream
//! order; per session the latest event wins, or, when events carry `seq`, the highest `seq`
//! wins and an event with a lower or equal `seq` is stale. A user is present while one of their
//! sessions is live.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use presence_worker::connection::Conn;
use presence_worker::keys::Keys;
use presence_worker::{Event, EventType};

#[derive(Debug, Clone, Copy)]
struct SessionState {
    live: bool,
    seq: Option<u64>,
}

/// The model.
#[derive(Debug, Default)]
pub struct Model {
    sessions: HashMap<(String, String, String), SessionState>,
    docs: BTreeSet<String>,
}

impl Model {
    /// Applies one event, in stream order.
    pub fn apply(&mut self, ev: &Event) {
        self.docs.insert(ev.doc.clone());
        let key = (ev.doc.clone(), ev.user.clone(), ev.session_id().to_owned());
        if let Some(old) = self.sessions.get(&key) {
            if let (Some(new), Some(cur)) = (ev.seq, old.seq) {
                if new <= cur {
                    return; // stale
                }
            }
        }
        self.sessions.insert(
            key,
            SessionState {
                live: ev.kind != EventType::Leave,
                seq: ev.seq,
            },
        );
    }

    /// Users present per document (every document ever seen, possibly empty).
    pub fn users(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = self
            .docs
            .iter()
            .map(|d| (d.clone(), BTreeSet::new()))
            .collect();
        for ((doc, user, _), s) in &self.sessions {
            if s.live {
                out.entry(doc.clone()).or_default().insert(user.clone());
            }
        }
        out
    }

    /// Live sessions of `doc` as (user, session).
    pub fn live_sessions(&self, doc: &str) -> BTreeSet<(String, String)> {
        self.sessions
            .iter()
            .filter(|((d, _, _), s)| d == doc && s.live)
            .map(|((_, u, s), _)| (u.clone(), s.clone()))
            .collect()
    }
}

/// Asserts that Redis holds exactly the model's state: for every document the users set, the
/// count (= SCARD, absent when 0), the live sessions; and no users set for any other document.
pub async fn assert_state(con: &mut Conn, prefix: &str, model: &Model) {
    let keys = Keys::new(prefix);
    let expected = model.users();
    let mut diffs = Vec::new();
    for (doc, users) in &expected {
        let state = presence_worker::inspect::inspect(con, &keys, doc)
            .await
            .expect("inspect");
        let got: BTreeSet<String> = state.users.iter().cloned().collect();
        if &got != users {
            diffs.push(format!("{doc}: users {got:?}, expected {users:?}"));
        }
        let scard = state.users.len() as i64;
        let count = state.count.unwrap_or(0);
        if count != scard || (scard == 0 && state.count.is_some()) {
            diffs.push(format!("{doc}: count {:?} but SCARD {scard}", state.count));
        }
        let live: BTreeSet<(String, String)> = state
            .live_sessions()
            .map(|s| (s.user.clone(), s.session.clone()))
            .collect();
        if live != model.live_sessions(doc) {
            diffs.push(format!(
                "{doc}: live sessions {live:?}, expected {:?}",
                model.live_sessions(doc)
            ));
        }
    }
    // SCAN on every primary of a cluster too.
    let mut unexpected = Vec::new();
    for k in con.scan_match(&keys.users_pattern()).await.expect("scan") {
        let doc = k
            .strip_prefix(&format!("{prefix}:doc:{{"))
            .and_then(|r| r.strip_suffix("}:users"))
            .unwrap_or(&k)
            .to_owned();
        if expected.get(&doc).is_none_or(|u| u.is_empty()) {
            unexpected.push(k);
        }
    }
    assert!(
        unexpected.is_empty(),
        "users sets that should not exist: {unexpected:?}"
    );
    assert!(
        diffs.is_empty(),
        "{} differences from the model:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
