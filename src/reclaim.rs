//! Reclaim stage: entries other consumers left pending (`XAUTOCLAIM`), and delivery counts.

use std::collections::HashMap;
use std::time::Duration;

use crate::connection::Conn;
use redis::Value;

use crate::error::{Error, Result};
use crate::read::{parse_entry, Entry};
use crate::stream_id::StreamId;

/// What one `XAUTOCLAIM` call returned.
#[derive(Debug, Default)]
pub struct Claimed {
    /// Where the next call starts; `0-0` when the whole pending list was scanned.
    pub next: StreamId,
    /// Entries now owned by this consumer.
    pub entries: Vec<Entry>,
    /// Ids whose payload had been deleted (Redis 7 drops them from the pending list itself).
    pub deleted: usize,
}

/// Whether `consumer` has an entry pending for longer than `min_idle`: one it was delivered and
/// never processed, because the reply of a read was lost and the read retried (a cluster
/// connection retries by itself after a node fails). Such entries are replayed with id `0`.
pub async fn has_stale_own(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
) -> Result<bool> {
    let rows: Vec<Value> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("IDLE")
        .arg(min_idle.as_millis() as u64)
        .arg("-")
        .arg("+")
        .arg(1)
        .arg(consumer)
        .query_async(con)
        .await?;
    Ok(!rows.is_empty())
}

/// Claims up to `count` entries idle for at least `min_idle` from any consumer, from `start`.
pub async fn autoclaim(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    min_idle: Duration,
    start: StreamId,
    count: usize,
) -> Result<Claimed> {
    let reply: Value = redis::cmd("XAUTOCLAIM")
        .arg(stream)
        .arg(group)
        .arg(consumer)
        .arg(min_idle.as_millis() as u64)
        .arg(start.to_string())
        .arg("COUNT")
        .arg(count)
        .query_async(con)
        .await?;
    let Value::Array(mut parts) = reply else {
        return Err(Error::Protocol(format!("XAUTOCLAIM reply {reply:?}")));
    };
    if parts.len() < 2 {
        return Err(Error::Protocol("short XAUTOCLAIM reply".into()));
    }
    let deleted = match parts.get(2) {
        Some(Value::Array(ids)) => ids.len(),
        _ => 0,
    };
    parts.truncate(2);
    let entries = match parts.pop() {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(parse_entry)
            .collect::<Result<Vec<_>>>()?,
        other => return Err(Error::Protocol(format!("XAUTOCLAIM entries {other:?}"))),
    };
    let next = match parts.pop() {
        Some(Value::BulkString(b)) => StreamId::parse(&b),
        Some(Value::SimpleString(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| Error::Protocol("XAUTOCLAIM without a cursor".into()))?;
    Ok(Claimed {
        next,
        entries,
        deleted,
    })
}

/// How many times each of `entries` (pending on `consumer`) has been delivered.
pub async fn delivery_counts(
    con: &mut Conn,
    stream: &str,
    group: &str,
    consumer: &str,
    entries: &[Entry],
) -> Result<HashMap<StreamId, u64>> {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return Ok(HashMap::new());
    };
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(first.id.to_string())
        .arg(last.id.to_string())
        .arg(entries.len())
        .arg(consumer)
        .query_async(con)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, _, _, n)| Some((id.parse().ok()?, n)))
        .collect())
}
