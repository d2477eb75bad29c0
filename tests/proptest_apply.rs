//! Property tests of the apply semantics on a real Redis, against the sequential model
//! (`common/model.rs`): generated streams over 2 documents x 3 users x 2 sessions, each session
//! using `seq` always or never (out of order, with ties and values near the maximum), with exact
//! re-appends of earlier events and `meta` on some events.
//!
//! 1. Batches applied in any order (replicas racing), then all redelivered, end at the model.
//! 2. Coalescing a batch changes nothing: the state equals that of one-event batches.
//! 3. The planned path (the worker decides, `MULTI`/`EXEC` writes) leaves the same state as the
//!    script, and replicas on it racing concurrently (their `EXEC`s failing on each other's
//!    writes, the script then applying) end at the model.
//!
//! Beside the model's users and live sessions, every session record is checked against what the
//! README's ordering rule says it holds: the deciding event, and the meta of the newest event that
//! wrote meta (a live event carrying `meta`, or a `leave`, which clears it).
//!
//! One Redis per test; each case writes under its own key prefix. `PROPTEST_CASES` overrides the
//! number of cases.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use common::model::{assert_state, Model};
use common::RedisServer;
use presence_worker::apply::Applier;
use presence_worker::coalesce::coalesce;
use presence_worker::connection::Conn;
use presence_worker::event::{Meta, MAX_SEQ};
use presence_worker::inspect::inspect;
use presence_worker::keys::Keys;
use presence_worker::{Event, EventType, StreamId};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

const DOCS: [&str; 2] = ["d0", "d1"];
const USERS: [&str; 3] = ["u0", "u1", "u2"];
const SESSIONS: [Option<&str>; 2] = [None, Some("tab")];

/// One stream entry before ids are given: an exact re-append of an earlier entry (`dup`), or a
/// new event.
#[derive(Debug, Clone)]
struct Draw {
    doc: usize,
    user: usize,
    session: usize,
    kind: EventType,
    seq: u64,
    /// 0-4 no meta, 5-8 a map naming the event, 9 an empty map.
    meta: u8,
    dup: Option<Index>,
    /// Distance from the previous stream id: 0 same ms, 1 next ms, 2 nine ms later.
    gap: u8,
}

fn draw() -> impl Strategy<Value = Draw> {
    let seq = prop_oneof![
        8 => 0u64..12,
        1 => (MAX_SEQ - 2)..=MAX_SEQ,
        1 => ((1u64 << 32) - 2)..((1u64 << 32) + 2),
    ];
    let kind = prop::sample::select(EventType::ALL.to_vec());
    let dup = prop::option::weighted(0.15, any::<Index>());
    (
        0..2usize,
        0..3usize,
        0..2usize,
        kind,
        seq,
        0u8..10,
        dup,
        0u8..3,
    )
        .prop_map(|(doc, user, session, kind, seq, meta, dup, gap)| Draw {
            doc,
            user,
            session,
            kind,
            seq,
            meta,
            dup,
            gap,
        })
}

/// Where a generated stream starts: its ids cross 10 to 11 decimal digits, 2^32 (the script
/// holds each u64 as two 32-bit halves), 2^53 (beyond which a Lua number is not exact), the
/// 2^32 boundary of the sequence part, or end near the largest id.
const STREAM_STARTS: [StreamId; 5] = [
    StreamId::new(9_999_999_990, 0),
    StreamId::new((1 << 32) - 20, 0),
    StreamId::new((1 << 53) - 20, 0),
    StreamId::new(7, (1 << 32) - 10),
    StreamId::new(u64::MAX - 400, 0),
];

/// The stream: entries in stream order with increasing ids from `start`.
fn stream(draws: &[Draw], with_seq: &[bool; 12], start: StreamId) -> Vec<(StreamId, Event)> {
    let mut sid = start;
    let mut out: Vec<(StreamId, Event)> = Vec::with_capacity(draws.len());
    for (i, d) in draws.iter().enumerate() {
        sid = match d.gap {
            0 => StreamId::new(sid.ms, sid.seq + 1),
            1 => StreamId::new(sid.ms + 1, 0),
            _ => StreamId::new(sid.ms + 9, 0),
        };
        let ev = match &d.dup {
            Some(ix) if i > 0 => out[ix.index(i)].1.clone(),
            _ => Event {
                v: 1,
                id: format!("ev{i}"),
                kind: d.kind,
                doc: DOCS[d.doc].to_owned(),
                user: USERS[d.user].to_owned(),
                session: SESSIONS[d.session].map(str::to_owned),
                seq: with_seq[d.doc * 6 + d.user * 2 + d.session].then_some(d.seq),
                ts: Some(1_700_000_000_000 + i as i64),
                meta: match d.meta {
                    0..=4 => None,
                    5..=8 => Some(Meta::from([("name".to_owned(), format!("n{i}"))])),
                    _ => Some(Meta::new()),
                },
            },
        };
        out.push((sid, ev));
    }
    out
}

/// A stream cut into consecutive batches, with the order in which they are applied and the
/// order in which they are delivered again.
#[derive(Clone)]
struct Case {
    events: Vec<(StreamId, Event)>,
    batches: Vec<Range<usize>>,
    order: Vec<usize>,
    again: Vec<usize>,
}

/// Most entries in a generated stream.
const MAX_EVENTS: usize = 40;

/// Every part is drawn independently (no `prop_flat_map`), so that each shrinks on its own:
/// fewer entries, fewer cuts, batches back in stream order.
fn case() -> impl Strategy<Value = Case> {
    (
        vec(draw(), 1..=MAX_EVENTS),
        prop::array::uniform12(any::<bool>()),
        vec(prop::bool::weighted(0.3), MAX_EVENTS - 1),
        vec(any::<u8>(), MAX_EVENTS),
        vec(any::<u8>(), MAX_EVENTS),
        prop::sample::select(STREAM_STARTS.to_vec()),
    )
        .prop_map(|(draws, with_seq, cuts, order_keys, again_keys, start)| {
            let events = stream(&draws, &with_seq, start);
            let mut batches = Vec::new();
            let mut start = 0;
            for end in 1..events.len() {
                if cuts[end - 1] {
                    batches.push(start..end);
                    start = end;
                }
            }
            batches.push(start..events.len());
            let order_by = |keys: &[u8]| {
                let mut ids: Vec<usize> = (0..batches.len()).collect();
                ids.sort_by_key(|&b| (keys[b], b));
                ids
            };
            Case {
                order: order_by(&order_keys),
                again: order_by(&again_keys),
                events,
                batches,
            }
        })
}

/// One line per entry, so a failing case reads as a stream.
impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "batches {:?}, applied in order {:?}",
            self.batches, self.order
        )?;
        writeln!(f, "then delivered again in order {:?}", self.again)?;
        for (i, (sid, e)) in self.events.iter().enumerate() {
            let session = e.session.as_deref().unwrap_or("-");
            let (kind, seq, meta) = (e.kind.as_str(), e.seq, &e.meta);
            let (doc, user, id) = (&e.doc, &e.user, &e.id);
            writeln!(
                f,
                "  [{i}] {sid} {id} {kind} {doc}/{user}/{session} seq={seq:?} meta={meta:?}"
            )?;
        }
        Ok(())
    }
}

/// Runs `check` on generated cases against one Redis, each case under its own prefix `p<n>`.
fn run<F, Fut>(default_cases: u32, check: F)
where
    F: Fn(Conn, String, Case, redis::Client) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let con = rt.block_on(server.con());
    let client = redis::Client::open(server.url()).expect("client");
    let n = AtomicUsize::new(0);
    let result = TestRunner::new(config).run(&case(), |case| {
        let prefix = format!("p{}", n.fetch_add(1, Ordering::Relaxed));
        rt.block_on(check(con.clone(), prefix, case, client.clone()));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!("{} generated cases passed", n.load(Ordering::Relaxed));
}

async fn apply_batch(applier: &Applier, con: &mut Conn, batch: &[(StreamId, Event)]) {
    let docs = coalesce(batch);
    applier.apply(con, &docs).await.expect("apply");
}

fn model_of(events: &[(StreamId, Event)]) -> Model {
    let mut model = Model::default();
    for (_, ev) in events {
        model.apply(ev);
    }
    model
}

/// A session record as the checks compare it: live, seq, entry id, event id hash, meta.
type Record = (bool, Option<String>, String, u32, Option<Meta>);

/// Every session record, by (document, user, session), as Redis holds it.
async fn records(con: &mut Conn, prefix: &str) -> BTreeMap<[String; 3], Record> {
    let keys = Keys::new(prefix);
    let mut out = BTreeMap::new();
    for doc in DOCS {
        let state = inspect(con, &keys, doc).await.expect("inspect");
        for s in state.sessions {
            let key = [doc.to_owned(), s.user, s.session];
            out.insert(key, (s.live, s.seq, s.entry_id, s.event_id_hash, s.meta));
        }
    }
    out
}

/// Whether entry `a` supersedes entry `b` of the same session, by the README's ordering rule:
/// with a `seq` on both, the higher `seq`, or for equal `seq` the earlier entry; otherwise the
/// later entry.
fn supersedes(a: &(StreamId, Event), b: &(StreamId, Event)) -> bool {
    match (a.1.seq, b.1.seq) {
        (Some(x), Some(y)) if x != y => x > y,
        (Some(_), Some(_)) => a.0 < b.0,
        _ => a.0 > b.0,
    }
}

/// The session records the stream leads to, applied in order: each session is two registers,
/// liveness (every event writes it) and meta (live events with `meta` and every `leave` write
/// it); a write lands when it supersedes the register's last one.
fn expected_records(events: &[(StreamId, Event)]) -> BTreeMap<[String; 3], Record> {
    type Registers<'a> = (&'a (StreamId, Event), Option<&'a (StreamId, Event)>);
    let mut regs: BTreeMap<[String; 3], Registers<'_>> = BTreeMap::new();
    for entry in events {
        let ev = &entry.1;
        let key = [ev.doc.clone(), ev.user.clone(), ev.session_id().to_owned()];
        let writes_meta = ev.meta.is_some() || !ev.kind.is_live();
        let (live, meta) = regs.entry(key).or_insert((entry, None));
        if supersedes(entry, live) {
            *live = entry;
        }
        if writes_meta && meta.is_none_or(|m| supersedes(entry, m)) {
            *meta = Some(entry);
        }
    }
    regs.into_iter()
        .map(|(key, ((sid, ev), meta))| {
            let meta = meta.and_then(|(_, m)| m.kind.is_live().then(|| m.meta.clone()).flatten());
            let seq = ev.seq.map(|q| q.to_string());
            let id = presence_worker::apply::id_hash(&ev.id);
            let record = (ev.kind.is_live(), seq, sid.to_string(), id, meta);
            (key, record)
        })
        .collect()
}

/// Asserts that the state under `prefix` is the model's, record by record.
async fn assert_matches_spec(con: &mut Conn, prefix: &str, case: &Case) {
    assert_state(con, prefix, &model_of(&case.events)).await;
    let got = records(con, prefix).await;
    let expected = expected_records(&case.events);
    for key in expected.keys().chain(got.keys()) {
        assert_eq!(
            got.get(key),
            expected.get(key),
            "session record of {key:?} (live, seq, entry, event, meta)"
        );
    }
}

async fn racing_replicas(mut con: Conn, prefix: String, case: Case, _: redis::Client) {
    let applier = Applier::new(Keys::new(prefix.as_str()), 600_000, 0);
    for &b in case.order.iter().chain(&case.again) {
        apply_batch(&applier, &mut con, &case.events[case.batches[b].clone()]).await;
    }
    assert_matches_spec(&mut con, &prefix, &case).await;
}

/// Batches applied in any order, then every batch delivered again, end at the sequential model.
#[test]
fn batches_in_any_order_and_redelivered_match_the_sequential_model() {
    run(128, racing_replicas);
}

/// What two runs must agree on: every document's state (without the server time of each
/// apply), the non-zero totals and the `top` index.
type Dump = (
    Vec<presence_worker::inspect::DocState>,
    BTreeMap<String, i64>,
    Vec<(String, f64)>,
);

async fn dump(con: &mut Conn, prefix: &str) -> Dump {
    let keys = Keys::new(prefix);
    let mut docs = Vec::new();
    for doc in DOCS {
        let mut state = inspect(con, &keys, doc).await.expect("inspect");
        for s in &mut state.sessions {
            s.last_change_ms = None;
        }
        docs.push(state);
    }
    let g = keys.globals();
    let mut stats: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(&g.stats)
        .query_async(con)
        .await
        .expect("HGETALL");
    stats.retain(|_, v| *v != 0);
    let top: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&g.top)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(con)
        .await
        .expect("ZRANGE");
    (docs, stats, top)
}

async fn coalesced_vs_single(mut con: Conn, prefix: String, case: Case, _: redis::Client) {
    let (batched, single) = (format!("{prefix}b"), format!("{prefix}s"));
    let by_batch = Applier::new(Keys::new(batched.as_str()), 600_000, 0);
    let by_event = Applier::new(Keys::new(single.as_str()), 600_000, 0);
    for range in &case.batches {
        apply_batch(&by_batch, &mut con, &case.events[range.clone()]).await;
        for i in range.clone() {
            apply_batch(&by_event, &mut con, &case.events[i..i + 1]).await;
        }
    }
    let (b, s) = (
        dump(&mut con, &batched).await,
        dump(&mut con, &single).await,
    );
    assert_eq!(b, s, "coalesced batches and one-event batches disagree");
    assert_matches_spec(&mut con, &batched, &case).await;
}

/// Coalescing a batch gives the same state as applying its events one by one, in stream order.
#[test]
fn coalesced_batches_equal_one_event_batches() {
    run(96, coalesced_vs_single);
}

/// The planned path and the script, fed the same batches in the same order (each under its own
/// prefix), leave the same state: records, counts, users, totals, `top`; and the expiry index
/// holds the same documents.
async fn planned_vs_scripted(mut con: Conn, prefix: String, case: Case, client: redis::Client) {
    let (planned, scripted) = (format!("{prefix}p"), format!("{prefix}s"));
    let ttl = 90_000;
    let by_plan = Applier::new(Keys::new(planned.as_str()), 600_000, ttl)
        .with_planned_path(client, Duration::from_secs(5));
    let by_script = Applier::new(Keys::new(scripted.as_str()), 600_000, ttl);
    for &b in case.order.iter().chain(&case.again) {
        let batch = coalesce(&case.events[case.batches[b].clone()]);
        let planned = by_plan.apply(&mut con, &batch).await.expect("apply");
        let scripted = by_script.apply(&mut con, &batch).await.expect("apply");
        assert_eq!(planned, scripted, "outcomes");
    }
    let (p, s) = (
        dump(&mut con, &planned).await,
        dump(&mut con, &scripted).await,
    );
    assert_eq!(p, s, "the planned path and the script disagree");
    let due = |prefix: &str| {
        redis::cmd("ZRANGE")
            .arg(Keys::new(prefix).globals().expiry)
            .arg(0)
            .arg(-1)
            .clone()
    };
    // (The members, not their order: each path's server time differs by a few ms.)
    let (dp, ds): (
        std::collections::BTreeSet<String>,
        std::collections::BTreeSet<String>,
    ) = (
        due(&planned).query_async(&mut con).await.expect("ZRANGE"),
        due(&scripted).query_async(&mut con).await.expect("ZRANGE"),
    );
    assert_eq!(dp, ds, "expiry index");
    let (stepped, _) = by_plan.planned_stats().expect("the planned path is on");
    PLANNED_STEPS.fetch_add(stepped, Ordering::Relaxed);
    assert_matches_spec(&mut con, &planned, &case).await;
}

/// Documents the planned path applied itself, and chunks it left to the script because a
/// watched key changed, over all cases of a test.
static PLANNED_STEPS: AtomicU64 = AtomicU64::new(0);
static CONFLICTS: AtomicU64 = AtomicU64::new(0);

/// The planned path leaves the state the script leaves.
#[test]
fn the_planned_path_and_the_script_leave_the_same_state() {
    run(128, planned_vs_scripted);
    assert!(
        PLANNED_STEPS.load(Ordering::Relaxed) > 0,
        "nothing was planned"
    );
}

/// Two replicas on the planned path apply batches two at a time, concurrently, in any order,
/// then all again: they end at the model, though their `EXEC`s fail on each other's writes. One
/// is on lean connections, the other on redis-rs's.
async fn concurrent_planned_replicas(
    mut con: Conn,
    prefix: String,
    case: Case,
    client: redis::Client,
) {
    let replica = |lean| {
        Applier::new(Keys::new(prefix.as_str()), 600_000, 0).with_planned_path_on(
            client.clone(),
            Duration::from_secs(5),
            lean,
        )
    };
    let (a, b) = (replica(true), replica(false));
    let order: Vec<usize> = case.order.iter().chain(&case.again).copied().collect();
    for pair in order.chunks(2) {
        let batch = |i: usize| coalesce(&case.events[case.batches[pair[i]].clone()]);
        let (mut c1, mut c2) = (con.clone(), con.clone());
        let first = batch(0);
        let second = pair.get(1).map(|_| batch(1)).unwrap_or_default();
        let (r1, r2) = tokio::join!(a.apply(&mut c1, &first), b.apply(&mut c2, &second));
        r1.expect("apply");
        r2.expect("apply");
    }
    for applier in [&a, &b] {
        let (_, conflicts) = applier.planned_stats().expect("the planned path is on");
        CONFLICTS.fetch_add(conflicts, Ordering::Relaxed);
    }
    assert_matches_spec(&mut con, &prefix, &case).await;
}

/// Replicas on the planned path racing concurrently end at the sequential model.
#[test]
fn concurrent_replicas_on_the_planned_path_match_the_sequential_model() {
    run(128, concurrent_planned_replicas);
    // The fallback was exercised: some EXEC found a key the other replica wrote.
    assert!(CONFLICTS.load(Ordering::Relaxed) > 0, "no EXEC ever failed");
}

/// On the planned path, a session's meta stays through later events that carry none (a
/// heartbeat rewrites the record's version and keeps what follows it), and a `leave` clears it;
/// each step's outcome is the script's.
#[test]
fn meta_survives_refreshes_on_the_planned_path() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut con = server.con().await;
        let client = redis::Client::open(server.url()).expect("client");
        let planned = Applier::new(Keys::new("p"), 600_000, 90_000)
            .with_planned_path(client, Duration::from_secs(5));
        let scripted = Applier::new(Keys::new("s"), 600_000, 90_000);
        let ev = |i: u64, kind: EventType, meta: Option<Meta>| {
            let event = Event {
                v: 1,
                id: format!("e{i}"),
                kind,
                doc: "d0".into(),
                user: "u0".into(),
                session: Some("tab".into()),
                seq: None,
                ts: None,
                meta,
            };
            (StreamId::new(1_700_000_000_000 + i, 0), event)
        };
        let named = Some(Meta::from([("name".to_owned(), "Ada".to_owned())]));
        let steps = [
            ev(1, EventType::Join, named.clone()),
            ev(2, EventType::Heartbeat, None),
            ev(3, EventType::Heartbeat, None),
            ev(4, EventType::Leave, None),
            ev(5, EventType::Join, None),
        ];
        let meta_after = [true, true, true, false, false];
        for (step, has_meta) in steps.iter().zip(meta_after) {
            let docs = coalesce(std::slice::from_ref(step));
            let a = planned.apply(&mut con, &docs).await.expect("apply");
            let b = scripted.apply(&mut con, &docs).await.expect("apply");
            assert_eq!(a, b, "outcomes of {step:?}");
            for prefix in ["p", "s"] {
                let state = inspect(&mut con, &Keys::new(prefix), "d0")
                    .await
                    .expect("inspect");
                let meta = &state.sessions[0].meta;
                assert_eq!(
                    meta.is_some(),
                    has_meta,
                    "{prefix} after {step:?}: {meta:?}"
                );
                if has_meta {
                    assert_eq!(meta, &named);
                }
            }
        }
        assert_eq!(planned.planned_stats().map(|(n, _)| n), Some(5));
    });
}
