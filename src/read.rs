//! Read stage: the consumer group and `XREADGROUP`.

use std::time::Duration;

use crate::connection::Conn;
use redis::Value;

use crate::config::GroupStart;
use crate::error::{Error, Result};
use crate::stream_id::StreamId;

/// The field/value pairs of a stream entry.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One stream entry as read.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Entry id.
    pub id: StreamId,
    /// Field/value pairs; `None` when the entry was deleted (trimmed) while pending.
    pub fields: Option<Fields>,
}

/// Creates `group` on `stream` (and the stream) unless it exists.
pub async fn ensure_group(
    con: &mut Conn,
    stream: &str,
    group: &str,
    start: GroupStart,
) -> Result<()> {
    let id = match start {
        GroupStart::Beginning => "0",
        GroupStart::End => "$",
    };
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg("MKSTREAM")
        .query_async(con)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        r => Ok(r?),
    }
}

/// What to read.
#[derive(Debug, Clone, Copy)]
pub enum ReadFrom {
    /// This consumer's pending entries after the given id (`0` for all), without blocking.
    Pending(StreamId),
    /// New entries, waiting up to the given time for some to arrive.
    New(Duration),
    /// New entries already there, without blocking (none: an empty reply).
    Arrived,
}

/// Reads up to `count` entries for `consumer`.
pub async fn read(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
    from: ReadFrom,
) -> Result<Vec<Entry>> {
    let mut cmd = redis::cmd("XREADGROUP");
    cmd.arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count);
    let id = match from {
        ReadFrom::Pending(after) => after.to_string(),
        ReadFrom::New(block) => {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
            ">".to_owned()
        }
        ReadFrom::Arrived => ">".to_owned(),
    };
    cmd.arg("STREAMS").arg(stream).arg(id);
    // The raw reply, not `cmd.query_async`: that walks and rebuilds the whole reply tree (every
    // entry, every field) looking for nested errors before we read it (about 5% of the worker's
    // CPU on a backlog); the parser below turns an error wherever it sits into the same error.
    let reply = redis::aio::ConnectionLike::req_packed_command(con, &cmd).await?;
    parse_read_reply(reply)
}

/// Parses an `XREADGROUP`/`XREAD` reply for a single stream (RESP2 or RESP3). A server error in
/// it, at the top or nested, is returned as that error.
pub fn parse_read_reply(reply: Value) -> Result<Vec<Entry>> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(items) => items
            .into_iter()
            .map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => Ok(kv.swap_remove(1)),
                other => Err(protocol("stream reply", &other)),
            })
            .collect::<Result<Vec<_>>>()?,
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        other => return Err(protocol("XREADGROUP reply", &other)),
    };
    let mut out = Vec::new();
    for entries in streams {
        let Value::Array(entries) = entries else {
            return Err(protocol("entries", &entries));
        };
        out.reserve(entries.len());
        for e in entries {
            out.push(parse_entry(e)?);
        }
    }
    Ok(out)
}

/// Parses one `[id, [field, value, ...] | nil]` entry.
pub fn parse_entry(e: Value) -> Result<Entry> {
    let Value::Array(mut parts) = e else {
        return Err(protocol("entry", &e));
    };
    if parts.len() != 2 {
        return Err(Error::Protocol(format!("entry of {} parts", parts.len())));
    }
    let body = parts.pop().unwrap_or(Value::Nil);
    let id = match parts.pop() {
        Some(Value::BulkString(b)) => StreamId::parse(&b),
        Some(Value::SimpleString(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| Error::Protocol("entry without a valid id".into()))?;
    let fields = match body {
        Value::Nil => None,
        Value::Array(kv) => {
            let mut fields = Vec::with_capacity(kv.len() / 2);
            let mut it = kv.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                fields.push((bytes(k)?, bytes(v)?));
            }
            Some(fields)
        }
        Value::Map(kv) => Some(
            kv.into_iter()
                .map(|(k, v)| Ok((bytes(k)?, bytes(v)?)))
                .collect::<Result<_>>()?,
        ),
        other => return Err(protocol("entry fields", &other)),
    };
    Ok(Entry { id, fields })
}

fn bytes(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        other => Err(protocol("field", &other)),
    }
}

fn protocol(what: &str, v: &Value) -> Error {
    if let Value::ServerError(e) = v {
        return Error::Redis(e.clone().into());
    }
    Error::Protocol(format!("unexpected {what}: {v:?}"))
}
