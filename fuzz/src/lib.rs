//! Invariant checks shared by the fuzz targets (`fuzz_targets/`) and the corpus replay test
//! (`tests/fuzz_corpus.rs`, which includes this file with `#[path]`): each reads arbitrary bytes as
//! input for one stage of the worker and panics when an invariant does not hold.
//!
//! Only `presence_worker` and `std` may be used here, so that the main crate's tests compile this
//! file without the fuzzing dependencies.

use std::collections::HashSet;

use presence_worker::coalesce::{coalesce, DocUpdate, SessionUpdate, Version};
use presence_worker::event::{decode_entry, decode_payload, encode_meta, Event, EventType, Meta};
use presence_worker::keys::session_field;
use presence_worker::limits::Limits;
use presence_worker::{Error, StreamId};

/// The entry id the decoder is given (the default event id of the flat form).
const ENTRY_ID: StreamId = StreamId::new(1_700_000_000_000, 7);

/// Separates fields and values in the flat reading of the input. 0xFF never occurs in UTF-8, so
/// seed files stay readable: `type\xffjoin\xffdoc\xff42...`.
pub const FLAT_SEP: u8 = 0xff;

/// Decoder invariants, for bytes read (a) as the MessagePack payload of field `e` and (b) as flat
/// field/value pairs separated by [`FLAT_SEP`]: decoding never panics and fails only with
/// `InvalidEvent`; a decoded event is valid and survives re-encoding in both forms.
pub fn check_decode(data: &[u8]) {
    let limits = Limits::default();
    let entry = decode_entry(ENTRY_ID, &[(b"e".to_vec(), data.to_vec())], &limits);
    if data.len() < limits.max_entry_bytes {
        // Within the size limit, the entry decoder is the payload decoder plus validation.
        let payload = decode_payload(data).and_then(|ev| ev.validate(&limits).map(|()| ev));
        assert_eq!(
            describe(&entry),
            describe(&payload),
            "decode_entry and decode_payload+validate disagree"
        );
    }
    check_decoded(&entry, &limits);
    check_decoded(&decode_entry(ENTRY_ID, &split_flat(data), &limits), &limits);
}

/// The flat reading of `data`: tokens separated by [`FLAT_SEP`], paired as field, value (a lone
/// last token is a field with an empty value).
pub fn split_flat(data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let tokens: Vec<&[u8]> = data.split(|&b| b == FLAT_SEP).collect();
    tokens
        .chunks(2)
        .map(|kv| {
            (
                kv[0].to_vec(),
                kv.get(1).map_or_else(Vec::new, |v| v.to_vec()),
            )
        })
        .collect()
}

fn describe(r: &Result<Event, Error>) -> String {
    match r {
        Ok(ev) => format!("Ok({ev:?})"),
        Err(e) => format!("Err({e})"),
    }
}

fn check_decoded(r: &Result<Event, Error>, limits: &Limits) {
    let ev = match r {
        Ok(ev) => ev,
        Err(Error::InvalidEvent(reason)) => {
            assert!(!reason.is_empty(), "empty dead-letter reason");
            return;
        }
        Err(e) => panic!("decoding failed with an error other than InvalidEvent: {e:?}"),
    };
    if let Err(e) = ev.validate(limits) {
        panic!("decoded event does not validate ({e}): {ev:?}");
    }
    let bytes = ev.encode().expect("a decoded event encodes");
    let again = decode_payload(&bytes).expect("a re-encoded event decodes");
    assert_eq!(&again, ev, "MessagePack round trip changed the event");
    let again = decode_entry(ENTRY_ID, &[(b"e".to_vec(), bytes)], limits)
        .expect("a re-encoded event is a valid entry");
    assert_eq!(&again, ev, "entry round trip changed the event");
    // The flat form cannot say "empty meta": it reads as no meta.
    let mut expected = ev.clone();
    if expected.meta.as_ref().is_some_and(Meta::is_empty) {
        expected.meta = None;
    }
    let again = decode_entry(ENTRY_ID, &to_flat(ev), limits).expect("the flat form decodes");
    assert_eq!(again, expected, "flat round trip changed the event");
}

/// `ev` in the flat form, every field explicit.
fn to_flat(ev: &Event) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut f: Vec<(String, String)> = vec![
        ("v".into(), ev.v.to_string()),
        ("id".into(), ev.id.clone()),
        ("type".into(), ev.kind.as_str().into()),
        ("doc".into(), ev.doc.clone()),
        ("user".into(), ev.user.clone()),
    ];
    if let Some(s) = &ev.session {
        f.push(("session".into(), s.clone()));
    }
    if let Some(q) = ev.seq {
        f.push(("seq".into(), q.to_string()));
    }
    if let Some(t) = ev.ts {
        f.push(("ts".into(), t.to_string()));
    }
    for (k, v) in ev.meta.iter().flatten() {
        f.push((format!("meta.{k}"), v.clone()));
    }
    f.into_iter()
        .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
        .collect()
}

/// Most events in one coalesced batch.
pub const MAX_BATCH: usize = 64;

/// Reads `data` as a batch: byte 0 chooses where `seq` is used (0 nowhere, 1 everywhere, 2 per
/// session, 3 per event), then 4 bytes per event:
/// - `b0`: type (`% 3`), doc (`/ 3 % 2`), user (`/ 6 % 3`), session (`/ 18 % 3`: none, tab1, tab2);
/// - `b1`: seq (low 4 bits, 15 meaning the largest allowed), meta (bits 4-5: 2 a map naming the
///   event, 3 an empty map), seq present (bit 6, in mode 3);
/// - `b2`: the stream id's ms part (the seq part is the index, so ids are unique in any order);
/// - `b3`: bit 7 set: an exact copy (id included) of event `(b3 & 0x7f) % index`, re-appended.
pub fn batch_from_bytes(data: &[u8]) -> Vec<(StreamId, Event)> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let mut batch: Vec<(StreamId, Event)> = Vec::new();
    for (i, b) in rest.chunks_exact(4).take(MAX_BATCH).enumerate() {
        let sid = StreamId::new(1_700_000_000_000 + u64::from(b[2]), i as u64);
        if b[3] & 0x80 != 0 && i > 0 {
            let copy = batch[usize::from(b[3] & 0x7f) % i].1.clone();
            batch.push((sid, copy));
            continue;
        }
        let key = b[0] / 3 % 18;
        let has_seq = match mode & 3 {
            0 => false,
            1 => true,
            2 => key % 3 != 1,
            _ => b[1] & 0x40 != 0,
        };
        let seq = match b[1] & 0x0f {
            15 => presence_worker::event::MAX_SEQ,
            q => u64::from(q),
        };
        let meta = match (b[1] >> 4) & 3 {
            2 => Some(Meta::from([("name".to_owned(), format!("n{i}"))])),
            3 => Some(Meta::new()),
            _ => None,
        };
        let ev = Event {
            v: 1,
            id: format!("ev{i}"),
            kind: EventType::ALL[usize::from(b[0] % 3)],
            doc: ["d0", "d1"][usize::from(key % 2)].to_owned(),
            user: ["u0", "u1", "u2"][usize::from(key / 2 % 3)].to_owned(),
            session: [None, Some("tab1"), Some("tab2")][usize::from(key / 6)].map(str::to_owned),
            seq: has_seq.then_some(seq),
            ts: None,
            meta,
        };
        batch.push((sid, ev));
    }
    batch
}

/// Coalescer invariants for the batch [`batch_from_bytes`] reads: every event is counted once, in
/// the right document and session; the winners are events of their session, and in a session
/// that uses `seq` for all its events or none, they are the newest by the spec's order.
pub fn check_coalesce(data: &[u8]) {
    let batch = batch_from_bytes(data);
    let docs = coalesce(&batch);
    let mut seen = vec![false; batch.len()];
    let mut doc_names = HashSet::new();
    for d in &docs {
        assert!(doc_names.insert(&d.doc), "document {:?} twice", d.doc);
        assert!(
            !d.sessions.is_empty(),
            "document {:?} has no session",
            d.doc
        );
        let mut fields = HashSet::new();
        for s in &d.sessions {
            assert!(fields.insert(&s.field), "session {:?} twice", s.field);
            assert!(!s.events.is_empty(), "session {:?} has no event", s.field);
            assert!(s.events.is_sorted(), "events out of batch order");
            for &i in &s.events {
                assert!(!std::mem::replace(&mut seen[i], true), "event {i} twice");
            }
            check_session(&batch, d, s);
        }
    }
    assert!(seen.iter().all(|&s| s), "an event is in no session");
    // Documents, and sessions within a document, come in first-seen order.
    let docs_first: Vec<usize> = docs
        .iter()
        .map(|d| d.sessions.iter().map(|s| s.events[0]).min().unwrap_or(0))
        .collect();
    assert!(docs_first.is_sorted(), "documents not in first-seen order");
    for d in &docs {
        let firsts: Vec<usize> = d.sessions.iter().map(|s| s.events[0]).collect();
        assert!(
            firsts.is_sorted(),
            "sessions of {:?} not in first-seen order",
            d.doc
        );
    }
}

fn check_session(batch: &[(StreamId, Event)], d: &DocUpdate, s: &SessionUpdate) {
    let version = |i: usize| Version {
        seq: batch[i].1.seq,
        sid: batch[i].0,
    };
    for &i in &s.events {
        let ev = &batch[i].1;
        assert_eq!(ev.doc, d.doc, "event {i} grouped under another document");
        assert_eq!(ev.user, s.user, "event {i} grouped under another user");
        let field = session_field(&ev.user, ev.session_id());
        assert_eq!(field, s.field, "event {i} grouped under another session");
    }
    let with_seq = s
        .events
        .iter()
        .filter(|&&i| batch[i].1.seq.is_some())
        .count();
    let uniform = with_seq == 0 || with_seq == s.events.len();

    // Liveness: the winner is an event of the session; without mixed seq, the newest.
    let w = *s
        .events
        .iter()
        .find(|&&i| version(i) == s.version)
        .unwrap_or_else(|| {
            panic!(
                "winner {:?} of {:?} is none of its events",
                s.version, s.field
            )
        });
    assert_eq!(
        s.live,
        batch[w].1.kind.is_live(),
        "live differs from the winner's type"
    );
    assert_eq!(
        s.event_id, batch[w].1.id,
        "event id differs from the winner's"
    );
    if uniform {
        assert_eq!(
            w,
            spec_newest(batch, &s.events),
            "wrong liveness winner of {:?}",
            s.field
        );
        for &i in &s.events {
            assert!(
                !version(i).newer_than(&s.version),
                "event {i} is newer than the winner"
            );
        }
    }

    // Meta: the winner is the newest meta write (a live event with meta, or any leave).
    let writes: Vec<usize> = s
        .events
        .iter()
        .copied()
        .filter(|&i| batch[i].1.meta.is_some() || !batch[i].1.kind.is_live())
        .collect();
    let Some((mv, bytes)) = &s.meta else {
        assert!(writes.is_empty(), "meta writes of {:?} lost", s.field);
        return;
    };
    let m = *writes
        .iter()
        .find(|&&i| version(i) == *mv)
        .unwrap_or_else(|| panic!("meta winner {mv:?} of {:?} is no meta write", s.field));
    let expected = batch[m].1.kind.is_live().then(|| {
        encode_meta(
            batch[m]
                .1
                .meta
                .as_ref()
                .expect("a live meta write carries meta"),
        )
    });
    assert_eq!(bytes, &expected, "meta differs from the meta winner's");
    if uniform {
        assert_eq!(
            m,
            spec_newest(batch, &writes),
            "wrong meta winner of {:?}",
            s.field
        );
    }
}

/// The newest of `events` by the README's rule, written independently of [`Version`]: the highest
/// `seq`, the earlier entry breaking ties; without `seq`, the latest entry.
fn spec_newest(batch: &[(StreamId, Event)], events: &[usize]) -> usize {
    let key = |i: &&usize| {
        let (sid, ev) = &batch[**i];
        (ev.seq, std::cmp::Reverse(ev.seq.map(|_| *sid)), *sid)
    };
    *events.iter().max_by_key(key).expect("a session has events")
}
