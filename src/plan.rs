//! Planned steps: the worker decides a document's step itself, from the records it read under
//! `WATCH`, with the rules of `lua/apply.lua` (`apply_session`) and `lua/common.lua`
//! (`session_live`, `session_ended`), and [`crate::apply`] writes the result in one
//! `MULTI`/`EXEC`. Redis then does only the reads and writes, not the Lua around them (about
//! three quarters of the script's time).
//!
//! Only the common cases are planned: anything unusual (a record of an earlier layout, a document
//! still in an earlier version's keys, a user's value full enough for `make_room`, a damaged
//! value) is [`Planned::Script`], and the script applies it as before. The records are read and
//! written byte for byte in the layout `lua/common.lua` documents.

use crate::apply::{id_hash, Outcome};
use crate::coalesce::{DocUpdate, SessionUpdate, Version};
use crate::stream_id::StreamId;

/// A record's first byte (see `lua/common.lua`).
const MARKER: u8 = 0xC1;
/// A record's marker, flags and time.
const HEAD_LEN: usize = 8;
/// The shortest entry: its lengths, a session id of one byte, a record of flags 1.
const SHORTEST_ENTRY: usize = 4 + 1 + HEAD_LEN + 16;
/// A document of at least this many present users keeps its records hash a hash table
/// (`LARGE` in `lua/apply.lua`).
pub(crate) const LARGE: u64 = 64;

/// What the step of a document read under `WATCH`.
#[derive(Debug, Default)]
pub(crate) struct DocRead {
    /// Per user (in [`users_of`] order) their value in the records hash.
    pub(crate) values: Vec<Option<Vec<u8>>>,
    /// `SCARD` of the document's users set.
    pub(crate) before: u64,
    /// Per user whether they are in the set (`SMISMEMBER`).
    pub(crate) members: Vec<bool>,
}

/// What the planner made of a document.
#[derive(Debug)]
pub(crate) enum Planned {
    /// The step, to write.
    Step(DocStep),
    /// Leave it to the script.
    Script,
}

/// A document's step, decided.
#[derive(Debug, Default)]
pub(crate) struct DocStep {
    /// One outcome per session.
    pub(crate) outcomes: Vec<Outcome>,
    /// The users' values to write (user index, value).
    pub(crate) writes: Vec<(usize, Vec<u8>)>,
    /// Users to add to the users set, and to remove from it.
    pub(crate) added: Vec<usize>,
    /// (See `added`.)
    pub(crate) removed: Vec<usize>,
    /// The count before and after.
    pub(crate) before: u64,
    /// (See `before`.)
    pub(crate) after: u64,
    /// Whether the count was needed (a session started or ended): `finish_doc` then runs.
    pub(crate) counted: bool,
    /// A session went live, a session ended.
    pub(crate) went_live: bool,
    /// (See `went_live`.)
    pub(crate) ended: bool,
    /// Changes to the totals.
    pub(crate) d_sessions: i64,
    /// (See `d_sessions`.)
    pub(crate) d_users: i64,
}

/// The document's users, each once in first-seen order, and each session's user (an index into
/// them): the order of [`DocRead::values`] and of the script's packed sessions.
pub(crate) fn users_of(update: &DocUpdate) -> (Vec<&str>, Vec<usize>) {
    let mut users: Vec<&str> = Vec::with_capacity(update.sessions.len());
    // Most documents of a batch have a few sessions: a walk is cheaper than a map (which stays
    // empty, unallocated, for them).
    let walk = update.sessions.len() <= 8;
    let mut index: crate::coalesce::FastMap<&str, usize> = Default::default();
    let user_of = update
        .sessions
        .iter()
        .map(|s| {
            let seen = if walk {
                users.iter().position(|&u| u == s.user)
            } else {
                index.get(s.user.as_str()).copied()
            };
            seen.unwrap_or_else(|| {
                if !walk {
                    index.insert(&s.user, users.len());
                }
                users.push(&s.user);
                users.len() - 1
            })
        })
        .collect();
    (users, user_of)
}

/// Not planned: the script applies the document.
struct ToScript;

/// Plans the step of `update` from `read` at server time `now` (ms): what `apply.lua` would do.
/// `max_entries` is `--max-user-sessions`.
pub(crate) fn plan_doc(
    update: &DocUpdate,
    user_of: &[usize],
    read: &DocRead,
    now: u64,
    max_entries: usize,
) -> Planned {
    let n = read.values.len();
    if read.members.len() != n {
        return Planned::Script;
    }
    let mut p = Planner {
        values: read.values.clone(),
        touched: vec![false; n],
        members: read.members.clone(),
        now,
        roomy: max_entries * SHORTEST_ENTRY,
        present: read.before,
        step: DocStep {
            before: read.before,
            ..DocStep::default()
        },
    };
    let mut outcomes = Vec::with_capacity(update.sessions.len());
    for (s, &u) in update.sessions.iter().zip(user_of) {
        match p.session(s, u) {
            Ok(o) => outcomes.push(o),
            Err(ToScript) => return Planned::Script,
        }
    }
    let Planner {
        values,
        touched,
        members,
        present,
        mut step,
        ..
    } = p;
    step.outcomes = outcomes;
    step.after = present;
    step.writes = values
        .into_iter()
        .zip(touched)
        .enumerate()
        .filter_map(|(u, (v, t))| Some((u, v.filter(|_| t)?)))
        .collect();
    for (u, (&was, &is)) in read.members.iter().zip(&members).enumerate() {
        if !was && is {
            step.added.push(u);
        } else if was && !is {
            step.removed.push(u);
        }
    }
    Planned::Step(step)
}

struct Planner {
    values: Vec<Option<Vec<u8>>>,
    touched: Vec<bool>,
    members: Vec<bool>,
    now: u64,
    /// A value at least this long may need `make_room` for a new entry (the script's ROOMY).
    roomy: usize,
    present: u64,
    step: DocStep,
}

/// A record of the current layout, decoded (see `lua/common.lua`).
struct Record<'a> {
    flags: u8,
    time: u64,
    version: Version,
    hash: u32,
    /// What follows the hash: the meta version and the meta.
    rest: &'a [u8],
}

impl Planner {
    /// `apply_session`: one session's deciding event against its record.
    fn session(&mut self, s: &SessionUpdate, u: usize) -> Result<Outcome, ToScript> {
        let value = self.values[u].take();
        let r = self.session_in(s, u, value.as_deref());
        match r {
            Ok((outcome, Some(new))) => {
                self.values[u] = Some(new);
                self.touched[u] = true;
                Ok(outcome)
            }
            Ok((outcome, None)) => {
                self.values[u] = value;
                Ok(outcome)
            }
            Err(e) => {
                self.values[u] = value;
                Err(e)
            }
        }
    }

    /// [`Planner::session`] on the user's value: the outcome, and the value to write if the
    /// record changed.
    fn session_in(
        &mut self,
        s: &SessionUpdate,
        u: usize,
        value: Option<&[u8]>,
    ) -> Result<(Outcome, Option<Vec<u8>>), ToScript> {
        let sid = &s.field.as_bytes()[s.user.len() + 1..];
        let found = match value {
            Some(v) => find_entry(v, sid)?,
            None => None,
        };
        let record = match (value, found) {
            (Some(v), Some((_, rs, re))) => Some(decode(&v[rs..re]).ok_or(ToScript)?),
            _ => None,
        };
        let mut flags = record.as_ref().map_or(0, |r| r.flags);
        let was_live = flags & 1 == 1;
        let event_hash = id_hash(&s.event_id);
        let (mut version, mut hash) = match &record {
            Some(r) => (r.version, Some(r.hash)),
            None => (s.version, None),
        };
        let mut outcome = Outcome::Stale;
        let mut dirty = false;
        let win = record
            .as_ref()
            .is_none_or(|r| s.version.newer_than(&r.version));
        if win {
            outcome = if hash == Some(event_hash) {
                Outcome::Duplicate
            } else {
                Outcome::Applied
            };
            flags = (flags & 0b1101_1000)
                | u8::from(s.live)
                | if s.version.seq.is_some() { 2 } else { 0 }
                | if s.version.sid.seq > u64::from(u32::MAX) {
                    32
                } else {
                    0
                };
            version = s.version;
            hash = Some(event_hash);
            dirty = true;
        } else if hash == Some(event_hash) {
            outcome = Outcome::Duplicate;
        }
        // What follows the version (meta version and meta), when it changes.
        let mut tail: Option<Vec<u8>> = None;
        if let Some((mv, meta)) = &s.meta {
            let newer = if flags & 8 == 0 {
                true
            } else {
                let rest = record.as_ref().map_or(&[][..], |r| r.rest);
                let (stored, _) = read_version(rest, flags & 16 != 0, flags & 64 != 0)?;
                mv.newer_than(&stored)
            };
            if newer {
                let mut t = Vec::with_capacity(24 + meta.as_ref().map_or(0, Vec::len));
                put_version(
                    &mut t,
                    mv,
                    mv.seq.is_some(),
                    mv.sid.seq > u64::from(u32::MAX),
                );
                if let Some(m) = meta {
                    t.extend_from_slice(m);
                }
                tail = Some(t);
                flags = (flags & 0b0010_0111)
                    | 8
                    | if mv.seq.is_some() { 16 } else { 0 }
                    | if mv.sid.seq > u64::from(u32::MAX) {
                        64
                    } else {
                        0
                    };
                dirty = true;
            }
        }
        if !dirty {
            return Ok((outcome, None));
        }
        // A new entry in a value long enough to need make_room: the script decides.
        if found.is_none() && value.is_some_and(|v| v.len() >= self.roomy) {
            return Err(ToScript);
        }
        let skip = found.map(|(pos, _, _)| pos);
        let kept_time = record.as_ref().map_or(self.now, |r| r.time);
        let mut time = self.now;
        if flags & 1 == 1 {
            if outcome == Outcome::Stale {
                time = kept_time;
            } else if !was_live {
                let others = live_others(value, skip)?;
                self.session_live(u, others);
            }
        } else if was_live || outcome == Outcome::Applied {
            let others = was_live && live_others(value, skip)?;
            self.session_ended(u, was_live, others);
        } else {
            time = kept_time;
        }
        let tail = match tail {
            Some(t) => t,
            None => record.as_ref().map_or(Vec::new(), |r| r.rest.to_vec()),
        };
        let mut rec = Vec::with_capacity(HEAD_LEN + 32 + tail.len());
        rec.push(MARKER);
        rec.push(flags);
        rec.extend_from_slice(&((time >> 32) as u16).to_be_bytes());
        rec.extend_from_slice(&(time as u32).to_be_bytes());
        put_version(&mut rec, &version, flags & 2 != 0, flags & 32 != 0);
        rec.extend_from_slice(&hash.unwrap_or(event_hash).to_be_bytes());
        rec.extend_from_slice(&tail);
        Ok((outcome, Some(put_entry(value, found, sid, &rec)?)))
    }

    /// `session_live`: a session of user `u` went live; `others`: the user has another.
    fn session_live(&mut self, u: usize, others: bool) {
        self.step.counted = true;
        if !others {
            if !self.members[u] {
                self.members[u] = true;
                self.present += 1;
            }
            self.step.d_users += 1;
        }
        self.step.d_sessions += 1;
        self.step.went_live = true;
    }

    /// `session_ended`: a session of user `u` ended.
    fn session_ended(&mut self, u: usize, was_live: bool, others: bool) {
        if was_live {
            self.step.counted = true;
            if !others {
                if self.members[u] {
                    self.members[u] = false;
                    self.present -= 1;
                }
                self.step.d_users -= 1;
            }
            self.step.d_sessions -= 1;
        }
        self.step.ended = true;
    }
}

fn u16_at(b: &[u8], p: usize) -> Result<usize, ToScript> {
    let s = b.get(p..p + 2).ok_or(ToScript)?;
    Ok(usize::from(u16::from_be_bytes([s[0], s[1]])))
}

fn u32_at(b: &[u8], p: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(p..p + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], p: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(p..p + 8)?.try_into().ok()?))
}

/// The entries of a user's value: (where it begins, where its record begins, where it ends).
fn entries(value: &[u8]) -> impl Iterator<Item = Result<(usize, usize, usize), ToScript>> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= value.len() {
            return None;
        }
        let entry = (|| {
            let rs = pos + 4 + u16_at(value, pos)?;
            let end = rs + u16_at(value, pos + 2)?;
            if end > value.len() || end <= rs + 1 {
                return Err(ToScript);
            }
            Ok((pos, rs, end))
        })();
        match entry {
            Ok((_, _, end)) => pos = end,
            Err(_) => pos = value.len(),
        }
        Some(entry)
    })
}

/// The entry of session `sid` in `value`, if any (`find_entry`).
fn find_entry(value: &[u8], sid: &[u8]) -> Result<Option<(usize, usize, usize)>, ToScript> {
    for e in entries(value) {
        let (pos, rs, end) = e?;
        if &value[pos + 4..rs] == sid {
            return Ok(Some((pos, rs, end)));
        }
    }
    Ok(None)
}

/// Whether `value` holds a live session other than the entry at `skip` (`live_others`).
fn live_others(value: Option<&[u8]>, skip: Option<usize>) -> Result<bool, ToScript> {
    let Some(value) = value else { return Ok(false) };
    for e in entries(value) {
        let (pos, rs, _) = e?;
        if Some(pos) != skip && value[rs + 1] & 1 == 1 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `value` with the entry of `sid` set to `record` (`put_entry`).
fn put_entry(
    value: Option<&[u8]>,
    found: Option<(usize, usize, usize)>,
    sid: &[u8],
    record: &[u8],
) -> Result<Vec<u8>, ToScript> {
    let len = u16::try_from(record.len()).map_err(|_| ToScript)?;
    let sid_len = u16::try_from(sid.len()).map_err(|_| ToScript)?;
    let value = value.unwrap_or_default();
    let (before, after) = match found {
        Some((pos, _, end)) => (&value[..pos], &value[end..]),
        None => (value, &[][..]),
    };
    let mut out = Vec::with_capacity(before.len() + 4 + sid.len() + record.len() + after.len());
    out.extend_from_slice(before);
    out.extend_from_slice(&sid_len.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(sid);
    out.extend_from_slice(record);
    out.extend_from_slice(after);
    Ok(out)
}

/// A version as a record holds it: seq (when `q`), stream id ms, sequence (64 bits when `wide`).
fn put_version(b: &mut Vec<u8>, v: &Version, q: bool, wide: bool) {
    if q {
        b.extend_from_slice(&v.seq.unwrap_or(0).to_be_bytes());
    }
    b.extend_from_slice(&v.sid.ms.to_be_bytes());
    if wide {
        b.extend_from_slice(&v.sid.seq.to_be_bytes());
    } else {
        b.extend_from_slice(&(v.sid.seq as u32).to_be_bytes());
    }
}

/// The version [`put_version`] wrote at the start of `b`, and its length.
fn read_version(b: &[u8], q: bool, wide: bool) -> Result<(Version, usize), ToScript> {
    let mut p = 0;
    let seq = if q {
        p = 8;
        Some(u64_at(b, 0).ok_or(ToScript)?)
    } else {
        None
    };
    let ms = u64_at(b, p).ok_or(ToScript)?;
    p += 8;
    let sseq = if wide {
        p += 8;
        u64_at(b, p - 8).ok_or(ToScript)?
    } else {
        p += 4;
        u64::from(u32_at(b, p - 4).ok_or(ToScript)?)
    };
    let sid = StreamId { ms, seq: sseq };
    Ok((Version { seq, sid }, p))
}

/// A record of the current layout; `None` for anything else.
fn decode(raw: &[u8]) -> Option<Record<'_>> {
    if raw.len() < HEAD_LEN || raw[0] != MARKER {
        return None;
    }
    let flags = raw[1];
    let time = (u64::from(u16::from_be_bytes([raw[2], raw[3]])) << 32) | u64::from(u32_at(raw, 4)?);
    let body = &raw[HEAD_LEN..];
    let (version, len) = read_version(body, flags & 2 != 0, flags & 32 != 0).ok()?;
    let hash = u32_at(body, len)?;
    Some(Record {
        flags,
        time,
        version,
        hash,
        rest: &body[len + 4..],
    })
}
