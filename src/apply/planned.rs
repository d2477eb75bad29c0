//! The planned path of [`Applier::apply`] on a standalone Redis: read the documents' records
//! under `WATCH`, decide each step in the worker ([`crate::plan`]), write the steps in one
//! `MULTI`/`EXEC`. A script call costs Redis several times the commands it makes (the Lua around
//! them); here Redis runs only the commands. If anything changed a watched key meanwhile
//! (another replica, an expiry visit), `EXEC` does nothing and the script applies the batch as
//! before, so the outcome is the script's either way.
//!
//! `WATCH` belongs to a connection, so the path has one of its own, used by one batch at a time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Value};

use super::{Applied, Applier};
use crate::coalesce::DocUpdate;
use crate::error::{Error, Result};
use crate::plan::{plan_doc, users_of, DocRead, DocStep, Planned, LARGE};

/// The planned path's connections (see the module docs).
#[derive(Debug)]
pub(crate) struct Watched {
    client: redis::Client,
    response_timeout: Duration,
    /// [`CONNECTIONS`] connections, used by one batch at a time: a later batch's reads must
    /// follow this one's writes, or documents in both (the most popular) would fail its `EXEC`.
    cons: tokio::sync::Mutex<Vec<Option<MultiplexedConnection>>>,
    /// Set when Redis refuses the path's commands for good (an ACL without `WATCH`, say): the
    /// script applies everything from then on.
    off: AtomicBool,
    /// Documents applied on the path, and chunks whose `EXEC` found a watched key changed.
    pub(crate) planned: AtomicU64,
    pub(crate) conflicts: AtomicU64,
}

/// Connections a batch's chunks run on at once: while the worker plans one chunk, Redis runs
/// the others' commands.
const CONNECTIONS: usize = 16;

/// Documents per chunk, each chunk watched and written on its own. Redis 7.0 checks every key a
/// connection watches against all those it already watches (quadratic): a whole batch's 1,400
/// keys took 15 ms of Redis time, 64 take a few microseconds.
const CHUNK: usize = 64;

impl Watched {
    pub(crate) fn new(client: redis::Client, response_timeout: Duration) -> Self {
        Self {
            client,
            response_timeout,
            cons: tokio::sync::Mutex::new((0..CONNECTIONS).map(|_| None).collect()),
            off: AtomicBool::new(false),
            planned: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        }
    }

    pub(crate) fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    async fn connect(&self) -> Result<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)));
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }
}

/// The padding `widen()` writes and deletes to make a records hash a hash table
/// (`lua/apply.lua`).
const PAD_FIELD: &str = "\u{1f}";

impl Applier {
    /// Applies what it can of `docs` on the planned path; `None` for each document the script
    /// must apply (or all of a chunk's, when its `EXEC` found a watched key changed).
    pub(super) async fn apply_planned(
        &self,
        w: &Watched,
        docs: &[DocUpdate],
    ) -> Result<Vec<Option<Applied>>> {
        let mut cons = w.cons.lock().await;
        for con in cons.iter_mut().filter(|c| c.is_none()) {
            *con = Some(w.connect().await?);
        }
        let chunks: Vec<&[DocUpdate]> = docs.chunks(CHUNK).collect();
        let n = cons.len();
        let lanes = cons.iter_mut().enumerate().map(|(lane, slot)| {
            let chunks = &chunks;
            async move {
                let mut done = Vec::new();
                for k in (lane..chunks.len()).step_by(n) {
                    let con = slot.as_mut().expect("connected above");
                    match self.rounds(con, chunks[k], &w.conflicts).await {
                        Ok(out) => done.push((k, out)),
                        Err(e) => {
                            // WATCH state unknown: a new connection next time.
                            *slot = None;
                            return Err(e);
                        }
                    }
                }
                Ok(done)
            }
        });
        let mut out = vec![None; docs.len()];
        for lane in futures_util::future::join_all(lanes).await {
            match lane {
                Ok(done) => {
                    for (k, chunk_out) in done {
                        let planned = chunk_out.iter().filter(|a| a.is_some()).count() as u64;
                        w.planned.fetch_add(planned, Ordering::Relaxed);
                        let at = k * CHUNK;
                        out[at..at + chunk_out.len()].clone_from_slice(&chunk_out);
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "planned path refused; the script applies every batch");
                    w.off.store(true, Ordering::Relaxed);
                }
            }
        }
        Ok(out)
    }

    async fn rounds(
        &self,
        con: &mut MultiplexedConnection,
        docs: &[DocUpdate],
        conflicts: &AtomicU64,
    ) -> Result<Vec<Option<Applied>>> {
        let users: Vec<_> = docs.iter().map(users_of).collect();
        let records: Vec<String> = docs
            .iter()
            .map(|d| self.keys.doc_key(&d.doc, "records"))
            .collect();
        // Round one: watch the records, read the users' values.
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("WATCH").arg(&records);
        pipe.cmd("TIME");
        for (key, (names, _)) in records.iter().zip(&users) {
            pipe.cmd("HMGET").arg(key).arg(names);
        }
        let mut replies = pipe
            .query_async::<Vec<RedisResult<Value>>>(con)
            .await?
            .into_iter();
        replies.next().transpose()?;
        let now = server_ms(replies.next().transpose()?)?;
        let mut reads: Vec<Option<DocRead>> = replies
            .map(|values| {
                let values = redis::from_redis_value(values.ok()?).ok()?;
                Some(DocRead {
                    values,
                    counts: None,
                })
            })
            .collect();
        if reads.len() != docs.len() {
            return Err(Error::Protocol(format!(
                "{} replies to HMGET for {} documents",
                reads.len(),
                docs.len()
            )));
        }
        let plan = |i: usize, read: &DocRead| {
            plan_doc(&docs[i], &users[i].1, read, now, self.max_user_sessions)
        };
        // A document none of whose users has a record may still be in an earlier version's
        // keys: its counts are read first, with EXISTS.
        let fresh = |read: &DocRead| read.values.iter().all(Option::is_none);
        let mut plans: Vec<Option<Planned>> = reads
            .iter()
            .enumerate()
            .map(|(i, r)| match r {
                Some(r) if fresh(r) => Some(Planned::NeedCounts),
                Some(r) => Some(plan(i, r)),
                None => None,
            })
            .collect();
        // Round two, for the steps that start or end sessions: watch the users sets, read the
        // counts and memberships.
        let need: Vec<usize> = (0..docs.len())
            .filter(|&i| matches!(plans[i], Some(Planned::NeedCounts)))
            .collect();
        if !need.is_empty() {
            let users_keys: Vec<String> = need
                .iter()
                .map(|&i| self.keys.doc_key(&docs[i].doc, "users"))
                .collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            pipe.cmd("WATCH").arg(&users_keys);
            for (&i, key) in need.iter().zip(&users_keys) {
                pipe.cmd("SCARD").arg(key);
                pipe.cmd("SMISMEMBER").arg(key).arg(&users[i].0);
                if reads[i].as_ref().is_some_and(fresh) {
                    pipe.cmd("EXISTS")
                        .arg(self.keys.doc_key(&docs[i].doc, "sessions"));
                }
            }
            let mut replies = pipe
                .query_async::<Vec<RedisResult<Value>>>(con)
                .await?
                .into_iter();
            replies.next().transpose()?;
            for &i in &need {
                let Some(read) = reads[i].as_mut() else {
                    continue;
                };
                let before = replies.next().and_then(|r| r.ok());
                let members = replies.next().and_then(|r| r.ok());
                let old = if fresh(read) {
                    replies.next().and_then(|r| r.ok())
                } else {
                    Some(Value::Int(0))
                };
                plans[i] = counts(before, members, old, users[i].0.len()).map(|c| {
                    read.counts = Some(c);
                    plan(i, read)
                });
            }
        }
        // Round three: the steps, in one transaction.
        let mut out = vec![None; docs.len()];
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut globals = Globals::default();
        for (i, plan) in plans.into_iter().enumerate() {
            let Some(Planned::Step(step)) = plan else {
                continue;
            };
            let (doc, names) = (&docs[i].doc, &users[i].0);
            self.write_step(&mut pipe, doc, &records[i], names, &step, now, &mut globals);
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
            conflicts.fetch_add(1, Ordering::Relaxed);
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
        records: &str,
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
        let users_key = self.keys.doc_key(doc, "users");
        if !step.added.is_empty() {
            let sadd = pipe.cmd("SADD").arg(&users_key);
            for &u in &step.added {
                sadd.arg(users[u]);
            }
            sadd.ignore();
        }
        if !step.removed.is_empty() {
            let srem = pipe.cmd("SREM").arg(&users_key);
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
        if self.d_sessions != 0 {
            pipe.cmd("HINCRBY")
                .arg(&keys.stats)
                .arg("live_sessions")
                .arg(self.d_sessions)
                .ignore();
        }
        if self.d_users != 0 {
            pipe.cmd("HINCRBY")
                .arg(&keys.stats)
                .arg("present_users")
                .arg(self.d_users)
                .ignore();
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

/// A document's counts (`SCARD`, `SMISMEMBER` of its `n` users), given `EXISTS` of an earlier
/// version's sessions hash; `None` when the script must apply it (a read failed, or the document
/// is still in an earlier version's keys).
fn counts(
    before: Option<Value>,
    members: Option<Value>,
    old: Option<Value>,
    n: usize,
) -> Option<(u64, Vec<bool>)> {
    let before: u64 = redis::from_redis_value(before?).ok()?;
    let members: Vec<bool> = redis::from_redis_value(members?).ok()?;
    let old: u64 = redis::from_redis_value(old?).ok()?;
    (old == 0 && members.len() == n).then_some((before, members))
}

/// `TIME` in milliseconds, as the scripts compute it.
fn server_ms(time: Option<Value>) -> Result<u64> {
    let time = time.ok_or_else(|| Error::Protocol("no reply to TIME".into()))?;
    let (secs, micros): (u64, u64) =
        redis::from_redis_value(time).map_err(|e| Error::Protocol(format!("TIME: {e}")))?;
    Ok(secs * 1000 + micros / 1000)
}
