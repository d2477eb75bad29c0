//! Unit tests of wire format v1: decoding stream entries (MessagePack and flat forms), the limits
//! every entry is checked against, and the encoding producers use.

use super::*;
use crate::test_rng::Rng;

use rmpv::Value;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The entry id used by every test (the flat form's default event id).
fn entry_id() -> StreamId {
    StreamId::new(1_700_000_000_000, 5)
}

fn decode(fields: &Fields) -> Result<Event, Error> {
    decode_entry(entry_id(), fields, &Limits::default())
}

/// An entry holding only field `e`.
fn e_entry(payload: Vec<u8>) -> Fields {
    vec![(b"e".to_vec(), payload)]
}

fn decode_e(payload: Vec<u8>) -> Result<Event, Error> {
    decode(&e_entry(payload))
}

/// A flat entry from text field/value pairs.
fn flat(pairs: &[(&str, &str)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// Writes one MessagePack value.
fn enc(value: &Value) -> Vec<u8> {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, value).expect("writing to a Vec cannot fail");
    buf
}

/// A MessagePack map with string keys, in the given order (as Python's `msgpack.packb(dict)`).
fn pack(pairs: &[(&str, Value)]) -> Vec<u8> {
    enc(&Value::Map(
        pairs
            .iter()
            .map(|(k, v)| (Value::from(*k), v.clone()))
            .collect(),
    ))
}

/// The required fields of a valid MessagePack event.
fn base() -> Vec<(&'static str, Value)> {
    vec![
        ("v", Value::from(1)),
        ("id", Value::from("evt-1")),
        ("type", Value::from("join")),
        ("doc", Value::from("doc-42")),
        ("user", Value::from("alice")),
    ]
}

/// `pairs` with `key` set to `value` (replaced in place, or appended).
fn with(
    mut pairs: Vec<(&'static str, Value)>,
    key: &'static str,
    value: Value,
) -> Vec<(&'static str, Value)> {
    match pairs.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => pairs.push((key, value)),
    }
    pairs
}

/// `pairs` without `key`.
fn without(mut pairs: Vec<(&'static str, Value)>, key: &str) -> Vec<(&'static str, Value)> {
    pairs.retain(|(k, _)| *k != key);
    pairs
}

/// The dead-letter reason of a decoding that must fail.
fn reason(result: Result<Event, Error>) -> String {
    match result {
        Err(Error::InvalidEvent(reason)) => reason,
        Err(other) => panic!("expected Error::InvalidEvent, got {other:?}"),
        Ok(event) => panic!("expected an invalid event, decoded {event:?}"),
    }
}

/// Asserts the decoding failed with a reason mentioning every one of `needles`.
#[track_caller]
fn assert_invalid(result: Result<Event, Error>, needles: &[&str]) -> String {
    let reason = reason(result);
    for needle in needles {
        assert!(
            reason.contains(needle),
            "reason {reason:?} does not mention {needle:?}"
        );
    }
    reason
}

fn meta(pairs: &[(&str, &str)]) -> Meta {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A raw MessagePack map (fixmap) whose values are given already encoded, to control the exact
/// wire form (integer widths, str8/bin8...).
fn raw_map(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    assert!(entries.len() < 16);
    let mut out = vec![0x80 | entries.len() as u8];
    for (k, v) in entries {
        assert!(k.len() < 32);
        out.push(0xa0 | k.len() as u8);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// A string in the str8 form.
fn str8(s: &str) -> Vec<u8> {
    let mut out = vec![0xd9, s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

/// Raw bytes in the bin8 form.
fn bin8(b: &[u8]) -> Vec<u8> {
    let mut out = vec![0xc4, b.len() as u8];
    out.extend_from_slice(b);
    out
}

/// The required fields as raw entries, `v` as a positive fixint.
fn raw_base() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("v", vec![0x01]),
        ("id", str8("evt-1")),
        ("type", str8("join")),
        ("doc", str8("doc-42")),
        ("user", str8("alice")),
    ]
}

fn full_event() -> Event {
    let mut ev = Event::new(EventType::Join, "doc-42", "alice");
    ev.session = Some("tab-1".into());
    ev.seq = Some(7);
    ev.ts = Some(1_700_000_000_123);
    ev.meta = Some(meta(&[("name", "Alice"), ("color", "#ff0000")]));
    ev
}

// ---------------------------------------------------------------------------------------------
// MessagePack form: accepted payloads
// ---------------------------------------------------------------------------------------------

#[test]
fn msgpack_round_trip_with_all_fields() {
    let ev = full_event();
    let decoded = decode_e(ev.encode().unwrap()).unwrap();
    assert_eq!(decoded, ev);
    assert_eq!(decoded.session_id(), "tab-1");
}

#[test]
fn msgpack_round_trip_of_every_type_with_only_required_fields() {
    for kind in [EventType::Join, EventType::Leave, EventType::Heartbeat] {
        let mut ev = Event::new(kind, "d", "u");
        ev.ts = None;
        let decoded = decode_e(ev.encode().unwrap()).unwrap();
        assert_eq!(decoded, ev);
        assert_eq!(decoded.kind, kind);
        assert_eq!(decoded.session, None);
        assert_eq!(decoded.seq, None);
        assert_eq!(decoded.ts, None);
        assert_eq!(decoded.meta, None);
        assert_eq!(
            decoded.session_id(),
            "u",
            "the session defaults to the user"
        );
    }
}

#[test]
fn msgpack_round_trip_of_boundary_values() {
    let mut ev = full_event();
    ev.seq = Some(MAX_SEQ);
    ev.ts = Some(-1);
    ev.meta = Some(Meta::new());
    assert_eq!(decode_e(ev.encode().unwrap()).unwrap(), ev);

    ev.seq = Some(0);
    ev.ts = Some(i64::MIN);
    assert_eq!(decode_e(ev.encode().unwrap()).unwrap(), ev);

    ev.ts = Some(i64::MAX);
    ev.doc = "é".repeat(128); // 256 bytes: the limit counts bytes
    ev.id = "i".repeat(128);
    assert_eq!(decode_e(ev.encode().unwrap()).unwrap(), ev);
}

#[test]
fn event_new_fills_version_fresh_id_and_time() {
    let a = Event::new(EventType::Heartbeat, "d", "u");
    let b = Event::new(EventType::Heartbeat, "d", "u");
    assert_eq!(a.v, VERSION);
    assert!(!a.id.is_empty());
    assert_ne!(a.id, b.id, "every event gets a fresh id");
    assert!(a.ts.unwrap() > 1_600_000_000_000);
    assert!(a.validate(&Limits::default()).is_ok());
}

#[test]
fn python_style_payload_is_accepted() {
    // msgpack.packb({"v": 1, "id": ..., "type": "heartbeat", "doc": ..., "user": ...,
    //                "session": "tab-9", "seq": 70000, "ts": 1700000000123,
    //                "meta": {"name": "Zoë"}})
    let payload = pack(&[
        ("v", Value::from(1u8)),
        ("id", Value::from("0190b6d5-1b2c-7000-8000-000000000001")),
        ("type", Value::from("heartbeat")),
        ("doc", Value::from("doc-42")),
        ("user", Value::from("alice")),
        ("session", Value::from("tab-9")),
        ("seq", Value::from(70_000u32)),
        ("ts", Value::from(1_700_000_000_123u64)),
        (
            "meta",
            Value::Map(vec![(Value::from("name"), Value::from("Zoë"))]),
        ),
    ]);
    let ev = decode_e(payload).unwrap();
    assert_eq!(ev.v, 1);
    assert_eq!(ev.id, "0190b6d5-1b2c-7000-8000-000000000001");
    assert_eq!(ev.kind, EventType::Heartbeat);
    assert_eq!(ev.doc, "doc-42");
    assert_eq!(ev.user, "alice");
    assert_eq!(ev.session.as_deref(), Some("tab-9"));
    assert_eq!(ev.seq, Some(70_000));
    assert_eq!(ev.ts, Some(1_700_000_000_123));
    assert_eq!(ev.meta, Some(meta(&[("name", "Zoë")])));
}

#[test]
fn integers_of_every_width_are_accepted() {
    let cases: Vec<(Vec<u8>, u64)> = vec![
        (vec![0x05], 5),                              // positive fixint
        (vec![0xcc, 0x05], 5),                        // uint8, not minimal
        (vec![0xcc, 0xc8], 200),                      // uint8
        (vec![0xcd, 0x01, 0x00], 256),                // uint16
        (vec![0xce, 0x00, 0x01, 0x11, 0x70], 70_000), // uint32
        (
            [&[0xcf][..], &1_700_000_000_000u64.to_be_bytes()].concat(),
            1_700_000_000_000,
        ), // uint64
        (vec![0xd0, 0x05], 5),                        // int8, non-negative
        (vec![0xd1, 0x01, 0x00], 256),                // int16
        ([&[0xd2][..], &70_000i32.to_be_bytes()].concat(), 70_000), // int32
        ([&[0xd3][..], &i64::MAX.to_be_bytes()].concat(), MAX_SEQ), // int64
    ];
    for (seq, expected) in cases {
        let mut entries = raw_base();
        entries.push(("seq", seq.clone()));
        let ev = decode_e(raw_map(&entries))
            .unwrap_or_else(|e| panic!("seq encoded as {seq:02x?} rejected: {e}"));
        assert_eq!(ev.seq, Some(expected), "seq encoded as {seq:02x?}");
    }

    // `v` and `ts` in wide forms too.
    for v in [
        vec![0xcc, 0x01],
        vec![0xcf, 0, 0, 0, 0, 0, 0, 0, 1],
        vec![0xd3, 0, 0, 0, 0, 0, 0, 0, 1],
    ] {
        let mut entries = raw_base();
        entries[0].1 = v.clone();
        assert_eq!(
            decode_e(raw_map(&entries)).unwrap().v,
            1,
            "v encoded as {v:02x?}"
        );
    }
    for (ts, expected) in [
        (vec![0xff], -1i64), // negative fixint
        (vec![0xd0, 0x80], -128),
        ([&[0xd3][..], &(-5_000i64).to_be_bytes()].concat(), -5_000),
        (
            [&[0xcf][..], &(i64::MAX as u64).to_be_bytes()].concat(),
            i64::MAX,
        ),
    ] {
        let mut entries = raw_base();
        entries.push(("ts", ts));
        assert_eq!(decode_e(raw_map(&entries)).unwrap().ts, Some(expected));
    }
}

#[test]
fn bin_values_are_accepted_when_utf8() {
    // Python's msgpack with bytes values (or old raw strings) writes bin.
    let entries = vec![
        ("v", vec![0x01]),
        ("id", bin8(b"evt-1")),
        ("type", bin8(b"leave")),
        ("doc", bin8("dòc".as_bytes())),
        ("user", bin8(b"alice")),
        ("session", bin8(b"tab-1")),
        (
            "meta",
            [&[0x81][..], &bin8(b"name"), &bin8("Zoë".as_bytes())].concat(),
        ),
    ];
    let ev = decode_e(raw_map(&entries)).unwrap();
    assert_eq!(ev.id, "evt-1");
    assert_eq!(ev.kind, EventType::Leave);
    assert_eq!(ev.doc, "dòc");
    assert_eq!(ev.user, "alice");
    assert_eq!(ev.session.as_deref(), Some("tab-1"));
    assert_eq!(ev.meta, Some(meta(&[("name", "Zoë")])));

    // Keys may be bin too.
    let payload = pack(&base());
    let mut keyed = vec![0x85];
    for (k, v) in base() {
        keyed.extend(bin8(k.as_bytes()));
        keyed.extend(enc(&v));
    }
    assert_eq!(decode_e(keyed).unwrap(), decode_e(payload).unwrap());
}

#[test]
fn bin_or_str_that_is_not_utf8_is_rejected() {
    for field in ["id", "type", "doc", "user", "session"] {
        let mut entries = raw_base();
        let bad = bin8(&[0xff, 0xfe]);
        match entries.iter_mut().find(|(k, _)| *k == field) {
            Some(slot) => slot.1 = bad,
            None => entries.push((field, bad)),
        }
        assert_invalid(
            decode_e(raw_map(&entries)),
            &[&format!("`{field}`"), "UTF-8"],
        );
    }
    // A str (not bin) holding invalid UTF-8.
    let mut entries = raw_base();
    entries[3].1 = vec![0xa2, 0xc3, 0x28];
    assert_invalid(decode_e(raw_map(&entries)), &["`doc`", "UTF-8"]);
    // Invalid UTF-8 in meta.
    let mut entries = raw_base();
    entries.push((
        "meta",
        [&[0x81][..], &str8("k"), &bin8(&[0xc3, 0x28])].concat(),
    ));
    assert_invalid(decode_e(raw_map(&entries)), &["`meta`"]);
}

#[test]
fn unknown_fields_are_ignored() {
    let mut pairs = base();
    pairs.push((
        "future",
        Value::Array(vec![Value::from(1), Value::from("x")]),
    ));
    pairs.push(("pos", Value::F64(1.5)));
    pairs.push((
        "nested",
        Value::Map(vec![(Value::from("a"), Value::Array(vec![Value::Nil]))]),
    ));
    pairs.push(("flag", Value::Boolean(true)));
    pairs.push(("blob", Value::Binary(vec![0, 159, 146, 150])));
    pairs.push(("ext", Value::Ext(5, vec![1, 2, 3])));
    let with_extra = decode_e(pack(&pairs)).unwrap();
    let plain = decode_e(pack(&base())).unwrap();
    assert_eq!(with_extra, plain);
}

#[test]
fn unknown_fields_may_come_first_and_keys_in_any_order() {
    let mut pairs = vec![("zzz", Value::from(123))];
    let mut b = base();
    b.reverse();
    pairs.extend(b);
    let ev = decode_e(pack(&pairs)).unwrap();
    assert_eq!(ev, decode_e(pack(&base())).unwrap());
}

#[test]
fn nil_optional_fields_are_absent() {
    let mut pairs = base();
    for key in ["session", "seq", "ts", "meta"] {
        pairs.push((key, Value::Nil));
    }
    let ev = decode_e(pack(&pairs)).unwrap();
    assert_eq!(ev.session, None);
    assert_eq!(ev.seq, None);
    assert_eq!(ev.ts, None);
    assert_eq!(ev.meta, None);
    assert_eq!(ev.session_id(), "alice");
}

#[test]
fn nil_required_fields_are_rejected() {
    for key in ["v", "id", "type", "doc", "user"] {
        let pairs = with(base(), key, Value::Nil);
        assert_invalid(decode_e(pack(&pairs)), &[&format!("`{key}`")]);
    }
}

#[test]
fn e_field_takes_precedence_over_flat_fields() {
    let mut fields = flat(&[("type", "leave"), ("doc", "other"), ("user", "bob")]);
    fields.push((b"e".to_vec(), pack(&base())));
    let ev = decode(&fields).unwrap();
    assert_eq!(ev.kind, EventType::Join);
    assert_eq!(ev.doc, "doc-42");
    assert_eq!(ev.user, "alice");
    assert_eq!(ev.id, "evt-1");
}

// ---------------------------------------------------------------------------------------------
// Flat form: accepted entries
// ---------------------------------------------------------------------------------------------

#[test]
fn flat_minimal_entry() {
    let ev = decode(&flat(&[
        ("type", "join"),
        ("doc", "42"),
        ("user", "alice"),
        ("session", "tab1"),
    ]))
    .unwrap();
    assert_eq!(
        ev,
        Event {
            v: VERSION,
            id: "1700000000000-5".into(),
            kind: EventType::Join,
            doc: "42".into(),
            user: "alice".into(),
            session: Some("tab1".into()),
            seq: None,
            ts: None,
            meta: None,
        }
    );
}

#[test]
fn flat_id_defaults_to_the_entry_id() {
    let fields = flat(&[("type", "leave"), ("doc", "d"), ("user", "u")]);
    let a = decode_entry(StreamId::new(1, 2), &fields, &Limits::default()).unwrap();
    let b = decode_entry(StreamId::new(1, 3), &fields, &Limits::default()).unwrap();
    assert_eq!(a.id, "1-2");
    assert_eq!(b.id, "1-3");
    assert_eq!(a.session, None);
    assert_eq!(a.session_id(), "u");
}

#[test]
fn flat_with_every_field() {
    let ev = decode(&flat(&[
        ("v", "1"),
        ("id", "evt-7"),
        ("type", "heartbeat"),
        ("doc", "doc-1"),
        ("user", "bob"),
        ("session", "tab-2"),
        ("seq", "42"),
        ("ts", "1700000000123"),
        ("meta.name", "Bob"),
        ("meta.color", "blue"),
        ("unrelated", "ignored"),
    ]))
    .unwrap();
    assert_eq!(ev.v, 1);
    assert_eq!(ev.id, "evt-7");
    assert_eq!(ev.kind, EventType::Heartbeat);
    assert_eq!(ev.doc, "doc-1");
    assert_eq!(ev.user, "bob");
    assert_eq!(ev.session.as_deref(), Some("tab-2"));
    assert_eq!(ev.seq, Some(42));
    assert_eq!(ev.ts, Some(1_700_000_000_123));
    assert_eq!(ev.meta, Some(meta(&[("name", "Bob"), ("color", "blue")])));
}

#[test]
fn flat_seq_accepts_the_full_range() {
    for (text, expected) in [("0", 0), ("007", 7), ("9223372036854775807", MAX_SEQ)] {
        let ev = decode(&flat(&[
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
            ("seq", text),
        ]))
        .unwrap();
        assert_eq!(ev.seq, Some(expected), "seq {text:?}");
    }
}

#[test]
fn flat_without_meta_fields_has_no_meta() {
    let ev = decode(&flat(&[
        ("type", "join"),
        ("doc", "d"),
        ("user", "u"),
        ("metaname", "x"),
    ]))
    .unwrap();
    assert_eq!(ev.meta, None);
}

#[test]
fn flat_ignores_field_names_that_are_not_utf8() {
    let mut fields = flat(&[("type", "join"), ("doc", "d"), ("user", "u")]);
    fields.push((vec![0xff, 0xfe], vec![0xff]));
    let ev = decode(&fields).unwrap();
    assert_eq!(ev.doc, "d");
}

#[test]
fn flat_and_msgpack_forms_agree() {
    let ev = full_event();
    let flat_ev = decode(&flat(&[
        ("id", ev.id.as_str()),
        ("type", "join"),
        ("doc", "doc-42"),
        ("user", "alice"),
        ("session", "tab-1"),
        ("seq", "7"),
        ("ts", "1700000000123"),
        ("meta.name", "Alice"),
        ("meta.color", "#ff0000"),
    ]))
    .unwrap();
    assert_eq!(flat_ev, ev);
    assert_eq!(decode_e(ev.encode().unwrap()).unwrap(), flat_ev);
}

// ---------------------------------------------------------------------------------------------
// Rejected entries
// ---------------------------------------------------------------------------------------------

#[test]
fn rejects_payload_that_is_not_msgpack() {
    assert_invalid(decode_e(vec![]), &["MessagePack"]);
    assert_invalid(decode_e(vec![0xc1]), &["MessagePack"]); // the one never-used marker
    let full = pack(&base());
    assert_invalid(decode_e(full[..full.len() - 2].to_vec()), &["MessagePack"]); // truncated
    assert_invalid(decode_e(b"{\"v\":1}".to_vec()), &["MessagePack"]); // JSON
}

#[test]
fn rejects_msgpack_that_is_not_a_map() {
    // A positional array with the same fields, in order.
    let positional = enc(&Value::Array(vec![
        Value::from(1),
        Value::from("evt-1"),
        Value::from("join"),
        Value::from("doc-42"),
        Value::from("alice"),
    ]));
    assert_invalid(decode_e(positional), &["map"]);
    for scalar in [
        Value::from(1),
        Value::from("join"),
        Value::Nil,
        Value::Binary(vec![1]),
    ] {
        assert_invalid(decode_e(enc(&scalar)), &["map"]);
    }
}

#[test]
fn rejects_map_keys_that_are_not_strings() {
    let mut map: Vec<(Value, Value)> = base()
        .into_iter()
        .map(|(k, v)| (Value::from(k), v))
        .collect();
    map.push((Value::from(7), Value::from("x")));
    assert_invalid(decode_e(enc(&Value::Map(map))), &["key"]);
}

#[test]
fn rejects_missing_required_fields() {
    for key in ["v", "id", "type", "doc", "user"] {
        let r = assert_invalid(
            decode_e(pack(&without(base(), key))),
            &[&format!("`{key}`")],
        );
        assert!(r.contains("missing"), "{r:?}");
    }
    assert_invalid(decode_e(pack(&[])), &["missing"]);
}

#[test]
fn rejects_wrong_types() {
    let cases: Vec<(&'static str, Value)> = vec![
        ("doc", Value::from(42)),
        ("user", Value::Array(vec![])),
        ("id", Value::from(1)),
        ("type", Value::Boolean(true)),
        ("session", Value::from(3)),
        ("seq", Value::from("12")),
        ("seq", Value::F64(1.0)),
        ("ts", Value::from("1700000000000")),
        ("ts", Value::F64(1.7e12)),
        ("v", Value::from("1")),
        ("meta", Value::from("name=Alice")),
        (
            "meta",
            Value::Array(vec![Value::from("name"), Value::from("Alice")]),
        ),
    ];
    for (key, value) in cases {
        let pairs = with(base(), key, value.clone());
        assert_invalid(decode_e(pack(&pairs)), &[&format!("`{key}`")]);
    }
}

#[test]
fn rejects_negative_or_out_of_range_numbers() {
    let r = assert_invalid(
        decode_e(pack(&with(base(), "seq", Value::from(-1)))),
        &["`seq`"],
    );
    assert!(r.contains("negative"), "{r:?}");
    assert_invalid(
        decode_e(pack(&with(base(), "v", Value::from(-1)))),
        &["`v`"],
    );
    assert_invalid(
        decode_e(pack(&with(base(), "seq", Value::from(MAX_SEQ + 1)))),
        &["seq", "larger"],
    );
    assert_invalid(
        decode_e(pack(&with(base(), "seq", Value::from(u64::MAX)))),
        &["seq"],
    );
    assert_invalid(
        decode_e(pack(&with(base(), "ts", Value::from(i64::MAX as u64 + 1)))),
        &["`ts`", "range"],
    );
}

#[test]
fn rejects_unknown_type() {
    for kind in ["kick", "JOIN", "Join", "", "join "] {
        let r = assert_invalid(
            decode_e(pack(&with(base(), "type", Value::from(kind)))),
            &["type"],
        );
        assert!(
            r.contains(&format!("{kind:?}")),
            "{r:?} should quote {kind:?}"
        );
    }
    // A huge type is quoted truncated, so the reason stays readable.
    let long = "x".repeat(10_000);
    let r = assert_invalid(
        decode_e(pack(&with(base(), "type", Value::from(long.as_str())))),
        &["type"],
    );
    assert!(r.len() < 200, "reason is {} bytes", r.len());
    // Multi-byte characters are truncated on a character boundary.
    let r = assert_invalid(
        decode_e(pack(&with(
            base(),
            "type",
            Value::from("é".repeat(100).as_str()),
        ))),
        &["type"],
    );
    assert!(
        r.contains(&"é".repeat(64)) && !r.contains(&"é".repeat(65)),
        "{r:?}"
    );
    assert_invalid(
        decode(&flat(&[("type", "kick"), ("doc", "d"), ("user", "u")])),
        &["type", "kick"],
    );
}

#[test]
fn rejects_unsupported_version() {
    for v in [0u64, 2, 1000] {
        let r = assert_invalid(
            decode_e(pack(&with(base(), "v", Value::from(v)))),
            &["version"],
        );
        assert!(r.contains(&format!("v={v}")), "{r:?}");
    }
    assert_invalid(
        decode(&flat(&[
            ("v", "2"),
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
        ])),
        &["version", "v=2"],
    );
    assert_invalid(
        decode(&flat(&[
            ("v", "one"),
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
        ])),
        &["`v`"],
    );
}

#[test]
fn rejects_empty_ids() {
    for key in ["id", "doc", "user", "session"] {
        let r = assert_invalid(
            decode_e(pack(&with(base(), key, Value::from("")))),
            &[&format!("`{key}`")],
        );
        assert!(r.contains("empty"), "{r:?}");
    }
    for key in ["id", "doc", "user", "session"] {
        let mut pairs = vec![("type", "join"), ("doc", "d"), ("user", "u")];
        match pairs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = "",
            None => pairs.push((key, "")),
        }
        assert_invalid(decode(&flat(&pairs)), &[&format!("`{key}`"), "empty"]);
    }
}

#[test]
fn rejects_ids_over_the_length_limits() {
    for key in ["doc", "user", "session"] {
        let ok = "a".repeat(256);
        assert!(
            decode_e(pack(&with(base(), key, Value::from(ok.as_str())))).is_ok(),
            "{key} of 256 bytes"
        );
        let too_long = "a".repeat(257);
        let r = assert_invalid(
            decode_e(pack(&with(base(), key, Value::from(too_long.as_str())))),
            &[&format!("`{key}`"), "257"],
        );
        assert!(r.contains("256"), "{r:?}");
        // The limit is in bytes, not characters.
        let wide = "é".repeat(129);
        assert_invalid(
            decode_e(pack(&with(base(), key, Value::from(wide.as_str())))),
            &[&format!("`{key}`"), "258"],
        );
    }
    assert!(decode_e(pack(&with(
        base(),
        "id",
        Value::from("i".repeat(128).as_str())
    )))
    .is_ok());
    assert_invalid(
        decode_e(pack(&with(
            base(),
            "id",
            Value::from("i".repeat(129).as_str()),
        ))),
        &["`id`", "129", "128"],
    );
    // The flat form has the same limits.
    assert_invalid(
        decode(&flat(&[
            ("type", "join"),
            ("doc", &"d".repeat(257)),
            ("user", "u"),
        ])),
        &["`doc`"],
    );
    assert_invalid(
        decode(&flat(&[
            ("id", &"i".repeat(129)),
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
        ])),
        &["`id`"],
    );
}

#[test]
fn rejects_control_characters_in_ids() {
    for key in ["id", "doc", "user", "session"] {
        for bad in [
            "a\nb", "a\rb", "\tab", "ab\0", "a\u{1f}b", "a\u{7f}", "a\u{85}b",
        ] {
            let r = assert_invalid(
                decode_e(pack(&with(base(), key, Value::from(bad)))),
                &[&format!("`{key}`"), "control"],
            );
            assert!(!r.contains('\n'), "reason must stay on one line: {r:?}");
        }
        let mut pairs = vec![("type", "join"), ("doc", "d"), ("user", "u")];
        match pairs.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = "x\ny",
            None => pairs.push((key, "x\ny")),
        }
        assert_invalid(decode(&flat(&pairs)), &[&format!("`{key}`"), "control"]);
    }
    // Non-ASCII printable characters are fine.
    assert!(decode_e(pack(&with(base(), "user", Value::from("Zoë 🦀")))).is_ok());
}

#[test]
fn rejects_meta_with_non_string_keys_or_values() {
    for m in [
        Value::Map(vec![(Value::from("name"), Value::from(1))]),
        Value::Map(vec![(Value::from("name"), Value::Nil)]),
        Value::Map(vec![(Value::from("name"), Value::Map(vec![]))]),
        Value::Map(vec![(Value::from(1), Value::from("x"))]),
    ] {
        let r = assert_invalid(
            decode_e(pack(&with(base(), "meta", m.clone()))),
            &["`meta`"],
        );
        assert!(r.contains("string"), "{r:?}");
    }
}

#[test]
fn meta_key_count_limit() {
    let keys = |n: usize| -> Vec<(Value, Value)> {
        (0..n)
            .map(|i| (Value::from(format!("k{i}")), Value::from("v")))
            .collect()
    };
    let ev = decode_e(pack(&with(base(), "meta", Value::Map(keys(16))))).unwrap();
    assert_eq!(ev.meta.unwrap().len(), 16);
    assert_invalid(
        decode_e(pack(&with(base(), "meta", Value::Map(keys(17))))),
        &["`meta`", "17 keys", "16"],
    );

    // Flat `meta.*` fields are counted the same way.
    let mut pairs: Vec<(String, String)> = vec![
        ("type".into(), "join".into()),
        ("doc".into(), "d".into()),
        ("user".into(), "u".into()),
    ];
    pairs.extend((0..17).map(|i| (format!("meta.k{i}"), "v".to_owned())));
    let fields: Fields = pairs
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    assert_invalid(decode(&fields), &["`meta`", "17 keys"]);
}

#[test]
fn meta_size_limit() {
    // {"k": "x" * n} encodes as fixmap + fixstr "k" + str16 header + n bytes.
    let exactly = meta(&[("k", &"x".repeat(1018))]);
    assert_eq!(encode_meta(&exactly).len(), 1024);
    let mut ev = full_event();
    ev.meta = Some(exactly);
    assert_eq!(decode_e(ev.encode().unwrap()).unwrap(), ev);

    let over = meta(&[("k", &"x".repeat(1019))]);
    assert_eq!(encode_meta(&over).len(), 1025);
    ev.meta = Some(over);
    let r = assert_invalid(
        decode_e(ev.encode().unwrap()),
        &["`meta`", "1025 bytes", "1024"],
    );
    assert!(r.contains("encoded"), "{r:?}");

    // Few keys but large values.
    let big = meta(&[
        ("a", &"x".repeat(300)),
        ("b", &"y".repeat(300)),
        ("c", &"z".repeat(500)),
    ]);
    ev.meta = Some(big);
    assert_invalid(decode_e(ev.encode().unwrap()), &["`meta`", "bytes"]);
    assert_invalid(
        decode(&flat(&[
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
            ("meta.k", &"x".repeat(2000)),
        ])),
        &["`meta`", "bytes"],
    );
}

#[test]
fn entry_size_limit() {
    let base_fields = flat(&[("type", "join"), ("doc", "d"), ("user", "u")]);
    let base_size: usize = base_fields.iter().map(|(k, v)| k.len() + v.len()).sum();
    let with_pad = |total: usize| {
        let mut f = base_fields.clone();
        f.push((b"pad".to_vec(), vec![b'x'; total - base_size - 3]));
        f
    };
    assert!(
        decode(&with_pad(64 * 1024)).is_ok(),
        "exactly 64 KiB is accepted"
    );
    let r = assert_invalid(
        decode(&with_pad(64 * 1024 + 1)),
        &["entry", "65537 bytes", "65536"],
    );
    assert!(r.starts_with("entry"), "{r:?}");

    // In the MessagePack form, the payload counts.
    let payload = pack(&with(base(), "pad", Value::Binary(vec![0; 70_000])));
    assert_invalid(decode_e(payload), &["entry", "bytes"]);
    // Field names count too.
    let mut f = base_fields.clone();
    f.push((vec![b'k'; 65_536], b"v".to_vec()));
    assert_invalid(decode(&f), &["entry", "bytes"]);
}

#[test]
fn field_count_limit() {
    let with_fields = |n: usize| {
        let mut f = flat(&[("type", "join"), ("doc", "d"), ("user", "u")]);
        f.extend((3..n).map(|i| (format!("x{i}").into_bytes(), b"1".to_vec())));
        assert_eq!(f.len(), n);
        f
    };
    assert!(decode(&with_fields(64)).is_ok());
    let r = assert_invalid(decode(&with_fields(65)), &["65 fields", "64"]);
    assert!(r.starts_with("entry"), "{r:?}");
    // Also when `e` is present.
    let mut f = e_entry(pack(&base()));
    f.extend((0..64).map(|i| (format!("x{i}").into_bytes(), b"1".to_vec())));
    assert_invalid(decode(&f), &["65 fields"]);
}

#[test]
fn custom_limits_are_honoured() {
    let limits = Limits {
        max_entry_bytes: 100,
        max_fields: 5,
        max_id_len: 8,
        max_event_id_len: 16,
        max_meta_bytes: 16,
        max_meta_keys: 1,
    };
    let ok = flat(&[
        ("id", "e1"),
        ("type", "join"),
        ("doc", "d"),
        ("user", "u"),
        ("meta.a", "1"),
    ]);
    assert!(decode_entry(entry_id(), &ok, &limits).is_ok());
    let cases: Vec<(Fields, &str)> = vec![
        (
            flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("a", "1"),
                ("b", "2"),
                ("c", "3"),
            ]),
            "6 fields",
        ),
        (
            flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("pad", &"x".repeat(100)),
            ]),
            "entry is",
        ),
        (
            flat(&[("type", "join"), ("doc", "ninechars"), ("user", "u")]),
            "`doc`",
        ),
        (
            flat(&[
                ("id", "e1234567890123456"),
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
            ]),
            "17 bytes",
        ),
        (
            flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("meta.a", "1"),
                ("meta.b", "2"),
            ]),
            "2 keys",
        ),
        (
            flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("meta.k", &"x".repeat(20)),
            ]),
            "bytes encoded",
        ),
    ];
    for (fields, needle) in cases {
        assert_invalid(decode_entry(entry_id(), &fields, &limits), &[needle]);
        // The same entry passes the default limits.
        assert!(decode(&fields).is_ok(), "{fields:?}");
    }
}

#[test]
fn rejects_invalid_utf8_in_flat_values() {
    for key in [
        "type",
        "doc",
        "user",
        "session",
        "id",
        "seq",
        "v",
        "ts",
        "meta.name",
    ] {
        let mut fields = flat(&[("type", "join"), ("doc", "d"), ("user", "u")]);
        fields.retain(|(k, _)| k != key.as_bytes());
        fields.push((key.as_bytes().to_vec(), vec![b'a', 0xff, b'b']));
        assert_invalid(decode(&fields), &[&format!("`{key}`"), "UTF-8"]);
    }
}

#[test]
fn rejects_bad_flat_numbers() {
    for bad in ["12x", "-1", "", " 1", "1 ", "+1", "1.0", "0x10", "١٢"] {
        let r = assert_invalid(
            decode(&flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("seq", bad),
            ])),
            &["`seq`"],
        );
        assert!(
            r.contains(&format!("{bad:?}")),
            "{r:?} should quote {bad:?}"
        );
    }
    assert_invalid(
        decode(&flat(&[
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
            ("seq", "18446744073709551616"),
        ])),
        &["`seq`", "range"],
    );
    assert_invalid(
        decode(&flat(&[
            ("type", "join"),
            ("doc", "d"),
            ("user", "u"),
            ("seq", "9223372036854775808"),
        ])),
        &["seq", "larger"],
    );
    for bad in ["soon", "1.5", ""] {
        assert_invalid(
            decode(&flat(&[
                ("type", "join"),
                ("doc", "d"),
                ("user", "u"),
                ("ts", bad),
            ])),
            &["`ts`"],
        );
    }
}

#[test]
fn rejects_flat_entry_without_e_or_type() {
    for fields in [
        flat(&[("doc", "d"), ("user", "u")]),
        flat(&[("foo", "bar")]),
        Vec::new(),
    ] {
        assert_invalid(decode(&fields), &["`e`", "`type`"]);
    }
}

#[test]
fn rejects_flat_entry_missing_doc_or_user() {
    assert_invalid(
        decode(&flat(&[("type", "join"), ("user", "u")])),
        &["missing", "`doc`"],
    );
    assert_invalid(
        decode(&flat(&[("type", "join"), ("doc", "d")])),
        &["missing", "`user`"],
    );
}

#[test]
fn rejects_trailing_bytes_after_the_map() {
    for tail in [vec![0xc0], vec![0x00], pack(&base())] {
        let mut payload = pack(&base());
        payload.extend_from_slice(&tail);
        assert_invalid(decode_e(payload), &["trailing"]);
    }
}

/// Runs `f` on a thread with a small stack, so unbounded recursion would overflow it.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .unwrap()
        .join()
        .expect("decoding panicked or overflowed")
}

#[test]
fn deep_nesting_is_rejected_without_overflowing_the_stack() {
    let results = on_small_stack(|| {
        let mut payloads = Vec::new();
        // 1000 nested arrays.
        let mut p = vec![0x91; 1000];
        p.push(0xc0);
        payloads.push(p);
        // As deep as the entry limit allows.
        let mut p = vec![0x91; 60_000];
        p.push(0xc0);
        payloads.push(p);
        // 1000 nested maps in an unknown field of an otherwise valid event.
        let mut entries = raw_base();
        let mut nested = [0x81, 0xa1, b'a'].repeat(1000);
        nested.push(0xc0);
        entries.push(("x", nested.clone()));
        payloads.push(raw_map(&entries));
        // ... and in `meta`.
        let mut entries = raw_base();
        entries.push(("meta", nested));
        payloads.push(raw_map(&entries));
        payloads
            .into_iter()
            .map(decode_e)
            .map(reason)
            .collect::<Vec<_>>()
    });
    for r in results {
        assert!(r.contains("MessagePack"), "{r:?}");
    }
    // Shallow nesting in unknown fields is fine.
    let ok = pack(&with(
        base(),
        "x",
        Value::Array(vec![Value::Array(vec![Value::from(1)])]),
    ));
    assert!(decode_e(ok).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

fn encoded_map(ev: &Event) -> Vec<(String, Value)> {
    let bytes = ev.encode().unwrap();
    let mut rd = &bytes[..];
    let value = rmpv::decode::read_value(&mut rd).unwrap();
    assert!(rd.is_empty(), "encode writes exactly one value");
    let Value::Map(pairs) = value else {
        panic!("encode must write a map, wrote {value:?}");
    };
    pairs
        .into_iter()
        .map(|(k, v)| {
            let k = k.as_str().expect("keys are strings").to_owned();
            (k, v)
        })
        .collect()
}

#[test]
fn encode_writes_a_map_with_named_fields() {
    let mut ev = Event::new(EventType::Leave, "doc-42", "alice");
    ev.ts = None;
    let pairs = encoded_map(&ev);
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["v", "id", "type", "doc", "user"],
        "absent optional fields are omitted"
    );
    let get = |name: &str| &pairs.iter().find(|(k, _)| k == name).unwrap().1;
    assert_eq!(get("v").as_u64(), Some(1));
    assert_eq!(get("id").as_str(), Some(ev.id.as_str()));
    assert_eq!(get("type").as_str(), Some("leave"));
    assert_eq!(get("doc").as_str(), Some("doc-42"));
    assert_eq!(get("user").as_str(), Some("alice"));
}

#[test]
fn encode_writes_present_optional_fields() {
    let ev = full_event();
    let pairs = encoded_map(&ev);
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["v", "id", "type", "doc", "user", "session", "seq", "ts", "meta"]
    );
    let get = |name: &str| &pairs.iter().find(|(k, _)| k == name).unwrap().1;
    assert_eq!(get("type").as_str(), Some("join"));
    assert_eq!(get("session").as_str(), Some("tab-1"));
    assert_eq!(get("seq").as_u64(), Some(7));
    assert_eq!(get("ts").as_i64(), Some(1_700_000_000_123));
    let Value::Map(m) = get("meta") else {
        panic!("meta must be a map");
    };
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|(k, v)| k.is_str() && v.is_str()));

    // Only the present optional fields appear.
    let mut ev = Event::new(EventType::Heartbeat, "d", "u");
    ev.ts = None;
    ev.seq = Some(3);
    let keys: Vec<String> = encoded_map(&ev).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["v", "id", "type", "doc", "user", "seq"]);
}

#[test]
fn event_type_names() {
    for (kind, name, live) in [
        (EventType::Join, "join", true),
        (EventType::Leave, "leave", false),
        (EventType::Heartbeat, "heartbeat", true),
    ] {
        assert_eq!(kind.as_str(), name);
        assert_eq!(EventType::parse(name), Some(kind));
        assert_eq!(kind.is_live(), live);
    }
    assert_eq!(EventType::parse("Join"), None);
    assert_eq!(EventType::parse(""), None);
}

#[test]
fn stored_meta_round_trips() {
    let m = meta(&[("name", "Alice"), ("color", "red")]);
    assert_eq!(decode_meta(&encode_meta(&m)), Some(m));
    assert_eq!(decode_meta(&encode_meta(&Meta::new())), Some(Meta::new()));
    assert_eq!(decode_meta(&[]), None);
    assert_eq!(decode_meta(&enc(&Value::from("x"))), None);
    assert_eq!(decode_meta(&[0x91; 1000]), None);
}

// ---------------------------------------------------------------------------------------------
// Fuzz-like robustness
// ---------------------------------------------------------------------------------------------

/// Bytes that matter to MessagePack: markers of every family and length boundaries.
const INTERESTING: &[u8] = &[
    0x00, 0x01, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc7, 0xca,
    0xcb, 0xcc, 0xcf, 0xd0, 0xd3, 0xd4, 0xd9, 0xda, 0xdb, 0xdc, 0xdd, 0xde, 0xdf, 0xe0, 0xff,
];

fn mutate(rng: &mut Rng, mut p: Vec<u8>) -> Vec<u8> {
    for _ in 0..=rng.index(4) {
        let len = p.len();
        match rng.index(8) {
            0 if len > 0 => {
                let i = rng.index(len);
                p[i] ^= 1 << rng.index(8);
            }
            1 if len > 0 => {
                let i = rng.index(len);
                p[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.index(len);
                p[i] = INTERESTING[rng.index(INTERESTING.len())];
            }
            3 => {
                let i = rng.index(len + 1);
                p.insert(i, INTERESTING[rng.index(INTERESTING.len())]);
            }
            4 if len > 0 => {
                p.remove(rng.index(len));
            }
            5 => p.truncate(rng.index(len + 1)),
            6 => {
                let extra = rng.bytes(8);
                p.extend(extra);
            }
            _ if len > 1 => {
                let a = rng.index(len);
                let b = a + rng.index(len - a) + 1;
                let chunk = p[a..b].to_vec();
                let at = rng.index(p.len() + 1);
                p.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    p
}

fn seeds() -> Vec<Vec<u8>> {
    let mut minimal = Event::new(EventType::Leave, "d", "u");
    minimal.ts = None;
    let mut tagged = full_event();
    tagged.seq = Some(MAX_SEQ);
    vec![
        full_event().encode().unwrap(),
        minimal.encode().unwrap(),
        tagged.encode().unwrap(),
        pack(&base()),
        raw_map(&raw_base()),
        pack(&with(
            base(),
            "meta",
            Value::Map(vec![(Value::from("k"), Value::from("v"))]),
        )),
    ]
}

fn flat_fuzz(rng: &mut Rng) -> Fields {
    const NAMES: &[&str] = &[
        "type",
        "doc",
        "user",
        "session",
        "id",
        "v",
        "seq",
        "ts",
        "meta.name",
        "meta.",
        "e",
        "x",
    ];
    const VALUES: &[&str] = &[
        "join",
        "leave",
        "heartbeat",
        "",
        "1",
        "2",
        "12x",
        "-1",
        "18446744073709551616",
        "9223372036854775807",
        "9223372036854775808",
        "a\nb",
        "doc-42",
        "Zoë",
    ];
    let mut fields = Fields::new();
    // Usually start from a valid flat entry so mutations reach the deeper checks.
    if rng.index(2) == 0 {
        fields = flat(&[("type", "join"), ("doc", "d"), ("user", "u")]);
    }
    for _ in 0..rng.index(8) {
        let name = NAMES[rng.index(NAMES.len())].as_bytes().to_vec();
        let value = match rng.index(4) {
            0 => rng.bytes(12),
            1 => {
                let v = VALUES[rng.index(VALUES.len())].as_bytes().to_vec();
                mutate(rng, v)
            }
            _ => VALUES[rng.index(VALUES.len())].as_bytes().to_vec(),
        };
        fields.push((name, value));
    }
    fields
}

#[test]
fn fuzz_decode_never_panics() {
    let limits = Limits::default();
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..20_000 {
        let fields = match i % 4 {
            0 => e_entry(rng.bytes(64)),
            1 | 2 => {
                let seed = seeds[rng.index(seeds.len())].clone();
                e_entry(mutate(&mut rng, seed))
            }
            _ => flat_fuzz(&mut rng),
        };
        let id = StreamId::new(rng.next() >> 20, rng.next() >> 40);
        match decode_entry(id, &fields, &limits) {
            Ok(ev) => {
                ok += 1;
                // Whatever decodes is valid and survives a MessagePack round trip.
                assert!(
                    ev.validate(&limits).is_ok(),
                    "decoded an invalid event: {ev:?}"
                );
                let again = decode_entry(id, &e_entry(ev.encode().unwrap()), &limits)
                    .unwrap_or_else(|e| panic!("re-encoded {ev:?} does not decode: {e}"));
                assert_eq!(again, ev);
            }
            Err(Error::InvalidEvent(reason)) => {
                err += 1;
                assert!(
                    !reason.is_empty(),
                    "input {fields:02x?} gave an empty reason"
                );
            }
            Err(other) => panic!("input {fields:02x?} gave a non-dead-letter error: {other:?}"),
        }
    }
    // The loop explores both outcomes, not just one.
    assert!(ok > 500, "only {ok} inputs decoded");
    assert!(err > 5_000, "only {err} inputs were rejected");
}

#[test]
fn control_check_on_bytes_agrees_with_char_is_control() {
    for c in (0u32..0x800)
        .chain(0xfff0..0x10040)
        .filter_map(char::from_u32)
    {
        for s in [
            c.to_string(),
            format!("a{c}"),
            format!("{c}é"),
            format!("\u{c2}{c}"),
        ] {
            assert_eq!(has_control(&s), s.chars().any(char::is_control), "{s:?}");
        }
    }
}
