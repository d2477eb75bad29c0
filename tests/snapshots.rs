//! Snapshot requests at thresholds, exactly once per crossing, and the presence change feed.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{config, wait_drained, xrange, RedisServer, RunningWorker};
use presence_worker::apply::Applier;
use presence_worker::coalesce::coalesce;
use presence_worker::keys::Keys;
use presence_worker::snapshot::{decode_request, SnapshotConfig, SnapshotRequest};
use presence_worker::{Event, EventType, Producer, WorkerConfig};

const STREAM: &str = "sessions:events";
const GROUP: &str = "presence";

fn snap_config(server: &RedisServer, thresholds: &[u64]) -> WorkerConfig {
    let mut c = config(server, "w1");
    c.snapshots = SnapshotConfig {
        thresholds: thresholds.to_vec(),
        ..Default::default()
    };
    c
}

async fn requests(con: &mut presence_worker::connection::Conn) -> Vec<SnapshotRequest> {
    xrange(con, "sessions:snapshots")
        .await
        .iter()
        .map(|(_, f)| decode_request(&f.iter().find(|(k, _)| k == "e").unwrap().1).unwrap())
        .collect()
}

/// Publishes `events` as one batch and waits until they are applied.
async fn step(server: &RedisServer, events: &[Event]) {
    let mut p = Producer::connect(&server.url(), STREAM).await.unwrap();
    p.publish_many(events).await.unwrap();
    wait_drained(&mut server.con().await, STREAM, GROUP).await;
}

fn joins(doc: &str, users: std::ops::Range<u32>) -> Vec<Event> {
    users
        .map(|u| Event::new(EventType::Join, doc, format!("u{u}")))
        .collect()
}

fn leaves(doc: &str, users: std::ops::Range<u32>) -> Vec<Event> {
    users
        .map(|u| Event::new(EventType::Leave, doc, format!("u{u}")))
        .collect()
}

#[tokio::test]
async fn crossing_up_down_up_with_and_without_hysteresis() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let w = RunningWorker::spawn(snap_config(&server, &[3]));
    step(&server, &joins("d", 0..3)).await;
    step(&server, &leaves("d", 2..3)).await; // 2: re-armed
    step(&server, &joins("d", 2..3)).await; // 3 again: a second request
    let r = requests(&mut con).await;
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!(
        (r[0].reason.as_str(), r[0].threshold, r[0].count),
        ("threshold", 3, 3)
    );
    assert_eq!(r[0].users, ["u0", "u1", "u2"]);
    assert_eq!(r[0].doc, "d");
    assert!(!r[0].cause.event_id.is_empty() && r[0].cause.entry_id.contains('-'));
    assert_ne!(r[0].snapshot_id, r[1].snapshot_id);
    let latest: Vec<String> = redis::cmd("HMGET")
        .arg("sessions:doc:{d}:snapshot")
        .arg("snapshot_id")
        .arg("count")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(latest, [r[1].snapshot_id.clone(), "3".into()]);
    w.stop().await;

    // With hysteresis 1, falling to 2 does not re-arm 3; falling to 1 does.
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut c = snap_config(&server, &[3]);
    c.snapshots.hysteresis = 1;
    let w = RunningWorker::spawn(c);
    step(&server, &joins("d", 0..3)).await;
    step(&server, &leaves("d", 2..3)).await;
    step(&server, &joins("d", 2..3)).await;
    assert_eq!(
        requests(&mut con).await.len(),
        1,
        "flapping 2<->3 emits nothing more"
    );
    step(&server, &leaves("d", 1..3)).await;
    step(&server, &joins("d", 1..3)).await;
    assert_eq!(requests(&mut con).await.len(), 2);
    w.stop().await;
}

/// Applies `events` as one atomic step (one script call), as a worker does with one batch.
async fn one_step(
    applier: &Applier,
    con: &mut presence_worker::connection::Conn,
    events: Vec<Event>,
    next: &mut u64,
) -> Vec<presence_worker::apply::Applied> {
    let batch: Vec<_> = events
        .into_iter()
        .map(|e| {
            *next += 1;
            (presence_worker::StreamId::new(*next, 0), e)
        })
        .collect();
    applier.apply(con, &coalesce(&batch)).await.unwrap()
}

#[tokio::test]
async fn a_jump_over_several_thresholds_names_the_highest() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let snapshots = SnapshotConfig {
        thresholds: vec![2, 4, 6],
        ..Default::default()
    };
    let applier = Applier::with_snapshots(Keys::new("sessions"), 600_000, 0, snapshots.clone());
    let flusher = presence_worker::snapshot::Flusher::new(Keys::new("sessions"), &snapshots.stream);
    let mut n = 0;
    for (events, emits) in [
        (joins("d", 0..7), "threshold"), // 7: crosses 2, 4 and 6 at once
        (leaves("d", 5..7), ""),         // 5: re-arms 6 only
        (joins("d", 5..6), "threshold"), // 6
        (leaves("d", 1..6), ""),         // 1: re-arms 2 and 4
        (joins("d", 1..5), "threshold"), // 5: crosses 2 and 4 at once
    ] {
        let applied = one_step(&applier, &mut con, events, &mut n).await;
        assert_eq!(applied[0].snapshot, emits);
    }
    flusher.flush(&mut con, &["d".to_owned()]).await.unwrap();
    let r: Vec<(u64, u64)> = requests(&mut con)
        .await
        .iter()
        .map(|r| (r.threshold, r.count))
        .collect();
    assert_eq!(r, [(6, 7), (6, 6), (4, 5)]);
}

/// The cause of a request is the last event of the step that changed the document (not a stale
/// one after it), with its exact entry id, also beyond 2^53 ms.
#[tokio::test]
async fn a_request_names_the_event_that_caused_it() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let snapshots = SnapshotConfig {
        thresholds: vec![3],
        ..Default::default()
    };
    let applier = Applier::with_snapshots(Keys::new("sessions"), 600_000, 0, snapshots.clone());
    let flusher = presence_worker::snapshot::Flusher::new(Keys::new("sessions"), &snapshots.stream);
    let base = 1u64 << 53;
    let sid = |ms: u64, seq: u64| presence_worker::StreamId::new(base + ms, seq);
    let join = |user: &str, meta: bool| {
        let mut e = Event::new(EventType::Join, "d", user);
        if meta {
            e.meta = Some([("name".to_owned(), user.repeat(20))].into());
        }
        e
    };
    let first = vec![(sid(10, 0), join("u3", false))];
    applier.apply(&mut con, &coalesce(&first)).await.unwrap();
    let mut u1 = join("u1", false);
    u1.seq = Some(5);
    let cause = join("u2", true);
    let step = vec![
        (sid(1, 0), join("u0", true)),
        (sid(2, 7), u1),
        (sid(3, 1), cause.clone()),
        (sid(4, 0), Event::new(EventType::Heartbeat, "d", "u3")), // stale
    ];
    let applied = applier.apply(&mut con, &coalesce(&step)).await.unwrap();
    assert_eq!(applied[0].snapshot, "threshold");
    flusher.flush(&mut con, &["d".to_owned()]).await.unwrap();
    let r = requests(&mut con).await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].cause.event_id, cause.id);
    assert_eq!(r[0].cause.entry_id, "9007199254740995-1");
    assert_eq!(r[0].count, 4);
}

#[tokio::test]
async fn cooldown_bounds_the_rate_per_document() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut c = snap_config(&server, &[2]);
    c.snapshots.cooldown = Duration::from_millis(1500);
    let w = RunningWorker::spawn(c);
    step(&server, &joins("d", 0..2)).await;
    step(&server, &leaves("d", 1..2)).await;
    step(&server, &joins("d", 1..2)).await; // crossing within the cooldown: held back
    assert_eq!(requests(&mut con).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    step(&server, &[Event::new(EventType::Heartbeat, "d", "u0")]).await;
    assert_eq!(
        requests(&mut con).await.len(),
        2,
        "emitted at the next step after the cooldown"
    );
    w.stop().await;
}

#[tokio::test]
async fn empty_documents_request_a_snapshot_on_leave_and_on_expiry() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut c = snap_config(&server, &[]);
    c.snapshots.on_empty = true;
    c.session_ttl = Duration::from_secs(1);
    let w = RunningWorker::spawn(c);
    step(&server, &joins("a", 0..2)).await;
    step(&server, &leaves("a", 0..2)).await;
    step(&server, &joins("b", 0..1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while requests(&mut con).await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no request for b's expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = requests(&mut con).await;
    assert_eq!(r.len(), 2);
    assert_eq!(
        (r[0].doc.as_str(), r[0].reason.as_str(), r[0].count),
        ("a", "empty", 0)
    );
    assert!(r[0].users.is_empty());
    assert_eq!((r[1].doc.as_str(), r[1].reason.as_str()), ("b", "empty"));
    assert_eq!(r[1].cause.event_id, "expiry");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_and_replays_emit_no_duplicate_crossing() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut events = Vec::new();
    for round in 0..30u32 {
        for d in 0..5 {
            let doc = format!("doc{d}");
            let kind = if round % 2 == 0 {
                EventType::Join
            } else {
                EventType::Leave
            };
            events.extend((0..4).map(|u| Event::new(kind, doc.clone(), format!("u{u}"))));
        }
    }
    let mut p = Producer::connect(&server.url(), STREAM).await.unwrap();
    p.publish_many(&events).await.unwrap();
    let workers: Vec<RunningWorker> = (0..3)
        .map(|i| {
            let mut c = snap_config(&server, &[2, 4]);
            c.consumer = format!("w{i}");
            c.batch = 7;
            RunningWorker::spawn(c)
        })
        .collect();
    wait_drained(&mut con, STREAM, GROUP).await;
    let before = requests(&mut con).await;
    assert!(!before.is_empty());
    let ids: HashSet<&str> = before.iter().map(|r| r.snapshot_id.as_str()).collect();
    assert_eq!(ids.len(), before.len(), "no request twice");
    for d in 0..5 {
        let doc = format!("doc{d}");
        let emitted: u64 = redis::cmd("HGET")
            .arg(format!("sessions:doc:{{{doc}}}:snapshot"))
            .arg("emitted")
            .query_async(&mut con)
            .await
            .unwrap();
        let in_stream = before.iter().filter(|r| r.doc == doc).count() as u64;
        assert_eq!(
            in_stream, emitted,
            "{doc}: every decided request reached the stream once"
        );
        for r in before.iter().filter(|r| r.doc == doc) {
            assert!(
                r.count >= r.threshold && [2, 4].contains(&r.threshold),
                "{r:?}"
            );
        }
    }
    // A replay of the whole group redelivers every crossing event: nothing new.
    common::replay_group(&mut con, STREAM, GROUP).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(requests(&mut con).await.len(), before.len());
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test]
async fn a_request_decided_before_a_crash_is_flushed_once_after_restart() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    // A worker applied a crossing step, then died before flushing its outbox.
    let snapshots = SnapshotConfig {
        thresholds: vec![2],
        ..Default::default()
    };
    let applier =
        Applier::with_snapshots(Keys::new("sessions"), 600_000, 90_000, snapshots.clone());
    let batch: Vec<(presence_worker::StreamId, Event)> = joins("d", 0..2)
        .into_iter()
        .enumerate()
        .map(|(i, e)| (presence_worker::StreamId::new(1, i as u64), e))
        .collect();
    let applied = applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    assert_eq!(applied[0].snapshot, "threshold");
    assert!(requests(&mut con).await.is_empty(), "not flushed yet");
    let decided: String = redis::cmd("HGET")
        .arg("sessions:doc:{d}:snapshot")
        .arg("snapshot_id")
        .query_async(&mut con)
        .await
        .unwrap();
    // The same step delivered again (the crash came before the ack) changes nothing.
    let again = applier.apply(&mut con, &coalesce(&batch)).await.unwrap();
    assert_eq!(again[0].snapshot, "");
    // A worker starts: it flushes what was left behind, once, with the decided id.
    let w = RunningWorker::spawn(snap_config(&server, &[2]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while requests(&mut con).await.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never flushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = requests(&mut con).await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].snapshot_id, decided);
    w.stop().await;
}

#[tokio::test]
async fn the_change_feed_reaches_a_real_subscriber() {
    let server = RedisServer::start();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = redis::Client::open(presence_worker::follow::with_resp3(&server.url())).unwrap();
    let cfg = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut sub = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .unwrap();
    redis::cmd("SSUBSCRIBE")
        .arg("sessions:doc:{d}:presence")
        .exec_async(&mut sub)
        .await
        .unwrap();
    let mut c = config(&server, "w1");
    c.snapshots.publish_changes = true;
    c.session_ttl = Duration::from_secs(1);
    let w = RunningWorker::spawn(c);
    step(&server, &[Event::new(EventType::Join, "d", "a")]).await;
    let mut b_tab1 = Event::new(EventType::Join, "d", "b");
    b_tab1.session = Some("t1".into());
    let mut b_tab2 = b_tab1.clone();
    b_tab2.session = Some("t2".into());
    b_tab2.id = "other".into();
    step(&server, &[b_tab1, b_tab2]).await; // b's second tab is session noise: no message
    step(&server, &[Event::new(EventType::Leave, "d", "a")]).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 4 {
        let push = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("feed message")
            .unwrap();
        if let Some(c) = presence_worker::follow::decode_change(&push) {
            got.push((c.user, c.change, c.count, c.reason));
        }
    }
    let s = |x: &str| x.to_owned();
    assert_eq!(
        got,
        [
            (s("a"), s("joined"), 1, None),
            (s("b"), s("joined"), 2, None),
            (s("a"), s("left"), 1, Some(s("leave"))),
            (s("b"), s("left"), 0, Some(s("expired"))),
        ]
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_watch_commands_print_what_happens() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let server = RedisServer::start();
    let bin = env!("CARGO_BIN_EXE_presence-worker");
    let mut watch = Command::new(bin)
        .args(["watch", "42"])
        .env("REDIS_URL", server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = snap_config(&server, &[1]);
    c.snapshots.publish_changes = true;
    let w = RunningWorker::spawn(c);
    tokio::time::sleep(Duration::from_millis(300)).await; // the subscription is in place
    step(&server, &[Event::new(EventType::Join, "42", "alice")]).await;
    let out = Command::new(bin)
        .args(["snapshots"])
        .env("REDIS_URL", server.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("doc=42 reason=threshold threshold=1 count=1 users=[alice]"),
        "{text}"
    );
    let stdout = watch.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .unwrap()
            .unwrap()
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "alice joined  count=1");
    let _ = watch.kill();
    let _ = watch.wait();
    w.stop().await;
}
