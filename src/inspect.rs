//! Reading a document's state back: what `presence-worker inspect` prints.

use std::collections::HashMap;

use crate::connection::Conn;
use rmpv::ValueRef;
use serde::Serialize;

use crate::error::Result;
use crate::event::{decode_meta, Meta, MAX_DEPTH};
use crate::keys::{Keys, SESSION_SEP};

/// One session as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// User id.
    pub user: String,
    /// Session id.
    pub session: String,
    /// Whether the session is live (ended sessions are kept a while as ordering history).
    pub live: bool,
    /// `seq` of the deciding event, if it had one.
    pub seq: Option<String>,
    /// Stream entry id of the deciding event.
    pub entry_id: String,
    /// 32-bit hash of the deciding event's id ([`crate::apply::id_hash`]).
    pub event_id_hash: u32,
    /// Whether the session ended by expiry.
    pub expired: bool,
    /// Redis server time (ms) of the last refresh (live sessions) or of the end (ended sessions).
    pub last_change_ms: Option<i64>,
    /// The session's meta.
    pub meta: Option<Meta>,
}

/// A document's presence state, read in one atomic step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DocState {
    /// Users present, sorted.
    pub users: Vec<String>,
    /// The `count` key (absent means 0).
    pub count: Option<i64>,
    /// Sessions, live and recently ended, sorted by user and session.
    pub sessions: Vec<SessionInfo>,
}

impl DocState {
    /// The live sessions only.
    pub fn live_sessions(&self) -> impl Iterator<Item = &SessionInfo> {
        self.sessions.iter().filter(|s| s.live)
    }
}

/// Reads the state of `doc` under `keys`.
pub async fn inspect(con: &mut Conn, keys: &Keys, doc: &str) -> Result<DocState> {
    let k = keys.doc(doc);
    type Reply = (
        Vec<String>,
        Option<i64>,
        Vec<(String, Vec<u8>)>,
        Vec<(String, Vec<u8>)>,
        HashMap<String, i64>,
        HashMap<String, i64>,
    );
    let (mut users, count, records, raw, alive, ended): Reply = redis::pipe()
        .atomic()
        .smembers(&k.users)
        .get(&k.count)
        .hgetall(&k.records)
        .hgetall(&k.sessions)
        .zrange_withscores(&k.alive, 0, -1)
        .zrange_withscores(&k.ended, 0, -1)
        .query_async(con)
        .await?;
    users.sort();
    // The records hash, and the sessions hash of a document an earlier version wrote and this
    // one has not touched since (a document has one or the other).
    let mut sessions: Vec<SessionInfo> = records
        .iter()
        .flat_map(|(user, rec)| {
            entries(rec).filter_map(move |(session, rec)| {
                parse_record(user, std::str::from_utf8(session).ok()?, rec)
            })
        })
        .collect();
    sessions.extend(raw.into_iter().filter_map(|(field, rec)| {
        let (user, session) = field.split_once(SESSION_SEP)?;
        let mut info = parse_record(user, session, &rec)?;
        if info.last_change_ms.is_none() {
            // A record of an earlier layout: its time is its score in the index.
            let times = if info.live { &alive } else { &ended };
            info.last_change_ms = times.get(&field).copied();
        }
        Some(info)
    }));
    sessions.sort_by(|a, b| (&a.user, &a.session).cmp(&(&b.user, &b.session)));
    Ok(DocState {
        users,
        count,
        sessions,
    })
}

/// The first byte of a session record of the current layout (a byte MessagePack never uses).
const RECORD_MARKER: u8 = 0xC1;

/// The entries of a user's value in the records hash (see `lua/common.lua`): each session id and
/// its record. (A truncated entry ends the list.)
pub fn entries(mut rec: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    std::iter::from_fn(move || {
        let [a, b, c, d] = take::<4>(&mut rec)?;
        let session_len = usize::from(u16::from_be_bytes([a, b]));
        let record_len = usize::from(u16::from_be_bytes([c, d]));
        let (session, rest) = rec.split_at_checked(session_len)?;
        let (record, rest) = rest.split_at_checked(record_len)?;
        rec = rest;
        Some((session, record))
    })
}

/// Parses one session record (see `lua/common.lua` for its layout), current or of one of the two
/// earlier layouts (without the marker and time; a MessagePack map).
fn parse_record(user: &str, session: &str, rec: &[u8]) -> Option<SessionInfo> {
    let mut info = SessionInfo {
        user: user.to_owned(),
        session: session.to_owned(),
        live: false,
        seq: None,
        entry_id: String::new(),
        event_id_hash: 0,
        expired: false,
        last_change_ms: None,
        meta: None,
    };
    let (&first, mut rest) = rec.split_first()?;
    let flags = if first == RECORD_MARKER {
        let [flags, t @ ..] = take::<7>(&mut rest)?;
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&t);
        info.last_change_ms = i64::try_from(u64::from_be_bytes(ms)).ok();
        flags
    } else {
        first
    };
    if flags >= 0x80 {
        parse_legacy_record(rec, &mut info)?;
        return Some(info);
    }
    info.live = flags & 1 != 0;
    info.expired = flags & 4 != 0;
    if flags & 2 != 0 {
        info.seq = Some(take_u64(&mut rest)?.to_string());
    }
    let ms = take_u64(&mut rest)?;
    let sq = take_sequence(&mut rest, flags & 32 != 0)?;
    info.entry_id = format!("{ms}-{sq}");
    info.event_id_hash = u32::from_be_bytes(take(&mut rest)?);
    if flags & 8 != 0 {
        // The meta version (not shown).
        if flags & 16 != 0 {
            take_u64(&mut rest)?;
        }
        take_u64(&mut rest)?;
        take_sequence(&mut rest, flags & 64 != 0)?;
    }
    if !rest.is_empty() {
        info.meta = decode_meta(rest);
    }
    Some(info)
}

fn take<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    let (head, rest) = b.split_first_chunk::<N>()?;
    *b = rest;
    Some(*head)
}

fn take_u64(b: &mut &[u8]) -> Option<u64> {
    take(b).map(u64::from_be_bytes)
}

/// A stream id sequence: a u64 when `wide`, else a u32.
fn take_sequence(b: &mut &[u8], wide: bool) -> Option<u64> {
    if wide {
        take_u64(b)
    } else {
        take(b).map(|x| u64::from(u32::from_be_bytes(x)))
    }
}

/// A record of the earlier layout: a MessagePack map (l, m/s, q, i, x, mm/ms/mq, d).
fn parse_legacy_record(rec: &[u8], info: &mut SessionInfo) -> Option<()> {
    let mut rd = rec;
    let ValueRef::Map(pairs) =
        rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH).ok()?
    else {
        return None;
    };
    let (mut ms, mut sq) = (String::new(), String::new());
    for (k, v) in &pairs {
        let text = || match v {
            ValueRef::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            ValueRef::Integer(i) => i.to_string(),
            _ => String::new(),
        };
        let ValueRef::String(k) = k else { continue };
        let int = || match v {
            ValueRef::Integer(i) => i.as_i64(),
            _ => None,
        };
        match k.as_str()? {
            "l" => info.live = int() == Some(1),
            "q" => info.seq = Some(text()),
            "m" => ms = text(),
            "s" => sq = text(),
            "i" => info.event_id_hash = int().unwrap_or(0) as u32,
            "x" => info.expired = int() == Some(1),
            "d" => {
                if let ValueRef::String(s) = v {
                    info.meta = decode_meta(s.as_bytes());
                }
            }
            _ => {}
        }
    }
    info.entry_id = format!("{ms}-{sq}");
    Some(())
}
