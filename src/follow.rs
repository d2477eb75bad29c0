//! `snapshots [--follow]` and `watch DOC`: what operators and demos look at live.

use std::time::Duration;

use redis::Value;
use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::snapshot::{decode_request, PresenceChange, SnapshotRequest};
use crate::stream_id::StreamId;

/// One line per request.
pub fn render_request(id: &str, r: &SnapshotRequest) -> String {
    format!(
        "{id} {} doc={} reason={} threshold={} count={} users=[{}] cause={}/{}",
        r.snapshot_id,
        r.doc,
        r.reason,
        r.threshold,
        r.count,
        r.users.join(","),
        r.cause.event_id,
        r.cause.entry_id
    )
}

/// Prints the requests in `stream`, then (with `follow`) new ones until SIGINT/SIGTERM.
pub async fn snapshots(common: &Common, stream: &str, follow: bool) -> Result<()> {
    let client = common.client()?;
    let mut con = crate::connection::connect(&client, Duration::from_secs(10)).await?;
    let token = CancellationToken::new();
    crate::shutdown::cancel_on_signals(token.clone());
    let mut after = StreamId::default();
    loop {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(500);
        if follow {
            cmd.arg("BLOCK").arg(2000);
        }
        cmd.arg("STREAMS").arg(stream).arg(after.to_string());
        let reply: Value = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            r = cmd.query_async(&mut con) => r?,
        };
        let entries = crate::read::parse_read_reply(reply)?;
        for e in &entries {
            after = e.id;
            let payload = e
                .fields
                .iter()
                .flatten()
                .find(|(k, _)| k == b"e")
                .map(|(_, v)| v);
            match payload.map(|p| decode_request(p)) {
                Some(Ok(r)) => println!("{}", render_request(&e.id.to_string(), &r)),
                _ => println!("{} (not a snapshot request)", e.id),
            }
        }
        if entries.is_empty() && !follow {
            return Ok(());
        }
    }
}

/// Subscribes to `doc`'s change feed and prints each change until SIGINT/SIGTERM.
pub async fn watch(common: &Common, doc: &str) -> Result<()> {
    let channel = Keys::new(&common.prefix).doc(doc).presence_channel;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let url = with_resp3(&common.redis_url);
    let client = crate::connection::client_with(&url, &common.connect_options())?;
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut con = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|source| Error::Connect {
            url: crate::redact::redact(&common.redis_url),
            source,
        })?;
    redis::cmd("SSUBSCRIBE")
        .arg(&channel)
        .exec_async(&mut con)
        .await?;
    eprintln!("watching {channel} (Ctrl-C to stop)");
    let token = CancellationToken::new();
    crate::shutdown::cancel_on_signals(token.clone());
    loop {
        let push = tokio::select! {
            _ = token.cancelled() => return Ok(()),
            p = rx.recv() => p,
        };
        let Some(push) = push else {
            return Err(Error::Protocol("the subscription connection closed".into()));
        };
        if let Some(change) = decode_change(&push) {
            let why = change.reason.map(|r| format!(" ({r})")).unwrap_or_default();
            println!(
                "{} {}{why}  count={}",
                change.user, change.change, change.count
            );
        }
    }
}

/// A change from a sharded Pub/Sub push (`smessage channel payload`).
pub fn decode_change(push: &redis::PushInfo) -> Option<PresenceChange> {
    if push.kind != redis::PushKind::SMessage {
        return None;
    }
    match push.data.last()? {
        Value::BulkString(b) => rmp_serde::from_slice(b).ok(),
        _ => None,
    }
}

/// The URL with RESP3 asked for (push messages need it).
pub fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}
