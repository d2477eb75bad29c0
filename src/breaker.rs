//! A circuit breaker for the worker's Redis calls: Closed → Open → HalfOpen → Closed.
//!
//! Closed, every call goes through and its outcome is counted. After
//! [`failure_threshold`](BreakerConfig::failure_threshold) consecutive failures, or a
//! [`failure_ratio`](BreakerConfig::failure_ratio) of failures among at least
//! [`min_calls`](BreakerConfig::min_calls) calls in the last [`window`](BreakerConfig::window),
//! it opens: for a jittered cooldown nothing is sent to Redis, so a struggling server is not
//! hammered by every replica at once. The first caller after the cooldown gets the one probe
//! permit (HalfOpen); its success closes the breaker, its failure reopens it for a fresh cooldown.
//!
//! Each transition is logged and passed to the [`Breaker::on_transition`] observers (the metrics
//! gauge, [`BreakerState::as_gauge`]). All time is `tokio::time`, so tests run on paused time.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, Result};

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed,
    /// Calls are rejected until the cooldown has elapsed.
    Open,
    /// One probe call is in flight; everyone else is rejected until it reports.
    HalfOpen,
}

impl BreakerState {
    /// The state as a log field or metric label: `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The state as a gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

/// When the breaker opens and for how long. Build it with the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker. 0 disables the breaker entirely: every call is
    /// allowed and nothing is counted, ratio mode included.
    pub failure_threshold: u32,
    /// The breaker also opens when failures reach this share of the calls in `window`; 0 turns
    /// ratio mode off. Checked when a failure is recorded.
    pub failure_ratio: f64,
    /// The window of ratio mode. It is kept in ten buckets, so a call leaves it between 0.9 and
    /// 1.0 `window` after it was recorded (bounded memory, whatever the call rate).
    pub window: Duration,
    /// Ratio mode waits for at least this many calls in the window, so that one failure out of
    /// one call does not open the breaker.
    pub min_calls: u32,
    /// How long the breaker stays open before it lets a probe through.
    pub cooldown: Duration,
    /// Each cooldown is multiplied by a random factor in `[1, 1 + jitter]`, so that replicas
    /// that opened together do not all probe at the same instant.
    pub jitter: f64,
    /// Rejections are logged at most once per interval (with the number rejected since the last
    /// line); opening already logs a line, so the first rejection line comes one interval later.
    pub log_interval: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            failure_ratio: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            cooldown: Duration::from_secs(5),
            jitter: 0.2,
            log_interval: Duration::from_secs(10),
        }
    }
}

impl BreakerConfig {
    /// Opens after `n` consecutive failures; 0 disables the breaker.
    #[must_use]
    pub fn with_failure_threshold(mut self, n: u32) -> Self {
        self.failure_threshold = n;
        self
    }

    /// Opens when failures reach `ratio` of at least `min_calls` calls within `window`.
    #[must_use]
    pub fn with_failure_ratio(mut self, ratio: f64, window: Duration, min_calls: u32) -> Self {
        self.failure_ratio = ratio;
        self.window = window;
        self.min_calls = min_calls;
        self
    }

    /// Turns ratio mode off: only consecutive failures open the breaker.
    #[must_use]
    pub fn without_failure_ratio(mut self) -> Self {
        self.failure_ratio = 0.0;
        self
    }

    /// Sets the base cooldown.
    #[must_use]
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Sets the jitter (0 for an exact cooldown).
    #[must_use]
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Sets how often rejections may be logged.
    #[must_use]
    pub fn with_log_interval(mut self, interval: Duration) -> Self {
        self.log_interval = interval;
        self
    }

    /// Checks the values a typo can make meaningless; the error names the bad one.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.failure_ratio) {
            let r = self.failure_ratio;
            return Err(Error::Config(format!(
                "breaker failure ratio must be in 0..=1, got {r}"
            )));
        }
        if self.failure_ratio > 0.0 && self.window.is_zero() {
            return Err(Error::Config("breaker window must be positive".into()));
        }
        if !(self.jitter.is_finite() && self.jitter >= 0.0) {
            let j = self.jitter;
            return Err(Error::Config(format!(
                "breaker jitter must be >= 0, got {j}"
            )));
        }
        Ok(())
    }

    /// A cooldown with its jitter applied; never below `cooldown`, never overflowing.
    fn jittered_cooldown(&self) -> Duration {
        let j = if self.jitter.is_finite() {
            self.jitter.max(0.0)
        } else {
            0.0
        };
        let secs = self.cooldown.as_secs_f64() * (1.0 + rand::random::<f64>() * j);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(Duration::MAX)
            .max(self.cooldown)
    }

    fn disabled(&self) -> bool {
        self.failure_threshold == 0
    }
}

/// The call was not made: the breaker is open (or its one probe is in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open, retry in {retry_in:?}")]
pub struct Rejected {
    /// When to try again: the rest of the cooldown, or the base cooldown while a probe is in
    /// flight (if it fails, no new probe is possible sooner).
    pub retry_in: Duration,
}

/// What [`Breaker::call`] returns on failure.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker did not let the call through; nothing was sent.
    #[error(transparent)]
    Rejected(#[from] Rejected),
    /// The call was made and failed.
    #[error(transparent)]
    Inner(E),
}

/// A guard shared by clones: every clone sees and moves the same state.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

type Observer = Arc<dyn Fn(BreakerState, BreakerState) + Send + Sync>;

struct Shared {
    name: &'static str,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

struct Inner {
    state: BreakerState,
    consecutive: u32,
    window: Window,
    /// When an open breaker admits a probe.
    open_until: Instant,
    /// Also the epoch of permits: a permit issued before the latest transition is stale.
    transitions: u64,
    last_reject_log: Option<Instant>,
    rejected_since_log: u64,
    observers: Vec<Observer>,
    /// Transitions not yet logged and observed, in order; one caller at a time delivers them.
    pending: VecDeque<Transition>,
    notifying: bool,
}

#[derive(Debug)]
struct Transition {
    from: BreakerState,
    to: BreakerState,
    why: String,
    retry_in: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure,
    Dropped,
}

impl Breaker {
    /// A closed breaker; `name` appears in its log lines.
    pub fn new(name: &'static str, config: BreakerConfig) -> Self {
        let now = Instant::now();
        let inner = Inner {
            state: BreakerState::Closed,
            consecutive: 0,
            window: Window::new(now, config.window),
            open_until: now,
            transitions: 0,
            last_reject_log: None,
            rejected_since_log: 0,
            observers: Vec::new(),
            pending: VecDeque::new(),
            notifying: false,
        };
        let inner = Mutex::new(inner);
        Breaker {
            shared: Arc::new(Shared {
                name,
                config,
                inner,
            }),
        }
    }

    /// The name given to [`Breaker::new`].
    pub fn name(&self) -> &'static str {
        self.shared.name
    }

    /// The current state. An open breaker whose cooldown has elapsed still reports `Open` until a
    /// caller is admitted as the probe.
    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// How many transitions the breaker has made since it was created.
    pub fn transitions(&self) -> u64 {
        self.lock().transitions
    }

    /// Calls `f(from, to)` after every later transition, in order, outside the breaker's lock (so
    /// `f` may call the breaker). A panic in `f` is caught and logged.
    pub fn on_transition(&self, f: impl Fn(BreakerState, BreakerState) + Send + Sync + 'static) {
        self.lock().observers.push(Arc::new(f));
    }

    /// Asks to make one call. Closed: a permit. Open: rejected until the cooldown has elapsed,
    /// then exactly one caller gets the probe permit (HalfOpen) and the others are rejected until
    /// it reports. Report the outcome on the permit.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let config = &self.shared.config;
        let now = Instant::now();
        let mut inner = self.lock();
        let (probe, retry_in) = match inner.state {
            _ if config.disabled() => (false, None),
            BreakerState::Closed => (false, None),
            BreakerState::Open if now >= inner.open_until => {
                inner.transition(
                    config,
                    BreakerState::HalfOpen,
                    "cooldown elapsed".into(),
                    now,
                );
                (true, None)
            }
            BreakerState::Open => (false, Some(inner.open_until.saturating_duration_since(now))),
            BreakerState::HalfOpen => (false, Some(config.cooldown)),
        };
        let epoch = inner.transitions;
        let mut log = None;
        if retry_in.is_some() {
            inner.rejected_since_log += 1;
            if inner
                .last_reject_log
                .is_none_or(|t| now - t >= config.log_interval)
            {
                inner.last_reject_log = Some(now);
                log = Some(std::mem::take(&mut inner.rejected_since_log));
            }
        }
        drop(inner);
        self.notify();
        if let Some(retry_in) = retry_in {
            if let Some(rejected) = log {
                let name = self.shared.name;
                tracing::warn!(
                    breaker = name,
                    rejected,
                    ?retry_in,
                    "circuit breaker open, rejecting calls to Redis"
                );
            }
            return Err(Rejected { retry_in });
        }
        let breaker = self.clone();
        Ok(Permit {
            breaker,
            epoch,
            probe,
            reported: false,
        })
    }

    /// Runs `f` through the breaker: rejected without calling `f` when open, otherwise its outcome
    /// is recorded. Only errors for which `is_failure` is true count as failures; others (say
    /// `WRONGTYPE`: the caller's problem, not Redis being down) count as successes. Put timeouts
    /// inside `f`, so that they are reported as failures rather than dropped.
    pub async fn call<T, E, F, Fut>(
        &self,
        is_failure: impl Fn(&E) -> bool,
        f: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.try_acquire()?;
        let result = f().await;
        match &result {
            Err(e) if is_failure(e) => permit.failure(),
            _ => permit.success(),
        }
        result.map_err(CallError::Inner)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while the lock is held (observers run outside it), so a poisoned lock
        // still guards a consistent state.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records what a permit of `epoch` reports; stale permits (issued before the latest
    /// transition) are ignored, so a slow call from before the breaker opened cannot close it.
    fn record(&self, epoch: u64, probe: bool, outcome: Outcome) {
        let config = &self.shared.config;
        if config.disabled() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if inner.transitions != epoch {
            return;
        }
        match (probe, outcome) {
            (true, Outcome::Success) => {
                inner.transition(config, BreakerState::Closed, "probe succeeded".into(), now)
            }
            (true, Outcome::Failure) => {
                inner.transition(config, BreakerState::Open, "probe failed".into(), now)
            }
            (true, Outcome::Dropped) => inner.transition(
                config,
                BreakerState::Open,
                "probe dropped without an outcome".into(),
                now,
            ),
            (false, Outcome::Dropped) => {}
            (false, Outcome::Success) => {
                inner.consecutive = 0;
                inner.window.record(now, false);
            }
            (false, Outcome::Failure) => {
                inner.consecutive = inner.consecutive.saturating_add(1);
                inner.window.record(now, true);
                let (calls, failures) = inner.window.totals(now);
                let why = if inner.consecutive >= config.failure_threshold {
                    Some(format!("{} consecutive failures", inner.consecutive))
                } else if config.failure_ratio > 0.0
                    && calls >= config.min_calls.max(1)
                    && f64::from(failures) >= config.failure_ratio * f64::from(calls)
                {
                    Some(format!("{failures} of {calls} calls failed"))
                } else {
                    None
                };
                if let Some(why) = why {
                    inner.transition(config, BreakerState::Open, why, now);
                }
            }
        }
        drop(inner);
        self.notify();
    }

    /// Logs and observes the pending transitions in order, outside the lock. If another caller is
    /// already doing so, it delivers ours too.
    fn notify(&self) {
        let mut inner = self.lock();
        if inner.notifying {
            return;
        }
        inner.notifying = true;
        while let Some(t) = inner.pending.pop_front() {
            let observers = inner.observers.clone();
            drop(inner);
            log_transition(self.shared.name, &t);
            for observer in &observers {
                if catch_unwind(AssertUnwindSafe(|| observer(t.from, t.to))).is_err() {
                    tracing::error!(breaker = self.shared.name, "breaker observer panicked");
                }
            }
            inner = self.lock();
        }
        inner.notifying = false;
    }
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("Breaker")
            .field("name", &self.shared.name)
            .field("state", &state)
            .finish()
    }
}

impl Inner {
    fn transition(&mut self, config: &BreakerConfig, to: BreakerState, why: String, now: Instant) {
        let from = self.state;
        self.state = to;
        self.transitions += 1;
        self.consecutive = 0;
        self.window.clear();
        let mut retry_in = None;
        if to == BreakerState::Open {
            let cooldown = config.jittered_cooldown();
            // Far enough for "never" when the cooldown is absurdly long.
            let never = now + Duration::from_secs(100 * 365 * 86_400);
            self.open_until = now.checked_add(cooldown).unwrap_or(never).min(never);
            retry_in = Some(self.open_until - now);
            if from == BreakerState::Closed {
                // The transition line is this interval's line.
                self.last_reject_log = Some(now);
                self.rejected_since_log = 0;
            }
        }
        self.pending.push_back(Transition {
            from,
            to,
            why,
            retry_in,
        });
    }
}

fn log_transition(name: &'static str, t: &Transition) {
    let (from, reason) = (t.from.as_str(), &t.why);
    match t.to {
        BreakerState::Open => {
            let retry_in = t.retry_in.unwrap_or_default();
            tracing::warn!(breaker = name, from, %reason, ?retry_in, "circuit breaker opened")
        }
        BreakerState::HalfOpen => {
            tracing::info!(breaker = name, from, %reason, "circuit breaker half-open")
        }
        BreakerState::Closed => {
            tracing::info!(breaker = name, from, %reason, "circuit breaker closed")
        }
    }
}

/// Leave to make one call; report how it went with [`Permit::success`] or [`Permit::failure`].
///
/// Dropped without a report (the call was cancelled): an ordinary permit counts for nothing,
/// since a cancellation says nothing about Redis; a probe permit reopens the breaker for a fresh
/// cooldown, so a cancelled probe neither wedges it half-open nor lets callers through early.
#[derive(Debug)]
#[must_use = "report the outcome with success() or failure()"]
pub struct Permit {
    breaker: Breaker,
    epoch: u64,
    probe: bool,
    reported: bool,
}

impl Permit {
    /// The call succeeded (or failed in a way that does not indict Redis).
    pub fn success(mut self) {
        self.report(Outcome::Success);
    }

    /// The call failed in a way that suggests Redis is unavailable.
    pub fn failure(mut self) {
        self.report(Outcome::Failure);
    }

    /// Whether this is the half-open probe, whose outcome decides the breaker's state.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    fn report(&mut self, outcome: Outcome) {
        self.reported = true;
        self.breaker.record(self.epoch, self.probe, outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.reported {
            self.report(Outcome::Dropped);
        }
    }
}

const BUCKETS: u64 = 10;

/// Calls and failures of the last `window`, in `BUCKETS` buckets of `window / BUCKETS`.
struct Window {
    start: Instant,
    bucket_nanos: u128,
    buckets: [Bucket; BUCKETS as usize],
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

impl Window {
    fn new(start: Instant, window: Duration) -> Self {
        let bucket_nanos = (window.as_nanos() / u128::from(BUCKETS)).max(1);
        Window {
            start,
            bucket_nanos,
            buckets: [Bucket::default(); BUCKETS as usize],
        }
    }

    fn index(&self, now: Instant) -> u64 {
        let i = now.saturating_duration_since(self.start).as_nanos() / self.bucket_nanos;
        u64::try_from(i).unwrap_or(u64::MAX)
    }

    fn record(&mut self, now: Instant, failed: bool) {
        let index = self.index(now);
        let bucket = &mut self.buckets[(index % BUCKETS) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        bucket.failures = bucket.failures.saturating_add(u32::from(failed));
    }

    /// `(calls, failures)` in the window.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let index = self.index(now);
        let live = self
            .buckets
            .iter()
            .filter(|b| b.index.saturating_add(BUCKETS) > index);
        live.fold((0, 0), |(c, f), b| {
            (c.saturating_add(b.calls), f.saturating_add(b.failures))
        })
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS as usize];
    }
}

/// Runs `op` under `breaker`: rejected at once with [`Error::BreakerOpen`] while the breaker is
/// open; otherwise its outcome is recorded (only transient errors count as failures: a
/// `WRONGTYPE` says nothing about Redis being down).
pub async fn guard<T>(breaker: &Breaker, op: impl Future<Output = Result<T>>) -> Result<T> {
    let permit = breaker
        .try_acquire()
        .map_err(|r| Error::BreakerOpen(r.retry_in))?;
    crate::worker::watchdog::mark();
    let result = op.await;
    crate::worker::watchdog::mark();
    match &result {
        Err(e) if e.is_transient() => {
            crate::metrics::redis_error(e);
            permit.failure()
        }
        Err(e) => {
            crate::metrics::redis_error(e);
            permit.success()
        }
        Ok(_) => permit.success(),
    }
    result
}

#[cfg(test)]
mod tests;
