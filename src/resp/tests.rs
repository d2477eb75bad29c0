//! The lean reader against redis-rs's own parser: the same values from the same bytes, `None`
//! for every cut short reply, an error (never a panic) for malformed bytes. Live tests of
//! [`LeanConn`] against a real Redis are in `tests/lean.rs`.

use super::*;
use proptest::prelude::*;

/// A RESP2 reply tree as Redis sends it.
#[derive(Debug, Clone)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    NilBulk,
    NilArray,
    Array(Vec<Reply>),
}

impl Reply {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Reply::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
            Reply::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
            Reply::Int(n) => out.extend_from_slice(format!(":{n}\r\n").as_bytes()),
            Reply::Bulk(b) => {
                out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Reply::NilBulk => out.extend_from_slice(b"$-1\r\n"),
            Reply::NilArray => out.extend_from_slice(b"*-1\r\n"),
            Reply::Array(items) => {
                out.extend_from_slice(format!("*{}\r\n", items.len()).as_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

fn reply() -> impl Strategy<Value = Reply> {
    let leaf = prop_oneof![
        "[ -~]{0,12}".prop_map(Reply::Simple),
        Just(Reply::Simple("OK".into())),
        prop_oneof![
            Just("ERR unknown command".to_owned()),
            Just("WRONGTYPE Operation against a key holding the wrong kind of value".to_owned()),
            Just("NOSCRIPT No matching script".to_owned()),
            Just("EXECABORT Transaction discarded because of previous errors.".to_owned()),
            Just("NOPERM this user has no permissions".to_owned()),
            "[A-Z]{1,8} [ -~]{0,20}",
        ]
        .prop_map(Reply::Error),
        any::<i64>().prop_map(Reply::Int),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Reply::Bulk),
        Just(Reply::NilBulk),
        Just(Reply::NilArray),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        proptest::collection::vec(inner, 0..8).prop_map(Reply::Array)
    })
}

fn lean(bytes: &[u8]) -> RedisResult<Option<(Value, usize)>> {
    let Some(len) = scan(bytes)? else {
        return Ok(None);
    };
    let mut at = 0;
    let value = parse(bytes, &mut at, 0)?;
    assert_eq!(at, len, "parse and scan agree on the length");
    Ok(Some((value, len)))
}

proptest! {
    #[test]
    fn same_values_as_redis_rs(r in reply(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let whole = bytes.len();
        let expected = redis::parse_redis_value(&bytes).expect("redis-rs parses it");
        // Whatever follows (the next reply's start) is left alone.
        bytes.extend_from_slice(&tail);
        let (value, len) = lean(&bytes).expect("well formed").expect("complete");
        prop_assert_eq!(len, whole);
        prop_assert_eq!(format!("{value:?}"), format!("{expected:?}"));
    }

    #[test]
    fn every_cut_short_reply_needs_more(r in reply()) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        for cut in 0..bytes.len() {
            prop_assert!(
                matches!(scan(&bytes[..cut]), Ok(None)),
                "cut at {} of {}", cut, bytes.len()
            );
        }
    }

    #[test]
    fn damaged_replies_never_panic(r in reply(), at in any::<proptest::sample::Index>(), byte in any::<u8>()) {
        let mut bytes = Vec::new();
        r.encode(&mut bytes);
        let i = at.index(bytes.len());
        bytes[i] = byte;
        // Either an error, more bytes needed, or a value redis-rs reads the same.
        if let Ok(Some((value, len))) = lean(&bytes) {
            let expected = redis::parse_redis_value(&bytes[..len]);
            if let Ok(expected) = expected {
                prop_assert_eq!(format!("{value:?}"), format!("{expected:?}"));
            }
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = lean(&bytes);
    }
}

#[test]
fn the_extreme_integers_are_read() {
    for n in [i64::MIN, i64::MAX, 0, -1] {
        let bytes = format!(":{n}\r\n");
        let (value, _) = lean(bytes.as_bytes()).expect("well formed").expect("whole");
        assert_eq!(value, Value::Int(n));
    }
    assert!(scan(b":9223372036854775808\r\n").is_err());
    assert!(scan(b":-9223372036854775809\r\n").is_err());
}

#[test]
fn a_reply_arriving_in_pieces_is_scanned_once() {
    // Fed a byte at a time with the scan resumed from where it stopped, the reply is found whole
    // at its last byte, as a scan of all of it finds it.
    let mut reply = Vec::new();
    Reply::Array(vec![
        Reply::Bulk(b"hello".to_vec()),
        Reply::Array(vec![
            Reply::Int(-3),
            Reply::NilBulk,
            Reply::Simple("OK".into()),
        ]),
        Reply::Bulk(vec![b'x'; 300]),
    ])
    .encode(&mut reply);
    let mut state = Scan::default();
    for end in 1..reply.len() {
        assert!(
            matches!(scan_from(&reply[..end], &mut state), Ok(None)),
            "at {end}"
        );
    }
    assert_eq!(
        scan_from(&reply, &mut state).expect("well formed"),
        Some(reply.len())
    );
}

#[test]
fn malformed_replies_are_errors() {
    for bad in [
        &b"?what\r\n"[..],
        b":12a\r\n",
        b":\r\n",
        b":99999999999999999999\r\n",
        b"$5\r\nhello!!",
        b"$-2\r\n",
        b"*-5\r\n",
        b"+OK\rX",
        b"$3\r\nabc\n\n",
    ] {
        assert!(scan(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn nesting_beyond_the_limit_is_an_error() {
    let mut bytes = b"*1\r\n".repeat(MAX_DEPTH + 1);
    bytes.extend_from_slice(b":1\r\n");
    assert!(scan(&bytes).expect("well formed").is_some());
    let mut at = 0;
    assert!(parse(&bytes, &mut at, 0).is_err());
    let mut ok = b"*1\r\n".repeat(MAX_DEPTH);
    ok.extend_from_slice(b":1\r\n");
    let mut at = 0;
    assert!(parse(&ok, &mut at, 0).is_ok());
}

#[test]
fn error_replies_keep_their_codes() {
    let mut at = 0;
    let v = parse(b"-NOSCRIPT No matching script\r\n", &mut at, 0).expect("parsed");
    let e = v.extract_error().expect_err("an error");
    assert_eq!(e.code(), Some("NOSCRIPT"));
}

#[test]
fn only_plain_standalone_resp2_clients_are_eligible() {
    let yes = ["redis://127.0.0.1:1/", "redis://u:p@127.0.0.1:1/3"];
    for url in yes {
        assert!(eligible(&redis::Client::open(url).expect("url")), "{url}");
    }
    let no = [
        "rediss://127.0.0.1:1/",
        "redis://127.0.0.1:1/?protocol=resp3",
    ];
    for url in no {
        assert!(!eligible(&redis::Client::open(url).expect("url")), "{url}");
    }
}
