//! Leased reads: how a backlog is read without the pending-entries list.
//!
//! `XREADGROUP` puts every entry it delivers in the group's pending-entries list (two radix-tree
//! inserts, and an `XCLAIM` built for propagation), and `XACK` takes it out again: measured here,
//! 2.4–2.8 µs of Redis time per entry, against 0.5 µs for the same read with `NOACK`; a fifth of
//! what the worker costs Redis per event. In a backlog the worker therefore reads with `NOACK`,
//! and records instead, in the same `MULTI`, one *lease* per batch: "`consumer` takes the
//! `count` entries after `<id>`" (`lua/lease.lua`), in the hash `<stream>:leases:<group>`. The
//! batch is acknowledged by deleting its lease, in the same `MULTI` as its dead letters.
//!
//! A lease left behind (a crash, a failed batch) is replayed: by its own consumer when it starts
//! and after a failed batch, by any other consumer once it is older than `--claim-idle` (taken
//! over atomically, its attempt count raised: past `--max-deliveries` its entries are
//! dead-lettered, as redeliveries are). A lease may cover more entries than its read got (a
//! short read): replaying those is harmless, every event being idempotent.
//!
//! The read that may reach the end of the stream goes through the pending-entries list as before
//! (the script reads it itself), and a batch with pending entries is acknowledged only after the
//! leased batches before it: so a group with no lag and nothing pending has had everything
//! applied, as before, unless a replica died holding a lease (then the leases hash shows it).
//! Not on a Redis Cluster: the lease and the read must be in one slot.

use redis::Value;

use crate::connection::Conn;
use crate::error::{Error, Result};
use crate::read::{parse_entry, parse_read_reply, Entry};
use crate::stream_id::StreamId;

/// The script that records a lease (see the module's documentation).
pub const SCRIPT: &str = include_str!("lua/lease.lua");

/// The hash of `group`'s leases on `stream`.
pub fn key(stream: &str, group: &str) -> String {
    format!("{stream}:leases:{group}")
}

/// What one leased read returned.
#[derive(Debug, Default)]
pub struct LeasedRead {
    /// Entries read through the pending-entries list (acknowledged with `XACK`).
    pub pending: Vec<Entry>,
    /// Entries read with `NOACK`, covered by `lease`.
    pub leased: Vec<Entry>,
    /// The lease's field, when one was recorded.
    pub lease: Option<String>,
    /// The read delivered entries that no lease covers (the lease script failed): apply them,
    /// and stop reading with leases.
    pub uncovered: bool,
}

/// Reads up to `count` new entries for `consumer` without blocking: a lease and a `NOACK` read in
/// one `MULTI` (see the module's documentation). A lease recorded for a read that got nothing is
/// deleted before returning, so the next lease of this consumer never has its field.
pub async fn read(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    group: &str,
    consumer: &str,
    count: usize,
) -> Result<LeasedRead> {
    let leases = key(stream, group);
    let mut pipe = redis::pipe();
    pipe.atomic();
    // A command Redis refuses when out of memory (`SET … XX` of a key that never exists: it writes
    // nothing): with it, a Redis at `maxmemory` refuses the whole `EXEC`, where it would otherwise
    // fail the script's lease write and still run the read.
    pipe.cmd("SET")
        .arg(format!("{leases}:guard"))
        .arg("")
        .arg("XX");
    pipe.cmd("EVAL")
        .arg(SCRIPT)
        .arg(2)
        .arg(stream)
        .arg(&leases)
        .arg(group)
        .arg(consumer)
        .arg(count)
        .arg(crate::ids::now_ms());
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("NOACK")
        .arg("STREAMS")
        .arg(stream)
        .arg(">");
    // The raw reply (see `read::read`): MULTI's OK, three QUEUED, then EXEC's array.
    let mut replies = redis::aio::ConnectionLike::req_packed_commands(con, &pipe, 4, 1).await?;
    let exec = replies.pop().unwrap_or(Value::Nil);
    let Value::Array(mut parts) = exec else {
        return Err(unexpected("EXEC reply", &exec));
    };
    if parts.len() != 3 {
        return Err(Error::Protocol(format!("EXEC of {} replies", parts.len())));
    }
    let read = parts.pop().unwrap_or(Value::Nil);
    let script = parts.pop().unwrap_or(Value::Nil);
    // A failed read (NOGROUP, ...) is the error that matters; it delivered nothing.
    let leased = parse_read_reply(read)?;
    let script = match script {
        Value::Array(mut two) if two.len() == 2 => {
            let entries = match two.pop() {
                Some(Value::Array(entries)) => entries
                    .into_iter()
                    .map(parse_entry)
                    .collect::<Result<Vec<_>>>(),
                other => Err(unexpected("lease entries", &other.unwrap_or(Value::Nil))),
            };
            let field = match two.pop() {
                Some(Value::BulkString(b)) => Some(String::from_utf8_lossy(&b).into_owned()),
                _ => None,
            };
            entries.map(|entries| (field, entries))
        }
        other => Err(unexpected("lease reply", &other)),
    };
    let (lease, pending) = match script {
        Ok((None, _)) | Err(_) if !leased.is_empty() => {
            // The read delivered entries no lease covers (the script failed: an ACL, a full
            // Redis). They are in hand: they are returned, to be applied (nothing to acknowledge),
            // with `uncovered` set so that the caller stops reading this way. Only a crash
            // before they are applied could lose them.
            let why = script
                .err()
                .map_or("no lease recorded".into(), |e| e.to_string());
            tracing::error!(error = %why, entries = leased.len(), "a NOACK read without its lease");
            return Ok(LeasedRead {
                pending: Vec::new(),
                leased,
                lease: None,
                uncovered: true,
            });
        }
        Err(e) => return Err(e),
        Ok(found) => found,
    };
    let lease = match lease {
        Some(field) if leased.is_empty() => {
            release(con, stream, group, &field).await?;
            None
        }
        lease => lease,
    };
    Ok(LeasedRead {
        pending,
        leased,
        lease,
        uncovered: false,
    })
}

/// Deletes a lease (its batch is done, or it covered nothing).
pub async fn release(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    stream: &str,
    group: &str,
    field: &str,
) -> Result<()> {
    redis::cmd("HDEL")
        .arg(key(stream, group))
        .arg(field)
        .query_async::<()>(con)
        .await?;
    Ok(())
}

/// How many leases `group` on `stream` holds (`status` and the sampled gauge).
pub async fn count(con: &mut Conn, stream: &str, group: &str) -> Result<u64> {
    Ok(redis::cmd("HLEN")
        .arg(key(stream, group))
        .query_async(con)
        .await?)
}

/// One lease, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Its field in the leases hash.
    pub field: String,
    /// It covers the entries after this id...
    pub after: StreamId,
    /// ...up to this many.
    pub count: usize,
    /// Who holds it.
    pub consumer: String,
    /// When it was recorded or last taken over (ms since the epoch, the holder's clock).
    pub at_ms: i64,
    /// How many times its entries were delivered (1 for the read itself).
    pub attempts: u64,
}

impl Lease {
    /// Whether it was recorded or last taken over more than `idle` before `now_ms` (ms since
    /// the epoch).
    pub fn older_than(&self, now_ms: i64, idle: std::time::Duration) -> bool {
        now_ms - self.at_ms > idle.as_millis() as i64
    }

    /// Parses a field and its value; `None` when either is malformed.
    pub fn parse(field: &str, value: &str) -> Option<Lease> {
        let (after, consumer) = field.split_once('|')?;
        let mut v = value.split('|');
        let count = v.next()?.parse().ok()?;
        let at_ms = v.next()?.parse().ok()?;
        let attempts = v.next()?.parse().ok()?;
        Some(Lease {
            field: field.to_owned(),
            after: after.parse().ok()?,
            count,
            consumer: consumer.to_owned(),
            at_ms,
            attempts,
        })
    }
}

/// Every lease of `group` on `stream`. A field this version cannot parse is left alone (it may
/// be a newer version's) and logged.
pub async fn list(con: &mut Conn, stream: &str, group: &str) -> Result<Vec<Lease>> {
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key(stream, group))
        .query_async(con)
        .await?;
    let mut out = Vec::with_capacity(all.len());
    for (field, value) in all {
        match Lease::parse(&field, &value) {
            Some(l) => out.push(l),
            None => tracing::warn!(%field, %value, "a lease this version cannot read: left alone"),
        }
    }
    Ok(out)
}

/// Takes `lease` over for `consumer` (or renews it, when it is already its own) with one more
/// attempt: the old field deleted and the new one written in one `MULTI`. `None` when the lease
/// was gone already (its batch finished, or another consumer took it first).
pub async fn take(
    con: &mut Conn,
    stream: &str,
    group: &str,
    lease: &Lease,
    consumer: &str,
) -> Result<Option<Lease>> {
    let leases = key(stream, group);
    let mine = Lease {
        field: format!("{}|{consumer}", lease.after),
        consumer: consumer.to_owned(),
        at_ms: crate::ids::now_ms(),
        attempts: lease.attempts + 1,
        ..lease.clone()
    };
    let value = format!("{}|{}|{}", mine.count, mine.at_ms, mine.attempts);
    let (deleted, _): (u64, u64) = redis::pipe()
        .atomic()
        .cmd("HDEL")
        .arg(&leases)
        .arg(&lease.field)
        .cmd("HSET")
        .arg(&leases)
        .arg(&mine.field)
        .arg(value)
        .query_async(con)
        .await?;
    if deleted == 0 {
        release(con, stream, group, &mine.field).await?;
        return Ok(None);
    }
    Ok(Some(mine))
}

/// The entries `lease` covers still in the stream.
pub async fn entries(con: &mut Conn, stream: &str, lease: &Lease) -> Result<Vec<Entry>> {
    let reply: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(format!("({}", lease.after))
        .arg("+")
        .arg("COUNT")
        .arg(lease.count)
        .query_async(con)
        .await?;
    match reply {
        Value::Array(entries) => entries.into_iter().map(parse_entry).collect(),
        other => Err(unexpected("XRANGE reply", &other)),
    }
}

fn unexpected(what: &str, v: &Value) -> Error {
    if let Value::ServerError(e) = v {
        return Error::Redis(e.clone().into());
    }
    Error::Protocol(format!("unexpected {what}: {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_parses_from_its_field_and_value() {
        let l = Lease::parse("1700000000000-3|w|1", "2000|1700000000500|2").expect("lease");
        assert_eq!(l.after, StreamId::new(1_700_000_000_000, 3));
        assert_eq!(l.consumer, "w|1");
        assert_eq!((l.count, l.at_ms, l.attempts), (2000, 1_700_000_000_500, 2));
        for (f, v) in [
            ("nope|w", "1|2|3"),
            ("1-1", "1|2|3"),
            ("1-1|w", "x|2|3"),
            ("1-1|w", "1|2"),
        ] {
            assert_eq!(Lease::parse(f, v), None, "{f} {v}");
        }
    }
}
