//! The lean RESP2 connection (`presence_worker::resp::LeanConn`) against a real Redis: commands,
//! pipelines and transactions give what redis-rs's connections give; it logs in (ACL user,
//! database); it reconnects by itself after the server drops it, after a timeout, and after a
//! request dropped before its reply (whose reply never reaches the next request).

mod common;

use std::time::Duration;

use common::{query, RedisServer};
use presence_worker::resp::LeanConn;
use redis::{AsyncCommands, Value};

fn lean(url: &str, timeout: Duration) -> LeanConn {
    let client = redis::Client::open(url).expect("client");
    LeanConn::new(&client, timeout).expect("a plain standalone URL is eligible")
}

#[tokio::test]
async fn commands_pipelines_and_transactions() {
    let server = RedisServer::start();
    let mut con = lean(&server.url(), Duration::from_secs(5));
    let _: () = con.set("k", "v").await.expect("SET");
    let got: String = con.get("k").await.expect("GET");
    assert_eq!(got, "v");
    let missing: Option<String> = con.get("nothing").await.expect("GET");
    assert_eq!(missing, None);

    // A reply far larger than one socket read (8 MB).
    let big = vec![b'x'; 8 * 1024 * 1024];
    let _: () = con.set("big", &big).await.expect("SET big");
    let back: Vec<u8> = con.get("big").await.expect("GET big");
    assert_eq!(back, big);

    // A pipeline of many commands, an error among them kept in place.
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        pipe.cmd("INCRBY").arg("n").arg(i);
    }
    let counts: Vec<i64> = pipe.query_async(&mut con).await.expect("pipeline");
    assert_eq!(counts.last(), Some(&(0..1000).sum::<i64>()));
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("GET").arg("k");
    pipe.cmd("HGET").arg("k").arg("f");
    pipe.cmd("GET").arg("k");
    let replies: Vec<redis::RedisResult<Value>> =
        pipe.query_async(&mut con).await.expect("pipeline");
    assert!(matches!(&replies[0], Ok(Value::BulkString(v)) if v == b"v"));
    let wrongtype = replies[1].as_ref().expect_err("HGET of a string");
    assert_eq!(wrongtype.code(), Some("WRONGTYPE"));
    assert!(matches!(&replies[2], Ok(Value::BulkString(v)) if v == b"v"));

    // A transaction, and one aborted by a change to a watched key.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("t", 1)
        .incr("t", 2)
        .query_async(&mut con)
        .await
        .expect("MULTI/EXEC");
    assert_eq!((a, b), (1, 3));
    let mut other = server.con().await;
    let _: () = redis::cmd("WATCH")
        .arg("t")
        .query_async(&mut con)
        .await
        .expect("WATCH");
    query::<i64>(&mut other, &["INCR", "t"]).await;
    let aborted: Value = redis::pipe()
        .atomic()
        .incr("t", 10)
        .query_async(&mut con)
        .await
        .expect("EXEC");
    assert_eq!(aborted, Value::Nil);
    assert_eq!(query::<i64>(&mut other, &["GET", "t"]).await, 4);

    // A command refused when queued aborts the transaction with that command's error.
    let refused = redis::pipe()
        .atomic()
        .incr("t", 1)
        .cmd("NOSUCHCOMMAND")
        .query_async::<Value>(&mut con)
        .await
        .expect_err("aborted");
    // As redis-rs reports it: EXECABORT (the worker matches on that code), naming the refusal.
    assert_eq!(refused.code(), Some("EXECABORT"), "{refused}");
    assert!(refused.to_string().contains("unknown command"), "{refused}");
    assert_eq!(query::<i64>(&mut other, &["GET", "t"]).await, 4);
    // And the connection goes on.
    let got: String = con.get("k").await.expect("GET after the abort");
    assert_eq!(got, "v");
}

#[tokio::test]
async fn logs_in_as_an_acl_user_and_selects_its_database() {
    let server = RedisServer::start();
    let mut admin = server.con().await;
    let setuser = [
        "ACL", "SETUSER", "worker", "on", ">s3cret", "~*", "&*", "+@all",
    ];
    let _: () = query(&mut admin, &setuser).await;
    let url = format!("redis://worker:s3cret@127.0.0.1:{}/3", server.port);
    let mut con = lean(&url, Duration::from_secs(5));
    let _: () = con.set("in-three", "yes").await.expect("SET as worker");
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut check = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis-rs connection");
    let got: Option<String> = check.get("in-three").await.expect("GET");
    assert_eq!(got.as_deref(), Some("yes"));
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut check)
        .await
        .expect("SELECT 0");
    let none: Option<String> = check.get("in-three").await.expect("GET");
    assert_eq!(none, None, "written in database 3 only");

    let wrong = format!("redis://worker:nope@127.0.0.1:{}", server.port);
    let mut con = lean(&wrong, Duration::from_secs(5));
    let e = con
        .get::<_, Option<String>>("x")
        .await
        .expect_err("wrong password");
    assert_eq!(e.code(), Some("WRONGPASS"), "{e}");
}

#[tokio::test]
async fn reconnects_after_the_server_drops_it() {
    let mut server = RedisServer::start();
    let mut con = lean(&server.url(), Duration::from_secs(5));
    let _: () = con.set("k", "1").await.expect("SET");
    let mut other = server.con().await;
    let killed: i64 = query(
        &mut other,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    )
    .await;
    assert!(killed >= 1);
    // The request that finds the connection closed fails; the next one reconnects.
    let mut got = con.get::<_, String>("k").await;
    if got.is_err() {
        got = con.get("k").await;
    }
    assert_eq!(got.expect("GET after reconnecting"), "1");

    // A restarted server (its data gone): an error, then a fresh connection.
    server.restart(&["--save", "", "--appendonly", "no"]);
    let first = con.get::<_, Option<String>>("k").await;
    assert!(first.is_err(), "the old connection is gone: {first:?}");
    let second: Option<String> = con.get("k").await.expect("GET on a new connection");
    assert_eq!(second, None);
}

#[tokio::test]
async fn a_dropped_request_closes_its_connection_and_never_hands_on_its_reply() {
    let server = RedisServer::start();
    let mut con = lean(&server.url(), Duration::from_secs(5));
    let _: () = con.set("k", "mine").await.expect("SET");
    // A blocking pop given up after 100 ms (as a cancelled blocking read is).
    let pop = con.blpop::<_, Option<(String, String)>>("list", 2.0);
    assert!(tokio::time::timeout(Duration::from_millis(100), pop)
        .await
        .is_err());
    // The abandoned connection is closed at once: Redis no longer holds a blocked client for
    // it, and an element pushed now stays in the list (no stale pop takes it).
    let mut other = server.con().await;
    let mut blocked = 1;
    for _ in 0..100 {
        let info: String = query(&mut other, &["INFO", "clients"]).await;
        blocked = info
            .lines()
            .find_map(|l| l.strip_prefix("blocked_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("blocked_clients in INFO");
        if blocked == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(blocked, 0, "the cancelled BLPOP still blocks in Redis");
    query::<i64>(&mut other, &["RPUSH", "list", "pushed"]).await;
    let got: String = con.get("k").await.expect("GET");
    assert_eq!(got, "mine");
    assert_eq!(query::<i64>(&mut other, &["LLEN", "list"]).await, 1);
}

#[tokio::test]
async fn times_out_and_recovers() {
    let server = RedisServer::start();
    let mut con = lean(&server.url(), Duration::from_millis(200));
    let started = std::time::Instant::now();
    let e = con
        .blpop::<_, Option<(String, String)>>("list", 2.0)
        .await
        .expect_err("no reply within 200 ms");
    assert!(e.is_timeout(), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let pong: String = redis::cmd("PING")
        .query_async(&mut con)
        .await
        .expect("PING after the timeout");
    assert_eq!(pong, "PONG");
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_not_a_hang() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let mut con = lean(&format!("redis://127.0.0.1:{port}"), Duration::from_secs(2));
    let e = con
        .get::<_, Option<String>>("k")
        .await
        .expect_err("nothing listens");
    assert!(e.is_connection_refusal() || e.is_io_error(), "{e}");
}

#[tokio::test]
async fn speaks_over_a_unix_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("redis.sock");
    let socket_arg = socket.to_str().expect("utf-8 path");
    let _server = RedisServer::start_with(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--unixsocket",
        socket_arg,
        "--unixsocketperm",
        "700",
    ]);
    let url = format!("unix://{socket_arg}");
    let mut con = lean(&url, Duration::from_secs(5));
    let _: () = con.set("k", "over the socket").await.expect("SET");
    let got: String = con.get("k").await.expect("GET");
    assert_eq!(got, "over the socket");
}
