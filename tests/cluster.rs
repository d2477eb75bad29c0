//! Redis Cluster mode and sharded streams, against a real 3-master cluster on loopback: producers
//! append to `--stream-shards` shards, replicas consume every shard, and the state must equal the
//! sequential model, through a replay, a live slot migration and a master killed and restarted.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::cluster::RedisCluster;
use common::model::assert_state;
use common::workload::{append_sharded, generate, model_of, Entry, STREAM};
use common::{wait_drained, RunningWorker};
use presence_worker::connection::{self, Conn};
use presence_worker::keys::{key_slot, Keys};
use presence_worker::snapshot::decode_request;
use presence_worker::WorkerConfig;

const GROUP: &str = "presence";
const DEAD: &str = "sessions:events:dead";

async fn cluster_con(cluster: &RedisCluster) -> Conn {
    let client = connection::open(&cluster.url(), &Default::default()).expect("cluster client");
    let con = connection::connect(&client, Duration::from_secs(10))
        .await
        .expect("cluster connection");
    assert!(con.is_cluster());
    con
}

fn worker_config(
    cluster: &RedisCluster,
    consumer: &str,
    shards: u32,
    batch: usize,
) -> WorkerConfig {
    let mut c = WorkerConfig::new(cluster.url(), consumer);
    c.block = Duration::from_millis(100);
    c.stream_shards = shards;
    c.batch = batch;
    c
}

async fn wait_all_drained(con: &mut Conn, shards: u32) {
    for stream in presence_worker::shard::streams(STREAM, shards) {
        wait_drained(con, &stream, GROUP).await;
    }
}

async fn dead_letters(con: &mut Conn) -> usize {
    common::xlen(con, DEAD).await
}

/// The totals every slot keeps must add up to the model's.
async fn assert_totals(con: &mut Conn, model: &common::model::Model) {
    let keys = Keys::new("sessions").with_cluster(true);
    let (live, present) = presence_worker::ops::totals(con, &keys)
        .await
        .expect("totals");
    let users = model.users();
    let want_present: usize = users.values().map(BTreeSet::len).sum();
    let want_live: usize = users.keys().map(|d| model.live_sessions(d).len()).sum();
    assert_eq!(
        (live, present),
        (want_live as i64, want_present as i64),
        "totals over all slots"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_a_cluster_with_sharded_streams_match_the_model() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster_con(&cluster).await;
    let shards = 4;
    let entries = generate(7, 6_000);
    let (model, bad) = model_of(&entries);
    // The shards are spread over the masters (their hash tags {0}..{3}).
    let nodes: BTreeSet<usize> = presence_worker::shard::streams(STREAM, shards)
        .iter()
        .map(|s| cluster.node_for_slot(key_slot(s.as_bytes())))
        .collect();
    assert!(nodes.len() >= 2, "shards on one master only: {nodes:?}");

    let (backlog, rest) = entries.split_at(2_500);
    append_sharded(&mut con, backlog, STREAM, shards).await;
    let workers: Vec<RunningWorker> = [(0, 50), (1, 200), (2, 500)]
        .iter()
        .map(|&(i, batch)| {
            let mut c = worker_config(&cluster, &format!("w{i}"), shards, batch);
            c.snapshots.thresholds = vec![3, 6];
            RunningWorker::spawn(c)
        })
        .collect();
    for chunk in rest.chunks(500) {
        append_sharded(&mut con, chunk, STREAM, shards).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_all_drained(&mut con, shards).await;
    assert_state(&mut con, "sessions", &model).await;
    assert_totals(&mut con, &model).await;
    assert_eq!(
        dead_letters(&mut con).await,
        bad,
        "each malformed entry dead-lettered once"
    );

    // Snapshot requests cross slots (outbox in the document's, stream in its own): each once.
    let ids = snapshot_ids(&mut con).await;
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert!(!ids.is_empty(), "thresholds 3 and 6 were crossed");
    assert_eq!(unique.len(), ids.len(), "no snapshot request twice");

    // Replaying every shard changes nothing.
    for stream in presence_worker::shard::streams(STREAM, shards) {
        common::replay_group(&mut con, &stream, GROUP).await;
    }
    wait_all_drained(&mut con, shards).await;
    assert_state(&mut con, "sessions", &model).await;
    assert_totals(&mut con, &model).await;
    assert_eq!(snapshot_ids(&mut con).await.len(), ids.len());

    // The ops commands see every slot: top is the documents by count, repair finds nothing.
    let keys = Keys::new("sessions").with_cluster(true);
    let top = presence_worker::ops::top(&mut con, &keys, 5)
        .await
        .expect("top");
    let mut want: Vec<(String, u64)> = model
        .users()
        .into_iter()
        .filter(|(_, u)| !u.is_empty())
        .map(|(d, u)| (d, u.len() as u64))
        .collect();
    want.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    want.truncate(5);
    assert_eq!(top, want);
    let report = presence_worker::ops::repair(&mut con, &keys, 600_000, 90_000, false, |_, _| {})
        .await
        .expect("repair");
    assert!(report.broken.is_empty(), "{:?}", report.broken);
    assert_eq!(report.documents as usize, model.users().len());
    for w in workers {
        w.stop().await;
    }
}

async fn snapshot_ids(con: &mut Conn) -> Vec<String> {
    common::xrange(con, "sessions:snapshots")
        .await
        .iter()
        .map(|(_, f)| {
            let bytes = &f.iter().find(|(k, _)| k == "e").expect("field e").1;
            decode_request(bytes).expect("request").snapshot_id
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_and_a_master_restart_lose_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("presence_worker=debug")
        .try_init();
    let mut cluster = RedisCluster::start(3);
    let mut con = cluster_con(&cluster).await;
    let shards = 3;
    let entries = generate(11, 6_000);
    let (model, bad) = model_of(&entries);
    let parts: Vec<&[Entry]> = entries.chunks(2_000).collect();
    let workers: Vec<RunningWorker> = (0..2)
        .map(|i| RunningWorker::spawn(worker_config(&cluster, &format!("w{i}"), shards, 200)))
        .collect();
    append_sharded(&mut con, parts[0], STREAM, shards).await;

    // Move the hottest document's slot, and the slot of one shard stream, while workers run.
    let hot = Keys::new("sessions").doc("doc-0").users;
    let hot_slot = key_slot(hot.as_bytes());
    let stream_slot = key_slot(presence_worker::shard::shard_stream(STREAM, 1).as_bytes());
    for slot in [hot_slot, stream_slot] {
        let to = (cluster.node_for_slot(slot) + 1) % 3;
        cluster.migrate_slot(slot, to);
        assert_eq!(cluster.node_for_slot(slot), to);
    }
    append_sharded(&mut con, parts[1], STREAM, shards).await;

    // Kill -9 the master serving the hot document, and bring it back (AOF, fsync always).
    let victim = cluster.node_for_slot(hot_slot);
    cluster.restart_node(victim);
    // The producer connection may need a moment to find the node again.
    let mut con = cluster_con(&cluster).await;
    append_sharded(&mut con, parts[2], STREAM, shards).await;

    wait_all_drained(&mut con, shards).await;
    assert_state(&mut con, "sessions", &model).await;
    assert_totals(&mut con, &model).await;
    assert_eq!(dead_letters(&mut con).await, bad);
    for w in workers {
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sessions_expire_on_every_slot() {
    let cluster = RedisCluster::start(3);
    let mut con = cluster_con(&cluster).await;
    let docs: Vec<String> = (0..30).map(|d| format!("quiet-{d}")).collect();
    let producer = presence_worker::produce::Producer::connect(&cluster.url(), STREAM)
        .await
        .expect("producer");
    let mut producer = producer.with_shards(2);
    let events: Vec<presence_worker::Event> = docs
        .iter()
        .map(|d| presence_worker::Event::new(presence_worker::EventType::Join, d.as_str(), "u"))
        .collect();
    producer.publish_many(&events).await.expect("publish");
    let mut c = worker_config(&cluster, "w0", 2, 100);
    c.session_ttl = Duration::from_secs(1);
    let worker = RunningWorker::spawn(c);
    let keys = Keys::new("sessions");
    // Joined, then expired: every document empty again, on whichever master it lives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen_present = false;
    loop {
        let mut present = 0;
        for d in &docs {
            let n: usize = redis::cmd("SCARD")
                .arg(keys.doc(d).users)
                .query_async(&mut con)
                .await
                .expect("SCARD");
            present += n;
        }
        seen_present |= present > 0;
        if seen_present && present == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{present} still present"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        worker
            .stats
            .expired
            .load(std::sync::atomic::Ordering::Relaxed)
            >= docs.len() as u64,
        "the worker expired them"
    );
    let (live, present) =
        presence_worker::ops::totals(&mut con, &Keys::new("sessions").with_cluster(true))
            .await
            .expect("totals");
    assert_eq!((live, present), (0, 0));
    worker.stop().await;
}

/// A worker loads its scripts on every primary as it starts, before any event needs them (on a
/// cluster, the calls in flight at once would otherwise each fail with `NOSCRIPT` and load them
/// again: hundreds of loads at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_loads_its_scripts_on_every_primary_as_it_starts() {
    let cluster = RedisCluster::start(3);
    let worker = RunningWorker::spawn(worker_config(&cluster, "w0", 2, 100));
    let cached = |i: usize| -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query(&mut cluster.node_con(i))
            .expect("INFO memory");
        info.lines()
            .find_map(|l| l.strip_prefix("number_of_cached_scripts:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("number_of_cached_scripts")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // The apply, expiry and claim scripts, with no event sent at all.
        let counts: Vec<u64> = (0..3).map(cached).collect();
        if counts.iter().all(|&n| n >= 3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scripts cached per primary: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
}
