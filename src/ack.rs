//! Acknowledge stage: dead letters and `XACK`, in one atomic round trip.

use crate::connection::Conn;

use crate::error::Result;
use crate::read::Fields;
use crate::stream_id::StreamId;

/// An entry the worker will not apply, with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original entry id.
    pub id: StreamId,
    /// The original fields, as read.
    pub fields: Fields,
    /// Why it was not applied.
    pub reason: String,
    /// The reason's class for metrics: `invalid`, `too_many_deliveries`, `cannot_apply` or
    /// `too_many_sessions`.
    pub class: &'static str,
}

/// Where a batch is acknowledged.
#[derive(Debug, Clone)]
pub struct Acker {
    /// Events stream.
    pub stream: String,
    /// Consumer group.
    pub group: String,
    /// Dead-letter stream.
    pub dead_letter_stream: String,
}

impl Acker {
    /// Appends the dead letters, then acknowledges `ids` and deletes the batch's `lease` (see
    /// [`crate::lease`]), in one `MULTI`/`EXEC`: either all happen or none, so a retry never
    /// writes a dead letter twice.
    ///
    /// On a Redis Cluster the two streams live in different hash slots, so no transaction spans
    /// them: the dead letters are appended first, then the entries acknowledged. Nothing is lost;
    /// a crash between the two repeats the dead letters of that batch (at least once).
    pub async fn finish(
        &self,
        con: &mut Conn,
        dead: &[DeadLetter],
        ids: &[StreamId],
        lease: Option<&str>,
    ) -> Result<()> {
        if dead.is_empty() && ids.is_empty() && lease.is_none() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if !con.is_cluster() {
            pipe.atomic();
        }
        for d in dead {
            let cmd = pipe.cmd("XADD").arg(&self.dead_letter_stream).arg("*");
            cmd.arg("error").arg(&d.reason);
            cmd.arg("entry_id").arg(d.id.to_string());
            cmd.arg("stream").arg(&self.stream);
            for (k, v) in &d.fields {
                cmd.arg(k).arg(v);
            }
            cmd.ignore();
        }
        if con.is_cluster() && !dead.is_empty() && !ids.is_empty() {
            pipe.query_async::<()>(con).await?;
            pipe = redis::pipe();
        }
        if !ids.is_empty() {
            let cmd = pipe.cmd("XACK").arg(&self.stream).arg(&self.group);
            for id in ids {
                cmd.arg(id.text());
            }
            cmd.ignore();
        }
        if let Some(field) = lease {
            let leases = crate::lease::key(&self.stream, &self.group);
            pipe.cmd("HDEL").arg(leases).arg(field).ignore();
        }
        pipe.query_async::<()>(con).await?;
        Ok(())
    }
}
