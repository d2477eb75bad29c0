//! A seeded workload: a realistic mix of events (MessagePack and flat forms, duplicates,
//! out-of-order `seq`, malformed entries), how to append it, and its sequential model.

use presence_worker::{Event, EventType};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::model::Model;

/// The events stream the workload is appended to.
pub const STREAM: &str = "sessions:events";

/// What one stream entry holds.
pub enum Entry {
    /// A valid event, as MessagePack or in the flat form.
    Good {
        /// The event.
        event: Event,
        /// Whether it is written as plain fields.
        flat: bool,
    },
    /// A malformed entry.
    Bad(Vec<(String, Vec<u8>)>),
}

/// `n` entries (plus duplicates) from `seed`.
pub fn generate(seed: u64, n: usize) -> Vec<Entry> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut seqs = std::collections::HashMap::new();
    let mut out: Vec<Entry> = Vec::with_capacity(n + n / 10);
    while out.len() < n {
        if rng.random_bool(0.01) {
            let bad: Vec<(String, Vec<u8>)> = match rng.random_range(0..4) {
                0 => vec![("e".into(), vec![0x85, 0xa1])],
                1 => vec![
                    ("type".into(), b"join".to_vec()),
                    ("doc".into(), b"d1".to_vec()),
                ],
                2 => vec![
                    ("type".into(), b"wave".to_vec()),
                    ("doc".into(), b"d1".to_vec()),
                    ("user".into(), b"u1".to_vec()),
                ],
                _ => vec![(
                    "e".into(),
                    Event::new(EventType::Join, "d\n1", "u").encode().unwrap(),
                )],
            };
            out.push(Entry::Bad(bad));
            continue;
        }
        // Zipf-like document popularity: low ids are hot.
        let doc = format!(
            "doc-{}",
            (rng.random_range(0.0f64..1.0).powi(3) * 20.0) as u32
        );
        let u = rng.random_range(0..12u32);
        let user = format!("user-{u}");
        let session = format!("tab-{}", rng.random_range(0..2u32));
        let kind = match rng.random_range(0..10) {
            0..=3 => EventType::Join,
            4..=6 => EventType::Heartbeat,
            _ => EventType::Leave,
        };
        let mut event = Event::new(kind, doc.clone(), user);
        event.session = rng.random_bool(0.8).then_some(session);
        if u % 2 == 0 {
            // These users' producers number their sessions' events.
            let c = seqs
                .entry((doc, event.user.clone(), event.session_id().to_owned()))
                .or_insert(0u64);
            *c += 1;
            event.seq = Some(*c);
        }
        if kind == EventType::Join && rng.random_bool(0.3) {
            event.meta = Some([("name".to_owned(), event.user.to_uppercase())].into());
        }
        let flat = rng.random_bool(0.2) && event.meta.is_none();
        let dup = rng.random_bool(0.05);
        out.push(Entry::Good {
            event: event.clone(),
            flat,
        });
        if dup {
            // A producer retry appends the same event again right after.
            out.push(Entry::Good { event, flat });
        }
    }
    // Delay some events by up to 300 places: `seq` events then reach the stream out of order,
    // often after a later event of their own session.
    for i in (0..out.len()).rev() {
        if rng.random_bool(0.2) {
            let to = (i + rng.random_range(1..300)).min(out.len() - 1);
            let e = out.remove(i);
            out.insert(to, e);
        }
    }
    out
}

fn fields(entry: &Entry) -> Vec<(String, Vec<u8>)> {
    match entry {
        Entry::Bad(f) => f.clone(),
        Entry::Good { event, flat: false } => vec![("e".into(), event.encode().unwrap())],
        Entry::Good { event, flat: true } => {
            let mut f = vec![
                ("type".to_owned(), event.kind.as_str().as_bytes().to_vec()),
                ("doc".into(), event.doc.clone().into_bytes()),
                ("user".into(), event.user.clone().into_bytes()),
                ("id".into(), event.id.clone().into_bytes()),
            ];
            if let Some(s) = &event.session {
                f.push(("session".into(), s.clone().into_bytes()));
            }
            if let Some(q) = event.seq {
                f.push(("seq".into(), q.to_string().into_bytes()));
            }
            f
        }
    }
}

/// Appends `entries` in order.
pub async fn append(con: &mut presence_worker::connection::Conn, entries: &[Entry]) {
    append_sharded(con, entries, STREAM, 0).await;
}

/// Appends `entries` to the `shards` shards of `stream` as a producer would (0: to `stream`
/// itself): each valid event to its document's shard, malformed entries to the first. Order is
/// kept within each stream, so within each document.
pub async fn append_sharded(
    con: &mut presence_worker::connection::Conn,
    entries: &[Entry],
    stream: &str,
    shards: u32,
) {
    for chunk in entries.chunks(500) {
        // One pipeline per stream: on a cluster a pipeline stays within one hash slot.
        let mut pipes: std::collections::BTreeMap<String, redis::Pipeline> = Default::default();
        for e in chunk {
            let target = match e {
                Entry::Good { event, .. } => {
                    presence_worker::shard::stream_for(stream, shards, &event.doc)
                }
                Entry::Bad(_) => presence_worker::shard::streams(stream, shards)[0].clone(),
            };
            let pipe = pipes.entry(target.clone()).or_insert_with(redis::pipe);
            let cmd = pipe.cmd("XADD").arg(target).arg("*");
            for (k, v) in fields(e) {
                cmd.arg(k).arg(v);
            }
        }
        for pipe in pipes.values() {
            let _: Vec<String> = pipe.query_async(con).await.expect("XADD");
        }
    }
}

/// The sequential model of `entries` and the number of malformed ones.
pub fn model_of(entries: &[Entry]) -> (Model, usize) {
    let mut model = Model::default();
    let mut bad = 0;
    for e in entries {
        match e {
            Entry::Good { event, .. } => model.apply(event),
            Entry::Bad(_) => bad += 1,
        }
    }
    (model, bad)
}
