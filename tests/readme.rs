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

/// The README block of `lang` that contains `marker`.
fn block_with(readme: &str, lang: &str, marker: &str) -> String {
    let fence = format!("```{lang}\n");
    readme
        .match_indices(&fence)
        .map(|(at, _)| {
            let start = at + fence.len();
            let len = readme[start..].find("```").expect("closed block");
            readme[start..start + len].to_owned()
        })
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("README has a {lang} block with {marker:?}"))
}

/// The README's shard function in Python and in JavaScript (the languages this machine runs),
/// as written, agrees with the Rust one on the README's test vectors and on many more ids.
#[test]
fn the_readme_shard_functions_agree_with_the_worker() {
    let readme = include_str!("../README.md");
    let mut docs: Vec<String> = ["", "a", "doc-42", "foobar", "é", "team/roadmap-2027"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    docs.extend((0..200).map(|i| format!("doc-{i}-ü-{}", i * 7919)));
    let want: Vec<String> = docs
        .iter()
        .flat_map(|d| [1, 4, 16, 1000].map(|n| presence_worker::shard::shard_of(d, n).to_string()))
        .collect();
    let json = serde_json::to_string(&docs).unwrap();
    let runs = [
        (
            "python3",
            format!(
                "{}\nimport json, sys\nprint(' '.join(str(shard(d, n)) for d in json.loads(sys.argv[1]) for n in (1, 4, 16, 1000)))",
                block_with(readme, "python", "def shard")
            ),
            "-c",
        ),
        (
            "node",
            format!(
                "{}\nconsole.log(JSON.parse(process.argv[1]).flatMap(d => [1, 4, 16, 1000].map(n => shard(d, n))).join(' '))",
                block_with(readme, "js", "function shard")
            ),
            "-e",
        ),
    ];
    for (program, script, flag) in runs {
        let out = match Command::new(program)
            .args([flag, &script])
            .arg(&json)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                assert!(std::env::var_os("CI").is_none(), "CI needs {program}: {e}");
                eprintln!("SKIPPED {program}: {e}");
                continue;
            }
        };
        assert!(
            out.status.success(),
            "{program}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(got, want, "{program}");
    }
}
