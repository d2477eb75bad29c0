//! Self-test of the Redis Cluster harness in `tests/common/cluster.rs`: a real 3-master cluster
//! on loopback, `key_slot` against the server's `CLUSTER KEYSLOT`, a live slot migration and a
//! `SIGKILL` restart of a master, with every key read back through a cluster connection.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{key_slot, RedisCluster, SLOTS};
use redis::cluster_async::ClusterConnection;

/// Keys written by the test: 150 spread over the slots, and 50 sharing the hash tag `{moving}`
/// (one slot, the one the test migrates, so it moves in several `MIGRATE` batches).
fn written_keys() -> Vec<String> {
    (0..150)
        .map(|i| format!("key:{i}"))
        .chain((0..50).map(|i| format!("{{moving}}:{i}")))
        .collect()
}

/// The value written under `key`.
fn value_of(key: &str) -> String {
    format!("value-of-{key}")
}

/// Reads every key of [`written_keys`] through the cluster connection and checks its value.
async fn assert_all_readable(con: &mut ClusterConnection, when: &str) {
    for key in written_keys() {
        let got: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(con)
            .await
            .unwrap_or_else(|e| panic!("GET {key} {when}: {e}"));
        assert_eq!(got, Some(value_of(&key)), "{key} {when}");
    }
}

/// `CLUSTER COUNTKEYSINSLOT <slot>` on node `i` alone.
fn keys_in_slot_on(cluster: &RedisCluster, i: usize, slot: u16) -> usize {
    tokio::task::block_in_place(|| {
        redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query(&mut cluster.node_con(i))
            .expect("CLUSTER COUNTKEYSINSLOT")
    })
}

#[test]
fn key_slot_matches_the_cluster_spec_examples() {
    // The CRC16 check value from the Redis Cluster specification.
    assert_eq!(key_slot(b"123456789"), 0x31C3);
    assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
    // Empty tag: the whole key is hashed.
    assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
    // The tag ends at the first `}` after the first `{`.
    assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
    assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    assert!((0..1000).all(|i| key_slot(format!("k{i}").as_bytes()) < SLOTS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_harness_slots_migration_and_restart() {
    let t0 = Instant::now();
    let mut cluster = RedisCluster::start(3);
    let started = t0.elapsed();
    assert_eq!(cluster.ports().len(), 3);
    assert_eq!(cluster.seeds().len(), 3);
    let url = cluster.url();
    assert!(url.starts_with("redis+cluster://127.0.0.1:"), "{url}");
    assert_eq!(url.matches(',').count(), 2, "{url}");

    // key_slot agrees with the server, hash tags included.
    let mut node0 = redis::Client::open(cluster.seeds()[0].as_str())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to node 0");
    let mut samples: Vec<Vec<u8>> = [
        "",
        "a",
        "foo",
        "123456789",
        "sessions:doc:{a}:users",
        "sessions:doc:{a}:outbox",
        "{}x",
        "a{}{b}",
        "{b}",
        "{",
        "}",
        "}{",
        "{a",
        "a}",
        "{{}}",
        "{}",
        "x{y}z{w}",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{user1000}.following",
        "presence:{room-42}:members",
        "ünïcödé{ключ}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    samples.push(b"\xff\x00{\x01\x02}tail".to_vec());
    samples.push(vec![0u8; 17]);
    samples.extend((0..25).map(|i| format!("key:{i}").into_bytes()));
    for key in &samples {
        let server: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut node0)
            .await
            .expect("CLUSTER KEYSLOT");
        assert_eq!(
            key_slot(key),
            server,
            "key_slot({:?})",
            String::from_utf8_lossy(key)
        );
    }

    // Write 200 keys across the cluster; every master gets some.
    let mut con = cluster.con().await;
    for key in written_keys() {
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(value_of(&key))
            .query_async(&mut con)
            .await
            .unwrap_or_else(|e| panic!("SET {key}: {e}"));
    }
    let mut per_node = [0usize; 3];
    for key in written_keys() {
        per_node[cluster.node_for_slot(key_slot(key.as_bytes()))] += 1;
    }
    assert!(
        per_node.iter().all(|&n| n > 0),
        "keys per node: {per_node:?}"
    );
    assert_all_readable(&mut con, "after writing").await;

    // Live migration of the `{moving}` slot (50 keys) to the next master.
    let slot = key_slot(b"{moving}:0");
    let from = cluster.node_for_slot(slot);
    let to = (from + 1) % 3;
    assert_eq!(keys_in_slot_on(&cluster, from, slot), 50);

    // Half-way through a migration (started by hand), reads of moved keys get ASK: the cluster
    // connection follows it; then migrate_slot takes over and finishes the move.
    let ids = cluster.ids();
    tokio::task::block_in_place(|| {
        let mut source = cluster.node_con(from);
        let mut target = cluster.node_con(to);
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&ids[from])
            .query(&mut target)
            .expect("SETSLOT IMPORTING");
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&ids[to])
            .query(&mut source)
            .expect("SETSLOT MIGRATING");
        let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(20)
            .query(&mut source)
            .expect("GETKEYSINSLOT");
        let () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(cluster.ports()[to])
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query(&mut source)
            .expect("MIGRATE");
    });
    assert_eq!(keys_in_slot_on(&cluster, from, slot), 30);
    assert_eq!(keys_in_slot_on(&cluster, to, slot), 20);
    assert_all_readable(&mut con, "half-way through the migration").await;

    let t = Instant::now();
    cluster.migrate_slot(slot, to);
    let migrated = t.elapsed();
    assert_eq!(cluster.node_for_slot(slot), to);
    assert_eq!(keys_in_slot_on(&cluster, from, slot), 0);
    assert_eq!(keys_in_slot_on(&cluster, to, slot), 50);
    cluster.migrate_slot(slot, to); // already there: a no-op
    assert_all_readable(&mut con, "after the migration").await;

    // SIGKILL and restart the master that received the slot: nodes.conf keeps the slot, the AOF
    // keeps the migrated keys (and its own).
    let t = Instant::now();
    cluster.restart_node(to);
    let restarted = t.elapsed();
    assert_eq!(cluster.node_for_slot(slot), to);
    assert_eq!(keys_in_slot_on(&cluster, to, slot), 50);
    assert_all_readable(&mut con, "after the restart (same connection)").await;
    let mut fresh = cluster.con().await;
    assert_all_readable(&mut fresh, "after the restart (new connection)").await;
    let () = redis::cmd("SET")
        .arg("{moving}:after-restart")
        .arg("yes")
        .query_async(&mut fresh)
        .await
        .expect("write to the restarted master");

    let total = t0.elapsed();
    eprintln!(
        "cluster self-test: start {started:?}, migrate {migrated:?}, restart {restarted:?}, \
         total {total:?}"
    );
    assert!(
        total < Duration::from_secs(60),
        "cluster self-test took {total:?}"
    );
}
