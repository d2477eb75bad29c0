//! Operator commands: `status` (groups, consumers, lag, pending, dead letters), `top` (busiest
//! documents, from an index the scripts keep) and `repair` (check every document's derived state
//! against its session records, and rebuild it).

use std::io::Write as _;

use crate::connection::Conn;
use redis::Script;
use serde::Serialize;

use crate::error::Result;
use crate::keys::Keys;
use crate::retention::{groups, GroupInfo};

/// Checks (and with `fix`, rebuilds) one document (see the header of `lua/repair.lua`).
const REPAIR_LUA: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/repair.lua")
);

/// A consumer of a group.
#[derive(Debug, Clone, Serialize)]
pub struct ConsumerInfo {
    /// Its name.
    pub name: String,
    /// Entries it holds unacknowledged.
    pub pending: u64,
    /// Milliseconds since it last read.
    pub idle_ms: u64,
}

/// A group with its consumers.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    /// Group name.
    pub name: String,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered (`None` when Redis cannot tell).
    pub lag: Option<u64>,
    /// Last entry delivered to the group.
    pub last_delivered: String,
    /// Age of the oldest pending entry, in milliseconds.
    pub oldest_pending_age_ms: Option<u64>,
    /// Leases of backlog batches read and not yet acknowledged (see [`crate::lease`]): the
    /// pending entries of leased reads.
    pub leases: u64,
    /// The consumers.
    pub consumers: Vec<ConsumerInfo>,
}

/// Everything `presence-worker status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Events stream.
    pub stream: String,
    /// Its length.
    pub stream_length: u64,
    /// Entries in the dead-letter stream.
    pub dead_letters: u64,
    /// Live sessions over all documents.
    pub live_sessions: i64,
    /// Present users over all documents.
    pub present_users: i64,
    /// The groups on the stream.
    pub groups: Vec<GroupStatus>,
}

/// Reads the status of `stream` and its groups.
pub async fn status(
    con: &mut Conn,
    keys: &Keys,
    stream: &str,
    dead_stream: &str,
) -> Result<Status> {
    let stream_length: u64 = redis::cmd("XLEN").arg(stream).query_async(con).await?;
    let dead_letters: u64 = redis::cmd("XLEN").arg(dead_stream).query_async(con).await?;
    let (live, present) = totals(con, keys).await?;
    let time: (u64, u64) = redis::cmd("TIME").query_async(con).await?;
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let mut out = Vec::new();
    let found = if stream_length > 0 || exists(con, stream).await? {
        groups(con, stream).await?
    } else {
        Vec::new()
    };
    for GroupInfo {
        name,
        pending,
        lag,
        last_delivered,
    } in found
    {
        let oldest = crate::retention::oldest_pending(con, stream, &name).await?;
        let leases = crate::lease::count(con, stream, &name).await?;
        let consumers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg(&name)
            .query_async(con)
            .await?;
        let consumers = consumers
            .into_iter()
            .filter_map(|c| {
                let f = crate::retention::field_map(c);
                let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
                Some(ConsumerInfo {
                    name: get("name")?,
                    pending: get("pending")?.parse().ok()?,
                    idle_ms: get("idle")?.parse().ok()?,
                })
            })
            .collect();
        out.push(GroupStatus {
            name,
            pending,
            lag,
            last_delivered: last_delivered.to_string(),
            oldest_pending_age_ms: oldest.map(|id| now_ms.saturating_sub(id.ms)),
            leases,
            consumers,
        });
    }
    Ok(Status {
        stream: stream.to_owned(),
        stream_length,
        dead_letters,
        live_sessions: live,
        present_users: present,
        groups: out,
    })
}

async fn exists(con: &mut Conn, key: &str) -> Result<bool> {
    Ok(redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(con)
        .await?
        == 1)
}

/// The totals over all documents: live sessions and present users (on a cluster, the sum of
/// every hash slot's totals).
pub async fn totals(con: &mut Conn, keys: &Keys) -> Result<(i64, i64)> {
    let cmds: Vec<(u16, redis::Cmd)> = keys
        .all_globals()
        .into_iter()
        .map(|(slot, g)| {
            (
                slot,
                redis::cmd("HMGET")
                    .arg(g.stats)
                    .arg("live_sessions")
                    .arg("present_users")
                    .to_owned(),
            )
        })
        .collect();
    let rows: Vec<(Option<i64>, Option<i64>)> = con.query_all(&cmds).await?;
    Ok(rows.into_iter().fold((0, 0), |(l, p), (a, b)| {
        (l + a.unwrap_or(0), p + b.unwrap_or(0))
    }))
}

/// The `n` documents with the most users present, most first.
pub async fn top(con: &mut Conn, keys: &Keys, n: usize) -> Result<Vec<(String, u64)>> {
    let cmds: Vec<(u16, redis::Cmd)> = keys
        .all_globals()
        .into_iter()
        .map(|(slot, g)| {
            (
                slot,
                redis::cmd("ZRANGE")
                    .arg(g.top)
                    .arg("+inf")
                    .arg("1")
                    .arg("BYSCORE")
                    .arg("REV")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(n)
                    .arg("WITHSCORES")
                    .to_owned(),
            )
        })
        .collect();
    let mut rows: Vec<(String, u64)> = con
        .query_all::<Vec<(String, f64)>>(&cmds)
        .await?
        .into_iter()
        .flatten()
        .map(|(d, c)| (d, c as u64))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    rows.truncate(n);
    Ok(rows)
}

/// What `repair` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Documents checked.
    pub documents: u64,
    /// Documents with problems, and the problems.
    pub broken: Vec<(String, Vec<String>)>,
    /// Whether they were fixed.
    pub fixed: bool,
}

/// Walks every document (SCAN, never a blocking KEYS), checking each against its session records
/// and, with `fix`, rebuilding it atomically. `progress` is told the documents done so far and
/// the total.
pub async fn repair(
    con: &mut Conn,
    keys: &Keys,
    history_ms: u64,
    ttl_ms: u64,
    fix: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<RepairReport> {
    let mut docs = std::collections::BTreeSet::new();
    let [records, sessions] = keys.records_patterns();
    for pattern in [records, sessions, keys.users_pattern()] {
        for key in con.scan_match(&pattern).await? {
            if let Some(doc) = keys.doc_of(&key) {
                docs.insert(doc.to_owned());
            }
        }
    }
    let script = Script::new(REPAIR_LUA);
    let mut report = RepairReport {
        fixed: fix,
        ..Default::default()
    };
    let total = docs.len() as u64;
    for doc in docs {
        let mut inv = script.prepare_invoke();
        for key in keys
            .globals_of(&doc)
            .script_keys()
            .into_iter()
            .chain([keys.doc(&doc).script_key()])
        {
            inv.key(key);
        }
        // Repairs never emit snapshot requests nor publish changes: default options.
        let options = crate::snapshot::SnapshotConfig::default()
            .script_options(&keys.channel_prefix(), crate::apply::DEFAULT_USER_SESSIONS);
        inv.arg(history_ms).arg(ttl_ms).arg(options);
        inv.arg(if fix { "1" } else { "0" }).arg(&doc);
        let problems: Vec<String> = inv.invoke_async(con).await?;
        report.documents += 1;
        progress(report.documents, total);
        if !problems.is_empty() {
            report.broken.push((doc, problems));
        }
    }
    Ok(report)
}

/// A progress bar on stderr, rewritten in place (only when stderr is a terminal).
pub fn print_progress(done: u64, total: u64) {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() || (done != total && !done.is_multiple_of(50)) {
        return;
    }
    let width = 30;
    let filled = (done * width / total.max(1)) as usize;
    eprint!(
        "\r[{}{}] {done}/{total} documents",
        "#".repeat(filled),
        " ".repeat(width as usize - filled)
    );
    let _ = std::io::stderr().flush();
}
