//! Connections to Redis: one for applying and acknowledging, one of its own for blocking reads.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::{Error, Result};
use crate::redact::redact;

/// Opens a client for `url`, checking the URL without connecting.
pub fn client(url: &str) -> Result<redis::Client> {
    redis::Client::open(url).map_err(|e| {
        Error::Config(format!(
            "--redis-url {}: not a valid Redis URL ({e})",
            redact(url)
        ))
    })
}

/// A reconnecting connection whose replies may take up to `response_timeout`.
///
/// The blocking read gets one of its own with a timeout longer than `BLOCK`: redis-rs's default
/// (500 ms) would cut every `XREADGROUP BLOCK` short, and a blocked multiplexed connection would
/// stall every other command sent on it.
pub async fn manager(
    client: &redis::Client,
    response_timeout: Duration,
) -> Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(2));
    client
        .get_connection_manager_with_config(config)
        .await
        .map_err(|source| Error::Connect {
            url: redact(&client.get_connection_info().addr().to_string()),
            source,
        })
}
