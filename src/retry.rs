//! Retries with exponential backoff and jitter, bounded by shutdown.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// The backoff between attempts: a ceiling of 20 ms doubling up to 2 s, with full jitter (each
/// delay uniform between zero and the ceiling), without end.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(20))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .build()
        .map(|ceiling| ceiling.mul_f64(rand::random::<f64>()))
}

/// Most attempts of one operation before the worker gives the batch up (it stays pending and is
/// replayed, so giving up loses nothing).
pub const MAX_ATTEMPTS: u32 = 20;

/// Most time spent retrying one operation before giving the batch up.
pub const MAX_ELAPSED: Duration = Duration::from_secs(60);

/// Runs `op` until it succeeds or fails permanently. Transient failures are retried up to
/// [`MAX_ATTEMPTS`] times within [`MAX_ELAPSED`], and for at most `drain` after `shutdown` is
/// cancelled; then the last error is returned (unacknowledged entries are redelivered later, so
/// giving up loses nothing).
pub async fn until_done<T, F, Fut>(
    what: &'static str,
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
    let start = Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        crate::worker::watchdog::enter(what);
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) if attempt >= MAX_ATTEMPTS || start.elapsed() >= MAX_ELAPSED => return Err(e),
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
                crate::metrics::retry(what);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether an error from [`until_done`] is worth logging as a failure of the worker itself.
pub fn is_fatal(e: &Error) -> bool {
    !e.is_transient()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jitter_stays_under_a_doubling_ceiling() {
        let delays: Vec<Duration> = backoff().take(12).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = Duration::from_millis(20 * (1 << i.min(7))).min(Duration::from_secs(2));
            assert!(*d <= ceiling, "attempt {i}: {d:?} > {ceiling:?}");
        }
        // Full jitter spreads the delays: they are not all at the ceiling.
        assert!(delays
            .iter()
            .skip(7)
            .any(|d| *d < Duration::from_millis(1900)));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_a_bounded_number_of_times() {
        let token = CancellationToken::new();
        let mut calls = 0;
        let r: Result<()> = until_done("op", &token, Duration::from_secs(1), || {
            calls += 1;
            async { Err(Error::Io(std::io::Error::other("down"))) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, MAX_ATTEMPTS);
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_errors_are_not_retried_and_success_ends_at_once() {
        let token = CancellationToken::new();
        let mut calls = 0;
        let r: Result<()> = until_done("op", &token, Duration::from_secs(1), || {
            calls += 1;
            async { Err(Error::Config("bad".into())) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = until_done("op", &token, Duration::from_secs(1), || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(Error::Io(std::io::Error::other("blip")))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn after_shutdown_retries_stop_at_the_drain_deadline() {
        let token = CancellationToken::new();
        token.cancel();
        let start = Instant::now();
        let r: Result<()> = until_done("op", &token, Duration::from_millis(300), || async {
            Err(Error::BreakerOpen(Duration::from_millis(100)))
        })
        .await;
        assert!(r.is_err());
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(500),
            "{took:?}"
        );
    }
}
