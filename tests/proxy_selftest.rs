//! Self-test of the fault-injection proxy in `tests/common/proxy.rs`, against a real
//! `redis-server` on a free loopback port.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::RedisServer;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisResult};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The harness's `redis-server`, with the two views these tests need.
struct Redis(RedisServer);

impl Redis {
    fn start() -> Self {
        Redis(RedisServer::start())
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.0.port))
    }

    /// A connection straight to the server (not through the proxy).
    async fn direct(&self) -> MultiplexedConnection {
        redis::Client::open(self.0.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("direct connection")
    }
}

/// A connection through `proxy` whose commands time out after `timeout`.
async fn connect(proxy: &Proxy, timeout: Duration) -> RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(timeout));
    redis::Client::open(proxy.url())?
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

async fn ping(con: &mut MultiplexedConnection) -> RedisResult<String> {
    redis::cmd("PING").query_async(con).await
}

/// Waits (up to 2 s) until `proxy.connections() == n`.
async fn wait_connections(proxy: &Proxy, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.connections() != n {
        assert!(
            Instant::now() < deadline,
            "expected {n} open connections, have {}",
            proxy.connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Number of clients connected to the server (CLIENT LIST), seen through `direct`.
async fn server_clients(direct: &mut MultiplexedConnection) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(direct)
        .await
        .expect("CLIENT LIST");
    list.lines().filter(|l| !l.trim().is_empty()).count()
}

/// Sends an inline PING on `s` and returns what comes back within 300 ms (`None`: nothing).
async fn raw_ping(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    s.write_all(b"PING\r\n").await.expect("write");
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        Ok(Err(e)) => panic!("read: {e}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn forwards_and_counts() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.addr()).await;
    assert_eq!(proxy.url(), format!("redis://{}", proxy.addr()));
    assert!(proxy.addr().ip().is_loopback());
    assert_eq!((proxy.connections(), proxy.accepted()), (0, 0));

    let mut a = connect(&proxy, Duration::from_secs(5)).await.expect("a");
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut a)
        .await
        .expect("SET");
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(v, "v");
    // A value larger than the proxy's buffers and the socket buffers, both ways.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query_async(&mut a)
        .await
        .unwrap();
    let back: Vec<u8> = redis::cmd("GET")
        .arg("big")
        .query_async(&mut a)
        .await
        .unwrap();
    assert!(back == big, "large value corrupted through the proxy");
    wait_connections(&proxy, 1).await;
    assert_eq!(proxy.accepted(), 1);

    // The write really reached the server.
    let mut direct = redis.direct().await;
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(v, "v");

    let mut b = connect(&proxy, Duration::from_secs(5)).await.expect("b");
    assert_eq!(ping(&mut b).await.unwrap(), "PONG");
    wait_connections(&proxy, 2).await;
    assert_eq!(proxy.accepted(), 2);

    drop(a);
    wait_connections(&proxy, 1).await;
    drop(b);
    wait_connections(&proxy, 0).await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn cut_closes_open_connections_and_new_ones_work() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut con = connect(&proxy, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping(&mut con).await.unwrap(), "PONG");
    wait_connections(&proxy, 1).await;

    proxy.cut();
    let t = Instant::now();
    let err = ping(&mut con)
        .await
        .expect_err("command after cut must fail");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(
        !err.is_timeout(),
        "cut must be an error, not a timeout: {err}"
    );
    wait_connections(&proxy, 0).await;

    let mut con2 = connect(&proxy, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping(&mut con2).await.unwrap(), "PONG");
    wait_connections(&proxy, 1).await;
    assert_eq!(proxy.accepted(), 2);
}

#[tokio::test]
async fn blackhole_times_out_then_heal() {
    let redis = Redis::start();
    let mut direct = redis.direct().await;
    let proxy = Proxy::start(redis.addr()).await;
    let timeout = Duration::from_millis(300);
    let mut con = connect(&proxy, timeout).await.unwrap();
    // A raw connection (redis-rs would pair late replies with requests that timed out).
    let mut held = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(raw_ping(&mut held).await.unwrap(), b"+PONG\r\n");
    assert_eq!(ping(&mut con).await.unwrap(), "PONG");
    let con_id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut con)
        .await
        .unwrap();
    assert_eq!(server_clients(&mut direct).await, 3);

    proxy.blackhole();
    let t = Instant::now();
    let err = ping(&mut con).await.expect_err("PING must time out");
    let took = t.elapsed();
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    assert!(raw_ping(&mut held).await.is_none());

    // Upstream closing its side is not passed on: still a silent, open connection.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(con_id)
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    assert_eq!(server_clients(&mut direct).await, 2);
    let err = ping(&mut con).await.expect_err("PING must time out");
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    assert_eq!(proxy.connections(), 2);

    // New connections are accepted but never reach upstream.
    let mut raw = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    raw.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_millis(300), raw.read(&mut buf)).await;
    assert!(r.is_err(), "black-holed connection must stay silent: {r:?}");
    wait_connections(&proxy, 3).await;
    assert_eq!(server_clients(&mut direct).await, 2);
    // redis-rs connecting while black-holed times out too.
    let err = connect(&proxy, timeout)
        .await
        .expect_err("connect must time out");
    assert!(err.is_timeout(), "expected a timeout, got {err}");

    proxy.heal();
    let mut con2 = connect(&proxy, timeout).await.unwrap();
    assert_eq!(ping(&mut con2).await.unwrap(), "PONG");
    // Connections black-holed before `heal` stay black-holed (`held` still has its upstream)...
    assert!(raw_ping(&mut held).await.is_none());
    let err = ping(&mut con).await.expect_err("still black-holed");
    assert!(err.is_timeout(), "expected a timeout, got {err}");
    // ...until cut.
    proxy.cut();
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("cut closes the black-holed connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    wait_connections(&proxy, 0).await;
    let n = tokio::time::timeout(Duration::from_secs(2), held.read(&mut buf))
        .await
        .expect("cut closes the black-holed connection");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let mut con3 = connect(&proxy, timeout).await.unwrap();
    assert_eq!(ping(&mut con3).await.unwrap(), "PONG");
}

#[tokio::test]
async fn refuse_then_heal() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.addr()).await;
    let mut con = connect(&proxy, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping(&mut con).await.unwrap(), "PONG");

    proxy.refuse();
    let err = ping(&mut con).await.expect_err("open connection is cut");
    assert!(!err.is_timeout(), "expected an error, not a timeout: {err}");
    wait_connections(&proxy, 0).await;

    let t = Instant::now();
    let r = async {
        let mut c = connect(&proxy, Duration::from_secs(5)).await?;
        ping(&mut c).await
    }
    .await;
    let err = r.expect_err("refused");
    assert!(!err.is_timeout(), "expected an error, not a timeout: {err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Raw: the TCP handshake completes, then the socket is reset at once (the reset can even
    // reach the client before its `connect` returns).
    let before = proxy.accepted();
    if let Ok(mut raw) = tokio::net::TcpStream::connect(proxy.addr()).await {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
            .await
            .expect("closed promptly");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while proxy.accepted() == before {
        assert!(Instant::now() < deadline, "refused connection not accepted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proxy.accepted() >= 3, "accepted {}", proxy.accepted());
    assert_eq!(proxy.connections(), 0);

    proxy.heal();
    let mut con2 = connect(&proxy, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping(&mut con2).await.unwrap(), "PONG");
    wait_connections(&proxy, 1).await;
}

#[tokio::test]
async fn drop_closes_everything() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.addr()).await;
    let addr = proxy.addr();
    let mut con = connect(&proxy, Duration::from_secs(5)).await.unwrap();
    assert_eq!(ping(&mut con).await.unwrap(), "PONG");
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    wait_connections(&proxy, 2).await;

    drop(proxy);
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), raw.read(&mut buf))
        .await
        .expect("connection closed when the proxy is dropped");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let err = ping(&mut con).await.expect_err("connection closed");
    assert!(!err.is_timeout(), "expected an error, not a timeout: {err}");
    // The listener is gone too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
