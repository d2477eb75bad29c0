//! The common payload read straight from its bytes: a MessagePack map whose values are
//! integers, strings (`str` or UTF-8 `bin`), `nil`, booleans or floats, and a `meta` map of
//! strings. No value tree is built (rmpv's cost about 0.3 us per event on a backlog). Anything
//! else, and anything wrong, is left to [`super::decode_payload`]'s general reading, which gives
//! the same event for what this reads and the error for what it refuses: `None` here means
//! "read it the general way", never "invalid".

use super::{Builder, Event, Kind, Meta};

/// One value as this reader sees it.
enum Val<'a> {
    Nil,
    Int(i128),
    /// A `str`, or `bin` (as text only if UTF-8, like the general reader).
    Text(&'a [u8]),
    /// A map of `n` pairs, its pairs next in the input.
    Map(usize),
    /// A boolean or a float: only skipped (in fields this reader ignores).
    Scalar,
}

struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.input.len() < n {
            return None;
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Some(head)
    }

    fn uint(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    fn text(&mut self, n: usize) -> Option<Val<'a>> {
        let n = self.uint(n)? as usize;
        self.take(n).map(Val::Text)
    }

    /// The next value; `None` for arrays, extensions, reserved bytes and cut input.
    fn value(&mut self) -> Option<Val<'a>> {
        let (&first, rest) = self.input.split_first()?;
        self.input = rest;
        Some(match first {
            0x00..=0x7f => Val::Int(i128::from(first)),
            0xe0..=0xff => Val::Int(i128::from(first as i8)),
            0x80..=0x8f => Val::Map(usize::from(first & 0x0f)),
            0xa0..=0xbf => self.take(usize::from(first & 0x1f)).map(Val::Text)?,
            0xc0 => Val::Nil,
            0xc2 | 0xc3 => Val::Scalar,
            0xca => self.take(4).map(|_| Val::Scalar)?,
            0xcb => self.take(8).map(|_| Val::Scalar)?,
            0xcc => Val::Int(i128::from(self.uint(1)?)),
            0xcd => Val::Int(i128::from(self.uint(2)?)),
            0xce => Val::Int(i128::from(self.uint(4)?)),
            0xcf => Val::Int(i128::from(self.uint(8)?)),
            0xd0 => Val::Int(i128::from(self.uint(1)? as u8 as i8)),
            0xd1 => Val::Int(i128::from(self.uint(2)? as u16 as i16)),
            0xd2 => Val::Int(i128::from(self.uint(4)? as u32 as i32)),
            0xd3 => Val::Int(i128::from(self.uint(8)? as i64)),
            0xc4 | 0xd9 => self.text(1)?,
            0xc5 | 0xda => self.text(2)?,
            0xc6 | 0xdb => self.text(4)?,
            0xde => Val::Map(self.uint(2)? as usize),
            0xdf => Val::Map(self.uint(4)? as usize),
            _ => return None,
        })
    }

    fn str(&mut self) -> Option<&'a str> {
        match self.value()? {
            Val::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// Owned text of a required string field.
fn owned(v: Val<'_>) -> Option<String> {
    match v {
        Val::Text(b) => std::str::from_utf8(b).ok().map(str::to_owned),
        _ => None,
    }
}

/// The event in `payload` when this reader can read it and it is valid as far as decoding goes
/// (see the module docs).
pub(super) fn decode(payload: &[u8]) -> Option<Event> {
    let mut r = Reader { input: payload };
    let Val::Map(pairs) = r.value()? else {
        return None;
    };
    let mut b = Builder::default();
    for _ in 0..pairs {
        let key = r.str()?;
        let v = r.value()?;
        let present = !matches!(v, Val::Nil);
        match (key, v) {
            ("v", Val::Int(n)) => b.v = Some(u64::try_from(n).ok()?),
            ("id", v) => b.id = Some(owned(v)?),
            ("type", Val::Text(t)) => b.kind = Some(Kind::parse(std::str::from_utf8(t).ok()?)),
            ("doc", v) => b.doc = Some(owned(v)?),
            ("user", v) => b.user = Some(owned(v)?),
            ("session", v) if present => b.session = Some(owned(v)?),
            ("seq", Val::Int(n)) => b.seq = Some(u64::try_from(n).ok()?),
            ("ts", Val::Int(n)) => b.ts = Some(i64::try_from(n).ok()?),
            ("meta", Val::Map(n)) => {
                let mut meta = Meta::new();
                for _ in 0..n {
                    let k = r.str()?;
                    let v = r.str()?;
                    meta.insert(k.to_owned(), v.to_owned());
                }
                b.meta = Some(meta);
            }
            ("v" | "type" | "seq" | "ts" | "meta", _) if present => return None,
            ("v" | "type", _) => return None,
            // An unknown field (or an absent optional one): skipped, unless it nests.
            (_, Val::Map(_)) => return None,
            _ => {}
        }
    }
    if !r.input.is_empty() || b.v.is_none() || b.id.is_none() {
        return None;
    }
    b.build().ok()
}

#[cfg(test)]
mod tests {
    //! The fast reader against the general one: on generated payloads (every field type the
    //! format allows, wrong types, `nil`s, unknown and nested fields, duplicate keys) and on
    //! damaged copies of them, it either gives up or gives exactly the general reader's event;
    //! and it reads every payload [`Event::encode`] writes.
    use super::*;
    use crate::event::{decode_general, EventType};
    use proptest::prelude::*;
    use rmpv::Value;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            12 => leaf(),
            1 => proptest::collection::vec(leaf(), 0..3).prop_map(Value::Array),
            1 => proptest::collection::vec(
                (prop_oneof!["[a-z]{1,3}".prop_map(Value::from), leaf()], leaf()),
                0..4
            )
            .prop_map(Value::Map),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::Boolean),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (0u64..300).prop_map(Value::from),
            (-40i64..0).prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<f32>().prop_map(Value::from),
            prop_oneof![
                Just("join"),
                Just("leave"),
                Just("heartbeat"),
                Just("x"),
                Just(""),
                Just("d\u{e9}j\u{e0}")
            ]
            .prop_map(Value::from),
            "[a-z0-9]{0,40}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Binary),
            Just(Value::Binary(b"doc-7".to_vec())),
            Just(Value::Ext(5, vec![1, 2])),
        ]
    }

    fn key() -> impl Strategy<Value = Value> {
        prop_oneof![
            8 => prop_oneof![
                Just("v"), Just("id"), Just("type"), Just("doc"), Just("user"),
                Just("session"), Just("seq"), Just("ts"), Just("meta"), Just("extra")
            ]
            .prop_map(Value::from),
            1 => Just(Value::Binary(b"doc".to_vec())),
            1 => any::<u8>().prop_map(Value::from),
        ]
    }

    /// A payload map: mostly a valid event's fields, then generated pairs (which may replace
    /// them: a later key wins).
    fn payload() -> impl Strategy<Value = Vec<u8>> {
        let base = (any::<bool>(), 0u64..3).prop_map(|(meta, kind)| {
            let mut pairs = vec![
                (Value::from("v"), Value::from(1)),
                (Value::from("id"), Value::from("01HX")),
                (
                    Value::from("type"),
                    Value::from(["join", "leave", "heartbeat"][kind as usize]),
                ),
                (Value::from("doc"), Value::from("d1")),
                (Value::from("user"), Value::from("u1")),
            ];
            if meta {
                pairs.push((
                    Value::from("meta"),
                    Value::Map(vec![(Value::from("name"), Value::from("Ann"))]),
                ));
            }
            pairs
        });
        (
            base,
            proptest::collection::vec((key(), value()), 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut pairs, more, drop_base)| {
                if drop_base {
                    pairs.clear();
                }
                pairs.extend(more);
                let mut out = Vec::new();
                rmpv::encode::write_value(&mut out, &Value::Map(pairs)).expect("encode");
                out
            })
    }

    fn agrees(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Some(fast) = decode(bytes) {
            let general = decode_general(bytes);
            prop_assert!(
                general.is_ok(),
                "general refused what fast read: {general:?}"
            );
            prop_assert_eq!(format!("{fast:?}"), format!("{:?}", general.unwrap()));
        }
        Ok(())
    }

    proptest! {
        // Cheap cases, and the corner ones (a big `ts`, a nested unknown field) are rare.
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn gives_up_or_agrees_with_the_general_reader(bytes in payload()) {
            agrees(&bytes)?;
        }

        #[test]
        fn damaged_payloads_too(
            bytes in payload(),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut damaged = bytes.clone();
            let i = at.index(damaged.len());
            damaged[i] = byte;
            agrees(&damaged)?;
            agrees(&bytes[..cut.index(bytes.len() + 1)])?;
            let mut longer = bytes;
            longer.push(0xc0);
            prop_assert!(decode(&longer).is_none(), "trailing bytes");
        }

        #[test]
        fn reads_what_producers_write(
            kind in 0usize..3,
            doc in "[a-z0-9:{}-]{1,40}",
            session in proptest::option::of("[a-z0-9]{1,300}"),
            seq in proptest::option::of(any::<u64>().prop_map(|s| s >> 1)),
            ts in proptest::option::of(any::<i64>()),
            meta in proptest::option::of(proptest::collection::btree_map("[a-z]{1,8}", "[ -~]{0,40}", 0..5)),
        ) {
            let kinds = [EventType::Join, EventType::Leave, EventType::Heartbeat];
            let mut event = Event::new(kinds[kind], doc, "u\u{e9}");
            event.id = "01HXYZ".into();
            event.session = session;
            event.seq = seq;
            event.ts = ts;
            event.meta = meta;
            let bytes = event.encode().expect("encode");
            let fast = decode(&bytes);
            prop_assert!(fast.is_some(), "the fast reader gave up on {event:?}");
            prop_assert_eq!(format!("{:?}", fast.unwrap()), format!("{event:?}"));
        }
    }
}
