//! Housekeeping of the stream and the group: trimming old entries no group still needs, and
//! removing consumers that are gone.

use std::time::Duration;

use crate::connection::Conn;
use redis::{Script, Value};

use crate::error::Result;
use crate::stream_id::StreamId;

/// Removes a consumer only if it has nothing pending, atomically (a consumer deleted with
/// pending entries would leave them unclaimable).
const DELETE_IDLE_CONSUMER_LUA: &str = include_str!("lua/delete_idle_consumer.lua");

/// Trims entries older than `retain` from `stream`, never past the oldest entry any group on
/// the stream still has pending or has not yet delivered. Returns the entries removed.
pub async fn trim(con: &mut Conn, stream: &str, retain: Duration) -> Result<u64> {
    let time: (u64, u64) = redis::cmd("TIME").query_async(con).await?;
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let mut cut = StreamId::new(now_ms.saturating_sub(retain.as_millis() as u64), 0);
    for g in groups(con, stream).await? {
        // Everything after the last delivered entry is still to be delivered.
        let next = g.last_delivered;
        cut = cut.min(StreamId::new(next.ms, next.seq.saturating_add(1)));
        if let Some(oldest) = oldest_pending(con, stream, &g.name).await? {
            cut = cut.min(oldest);
        }
        // Nor what a lease covers (see `lease`): its entries are replayed from the stream.
        for lease in crate::lease::list(con, stream, &g.name).await? {
            cut = cut.min(StreamId::new(
                lease.after.ms,
                lease.after.seq.saturating_add(1),
            ));
        }
    }
    let removed: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg("~")
        .arg(cut.to_string())
        .query_async(con)
        .await?;
    Ok(removed)
}

/// The oldest entry `group` has delivered and not acknowledged (the `XPENDING` summary).
pub async fn oldest_pending(con: &mut Conn, stream: &str, group: &str) -> Result<Option<StreamId>> {
    let summary: Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(con)
        .await?;
    Ok(match summary {
        Value::Array(parts) => match parts.get(1) {
            Some(Value::BulkString(b)) => StreamId::parse(b),
            _ => None,
        },
        _ => None,
    })
}

/// One consumer group of a stream, from `XINFO GROUPS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Entries delivered and not acknowledged.
    pub pending: u64,
    /// Entries not yet delivered (Redis 7; `None` when Redis cannot tell).
    pub lag: Option<u64>,
    /// Last entry delivered to the group.
    pub last_delivered: StreamId,
}

/// Every consumer group of `stream`.
pub async fn groups(
    con: &mut impl redis::aio::ConnectionLike,
    stream: &str,
) -> Result<Vec<GroupInfo>> {
    let groups: Vec<Value> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(con)
        .await?;
    Ok(groups
        .into_iter()
        .filter_map(|g| {
            let fields = field_map(g);
            let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            Some(GroupInfo {
                name: get("name")?.to_owned(),
                pending: get("pending").and_then(|v| v.parse().ok()).unwrap_or(0),
                lag: get("lag").and_then(|v| v.parse().ok()),
                last_delivered: get("last-delivered-id")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_default(),
            })
        })
        .collect())
}

/// Removes the consumers of `group` idle for longer than `idle` with nothing pending (never
/// `me`). Returns their names.
pub async fn remove_idle_consumers(
    con: &mut Conn,
    stream: &str,
    group: &str,
    me: &str,
    idle: Duration,
) -> Result<Vec<String>> {
    let consumers: Vec<Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(con)
        .await?;
    let script = Script::new(DELETE_IDLE_CONSUMER_LUA);
    let mut removed = Vec::new();
    for c in consumers {
        let fields = field_map(c);
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(name), Some(idle_ms)) =
            (get("name"), get("idle").and_then(|v| v.parse::<u64>().ok()))
        else {
            continue;
        };
        if name == me || idle_ms < idle.as_millis() as u64 || get("pending") != Some("0") {
            continue;
        }
        let deleted: i64 = script
            .key(stream)
            .arg(group)
            .arg(name)
            .invoke_async(con)
            .await?;
        if deleted >= 0 {
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

/// A RESP2 flat array or RESP3 map of name/value pairs, as text.
pub(crate) fn field_map(v: Value) -> Vec<(String, String)> {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut out = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((k, v));
            }
            out
        }
        Value::Map(kv) => kv,
        _ => return Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((text(k)?, text(v).unwrap_or_default())))
        .collect()
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(&b).into_owned()),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}
