//! Expiry, reclaim, max deliveries, trimming and consumer removal against a real redis-server.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{config, field, wait_drained, xrange, RedisServer, RunningWorker};
use presence_worker::apply::Applier;
use presence_worker::inspect::inspect;
use presence_worker::keys::Keys;
use presence_worker::{retention, Event, EventType, Producer};

const STREAM: &str = "sessions:events";
const GROUP: &str = "presence";

async fn publish(server: &RedisServer, events: &[Event]) {
    let mut p = Producer::connect(&server.url(), STREAM)
        .await
        .expect("producer");
    p.publish_many(events).await.expect("publish");
}

fn ev(kind: EventType, doc: &str, user: &str) -> Event {
    Event::new(kind, doc, user)
}

async fn users(con: &mut presence_worker::connection::Conn, doc: &str) -> Vec<String> {
    inspect(con, &Keys::new("sessions"), doc)
        .await
        .unwrap()
        .users
}

#[tokio::test]
async fn silent_sessions_expire_and_refreshed_ones_stay() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut cfg = config(&server, "w1");
    cfg.session_ttl = Duration::from_secs(1);
    let w = RunningWorker::spawn(cfg);
    publish(
        &server,
        &[
            ev(EventType::Join, "d", "quiet"),
            ev(EventType::Join, "d", "chatty"),
        ],
    )
    .await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(users(&mut con, "d").await, ["chatty", "quiet"]);
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        publish(&server, &[ev(EventType::Heartbeat, "d", "chatty")]).await;
    }
    wait_drained(&mut con, STREAM, GROUP).await;
    let s = inspect(&mut con, &Keys::new("sessions"), "d")
        .await
        .unwrap();
    assert_eq!(
        s.users,
        ["chatty"],
        "quiet expired after 1s, chatty refreshed"
    );
    assert_eq!(s.count, Some(1));
    assert_eq!(w.stats.expired.load(Ordering::Relaxed), 1);
    // A newer event makes an expired session live again.
    publish(&server, &[ev(EventType::Heartbeat, "d", "quiet")]).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(users(&mut con, "d").await, ["chatty", "quiet"]);
    // Everyone silent: the document empties and its due time leaves the index.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !users(&mut con, "d").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (count, indexed): (Option<i64>, Option<f64>) = redis::pipe()
        .get("sessions:doc:{d}:count")
        .zscore("sessions:expiry", "d")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!((count, indexed), (None, None));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_exactly_once_across_replicas_even_when_one_dies() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let ttl = Duration::from_secs(1);
    let mut events = Vec::new();
    for d in 0..40 {
        for u in 0..10 {
            events.push(ev(EventType::Join, &format!("doc{d}"), &format!("u{u}")));
        }
    }
    publish(&server, &events).await;
    let workers: Vec<RunningWorker> = (0..3)
        .map(|i| {
            let mut c = config(&server, &format!("w{i}"));
            c.session_ttl = ttl;
            RunningWorker::spawn(c)
        })
        .collect();
    wait_drained(&mut con, STREAM, GROUP).await;
    // Kill one replica while the others (and it) are expiring.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    let mut workers = workers.into_iter();
    let victim = workers.next().unwrap();
    let victim_stats = victim.stats.clone();
    victim.abort().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = redis::cmd("ZCARD")
            .arg("sessions:expiry")
            .query_async(&mut con)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{left} documents never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut expired_total = victim_stats.expired.load(Ordering::Relaxed);
    for w in workers {
        expired_total += w.stats.expired.load(Ordering::Relaxed);
        w.stop().await;
    }
    for d in 0..40 {
        let s = inspect(&mut con, &Keys::new("sessions"), &format!("doc{d}"))
            .await
            .unwrap();
        assert!(s.users.is_empty() && s.count.is_none(), "doc{d}: {s:?}");
        assert_eq!(s.sessions.len(), 10);
    }
    // Nothing expired twice. (The killed replica may have expired a few documents without
    // living to count them, never more.)
    assert!(
        expired_total <= 400,
        "{expired_total} expirations for 400 sessions"
    );
    assert!(expired_total >= 400 - 200, "{expired_total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_expiry_of_the_same_documents_ends_each_session_once() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut events = Vec::new();
    for d in 0..20 {
        for u in 0..25 {
            events.push(ev(EventType::Join, &format!("doc{d}"), &format!("u{u}")));
        }
    }
    publish(&server, &events).await;
    let mut cfg = config(&server, "w1");
    cfg.session_ttl = Duration::from_secs(3600);
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    w.stop().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Four replicas expire the same 20 documents at once with a 1 s ttl.
    let docs: Vec<String> = (0..20).map(|d| format!("doc{d}")).collect();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let url = server.url();
            let docs = docs.clone();
            tokio::spawn(async move {
                let client = presence_worker::connection::client(&url).unwrap();
                let mut con = presence_worker::connection::manager(&client, Duration::from_secs(5))
                    .await
                    .unwrap()
                    .into();
                let applier = Applier::new(Keys::new("sessions"), 600_000, 1000);
                applier.expire(&mut con, &docs).await.unwrap().0
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 500, "each of the 500 sessions expired exactly once");
    for d in &docs {
        assert!(users(&mut con, d).await.is_empty());
    }
}

#[tokio::test]
async fn a_dead_replicas_pending_entries_are_reclaimed() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    publish(
        &server,
        &[ev(EventType::Join, "d", "a"), ev(EventType::Join, "d", "b")],
    )
    .await;
    common::create_group(&mut con, STREAM, GROUP).await;
    let _ = common::read_as(&mut con, STREAM, GROUP, "dead", 10).await;
    let mut cfg = config(&server, "alive");
    cfg.claim_idle = Duration::from_millis(300);
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(users(&mut con, "d").await, ["a", "b"]);
    assert_eq!(w.stats.reclaimed.load(Ordering::Relaxed), 2);
    w.stop().await;
}

#[tokio::test]
async fn an_entry_delivered_too_often_is_dead_lettered() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    publish(
        &server,
        &[
            ev(EventType::Join, "d", "poison"),
            ev(EventType::Join, "d", "fine"),
        ],
    )
    .await;
    common::create_group(&mut con, STREAM, GROUP).await;
    let _ = common::read_as(&mut con, STREAM, GROUP, "crashy", 1).await;
    let poison_id = xrange(&mut con, STREAM).await[0].0.clone();
    // It has crashed its consumer five times already.
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(STREAM)
        .arg(GROUP)
        .arg("crashy")
        .arg(0)
        .arg(&poison_id)
        .arg("RETRYCOUNT")
        .arg(5)
        .query_async(&mut con)
        .await
        .unwrap();
    let mut cfg = config(&server, "w1");
    cfg.claim_idle = Duration::from_millis(200);
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(users(&mut con, "d").await, ["fine"]);
    let dead = xrange(&mut con, "sessions:events:dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        field(&dead[0].1, "entry_id").as_deref(),
        Some(poison_id.as_str())
    );
    assert_eq!(
        field(&dead[0].1, "error").as_deref(),
        Some("too many deliveries (6)")
    );
    w.stop().await;
}

#[tokio::test]
async fn trimming_never_drops_what_a_group_still_needs() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let events: Vec<Event> = (0..2000)
        .map(|i| ev(EventType::Heartbeat, "d", &format!("u{}", i % 50)))
        .collect();
    publish(&server, &events).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg("slow-reader")
        .arg("0")
        .query_async(&mut con)
        .await
        .unwrap();
    let w = RunningWorker::spawn(config(&server, "w1"));
    wait_drained(&mut con, STREAM, GROUP).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let removed = retention::trim(&mut con, STREAM, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(removed, 0, "slow-reader has not read anything yet");
    // slow-reader reads 1000 entries and acknowledges 500 of them.
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("slow-reader")
        .arg("r")
        .arg("COUNT")
        .arg(1000)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();
    let ids: Vec<String> = presence_worker::read::parse_read_reply(read)
        .unwrap()
        .iter()
        .map(|e| e.id.to_string())
        .collect();
    let _: i64 = redis::cmd("XACK")
        .arg(STREAM)
        .arg("slow-reader")
        .arg(&ids[..500])
        .query_async(&mut con)
        .await
        .unwrap();
    let removed = retention::trim(&mut con, STREAM, Duration::from_millis(1))
        .await
        .unwrap();
    assert!(removed > 0 && removed <= 500, "trimmed {removed}");
    let first: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut con)
        .await
        .unwrap();
    let first: presence_worker::StreamId = first[0].0.parse().unwrap();
    assert!(
        first <= ids[500].parse().unwrap(),
        "the oldest pending entry is still there"
    );
    w.stop().await;
}

#[tokio::test]
async fn only_idle_consumers_with_nothing_pending_are_removed() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    publish(&server, &[ev(EventType::Join, "d", "a")]).await;
    common::create_group(&mut con, STREAM, GROUP).await;
    let _ = common::read_as(&mut con, STREAM, GROUP, "holding", 1).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(STREAM)
        .arg(GROUP)
        .arg("empty")
        .query_async(&mut con)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let removed =
        retention::remove_idle_consumers(&mut con, STREAM, GROUP, "me", Duration::from_millis(50))
            .await
            .unwrap();
    assert_eq!(removed, ["empty"]);
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(STREAM)
        .arg(GROUP)
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(consumers.len(), 1);
    assert!(format!("{consumers:?}").contains("holding"));
}
