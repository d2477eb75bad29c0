//! Sharded events streams (`--stream-shards N`): which stream a document's events go to.
//!
//! With N shards the events of document `doc` go to `<stream>:{k}`, k = FNV-1a-32(UTF-8 bytes of
//! `doc`) mod N, so one stream is not one hot hash slot on a Redis Cluster, and every event of a
//! document stays in one stream, in order. Producers in any language must compute the same k;
//! the README gives the function and test vectors (checked in [`tests`]).

/// The FNV-1a 32-bit hash of `bytes` (offset basis 2166136261, prime 16777619).
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The shard of document `doc` among `shards` (at least 1).
pub fn shard_of(doc: &str, shards: u32) -> u32 {
    fnv1a32(doc.as_bytes()) % shards.max(1)
}

/// The name of shard `k` of `stream`: `<stream>:{k}` (the braces make `k` the hash tag).
pub fn shard_stream(stream: &str, k: u32) -> String {
    format!("{stream}:{{{k}}}")
}

/// The streams a worker consumes: `stream` itself when `shards` is 0, else its `shards` shards.
pub fn streams(stream: &str, shards: u32) -> Vec<String> {
    if shards == 0 {
        vec![stream.to_owned()]
    } else {
        (0..shards).map(|k| shard_stream(stream, k)).collect()
    }
}

/// The stream an event of `doc` is appended to (see [`streams`]).
pub fn stream_for(stream: &str, shards: u32, doc: &str) -> String {
    if shards == 0 {
        stream.to_owned()
    } else {
        shard_stream(stream, shard_of(doc, shards))
    }
}

/// The `XADD <stream> * e <payload>` of each event, one pipeline per stream (so within one hash
/// slot on a cluster), with the events' places in `events`: what producers send.
pub fn xadd_by_stream<'e>(
    stream: &str,
    shards: u32,
    events: impl IntoIterator<Item = &'e crate::Event>,
) -> crate::Result<Vec<(String, Vec<usize>, redis::Pipeline)>> {
    let mut by_stream: Vec<(String, Vec<usize>, redis::Pipeline)> = Vec::new();
    for (i, ev) in events.into_iter().enumerate() {
        let target = stream_for(stream, shards, &ev.doc);
        let at = match by_stream.iter().position(|(s, _, _)| *s == target) {
            Some(at) => at,
            None => {
                by_stream.push((target.clone(), Vec::new(), redis::pipe()));
                by_stream.len() - 1
            }
        };
        let (_, places, pipe) = &mut by_stream[at];
        places.push(i);
        pipe.cmd("XADD")
            .arg(target)
            .arg("*")
            .arg("e")
            .arg(ev.encode()?);
    }
    Ok(by_stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's test vectors: (document id, FNV-1a-32, shard of 4, shard of 16).
    const VECTORS: [(&str, u32, u32, u32); 6] = [
        ("", 0x811c_9dc5, 1, 5),
        ("a", 0xe40c_292c, 0, 12),
        ("doc-42", 0xe510_8b92, 2, 2),
        ("foobar", 0xbf9c_f968, 0, 8),
        ("é", 0x1e9d_e8c1, 1, 1),
        ("team/roadmap-2027", 0x0183_c33f, 3, 15),
    ];

    #[test]
    fn the_readme_test_vectors_hold() {
        for (doc, hash, of4, of16) in VECTORS {
            assert_eq!(fnv1a32(doc.as_bytes()), hash, "{doc:?}");
            assert_eq!(shard_of(doc, 4), of4, "{doc:?}");
            assert_eq!(shard_of(doc, 16), of16, "{doc:?}");
        }
    }

    #[test]
    fn streams_are_named_with_the_shard_as_hash_tag() {
        assert_eq!(streams("sessions:events", 0), ["sessions:events"]);
        assert_eq!(
            streams("sessions:events", 3),
            [
                "sessions:events:{0}",
                "sessions:events:{1}",
                "sessions:events:{2}"
            ]
        );
        assert_eq!(stream_for("s", 0, "x"), "s");
        assert_eq!(stream_for("s", 4, "doc-42"), "s:{2}");
    }
}
