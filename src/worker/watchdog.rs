//! Liveness of the consumer loops. Each loop runs inside a [`Progress`] scope: every guarded
//! Redis call (start and end) and every step of the loop marks it, with the step's name. A loop
//! that marks nothing for its stall limit is waiting on something no timeout bounds; the
//! supervisor then drops it wherever it is (its entries stay pending), logs the step it was in,
//! and starts it again on fresh connections, replaying its pending entries. `/readyz` reports a
//! loop silent for half the limit.
//!
//! Every Redis call of a loop is bounded (response timeouts, the read's own limit, retries that
//! give up), so this should never fire; it is there because once, after a Redis restart under
//! CPU load, a test worker was seen to stop reading without an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

tokio::task_local! {
    static CURRENT: Arc<Progress>;
}

/// When a consumer loop last did something, and what.
#[derive(Debug)]
pub struct Progress {
    /// Which loop (its stream).
    name: String,
    start: Instant,
    /// Milliseconds from `start` to the last mark.
    last_ms: AtomicU64,
    step: Mutex<&'static str>,
}

impl Progress {
    /// A loop's progress, marked now.
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            step: Mutex::new("starting"),
        })
    }

    /// Which loop this is.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn enter(&self, step: &'static str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = step;
        self.touch();
    }

    /// The step the loop was last in.
    pub fn step(&self) -> &'static str {
        *self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long since the last mark.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    /// Resolves once the loop has been silent for `limit`, with how long.
    async fn stalled(&self, limit: Duration) -> Duration {
        loop {
            let silent = self.silent_for();
            if silent >= limit {
                return silent;
            }
            tokio::time::sleep(limit - silent).await;
        }
    }
}

/// Marks the current loop's progress (outside a loop, e.g. in the expiry task: nothing).
pub fn mark() {
    let _ = CURRENT.try_with(|p| p.touch());
}

/// Marks the current loop's progress and names the step it enters.
pub fn enter(step: &'static str) {
    let _ = CURRENT.try_with(|p| p.enter(step));
}

/// Runs `run` in `progress`'s scope: its result, or `None` when it was silent for `limit` (it is
/// then dropped, wherever it waited).
pub(super) async fn supervise<T>(
    progress: &Arc<Progress>,
    limit: Duration,
    run: impl std::future::Future<Output = T>,
) -> Option<T> {
    progress.enter("starting");
    tokio::select! {
        r = CURRENT.scope(progress.clone(), run) => Some(r),
        _ = progress.stalled(limit) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_loop_silent_for_the_limit_is_dropped_with_its_step() {
        let p = Progress::new("s");
        let limit = Duration::from_secs(10);
        let start = Instant::now();
        let r = supervise(&p, limit, async {
            enter("read");
            std::future::pending::<()>().await
        })
        .await;
        assert!(r.is_none());
        assert_eq!(p.step(), "read");
        let took = start.elapsed();
        assert!(
            took >= limit && took < limit + Duration::from_secs(1),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_marks_runs_past_the_limit() {
        let p = Progress::new("s");
        let limit = Duration::from_secs(10);
        let r = supervise(&p, limit, async {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                mark();
            }
            42
        })
        .await;
        assert_eq!(r, Some(42));
        assert!(p.silent_for() < Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn marks_outside_a_loop_touch_nothing() {
        let p = Progress::new("s");
        let limit = Duration::from_secs(10);
        let r = supervise(&p, limit, async {
            // A task spawned by the loop (the expiry round) is outside its scope.
            tokio::spawn(async {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    mark();
                }
            });
            std::future::pending::<()>().await
        })
        .await;
        assert!(r.is_none());
    }
}
