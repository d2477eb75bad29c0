//! Apply stage: the coalesced updates of many documents, each document one atomic step: on the
//! planned path (see [`Applier::with_planned_path`]) decided by the worker and written in
//! `MULTI`/`EXEC`, otherwise by the script, many documents per call, calls pipelined; and the
//! expiry of silent sessions, which changes documents the same way.

use crate::connection::Conn;
use redis::{Cmd, Script};
use std::time::Duration;

mod planned;

use crate::coalesce::{DocUpdate, SessionUpdate, Version};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::snapshot::SnapshotConfig;

/// The script that applies documents' updates (see the headers of the two files).
const APPLY_LUA: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/apply.lua")
);

/// The script that expires documents' silent sessions.
const EXPIRE_LUA: &str = concat!(
    include_str!("lua/common.lua"),
    include_str!("lua/expire.lua")
);

/// The script that leases due documents to one replica.
const CLAIM_DUE_LUA: &str = include_str!("lua/claim_due.lua");

/// Most documents in one script call: enough to spread the call's fixed cost, few enough that
/// one call stays well under a millisecond of Redis time.
const DOCS_PER_CALL: usize = 64;

/// The default of `--max-user-sessions` ([`Applier::with_max_user_sessions`]).
pub const DEFAULT_USER_SESSIONS: usize = 64;

/// Most sessions in one script call.
const SESSIONS_PER_CALL: usize = 512;

/// How many script calls go in one pipeline round trip.
pub(crate) const CALLS_PER_PIPELINE: usize = 16;

/// Most sessions one expiry call ends per document (the rest are due again at once): a visit
/// reads every record of the document anyway, so it ends many at once.
const EXPIRE_PER_DOC: usize = 2000;

/// What the script decided for one session's deciding event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The event changed the session's state.
    Applied,
    /// A newer event of the session was already applied.
    Stale,
    /// The same event (same id) was already the session's deciding event.
    Duplicate,
    /// A new session of a user who already has `--max-user-sessions` live sessions in the
    /// document, none silent for the TTL: nothing changed, and its events are dead-lettered.
    Refused,
}

/// What applying one document did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// One outcome per session, in the order of the update's sessions.
    pub outcomes: Vec<Outcome>,
    /// The reason of the snapshot request queued (`threshold`, `empty`), or empty.
    pub snapshot: String,
    /// Live sessions the step ended by expiry, to make room for a new session of a user at
    /// `--max-user-sessions` (see [`Applier::with_max_user_sessions`]): silent for the TTL, they
    /// end as an expiry visit would end them.
    pub expired: u64,
}

/// Applies coalesced updates to Redis.
#[derive(Debug, Clone)]
pub struct Applier {
    script: Script,
    expire: Script,
    claim_due: Script,
    keys: Keys,
    snapshots: SnapshotConfig,
    options: Vec<u8>,
    history_ms: u64,
    ttl_ms: u64,
    docs_per_call: usize,
    calls_per_pipeline: usize,
    max_user_sessions: usize,
    /// The planned path (see [`Applier::with_planned_path`]), when on.
    watched: Option<std::sync::Arc<planned::Watched>>,
}

impl Applier {
    /// An applier writing under `keys`, keeping ended sessions' history for `history_ms` and
    /// expiring sessions silent for `ttl_ms` (0: never).
    pub fn new(keys: Keys, history_ms: u64, ttl_ms: u64) -> Self {
        Self::with_snapshots(keys, history_ms, ttl_ms, SnapshotConfig::default())
    }

    /// [`Applier::new`] with snapshot requests and the change feed configured.
    pub fn with_snapshots(
        keys: Keys,
        history_ms: u64,
        ttl_ms: u64,
        snapshots: SnapshotConfig,
    ) -> Self {
        Self {
            script: Script::new(APPLY_LUA),
            expire: Script::new(EXPIRE_LUA),
            claim_due: Script::new(CLAIM_DUE_LUA),
            options: snapshots.script_options(&keys.channel_prefix(), DEFAULT_USER_SESSIONS),
            snapshots,
            keys,
            history_ms,
            ttl_ms,
            docs_per_call: DOCS_PER_CALL,
            calls_per_pipeline: CALLS_PER_PIPELINE,
            max_user_sessions: DEFAULT_USER_SESSIONS,
            watched: None,
        }
    }

    /// Applies documents on the planned path where it can, on a standalone Redis reached by
    /// `client` (a connection of its own, replies within `response_timeout`): the worker reads
    /// the documents' records under `WATCH`, decides their steps by the scripts' rules and
    /// writes them in one `MULTI`/`EXEC`, so that Redis runs no Lua for them. Whatever the
    /// planner does not handle, and every batch in which a watched key changed before `EXEC`,
    /// the script applies as before. Off while snapshot requests or the change feed are
    /// configured (the script decides those), and for the benchmark's baselines
    /// ([`Applier::with_docs_per_call`]). Its connections are lean ones ([`crate::resp`]) where
    /// the client allows.
    pub fn with_planned_path(self, client: redis::Client, response_timeout: Duration) -> Self {
        self.with_planned_path_on(client, response_timeout, true)
    }

    /// [`Applier::with_planned_path`], on lean connections only when `lean`.
    pub fn with_planned_path_on(
        mut self,
        client: redis::Client,
        response_timeout: Duration,
        lean: bool,
    ) -> Self {
        let s = &self.snapshots;
        if s.thresholds.is_empty() && !s.on_empty && !s.publish_changes {
            self.watched = Some(std::sync::Arc::new(planned::Watched::new(
                client,
                response_timeout,
                lean,
            )));
        }
        self
    }

    /// On the planned path ([`Applier::with_planned_path`]): the documents it applied, and the
    /// chunks of documents whose `EXEC` found a watched key changed (written by another
    /// replica, an expiry visit), which the script then applied. `None` when the path is off.
    pub fn planned_stats(&self) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let w = self.watched.as_deref()?;
        Some((w.planned.load(Relaxed), w.conflicts.load(Relaxed)))
    }

    /// At most `n` documents (at least 1) per script call instead of [`DOCS_PER_CALL`], and all
    /// of one [`Applier::apply`]'s calls in a single pipeline: the benchmark's baselines (one
    /// call per event, or per 64 events, a whole batch's calls sent at once).
    pub fn with_docs_per_call(mut self, n: usize) -> Self {
        self.docs_per_call = n.max(1);
        self.calls_per_pipeline = usize::MAX;
        self.watched = None;
        self
    }

    /// Most sessions one user keeps in one document (`--max-user-sessions`): live ones, and
    /// ended ones kept for ordering. When a new session would exceed it, the user's earliest
    /// ended sessions are dropped, or else one silent for the session TTL is ended (expired) and
    /// dropped; when all are live and refreshed within the TTL, the new session is
    /// [`Outcome::Refused`].
    pub fn with_max_user_sessions(mut self, max: usize) -> Self {
        self.max_user_sessions = max;
        self.options = self
            .snapshots
            .script_options(&self.keys.channel_prefix(), max);
        self
    }

    /// Loads the scripts the worker calls (on a cluster, on every primary), so that its first
    /// calls do not each fail with `NOSCRIPT` and load them again: on a cluster, where up to
    /// [`crate::connection::CLUSTER_CONCURRENCY`] calls are in flight, that made hundreds of
    /// loads at start. Scripts lost later (a restart, a failover) are still loaded on `NOSCRIPT`.
    pub async fn load(&self, con: &mut Conn) -> Result<()> {
        for script in [&self.script, &self.expire, &self.claim_due] {
            script.load_async(con).await?;
        }
        Ok(())
    }

    /// Leases up to `max` documents with sessions due to expire to the caller for `lease_ms`
    /// (on a cluster, up to `max` per hash slot: every slot's index is asked, one pipeline per
    /// primary, and the script runs only where something is due).
    pub async fn claim_due(
        &self,
        con: &mut Conn,
        lease_ms: u64,
        max: usize,
    ) -> Result<Vec<String>> {
        let mut globals = self.keys.all_globals();
        if con.is_cluster() {
            globals = due_slots(con, globals).await?;
        }
        let cmds: Vec<(u16, redis::Cmd)> = globals
            .into_iter()
            .map(|(slot, g)| {
                let mut cmd = evalsha(&self.claim_due, 1);
                cmd.arg(g.expiry).arg(lease_ms).arg(max);
                (slot, cmd)
            })
            .collect();
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let replies: Vec<Vec<String>> = match con.query_all(&cmds).await {
            Err(Error::Redis(e)) if e.code() == Some("NOSCRIPT") => {
                self.claim_due.load_async(con).await?;
                con.query_all(&cmds).await?
            }
            r => r?,
        };
        Ok(replies.into_iter().flatten().collect())
    }

    /// Expires the silent sessions of `docs`; returns how many sessions ended, and the documents
    /// that queued a snapshot request with its reason.
    pub async fn expire(
        &self,
        con: &mut Conn,
        docs: &[String],
    ) -> Result<(u64, Vec<(String, String)>)> {
        let calls = self.plan(docs.iter().map(|d| (d.as_str(), 1)));
        let cmds: Vec<_> = calls
            .iter()
            .map(|call| {
                let mut cmd =
                    self.doc_script_cmd(&self.expire, call.iter().map(|&i| docs[i].as_str()));
                cmd.arg(call.len()).arg(EXPIRE_PER_DOC);
                for &i in call {
                    cmd.arg(&docs[i]);
                }
                cmd
            })
            .collect();
        let depth = CALLS_PER_PIPELINE;
        let replies: Vec<Vec<(u64, String)>> =
            invoke_pipelined(con, &self.expire, cmds, depth).await?;
        let mut total = 0;
        let mut emitted = Vec::new();
        for (call, replies) in calls.iter().zip(replies) {
            for (&i, (n, reason)) in call.iter().zip(replies) {
                total += n;
                if !reason.is_empty() {
                    emitted.push((docs[i].clone(), reason));
                }
            }
        }
        Ok((total, emitted))
    }

    /// Groups documents (given with their number of sessions) into script calls: in order, at
    /// most [`DOCS_PER_CALL`] (or [`Applier::with_docs_per_call`]) documents and
    /// [`SESSIONS_PER_CALL`] sessions per call (a bigger document gets a call of its own), and
    /// on a cluster only documents of one hash slot per call. Returns the documents' indexes per
    /// call.
    fn plan<'d>(&self, docs: impl Iterator<Item = (&'d str, usize)>) -> Vec<Vec<usize>> {
        // Open calls by slot (a single one on a standalone Redis), each with its sessions.
        let mut open: std::collections::HashMap<u16, (Vec<usize>, usize)> = Default::default();
        let mut calls = Vec::new();
        for (i, (doc, sessions)) in docs.enumerate() {
            let slot = if self.keys.is_cluster() {
                self.keys.doc_slot(doc)
            } else {
                0
            };
            let call = open.entry(slot).or_default();
            if !call.0.is_empty()
                && (call.0.len() == self.docs_per_call || call.1 + sessions > SESSIONS_PER_CALL)
            {
                calls.push(std::mem::take(&mut call.0));
                call.1 = 0;
            }
            call.0.push(i);
            call.1 += sessions;
        }
        let mut rest: Vec<Vec<usize>> = open
            .into_values()
            .map(|(c, _)| c)
            .filter(|c| !c.is_empty())
            .collect();
        rest.sort_unstable_by_key(|c| c[0]);
        calls.extend(rest);
        calls
    }

    /// Applies every document's updates; returns, per document, one outcome per session and the
    /// reason of the snapshot request it queued (empty for none).
    ///
    /// Safe to call again with the same updates after any failure: the script is idempotent.
    pub async fn apply(&self, con: &mut Conn, docs: &[DocUpdate]) -> Result<Vec<Applied>> {
        let Some(w) = self
            .watched
            .as_deref()
            .filter(|w| !con.is_cluster() && !w.is_off())
        else {
            return self
                .apply_scripted(con, &docs.iter().collect::<Vec<_>>())
                .await;
        };
        let (mut out, _in_flight) = self.apply_planned(w, docs).await?;
        let rest: Vec<usize> = (0..docs.len()).filter(|&i| out[i].is_none()).collect();
        if !rest.is_empty() {
            let scripted = self
                .apply_scripted(con, &rest.iter().map(|&i| &docs[i]).collect::<Vec<_>>())
                .await?;
            for (i, a) in rest.into_iter().zip(scripted) {
                out[i] = Some(a);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// [`Applier::apply`] by the script alone.
    async fn apply_scripted(&self, con: &mut Conn, docs: &[&DocUpdate]) -> Result<Vec<Applied>> {
        let calls = self.plan(docs.iter().map(|d| (d.doc.as_str(), d.sessions.len())));
        let cmds: Vec<_> = calls
            .iter()
            .map(|call| self.apply_cmd(call.iter().map(|&i| docs[i])))
            .collect();
        // Per call one string: per document its outcomes (one digit per session), its snapshot
        // reason (a word, or nothing) and ','.
        let depth = self.calls_per_pipeline;
        let replies: Vec<Vec<u8>> = invoke_pipelined(con, &self.script, cmds, depth).await?;
        let mut out = vec![Applied::default(); docs.len()];
        let mut answered = 0;
        for (call, reply) in calls.iter().zip(replies) {
            let mut parts = reply.split(|&b| b == b',');
            for &i in call {
                let Some(part) = parts.next() else { break };
                let digits = part.iter().take_while(|b| b.is_ascii_digit()).count();
                let (codes, rest) = part.split_at(digits);
                let mut rest = rest.splitn(2, |&b| b == b';');
                let reason = rest.next().unwrap_or_default();
                let expired = rest
                    .next()
                    .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                    .unwrap_or(0);
                answered += 1;
                out[i] = Applied {
                    outcomes: codes
                        .iter()
                        .map(|c| match c {
                            b'0' => Outcome::Applied,
                            b'2' => Outcome::Duplicate,
                            b'3' => Outcome::Refused,
                            _ => Outcome::Stale,
                        })
                        .collect(),
                    snapshot: String::from_utf8_lossy(reason).into_owned(),
                    expired,
                };
            }
        }
        if answered != docs.len() {
            return Err(Error::Protocol(format!(
                "{answered} replies for {} documents",
                docs.len()
            )));
        }
        Ok(out)
    }

    fn apply_cmd<'d>(&self, docs: impl Iterator<Item = &'d DocUpdate> + Clone) -> Cmd {
        let mut cmd = self.doc_script_cmd(&self.script, docs.clone().map(|d| d.doc.as_str()));
        cmd.arg(docs.clone().count());
        let mut packed = Vec::new();
        for d in docs {
            packed.clear();
            pack_sessions(d, &mut packed);
            cmd.arg(&d.doc).arg(&packed[..]);
        }
        cmd
    }

    /// A call of a document script for `docs`, with its KEYS and ARGV[1..3] (see
    /// `lua/common.lua`). Built as the `EVALSHA` command itself, the keys formatted straight into
    /// it (no `ScriptInvocation`, which holds every key and argument in a `Vec` of its own and
    /// copies them all again into the command).
    fn doc_script_cmd<'d>(
        &self,
        script: &Script,
        docs: impl Iterator<Item = &'d str> + Clone,
    ) -> Cmd {
        let globals = self
            .keys
            .globals_of(docs.clone().next().unwrap_or_default());
        let global_keys = globals.script_keys();
        let mut cmd = evalsha(script, global_keys.len() + docs.clone().count());
        for key in global_keys {
            cmd.arg(key);
        }
        for doc in docs {
            self.keys.write_doc_script_key(doc, &mut cmd);
        }
        cmd.arg(self.history_ms).arg(self.ttl_ms).arg(&self.options);
        cmd
    }
}

/// The hash slots (of `globals`, one per slot) whose expiry index has a document due now. A
/// sweep of all 16,384 slots with the claim script cost a script call per slot every round
/// (about 100 ms of Redis time on the 2-core machine, during which the sweeping loop applied
/// nothing); a `ZRANGE ... LIMIT 0 1` per slot costs a fraction of that, and the script then
/// runs only where something is due. "Now" is one node's `TIME`: a node whose clock runs ahead
/// of it has its due documents claimed that much later.
async fn due_slots(
    con: &mut Conn,
    globals: Vec<(u16, crate::keys::GlobalKeys)>,
) -> Result<Vec<(u16, crate::keys::GlobalKeys)>> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(con).await?;
    let now_ms = secs * 1000 + micros / 1000;
    let probes: Vec<(u16, Cmd)> = globals
        .iter()
        .map(|(slot, g)| {
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&g.expiry)
                .arg("-inf")
                .arg(now_ms)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
            (*slot, cmd)
        })
        .collect();
    let due: Vec<Vec<String>> = con.query_all(&probes).await?;
    Ok(globals
        .into_iter()
        .zip(due)
        .filter(|(_, first)| !first.is_empty())
        .map(|(g, _)| g)
        .collect())
}

/// `EVALSHA <sha1 of script> <numkeys>`: the start of a script call; the caller adds `numkeys`
/// keys, then the arguments.
pub(crate) fn evalsha(script: &Script, numkeys: usize) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(numkeys);
    cmd
}

/// Runs `cmds` (`EVALSHA` calls of `script`, see [`evalsha`]), pipelined `depth` at a time, and
/// returns one reply per call. After a restart or failover the script cache is empty: the script
/// is loaded and the group goes again (every document script is idempotent). On a cluster, where
/// a pipeline cannot span hash slots, the calls (each within one slot) are sent concurrently
/// instead, and each loads the script and goes again when its node had lost it.
pub(crate) async fn invoke_pipelined<T: redis::FromRedisValue>(
    con: &mut Conn,
    script: &Script,
    cmds: Vec<Cmd>,
    depth: usize,
) -> Result<Vec<T>> {
    if con.is_cluster() {
        use futures_util::StreamExt as _;
        let mut out = Vec::with_capacity(cmds.len());
        for group in cmds.chunks(crate::connection::CLUSTER_CONCURRENCY) {
            let mut calls = futures_util::stream::FuturesOrdered::new();
            for cmd in group {
                let mut con = con.clone();
                calls.push_back(async move {
                    match cmd.query_async::<T>(&mut con).await {
                        Err(e) if e.code() == Some("NOSCRIPT") => {
                            script.load_async(&mut con).await?;
                            cmd.query_async::<T>(&mut con).await
                        }
                        r => r,
                    }
                });
            }
            while let Some(reply) = calls.next().await {
                out.push(reply?);
            }
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(cmds.len());
    let mut cmds = cmds.into_iter().peekable();
    while cmds.peek().is_some() {
        let mut pipe = redis::pipe();
        for cmd in cmds.by_ref().take(depth) {
            pipe.add_command(cmd);
        }
        let replies: Vec<T> = match pipe.query_async(con).await {
            Err(e) if e.code() == Some("NOSCRIPT") => {
                script.load_async(con).await?;
                pipe.query_async(con).await?
            }
            r => r?,
        };
        out.extend(replies);
    }
    Ok(out)
}

/// A 32-bit FNV-1a hash of an event id: what the session record keeps to recognise the same
/// event again (a collision only mislabels a metric: duplicate instead of applied).
pub fn id_hash(id: &str) -> u32 {
    crate::shard::fnv1a32(id.as_bytes())
}

/// A document's sessions as `apply.lua` reads them: one string, its users (each once), then its
/// sessions one after the other, each naming its user by number (the layout is documented in
/// its header; every number big-endian, a u64 as its two u32 halves).
fn pack_sessions(update: &DocUpdate, b: &mut Vec<u8>) {
    let sessions = &update.sessions;
    b.reserve(sessions.len() * 128);
    // Each session's user, numbered in first-seen order.
    let (users, user_of) = crate::plan::users_of(update);
    // Both counts first: the script reads them and the first user with one unpack.
    put_len(b, users.len());
    put_len(b, sessions.len());
    for u in &users {
        put_len(b, u.len());
        b.extend_from_slice(u.as_bytes());
    }
    for (s, &u) in sessions.iter().zip(&user_of) {
        put_session(b, s, u);
    }
}

/// One session of a document's packed sessions (see [`pack_sessions`]): its user's number (from
/// 1), its session id, then what the event decides.
fn put_session(b: &mut Vec<u8>, s: &SessionUpdate, u: usize) {
    // The field is `<user>\x1f<session>`.
    let session = &s.field.as_bytes()[s.user.len() + 1..];
    put_len(b, u + 1);
    put_len(b, session.len());
    b.extend_from_slice(session);
    let entry = s.version.sid.text();
    let mut flags = u8::from(s.live);
    if s.version.seq.is_some() {
        flags |= 2;
    }
    if let Some((v, m)) = &s.meta {
        flags |= 8;
        if v.seq.is_some() {
            flags |= 16;
        }
        if m.is_some() {
            flags |= 32;
        }
    }
    b.push(flags);
    // Not put_version's order: the sequence's high half first, so that seq (when the event has
    // one), ms, the low half and the hash lie as a record without meta holds them (the script
    // copies them into a refreshed record).
    let v = &s.version;
    b.extend_from_slice(&((v.sid.seq >> 32) as u32).to_be_bytes());
    b.extend_from_slice(&v.seq.unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&v.sid.ms.to_be_bytes());
    b.extend_from_slice(&(v.sid.seq as u32).to_be_bytes());
    b.extend_from_slice(&id_hash(&s.event_id).to_be_bytes());
    put_len(b, s.event_id.len());
    // SAFETY of the cast: `<u64>-<u64>` has at most 41 characters.
    b.push(entry.as_bytes().len() as u8);
    if let Some((v, m)) = &s.meta {
        put_version(b, v);
        if let Some(m) = m {
            put_len(b, m.len());
            b.extend_from_slice(m);
        }
    }
    b.extend_from_slice(s.event_id.as_bytes());
    b.extend_from_slice(entry.as_bytes());
}

/// A version as three u64: seq (0 without one: the flags say), stream id ms and sequence.
fn put_version(b: &mut Vec<u8>, v: &Version) {
    b.extend_from_slice(&v.seq.unwrap_or(0).to_be_bytes());
    b.extend_from_slice(&v.sid.ms.to_be_bytes());
    b.extend_from_slice(&v.sid.seq.to_be_bytes());
}

/// A length as a u32 (every string here is far below 4 GiB: it came out of one stream entry).
fn put_len(b: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).expect("a string of one stream entry is shorter than 4 GiB");
    b.extend_from_slice(&n.to_be_bytes());
}
