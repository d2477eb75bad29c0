//! Retries with exponential backoff and jitter, bounded by shutdown.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The backoff between attempts: 20 ms doubling up to 2 s, jittered, without end.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs `op` until it succeeds or fails permanently. Transient failures are retried for as long
/// as the worker runs, and for at most `drain` after `shutdown` is cancelled; then the last error
/// is returned (unacknowledged entries are redelivered later, so giving up loses nothing).
pub async fn until_done<T, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    drain: Duration,
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut delays = backoff();
    let mut give_up_at: Option<Instant> = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                if shutdown.is_cancelled() {
                    let at = *give_up_at.get_or_insert_with(|| Instant::now() + drain);
                    if Instant::now() >= at {
                        return Err(e);
                    }
                }
                let delay = match e {
                    // Nothing will be sent before the breaker's cooldown ends: wait for it.
                    Error::BreakerOpen(retry_in) => retry_in.max(Duration::from_millis(10)),
                    _ => delays.next().unwrap_or(Duration::from_secs(2)),
                };
                tracing::warn!(error = %e, retry_in = ?delay, "{what} failed, retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether an error from [`until_done`] is worth logging as a failure of the worker itself.
pub fn is_fatal(e: &Error) -> bool {
    !e.is_transient()
}
