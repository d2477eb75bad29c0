//! Fault injection with real processes: Redis killed and restarted, Redis frozen, a replica
//! killed for good. Each compares the final state with the sequential model of the stream as
//! Redis holds it, and checks count = SCARD everywhere.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::model::{assert_state, Model};
use common::workload::{append, generate, model_of, STREAM};
use common::{config, group_pending_lag, wait_drained, xrange, RedisServer, RunningWorker};
use presence_worker::breaker::BreakerConfig;
use presence_worker::event::decode_entry;
use presence_worker::limits::Limits;
use presence_worker::produce::RetryPolicy;
use presence_worker::{Event, EventType, Producer, StreamId};

const GROUP: &str = "presence";

/// The model of what the stream holds now (duplicates from producer retries included).
async fn model_of_stream(con: &mut presence_worker::connection::Conn) -> Model {
    let mut model = Model::default();
    for (id, fields) in xrange(con, STREAM).await {
        let raw: Vec<(Vec<u8>, Vec<u8>)> = fields
            .into_iter()
            .map(|(k, v)| (k.into_bytes(), v))
            .collect();
        let id: StreamId = id.parse().unwrap();
        if let Ok(ev) = decode_entry(id, &raw, &Limits::default()) {
            model.apply(&ev);
        }
    }
    model
}

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let kind = [
                EventType::Join,
                EventType::Heartbeat,
                EventType::Leave,
                EventType::Join,
            ][i % 4];
            let mut e = Event::new(kind, format!("doc{}", i % 13), format!("u{}", i % 17));
            e.session = Some(format!("t{}", i % 3));
            e
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_while_producers_publish() {
    let aof = [
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ];
    let mut server = RedisServer::start_with(&aof);
    let mut cfg = config(&server, "w1");
    cfg.response_timeout = Duration::from_secs(1);
    cfg.breaker = BreakerConfig::default()
        .with_failure_threshold(3)
        .with_cooldown(Duration::from_millis(300));
    let w = RunningWorker::spawn(cfg);
    let url = server.url();
    let producer = tokio::spawn(async move {
        let mut p = Producer::connect(&url, STREAM)
            .await
            .unwrap()
            .with_retry(RetryPolicy {
                max_attempts: 3,
                max_elapsed: Duration::from_millis(500),
            });
        let mut acknowledged = Vec::new();
        let mut failures = 0;
        for ev in events(3000) {
            // A producer that keeps an event until Redis took it: same event, same id.
            loop {
                match p.publish(&ev).await {
                    Ok(id) => {
                        acknowledged.push(id);
                        break;
                    }
                    Err(e) => {
                        assert!(e.is_transient(), "{e}");
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
        (acknowledged, failures)
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart(&aof);
    let (acknowledged, failures) = producer.await.unwrap();
    assert!(failures > 0, "the producer saw the outage");
    let mut con = server.con().await;
    wait_drained(&mut con, STREAM, GROUP).await;
    // Nothing Redis acknowledged was lost (appendfsync always).
    let ids: std::collections::HashSet<String> = xrange(&mut con, STREAM)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    for id in &acknowledged {
        assert!(ids.contains(&id.to_string()), "acknowledged {id} lost");
    }
    let model = model_of_stream(&mut con).await;
    assert_state(&mut con, "sessions", &model).await;
    assert!(
        w.stats.breaker_opened.load(Ordering::Relaxed) >= 1,
        "the breaker opened"
    );
    assert!(
        w.stats.breaker_closed.load(Ordering::Relaxed) >= 1,
        "and closed again"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_longer_than_every_timeout_then_resumed() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let entries = generate(21, 20_000);
    let (model, _) = model_of(&entries);
    append(&mut con, &entries).await;
    let mut cfg = config(&server, "w1");
    cfg.response_timeout = Duration::from_millis(500);
    cfg.batch = 200;
    cfg.breaker = BreakerConfig::default()
        .with_failure_threshold(2)
        .with_cooldown(Duration::from_millis(300));
    let w = RunningWorker::spawn(cfg);
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.signal("-CONT");
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    assert!(w.stats.breaker_opened.load(Ordering::Relaxed) >= 1);
    w.stop().await;
}

fn spawn_replica(server: &RedisServer, name: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_presence-worker"))
        .args([
            "run",
            "--consumer",
            name,
            "--block",
            "100ms",
            "--batch",
            "50",
            "--claim-idle",
            "1s",
        ])
        .env("REDIS_URL", server.url())
        .env("PRESENCE_HTTP_ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_for_good_has_its_pending_entries_finished_by_the_others() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let entries = generate(31, 30_000);
    let (model, _) = model_of(&entries);
    append(&mut con, &entries).await;
    let mut replicas: Vec<Child> = ["r0", "r1", "r2"]
        .iter()
        .map(|n| spawn_replica(&server, n))
        .collect();
    // Kill r0 while it holds pending entries or a lease (a backlog batch read without the
    // pending-entries list).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let leases = presence_worker::lease::list(&mut con, STREAM, GROUP)
            .await
            .unwrap_or_default();
        if leases.iter().any(|l| l.consumer == "r0") {
            break;
        }
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(10)
            .arg("r0")
            .query_async(&mut con)
            .await
            .unwrap_or_default();
        if !pending.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "r0 never held pending entries nor a lease"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    replicas[0].kill().unwrap();
    replicas[0].wait().unwrap();
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_eq!(group_pending_lag(&mut con, STREAM, GROUP).await, (0, 0));
    assert_state(&mut con, "sessions", &model).await;
    for r in &mut replicas[1..] {
        r.kill().unwrap();
        r.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_and_black_holed_by_a_proxy() {
    let server = RedisServer::start();
    let proxy = common::proxy::Proxy::start(([127, 0, 0, 1], server.port).into()).await;
    let mut con = server.con().await;
    // A backlog the worker cannot finish in the half second before the black hole (30,000
    // entries no longer sufficed once the worker read a document's records with one HMGET).
    let entries = generate(41, 100_000);
    let (model, _) = model_of(&entries);
    append(&mut con, &entries).await;
    let mut cfg = presence_worker::WorkerConfig::new(proxy.url(), "w1");
    cfg.block = Duration::from_millis(100);
    cfg.batch = 100;
    cfg.response_timeout = Duration::from_millis(500);
    cfg.breaker = BreakerConfig::default()
        .with_failure_threshold(3)
        .with_cooldown(Duration::from_millis(200));
    let w = RunningWorker::spawn(cfg);
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, lag) = group_pending_lag(&mut con, STREAM, GROUP).await;
    assert!(
        lag > 0,
        "the black hole struck in the middle of the backlog"
    );
    proxy.heal();
    proxy.cut();
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    assert!(w.stats.breaker_opened.load(Ordering::Relaxed) >= 1);
    assert!(proxy.accepted() > 2, "the worker reconnected");
    w.stop().await;
}
