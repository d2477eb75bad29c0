//! Randomized (seeded) end-to-end check: several concurrent workers in one group apply a stream
//! of >10,000 events (MessagePack and flat forms, duplicates, out-of-order `seq`, malformed
//! entries); the final state must equal the sequential model, and a replay must change nothing.

mod common;

use std::time::Duration;

use common::model::assert_state;
use common::workload::{append, generate, model_of, STREAM};
use common::{config, wait_drained, RedisServer, RunningWorker};

const GROUP: &str = "presence";

async fn check(server: &RedisServer, seed: u64, live_producer: bool) {
    let entries = generate(seed, 12_000);
    let (model, bad) = model_of(&entries);
    let mut con = server.con().await;
    let (backlog, rest) = entries.split_at(if live_producer { 4_000 } else { entries.len() });
    append(&mut con, backlog).await;
    let workers: Vec<RunningWorker> = [7usize, 50, 123, 500]
        .iter()
        .enumerate()
        .map(|(i, &batch)| {
            let mut c = config(server, &format!("w{i}"));
            c.batch = batch;
            RunningWorker::spawn(c)
        })
        .collect();
    for chunk in rest.chunks(1000) {
        append(&mut con, chunk).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    let dead = common::xlen(&mut con, "sessions:events:dead").await;
    assert_eq!(dead, bad, "every malformed entry is dead-lettered, once");

    // Replay the whole group: the state may not change. (Malformed entries are dead-lettered
    // again: each delivery of bad input is reported.)
    common::replay_group(&mut con, STREAM, GROUP).await;
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    let dead = common::xlen(&mut con, "sessions:events:dead").await;
    assert_eq!(dead, 2 * bad);
    let applied: u64 = workers
        .iter()
        .map(|w| w.stats.applied.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let good = entries.len() - bad;
    assert!(
        applied <= good as u64,
        "replay applied nothing new: {applied} > {good}"
    );
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_on_a_backlog_match_the_sequential_model() {
    let server = RedisServer::start();
    check(&server, 1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_with_a_live_producer_match_the_sequential_model() {
    let server = RedisServer::start();
    check(&server, 2, true).await;
}
