//! Unit tests of coalescing: the `Version` order, grouping by document and session, the deciding
//! event per session and the meta register, plus a property check against a sequential reading
//! of the spec.

use super::*;
use crate::test_rng::Rng;

use crate::event::{EventType, Meta};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The `n`th stream id of a test (increasing with `n`).
fn sid(n: u64) -> StreamId {
    StreamId::new(1_700_000_000_000 + n, 0)
}

fn ver(seq: Option<u64>, sid: StreamId) -> Version {
    Version { seq, sid }
}

fn meta(pairs: &[(&str, &str)]) -> Meta {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// An event with a chosen id (and no `ts`, which coalescing ignores).
fn ev(kind: EventType, doc: &str, user: &str, id: &str) -> Event {
    let mut e = Event::new(kind, doc, user);
    e.id = id.to_owned();
    e.ts = None;
    e
}

fn join(doc: &str, user: &str, id: &str) -> Event {
    ev(EventType::Join, doc, user, id)
}

fn leave(doc: &str, user: &str, id: &str) -> Event {
    ev(EventType::Leave, doc, user, id)
}

fn heartbeat(doc: &str, user: &str, id: &str) -> Event {
    ev(EventType::Heartbeat, doc, user, id)
}

/// Small builders for the optional fields.
trait With {
    fn in_session(self, s: &str) -> Self;
    fn at_seq(self, seq: u64) -> Self;
    fn with_meta(self, m: &[(&str, &str)]) -> Self;
}

impl With for Event {
    fn in_session(mut self, s: &str) -> Self {
        self.session = Some(s.to_owned());
        self
    }

    fn at_seq(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }

    fn with_meta(mut self, m: &[(&str, &str)]) -> Self {
        self.meta = Some(meta(m));
        self
    }
}

/// The update of session (`user`, `session`) of `doc`; panics if absent.
fn find<'a>(docs: &'a [DocUpdate], doc: &str, user: &str, session: &str) -> &'a SessionUpdate {
    let d = docs
        .iter()
        .find(|d| d.doc == doc)
        .unwrap_or_else(|| panic!("no update for doc {doc:?}"));
    let field = session_field(user, session);
    d.sessions
        .iter()
        .find(|s| s.field == field)
        .unwrap_or_else(|| panic!("no update for session {user}/{session} of {doc:?}"))
}

/// Asserts `docs` holds exactly one document with exactly one session, and returns that session.
fn only_session(docs: &[DocUpdate]) -> &SessionUpdate {
    assert_eq!(docs.len(), 1, "{docs:#?}");
    assert_eq!(docs[0].sessions.len(), 1, "{docs:#?}");
    &docs[0].sessions[0]
}

// ---------------------------------------------------------------------------------------------
// Version order
// ---------------------------------------------------------------------------------------------

#[test]
fn without_seq_the_later_stream_id_wins() {
    let early = ver(None, sid(1));
    let late = ver(None, sid(2));
    assert!(late.newer_than(&early));
    assert!(!early.newer_than(&late));
    // The sequence part of the stream id counts within one millisecond.
    let a = ver(None, StreamId::new(5, 0));
    let b = ver(None, StreamId::new(5, 1));
    assert!(b.newer_than(&a));
    assert!(!a.newer_than(&b));
    // Milliseconds dominate the sequence part.
    let c = ver(None, StreamId::new(4, 99));
    assert!(a.newer_than(&c));
}

#[test]
fn with_seq_the_higher_seq_wins_regardless_of_stream_order() {
    let high_early = ver(Some(5), sid(1));
    let low_late = ver(Some(3), sid(2));
    assert!(high_early.newer_than(&low_late));
    assert!(!low_late.newer_than(&high_early));

    let high_late = ver(Some(6), sid(9));
    assert!(high_late.newer_than(&high_early));
    assert!(!high_early.newer_than(&high_late));

    assert!(ver(Some(1), sid(0)).newer_than(&ver(Some(0), sid(100))));
    assert!(ver(Some(MAX), sid(0)).newer_than(&ver(Some(MAX - 1), sid(1))));
}

const MAX: u64 = crate::event::MAX_SEQ;

#[test]
fn equal_seq_the_earlier_stream_id_wins() {
    let first = ver(Some(4), sid(1));
    let copy = ver(Some(4), sid(2));
    assert!(first.newer_than(&copy));
    assert!(
        !copy.newer_than(&first),
        "a later copy with the same seq is not newer"
    );
}

#[test]
fn a_version_is_not_newer_than_itself() {
    for v in [
        ver(None, sid(1)),
        ver(Some(0), sid(1)),
        ver(Some(7), sid(3)),
    ] {
        assert!(!v.newer_than(&v), "{v:?}");
    }
}

#[test]
fn mixed_seq_falls_back_to_stream_order() {
    let with_seq = ver(Some(9), sid(1));
    let without = ver(None, sid(2));
    assert!(without.newer_than(&with_seq));
    assert!(!with_seq.newer_than(&without));

    let with_seq_late = ver(Some(0), sid(5));
    let without_early = ver(None, sid(4));
    assert!(with_seq_late.newer_than(&without_early));
    assert!(!without_early.newer_than(&with_seq_late));
}

#[test]
fn version_order_is_strict_and_total_within_one_mode() {
    // Within a session that always or never carries seq (distinct stream ids), exactly one of two
    // versions is newer, and the order is transitive: so the winner of a fold is well defined.
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for _ in 0..5_000 {
        let with_seq = rng.below(2) == 0;
        let mut pick = |n: u64| {
            let seq = with_seq.then(|| rng.below(4));
            ver(seq, StreamId::new(rng.below(3), n))
        };
        let (a, b, c) = (pick(0), pick(1), pick(2));
        for (x, y) in [(a, b), (b, c), (a, c)] {
            assert!(x.newer_than(&y) != y.newer_than(&x), "{x:?} vs {y:?}");
        }
        for (x, y, z) in [
            (a, b, c),
            (a, c, b),
            (b, a, c),
            (b, c, a),
            (c, a, b),
            (c, b, a),
        ] {
            if x.newer_than(&y) && y.newer_than(&z) {
                assert!(x.newer_than(&z), "{x:?} > {y:?} > {z:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Grouping
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_batch_gives_no_updates() {
    assert!(coalesce(&[]).is_empty());
}

#[test]
fn documents_come_in_first_seen_order() {
    let batch = vec![
        (sid(1), join("b", "u", "1")),
        (sid(2), join("a", "u", "2")),
        (sid(3), join("b", "v", "3")),
        (sid(4), join("c", "u", "4")),
        (sid(5), join("a", "u", "5")),
    ];
    let docs = coalesce(&batch);
    let names: Vec<&str> = docs.iter().map(|d| d.doc.as_str()).collect();
    assert_eq!(names, ["b", "a", "c"]);
    let b_sessions: Vec<&str> = docs[0].sessions.iter().map(|s| s.user.as_str()).collect();
    assert_eq!(b_sessions, ["u", "v"]);
    assert_eq!(docs[1].sessions.len(), 1);
    assert_eq!(docs[1].sessions[0].events, [1, 4]);
}

#[test]
fn sessions_come_in_first_seen_order_within_a_document() {
    let batch = vec![
        (sid(1), join("d", "carol", "1")),
        (sid(2), join("d", "alice", "2").in_session("t2")),
        (sid(3), join("d", "alice", "3").in_session("t1")),
        (sid(4), heartbeat("d", "carol", "4")),
        (sid(5), join("d", "bob", "5")),
    ];
    let docs = coalesce(&batch);
    assert_eq!(docs.len(), 1);
    let fields: Vec<&str> = docs[0].sessions.iter().map(|s| s.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "carol\u{1f}carol",
            "alice\u{1f}t2",
            "alice\u{1f}t1",
            "bob\u{1f}bob"
        ]
    );
}

#[test]
fn session_defaults_to_the_user() {
    let docs = coalesce(&[(sid(1), join("d", "alice", "1"))]);
    let s = only_session(&docs);
    assert_eq!(s.field, session_field("alice", "alice"));
    assert_eq!(s.field, "alice\u{1f}alice");
    assert_eq!(s.user, "alice");

    // An explicit session named after the user is that same default session.
    let docs = coalesce(&[
        (sid(1), join("d", "alice", "1")),
        (sid(2), leave("d", "alice", "2").in_session("alice")),
    ]);
    let s = only_session(&docs);
    assert_eq!(s.events, [0, 1]);
    assert!(!s.live);
}

#[test]
fn sessions_are_keyed_by_user_and_session() {
    let batch = vec![
        (sid(1), join("d", "alice", "a1").in_session("tab1")),
        (sid(2), join("d", "bob", "b1").in_session("tab1")),
        (sid(3), leave("d", "alice", "a2").in_session("tab1")),
        (sid(4), join("d", "alice", "a3").in_session("tab2")),
        (sid(5), join("d", "alice", "a4")),
    ];
    let docs = coalesce(&batch);
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].sessions.len(), 4);

    let alice1 = find(&docs, "d", "alice", "tab1");
    assert_eq!(alice1.user, "alice");
    assert_eq!(alice1.events, [0, 2]);
    assert!(!alice1.live);
    assert_eq!(alice1.event_id, "a2");

    let bob1 = find(&docs, "d", "bob", "tab1");
    assert_eq!(
        bob1.user, "bob",
        "same session id, different user: a distinct session"
    );
    assert_eq!(bob1.events, [1]);
    assert!(bob1.live);
    assert_eq!(bob1.event_id, "b1");

    assert_eq!(find(&docs, "d", "alice", "tab2").events, [3]);
    assert_eq!(find(&docs, "d", "alice", "alice").events, [4]);
}

#[test]
fn the_same_session_in_two_documents_is_two_updates() {
    let batch = vec![
        (sid(1), join("d1", "alice", "1")),
        (sid(2), leave("d2", "alice", "2")),
        (sid(3), heartbeat("d1", "alice", "3")),
    ];
    let docs = coalesce(&batch);
    assert_eq!(docs.len(), 2);
    let s1 = find(&docs, "d1", "alice", "alice");
    let s2 = find(&docs, "d2", "alice", "alice");
    assert_eq!(s1.events, [0, 2]);
    assert!(s1.live);
    assert_eq!(s2.events, [1]);
    assert!(!s2.live);
}

// ---------------------------------------------------------------------------------------------
// The deciding event
// ---------------------------------------------------------------------------------------------

#[test]
fn single_event_decides_its_session() {
    for (kind, live) in [
        (EventType::Join, true),
        (EventType::Heartbeat, true),
        (EventType::Leave, false),
    ] {
        let docs = coalesce(&[(sid(7), ev(kind, "d", "u", "only").at_seq(3))]);
        let s = only_session(&docs);
        assert_eq!(s.live, live, "{kind:?}");
        assert_eq!(s.event_id, "only");
        assert_eq!(s.version, ver(Some(3), sid(7)));
        assert_eq!(s.events, [0]);
    }
}

#[test]
fn without_seq_the_latest_entry_decides() {
    let batch = vec![
        (sid(1), join("d", "u", "j")),
        (sid(2), heartbeat("d", "u", "h")),
        (sid(3), leave("d", "u", "l")),
    ];
    let s = coalesce(&batch)[0].sessions[0].clone();
    assert!(!s.live);
    assert_eq!(s.event_id, "l");
    assert_eq!(s.version, ver(None, sid(3)));
    assert_eq!(s.events, [0, 1, 2]);

    // Rejoin after leaving.
    let mut batch = batch;
    batch.push((sid(4), join("d", "u", "j2")));
    let s = coalesce(&batch)[0].sessions[0].clone();
    assert!(s.live);
    assert_eq!(s.event_id, "j2");
    assert_eq!(s.version, ver(None, sid(4)));
}

#[test]
fn batch_order_does_not_matter_stream_order_does() {
    // The batch lists the leave first, but it is the later entry.
    let batch = vec![
        (sid(3), leave("d", "u", "l")),
        (sid(1), join("d", "u", "j")),
        (sid(2), heartbeat("d", "u", "h")),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(!s.live);
    assert_eq!(s.event_id, "l");
    assert_eq!(s.version, ver(None, sid(3)));
    assert_eq!(
        s.events,
        [0, 1, 2],
        "indices follow the batch, not the stream"
    );
}

#[test]
fn with_seq_the_highest_seq_decides() {
    // Delivered out of order: the join (seq 2) was sent after the leave (seq 1).
    let batch = vec![
        (sid(1), join("d", "u", "j").at_seq(2)),
        (sid(2), leave("d", "u", "l").at_seq(1)),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "j");
    assert_eq!(s.version, ver(Some(2), sid(1)));
    assert_eq!(s.events, [0, 1]);

    let batch = vec![
        (sid(1), join("d", "u", "j").at_seq(10)),
        (sid(2), heartbeat("d", "u", "h").at_seq(11)),
        (sid(3), leave("d", "u", "l").at_seq(12)),
        (sid(4), heartbeat("d", "u", "late").at_seq(11)),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(!s.live);
    assert_eq!(s.event_id, "l");
    assert_eq!(s.version, ver(Some(12), sid(3)));
}

#[test]
fn equal_seq_keeps_the_earlier_entry() {
    // A retried send with the same seq but another id and type: the first entry stays.
    let batch = vec![
        (sid(1), join("d", "u", "first").at_seq(5)),
        (sid(2), leave("d", "u", "copy").at_seq(5)),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "first");
    assert_eq!(s.version, ver(Some(5), sid(1)));

    // Same when the batch lists the later copy first.
    let batch = vec![
        (sid(2), leave("d", "u", "copy").at_seq(5)),
        (sid(1), join("d", "u", "first").at_seq(5)),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "first");
    assert_eq!(s.version, ver(Some(5), sid(1)));
}

// ---------------------------------------------------------------------------------------------
// The meta register
// ---------------------------------------------------------------------------------------------

#[test]
fn no_meta_write_leaves_the_register_untouched() {
    let batch = vec![
        (sid(1), join("d", "u", "j")),
        (sid(2), heartbeat("d", "u", "h")),
    ];
    assert_eq!(only_session(&coalesce(&batch)).meta, None);
}

#[test]
fn heartbeat_without_meta_keeps_the_joins_meta() {
    let m = meta(&[("name", "Alice"), ("color", "red")]);
    let batch = vec![
        (
            sid(1),
            join("d", "u", "j").with_meta(&[("name", "Alice"), ("color", "red")]),
        ),
        (sid(2), heartbeat("d", "u", "h")),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "h", "the heartbeat decides liveness");
    assert_eq!(s.version, ver(None, sid(2)));
    assert_eq!(s.meta, Some((ver(None, sid(1)), Some(encode_meta(&m)))));
}

#[test]
fn a_later_meta_replaces_an_earlier_one() {
    let batch = vec![
        (sid(1), join("d", "u", "j").with_meta(&[("name", "A")])),
        (sid(2), heartbeat("d", "u", "h").with_meta(&[("name", "B")])),
        (sid(3), heartbeat("d", "u", "h2")),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert_eq!(
        s.meta,
        Some((
            ver(None, sid(2)),
            Some(encode_meta(&meta(&[("name", "B")])))
        ))
    );
    // An empty map is a write too: it replaces the meta with nothing.
    let batch = vec![
        (sid(1), join("d", "u", "j").with_meta(&[("name", "A")])),
        (sid(2), heartbeat("d", "u", "h").with_meta(&[])),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert_eq!(
        s.meta,
        Some((ver(None, sid(2)), Some(encode_meta(&Meta::new()))))
    );
}

#[test]
fn leave_writes_a_clear() {
    let batch = vec![
        (sid(1), join("d", "u", "j").with_meta(&[("name", "A")])),
        (sid(2), leave("d", "u", "l")),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(!s.live);
    assert_eq!(s.meta, Some((ver(None, sid(2)), None)));

    // On its own, and even when the leave carries meta.
    let s = only_session(&coalesce(&[(sid(4), leave("d", "u", "l"))])).clone();
    assert_eq!(s.meta, Some((ver(None, sid(4)), None)));
    let s = only_session(&coalesce(&[(
        sid(4),
        leave("d", "u", "l").with_meta(&[("name", "A")]),
    )]))
    .clone();
    assert_eq!(s.meta, Some((ver(None, sid(4)), None)));
}

#[test]
fn rejoin_without_meta_keeps_the_leaves_clear() {
    let batch = vec![
        (sid(1), join("d", "u", "j1").with_meta(&[("name", "M")])),
        (sid(2), leave("d", "u", "l")),
        (sid(3), join("d", "u", "j2")),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "j2");
    assert_eq!(s.version, ver(None, sid(3)));
    assert_eq!(
        s.meta,
        Some((ver(None, sid(2)), None)),
        "the leave's clear wins"
    );
}

#[test]
fn with_seq_the_highest_meta_write_wins_even_if_earlier_in_the_batch() {
    let m2 = meta(&[("name", "second")]);
    let batch = vec![
        (
            sid(1),
            join("d", "u", "j2")
                .at_seq(5)
                .with_meta(&[("name", "second")]),
        ),
        (
            sid(2),
            join("d", "u", "j1")
                .at_seq(3)
                .with_meta(&[("name", "first")]),
        ),
        (sid(3), leave("d", "u", "old-leave").at_seq(2)),
        (sid(4), heartbeat("d", "u", "h").at_seq(4)),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert!(s.live);
    assert_eq!(s.event_id, "j2");
    assert_eq!(s.version, ver(Some(5), sid(1)));
    assert_eq!(s.meta, Some((ver(Some(5), sid(1)), Some(encode_meta(&m2)))));

    // A meta write with a lower seq than the liveness winner still counts when it is the newest
    // meta write: the heartbeat (seq 6) wrote no meta.
    let batch = vec![
        (sid(1), heartbeat("d", "u", "h").at_seq(6)),
        (
            sid(2),
            join("d", "u", "j").at_seq(4).with_meta(&[("name", "x")]),
        ),
    ];
    let s = only_session(&coalesce(&batch)).clone();
    assert_eq!(s.event_id, "h");
    assert_eq!(
        s.meta,
        Some((
            ver(Some(4), sid(2)),
            Some(encode_meta(&meta(&[("name", "x")])))
        ))
    );
}

// ---------------------------------------------------------------------------------------------
// Property check
// ---------------------------------------------------------------------------------------------

const DOCS: [&str; 2] = ["doc-a", "doc-b"];
const USERS: [&str; 3] = ["alice", "bob", "carol"];
/// `None`: the user's default session.
const SESSIONS: [Option<&str>; 2] = [None, Some("tab")];

/// A session key: index into DOCS x USERS x SESSIONS.
fn key_of(k: usize) -> (&'static str, &'static str, Option<&'static str>) {
    (DOCS[k / 6], USERS[(k / 2) % 3], SESSIONS[k % 2])
}

fn version_of(batch: &[(StreamId, Event)], i: usize) -> Version {
    ver(batch[i].1.seq, batch[i].0)
}

fn writes_meta(e: &Event) -> bool {
    e.kind == EventType::Leave || e.meta.is_some()
}

fn meta_write_of(batch: &[(StreamId, Event)], i: usize) -> (Version, Option<Vec<u8>>) {
    let e = &batch[i].1;
    let data = match e.kind {
        EventType::Leave => None,
        _ => Some(encode_meta(e.meta.as_ref().unwrap())),
    };
    (version_of(batch, i), data)
}

/// The spec read sequentially, in stream order: the latest entry wins; when events carry seq, the
/// highest seq wins and an event with a lower or equal seq than the current one is stale.
fn sequential_winner(batch: &[(StreamId, Event)], indices: &[usize]) -> Option<usize> {
    let mut order = indices.to_vec();
    order.sort_by_key(|&i| batch[i].0);
    let mut current: Option<usize> = None;
    for i in order {
        current = match (current, batch[i].1.seq) {
            (None, _) => Some(i),
            (Some(c), Some(seq)) => match batch[c].1.seq {
                Some(cur) if seq <= cur => Some(c), // stale
                _ => Some(i),
            },
            (Some(_), None) => Some(i),
        };
    }
    current
}

/// Folds `indices` in the given order with `newer_than`.
fn fold_winner(batch: &[(StreamId, Event)], indices: &[usize]) -> Option<usize> {
    indices.iter().copied().reduce(|cur, i| {
        if version_of(batch, i).newer_than(&version_of(batch, cur)) {
            i
        } else {
            cur
        }
    })
}

struct Generated {
    batch: Vec<(StreamId, Event)>,
    /// Session key of each event.
    keys: Vec<usize>,
}

fn generate(rng: &mut Rng) -> Generated {
    // Each session carries seq on all of its events or on none.
    let uses_seq: Vec<bool> = (0..12).map(|_| rng.below(2) == 0).collect();
    let n = 1 + rng.below(12) as usize;
    // Distinct stream ids, in an order unrelated to the batch order, some sharing a millisecond.
    let mut positions: Vec<u64> = (0..n as u64).collect();
    rng.shuffle(&mut positions);
    // Few sessions per batch, so sessions get several events.
    let active: Vec<usize> = (0..1 + rng.below(4))
        .map(|_| rng.below(12) as usize)
        .collect();
    let mut batch = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for (i, &pos) in positions.iter().enumerate() {
        let k = active[rng.below(active.len() as u64) as usize];
        let (doc, user, session) = key_of(k);
        let kind = match rng.below(3) {
            0 => EventType::Join,
            1 => EventType::Leave,
            _ => EventType::Heartbeat,
        };
        let mut e = ev(kind, doc, user, &format!("e{i}"));
        e.session = session.map(str::to_owned);
        if uses_seq[k] {
            e.seq = Some(rng.below(4)); // small range: plenty of ties
        }
        if rng.below(2) == 0 {
            e.meta = Some(meta(&[("n", &format!("m{i}"))]));
        }
        batch.push((StreamId::new(1_000 + pos / 3, pos % 3), e));
        keys.push(k);
    }
    Generated { batch, keys }
}

/// Checks one coalesced batch against the sequential reading and against folds in random orders.
fn check(rng: &mut Rng, g: &Generated, docs: &[DocUpdate]) {
    let batch = &g.batch;
    // Documents and sessions in first-seen order.
    let mut expected_docs: Vec<&str> = Vec::new();
    let mut expected_sessions: Vec<(&str, String)> = Vec::new();
    for (_, e) in batch {
        if !expected_docs.contains(&e.doc.as_str()) {
            expected_docs.push(&e.doc);
        }
        let s = (e.doc.as_str(), session_field(&e.user, e.session_id()));
        if !expected_sessions.contains(&s) {
            expected_sessions.push(s);
        }
    }
    let got_docs: Vec<&str> = docs.iter().map(|d| d.doc.as_str()).collect();
    assert_eq!(got_docs, expected_docs);
    let got_sessions: Vec<(&str, String)> = docs
        .iter()
        .flat_map(|d| d.sessions.iter().map(|s| (d.doc.as_str(), s.field.clone())))
        .collect();
    let mut expected_sorted = expected_sessions.clone();
    expected_sorted.sort_by_key(|(d, _)| expected_docs.iter().position(|x| x == d));
    assert_eq!(got_sessions, expected_sorted);

    for k in 0..12 {
        let indices: Vec<usize> = (0..batch.len()).filter(|&i| g.keys[i] == k).collect();
        if indices.is_empty() {
            continue;
        }
        let (doc, user, session) = key_of(k);
        let s = find(docs, doc, user, session.unwrap_or(user));
        assert_eq!(
            s.events, indices,
            "every event of the session, in batch order"
        );
        assert_eq!(s.user, user);

        // Liveness: the sequential reading, any fold order, and coalesce agree.
        let w = sequential_winner(batch, &indices).unwrap();
        for _ in 0..4 {
            let mut perm = indices.clone();
            rng.shuffle(&mut perm);
            let f = fold_winner(batch, &perm).unwrap();
            assert_eq!(
                (batch[f].1.kind.is_live(), version_of(batch, f)),
                (batch[w].1.kind.is_live(), version_of(batch, w)),
                "fold in order {perm:?} disagrees with the sequential reading: {batch:#?}"
            );
        }
        assert_eq!(
            (s.live, s.version, s.event_id.as_str()),
            (
                batch[w].1.kind.is_live(),
                version_of(batch, w),
                batch[w].1.id.as_str()
            ),
            "session {k} of {batch:#?}"
        );

        // Meta: the same rule over the events that write meta.
        let writers: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&i| writes_meta(&batch[i].1))
            .collect();
        let expected_meta = sequential_winner(batch, &writers).map(|m| meta_write_of(batch, m));
        assert_eq!(s.meta, expected_meta, "meta of session {k} of {batch:#?}");
    }
}

#[test]
fn coalescing_matches_the_spec_and_ignores_batch_order() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut multi_event_sessions = 0;
    for _ in 0..4_000 {
        let g = generate(&mut rng);
        let docs = coalesce(&g.batch);
        check(&mut rng, &g, &docs);
        multi_event_sessions += docs
            .iter()
            .flat_map(|d| &d.sessions)
            .filter(|s| s.events.len() > 1)
            .count();

        // The same events in another batch order give the same winners.
        let mut perm: Vec<usize> = (0..g.batch.len()).collect();
        rng.shuffle(&mut perm);
        let shuffled = Generated {
            batch: perm.iter().map(|&i| g.batch[i].clone()).collect(),
            keys: perm.iter().map(|&i| g.keys[i]).collect(),
        };
        let docs2 = coalesce(&shuffled.batch);
        check(&mut rng, &shuffled, &docs2);
        for d in &docs {
            for s in &d.sessions {
                let user = s.user.as_str();
                let s2 = docs2
                    .iter()
                    .find(|d2| d2.doc == d.doc)
                    .and_then(|d2| d2.sessions.iter().find(|s2| s2.field == s.field))
                    .unwrap_or_else(|| panic!("session {user} lost by reordering"));
                assert_eq!(
                    (s.live, s.version, &s.event_id, &s.meta),
                    (s2.live, s2.version, &s2.event_id, &s2.meta)
                );
                assert_eq!(s.events.len(), s2.events.len());
            }
        }
    }
    assert!(
        multi_event_sessions > 4_000,
        "the generator must produce sessions with several events ({multi_event_sessions})"
    );
}
