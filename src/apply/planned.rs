//! The planned path of [`Applier::apply`] on a standalone Redis: read the documents' records
//! under `WATCH`, decide each step in the worker ([`crate::plan`]), write the steps in one
//! `MULTI`/`EXEC`. A script call costs Redis several times the commands it makes (the Lua around
//! them); here Redis runs only the commands. If anything changed a watched key meanwhile
//! (another replica, an expiry visit), `EXEC` does nothing and the script applies the chunk as
//! before, so the outcome is the script's either way.
//!
//! `WATCH` belongs to a connection: each chunk of documents takes a connection of the path's
//! own for its rounds, and gives it back after its `EXEC`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::{RedisResult, Value};
use tokio::sync::watch;

use super::{Applied, Applier};
use crate::coalesce::DocUpdate;
use crate::error::{Error, Result};
use crate::plan::{plan_doc, users_of, DocRead, DocStep, Planned, LARGE};
use crate::resp::{LeanConn, OwnConn};

/// The planned path's connections and the batch in flight (see the module docs).
#[derive(Debug)]
pub(crate) struct Watched {
    client: redis::Client,
    response_timeout: Duration,
    /// Whether the path's connections are lean ones ([`crate::resp`]) where the client allows.
    lean: bool,
    /// Connections no chunk holds now.
    idle: Mutex<Vec<OwnConn>>,
    /// Chunks in their rounds at once, so at most that many connections ([`CONNECTIONS`]).
    lanes: tokio::sync::Semaphore,
    /// The documents of the batches in flight, and whether each is done. A batch's chunks of
    /// documents also in an earlier batch still in flight wait until those are done: read
    /// before their writes, they would fail their `EXEC` (the most popular documents are in
    /// every batch). The other chunks go at once, so that Redis runs one batch's writes while
    /// the worker plans the next.
    in_flight: Mutex<Vec<InFlight>>,
    /// Set when Redis refuses the path's commands for good (an ACL without `WATCH`, say): the
    /// script applies everything from then on.
    off: AtomicBool,
    /// Documents applied on the path, and chunks whose `EXEC` found a watched key changed.
    pub(crate) planned: AtomicU64,
    pub(crate) conflicts: AtomicU64,
}

/// Most connections of the planned path: while the worker plans one chunk, Redis runs the
/// others' commands; more only cost memory (each has its buffers).
const CONNECTIONS: usize = 16;

/// Documents per chunk, each chunk watched and written on its own. Redis 7.0 checks every key a
/// connection watches against all those it already watches (quadratic): a whole batch's 1,400
/// keys took 15 ms of Redis time, 64 take a few microseconds.
const CHUNK: usize = 32;

impl Watched {
    pub(crate) fn new(client: redis::Client, response_timeout: Duration, lean: bool) -> Self {
        Self {
            client,
            response_timeout,
            lean,
            idle: Mutex::new(Vec::new()),
            lanes: tokio::sync::Semaphore::new(CONNECTIONS),
            in_flight: Mutex::new(Vec::new()),
            off: AtomicBool::new(false),
            planned: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    /// An idle connection, or a new one.
    async fn take(&self) -> Result<OwnConn> {
        if let Some(con) = self.idle.lock().expect("idle connections").pop() {
            return Ok(con);
        }
        if self.lean {
            if let Some(con) = LeanConn::new(&self.client, self.response_timeout) {
                return Ok(OwnConn::Lean(con));
            }
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Ok(OwnConn::Redis(
            self.client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        ))
    }

    /// Counts documents applied on the path and chunks whose `EXEC` found a watched key changed
    /// (this applier's figures and the exported metrics).
    fn count(&self, planned: u64, conflicts: u64) {
        self.planned.fetch_add(planned, Ordering::Relaxed);
        self.conflicts.fetch_add(conflicts, Ordering::Relaxed);
        crate::metrics::planned(planned, conflicts);
    }

    fn give_back(&self, con: OwnConn) {
        self.idle.lock().expect("idle connections").push(con);
    }
}

/// A batch in flight: its documents (hashed) and whether it is done.
type InFlight = (std::sync::Arc<HashSet<u32>>, watch::Receiver<bool>);

/// Marks a batch done when dropped (also when it fails or is cancelled).
pub(super) struct Done(watch::Sender<bool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// The padding `widen()` writes and deletes to make a records hash a hash table
/// (`lua/apply.lua`).
const PAD_FIELD: &str = "\u{1f}";

impl Applier {
    /// Applies what it can of `docs` on the planned path; `None` for each document the script
    /// must apply (or all of a chunk's, when its `EXEC` found a watched key changed). The batch
    /// counts as in flight until the [`Done`] returned is dropped: after the script applied the
    /// rest.
    pub(super) async fn apply_planned(
        &self,
        w: &Watched,
        docs: &[DocUpdate],
    ) -> Result<(Vec<Option<Applied>>, Done)> {
        let ids: Vec<u32> = docs
            .iter()
            .map(|d| crate::shard::fnv1a32(d.doc.as_bytes()))
            .collect();
        let (tx, rx) = watch::channel(false);
        let done = Done(tx);
        let earlier: Vec<InFlight> = {
            let mut in_flight = w.in_flight.lock().expect("batches in flight");
            in_flight.retain(|(_, done)| !*done.borrow());
            let earlier = in_flight.clone();
            in_flight.push((std::sync::Arc::new(ids.iter().copied().collect()), rx));
            earlier
        };
        // The documents an earlier batch holds, after the others.
        let (free, held): (Vec<usize>, Vec<usize>) =
            (0..docs.len()).partition(|&i| earlier.iter().all(|(set, _)| !set.contains(&ids[i])));
        let first_held = free.len().div_ceil(CHUNK);
        let chunks: Vec<&[usize]> = free.chunks(CHUNK).chain(held.chunks(CHUNK)).collect();
        let runs = chunks.iter().enumerate().map(|(k, &chunk)| {
            let mut wait: Vec<_> = if k >= first_held {
                earlier.iter().map(|(_, done)| done.clone()).collect()
            } else {
                Vec::new()
            };
            async move {
                for done in &mut wait {
                    // (An error: that batch is gone, done or not.)
                    let _ = done.wait_for(|&d| d).await;
                }
                let _lane = w.lanes.acquire().await.expect("never closed");
                let mut con = w.take().await?;
                let chunk_docs: Vec<&DocUpdate> = chunk.iter().map(|&i| &docs[i]).collect();
                // On an error the connection's WATCH state is unknown: it is dropped.
                let out = self.rounds(w, &mut con, &chunk_docs).await?;
                w.give_back(con);
                Ok::<_, Error>(out)
            }
        });
        let mut out = vec![None; docs.len()];
        for (chunk, run) in chunks
            .iter()
            .zip(futures_util::future::join_all(runs).await)
        {
            match run {
                Ok(chunk_out) => {
                    w.count(chunk_out.iter().filter(|a| a.is_some()).count() as u64, 0);
                    for (&i, a) in chunk.iter().zip(chunk_out) {
                        out[i] = a;
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "planned path refused; the script applies every batch");
                    w.off.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok((out, done))
    }

    async fn rounds(
        &self,
        w: &Watched,
        con: &mut OwnConn,
        docs: &[&DocUpdate],
    ) -> Result<Vec<Option<Applied>>> {
        let users: Vec<_> = docs.iter().map(|d| users_of(d)).collect();
        let records: Vec<String> = docs
            .iter()
            .map(|d| self.keys.doc_key(&d.doc, "records"))
            .collect();
        // Round one: watch the records hashes and users sets, read the users' values, the
        // counts and the memberships.
        let users_keys: Vec<String> = docs
            .iter()
            .map(|d| self.keys.doc_key(&d.doc, "users"))
            .collect();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("WATCH").arg(&records).arg(&users_keys);
        pipe.cmd("TIME");
        // (One EXISTS for the chunk: earlier versions' keys are rare.)
        let old = pipe.cmd("EXISTS");
        for d in docs {
            old.arg(self.keys.doc_key(&d.doc, "sessions"));
        }
        for (i, names) in users.iter().map(|(names, _)| names).enumerate() {
            pipe.cmd("HMGET").arg(&records[i]).arg(names);
            pipe.cmd("SCARD").arg(&users_keys[i]);
            pipe.cmd("SMISMEMBER").arg(&users_keys[i]).arg(names);
        }
        let mut replies = pipe
            .query_async::<Vec<RedisResult<Value>>>(con)
            .await?
            .into_iter();
        replies.next().transpose()?;
        let now = server_ms(replies.next().transpose()?)?;
        let old: u64 = match replies.next().transpose()? {
            Some(n) => redis::from_redis_value(n).map_err(|e| Error::Protocol(e.to_string()))?,
            None => 1,
        };
        let mut plans: Vec<Option<Planned>> = Vec::with_capacity(docs.len());
        for (d, (_, user_of)) in docs.iter().zip(&users) {
            let read = doc_read(&mut replies, old > 0);
            plans.push(read.map(|r| plan_doc(d, user_of, &r, now, self.max_user_sessions)));
        }
        // Round two: the steps, in one transaction.
        let mut out = vec![None; docs.len()];
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut globals = Globals::default();
        for (i, plan) in plans.into_iter().enumerate() {
            let Some(Planned::Step(step)) = plan else {
                continue;
            };
            let (doc, names) = (&docs[i].doc, &users[i].0);
            let keys = (records[i].as_str(), users_keys[i].as_str());
            self.write_step(&mut pipe, doc, keys, names, &step, now, &mut globals);
            out[i] = Some(Applied {
                outcomes: step.outcomes,
                snapshot: String::new(),
                expired: 0,
            });
        }
        globals.write(&mut pipe, &self.keys.globals());
        // (An empty transaction still ends the WATCH.)
        let done: Value = pipe.query_async(con).await?;
        if matches!(done, Value::Nil) {
            w.count(0, 1);
            tracing::debug!(
                documents = docs.len(),
                "a watched key changed: the script applies the chunk"
            );
            return Ok(vec![None; docs.len()]);
        }
        Ok(out)
    }

    /// Queues one document's step (`write_records`, `widen` and `finish_doc` of the scripts).
    #[allow(clippy::too_many_arguments)]
    fn write_step(
        &self,
        pipe: &mut redis::Pipeline,
        doc: &str,
        (records, users_key): (&str, &str),
        users: &[&str],
        step: &DocStep,
        now: u64,
        globals: &mut Globals,
    ) {
        if !step.writes.is_empty() {
            let hset = pipe.cmd("HSET").arg(records);
            for (u, value) in &step.writes {
                hset.arg(users[*u]).arg(value);
            }
            hset.ignore();
        }
        if !step.added.is_empty() {
            let sadd = pipe.cmd("SADD").arg(users_key);
            for &u in &step.added {
                sadd.arg(users[u]);
            }
            sadd.ignore();
        }
        if !step.removed.is_empty() {
            let srem = pipe.cmd("SREM").arg(users_key);
            for &u in &step.removed {
                srem.arg(users[u]);
            }
            srem.ignore();
        }
        if step.went_live && step.after >= LARGE {
            pipe.cmd("HSET")
                .arg(records)
                .arg(PAD_FIELD)
                .arg(&*PAD)
                .ignore();
            pipe.cmd("HDEL").arg(records).arg(PAD_FIELD).ignore();
        }
        if !(step.counted || step.ended || step.went_live) {
            return;
        }
        globals.d_sessions += step.d_sessions;
        globals.d_users += step.d_users;
        let snapshot = self.keys.doc_key(doc, "snapshot");
        if step.after == 0 {
            if step.before != 0 {
                pipe.cmd("DEL")
                    .arg(self.keys.doc_key(doc, "count"))
                    .ignore();
                globals.top_del.push(doc.to_owned());
            }
            globals.due_del.push(doc.to_owned());
            pipe.cmd("PEXPIRE")
                .arg(records)
                .arg(self.history_ms)
                .ignore();
            pipe.cmd("PEXPIRE")
                .arg(&snapshot)
                .arg(self.history_ms)
                .ignore();
            return;
        }
        if step.after != step.before {
            pipe.cmd("SET")
                .arg(self.keys.doc_key(doc, "count"))
                .arg(step.after)
                .ignore();
            globals.top_add.push((step.after, doc.to_owned()));
        }
        if step.before == 0 {
            pipe.cmd("PERSIST").arg(records).ignore();
            pipe.cmd("PERSIST").arg(&snapshot).ignore();
        }
        // The expiry index may be early, never late (finish_doc).
        let live_due = (step.went_live && self.ttl_ms > 0).then(|| now + self.ttl_ms);
        let prune_due = step
            .ended
            .then(|| now + self.history_ms + self.history_ms / 8);
        if let Some(due) = live_due.into_iter().chain(prune_due).min() {
            globals.due_lt.push((due, doc.to_owned()));
        }
    }
}

/// The padding's value: longer than `hash-max-listpack-value`.
static PAD: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| ".".repeat(1024));

/// The totals and global indexes a transaction changes (`flush_globals` of the scripts).
#[derive(Default)]
struct Globals {
    d_sessions: i64,
    d_users: i64,
    top_add: Vec<(u64, String)>,
    top_del: Vec<String>,
    due_lt: Vec<(u64, String)>,
    due_del: Vec<String>,
}

impl Globals {
    fn write(&self, pipe: &mut redis::Pipeline, keys: &crate::keys::GlobalKeys) {
        for (field, d) in [
            ("live_sessions", self.d_sessions),
            ("present_users", self.d_users),
        ] {
            if d != 0 {
                pipe.cmd("HINCRBY")
                    .arg(&keys.stats)
                    .arg(field)
                    .arg(d)
                    .ignore();
            }
        }
        if !self.top_del.is_empty() {
            pipe.cmd("ZREM").arg(&keys.top).arg(&self.top_del).ignore();
        }
        if !self.top_add.is_empty() {
            let zadd = pipe.cmd("ZADD").arg(&keys.top);
            for (count, doc) in &self.top_add {
                zadd.arg(count).arg(doc);
            }
            zadd.ignore();
        }
        if !self.due_del.is_empty() {
            pipe.cmd("ZREM")
                .arg(&keys.expiry)
                .arg(&self.due_del)
                .ignore();
        }
        if !self.due_lt.is_empty() {
            let zadd = pipe.cmd("ZADD").arg(&keys.expiry).arg("LT");
            for (due, doc) in &self.due_lt {
                zadd.arg(due).arg(doc);
            }
            zadd.ignore();
        }
    }
}

/// A document's reads, from its replies to `HMGET`, `SCARD` and `SMISMEMBER`; `None` when the
/// script must apply it: a read failed, or none of the users has a record and the document may
/// still be in an earlier version's keys (`old`: some document of the chunk has an earlier
/// version's sessions hash), which the script moves.
fn doc_read(replies: &mut impl Iterator<Item = RedisResult<Value>>, old: bool) -> Option<DocRead> {
    let mut next = || replies.next().and_then(|r| r.ok());
    let (values, before, members) = (next(), next(), next());
    let values: Vec<Option<Vec<u8>>> = redis::from_redis_value(values?).ok()?;
    if old && values.iter().all(Option::is_none) {
        return None;
    }
    Some(DocRead {
        values,
        before: redis::from_redis_value(before?).ok()?,
        members: redis::from_redis_value(members?).ok()?,
    })
}

/// `TIME` in milliseconds, as the scripts compute it.
fn server_ms(time: Option<Value>) -> Result<u64> {
    let time = time.ok_or_else(|| Error::Protocol("no reply to TIME".into()))?;
    let (secs, micros): (u64, u64) =
        redis::from_redis_value(time).map_err(|e| Error::Protocol(format!("TIME: {e}")))?;
    Ok(secs * 1000 + micros / 1000)
}
