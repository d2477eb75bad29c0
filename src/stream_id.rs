//! Redis stream entry ids (`<ms>-<seq>`), parsed once so they compare as numbers.

use std::fmt;
use std::str::FromStr;

/// A stream entry id. Ordered as Redis orders entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    /// Milliseconds part (Redis server time when the entry was added, for `*` ids).
    pub ms: u64,
    /// Sequence part, for entries added in the same millisecond.
    pub seq: u64,
}

impl StreamId {
    /// Builds an id from its two parts.
    pub const fn new(ms: u64, seq: u64) -> Self {
        Self { ms, seq }
    }

    /// Parses `<ms>-<seq>` (or a bare `<ms>`) from raw bytes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok()?.parse().ok()
    }
}

/// The `<ms>-<seq>` text of a [`StreamId`], formatted on the stack: what the hot path sends to
/// Redis per entry (`XACK` arguments, packed script arguments) without a `String` each.
#[derive(Clone, Copy)]
pub struct IdText {
    buf: [u8; IdText::MAX],
    len: u8,
}

impl IdText {
    /// The longest id text: two 20-digit numbers and the dash.
    pub const MAX: usize = 41;

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

impl redis::ToRedisArgs for IdText {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg(self.as_bytes());
    }
}

impl StreamId {
    /// The id's text, as [`fmt::Display`] writes it, without allocating.
    pub fn text(&self) -> IdText {
        use std::io::Write as _;
        let mut buf = [0; IdText::MAX];
        let mut w = &mut buf[..];
        // SAFETY of the expect: two u64 and a dash take at most MAX (41) bytes.
        write!(w, "{self}").expect("a stream id fits in 41 bytes");
        let left = w.len();
        // SAFETY of the cast: at most MAX (41).
        let len = (IdText::MAX - left) as u8;
        IdText { buf, len }
    }
}

impl FromStr for StreamId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        Ok(Self {
            ms: ms.parse().map_err(|_| ())?,
            seq: seq.parse().map_err(|_| ())?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        let a = StreamId::parse(b"1700000000000-2").unwrap();
        let b: StreamId = "1700000000000-10".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "1700000000000-2");
        assert_eq!(StreamId::parse(b"5"), Some(StreamId::new(5, 0)));
        assert_eq!(StreamId::parse(b"x-1"), None);
        assert_eq!(StreamId::parse(b"1-"), None);
    }

    #[test]
    fn text_is_the_display_form() {
        for (ms, seq) in [
            (0, 0),
            (9, 10),
            (1_700_000_000_000, 5),
            (u64::MAX, u64::MAX),
        ] {
            let id = StreamId::new(ms, seq);
            assert_eq!(id.text().as_bytes(), id.to_string().as_bytes());
        }
    }
}
