//! The README's Python producer, run exactly as written, against a real Redis and worker.

mod common;

use std::process::Command;

use common::{config, wait_drained, RedisServer, RunningWorker};
use presence_worker::inspect::inspect;
use presence_worker::keys::Keys;

fn python_block(readme: &str) -> String {
    let start = readme
        .find("```python\n")
        .expect("README has a python block")
        + "```python\n".len();
    let len = readme[start..].find("```").expect("closed python block");
    readme[start..start + len].to_owned()
}

#[tokio::test]
async fn the_readme_python_producer_works() {
    let have_deps = Command::new("python3")
        .args(["-c", "import msgpack, redis"])
        .status()
        .is_ok_and(|s| s.success());
    if !have_deps {
        // CI installs them (.ci/run); on a developer machine say what is missing.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs python3 with msgpack and redis"
        );
        eprintln!("SKIPPED the_readme_python_producer_works: pip install msgpack redis");
        return;
    }
    let server = RedisServer::start();
    let script = python_block(include_str!("../README.md"));
    let out = Command::new("python3")
        .args(["-c", &script])
        .env("REDIS_URL", server.url())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = RunningWorker::spawn(config(&server, "w1"));
    let mut con = server.con().await;
    wait_drained(&mut con, "sessions:events", "presence").await;
    let s = inspect(&mut con, &Keys::new("sessions"), "42")
        .await
        .unwrap();
    assert_eq!(s.users, ["alice"]);
    assert_eq!(s.count, Some(1));
    let alice = s.live_sessions().next().unwrap();
    assert_eq!(
        (alice.session.as_str(), alice.seq.as_deref()),
        ("tab1", Some("2"))
    );
    assert_eq!(
        alice.meta.as_ref().unwrap()["name"],
        "Alice",
        "heartbeat kept the join's meta"
    );
    assert_eq!(
        w.stats
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    w.stop().await;
}
