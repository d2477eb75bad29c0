//! Operability: the HTTP endpoints against a real Redis that goes away and comes back.

mod common;

use std::time::Duration;

use common::{config, wait_drained, RedisServer, RunningWorker};
use presence_worker::{Event, EventType, Producer};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn wait_status(
    addr: std::net::SocketAddr,
    path: &str,
    want: u16,
    within: Duration,
) -> String {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get(addr, path).await;
        if status == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} stayed {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness_follow_redis() {
    let mut server = RedisServer::start();
    let mut cfg = config(&server, "w1");
    cfg.http_addr = Some("127.0.0.1:0".parse().unwrap());
    cfg.response_timeout = Duration::from_millis(500);
    cfg.breaker = presence_worker::breaker::BreakerConfig::default()
        .with_failure_threshold(2)
        .with_cooldown(Duration::from_millis(500));
    let w = RunningWorker::spawn(cfg);
    let mut p = Producer::connect(&server.url(), "sessions:events")
        .await
        .unwrap();
    p.publish(&Event::new(EventType::Join, "d", "a"))
        .await
        .unwrap();
    p.publish(&Event::new(EventType::Leave, "d", "b"))
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg("sessions:events")
        .arg("*")
        .arg("type")
        .arg("nope")
        .query_async(&mut server.con().await)
        .await
        .unwrap();
    wait_drained(&mut server.con().await, "sessions:events", "presence").await;
    let addr = loop {
        if let Some(a) = w.stats.http_addr.get() {
            break *a;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(get(addr, "/healthz").await.0, 200);
    wait_status(addr, "/readyz", 200, Duration::from_secs(5)).await;
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "presence_events_total{type=\"join\",outcome=\"applied\"}",
        "presence_events_total{type=\"leave\",outcome=\"applied\"}",
        "presence_events_total{type=\"unknown\",outcome=\"dead_lettered\"}",
        "presence_dead_letters_total{reason=\"invalid\"}",
        "presence_batches_total",
        "presence_apply_duration_seconds_bucket",
        "presence_end_to_end_delay_seconds_bucket",
        "presence_batch_size_bucket",
        "presence_breaker_state 0",
        "presence_build_info{version=",
    ] {
        assert!(body.contains(needle), "/metrics lacks {needle}:\n{body}");
    }
    assert!(
        !body.contains("doc=\"") && !body.contains("user=\""),
        "no document or user labels"
    );
    // The document went through the planned path (a standalone Redis, nothing configured that
    // needs the script).
    let planned: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("presence_planned_documents_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no presence_planned_documents_total:\n{body}"));
    assert!(planned >= 1.0, "{body}");

    // Redis goes away: not ready within seconds; back: ready again, without a restart.
    server.kill();
    let reason = wait_status(addr, "/readyz", 503, Duration::from_secs(5)).await;
    assert!(reason.contains("not ready"), "{reason}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive all the same");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !get(addr, "/metrics")
        .await
        .1
        .contains("presence_breaker_state 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get(addr, "/readyz")
        .await
        .1
        .contains("circuit breaker open"));
    server.restart(&["--save", "", "--appendonly", "no"]);
    wait_status(addr, "/readyz", 200, Duration::from_secs(30)).await;
    let (_, body) = get(addr, "/metrics").await;
    assert!(
        body.contains("presence_redis_errors_total{class="),
        "{body}"
    );
    assert!(
        body.contains("presence_breaker_transitions_total{to=\"open\"}"),
        "{body}"
    );
    w.stop().await;
}

fn bin(server: &RedisServer, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-worker"))
        .args(args)
        .env("REDIS_URL", server.url())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn publish_all(server: &RedisServer, events: &[Event]) {
    let mut p = Producer::connect(&server.url(), "sessions:events")
        .await
        .unwrap();
    p.publish_many(events).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_top_and_repair() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let mut events = Vec::new();
    for (doc, n) in [("big", 5), ("mid", 3), ("small", 1), ("gone", 2)] {
        for u in 0..n {
            events.push(Event::new(EventType::Join, doc, format!("u{u}")));
        }
    }
    for u in 0..2 {
        events.push(Event::new(EventType::Leave, "gone", format!("u{u}")));
    }
    publish_all(&server, &events).await;
    let _: String = redis::cmd("XADD")
        .arg("sessions:events")
        .arg("*")
        .arg("type")
        .arg("bad")
        .query_async(&mut con)
        .await
        .unwrap();
    let w = RunningWorker::spawn(config(&server, "w1"));
    wait_drained(&mut con, "sessions:events", "presence").await;

    let (ok, text) = bin(&server, &["status"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("length 14") && text.contains("dead letters 1"),
        "{text}"
    );
    assert!(
        text.contains("live sessions 9") && text.contains("present users 9"),
        "{text}"
    );
    assert!(
        text.contains("presence") && text.contains("consumer w1"),
        "{text}"
    );
    let (_, json) = bin(&server, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["groups"][0]["name"], "presence");
    assert_eq!(json["groups"][0]["lag"], 0);
    assert_eq!(json["groups"][0]["pending"], 0);

    let (_, text) = bin(&server, &["top", "-n", "2"]);
    let rows: Vec<&str> = text.lines().skip(1).map(str::trim).collect();
    assert_eq!(rows, ["5  big", "3  mid"]);
    let (_, text) = bin(&server, &["top"]);
    assert!(
        !text.contains("gone"),
        "an emptied document leaves the index: {text}"
    );

    // Break "big" in every way a bug or a hand edit could.
    let _: () = redis::pipe()
        .srem("sessions:doc:{big}:users", "u0")
        .sadd("sessions:doc:{big}:users", "ghost")
        .set("sessions:doc:{big}:count", 42)
        .zrem("sessions:expiry", "big")
        .query_async(&mut con)
        .await
        .unwrap();
    let (ok, text) = bin(&server, &["repair"]);
    assert!(ok);
    for needle in [
        "big: user ghost is in the users set without a live session",
        "big: user u0 has 1 live session(s) but is not in the users set",
        "big: count is 42 but the users set has 5",
        "big: the document has live sessions but no due time in the expiry index",
        "1 of 4 documents inconsistent",
    ] {
        assert!(
            text.contains(needle),
            "repair should report {needle:?}:\n{text}"
        );
    }
    let count: i64 = common::query(&mut con, &["GET", "sessions:doc:{big}:count"]).await;
    assert_eq!(count, 42, "a dry run changes nothing");
    let (_, text) = bin(&server, &["repair", "--fix"]);
    assert!(text.contains("1 of 4 documents fixed"), "{text}");
    let (_, text) = bin(&server, &["repair"]);
    assert!(text.contains("0 of 4 documents inconsistent"), "{text}");
    let s = presence_worker::inspect::inspect(
        &mut con,
        &presence_worker::keys::Keys::new("sessions"),
        "big",
    )
    .await
    .unwrap();
    assert_eq!(s.users, ["u0", "u1", "u2", "u3", "u4"]);
    assert_eq!(s.count, Some(5));
    let (_, text) = bin(&server, &["status"]);
    assert!(
        text.contains("present users 9"),
        "stats follow the fix: {text}"
    );
    w.stop().await;
}
