//! A real Redis Cluster on loopback for integration tests: `N` masters (no replicas), each a
//! [`RedisServer`] with cluster mode on, its own data directory, `nodes.conf` and an
//! always-fsynced AOF, so a master killed with `SIGKILL` and restarted comes back with its keys
//! and its slots.
//!
//! * [`RedisCluster::start`] starts the nodes, joins them with `redis-cli --cluster create` and
//!   waits until every node agrees the cluster is up.
//! * [`RedisCluster::con`] is a cluster connection (it follows `MOVED` and `ASK`).
//! * [`RedisCluster::migrate_slot`] moves a slot and its keys to another master while the cluster
//!   is live, as `redis-cli --cluster reshard` would.
//! * [`RedisCluster::restart_node`] kills a master with `SIGKILL` and restarts it in place.
//! * [`key_slot`] is Redis's own key-to-slot rule, to pick keys on a given slot or node.
//!
//! Every process is killed when the [`RedisCluster`] is dropped.
//!
//! The blocking methods (`start`, `node_for_slot`, `migrate_slot`, `restart_node`) may be
//! called from a multi-threaded tokio test: they step out of the runtime with
//! [`tokio::task::block_in_place`] so connections driven by the runtime keep running meanwhile.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::Value;

use super::{free_port, RedisServer};

/// Number of hash slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// `--cluster-node-timeout` of every node, in milliseconds.
pub const NODE_TIMEOUT_MS: u64 = 2000;

/// How long [`RedisCluster`] waits for the nodes to agree (after create, a migration or a
/// restart) before panicking.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keys moved per `MIGRATE` in [`RedisCluster::migrate_slot`].
const MIGRATE_BATCH: usize = 16;

/// `MIGRATE` timeout, in milliseconds.
const MIGRATE_TIMEOUT_MS: u64 = 5000;

/// One master of the cluster.
struct Node {
    /// The `redis-server` process, its port and its data directory.
    server: RedisServer,
    /// Its cluster bus port (`--cluster-port`).
    bus_port: u16,
    /// Its node id (`CLUSTER MYID`), kept across restarts in `nodes.conf`.
    id: String,
    /// The arguments it was started with, to restart it identically.
    args: Vec<String>,
}

/// A Redis Cluster of `N` masters and no replicas on 127.0.0.1, every node in its own temporary
/// directory; every process is killed on drop.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

impl RedisCluster {
    /// Starts `masters` (at least 3, as `redis-cli --cluster create` requires) cluster-enabled
    /// `redis-server`s on free loopback ports (client port and an explicit `--cluster-port`),
    /// with `--cluster-node-timeout 2000`, `--appendonly yes --appendfsync always` and no RDB
    /// snapshots; joins them with `redis-cli --cluster create ... --cluster-replicas 0` (slots
    /// split evenly, in order: node 0 serves the lowest slots); then waits until every node
    /// reports `cluster_state:ok`, sees every other node connected and not failing, and reports
    /// the same `CLUSTER SLOTS`. Panics with the reason if that takes more than 30 s.
    pub fn start(masters: usize) -> Self {
        assert!(
            masters >= 3,
            "RedisCluster::start({masters}): redis-cli --cluster create needs at least 3 masters"
        );
        blocking(|| {
            let mut nodes = Vec::with_capacity(masters);
            for _ in 0..masters {
                let bus_port = free_port();
                let args: Vec<String> = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-port",
                    &bus_port.to_string(),
                    "--cluster-node-timeout",
                    &NODE_TIMEOUT_MS.to_string(),
                    "--appendonly",
                    "yes",
                    "--appendfsync",
                    "always",
                    "--save",
                    "",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                let server = RedisServer::start_with(&as_strs(&args));
                nodes.push(Node {
                    server,
                    bus_port,
                    id: String::new(),
                    args,
                });
            }
            let mut create = Command::new("redis-cli");
            create.args(["--cluster", "create"]);
            for n in &nodes {
                create.arg(format!("127.0.0.1:{}", n.server.port));
            }
            create.args(["--cluster-replicas", "0", "--cluster-yes"]);
            let out = create
                .output()
                .expect("redis-cli must be installed (apt-get install redis-tools)");
            assert!(
                out.status.success(),
                "redis-cli --cluster create failed ({}):\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            for n in &mut nodes {
                let mut con = node_connection(n.server.port)
                    .unwrap_or_else(|e| panic!("connect to node {}: {e}", n.server.port));
                n.id = redis::cmd("CLUSTER")
                    .arg("MYID")
                    .query(&mut con)
                    .expect("CLUSTER MYID");
            }
            let cluster = Self { nodes };
            cluster.wait_settled("after redis-cli --cluster create");
            cluster
        })
    }

    /// The client port of every master, in node order (index `i` is node `i` everywhere).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.server.port).collect()
    }

    /// The cluster bus port (`--cluster-port`) of every master, in node order.
    pub fn bus_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.bus_port).collect()
    }

    /// The node id (`CLUSTER MYID`) of every master, in node order.
    pub fn ids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.id.clone()).collect()
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`: every master as a seed.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// `["redis://127.0.0.1:p1", ...]`: every master as a seed URL, in node order.
    pub fn seeds(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// A cluster connection seeded with every master, with a 10 s response timeout (also the
    /// overall timeout of one request including its redirections and retries).
    pub async fn con(&self) -> ClusterConnection {
        ClusterClient::builder(self.seeds())
            .response_timeout(Duration::from_secs(10))
            .build()
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("cluster connection")
    }

    /// A plain (blocking) connection to node `i` alone, with 10 s read and write timeouts: for
    /// `CLUSTER` commands and to look at one node's data (it does not follow redirections).
    pub fn node_con(&self, i: usize) -> redis::Connection {
        let port = self.nodes[i].server.port;
        node_connection(port).unwrap_or_else(|e| panic!("connect to node {i} (port {port}): {e}"))
    }

    /// Index of the master serving `slot` now, from `CLUSTER SLOTS` (asked of the first node that
    /// answers).
    pub fn node_for_slot(&self, slot: u16) -> usize {
        assert!(slot < SLOTS, "slot {slot} out of range");
        blocking(|| {
            let mut errors = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                match node_connection(n.server.port).and_then(|mut c| cluster_slots(&mut c)) {
                    Ok(ranges) => {
                        let (_, _, id) = ranges
                            .iter()
                            .find(|(start, end, _)| (*start..=*end).contains(&slot))
                            .unwrap_or_else(|| {
                                panic!("node {i} reports no master for slot {slot}: {ranges:?}")
                            });
                        return self.index_of(id);
                    }
                    Err(e) => errors.push(format!("node {i}: {e}")),
                }
            }
            panic!("no node answered CLUSTER SLOTS: {errors:?}");
        })
    }

    /// Kills master `i` with `SIGKILL` and restarts it on the same ports, arguments and
    /// directory (so with its `nodes.conf`, hence its id and slots, and its AOF, hence its
    /// keys); then waits until every node reports `cluster_state:ok` and agrees on the slots
    /// again (panics after 30 s).
    pub fn restart_node(&mut self, i: usize) {
        blocking(|| {
            let node = &mut self.nodes[i];
            let args = node.args.clone();
            node.server.restart(&as_strs(&args));
            self.wait_settled(&format!("after restarting node {i}"));
        });
    }

    /// Moves `slot` and its keys to master `to` while the cluster is live, as a resharding
    /// does: `CLUSTER SETSLOT <slot> IMPORTING <source>` on the target, `MIGRATING <target>` on
    /// the source, `CLUSTER GETKEYSINSLOT` + `MIGRATE ... KEYS` (16 keys a batch, timeout
    /// 5000 ms) until the slot is empty on the source, then `CLUSTER SETSLOT <slot> NODE
    /// <target>` on the target, the source and every other master; then waits until every node
    /// agrees (panics after 30 s). Does nothing if `to` already serves `slot`.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        assert!(slot < SLOTS, "slot {slot} out of range");
        assert!(to < self.nodes.len(), "no node {to}");
        let from = self.node_for_slot(slot);
        if from == to {
            return;
        }
        blocking(|| {
            let source_id = &self.nodes[from].id;
            let target_id = &self.nodes[to].id;
            let target_port = self.nodes[to].server.port;
            let mut source = self.node_con(from);
            let mut target = self.node_con(to);
            setslot(&mut target, slot, "IMPORTING", source_id, "target");
            setslot(&mut source, slot, "MIGRATING", target_id, "source");
            loop {
                let keys: Vec<Vec<u8>> = redis::cmd("CLUSTER")
                    .arg("GETKEYSINSLOT")
                    .arg(slot)
                    .arg(MIGRATE_BATCH)
                    .query(&mut source)
                    .expect("CLUSTER GETKEYSINSLOT on the source");
                if keys.is_empty() {
                    break;
                }
                let reply: String = redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(target_port)
                    .arg("")
                    .arg(0)
                    .arg(MIGRATE_TIMEOUT_MS)
                    .arg("KEYS")
                    .arg(&keys)
                    .query(&mut source)
                    .unwrap_or_else(|e| panic!("MIGRATE of slot {slot} to node {to}: {e}"));
                assert!(
                    reply == "OK" || reply == "NOKEY",
                    "MIGRATE of slot {slot}: {reply}"
                );
            }
            // The target first, so it owns the slot (and bumps its config epoch) before the
            // source stops redirecting with ASK; then the source, then everyone else.
            setslot(&mut target, slot, "NODE", target_id, "target");
            setslot(&mut source, slot, "NODE", target_id, "source");
            for i in (0..self.nodes.len()).filter(|&i| i != from && i != to) {
                let mut other = self.node_con(i);
                setslot(&mut other, slot, "NODE", target_id, "other master");
            }
            self.wait_settled(&format!("after migrating slot {slot} to node {to}"));
        });
        let now = self.node_for_slot(slot);
        assert_eq!(
            now, to,
            "slot {slot} is served by node {now} after migrating it to node {to}"
        );
    }

    /// Index of the node with id `id`.
    fn index_of(&self, id: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == id)
            .unwrap_or_else(|| panic!("unknown node id {id}"))
    }

    /// Waits until the cluster is settled (see [`RedisCluster::settled`]); panics with `what`
    /// and the last reason it was not after [`SETTLE_TIMEOUT`].
    fn wait_settled(&self, what: &str) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let why = match self.settled() {
                Ok(()) => return,
                Err(why) => why,
            };
            assert!(
                Instant::now() < deadline,
                "Redis Cluster not settled {what} within {SETTLE_TIMEOUT:?}: {why}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Ok` when every node reports `cluster_state:ok` with every slot assigned and every node
    /// known, sees every other node connected and none failing (`CLUSTER NODES`), and reports
    /// the same slot ranges and owners (`CLUSTER SLOTS`) covering all slots; else why not.
    fn settled(&self) -> Result<(), String> {
        let n = self.nodes.len();
        let mut first: Option<Vec<(u16, u16, String)>> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            let mut con = node_connection(node.server.port)
                .map_err(|e| format!("node {i}: cannot connect: {e}"))?;
            let info: String = redis::cmd("CLUSTER")
                .arg("INFO")
                .query(&mut con)
                .map_err(|e| format!("node {i}: CLUSTER INFO: {e}"))?;
            let fields: HashMap<&str, &str> = info
                .lines()
                .filter_map(|l| l.trim().split_once(':'))
                .collect();
            let expect = [
                ("cluster_state", "ok".to_owned()),
                ("cluster_slots_assigned", SLOTS.to_string()),
                ("cluster_slots_ok", SLOTS.to_string()),
                ("cluster_known_nodes", n.to_string()),
                ("cluster_size", n.to_string()),
            ];
            for (key, want) in &expect {
                let got = fields.get(key).copied().unwrap_or("<missing>");
                if got != want {
                    return Err(format!("node {i}: {key}:{got}, want {want}"));
                }
            }
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut con)
                .map_err(|e| format!("node {i}: CLUSTER NODES: {e}"))?;
            for line in nodes.lines().filter(|l| !l.trim().is_empty()) {
                // <id> <ip:port@cport> <flags> <master> <ping-sent> <pong-recv> <epoch> <link> ...
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 8 {
                    return Err(format!("node {i}: odd CLUSTER NODES line {line:?}"));
                }
                let flags: Vec<&str> = f[2].split(',').collect();
                if flags
                    .iter()
                    .any(|fl| fl.starts_with("fail") || *fl == "handshake")
                {
                    return Err(format!("node {i} sees {}: {line}", f[0]));
                }
                if !flags.contains(&"myself") && f[7] != "connected" {
                    return Err(format!("node {i} is not connected to {}: {line}", f[0]));
                }
            }
            let mut ranges = cluster_slots(&mut con).map_err(|e| format!("node {i}: {e}"))?;
            ranges.sort();
            let mut next = 0u32;
            for (start, end, id) in &ranges {
                if u32::from(*start) != next {
                    return Err(format!("node {i}: slot {next} unassigned: {ranges:?}"));
                }
                if !self.nodes.iter().any(|n| &n.id == id) {
                    return Err(format!("node {i}: unknown owner {id} of {start}-{end}"));
                }
                next = u32::from(*end) + 1;
            }
            if next != u32::from(SLOTS) {
                return Err(format!(
                    "node {i}: slots from {next} unassigned: {ranges:?}"
                ));
            }
            match &first {
                None => first = Some(ranges),
                Some(r0) if *r0 != ranges => {
                    return Err(format!(
                        "nodes 0 and {i} disagree on slots: {r0:?} vs {ranges:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Redis Cluster's key-to-slot rule: the worker's own implementation, which the self-test checks
/// against the server's `CLUSTER KEYSLOT`.
#[allow(unused_imports)] // not every test crate that includes this module uses it
pub use presence_worker::keys::key_slot;

/// A blocking connection to the node at `127.0.0.1:port`, with 10 s read and write timeouts.
fn node_connection(port: u16) -> redis::RedisResult<redis::Connection> {
    let con = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(10)))?;
    con.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(con)
}

/// `CLUSTER SLOTS` as `(first slot, last slot, master id)` ranges, in reply order.
fn cluster_slots(con: &mut redis::Connection) -> redis::RedisResult<Vec<(u16, u16, String)>> {
    let reply: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(con)?;
    let mut ranges = Vec::with_capacity(reply.len());
    for entry in reply {
        // [start, end, [ip, port, id, metadata], replicas...]
        let mut it = entry.into_iter();
        let (Some(start), Some(end), Some(master)) = (it.next(), it.next(), it.next()) else {
            return Err(odd_reply("CLUSTER SLOTS entry"));
        };
        let master: Vec<Value> = redis::from_redis_value(master)?;
        let Some(id) = master.into_iter().nth(2) else {
            return Err(odd_reply("CLUSTER SLOTS master"));
        };
        ranges.push((
            redis::from_redis_value(start)?,
            redis::from_redis_value(end)?,
            redis::from_redis_value(id)?,
        ));
    }
    Ok(ranges)
}

/// A parse error for an unexpected reply shape.
fn odd_reply(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, what))
}

/// `CLUSTER SETSLOT <slot> <state> <id>` on one node (named `who` in the panic message).
fn setslot(con: &mut redis::Connection, slot: u16, state: &str, id: &str, who: &str) {
    let () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg(state)
        .arg(id)
        .query(con)
        .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {state} on the {who}: {e}"));
}

/// `args` as `&str`s.
fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs blocking `f` outside the tokio runtime's scheduling when called from a multi-threaded
/// runtime (so tasks on this worker move elsewhere meanwhile), else just runs it.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
