//! Hostile input against a real Redis: ids crafted to break key construction never reach
//! another document's keys or the worker's own keys; over-limit entries are dead-lettered with a
//! reason; the limits are flags.

mod common;

use std::collections::BTreeSet;

use common::{config, field, wait_drained, xrange, RedisServer, RunningWorker};
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
