//! Hostile input against a real Redis: ids crafted to break key construction never reach
//! another document's keys or the worker's own keys; over-limit entries are dead-lettered with a
//! reason; the limits are flags.

mod common;

use std::collections::BTreeSet;

use common::{config, field, wait_drained, xlen, xrange, RedisServer, RunningWorker};
use presence_worker::inspect::inspect;
use presence_worker::keys::Keys;
use presence_worker::{Event, EventType, Producer};

const STREAM: &str = "sessions:events";

/// Appends a flat-form join of `user` to document `doc` (any bytes), with `extra` fields.
async fn xadd_join(
    con: &mut presence_worker::connection::Conn,
    doc: impl redis::ToRedisArgs,
    user: &str,
    extra: &[(String, String)],
) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(STREAM).arg("*").arg("type").arg("join");
    cmd.arg("doc").arg(doc).arg("user").arg(user);
    for (k, v) in extra {
        cmd.arg(k).arg(v);
    }
    let _: String = cmd.query_async(con).await.unwrap();
}

#[tokio::test]
async fn crafted_ids_touch_only_their_own_keys() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let keys = Keys::new("sessions");
    let mut p = Producer::connect(&server.url(), STREAM).await.unwrap();
    // The victim: document "a" with user "x".
    p.publish(&Event::new(EventType::Join, "a", "x"))
        .await
        .unwrap();
    let w = RunningWorker::spawn(config(&server, "w1"));
    wait_drained(&mut con, STREAM, "presence").await;
    let victim = inspect(&mut con, &keys, "a").await.unwrap();

    let crafted = [
        "a}",
        "a}:users",
        "{a",
        "{a}",
        "a:b",
        "*",
        "a b",
        "}x",
        "a}:count",
        "sessions:doc:{a}:users",
        "sessions",
        "sessions:expiry",
        "sessions:stats",
        "sessions:top",
        "?",
        "[a]",
        &"d".repeat(256),
    ];
    let mut valid = BTreeSet::new();
    for (i, doc) in crafted.iter().enumerate() {
        // Both forms: MessagePack through the library and flat fields by hand.
        let mut e = Event::new(EventType::Join, *doc, format!("u{i}}}:users"));
        e.session = Some("tab}{*".into());
        p.publish(&e).await.unwrap();
        xadd_join(&mut con, *doc, "x", &[]).await;
        valid.insert(doc.to_string());
    }
    // Invalid ids: dead-lettered with a reason.
    let invalid: Vec<(Vec<u8>, &str)> = vec![
        (b"a\nb".to_vec(), "control character"),
        ("d".repeat(257).into_bytes(), "more than 256"),
        (vec![0x61, 0xff, 0x62], "not valid UTF-8"),
        (Vec::new(), "is empty"),
        (b"a\x1fx".to_vec(), "control character"),
    ];
    for (doc, _) in &invalid {
        xadd_join(&mut con, doc, "x", &[]).await;
    }
    wait_drained(&mut con, STREAM, "presence").await;

    assert_eq!(
        inspect(&mut con, &keys, "a").await.unwrap(),
        victim,
        "document a untouched"
    );
    for (i, doc) in crafted.iter().enumerate() {
        let s = inspect(&mut con, &keys, doc).await.unwrap();
        let want: BTreeSet<String> = [format!("u{i}}}:users"), "x".into()].into();
        assert_eq!(
            s.users.iter().cloned().collect::<BTreeSet<_>>(),
            want,
            "{doc:?}"
        );
        assert_eq!(s.count, Some(2), "{doc:?}");
    }
    // Every key is a known global key or a key of a document that was published.
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut con)
        .await
        .unwrap();
    let g = keys.globals();
    let globals = [
        STREAM,
        "sessions:events:dead",
        &g.expiry,
        &g.stats,
        &g.top,
        &g.outboxes,
    ];
    for k in &all {
        if globals.contains(&k.as_str()) {
            continue;
        }
        let doc = keys
            .doc_of(k)
            .unwrap_or_else(|| panic!("unexpected key {k:?}"));
        assert!(
            doc == "a" || valid.contains(doc),
            "key {k:?} of unknown document {doc:?}"
        );
        let d = keys.doc(doc);
        let own = [
            &d.users,
            &d.count,
            &d.records,
            &d.sessions,
            &d.live,
            &d.ended,
            &d.alive,
            &d.snapshot,
            &d.outbox,
        ];
        assert!(own.contains(&k), "{k:?} is not one of {doc:?}'s keys");
    }
    for (key, kind) in [(&g.expiry, "zset"), (&g.stats, "hash"), (&g.top, "zset")] {
        let t: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(t, kind, "{key} keeps its type");
    }
    let dead = xrange(&mut con, "sessions:events:dead").await;
    assert_eq!(dead.len(), invalid.len());
    for (d, (_, reason)) in dead.iter().zip(&invalid) {
        let error = field(&d.1, "error").unwrap();
        assert!(error.contains(reason), "{error:?} should say {reason:?}");
    }
    w.stop().await;
}

#[tokio::test]
async fn limits_are_flags_and_over_limit_entries_are_dead_lettered() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let ten: Vec<(String, String)> = (0..10).map(|i| (format!("x{i}"), "y".into())).collect();
    xadd_join(&mut con, "short", "u", &[]).await;
    xadd_join(&mut con, "longer-than-8", "u", &[]).await;
    xadd_join(&mut con, "fields", "u", &ten).await;
    xadd_join(&mut con, "big", "u", &[("meta.k".into(), "m".repeat(3000))]).await;
    let mut run = std::process::Command::new(env!("CARGO_BIN_EXE_presence-worker"))
        .args([
            "run",
            "--consumer",
            "w",
            "--http-addr",
            "off",
            "--block",
            "100ms",
        ])
        .args([
            "--max-id-bytes",
            "8",
            "--max-fields",
            "8",
            "--max-entry-bytes",
            "2048",
        ])
        .env("REDIS_URL", server.url())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_drained(&mut con, STREAM, "presence").await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    assert!(run.wait().unwrap().success());
    let errors: Vec<String> = xrange(&mut con, "sessions:events:dead")
        .await
        .iter()
        .map(|(_, f)| field(f, "error").unwrap())
        .collect();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].contains("`doc` is 13 bytes, more than 8"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("entry has 13 fields, more than 8"),
        "{errors:?}"
    );
    assert!(errors[2].contains("more than 2048"), "{errors:?}");
    let users: Vec<String> = redis::cmd("SMEMBERS")
        .arg("sessions:doc:{short}:users")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(users, ["u"]);
}

/// Limits larger than the state can store (ids and records are kept with 16-bit lengths) are
/// refused at start, with the flag and its bound named, before anything is read.
#[test]
fn limits_the_state_cannot_store_are_refused_at_start() {
    for (flag, value) in [("--max-id-bytes", "65536"), ("--max-meta-bytes", "65500")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-worker"))
            .args(["run", "--http-addr", "off", flag, value])
            .env("REDIS_URL", "redis://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("limits too large to store") && err.contains(&format!("{flag} {value}")),
            "{err}"
        );
    }
}

/// Publishes `events` (type, user, session) to document "d", waits until they are applied, and
/// returns its users, count and sessions ("user/session live" or "… ended").
async fn phase(
    p: &mut Producer,
    con: &mut presence_worker::connection::Conn,
    events: &[(EventType, &str, &str)],
) -> (Vec<String>, Option<i64>, Vec<String>) {
    for &(kind, user, session) in events {
        let mut e = Event::new(kind, "d", user);
        e.session = Some(session.into());
        p.publish(&e).await.unwrap();
    }
    wait_drained(con, STREAM, "presence").await;
    let state = inspect(con, &Keys::new("sessions"), "d").await.unwrap();
    let sessions = state
        .sessions
        .iter()
        .map(|s| {
            let live = if s.live { "live" } else { "ended" };
            format!("{}/{} {live}", s.user, s.session)
        })
        .collect();
    (state.users, state.count, sessions)
}

/// A user keeps at most `--max-user-sessions` sessions in one document (every event of theirs
/// walks all of them in Redis): a new one beyond it drops their earliest ended session, and when
/// all are live its events are dead-lettered with the reason, while everyone else goes on.
#[tokio::test]
async fn a_user_keeps_at_most_max_user_sessions_in_a_document() {
    use EventType::{Heartbeat, Join, Leave};
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut p = Producer::connect(&server.url(), STREAM).await.unwrap();
    let mut cfg = config(&server, "w1");
    cfg.max_user_sessions = 3;
    let w = RunningWorker::spawn(cfg);
    // Three entries: s1 and s3 live, s2 ended.
    let events = [
        (Join, "u", "s1"),
        (Join, "u", "s2"),
        (Leave, "u", "s2"),
        (Join, "u", "s3"),
    ];
    let (_, _, sessions) = phase(&mut p, &mut con, &events).await;
    assert_eq!(sessions, ["u/s1 live", "u/s2 ended", "u/s3 live"]);
    // A fourth: the ended s2 makes room.
    let (_, _, sessions) = phase(&mut p, &mut con, &[(Join, "u", "s4")]).await;
    assert_eq!(sessions, ["u/s1 live", "u/s3 live", "u/s4 live"]);
    // All three live: s5 is refused, its two events dead-lettered; another user is not limited,
    // and u's own sessions still refresh.
    let events = [
        (Join, "u", "s5"),
        (Heartbeat, "u", "s5"),
        (Join, "v", "t1"),
        (Heartbeat, "u", "s1"),
    ];
    let (users, count, sessions) = phase(&mut p, &mut con, &events).await;
    assert_eq!(users, ["u", "v"]);
    assert_eq!(count, Some(2));
    assert_eq!(
        sessions,
        ["u/s1 live", "u/s3 live", "u/s4 live", "v/t1 live"]
    );
    let dead = xrange(&mut con, "sessions:events:dead").await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    for (_, f) in &dead {
        let error = field(f, "error").unwrap();
        assert!(
            error.contains("user \"u\" already has 3 live sessions in document \"d\""),
            "{error}"
        );
        // The original entry travels with it, to be replayed once the user has room.
        assert!(field(f, "e").is_some() && field(f, "entry_id").is_some());
    }
    // Once u leaves s3, s5 is accepted: the ended s3 makes room.
    let events = [(Leave, "u", "s3"), (Join, "u", "s5")];
    let (_, _, sessions) = phase(&mut p, &mut con, &events).await;
    assert_eq!(
        sessions,
        ["u/s1 live", "u/s4 live", "u/s5 live", "v/t1 live"]
    );
    assert_eq!(xlen(&mut con, "sessions:events:dead").await, 2);
    w.stop().await;

    // Out of range at start.
    for value in ["0", "4097"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-worker"))
            .args(["run", "--http-addr", "off", "--max-user-sessions", value])
            .env("REDIS_URL", "redis://127.0.0.1:1")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("--max-user-sessions {value} must be 1 to 4096")),
            "{err}"
        );
    }
}

/// One event of user "u"'s session `session` in document "d", in stream entry `ms`-0; its
/// outcome, and how many sessions the step ended by expiry to make room.
async fn apply_one(
    applier: &presence_worker::apply::Applier,
    con: &mut presence_worker::connection::Conn,
    ms: u64,
    kind: EventType,
    session: &str,
) -> (presence_worker::apply::Outcome, u64) {
    let mut e = Event::new(kind, "d", "u");
    e.session = Some(session.into());
    let docs = presence_worker::coalesce::coalesce(&[(presence_worker::StreamId::new(ms, 0), e)]);
    let applied = applier.apply(con, &docs).await.unwrap().remove(0);
    (applied.outcomes[0], applied.expired)
}

/// When all of a user's sessions are live, one silent for the session TTL makes room for a new
/// one (ended as its expiry visit would end it), rather than the new one being refused.
#[tokio::test]
async fn a_session_silent_for_the_ttl_makes_room_for_a_new_one() {
    use presence_worker::apply::{Applier, Outcome};
    use EventType::{Heartbeat, Join};
    let server = RedisServer::start();
    let mut con = server.con().await;
    let keys = Keys::new("sessions");
    // TTL 1 s, at most 2 sessions per user; no worker runs, so no expiry visit either.
    let applier = Applier::new(keys.clone(), 600_000, 1000).with_max_user_sessions(2);
    // Two sessions; a third while both were refreshed just now: no room. Then, 1.1 s later, s2 is
    // refreshed and s1, silent for the TTL, gives way to s3.
    // (The last number: sessions the step ended by expiry.)
    let before = [
        (1, Join, "s1", Outcome::Applied, 0),
        (2, Join, "s2", Outcome::Applied, 0),
        (3, Join, "s3", Outcome::Refused, 0),
    ];
    let after = [
        (4, Heartbeat, "s2", Outcome::Applied, 0),
        (5, Join, "s3", Outcome::Applied, 1),
    ];
    for (i, steps) in [before.as_slice(), after.as_slice()]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        for &(ms, kind, session, expected, expired) in steps {
            let got = apply_one(&applier, &mut con, ms, kind, session).await;
            assert_eq!(got, (expected, expired), "entry {ms}: {kind:?} {session}");
        }
    }
    let state = inspect(&mut con, &keys, "d").await.unwrap();
    let sessions: Vec<(&str, bool)> = state
        .sessions
        .iter()
        .map(|s| (s.session.as_str(), s.live))
        .collect();
    assert_eq!(sessions, [("s2", true), ("s3", true)]);
    assert_eq!((state.users, state.count), (vec!["u".to_string()], Some(1)));
    // The global total counts the two live sessions (s1's end included).
    let (live, present) = presence_worker::ops::totals(&mut con, &keys).await.unwrap();
    assert_eq!((live, present), (2, 1));
}
