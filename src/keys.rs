//! Key names, built in one place.
//!
//! Every key of a document carries the document id between literal braces, a Redis Cluster hash
//! tag, so one script can touch all of them. The mapping from (prefix, document, suffix) to key is
//! injective: suffixes contain no `}` and end every key, so no document id can name another
//! document's key or one of the worker's global keys (those never start with `<prefix>:doc:`).

/// Separator between user and session in a session field of the earlier versions' sessions hash:
/// a control character, which ids never contain, so the pair is unambiguous.
pub const SESSION_SEP: char = '\u{1f}';

/// The key names of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocKeys {
    /// SET of the users present (public).
    pub users: String,
    /// Number of users present, absent when zero (public).
    pub count: String,
    /// HASH user -> the records of the user's sessions, live and recently ended (internal).
    pub records: String,
    /// HASH of session records by `<user>\x1f<session>` (earlier versions; moved into `records`).
    pub sessions: String,
    /// HASH user -> number of live sessions (earlier versions).
    pub live: String,
    /// ZSET of ended sessions by the server time they ended (earlier versions).
    pub ended: String,
    /// ZSET of live sessions by the server time they were last refreshed (earlier versions).
    pub alive: String,
    /// HASH of the latest snapshot request and the threshold arming (public).
    pub snapshot: String,
    /// LIST of snapshot requests not yet flushed to the snapshot stream (internal).
    pub outbox: String,
    /// The sharded Pub/Sub channel of membership changes (public).
    pub presence_channel: String,
}

impl DocKeys {
    /// The one key of this document the document scripts take (after the four global keys): its
    /// records hash. The scripts name the others from it, as `<prefix>:doc:{<doc>}:` and their
    /// suffix (see `lua/common.lua`).
    pub fn script_key(&self) -> &str {
        &self.records
    }
}

/// Keys shared by all documents (outside any document's hash slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalKeys {
    /// ZSET document -> server ms its oldest live session is due to expire.
    pub expiry: String,
    /// HASH of totals over all documents: `live_sessions`, `present_users`.
    pub stats: String,
    /// ZSET document -> number of users present (for `top`).
    pub top: String,
    /// SET of documents whose snapshot outbox is not empty.
    pub outboxes: String,
}

impl GlobalKeys {
    /// The four global keys in the order the document scripts take them first.
    pub fn script_keys(&self) -> [&str; 4] {
        [&self.expiry, &self.stats, &self.top, &self.outboxes]
    }
}

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key` by Redis Cluster's rule: CRC16 (XMODEM) of the hash tag (the text
/// between the first `{` and the next `}`, when not empty), else of the whole key, mod 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// CRC16-CCITT (XMODEM), as Redis Cluster uses it.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |mut crc, &b| {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
        crc
    })
}

/// For every hash slot, a short hash tag that lands in it (the smallest decimal number does).
fn slot_tags() -> &'static [String] {
    static TAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n = 0u64;
        while missing > 0 {
            let tag = n.to_string();
            let slot = usize::from(crc16(tag.as_bytes()) % SLOTS);
            if tags[slot].is_empty() {
                tags[slot] = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

/// Builds key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    cluster: bool,
}

impl Keys {
    /// Keys under `prefix` (default `sessions`), for a standalone Redis.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            cluster: false,
        }
    }

    /// The same keys laid out for a Redis Cluster (`true`) or a standalone Redis (`false`): on a
    /// cluster the "global" keys (expiry index, totals, top, outboxes) exist once per hash slot,
    /// beside the documents of that slot, so every document step stays within one slot.
    #[must_use]
    pub fn with_cluster(mut self, cluster: bool) -> Self {
        self.cluster = cluster;
        self
    }

    /// Whether the layout is the cluster one.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The hash slot of every key of document `doc`.
    pub fn doc_slot(&self, doc: &str) -> u16 {
        // The users key alone (the same slot as every key of the document), not all of them.
        let mut users = self.doc_base(doc);
        users.push_str("users");
        key_slot(users.as_bytes())
    }

    /// The global keys of hash slot `slot` (cluster layout):
    /// `<prefix>:slot:{<tag>}:expiry|stats|top|outboxes`, where `<tag>` hashes to `slot`.
    pub fn slot_globals(&self, slot: u16) -> GlobalKeys {
        let base = format!(
            "{}:slot:{{{}}}:",
            self.prefix,
            slot_tags()[usize::from(slot)]
        );
        GlobalKeys {
            expiry: format!("{base}expiry"),
            stats: format!("{base}stats"),
            top: format!("{base}top"),
            outboxes: format!("{base}outboxes"),
        }
    }

    /// The global keys document `doc`'s scripts write: the shared ones on a standalone Redis,
    /// those of the document's slot on a cluster.
    pub fn globals_of(&self, doc: &str) -> GlobalKeys {
        if self.cluster {
            self.slot_globals(self.doc_slot(doc))
        } else {
            self.globals()
        }
    }

    /// Every set of global keys with its hash slot: one on a standalone Redis (slot 0), one per
    /// hash slot on a cluster.
    pub fn all_globals(&self) -> Vec<(u16, GlobalKeys)> {
        if self.cluster {
            (0..SLOTS)
                .map(|slot| (slot, self.slot_globals(slot)))
                .collect()
        } else {
            vec![(0, self.globals())]
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Writes [`DocKeys::script_key`] of document `doc` as the next argument of `out` (a command
    /// being built), formatted straight into it: the apply path sends it for every document of
    /// every batch.
    pub fn write_doc_script_key(&self, doc: &str, out: &mut (impl redis::RedisWrite + ?Sized)) {
        use std::io::Write as _;
        let mut w = out.writer_for_next_arg();
        // SAFETY of the unwraps: the writer appends to an in-memory buffer, which cannot fail.
        w.write_all(self.doc_base(doc).as_bytes()).unwrap();
        w.write_all(b"records").unwrap();
    }

    /// What every key of document `doc` starts with: `<prefix>:doc:{<doc>}:` (the one place the
    /// layout is written).
    /// The key of document `doc` with `suffix` (`records`, `users`, ...): one key of
    /// [`Keys::doc`] without building the others.
    pub fn doc_key(&self, doc: &str, suffix: &str) -> String {
        let mut key = self.doc_base(doc);
        key.push_str(suffix);
        key
    }

    fn doc_base(&self, doc: &str) -> String {
        let mut base = String::with_capacity(self.prefix.len() + doc.len() + 16);
        base.push_str(&self.prefix);
        base.push_str(":doc:{");
        base.push_str(doc);
        base.push_str("}:");
        base
    }

    /// All keys of document `doc`.
    pub fn doc(&self, doc: &str) -> DocKeys {
        let base = self.doc_base(doc);
        DocKeys {
            users: format!("{base}users"),
            count: format!("{base}count"),
            records: format!("{base}records"),
            sessions: format!("{base}sessions"),
            live: format!("{base}live"),
            ended: format!("{base}ended"),
            alive: format!("{base}alive"),
            snapshot: format!("{base}snapshot"),
            outbox: format!("{base}outbox"),
            presence_channel: format!("{base}presence"),
        }
    }

    /// The prefix of every document's change feed channel: the channel is this, the document
    /// id and `}:presence`.
    pub fn channel_prefix(&self) -> String {
        format!("{}:doc:{{", self.prefix)
    }

    /// The keys shared by all documents on a standalone Redis (see [`Keys::globals_of`]).
    pub fn globals(&self) -> GlobalKeys {
        GlobalKeys {
            expiry: format!("{}:expiry", self.prefix),
            stats: format!("{}:stats", self.prefix),
            top: format!("{}:top", self.prefix),
            outboxes: format!("{}:outboxes", self.prefix),
        }
    }

    /// The patterns that match every document's records hash, and its sessions hash of an
    /// earlier version (for SCAN).
    pub fn records_patterns(&self) -> [String; 2] {
        [
            format!("{}:doc:{{*}}:records", self.prefix),
            format!("{}:doc:{{*}}:sessions", self.prefix),
        ]
    }

    /// The document id in one of its key names, if `key` is one.
    pub fn doc_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        let rest = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":doc:{")?;
        let end = rest.rfind("}:")?;
        Some(&rest[..end])
    }

    /// The pattern that matches every document's users set (for SCAN).
    pub fn users_pattern(&self) -> String {
        format!("{}:doc:{{*}}:users", self.prefix)
    }
}

/// The field of a session in the earlier versions' `sessions` hash.
pub fn session_field(user: &str, session: &str) -> String {
    let mut f = String::with_capacity(user.len() + 1 + session.len());
    f.push_str(user);
    f.push(SESSION_SEP);
    f.push_str(session);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_readme() {
        let k = Keys::new("sessions").doc("42");
        assert_eq!(k.users, "sessions:doc:{42}:users");
        assert_eq!(k.count, "sessions:doc:{42}:count");
        assert_eq!(k.records, "sessions:doc:{42}:records");
        assert_eq!(k.sessions, "sessions:doc:{42}:sessions");
        assert_eq!(k.live, "sessions:doc:{42}:live");
        assert_eq!(k.ended, "sessions:doc:{42}:ended");
        assert_eq!(k.alive, "sessions:doc:{42}:alive");
        assert_eq!(k.snapshot, "sessions:doc:{42}:snapshot");
        assert_eq!(k.presence_channel, "sessions:doc:{42}:presence");
    }

    #[test]
    fn key_slots_follow_redis_cluster() {
        // Values from CLUSTER KEYSLOT on Redis 7.0 (and the cluster specification's example).
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag hashes the whole key.
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn every_slot_has_its_global_keys() {
        let keys = Keys::new("sessions").with_cluster(true);
        for slot in [0, 1, 777, SLOTS - 1] {
            let g = keys.slot_globals(slot);
            for k in g.script_keys() {
                assert_eq!(key_slot(k.as_bytes()), slot, "{k}");
            }
        }
        for doc in ["a", "a}:b", "{x}", "doc-42"] {
            let g = keys.globals_of(doc);
            let d = keys.doc(doc);
            for k in g.script_keys().into_iter().chain([d.script_key()]) {
                assert_eq!(key_slot(k.as_bytes()), keys.doc_slot(doc), "{k}");
            }
        }
        assert_eq!(keys.all_globals().len(), usize::from(SLOTS));
        assert_eq!(
            Keys::new("sessions").globals_of("a"),
            Keys::new("sessions").globals()
        );
    }

    #[test]
    fn scripts_name_every_doc_key_from_the_one_they_take() {
        let keys = Keys::new("sessions");
        for d in ["42", "a}:b", "{x}", "é"] {
            let mut written: Vec<Vec<u8>> = Vec::new();
            keys.write_doc_script_key(d, &mut written);
            let k = keys.doc(d);
            assert_eq!(written, vec![k.script_key().as_bytes().to_vec()]);
            // What common.lua's dkey() does: the script key without "records", then the suffix.
            let base = k.script_key().strip_suffix("records").unwrap();
            for (suffix, name) in [
                ("sessions", &k.sessions),
                ("users", &k.users),
                ("count", &k.count),
                ("live", &k.live),
                ("ended", &k.ended),
                ("alive", &k.alive),
                ("snapshot", &k.snapshot),
                ("outbox", &k.outbox),
            ] {
                assert_eq!(&format!("{base}{suffix}"), name);
            }
        }
    }

    #[test]
    fn doc_of_inverts_the_layout() {
        let keys = Keys::new("sessions");
        for d in ["42", "a}:b", "{x}", "sessions:doc:{y}:users", "}"] {
            assert_eq!(keys.doc_of(&keys.doc(d).records), Some(d));
            assert_eq!(keys.doc_of(&keys.doc(d).sessions), Some(d));
            assert_eq!(keys.doc_of(&keys.doc(d).users), Some(d));
        }
        assert_eq!(keys.doc_of("sessions:events"), None);
        assert_eq!(keys.doc_of("other:doc:{1}:users"), None);
    }

    #[test]
    fn crafted_ids_cannot_alias_other_documents() {
        let keys = Keys::new("sessions");
        let docs = [
            "a",
            "a}:count",
            "a}",
            "{a",
            "}:users",
            "sessions:doc:{a}:users",
            "a b",
            "*",
        ];
        let mut all = std::collections::HashSet::new();
        for d in docs {
            let k = keys.doc(d);
            for name in [
                k.users, k.count, k.records, k.sessions, k.live, k.ended, k.alive, k.snapshot,
                k.outbox,
            ] {
                assert!(all.insert(name.clone()), "{name} produced twice");
            }
        }
        for g in [
            keys.globals().expiry,
            keys.globals().stats,
            keys.globals().top,
        ] {
            assert!(all.insert(g.clone()), "{g} is also a document key");
        }
    }
}
