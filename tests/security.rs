//! Security: ACL users with the README's exact rules, passwords kept out of every output, and
//! TLS (server verification, mutual TLS) against real `redis-server` processes.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{config, wait_drained, RedisServer, RunningWorker};
use presence_worker::connection::Conn;
use presence_worker::connection::{self, ConnectOptions};
use presence_worker::snapshot::SnapshotConfig;
use presence_worker::{Event, EventType, Producer};

const BIN: &str = env!("CARGO_BIN_EXE_presence-worker");
const STREAM: &str = "sessions:events";

/// Every variable the binary reads credentials or TLS files from, cleared for each run.
const REDIS_ENV: [&str; 6] = [
    "REDIS_URL",
    "REDIS_USERNAME",
    "REDIS_PASSWORD_FILE",
    "REDIS_CA_FILE",
    "REDIS_CLIENT_CERT",
    "REDIS_CLIENT_KEY",
];

/// Environment variables for one run of the binary.
type Env<'a> = Vec<(&'a str, &'a str)>;

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    for var in REDIS_ENV.iter().chain(&["RUST_LOG"]) {
        cmd.env_remove(var);
    }
    cmd.args(args)
        .env("PRESENCE_HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied());
    cmd
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(args, env).output().expect("run presence-worker")
}

fn assert_ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts the command failed with exactly one line on stderr, and returns it.
fn one_line_failure(out: &Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should fail: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: one line expected: {err}");
    assert!(lines[0].starts_with("presence-worker: "), "{what}: {err}");
    lines[0].to_owned()
}

/// Passwords of the three users the README defines.
struct Users {
    worker: String,
    ops: String,
    producer: String,
}

fn secret(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// Creates the users exactly as the README's Security section says, with fresh passwords.
async fn create_users(admin: &mut Conn) -> Users {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Security\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Security section in the README");
    let users = Users {
        worker: secret("Wk"),
        ops: secret("Op"),
        producer: secret("Pr"),
    };
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for line in section.lines().filter(|l| l.starts_with("ACL SETUSER ")) {
        let line = line
            .replace(">WORKER_PASSWORD", &format!(">{}", users.worker))
            .replace(">OPS_PASSWORD", &format!(">{}", users.ops))
            .replace(">PRODUCER_PASSWORD", &format!(">{}", users.producer));
        let words: Vec<&str> = line.split_whitespace().collect();
        redis::cmd("ACL")
            .arg(&words[1..])
            .exec_async(admin)
            .await
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        *per_user.entry(words[2].to_owned()).or_default() += 1;
    }
    let want: HashMap<String, usize> = [
        ("presence-worker".to_owned(), 4),
        ("presence-ops".to_owned(), 4),
        ("presence-producer".to_owned(), 1),
    ]
    .into();
    assert_eq!(per_user, want, "the README's ACL rules");
    users
}

fn url_as(server: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}", server.port)
}

fn password_file(dir: &Path, name: &str, password: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{password}\n")).expect("write password file");
    path
}

fn login(user: &str, file: &Path) -> ConnectOptions {
    ConnectOptions {
        username: Some(user.into()),
        password_file: Some(file.to_path_buf()),
        ..Default::default()
    }
}

/// `ACL LOG` entries as field maps: every command Redis refused.
async fn acl_log(admin: &mut Conn) -> Vec<HashMap<String, String>> {
    let entries: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(admin)
        .await
        .expect("ACL LOG");
    entries
        .into_iter()
        .map(|e| {
            let pairs: Vec<(redis::Value, redis::Value)> = match e {
                redis::Value::Array(kv) => {
                    kv.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect()
                }
                redis::Value::Map(kv) => kv,
                other => panic!("ACL LOG entry {other:?}"),
            };
            pairs
                .into_iter()
                .filter_map(|(k, v)| {
                    let k: String = redis::from_redis_value_ref(&k).ok()?;
                    let v: String = redis::from_redis_value_ref(&v).ok()?;
                    Some((k, v))
                })
                .collect()
        })
        .collect()
}

async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

async fn smembers(con: &mut Conn, key: &str) -> Vec<String> {
    let mut v: Vec<String> = redis::cmd("SMEMBERS")
        .arg(key)
        .query_async(con)
        .await
        .expect("SMEMBERS");
    v.sort();
    v
}

/// Reads a child's stdout lines on a thread, so a test can wait for them with a deadline.
fn lines_of(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_acl_users_run_the_whole_flow() {
    let server = RedisServer::start();
    let mut admin = server.con().await;
    let users = create_users(&mut admin).await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let dir = secrets.path();
    let worker_login = login("presence-worker", &password_file(dir, "w", &users.worker));
    let ops_file = password_file(dir, "o", &users.ops);
    let ops_file = ops_file.to_str().expect("utf-8");
    let ops_flags = [
        "--redis-username",
        "presence-ops",
        "--redis-password-file",
        ops_file,
    ];
    let url = server.url();
    let ops_env = [("REDIS_URL", url.as_str())];
    let ops_url = url_as(&server, "presence-ops", &users.ops);

    // A consumer of a replica gone for good (the worker removes it with a script), and a
    // malformed entry (the worker dead-letters it in a MULTI with its XACK).
    for args in [
        &["CREATE", STREAM, "presence", "0", "MKSTREAM"][..],
        &["CREATECONSUMER", STREAM, "presence", "gone"],
    ] {
        redis::cmd("XGROUP")
            .arg(args)
            .exec_async(&mut admin)
            .await
            .unwrap();
    }
    redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("e")
        .arg("not msgpack")
        .exec_async(&mut admin)
        .await
        .unwrap();

    // Producers: the library with a password file, the CLI with the password in the URL.
    let producer_login = login(
        "presence-producer",
        &password_file(dir, "p", &users.producer),
    );
    let mut producer = Producer::connect_with(&url, &producer_login, STREAM)
        .await
        .expect("the producer user connects");
    for user in ["alice", "bob"] {
        let ev = Event::new(EventType::Join, "42", user);
        producer.publish(&ev).await.expect("publish as producer");
    }
    // A document large enough that the worker keeps its hashes as hash tables (OBJECT ENCODING).
    for u in 0..64 {
        let ev = Event::new(EventType::Join, "big", format!("u{u}"));
        producer.publish(&ev).await.expect("publish as producer");
    }
    let producer_url = url_as(&server, "presence-producer", &users.producer);
    let out = cli(
        &["publish", "join", "--doc", "7", "--user", "carol"],
        &[("REDIS_URL", producer_url.as_str())],
    );
    assert_ok(&out, "publish with the producer's URL");

    // A replica gone for good left a lease (a backlog read of 4 entries it never applied).
    presence_worker::lease::read(&mut admin, STREAM, "presence", "gone", 4)
        .await
        .expect("a lease");

    // The change feed, watched by an operator (RESP3, SSUBSCRIBE).
    let mut watch = command(&["watch", "42"], &[("REDIS_URL", ops_url.as_str())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    let watching = lines_of(watch.stderr.take().expect("stderr"));
    let started = watching.recv_timeout(Duration::from_secs(10));
    assert!(started.is_ok_and(|l| l.starts_with("watching")), "watch");
    let feed = lines_of(watch.stdout.take().expect("stdout"));

    // The worker, exercising every periodic task: expiry, snapshots, feed, reclaim, trimming,
    // consumer removal, sampling and /readyz.
    let mut c = config(&server, "w1");
    c.connect = worker_login;
    c.session_ttl = Duration::from_secs(2);
    c.claim_idle = Duration::from_millis(200);
    c.consumer_idle = Duration::from_millis(1);
    // Batches smaller than the backlog: leased reads (EVAL, HSET, HDEL), and the gone replica's
    // lease taken over (XRANGE).
    c.batch = 8;
    c.http_addr = Some("127.0.0.1:0".parse().unwrap());
    c.snapshots = SnapshotConfig {
        thresholds: vec![2],
        on_empty: true,
        publish_changes: true,
        ..Default::default()
    };
    let w = RunningWorker::spawn(c);
    wait_drained(&mut admin, STREAM, "presence").await;
    assert!(
        w.stats.leased.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "leased reads"
    );
    assert!(
        w.stats.reclaimed.load(std::sync::atomic::Ordering::Relaxed) >= 4,
        "the lease taken over"
    );
    let encoding: String = redis::cmd("OBJECT")
        .arg("ENCODING")
        .arg("sessions:doc:{big}:records")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(encoding, "hashtable");
    let stats = w.stats.clone();
    // Every session expires (the 64 of "big" too): wait for document 42's, not for a count.
    eventually("sessions expire", Duration::from_secs(15), || {
        let (stats, mut con) = (stats.clone(), admin.clone());
        async move {
            stats.expired.load(std::sync::atomic::Ordering::Relaxed) >= 3
                && smembers(&mut con, "sessions:doc:{42}:users")
                    .await
                    .is_empty()
        }
    })
    .await;
    eventually(
        "the gone consumer is removed",
        Duration::from_secs(5),
        || {
            let mut con = admin.clone();
            async move {
                let consumers: Vec<redis::Value> = redis::cmd("XINFO")
                    .arg("CONSUMERS")
                    .arg(STREAM)
                    .arg("presence")
                    .query_async(&mut con)
                    .await
                    .unwrap();
                !format!("{consumers:?}").contains("gone")
            }
        },
    )
    .await;
    let http = *w.stats.http_addr.get().expect("HTTP listener");
    let ready = http_get(http, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(http, "/metrics").await;
    assert!(!metrics.contains(&users.worker), "password in /metrics");

    let wanted = [
        "alice joined",
        "bob joined",
        "alice left (expired)",
        "bob left (expired)",
    ];
    let mut feed_text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !wanted.iter().all(|w| feed_text.contains(w)) {
        let left = deadline.saturating_duration_since(Instant::now());
        match feed.recv_timeout(left) {
            Ok(line) => feed_text.push_str(&format!("{line}\n")),
            Err(_) => panic!("watch printed only: {feed_text}"),
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();

    // Every operator command, as the operators' user.
    let text = assert_ok(
        &cli(&["snapshots"], &[("REDIS_URL", ops_url.as_str())]),
        "snapshots",
    );
    assert!(
        text.contains("doc=42 reason=threshold threshold=2 count=2 users=[alice,bob]"),
        "{text}"
    );
    assert!(text.contains("doc=42 reason=empty"), "{text}");
    let ops = |args: &[&str]| -> String {
        let all: Vec<&str> = args.iter().chain(&ops_flags).copied().collect();
        assert_ok(&cli(&all, &ops_env), &args.join(" "))
    };
    let state: serde_json::Value =
        serde_json::from_str(&ops(&["inspect", "42", "--json"])).expect("json");
    assert_eq!(state["users"], serde_json::json!([]), "{state}");
    assert_eq!(
        state["sessions"].as_array().map(Vec::len),
        Some(2),
        "{state}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ops(&["status", "--json"])).expect("json");
    assert_eq!(status["groups"][0]["name"], "presence", "{status}");
    assert_eq!(status["dead_letters"], 1, "{status}");
    assert!(ops(&["top"]).contains("document"));
    redis::cmd("SET")
        .arg("sessions:doc:{42}:count")
        .arg(5)
        .exec_async(&mut admin)
        .await
        .unwrap();
    assert!(ops(&["repair"]).contains("1 of 3 documents inconsistent"));
    assert!(ops(&["repair", "--fix"]).contains("1 of 3 documents fixed"));
    assert!(ops(&["repair"]).contains("0 of 3 documents inconsistent"));
    assert!(ops(&["dlq", "list"]).contains("1 dead letter(s)"));
    assert!(ops(&["dlq", "replay"]).contains("replayed 1 dead letter(s)"));
    wait_drained(&mut admin, STREAM, "presence").await;
    w.stop().await;

    // Nothing any of the three users did was refused: the rules are complete.
    let refused = acl_log(&mut admin).await;
    assert!(refused.is_empty(), "ACL LOG: {refused:?}");
}

#[tokio::test]
async fn a_producer_can_append_events_and_nothing_else() {
    let server = RedisServer::start();
    let mut admin = server.con().await;
    let users = create_users(&mut admin).await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let producer = login(
        "presence-producer",
        &password_file(secrets.path(), "p", &users.producer),
    );
    let client = connection::client_with(&server.url(), &producer).expect("client");
    let mut con = connection::manager(&client, Duration::from_secs(5))
        .await
        .expect("the producer user connects");
    let id: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("type")
        .arg("join")
        .query_async(&mut con)
        .await
        .expect("XADD to the events stream is allowed");
    assert!(id.contains('-'));
    for (name, args) in [
        ("GET", &["sessions:doc:{42}:count"][..]),
        ("DEL", &[STREAM]),
        ("XADD", &["other:events", "*", "e", "x"]),
        ("XADD", &["sessions:events:dead", "*", "e", "x"]),
        ("SMEMBERS", &["sessions:doc:{42}:users"]),
        ("XRANGE", &[STREAM, "-", "+"]),
    ] {
        let err = redis::cmd(name)
            .arg(args)
            .query_async::<redis::Value>(&mut con)
            .await
            .expect_err(name);
        assert_eq!(err.code(), Some("NOPERM"), "{name} {args:?}: {err}");
    }

    // The library reports a refusal at once: it is permanent, never retried.
    let mut p = Producer::connect_with(&server.url(), &producer, "other:events")
        .await
        .expect("connect");
    let start = Instant::now();
    let err = p
        .publish(&Event::new(EventType::Join, "d", "u"))
        .await
        .expect_err("XADD to another stream");
    assert_eq!(err.class(), "noperm", "{err}");
    assert!(!err.is_transient());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );

    // The CLI: one clear line and exit 1, whatever the command.
    let url = url_as(&server, "presence-producer", &users.producer);
    let env = [("REDIS_URL", url.as_str())];
    let publish = ["publish", "join", "--doc", "d", "--user", "u"];
    let line = one_line_failure(
        &cli(
            &[&publish[..], &["--stream", "other:events"]].concat(),
            &env,
        ),
        "publish to another stream",
    );
    assert_eq!(
        line,
        "presence-worker: redis error: NoPerm: this user has no permissions to access one of the \
         keys used as arguments"
    );
    let readme = include_str!("../README.md");
    assert!(
        readme.contains(&format!("\n{line}\n")),
        "the README shows: {line}"
    );
    for args in [
        &["top"][..],
        &["status"],
        &["dlq", "list"],
        &["run", "--consumer", "c"],
    ] {
        let line = one_line_failure(&cli(args, &env), &args.join(" "));
        assert!(line.contains("no permissions"), "{args:?}: {line}");
        assert!(!line.contains(&users.producer), "{line}");
    }
    assert_ok(&cli(&publish, &env), "publish to the events stream");

    // Each refusal came from Redis's ACL, for the producer.
    let refused = acl_log(&mut admin).await;
    assert!(refused.len() >= 5, "{refused:?}");
    for entry in &refused {
        assert_eq!(entry["username"], "presence-producer", "{entry:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_output_logs_or_metrics() {
    let server = RedisServer::start();
    let mut admin = server.con().await;
    let users = create_users(&mut admin).await;
    let secrets = tempfile::tempdir().expect("temp dir");
    let wrong = secret("Wrong");
    let wrong_file = password_file(secrets.path(), "wrong", &wrong);
    let wrong_file = wrong_file.to_str().expect("utf-8");
    let url = server.url();
    let all = [users.worker.as_str(), &users.ops, &users.producer, &wrong];
    let assert_clean = |what: &str, text: &str| {
        for pw in all {
            assert!(!text.contains(pw), "{what} shows a password: {text}");
        }
    };

    // A wrong password: one clear line, in the URL (RESP2 and RESP3) or in a file.
    let wrong_url = url_as(&server, "presence-producer", &wrong);
    let wrong_resp3 = format!("{wrong_url}/?protocol=resp3");
    let by_file = |user: &'static str| {
        [
            ("REDIS_URL", url.as_str()),
            ("REDIS_USERNAME", user),
            ("REDIS_PASSWORD_FILE", wrong_file),
        ]
    };
    let publish = ["publish", "join", "--doc", "d", "--user", "u"];
    let cases: [(&[&str], Env); 4] = [
        (&publish, vec![("REDIS_URL", wrong_url.as_str())]),
        (&publish, vec![("REDIS_URL", wrong_resp3.as_str())]),
        (&["inspect", "42"], by_file("presence-ops").to_vec()),
        (
            &["run", "--consumer", "c"],
            by_file("presence-worker").to_vec(),
        ),
    ];
    for (args, env) in cases {
        let start = Instant::now();
        let out = cli(args, &env);
        let line = one_line_failure(&out, &format!("{args:?} {env:?}"));
        assert_eq!(
            line,
            format!(
                "presence-worker: cannot reach Redis at {url}: authentication failed (wrong user \
                 name or password, or the user is disabled)"
            )
        );
        assert_clean("stdout", &String::from_utf8_lossy(&out.stdout));
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{:?}",
            start.elapsed()
        );
    }

    // The right passwords, with everything logged: a worker, a producer, an operator, metrics.
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let log = secrets.path().join("worker.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let worker_url = url_as(&server, "presence-worker", &users.worker);
    let http_addr = http.to_string();
    let mut run = command(
        &[
            "run",
            "--consumer",
            "w1",
            "--block",
            "100ms",
            "--log-format",
            "json",
        ],
        &[
            ("REDIS_URL", worker_url.as_str()),
            ("RUST_LOG", "trace"),
            ("PRESENCE_HTTP_ADDR", http_addr.as_str()),
        ],
    )
    .stdout(log_file.try_clone().expect("log file"))
    .stderr(log_file)
    .spawn()
    .expect("spawn run");
    let producer_url = url_as(&server, "presence-producer", &users.producer);
    let out = cli(&publish, &[("REDIS_URL", producer_url.as_str())]);
    assert_clean("publish", &String::from_utf8_lossy(&out.stdout));
    assert_ok(&out, "publish");
    wait_drained(&mut admin, STREAM, "presence").await;
    let ops_url = url_as(&server, "presence-ops", &users.ops);
    let out = cli(&["inspect", "d"], &[("REDIS_URL", ops_url.as_str())]);
    let text = assert_ok(&out, "inspect");
    assert!(text.contains("users=[u]"), "{text}");
    assert_clean("inspect", &text);
    let mut scraped = String::new();
    eventually("/metrics answers", Duration::from_secs(10), || {
        let up = std::net::TcpStream::connect(http).is_ok();
        async move { up }
    })
    .await;
    for path in ["/metrics", "/readyz", "/healthz"] {
        scraped.push_str(&http_get(http, path).await);
    }
    assert!(scraped.contains("presence_events_total"), "{scraped}");
    assert_clean("the HTTP endpoints", &scraped);
    signal(&run, "-TERM");
    let status = run.wait().expect("wait");
    assert!(status.success());
    let logged = std::fs::read_to_string(&log).expect("log");
    assert!(logged.contains("worker started"), "{logged}");
    assert!(
        logged.contains(r#""level":"DEBUG""#),
        "verbose logs: {logged}"
    );
    assert_clean("the worker's logs", &logged);

    // `--help` lists the flags but not REDIS_URL's value.
    for args in [&["--help"][..], &["run", "--help"]] {
        let out = cli(args, &[("REDIS_URL", worker_url.as_str())]);
        let help = assert_ok(&out, "--help");
        assert!(help.contains("--redis-password-file"), "{help}");
        assert_clean("--help", &help);
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig}");
}

#[tokio::test]
async fn bad_credential_and_tls_flags_fail_before_connecting() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let (pw, empty, not_pem) = (
        file("pw", "s3cret-pw\n"),
        file("empty", "\n"),
        file("ca", "s3cret-pw\n"),
    );
    let plain = server.url();
    let tls = format!("rediss://127.0.0.1:{}", server.port);
    let with_pw = url_as(&server, "u", "s3cret-pw");
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            plain.clone(),
            vec!["--redis-password-file", "/nonexistent/pw"],
            "--redis-password-file /nonexistent/pw: cannot read it",
        ),
        (
            plain.clone(),
            vec!["--redis-password-file", &empty],
            "the file is empty",
        ),
        (
            with_pw.clone(),
            vec!["--redis-password-file", &pw],
            "the password is given twice",
        ),
        (
            plain.clone(),
            vec!["--redis-username", "u"],
            "a Redis user name needs a password",
        ),
        (
            plain.clone(),
            vec!["--redis-ca-file", &pw],
            "need a rediss:// URL",
        ),
        (
            format!("{tls}/#insecure"),
            vec![],
            "#insecure (no certificate verification) is not supported",
        ),
        (
            tls.clone(),
            vec!["--redis-client-cert", &pw],
            "--redis-client-cert and --redis-client-key go together",
        ),
        (
            tls.clone(),
            vec!["--redis-ca-file", &not_pem],
            "no PEM certificate in it",
        ),
    ];
    for (url, flags, want) in cases {
        let args: Vec<&str> = ["inspect", "42"].iter().copied().chain(flags).collect();
        let out = cli(&args, &[("REDIS_URL", url.as_str())]);
        let line = one_line_failure(&out, &format!("{args:?}"));
        assert!(
            line.contains("invalid configuration") && line.contains(want),
            "{args:?}: {line}"
        );
        assert!(!line.contains("s3cret"), "{line}");
    }
}

/// A throwaway PKI in a directory: `ca.pem`; `server.pem` and `server.key` for `names`; and
/// `client.pem` and `client.key`, both signed by the CA.
fn pki(names: &[&str]) -> tempfile::TempDir {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A name of its own: a second CA with the same name would fail as a bad signature instead.
    let ca_name = format!("presence-worker test CA {:x}", rand::random::<u32>());
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    write("ca.pem", ca.self_signed(&ca_key).unwrap().pem());
    let issuer = Issuer::new(ca, ca_key);
    let client_names = ["presence-worker"];
    for (name, sans, usage) in [
        ("server", names, ExtendedKeyUsagePurpose::ServerAuth),
        (
            "client",
            &client_names[..],
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    ] {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        write(
            &format!("{name}.pem"),
            params.signed_by(&key, &issuer).unwrap().pem(),
        );
        write(&format!("{name}.key"), key.serialize_pem());
    }
    dir
}

fn path(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).to_str().expect("utf-8").to_owned()
}

/// TLS options trusting `certs`'s CA, with its client certificate when `client` is set.
fn tls_options(certs: &tempfile::TempDir, client: bool) -> ConnectOptions {
    ConnectOptions {
        ca_file: Some(certs.path().join("ca.pem")),
        client_cert: client.then(|| certs.path().join("client.pem")),
        client_key: client.then(|| certs.path().join("client.key")),
        ..Default::default()
    }
}

async fn tls_con(server: &RedisServer, options: &ConnectOptions) -> Conn {
    let client = connection::client_with(&server.url(), options).expect("client");
    connection::manager(&client, Duration::from_secs(10))
        .await
        .expect("TLS connection")
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_publish_run_over_tls_with_a_ca_file() {
    let certs = pki(&["127.0.0.1", "localhost"]);
    let server = RedisServer::start_tls(certs.path(), false);
    let ca = path(&certs, "ca.pem");
    let by_ip = server.url();
    let by_name = format!("rediss://localhost:{}", server.port);
    for (url, user) in [(&by_ip, "alice"), (&by_name, "bob")] {
        let out = cli(
            &[
                "publish",
                "join",
                "--doc",
                "42",
                "--user",
                user,
                "--redis-ca-file",
                &ca,
            ],
            &[("REDIS_URL", url.as_str())],
        );
        assert_ok(&out, url);
    }
    let options = tls_options(&certs, false);
    let mut p = Producer::connect_with(&by_ip, &options, STREAM)
        .await
        .expect("the library producer over TLS");
    p.publish(&Event::new(EventType::Join, "42", "carol"))
        .await
        .expect("publish over TLS");
    let mut run = command(
        &[
            "run",
            "--consumer",
            "w1",
            "--block",
            "100ms",
            "--redis-ca-file",
            &ca,
        ],
        &[("REDIS_URL", by_ip.as_str())],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("spawn run");
    let mut con = tls_con(&server, &options).await;
    wait_drained(&mut con, STREAM, "presence").await;
    assert_eq!(
        smembers(&mut con, "sessions:doc:{42}:users").await,
        ["alice", "bob", "carol"]
    );
    let out = cli(
        &["inspect", "42", "--redis-ca-file", &ca],
        &[("REDIS_URL", by_ip.as_str())],
    );
    assert!(assert_ok(&out, "inspect").contains("count=3"));
    signal(&run, "-TERM");
    assert!(run.wait().expect("wait").success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let certs = pki(&["127.0.0.1"]);
    let server = RedisServer::start_tls(certs.path(), true);
    let url = server.url();
    let env = [
        ("REDIS_URL", url.as_str()),
        ("REDIS_CA_FILE", &path(&certs, "ca.pem")),
    ];
    let publish = ["publish", "join", "--doc", "42", "--user", "alice"];
    let start = Instant::now();
    let line = one_line_failure(&cli(&publish, &env), "publish without a client certificate");
    assert!(
        line.contains(&format!("cannot reach Redis at {url}"))
            && line.contains("if it requires client certificates, give --redis-client-cert"),
        "{line}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let (cert, key) = (path(&certs, "client.pem"), path(&certs, "client.key"));
    let with_cert = [
        &publish[..],
        &["--redis-client-cert", &cert, "--redis-client-key", &key],
    ];
    assert_ok(
        &cli(&with_cert.concat(), &env),
        "publish with a client certificate",
    );

    let options = tls_options(&certs, true);
    let mut c = config(&server, "w1");
    c.connect = options.clone();
    let w = RunningWorker::spawn(c);
    let mut con = tls_con(&server, &options).await;
    wait_drained(&mut con, STREAM, "presence").await;
    assert_eq!(
        smembers(&mut con, "sessions:doc:{42}:users").await,
        ["alice"]
    );
    w.stop().await;
}

#[tokio::test]
async fn a_server_certificate_we_do_not_trust_is_refused() {
    let trusted = pki(&["127.0.0.1"]);
    let other_ca = pki(&["127.0.0.1"]);
    let wrong_name = pki(&["redis.example"]);
    let publish = ["publish", "join", "--doc", "42", "--user", "alice"];
    let ca = path(&trusted, "ca.pem");
    let wrong_name_ca = path(&wrong_name, "ca.pem");
    for (server_certs, ca_file, why) in [
        (&other_ca, Some(ca.as_str()), "UnknownIssuer"),
        (&other_ca, None, "UnknownIssuer"),
        (
            &wrong_name,
            Some(wrong_name_ca.as_str()),
            "not valid for name",
        ),
    ] {
        let server = RedisServer::start_tls(server_certs.path(), false);
        let url = server.url();
        let mut env = vec![("REDIS_URL", url.as_str())];
        if let Some(ca) = ca_file {
            env.push(("REDIS_CA_FILE", ca));
        }
        let line = one_line_failure(&cli(&publish, &env), why);
        assert!(
            line.contains(&format!("cannot reach Redis at {url}")) && line.contains(why),
            "{why}: {line}"
        );
        let options = ConnectOptions {
            ca_file: ca_file.map(PathBuf::from),
            ..Default::default()
        };
        let err = Producer::connect_with(&url, &options, STREAM)
            .await
            .err()
            .expect("the library refuses it too");
        assert!(err.to_string().contains(why), "{err}");
    }
}
