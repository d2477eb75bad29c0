//! The dead-letter stream as operators use it: list the entries, replay them after a fix.
//!
//! A dead letter holds `error`, `entry_id` and `stream` first (written by [`crate::ack`]), then
//! the original fields unchanged.

use crate::connection::Conn;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::read::Fields;
use crate::stream_id::StreamId;

/// How many fields the worker puts before the original ones.
const OWN_FIELDS: usize = 3;

/// One dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterEntry {
    /// Its id in the dead-letter stream.
    pub id: String,
    /// Why it was not applied.
    pub error: String,
    /// The original entry id.
    pub entry_id: String,
    /// The stream it came from.
    pub stream: String,
    /// The original fields (values shown lossily as text).
    pub fields: Vec<(String, String)>,
    /// The original event, when it decodes (summary: `type doc user session`).
    pub event: Option<String>,
    #[serde(skip)]
    raw: Fields,
}

/// `XRANGE key start end COUNT count`.
async fn xrange(
    con: &mut Conn,
    key: &str,
    start: &str,
    end: &str,
    count: usize,
) -> Result<Vec<(String, Fields)>> {
    Ok(redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg(end)
        .arg("COUNT")
        .arg(count)
        .query_async(con)
        .await?)
}

/// Lists up to `count` dead letters, oldest first.
pub async fn list(con: &mut Conn, dead_stream: &str, count: usize) -> Result<Vec<DeadLetterEntry>> {
    let rows = xrange(con, dead_stream, "-", "+", count).await?;
    Ok(rows.into_iter().map(|(id, raw)| parse(id, raw)).collect())
}

fn parse(id: String, raw: Fields) -> DeadLetterEntry {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let own = |name: &[u8]| {
        raw.iter()
            .take(OWN_FIELDS)
            .find(|(k, _)| k == name)
            .map(|(_, v)| text(v))
    };
    let original: Fields = raw.iter().skip(OWN_FIELDS).cloned().collect();
    let entry_id = own(b"entry_id").unwrap_or_default();
    let event = crate::event::decode_entry(
        entry_id.parse().unwrap_or_default(),
        &original,
        &Limits::default(),
    )
    .ok()
    .map(|e| {
        format!(
            "{} doc={} user={} session={}",
            e.kind.as_str(),
            e.doc,
            e.user,
            e.session_id()
        )
    });
    DeadLetterEntry {
        error: own(b"error").unwrap_or_default(),
        stream: own(b"stream").unwrap_or_default(),
        entry_id,
        fields: original.iter().map(|(k, v)| (text(k), text(v))).collect(),
        event,
        id,
        raw: original,
    }
}

/// Moves dead letters back to their stream (`ids`, or all when empty): each is appended anew
/// with its original fields and removed from the dead-letter stream in one `MULTI`.
///
/// A replayed event gets a new entry id: without `seq` it counts as its session's latest event.
pub async fn replay(con: &mut Conn, dead_stream: &str, ids: &[String]) -> Result<usize> {
    let mut entries = Vec::new();
    if ids.is_empty() {
        let mut after = "-".to_owned();
        loop {
            let rows = xrange(con, dead_stream, &after, "+", 500).await?;
            let Some(last) = rows.last() else { break };
            let id: StreamId = last
                .0
                .parse()
                .map_err(|_| Error::Protocol(format!("entry id {:?}", last.0)))?;
            after = StreamId::new(id.ms, id.seq + 1).to_string();
            entries.extend(rows.into_iter().map(|(id, raw)| parse(id, raw)));
        }
    } else {
        for id in ids {
            let rows = xrange(con, dead_stream, id, id, 1).await?;
            let Some((id, raw)) = rows.into_iter().next() else {
                return Err(Error::Config(format!("no dead letter with id {id}")));
            };
            entries.push(parse(id, raw));
        }
    }
    for e in &entries {
        if e.stream.is_empty() || e.raw.is_empty() {
            return Err(Error::Config(format!(
                "dead letter {} has no original stream or fields",
                e.id
            )));
        }
        let mut add = redis::cmd("XADD");
        add.arg(&e.stream).arg("*");
        for (k, v) in &e.raw {
            add.arg(k).arg(v);
        }
        let mut del = redis::cmd("XDEL");
        del.arg(dead_stream).arg(&e.id);
        if con.is_cluster() {
            // Different hash slots: no transaction. A crash between the two replays the entry
            // twice, which the worker recognises (same event id).
            add.query_async::<()>(con).await?;
            del.query_async::<()>(con).await?;
        } else {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .add_command(add)
                .ignore()
                .add_command(del)
                .ignore();
            pipe.query_async::<()>(con).await?;
        }
    }
    Ok(entries.len())
}
