//! The producer API: append events in wire format v1 (what `presence-worker publish` uses).

use redis::aio::ConnectionManager;

use crate::connection;
use crate::error::Result;
use crate::event::Event;
use crate::limits::Limits;
use crate::stream_id::StreamId;

/// Appends events to the events stream.
#[derive(Clone)]
pub struct Producer {
    con: ConnectionManager,
    stream: String,
    limits: Limits,
}

impl Producer {
    /// Connects to `redis_url`, appending to `stream`.
    pub async fn connect(redis_url: &str, stream: impl Into<String>) -> Result<Self> {
        let client = connection::client(redis_url)?;
        let con = connection::manager(&client, std::time::Duration::from_secs(5)).await?;
        Ok(Self {
            con,
            stream: stream.into(),
            limits: Limits::default(),
        })
    }

    /// Checks and appends one event (`XADD <stream> * e <payload>`); returns its entry id.
    ///
    /// An event the worker would dead-letter is refused here with [`crate::Error::InvalidEvent`].
    pub async fn publish(&mut self, event: &Event) -> Result<StreamId> {
        event.validate(&self.limits)?;
        let payload = event.encode()?;
        let id: String = redis::cmd("XADD")
            .arg(&self.stream)
            .arg("*")
            .arg("e")
            .arg(payload)
            .query_async(&mut self.con)
            .await?;
        id.parse()
            .map_err(|_| crate::Error::Protocol(format!("XADD returned {id:?}")))
    }

    /// Appends many events in one round trip; returns their entry ids in order.
    pub async fn publish_many(&mut self, events: &[Event]) -> Result<Vec<StreamId>> {
        let mut pipe = redis::pipe();
        for ev in events {
            ev.validate(&self.limits)?;
            pipe.cmd("XADD")
                .arg(&self.stream)
                .arg("*")
                .arg("e")
                .arg(ev.encode()?);
        }
        let ids: Vec<String> = pipe.query_async(&mut self.con).await?;
        ids.iter()
            .map(|id| {
                id.parse()
                    .map_err(|_| crate::Error::Protocol(format!("XADD returned {id:?}")))
            })
            .collect()
    }
}
