//! Leased reads (`src/lease.rs`): a backlog read without the pending-entries list, each batch
//! under a lease. A worker that read under a lease and died is stood in for by a test that calls
//! `lease::read` and never applies what it got: the lease is then all that remembers those
//! entries.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::model::{assert_state, Model};
use common::workload::{append, generate, model_of, STREAM};
use common::{config, create_group, group_pending_lag, wait_drained, xlen, RedisServer};
use common::{field, xrange, RunningWorker};
use presence_worker::connection::Conn;
use presence_worker::lease;

const GROUP: &str = "presence";

async fn leases(con: &mut Conn) -> Vec<lease::Lease> {
    lease::list(con, STREAM, GROUP).await.expect("leases")
}

/// A server whose stream holds `n` generated entries (seed `seed`) and the group, created at the
/// start; with a connection and the entries' model.
async fn backlog(seed: u64, n: usize) -> (RedisServer, Conn, Model) {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let entries = generate(seed, n);
    append(&mut con, &entries).await;
    create_group(&mut con, STREAM, GROUP).await;
    (server, con, model_of(&entries).0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_read_under_leases_and_leaves_none() {
    let server = RedisServer::start();
    let mut con = server.con().await;
    let entries = generate(41, 20_000);
    let (model, _) = model_of(&entries);
    append(&mut con, &entries).await;
    let mut cfg = config(&server, "w1");
    cfg.batch = 500;
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    let leased = w.stats.leased.load(Ordering::Relaxed);
    assert!(
        leased >= 10_000,
        "most of the backlog was read under leases: {leased}"
    );
    assert!(leases(&mut con).await.is_empty());
    assert_eq!(group_pending_lag(&mut con, STREAM, GROUP).await, (0, 0));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_that_reaches_the_end_goes_through_the_pending_list() {
    let (_server, mut con, _) = backlog(42, 250).await;
    // 250 left, 100 asked: a lease and no pending entry.
    let r = lease::read(&mut con, STREAM, GROUP, "dead", 100)
        .await
        .unwrap();
    assert_eq!((r.pending.len(), r.leased.len()), (0, 100));
    assert!(r.lease.is_some());
    // 150 left, 200 asked: the script reads them through the pending-entries list; no lease.
    let r = lease::read(&mut con, STREAM, GROUP, "dead", 200)
        .await
        .unwrap();
    assert_eq!((r.pending.len(), r.leased.len(), r.lease), (150, 0, None));
    assert_eq!(group_pending_lag(&mut con, STREAM, GROUP).await, (150, 0));
    // Nothing left: nothing read, no lease recorded.
    let r = lease::read(&mut con, STREAM, GROUP, "dead", 200)
        .await
        .unwrap();
    assert!(r.pending.is_empty() && r.leased.is_empty() && r.lease.is_none());
    let held = leases(&mut con).await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].count, held[0].attempts), (100, 1));
    assert_eq!(held[0].consumer, "dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_consumer_is_taken_over_and_applied() {
    let (server, mut con, model) = backlog(43, 3_000).await;
    // A consumer reads 2,000 entries under a lease, and dies before applying them: the group
    // shows nothing pending for them.
    let r = lease::read(&mut con, STREAM, GROUP, "dead", 2_000)
        .await
        .unwrap();
    assert_eq!(r.leased.len(), 2_000);
    assert_eq!(group_pending_lag(&mut con, STREAM, GROUP).await, (0, 1_000));
    let mut cfg = config(&server, "w1");
    cfg.claim_idle = Duration::from_millis(500);
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    assert!(leases(&mut con).await.is_empty());
    assert!(w.stats.reclaimed.load(Ordering::Relaxed) >= 2_000);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_replays_its_own_lease_when_it_starts() {
    let (server, mut con, model) = backlog(44, 1_500).await;
    lease::read(&mut con, STREAM, GROUP, "w1", 1_000)
        .await
        .unwrap();
    // Others' leases are never taken over here (--claim-idle 0): only w1's own replay applies
    // those 1,000 entries.
    let mut cfg = config(&server, "w1");
    cfg.claim_idle = Duration::ZERO;
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    assert!(leases(&mut con).await.is_empty());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_delivered_too_often_is_dead_lettered() {
    let (server, mut con, _) = backlog(45, 300).await;
    let r = lease::read(&mut con, STREAM, GROUP, "w1", 100)
        .await
        .unwrap();
    let field_name = r.lease.expect("a lease");
    // As if w1 had crashed on these entries again and again.
    let _: () = redis::cmd("HSET")
        .arg(lease::key(STREAM, GROUP))
        .arg(&field_name)
        .arg("100|0|5")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut cfg = config(&server, "w1");
    cfg.max_deliveries = 5;
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    // The lease's 100 entries, and the generator's malformed ones among the others.
    let dead: Vec<String> = xrange(&mut con, "sessions:events:dead")
        .await
        .into_iter()
        .filter(|(_, f)| field(f, "error").as_deref() == Some("too many deliveries (6)"))
        .filter_map(|(_, f)| field(&f, "entry_id"))
        .collect();
    let covered: Vec<String> = r.leased.iter().map(|e| e.id.to_string()).collect();
    assert_eq!(dead, covered);
    assert!(leases(&mut con).await.is_empty());
    w.stop().await;
}

#[tokio::test]
async fn trimming_keeps_what_a_lease_covers() {
    let (_server, mut con, _) = backlog(46, 5_000).await;
    let r = lease::read(&mut con, STREAM, GROUP, "dead", 4_000)
        .await
        .unwrap();
    assert_eq!(r.leased.len(), 4_000);
    // 4,000 delivered and none pending: without the lease, trimming would take them.
    tokio::time::sleep(Duration::from_millis(5)).await;
    presence_worker::retention::trim(&mut con, STREAM, Duration::from_millis(1))
        .await
        .unwrap();
    assert_eq!(xlen(&mut con, STREAM).await, 5_000);
    lease::release(&mut con, STREAM, GROUP, &r.lease.unwrap())
        .await
        .unwrap();
    presence_worker::retention::trim(&mut con, STREAM, Duration::from_millis(1))
        .await
        .unwrap();
    assert!(
        xlen(&mut con, STREAM).await <= 1_100,
        "trimmed once released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_eval_in_its_acl_a_worker_reads_through_the_pending_list() {
    let (server, mut con, model) = backlog(47, 5_000).await;
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER", "noeval", "on", ">pw", "~*", "&*", "+@all", "-eval",
            ][..],
        )
        .query_async(&mut con)
        .await
        .unwrap();
    let mut cfg = config(&server, "w1");
    cfg.redis_url = server.url().replace("redis://", "redis://noeval:pw@");
    cfg.batch = 500;
    let w = RunningWorker::spawn(cfg);
    wait_drained(&mut con, STREAM, GROUP).await;
    assert_state(&mut con, "sessions", &model).await;
    assert_eq!(w.stats.leased.load(Ordering::Relaxed), 0);
    assert!(leases(&mut con).await.is_empty());
    w.stop().await;
}
