//! Wire format v1: presence events as producers append them to the stream.
//!
//! An entry carries either one field `e` holding a MessagePack map with named fields, or the same
//! fields as plain stream fields (the "flat" form, for `redis-cli` and producers without MessagePack).
//! Decoding never panics: anything that is not a valid v1 event becomes an [`Error::InvalidEvent`]
//! whose text is the dead-letter reason.

use std::collections::BTreeMap;

use rmpv::ValueRef;
use serde::Serialize;

use crate::error::Error;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// The schema version this worker understands.
pub const VERSION: u64 = 1;

/// What an event says about a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    /// The session starts (or is refreshed): it is live.
    Join,
    /// The session ends.
    Leave,
    /// The session is still there: it is live.
    Heartbeat,
}

impl EventType {
    /// Every type, in the order of their discriminants.
    pub const ALL: [EventType; 3] = [Self::Join, Self::Leave, Self::Heartbeat];

    /// Parses the wire name (`join`, `leave`, `heartbeat`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "join" => Some(Self::Join),
            "leave" => Some(Self::Leave),
            "heartbeat" => Some(Self::Heartbeat),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Heartbeat => "heartbeat",
        }
    }

    /// Whether the event leaves the session live (`join` and `heartbeat`).
    pub fn is_live(self) -> bool {
        !matches!(self, Self::Leave)
    }
}

/// Per-session data shown by `inspect` (display name, colour...).
pub type Meta = BTreeMap<String, String>;

/// One presence event, as a producer writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// Schema version, [`VERSION`].
    pub v: u64,
    /// Producer-unique event id (a UUID or ULID).
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// Document id.
    pub doc: String,
    /// User id.
    pub user: String,
    /// Connection/tab id; `None` means the user's single session, named after the user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Per-session sequence number; when present, the highest wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Producer clock in ms since the Unix epoch (informative only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// Small per-session data; replaces the session's meta when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
}

impl Event {
    /// A new event with a fresh random id and the current time as `ts`.
    pub fn new(kind: EventType, doc: impl Into<String>, user: impl Into<String>) -> Self {
        Self {
            v: VERSION,
            id: crate::ids::new_event_id(),
            kind,
            doc: doc.into(),
            user: user.into(),
            session: None,
            seq: None,
            ts: Some(crate::ids::now_ms()),
            meta: None,
        }
    }

    /// The session id, defaulting to the user id.
    pub fn session_id(&self) -> &str {
        self.session.as_deref().unwrap_or(&self.user)
    }

    /// Encodes the event as the MessagePack map with named fields that goes in field `e`.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        rmp_serde::to_vec_named(self)
            .map_err(|e| Error::InvalidEvent(format!("cannot encode: {e}")))
    }

    /// Checks the event against the v1 rules and `limits` (what the worker would dead-letter).
    pub fn validate(&self, limits: &Limits) -> Result<(), Error> {
        if self.v != VERSION {
            return Err(invalid(format!("unsupported schema version v={}", self.v)));
        }
        check_id("id", &self.id, limits.max_event_id_len)?;
        check_id("doc", &self.doc, limits.max_id_len)?;
        check_id("user", &self.user, limits.max_id_len)?;
        if let Some(s) = &self.session {
            check_id("session", s, limits.max_id_len)?;
        }
        if let Some(seq) = self.seq {
            if seq > MAX_SEQ {
                return Err(invalid(format!("seq {seq} is larger than {MAX_SEQ}")));
            }
        }
        if let Some(meta) = &self.meta {
            check_meta(meta, limits)?;
        }
        Ok(())
    }
}

/// rmpv's depth budget for one payload. rmpv spends two levels per array or map, so this allows
/// 7 nested containers; a v1 event needs 2 (the event map holding `meta`).
pub const MAX_DEPTH: usize = 16;

/// The largest `seq` accepted (2^63 - 1, so every producer language can represent it).
pub const MAX_SEQ: u64 = i64::MAX as u64;

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidEvent(msg.into())
}

fn check_id(name: &str, value: &str, max: usize) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(format!("field `{name}` is empty")));
    }
    if value.len() > max {
        return Err(invalid(format!(
            "field `{name}` is {} bytes, more than {max}",
            value.len()
        )));
    }
    if has_control(value) {
        return Err(invalid(format!(
            "field `{name}` contains a control character"
        )));
    }
    Ok(())
}

/// Whether `value` holds a control character (`char::is_control`: U+0000–U+001F and
/// U+007F–U+009F), checked on the UTF-8 bytes: the first two ranges are single bytes, the last is
/// `C2 80`–`C2 9F` (and `C2` is always a lead byte in valid UTF-8).
fn has_control(value: &str) -> bool {
    let b = value.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c < 0x20
            || c == 0x7f
            || (c == 0xc2 && b.get(i + 1).is_some_and(|n| (0x80..=0x9f).contains(n)))
    })
}

fn check_meta(meta: &Meta, limits: &Limits) -> Result<(), Error> {
    if meta.len() > limits.max_meta_keys {
        return Err(invalid(format!(
            "`meta` has {} keys, more than {}",
            meta.len(),
            limits.max_meta_keys
        )));
    }
    let size = encode_meta(meta).len();
    if size > limits.max_meta_bytes {
        return Err(invalid(format!(
            "`meta` is {size} bytes encoded, more than {}",
            limits.max_meta_bytes
        )));
    }
    Ok(())
}

/// Encodes `meta` as a MessagePack map (how it is stored in the session record).
pub fn encode_meta(meta: &Meta) -> Vec<u8> {
    // SAFETY of expect: serialising a map of strings into a Vec cannot fail.
    rmp_serde::to_vec_named(meta).expect("a string map always encodes")
}

/// Decodes one stream entry (its field/value pairs) into an event.
///
/// `entry_id` supplies the default event id of the flat form.
pub fn decode_entry(
    entry_id: StreamId,
    fields: &[(Vec<u8>, Vec<u8>)],
    limits: &Limits,
) -> Result<Event, Error> {
    if fields.len() > limits.max_fields {
        return Err(invalid(format!(
            "entry has {} fields, more than {}",
            fields.len(),
            limits.max_fields
        )));
    }
    let size: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > limits.max_entry_bytes {
        return Err(invalid(format!(
            "entry is {size} bytes, more than {}",
            limits.max_entry_bytes
        )));
    }
    let event = match fields.iter().find(|(k, _)| k == b"e") {
        Some((_, payload)) => decode_payload(payload)?,
        None => decode_flat(entry_id, fields)?,
    };
    event.validate(limits)?;
    Ok(event)
}

/// Decodes the MessagePack payload of field `e`.
pub fn decode_payload(payload: &[u8]) -> Result<Event, Error> {
    match fast::decode(payload) {
        Some(event) => Ok(event),
        None => decode_general(payload),
    }
}

/// [`decode_payload`] through rmpv's value tree: any valid payload, and the error for any other.
fn decode_general(payload: &[u8]) -> Result<Event, Error> {
    let mut rd = payload;
    let value = rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH)
        .map_err(|e| invalid(format!("payload is not valid MessagePack: {e}")))?;
    let ValueRef::Map(pairs) = value else {
        return Err(invalid(
            "payload is not a MessagePack map with named fields",
        ));
    };
    if !rd.is_empty() {
        return Err(invalid(
            "payload has trailing bytes after the MessagePack map",
        ));
    }
    let mut b = Builder::default();
    for (k, v) in &pairs {
        let Some(key) = as_str(k) else {
            return Err(invalid("payload has a map key that is not a string"));
        };
        let present = !matches!(v, ValueRef::Nil);
        match key {
            "v" => b.v = Some(as_u64(v, "v")?),
            "id" => b.id = Some(req_str(v, "id")?.to_owned()),
            "type" => b.kind = Some(Kind::parse(req_str(v, "type")?)),
            "doc" => b.doc = Some(req_str(v, "doc")?.to_owned()),
            "user" => b.user = Some(req_str(v, "user")?.to_owned()),
            "session" if present => b.session = Some(req_str(v, "session")?.to_owned()),
            "seq" if present => b.seq = Some(as_u64(v, "seq")?),
            "ts" if present => b.ts = Some(as_i64(v, "ts")?),
            "meta" if present => b.meta = Some(decode_meta_value(v)?),
            _ => {} // unknown fields are ignored: forward compatible
        }
    }
    if b.v.is_none() {
        return Err(invalid("missing field `v`"));
    }
    if b.id.is_none() {
        return Err(invalid("missing field `id`"));
    }
    b.build()
}

fn decode_flat(entry_id: StreamId, fields: &[(Vec<u8>, Vec<u8>)]) -> Result<Event, Error> {
    let mut b = Builder::default();
    let mut meta = Meta::new();
    for (k, v) in fields {
        let Ok(key) = std::str::from_utf8(k) else {
            continue; // a field name we cannot read is not one of ours
        };
        let text = || {
            std::str::from_utf8(v).map_err(|_| invalid(format!("field `{key}` is not valid UTF-8")))
        };
        match key {
            "v" => b.v = Some(parse_num(text()?, "v")?),
            "id" => b.id = Some(text()?.to_owned()),
            "type" => b.kind = Some(Kind::parse(text()?)),
            "doc" => b.doc = Some(text()?.to_owned()),
            "user" => b.user = Some(text()?.to_owned()),
            "session" => b.session = Some(text()?.to_owned()),
            "seq" => b.seq = Some(parse_num(text()?, "seq")?),
            "ts" => {
                let t = text()?;
                b.ts = Some(
                    t.parse()
                        .map_err(|_| invalid(format!("field `ts` is not an integer: {t:?}")))?,
                );
            }
            _ => {
                if let Some(mk) = key.strip_prefix("meta.") {
                    meta.insert(mk.to_owned(), text()?.to_owned());
                }
            }
        }
    }
    if b.kind.is_none() {
        return Err(invalid(
            "no field `e` and no field `type`: not a presence event",
        ));
    }
    if !meta.is_empty() {
        b.meta = Some(meta);
    }
    b.v.get_or_insert(VERSION);
    b.id.get_or_insert_with(|| entry_id.to_string());
    b.build()
}

fn parse_num(text: &str, name: &str) -> Result<u64, Error> {
    if text.is_empty() || !text.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(format!(
            "field `{name}` is not a non-negative decimal integer: {text:?}"
        )));
    }
    text.parse()
        .map_err(|_| invalid(format!("field `{name}` is out of range: {text:?}")))
}

/// The `type` field as decoded: a known type, or the unknown text (kept for the error, which is
/// only raised once the version has been checked, as before).
enum Kind {
    Known(EventType),
    Unknown(String),
}

impl Kind {
    fn parse(text: &str) -> Self {
        match EventType::parse(text) {
            Some(t) => Self::Known(t),
            None => Self::Unknown(text.to_owned()),
        }
    }
}

/// Fields gathered while decoding, before the required ones are checked.
#[derive(Default)]
struct Builder {
    v: Option<u64>,
    id: Option<String>,
    kind: Option<Kind>,
    doc: Option<String>,
    user: Option<String>,
    session: Option<String>,
    seq: Option<u64>,
    ts: Option<i64>,
    meta: Option<Meta>,
}

impl Builder {
    fn build(self) -> Result<Event, Error> {
        let v = self.v.unwrap_or(VERSION);
        if v != VERSION {
            return Err(invalid(format!("unsupported schema version v={v}")));
        }
        let kind = match self.kind.ok_or_else(|| invalid("missing field `type`"))? {
            Kind::Known(t) => t,
            Kind::Unknown(text) => {
                return Err(invalid(format!("unknown event type {:?}", truncate(&text))))
            }
        };
        Ok(Event {
            v,
            id: self.id.ok_or_else(|| invalid("missing field `id`"))?,
            kind,
            doc: self.doc.ok_or_else(|| invalid("missing field `doc`"))?,
            user: self.user.ok_or_else(|| invalid("missing field `user`"))?,
            session: self.session,
            seq: self.seq,
            ts: self.ts,
            meta: self.meta,
        })
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The text of a string (or UTF-8 binary) value, borrowed from the payload.
fn as_str<'a>(v: &ValueRef<'a>) -> Option<&'a str> {
    match v {
        ValueRef::String(s) => s.into_str(),
        ValueRef::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn req_str<'a>(v: &ValueRef<'a>, name: &str) -> Result<&'a str, Error> {
    as_str(v).ok_or_else(|| invalid(format!("field `{name}` is not a UTF-8 string")))
}

fn as_u64(v: &ValueRef<'_>, name: &str) -> Result<u64, Error> {
    match v {
        ValueRef::Integer(i) => i
            .as_u64()
            .ok_or_else(|| invalid(format!("field `{name}` is negative"))),
        _ => Err(invalid(format!("field `{name}` is not an integer"))),
    }
}

fn as_i64(v: &ValueRef<'_>, name: &str) -> Result<i64, Error> {
    match v {
        ValueRef::Integer(i) => i
            .as_i64()
            .ok_or_else(|| invalid(format!("field `{name}` is out of range"))),
        _ => Err(invalid(format!("field `{name}` is not an integer"))),
    }
}

fn decode_meta_value(v: &ValueRef<'_>) -> Result<Meta, Error> {
    let ValueRef::Map(pairs) = v else {
        return Err(invalid("field `meta` is not a map"));
    };
    let mut meta = Meta::new();
    for (k, v) in pairs {
        let (Some(k), Some(v)) = (as_str(k), as_str(v)) else {
            return Err(invalid("field `meta` must map strings to strings"));
        };
        meta.insert(k.to_owned(), v.to_owned());
    }
    Ok(meta)
}

/// Decodes a stored `meta` map (as written by [`encode_meta`]).
pub fn decode_meta(bytes: &[u8]) -> Option<Meta> {
    let mut rd = bytes;
    let v = rmpv::decode::read_value_ref_with_max_depth(&mut rd, MAX_DEPTH).ok()?;
    decode_meta_value(&v).ok()
}

mod fast;

#[cfg(test)]
mod tests;
