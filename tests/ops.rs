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
