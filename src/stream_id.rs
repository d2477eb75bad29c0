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
}
