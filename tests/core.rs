//! Core semantics against a real redis-server: membership, idempotence, ordering, flat entries,
//! dead letters, pending replay.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, wait_drained, RedisServer, RunningWorker};
use presence_worker::connection::Conn;
use presence_worker::inspect::{inspect, DocState};
use presence_worker::keys::Keys;
use presence_worker::{Event, EventType, Producer};

const STREAM: &str = "sessions:events";
const GROUP: &str = "presence";

fn ev(kind: EventType, doc: &str, user: &str, session: Option<&str>) -> Event {
    let mut e = Event::new(kind, doc, user);
    e.session = session.map(str::to_owned);
    e
}

async fn state(con: &mut Conn, doc: &str) -> DocState {
    inspect(con, &Keys::new("sessions"), doc)
        .await
        .expect("inspect")
}

/// Runs one worker until everything published so far is applied, then stops it.
async fn drain(server: &RedisServer) -> RunningWorker {
    let w = RunningWorker::spawn(config(server, "w1"));
    wait_drained(&mut server.con().await, STREAM, GROUP).await;
    w
}

async fn publish(server: &RedisServer, events: &[Event]) {
    let mut p = Producer::connect(&server.url(), STREAM)
        .await
        .expect("producer");
    for e in events {
        p.publish(e).await.expect("publish");
    }
}

#[tokio::test]
async fn two_tabs_keep_a_user_present_until_the_last_closes() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut join1 = ev(EventType::Join, "42", "alice", Some("tab1"));
    join1.meta = Some([("name".to_owned(), "Alice".to_owned())].into());
    publish(
        &server,
        &[join1, ev(EventType::Join, "42", "alice", Some("tab2"))],
    )
    .await;
    let w = drain(&server).await;
    let s = state(&mut con, "42").await;
    assert_eq!(s.users, vec!["alice"]);
    assert_eq!(s.count, Some(1));
    let tab1 = s
        .live_sessions()
        .find(|x| x.session == "tab1")
        .expect("tab1 live");
    assert_eq!(
        tab1.meta
            .as_ref()
            .and_then(|m| m.get("name"))
            .map(String::as_str),
        Some("Alice")
    );
    assert_eq!(s.live_sessions().count(), 2);

    publish(
        &server,
        &[ev(EventType::Leave, "42", "alice", Some("tab1"))],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    let s = state(&mut con, "42").await;
    assert_eq!(
        (s.users.clone(), s.count),
        (vec!["alice".to_owned()], Some(1))
    );
    assert_eq!(
        s.live_sessions()
            .map(|x| x.session.as_str())
            .collect::<Vec<_>>(),
        ["tab2"]
    );

    publish(
        &server,
        &[ev(EventType::Leave, "42", "alice", Some("tab2"))],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    let s = state(&mut con, "42").await;
    assert!(s.users.is_empty());
    assert_eq!(s.count, None, "count key is removed when nobody is present");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("sessions:doc:{42}:users")
        .arg("sessions:doc:{42}:count")
        .arg("sessions:doc:{42}:live")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    w.stop().await;
}

#[tokio::test]
async fn heartbeat_makes_live_and_meta_survives_heartbeats_but_not_leave() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut join = ev(EventType::Join, "d", "u", None);
    join.meta = Some([("color".to_owned(), "red".to_owned())].into());
    publish(
        &server,
        &[
            ev(EventType::Heartbeat, "d2", "v", None),
            join.clone(),
            ev(EventType::Heartbeat, "d", "u", None),
        ],
    )
    .await;
    let w = drain(&server).await;
    assert_eq!(state(&mut con, "d2").await.users, ["v"]);
    let s = state(&mut con, "d").await;
    let sess = s.live_sessions().next().expect("live");
    assert_eq!(
        sess.session, "u",
        "no session id means the user's single session"
    );
    assert_eq!(sess.meta.as_ref().unwrap()["color"], "red");
    publish(
        &server,
        &[
            ev(EventType::Leave, "d", "u", None),
            ev(EventType::Join, "d", "u", None),
        ],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    let s = state(&mut con, "d").await;
    assert_eq!(s.users, ["u"]);
    assert_eq!(
        s.live_sessions().next().unwrap().meta,
        None,
        "leave clears meta"
    );
    w.stop().await;
}

#[tokio::test]
async fn redelivery_and_group_replay_change_nothing() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut events = Vec::new();
    for i in 0..300 {
        let kind = [EventType::Join, EventType::Heartbeat, EventType::Leave][i % 3];
        events.push(ev(
            kind,
            &format!("doc{}", i % 7),
            &format!("u{}", i % 11),
            Some(&format!("t{}", i % 2)),
        ));
    }
    publish(&server, &events).await;
    let w = drain(&server).await;
    let docs: Vec<String> = (0..7).map(|d| format!("doc{d}")).collect();
    let mut before = Vec::new();
    for d in &docs {
        before.push(state(&mut con, d).await);
    }
    let applied = w.stats.applied.load(Ordering::Relaxed);
    // Replay the whole group from the start: every entry is delivered again.
    common::replay_group(&mut con, STREAM, GROUP).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    for (d, b) in docs.iter().zip(&before) {
        assert_eq!(&state(&mut con, d).await, b, "replay changed {d}");
    }
    let stats = &w.stats;
    assert_eq!(
        stats.applied.load(Ordering::Relaxed),
        applied,
        "replay applied nothing"
    );
    assert_eq!(
        stats.duplicate.load(Ordering::Relaxed) + stats.stale.load(Ordering::Relaxed),
        300,
        "every replayed entry is recognised as already applied"
    );
    w.stop().await;
}

#[tokio::test]
async fn duplicate_appends_are_harmless() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let join = ev(EventType::Join, "d", "alice", Some("t"));
    let leave_b = ev(EventType::Leave, "d", "bob", None);
    let join_b = ev(EventType::Join, "d", "bob", None);
    // A producer retry appends the same event again right after the original.
    publish(
        &server,
        &[join.clone(), join.clone(), join_b, leave_b.clone(), leave_b],
    )
    .await;
    let w = drain(&server).await;
    let s = state(&mut con, "d").await;
    assert_eq!(s.users, ["alice"]);
    assert_eq!(s.count, Some(1));
    assert!(w.stats.duplicate.load(Ordering::Relaxed) >= 2);
    w.stop().await;
}

#[tokio::test]
async fn seq_orders_events_appended_out_of_order() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let with_seq = |kind, seq| {
        let mut e = ev(kind, "d", "alice", Some("t1"));
        e.seq = Some(seq);
        e
    };
    // Appended in the order 3, 1, 2: the leave (seq 3) wins.
    publish(
        &server,
        &[
            with_seq(EventType::Leave, 3),
            with_seq(EventType::Join, 1),
            with_seq(EventType::Heartbeat, 2),
        ],
    )
    .await;
    let w = drain(&server).await;
    assert!(state(&mut con, "d").await.users.is_empty());
    assert_eq!(w.stats.stale.load(Ordering::Relaxed), 2);
    // An equal seq is stale too; a higher one applies.
    publish(&server, &[with_seq(EventType::Join, 3)]).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert!(state(&mut con, "d").await.users.is_empty());
    publish(&server, &[with_seq(EventType::Join, 4)]).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    let s = state(&mut con, "d").await;
    assert_eq!(s.users, ["alice"]);
    assert_eq!(s.sessions[0].seq.as_deref(), Some("4"));
    w.stop().await;
}

#[tokio::test]
async fn flat_field_entries_work_like_redis_cli() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let xadd = |fields: &[&str]| {
        let mut c = redis::cmd("XADD");
        c.arg(STREAM).arg("*").arg(fields);
        c
    };
    let _: String = xadd(&[
        "type", "join", "doc", "42", "user", "alice", "session", "tab1",
    ])
    .query_async(&mut con)
    .await
    .unwrap();
    let _: String = xadd(&[
        "type",
        "join",
        "doc",
        "42",
        "user",
        "bob",
        "seq",
        "7",
        "meta.name",
        "Bob",
    ])
    .query_async(&mut con)
    .await
    .unwrap();
    let _: String = xadd(&["type", "leave", "doc", "42", "user", "bob", "seq", "6"])
        .query_async(&mut con)
        .await
        .unwrap();
    let w = drain(&server).await;
    let s = state(&mut con, "42").await;
    assert_eq!(s.users, ["alice", "bob"]);
    let bob = s.live_sessions().find(|x| x.user == "bob").unwrap();
    assert_eq!(bob.meta.as_ref().unwrap()["name"], "Bob");
    assert_eq!(bob.seq.as_deref(), Some("7"));
    let alice = s.live_sessions().find(|x| x.user == "alice").unwrap();
    assert_eq!(
        alice.event_id_hash,
        presence_worker::apply::id_hash(&alice.entry_id),
        "the flat form's id defaults to the entry id"
    );
    w.stop().await;
}

#[tokio::test]
async fn every_kind_of_bad_entry_is_dead_lettered_while_neighbours_apply() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let good = |u: &str| ev(EventType::Join, "ok", u, None).encode().unwrap();
    let msgpack = |pairs: Vec<(&str, rmpv::Value)>| {
        let map = rmpv::Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).unwrap();
        out
    };
    let base = |extra: Vec<(&'static str, rmpv::Value)>| {
        let mut p: Vec<(&str, rmpv::Value)> = vec![
            ("v", 1.into()),
            ("id", "x".into()),
            ("type", "join".into()),
            ("doc", "ok".into()),
            ("user", "z".into()),
        ];
        for (k, v) in extra {
            p.retain(|(kk, _)| *kk != k);
            if !matches!(v, rmpv::Value::Nil) {
                p.push((k, v));
            }
        }
        msgpack(p)
    };
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("not valid MessagePack", b"\x85\xa1v".to_vec()),
        ("not a MessagePack map", {
            let mut v = Vec::new();
            rmpv::encode::write_value(&mut v, &rmpv::Value::Array(vec![1.into(), "x".into()]))
                .unwrap();
            v
        }),
        (
            "missing field `user`",
            base(vec![("user", rmpv::Value::Nil)]),
        ),
        ("missing field `doc`", base(vec![("doc", rmpv::Value::Nil)])),
        ("missing field `id`", base(vec![("id", rmpv::Value::Nil)])),
        ("missing field `v`", base(vec![("v", rmpv::Value::Nil)])),
        (
            "field `doc` is not a UTF-8 string",
            base(vec![("doc", 5.into())]),
        ),
        (
            "field `seq` is not an integer",
            base(vec![("seq", "3".into())]),
        ),
        ("unknown event type", base(vec![("type", "jump".into())])),
        ("unsupported schema version", base(vec![("v", 2.into())])),
        ("field `user` is empty", base(vec![("user", "".into())])),
        (
            "field `doc` contains a control character",
            base(vec![("doc", "a\nb".into())]),
        ),
        ("more than 128", base(vec![("id", "i".repeat(129).into())])),
        (
            "more than 256",
            base(vec![("user", "u".repeat(257).into())]),
        ),
    ];
    let mut expected = Vec::new();
    for (i, (reason, payload)) in bad.iter().enumerate() {
        let _: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("e")
            .arg(good(&format!("g{i}")))
            .query_async(&mut con)
            .await
            .unwrap();
        let id: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("e")
            .arg(payload)
            .arg("note")
            .arg(i)
            .query_async(&mut con)
            .await
            .unwrap();
        expected.push((id, *reason));
    }
    // Flat-form failures.
    for (fields, reason) in [
        (vec!["type", "join", "doc", "ok"], "missing field `user`"),
        (
            vec!["type", "sleep", "doc", "ok", "user", "q"],
            "unknown event type",
        ),
        (
            vec!["type", "join", "doc", "ok", "user", "q", "seq", "-1"],
            "field `seq`",
        ),
        (vec!["hello", "world"], "not a presence event"),
    ] {
        let id: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg(&fields)
            .query_async(&mut con)
            .await
            .unwrap();
        expected.push((id, reason));
    }
    let w = drain(&server).await;
    let s = state(&mut con, "ok").await;
    let want: BTreeSet<String> = (0..bad.len()).map(|i| format!("g{i}")).collect();
    assert_eq!(
        s.users.iter().cloned().collect::<BTreeSet<_>>(),
        want,
        "good neighbours applied"
    );
    let dead = common::xrange(&mut con, "sessions:events:dead").await;
    assert_eq!(dead.len(), expected.len());
    for (id, reason) in &expected {
        let (_, fields) = dead
            .iter()
            .find(|(_, f)| f.iter().any(|(k, v)| k == "entry_id" && v == id.as_bytes()))
            .unwrap_or_else(|| panic!("no dead letter for {id} ({reason})"));
        let error = fields
            .iter()
            .find(|(k, _)| k == "error")
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap();
        assert!(
            error.contains(reason),
            "dead letter of {id}: error {error:?} should mention {reason:?}"
        );
    }
    // The original fields are kept.
    let first = dead
        .iter()
        .find(|(_, f)| {
            f.iter()
                .any(|(k, v)| k == "entry_id" && v == expected[0].0.as_bytes())
        })
        .unwrap();
    assert!(first.1.iter().any(|(k, v)| k == "e" && v == &bad[0].1));
    assert!(first.1.iter().any(|(k, v)| k == "note" && v == b"0"));
    assert_eq!(
        w.stats.dead_lettered.load(Ordering::Relaxed),
        expected.len() as u64
    );
    w.stop().await;
}

#[tokio::test]
async fn a_restarted_replica_first_replays_its_own_pending_entries() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    publish(
        &server,
        &[
            ev(EventType::Join, "d", "a", None),
            ev(EventType::Join, "d", "b", None),
        ],
    )
    .await;
    // A replica named w1 read these and crashed before applying them.
    common::create_group(&mut con, STREAM, GROUP).await;
    let read = common::read_as(&mut con, STREAM, GROUP, "w1", 10).await;
    assert_eq!(read.len(), 2);
    assert_eq!(
        common::group_pending_lag(&mut con, STREAM, GROUP).await,
        (2, 0)
    );
    assert!(state(&mut con, "d").await.users.is_empty());
    // Restarted under the same name, it applies them although nothing new arrives.
    let w = drain(&server).await;
    assert_eq!(state(&mut con, "d").await.users, ["a", "b"]);
    assert_eq!(w.stats.applied.load(Ordering::Relaxed), 2);
    w.stop().await;
}

/// Someone else wrote a key of the wrong type under our layout: `doc`'s users key is a string.
async fn wrong_type_users_key(con: &mut Conn, doc: &str) {
    let _: () = redis::cmd("SET")
        .arg(Keys::new("sessions").doc(doc).users)
        .arg("x")
        .query_async(con)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_document_redis_refuses_is_dead_lettered_and_others_still_apply() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    // Someone else wrote a key of the wrong type under our layout.
    wrong_type_users_key(&mut con, "broken").await;
    publish(
        &server,
        &[
            ev(EventType::Join, "broken", "a", None),
            ev(EventType::Join, "fine", "b", None),
        ],
    )
    .await;
    let w = drain(&server).await;
    assert_eq!(state(&mut con, "fine").await.users, ["b"]);
    let dead = common::xrange(&mut con, "sessions:events:dead").await;
    assert_eq!(dead.len(), 1);
    let error = String::from_utf8_lossy(&dead[0].1.iter().find(|(k, _)| k == "error").unwrap().1)
        .into_owned();
    assert!(
        error.contains("cannot apply") && error.contains("WRONGTYPE"),
        "{error}"
    );
    w.stop().await;
}

#[tokio::test]
async fn an_empty_document_leaves_no_keys_once_its_history_expires() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut cfg = config(&server, "w1");
    cfg.history = Duration::from_secs(1);
    let w = RunningWorker::spawn(cfg);
    publish(
        &server,
        &[
            ev(EventType::Join, "d", "a", Some("t")),
            ev(EventType::Leave, "d", "a", Some("t")),
        ],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sessions:doc:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "ordering history is kept for a while");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("sessions:doc:*")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(keys.is_empty(), "left behind: {keys:?}");
    w.stop().await;
}

#[tokio::test]
async fn ended_sessions_are_pruned_from_a_busy_document() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut cfg = config(&server, "w1");
    cfg.history = Duration::from_secs(1);
    // Without expiry: the worker still visits documents to prune them.
    cfg.session_ttl = Duration::ZERO;
    let w = RunningWorker::spawn(cfg);
    let mut events = vec![ev(EventType::Join, "d", "stays", None)];
    for i in 0..20 {
        events.push(ev(EventType::Join, "d", "tmp", Some(&format!("t{i}"))));
        events.push(ev(EventType::Leave, "d", "tmp", Some(&format!("t{i}"))));
    }
    publish(&server, &events).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(state(&mut con, "d").await.sessions.len(), 21);
    // The worker visits the document once the ended sessions are older than the history (plus an
    // eighth) and prunes them; the live one stays.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = state(&mut con, "d").await;
        if s.sessions.len() == 1 {
            assert_eq!(
                (s.sessions[0].user.as_str(), s.sessions[0].live),
                ("stays", true)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "history of ended sessions never pruned: {:?}",
            s.sessions
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.stop().await;
}

#[tokio::test]
async fn a_deleted_group_or_stream_is_created_again() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let w = drain(&server).await;
    let _: () = redis::cmd("DEL")
        .arg(STREAM)
        .query_async(&mut con)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish(&server, &[ev(EventType::Join, "d", "back", None)]).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(state(&mut con, "d").await.users, ["back"]);
    w.stop().await;
}

#[tokio::test]
async fn a_refused_document_in_a_multi_document_call_leaves_the_others_complete() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    // "m-broken" sorts after the others within one script call; its users key has the wrong type.
    wrong_type_users_key(&mut con, "m-broken").await;
    let mut events: Vec<Event> = (0..5)
        .map(|d| ev(EventType::Join, &format!("m{d}"), "u", None))
        .collect();
    events.push(ev(EventType::Join, "m-broken", "u", None));
    publish(&server, &events).await;
    let w = drain(&server).await;
    for d in 0..5 {
        assert_eq!(state(&mut con, &format!("m{d}")).await.users, ["u"]);
    }
    // The totals and the indexes count the five documents exactly once.
    let live = live_sessions(&mut con).await;
    assert_eq!(live, 5);
    let top: i64 = common::query(&mut con, &["ZCARD", "sessions:top"]).await;
    assert_eq!(top, 5);
    let due: i64 = common::query(&mut con, &["ZCARD", "sessions:expiry"]).await;
    assert_eq!(due, 5, "every document with live sessions can expire");
    assert_eq!(common::xlen(&mut con, "sessions:events:dead").await, 1);
    w.stop().await;
}

/// Session records written by an earlier version (MessagePack maps) are read as the same records:
/// inspected, repaired, compared with new events, expired, and rewritten in the current layout
/// when they change.
#[tokio::test]
async fn records_of_the_earlier_messagepack_layout_still_apply() {
    use presence_worker::apply::{id_hash, Applier, Outcome};
    use presence_worker::coalesce::coalesce;
    use presence_worker::event::encode_meta;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let meta: presence_worker::event::Meta = [("name".to_owned(), "Alice".to_owned())].into();
    // The state the earlier scripts left: alice (seq 7, meta) and bob (no seq, due to expire).
    let _: () = redis::Script::new(
        r#"
        local d = 'sessions:doc:{old}:'
        redis.call('HSET', d .. 'sessions',
          ARGV[1], cmsgpack.pack({l = 1, m = 1000, s = 5, q = '7', i = tonumber(ARGV[3]),
            mm = 1000, ms = 5, mq = '7', d = ARGV[5]}),
          ARGV[2], cmsgpack.pack({l = 1, m = 2000, s = 0, i = tonumber(ARGV[4])}))
        redis.call('SADD', d .. 'users', 'alice', 'bob')
        redis.call('SET', d .. 'count', 2)
        redis.call('HSET', d .. 'live', 'alice', 1, 'bob', 1)
        local t = redis.call('TIME')
        redis.call('ZADD', d .. 'alive', t[1] * 1000, ARGV[1], 0, ARGV[2])
        redis.call('HSET', 'sessions:stats', 'live_sessions', 2, 'present_users', 2)
        redis.call('ZADD', 'sessions:top', 2, 'old')
        redis.call('ZADD', 'sessions:expiry', 0, 'old')
        "#,
    )
    .arg("alice\x1ftab")
    .arg("bob\x1fbob")
    .arg(id_hash("ev-7"))
    .arg(id_hash("ev-b"))
    .arg(encode_meta(&meta))
    .invoke_async(&mut con)
    .await
    .unwrap();

    let report = presence_worker::ops::repair(
        &mut con,
        &Keys::new("sessions"),
        600_000,
        60_000,
        false,
        |_, _| {},
    )
    .await
    .unwrap();
    assert!(report.broken.is_empty(), "{:?}", report.broken);
    let s = state(&mut con, "old").await;
    assert_eq!(s.users, ["alice", "bob"]);
    let alice = &s.sessions[0];
    assert_eq!(
        (alice.live, alice.seq.as_deref(), alice.entry_id.as_str()),
        (true, Some("7"), "1000-5")
    );
    assert_eq!(alice.event_id_hash, id_hash("ev-7"));
    assert_eq!(alice.meta.as_ref(), Some(&meta));
    assert_eq!(s.sessions[1].entry_id, "2000-0");

    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    // One event of alice's session (seq, event id) in entry `ms`-0; its outcome.
    async fn apply_one(
        applier: &Applier,
        con: &mut Conn,
        ms: u64,
        kind: EventType,
        seq: u64,
        id: &str,
    ) -> Outcome {
        let mut e = ev(kind, "old", "alice", Some("tab"));
        e.seq = Some(seq);
        e.id = id.to_owned();
        let docs = coalesce(&[(StreamId::new(ms, 0), e)]);
        applier.apply(con, &docs).await.unwrap()[0].outcomes[0]
    }
    // The same seq in a later entry: stale, and the same event id: a duplicate.
    let heartbeat = EventType::Heartbeat;
    let outcome = apply_one(&applier, &mut con, 1001, heartbeat, 7, "ev-7").await;
    assert_eq!(outcome, Outcome::Duplicate);
    let outcome = apply_one(&applier, &mut con, 1002, heartbeat, 8, "ev-8").await;
    assert_eq!(outcome, Outcome::Applied);
    assert_current_layout(&mut con, "old", "alice", "tab").await;
    let s = state(&mut con, "old").await;
    let alice = &s.sessions[0];
    assert_eq!(
        (alice.live, alice.seq.as_deref(), alice.entry_id.as_str()),
        (true, Some("8"), "1002-0")
    );
    assert_eq!(alice.meta.as_ref(), Some(&meta), "meta kept");

    // Bob's legacy record expires; alice's leave then ends her session and clears her meta.
    assert_eq!(
        applier
            .expire(&mut con, &["old".to_owned()])
            .await
            .unwrap()
            .0,
        1
    );
    let outcome = apply_one(&applier, &mut con, 1003, EventType::Leave, 9, "ev-9").await;
    assert_eq!(outcome, Outcome::Applied);
    let s = state(&mut con, "old").await;
    assert!(s.users.is_empty() && s.count.is_none(), "{s:?}");
    let (alice, bob) = (&s.sessions[0], &s.sessions[1]);
    assert_eq!(
        (alice.live, alice.expired, &alice.meta),
        (false, false, &None)
    );
    assert_eq!((bob.live, bob.expired), (false, true));
    assert_eq!(bob.entry_id, "2000-0");
}

/// A visit prunes the sessions that ended more than the history ago, never a live one (also
/// one that ended long ago and came back), and sets the document's next due time.
#[tokio::test]
async fn a_visit_prunes_old_ended_sessions_but_never_a_live_one() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    // History 200 ms, no expiry.
    let applier = Applier::new(Keys::new("sessions"), 200, 0);
    for (ms, kind, user) in [
        (1, EventType::Join, "stays"),
        (2, EventType::Join, "back"),
        (3, EventType::Leave, "back"),
        (4, EventType::Join, "gone"),
        (5, EventType::Leave, "gone"),
    ] {
        let batch = [(StreamId::new(ms, 0), ev(kind, "d", user, None))];
        applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    }
    let due: Option<f64> = common::query(&mut con, &["ZSCORE", "sessions:expiry", "d"]).await;
    assert!(due.is_some(), "due for pruning once the history is old");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let batch = [(StreamId::new(6, 0), ev(EventType::Join, "d", "back", None))];
    applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    applier.expire(&mut con, &["d".to_owned()]).await.unwrap();
    let s = state(&mut con, "d").await;
    let kept: Vec<(&str, bool)> = s
        .sessions
        .iter()
        .map(|x| (x.user.as_str(), x.live))
        .collect();
    assert_eq!(kept, [("back", true), ("stays", true)]);
    let due: Option<f64> = common::query(&mut con, &["ZSCORE", "sessions:expiry", "d"]).await;
    assert_eq!(due, None, "nothing left to expire or prune");
}

/// One call may carry the same document twice (the API allows it): its totals and index entries
/// end as if the two updates had been applied one after the other.
#[tokio::test]
async fn a_document_twice_in_one_call_ends_as_if_applied_in_order() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    let update =
        |ms: u64, kind, doc: &str| coalesce(&[(StreamId::new(ms, 0), ev(kind, doc, "a", None))]);
    // "in": joined then left within the call; "out": left (nothing) then joined.
    let mut docs = update(1, EventType::Join, "in");
    docs.extend(update(2, EventType::Leave, "in"));
    docs.extend(update(3, EventType::Leave, "out"));
    docs.extend(update(4, EventType::Join, "out"));
    applier.apply(&mut con, &docs).await.unwrap();
    let zrange = |key: &'static str| {
        let mut con = con.clone();
        async move {
            let v: Vec<String> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut con)
                .await
                .unwrap();
            v
        }
    };
    assert_eq!(zrange("sessions:top").await, ["out"]);
    assert_eq!(zrange("sessions:expiry").await, ["out"]);
    let stats: Vec<i64> = redis::cmd("HMGET")
        .arg("sessions:stats")
        .arg("live_sessions")
        .arg("present_users")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(stats, [1, 1]);
    assert!(state(&mut con, "in").await.users.is_empty());
    assert_eq!(state(&mut con, "out").await.users, ["a"]);
}

/// A document Redis refuses fails the whole call with Redis's own error code (the worker tells
/// permanent errors from transient ones by it), and the documents before it keep their totals.
#[tokio::test]
async fn a_refused_document_fails_the_call_with_its_error_code() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    wrong_type_users_key(&mut con, "bad").await;
    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    let batch = [
        (StreamId::new(1, 0), ev(EventType::Join, "good", "a", None)),
        (StreamId::new(2, 0), ev(EventType::Join, "bad", "a", None)),
    ];
    let err = applier
        .apply(&mut con, &coalesce(&batch))
        .await
        .expect_err("the bad document is refused");
    // Not turned into a generic ERR (a ResponseError) on its way out of the script.
    let msg = err.to_string();
    assert!(
        msg.contains("WRONGTYPE") && !msg.contains("ResponseError"),
        "{msg}"
    );
    assert!(!err.is_transient());
    let live = live_sessions(&mut con).await;
    assert_eq!(live, 1);
    assert_eq!(state(&mut con, "good").await.users, ["a"]);
}

/// Redis server time, in ms.
async fn server_ms(con: &mut Conn) -> u64 {
    let now: (u64, u64) = redis::cmd("TIME").query_async(con).await.unwrap();
    now.0 * 1000 + now.1 / 1000
}

/// The live sessions over all documents, as the totals hash counts them.
async fn live_sessions(con: &mut Conn) -> i64 {
    common::query(con, &["HGET", "sessions:stats", "live_sessions"]).await
}

/// Asserts that the record of `user`'s `session` in `doc` was moved into the records hash, in the
/// current layout (its marker byte), and that the earlier versions' keys are gone.
async fn assert_current_layout(con: &mut Conn, doc: &str, user: &str, session: &str) {
    let k = Keys::new("sessions").doc(doc);
    let raw: Vec<u8> = redis::cmd("HGET")
        .arg(&k.records)
        .arg(user)
        .query_async(con)
        .await
        .unwrap();
    let (_, record) = presence_worker::inspect::entries(&raw)
        .find(|(sid, _)| *sid == session.as_bytes())
        .unwrap_or_else(|| panic!("no entry for {session:?} in {raw:?}"));
    assert_eq!(record[0], 0xC1, "rewritten in the current layout: {raw:?}");
    for old in [&k.sessions, &k.live, &k.alive, &k.ended] {
        let n: i64 = common::query(con, &["EXISTS", old]).await;
        assert_eq!(n, 0, "{old} deleted");
    }
}

/// Records of the binary layout without a time (the previous version's) still apply: their time
/// is their score in `:alive`, so a silent one expires and a refreshed one is rewritten with its
/// time in the current layout and stays.
#[tokio::test]
async fn records_without_a_time_expire_by_their_index_score() {
    use presence_worker::apply::{id_hash, Applier};
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    // flags 1 (live), stream id 3000-0, event id hash: the layout the previous version wrote.
    let v2 = |ms: u64, id: &str| {
        let mut r = vec![1u8];
        r.extend_from_slice(&ms.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&id_hash(id).to_be_bytes());
        r
    };
    let now_ms = server_ms(&mut con).await;
    let _: () = redis::pipe()
        .hset("sessions:doc:{v2}:sessions", "silent\x1fs", v2(3000, "a"))
        .hset("sessions:doc:{v2}:sessions", "busy\x1fb", v2(3001, "b"))
        .sadd("sessions:doc:{v2}:users", &["silent", "busy"])
        .set("sessions:doc:{v2}:count", 2)
        .hset("sessions:doc:{v2}:live", "silent", 1)
        .hset("sessions:doc:{v2}:live", "busy", 1)
        .zadd("sessions:doc:{v2}:alive", "silent\x1fs", 1000)
        .zadd("sessions:doc:{v2}:alive", "busy\x1fb", now_ms)
        .hset("sessions:stats", "live_sessions", 2)
        .hset("sessions:stats", "present_users", 2)
        .zadd("sessions:top", "v2", 2)
        .zadd("sessions:expiry", "v2", 0)
        .query_async(&mut con)
        .await
        .unwrap();
    let s = state(&mut con, "v2").await;
    assert_eq!(s.users, ["busy", "silent"]);
    assert_eq!(s.sessions[0].last_change_ms, Some(now_ms as i64), "{s:?}");

    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    let mut hb = ev(EventType::Heartbeat, "v2", "busy", Some("b"));
    hb.id = "c".into();
    let docs = coalesce(&[(StreamId::new(now_ms, 0), hb)]);
    applier.apply(&mut con, &docs).await.unwrap();
    assert_current_layout(&mut con, "v2", "busy", "b").await;

    let (expired, _) = applier.expire(&mut con, &["v2".to_owned()]).await.unwrap();
    assert_eq!(expired, 1);
    let old_index: i64 = common::query(&mut con, &["EXISTS", "sessions:doc:{v2}:alive"]).await;
    assert_eq!(old_index, 0, "the visit moved the times into the records");
    let s = state(&mut con, "v2").await;
    assert_eq!(s.users, ["busy"]);
    assert_eq!(s.count, Some(1));
    let silent = &s.sessions[1];
    assert_eq!((silent.live, silent.expired), (false, true));
    assert!(s.sessions[0].last_change_ms >= Some(now_ms as i64));
}

/// A session that fails in the middle of a document's step (a damaged record someone else wrote)
/// leaves the sessions before it applied exactly once: their records are written with the
/// membership they changed, so a retry finds them done.
#[tokio::test]
async fn a_session_failing_midway_leaves_the_ones_before_it_applied_once() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let records = Keys::new("sessions").doc("d").records;
    // b's entry for session b: a one-byte record, too short for any layout.
    let damaged = b"\x00\x01\x00\x01b\x01";
    let _: () = redis::cmd("HSET")
        .arg(&records)
        .arg("b")
        .arg(&damaged[..])
        .query_async(&mut con)
        .await
        .unwrap();
    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    let batch = [
        (StreamId::new(1, 0), ev(EventType::Join, "d", "a", None)),
        (StreamId::new(2, 0), ev(EventType::Join, "d", "b", None)),
    ];
    let docs = coalesce(&batch);
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0].sessions.len(), 2, "one step of two sessions");
    for _ in 0..2 {
        let err = applier.apply(&mut con, &docs).await.expect_err("b fails");
        assert!(err.to_string().contains("too short"), "{err}");
    }
    assert_eq!(
        live_sessions(&mut con).await,
        1,
        "a's join counted once over two attempts"
    );
    assert_eq!(state(&mut con, "d").await.users, ["a"]);
    // Once the damaged record is gone, b applies, and a is not counted again.
    let _: () = common::query(&mut con, &["HDEL", &records, "b"]).await;
    applier.apply(&mut con, &docs).await.unwrap();
    assert_eq!(live_sessions(&mut con).await, 2);
    assert_eq!(state(&mut con, "d").await.users, ["a", "b"]);
}

async fn encoding(con: &mut Conn, doc: &str) -> String {
    let k = Keys::new("sessions").doc(doc);
    common::query(con, &["OBJECT", "ENCODING", &k.records]).await
}

/// The live sessions of `user` in `s`.
fn live_tabs(s: &DocState, user: &str) -> usize {
    s.live_sessions().filter(|x| x.user == user).count()
}

/// A document of 64 present users or more keeps its records hash as a hash table (linear scans
/// of a listpack of hundreds of fields cost Redis more than the rest of the step), a small one
/// keeps a listpack, no trace of the conversion is left, and the state is exact, also once a
/// reload has made the large document's hash a listpack again.
#[tokio::test]
async fn a_large_document_keeps_its_hashes_as_hash_tables() {
    let server = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "local",
    ]);
    let mut con = server.con().await;
    let big = Keys::new("sessions").doc("big");
    let mut events = Vec::new();
    for u in 0..70 {
        events.push(ev(EventType::Join, "big", &format!("u{u}"), Some("a")));
    }
    events.push(ev(EventType::Join, "big", "u0", Some("b")));
    events.push(ev(EventType::Leave, "big", "u1", Some("a")));
    for u in 0..5 {
        events.push(ev(EventType::Join, "small", &format!("u{u}"), None));
    }
    publish(&server, &events).await;
    let w = drain(&server).await;
    assert_eq!(encoding(&mut con, "big").await, "hashtable");
    assert_eq!(encoding(&mut con, "small").await, "listpack");
    let s = state(&mut con, "big").await;
    let mut want: Vec<String> = (0..70)
        .filter(|&u| u != 1)
        .map(|u| format!("u{u}"))
        .collect();
    want.sort();
    assert_eq!(s.users, want);
    assert_eq!(s.count, Some(69));
    assert_eq!(s.sessions.len(), 71, "70 first tabs and u0's second");
    assert_eq!(live_tabs(&s, "u0"), 2, "u0 has two live tabs");
    let pad: bool = common::query(&mut con, &["HEXISTS", &big.records, "\x1f"]).await;
    assert!(!pad, "the conversion leaves no field behind");

    // A reload loads hashes this small as listpacks; the next session to go live converts them
    // again, and membership stays exact.
    let _: () = common::query(&mut con, &["DEBUG", "RELOAD"]).await;
    assert_eq!(encoding(&mut con, "big").await, "listpack");
    publish(
        &server,
        &[
            ev(EventType::Leave, "big", "u0", Some("a")),
            ev(EventType::Join, "big", "u1", Some("a")),
        ],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(encoding(&mut con, "big").await, "hashtable");
    let s = state(&mut con, "big").await;
    assert_eq!(s.count, Some(70));
    assert_eq!(live_tabs(&s, "u0"), 1, "u0 has one live tab left");
    w.stop().await;
}

/// A document the previous version wrote (a sessions hash of one field per session in the current
/// record layout, a live hash of per-user counts) moves into the records hash the first time a
/// step touches it, ordering history included: a redelivered event older than an ended session's
/// leave stays stale, a user with a second live tab stays present when one closes, and a
/// document nobody is in keeps its history's TTL.
#[tokio::test]
async fn a_document_of_the_previous_version_moves_into_the_records_hash() {
    use presence_worker::apply::{id_hash, Applier};
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let now_ms = server_ms(&mut con).await;
    // Marker, flags (1: live), time (u48), stream id ms (u64) and sequence (u32), id hash.
    let record = |live: bool, ms: u64, id: &str| {
        let mut r = vec![0xC1, u8::from(live)];
        r.extend_from_slice(&now_ms.to_be_bytes()[2..]);
        r.extend_from_slice(&ms.to_be_bytes());
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&id_hash(id).to_be_bytes());
        r
    };
    let (prev, gone) = (
        Keys::new("sessions").doc("prev"),
        Keys::new("sessions").doc("gone"),
    );
    let _: () = redis::pipe()
        .hset(&prev.sessions, "alice\x1fa", record(true, 5000, "a1"))
        .hset(&prev.sessions, "alice\x1fb", record(true, 5001, "a2"))
        .hset(&prev.sessions, "bob\x1fb", record(false, 6000, "b1"))
        .hset(&prev.live, "alice", 2)
        .sadd(&prev.users, "alice")
        .set(&prev.count, 1)
        .zadd("sessions:expiry", "prev", now_ms + 60_000)
        .hset(&gone.sessions, "carol\x1fc", record(false, 7000, "c1"))
        .pexpire(&gone.sessions, 600_000)
        .hset("sessions:stats", "live_sessions", 2)
        .hset("sessions:stats", "present_users", 1)
        .query_async(&mut con)
        .await
        .unwrap();
    let before = state(&mut con, "prev").await;
    assert_eq!(before.sessions.len(), 3, "inspect reads the earlier layout");
    // repair reads it too: consistent, and a dry run moves nothing.
    let keys = Keys::new("sessions");
    let report = presence_worker::ops::repair(&mut con, &keys, 600_000, 60_000, false, |_, _| {})
        .await
        .unwrap();
    assert_eq!(
        (report.documents, report.broken.len()),
        (2, 0),
        "{report:?}"
    );
    let old: i64 = common::query(&mut con, &["EXISTS", &prev.sessions]).await;
    assert_eq!(old, 1);

    let applier = Applier::new(Keys::new("sessions"), 600_000, 60_000);
    let batch = [
        // Older than bob's leave (6000-0): stale.
        (
            StreamId::new(5999, 0),
            ev(EventType::Join, "prev", "bob", Some("b")),
        ),
        // Alice closes one of her two tabs.
        (
            StreamId::new(5500, 0),
            ev(EventType::Leave, "prev", "alice", Some("a")),
        ),
        // Older than carol's leave (7000-0): stale.
        (
            StreamId::new(6999, 0),
            ev(EventType::Join, "gone", "carol", Some("c")),
        ),
    ];
    let applied = applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    use presence_worker::apply::Outcome::{Applied, Stale};
    let outcomes: Vec<_> = applied.iter().map(|a| a.outcomes.clone()).collect();
    assert_eq!(outcomes, [vec![Stale, Applied], vec![Stale]]);

    let s = state(&mut con, "prev").await;
    assert_eq!(s.users, ["alice"]);
    assert_eq!(s.count, Some(1));
    let tabs: Vec<(&str, &str, bool)> = s
        .sessions
        .iter()
        .map(|x| (x.user.as_str(), x.session.as_str(), x.live))
        .collect();
    assert_eq!(
        tabs,
        [
            ("alice", "a", false),
            ("alice", "b", true),
            ("bob", "b", false)
        ]
    );
    assert_eq!(
        s.sessions[2].entry_id, "6000-0",
        "bob's leave still decides"
    );
    assert_current_layout(&mut con, "prev", "bob", "b").await;
    assert_current_layout(&mut con, "gone", "carol", "c").await;
    let g = state(&mut con, "gone").await;
    assert!(g.users.is_empty() && g.count.is_none(), "{g:?}");
    let ttl: i64 = common::query(&mut con, &["PTTL", &gone.records]).await;
    assert!(
        ttl > 0 && ttl <= 600_000,
        "the history keeps its TTL: {ttl}"
    );
    assert_eq!(live_sessions(&mut con).await, 1);
    let present: i64 = common::query(&mut con, &["HGET", "sessions:stats", "present_users"]).await;
    assert_eq!(present, 1);
}

/// The benchmark's per-event baseline: `with_docs_per_call(1)` calls the script once per
/// document (the default puts up to 64 in a call) and leaves the same state.
#[tokio::test]
async fn one_script_call_per_document_when_asked_with_the_same_result() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    // Joins of u0..u99 in d0..d39; every tenth event from the 40th on is instead a leave of
    // the user who joined that document 40 events before.
    let mut expected = vec![std::collections::BTreeSet::new(); 40];
    let batch: Vec<(StreamId, Event)> = (0..100)
        .map(|i| {
            let d = (i % 40) as usize;
            let e = if i >= 40 && i % 10 == 9 {
                expected[d].remove(&format!("u{}", i - 40));
                ev(
                    EventType::Leave,
                    &format!("d{d}"),
                    &format!("u{}", i - 40),
                    None,
                )
            } else {
                expected[d].insert(format!("u{i}"));
                ev(EventType::Join, &format!("d{d}"), &format!("u{i}"), None)
            };
            (StreamId::new(1000 + i, 0), e)
        })
        .collect();
    let docs = coalesce(&batch);
    assert_eq!(docs.len(), 40);
    let mut calls = Vec::new();
    for (prefix, per_call) in [("batched", None), ("each", Some(1))] {
        let mut applier = Applier::new(Keys::new(prefix), 600_000, 0);
        if let Some(n) = per_call {
            applier = applier.with_docs_per_call(n);
        }
        applier.load(&mut con).await.unwrap();
        let _: () = common::query(&mut con, &["CONFIG", "RESETSTAT"]).await;
        let applied = applier.apply(&mut con, &docs).await.unwrap();
        assert_eq!(applied.len(), docs.len());
        let stats: String = common::query(&mut con, &["INFO", "commandstats"]).await;
        let evalsha = stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|l| l.split(',').next())
            .and_then(|n| n.parse::<u64>().ok())
            .expect("evalsha calls");
        calls.push(evalsha);
    }
    assert_eq!(
        calls,
        [1, 40],
        "script calls: batched, then one per document"
    );
    for (d, users) in expected.iter().enumerate() {
        let doc = format!("d{d}");
        let want: Vec<String> = users.iter().cloned().collect();
        for prefix in ["batched", "each"] {
            let s = inspect(&mut con, &Keys::new(prefix), &doc).await.unwrap();
            assert_eq!(s.users, want, "{prefix}: document {doc}");
        }
    }
}

/// A user's sessions whose ids overlap (one the start of another, one inside another) are each
/// found as themselves: the script finds a session among the user's entries by where its id
/// occurs, and an occurrence that is not an entry's own id must not be taken for it.
#[tokio::test]
async fn overlapping_session_ids_of_one_user_stay_apart() {
    use presence_worker::apply::Applier;
    use presence_worker::coalesce::coalesce;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let applier = Applier::new(Keys::new("sessions"), 600_000, 0);
    let ids = ["tab1", "t", "ta", "tab", "ab", "b", "1"];
    let mut ms = 1000;
    let mut step = |events: Vec<(EventType, &str)>| {
        events
            .into_iter()
            .map(|(kind, s)| {
                ms += 1;
                (StreamId::new(ms, 0), ev(kind, "d", "u", Some(s)))
            })
            .collect::<Vec<_>>()
    };
    let joins = step(ids.iter().map(|s| (EventType::Join, *s)).collect());
    applier.apply(&mut con, &coalesce(&joins)).await.unwrap();
    // One by one, then in one batch: each finds its own entry among the others.
    for (kind, s) in [(EventType::Leave, "ta"), (EventType::Heartbeat, "t")] {
        let one = step(vec![(kind, s)]);
        applier.apply(&mut con, &coalesce(&one)).await.unwrap();
    }
    let batch = step(vec![
        (EventType::Leave, "b"),
        (EventType::Leave, "1"),
        (EventType::Join, "ta"),
        (EventType::Leave, "tab"),
    ]);
    applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    let s = state(&mut con, "d").await;
    let got: Vec<(&str, bool)> = s
        .sessions
        .iter()
        .map(|x| (x.session.as_str(), x.live))
        .collect();
    assert_eq!(
        got,
        [
            ("1", false),
            ("ab", true),
            ("b", false),
            ("t", true),
            ("ta", true),
            ("tab", false),
            ("tab1", true)
        ]
    );
    assert_eq!(s.users, ["u"]);
}

#[tokio::test]
async fn refreshes_of_sessions_with_seq_or_meta_keep_the_rest_of_the_record() {
    use presence_worker::apply::{Applier, Outcome};
    use presence_worker::coalesce::coalesce;
    use presence_worker::event::Meta;
    use presence_worker::StreamId;

    let server = RedisServer::start();
    let mut con = server.con().await;
    let applier = Applier::new(Keys::new("sessions"), 600_000, 0);
    let meta = |name: &str| -> Meta { [("name".to_owned(), name.to_owned())].into() };
    // One event of user u's session `s` in entry `ms`-`i` (i: its place in the batch).
    let event = |kind: EventType, s: &str, seq: Option<u64>, id: &str, meta: Option<Meta>| {
        let mut e = ev(kind, "d", "u", Some(s));
        e.seq = seq;
        e.id = id.to_owned();
        e.meta = meta;
        e
    };
    let batch = |ms: u64, events: Vec<Event>| -> Vec<(StreamId, Event)> {
        (0..).map(|i| StreamId::new(ms, i)).zip(events).collect()
    };
    let join = EventType::Join;
    let beat = EventType::Heartbeat;
    // Three sessions of one user, so one value holds their entries one after the other: with
    // seq and meta, with meta, with seq.
    let joins = batch(
        1000,
        vec![
            event(join, "a", Some(5), "a5", Some(meta("A"))),
            event(join, "b", None, "b1", Some(meta("B"))),
            event(join, "c", Some(1), "c1", None),
        ],
    );
    applier.apply(&mut con, &coalesce(&joins)).await.unwrap();
    let before = server_ms(&mut con).await;
    let beats = batch(
        2000,
        vec![
            event(beat, "a", Some(7), "a7", None),
            event(beat, "b", None, "b2", None),
            event(beat, "c", Some(2), "c2", None),
        ],
    );
    let applied = applier.apply(&mut con, &coalesce(&beats)).await.unwrap();
    assert_eq!(applied[0].outcomes, [Outcome::Applied; 3]);
    // Lower seq in a later entry: stale; equal seq in a later entry: stale (the earlier copy
    // wins); without seq, the same event appended again wins as the later entry and is counted
    // a duplicate.
    let late = batch(
        3000,
        vec![
            event(beat, "a", Some(6), "a6", None),
            event(beat, "c", Some(2), "c2-again", None),
            event(beat, "b", None, "b2", None),
        ],
    );
    let applied = applier.apply(&mut con, &coalesce(&late)).await.unwrap();
    assert_eq!(
        applied[0].outcomes,
        [Outcome::Stale, Outcome::Stale, Outcome::Duplicate]
    );
    // With seq, the same event appended again: the earlier copy stays, a duplicate.
    let again = batch(3001, vec![event(beat, "a", Some(7), "a7", None)]);
    let applied = applier.apply(&mut con, &coalesce(&again)).await.unwrap();
    assert_eq!(applied[0].outcomes, [Outcome::Duplicate]);

    let s = state(&mut con, "d").await;
    let got: Vec<_> = s
        .sessions
        .iter()
        .map(|x| {
            let name = x.meta.as_ref().map(|m| m["name"].as_str());
            (
                x.session.as_str(),
                x.live,
                x.seq.as_deref(),
                x.entry_id.as_str(),
                name,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a", true, Some("7"), "2000-0", Some("A")),
            ("b", true, None, "3000-2", Some("B")),
            ("c", true, Some("2"), "2000-2", None),
        ]
    );
    assert_eq!(
        s.sessions[0].event_id_hash,
        presence_worker::apply::id_hash("a7")
    );
    for x in &s.sessions {
        assert!(
            x.last_change_ms.unwrap() >= before as i64,
            "{x:?} refreshed"
        );
    }
    assert_eq!(s.users, ["u"]);

    // An event without seq after ones with: the later entry wins and the record has no seq.
    let plain = batch(4000, vec![event(beat, "c", None, "c3", None)]);
    let applied = applier.apply(&mut con, &coalesce(&plain)).await.unwrap();
    assert_eq!(applied[0].outcomes, [Outcome::Applied]);
    let s = state(&mut con, "d").await;
    assert_eq!(
        (
            s.sessions[2].seq.as_deref(),
            s.sessions[2].entry_id.as_str()
        ),
        (None, "4000-0")
    );
    assert_eq!(s.sessions[0].meta, Some(meta("A")));
}
