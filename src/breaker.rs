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
    let result = op.await;
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
mod tests {
    use super::*;

    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::time::advance;

    const COOLDOWN: Duration = Duration::from_secs(5);

    /// Three consecutive failures, no ratio mode, an exact 5 s cooldown.
    fn config() -> BreakerConfig {
        BreakerConfig::default()
            .with_failure_threshold(3)
            .without_failure_ratio()
            .with_cooldown(COOLDOWN)
            .with_jitter(0.0)
    }

    fn fail(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("closed breaker admits").failure();
        }
    }

    fn succeed(b: &Breaker, n: u32) {
        for _ in 0..n {
            b.try_acquire().expect("closed breaker admits").success();
        }
    }

    fn retry_in(b: &Breaker) -> Duration {
        b.try_acquire().expect_err("breaker should reject").retry_in
    }

    /// Records every transition the observer sees.
    fn observe(b: &Breaker) -> Arc<Mutex<Vec<(BreakerState, BreakerState)>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        b.on_transition(move |from, to| s.lock().unwrap().push((from, to)));
        seen
    }

    /// Opens `b` (built from `config()`), then waits out the cooldown.
    async fn open_and_wait(b: &Breaker) {
        fail(b, 3);
        assert_eq!(b.state(), BreakerState::Open);
        advance(COOLDOWN).await;
    }

    use BreakerState::{Closed, HalfOpen, Open};

    #[test]
    fn state_names_and_gauge_values() {
        assert_eq!(
            [Closed.as_str(), Open.as_str(), HalfOpen.as_str()],
            ["closed", "open", "half_open"]
        );
        assert_eq!(
            [Closed.as_gauge(), Open.as_gauge(), HalfOpen.as_gauge()],
            [0.0, 1.0, 2.0]
        );
    }

    #[test]
    fn config_defaults_builders_and_validation() {
        let d = BreakerConfig::default();
        assert_eq!(
            (d.failure_threshold, d.failure_ratio, d.min_calls),
            (5, 0.5, 20)
        );
        assert_eq!(
            (d.window, d.cooldown, d.log_interval),
            (Duration::from_secs(10), COOLDOWN, Duration::from_secs(10))
        );
        assert_eq!(d.jitter, 0.2);
        assert!(d.validate().is_ok());
        let c = d
            .with_failure_ratio(0.3, Duration::from_secs(2), 7)
            .with_log_interval(Duration::from_secs(1));
        assert_eq!(
            (c.failure_ratio, c.window, c.min_calls),
            (0.3, Duration::from_secs(2), 7)
        );
        assert_eq!(c.log_interval, Duration::from_secs(1));
        let bad = c
            .clone()
            .with_failure_ratio(1.5, Duration::from_secs(1), 1)
            .validate();
        assert!(bad.unwrap_err().to_string().contains("1.5"));
        assert!(c
            .clone()
            .with_failure_ratio(f64::NAN, Duration::from_secs(1), 1)
            .validate()
            .is_err());
        assert!(c
            .clone()
            .with_failure_ratio(0.5, Duration::ZERO, 1)
            .validate()
            .is_err());
        assert!(c
            .clone()
            .with_jitter(-0.1)
            .validate()
            .unwrap_err()
            .to_string()
            .contains("-0.1"));
        assert!(c.with_jitter(f64::INFINITY).validate().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_consecutive_failures_and_not_before() {
        let b = Breaker::new("redis", config());
        fail(&b, 2);
        assert_eq!(b.state(), Closed);
        assert!(
            b.try_acquire().is_ok_and(|p| !p.is_probe()),
            "still closed after 2 of 3"
        );
        fail(&b, 1);
        assert_eq!(b.state(), Open);
        assert_eq!(b.transitions(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = Breaker::new("redis", config());
        for _ in 0..10 {
            fail(&b, 2);
            succeed(&b, 1);
        }
        assert_eq!(b.state(), Closed, "never 3 in a row");
        fail(&b, 3);
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_opens_at_the_ratio_only_after_min_calls() {
        let ratio = config().with_failure_threshold(100).with_failure_ratio(
            0.5,
            Duration::from_secs(10),
            20,
        );
        // Under min_calls nothing opens, even at 100 % failures.
        let b = Breaker::new("redis", ratio.clone());
        fail(&b, 19);
        assert_eq!(b.state(), Closed);
        fail(&b, 1);
        assert_eq!(b.state(), Open, "20 of 20 failed");
        // Over min_calls it opens exactly when failures reach half: 14 successes need 14 failures.
        let b = Breaker::new("redis", ratio);
        succeed(&b, 14);
        fail(&b, 13);
        assert_eq!(b.state(), Closed, "13 of 27 is under half");
        fail(&b, 1);
        assert_eq!(b.state(), Open, "14 of 28 is half");
    }

    #[tokio::test(start_paused = true)]
    async fn old_calls_leave_the_ratio_window() {
        let ratio = config().with_failure_threshold(100).with_failure_ratio(
            0.5,
            Duration::from_secs(10),
            20,
        );
        let b = Breaker::new("redis", ratio);
        fail(&b, 10);
        advance(Duration::from_secs(10)).await;
        fail(&b, 10);
        assert_eq!(
            b.state(),
            Closed,
            "the first 10 failures have left the window: 10 calls < 20"
        );
        succeed(&b, 10);
        fail(&b, 1);
        assert_eq!(b.state(), Open, "11 of 21 in the window");
    }

    #[tokio::test(start_paused = true)]
    async fn rejects_while_open_with_the_rest_of_the_cooldown() {
        let b = Breaker::new("redis", config());
        fail(&b, 3);
        assert_eq!(retry_in(&b), COOLDOWN);
        advance(Duration::from_secs(2)).await;
        let err = b.try_acquire().unwrap_err();
        assert_eq!(err.retry_in, Duration::from_secs(3));
        assert_eq!(err.to_string(), "circuit breaker open, retry in 3s");
        advance(Duration::from_millis(2999)).await;
        assert_eq!(retry_in(&b), Duration::from_millis(1));
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_cooldown_exactly_one_probe_is_admitted() {
        let b = Breaker::new("redis", config());
        open_and_wait(&b).await;
        assert_eq!(b.state(), Open, "open until a probe is admitted");
        let probe = b.try_acquire().expect("the first caller probes");
        assert!(probe.is_probe());
        assert_eq!(b.state(), HalfOpen);
        let others = b.clone();
        for _ in 0..5 {
            assert_eq!(
                retry_in(&others),
                COOLDOWN,
                "rejected while the probe is in flight"
            );
        }
        probe.success();
        assert_eq!(b.state(), Closed);
        assert!(b.try_acquire().is_ok_and(|p| !p.is_probe()));
    }

    #[tokio::test(start_paused = true)]
    async fn probe_success_closes_with_a_fresh_count() {
        let b = Breaker::new("redis", config());
        open_and_wait(&b).await;
        b.try_acquire().unwrap().success();
        assert_eq!(b.state(), Closed);
        fail(&b, 2);
        assert_eq!(b.state(), Closed, "failures before opening were forgotten");
        fail(&b, 1);
        assert_eq!(b.state(), Open);
    }

    #[tokio::test(start_paused = true)]
    async fn probe_failure_reopens_for_a_new_cooldown() {
        let b = Breaker::new("redis", config());
        open_and_wait(&b).await;
        advance(Duration::from_secs(7)).await;
        b.try_acquire().unwrap().failure();
        assert_eq!(b.state(), Open);
        assert_eq!(retry_in(&b), COOLDOWN, "counted from the failed probe");
        advance(COOLDOWN - Duration::from_millis(1)).await;
        assert!(b.try_acquire().is_err());
        advance(Duration::from_millis(1)).await;
        assert!(b.try_acquire().unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_keeps_the_cooldown_within_bounds() {
        let max = COOLDOWN.mul_f64(1.5);
        let mut seen = Vec::new();
        for _ in 0..200 {
            let b = Breaker::new("redis", config().with_jitter(0.5));
            fail(&b, 3);
            let wait = retry_in(&b);
            assert!((COOLDOWN..=max).contains(&wait), "{wait:?}");
            // The breaker really waits that long, no more.
            advance(wait - Duration::from_nanos(1)).await;
            assert!(b.try_acquire().is_err());
            advance(Duration::from_nanos(1)).await;
            assert!(b.try_acquire().unwrap().is_probe());
            seen.push(wait);
        }
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        assert!(
            *hi - *lo > Duration::from_secs(1),
            "jitter spreads cooldowns: {lo:?}..{hi:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn threshold_zero_disables_the_breaker() {
        let b = Breaker::new(
            "redis",
            config()
                .with_failure_threshold(0)
                .with_failure_ratio(0.1, Duration::from_secs(10), 1),
        );
        fail(&b, 1000);
        assert_eq!(b.state(), Closed);
        assert_eq!(b.transitions(), 0);
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_reopens_instead_of_wedging() {
        let b = Breaker::new("redis", config());
        open_and_wait(&b).await;
        // A probe cancelled mid-call, as by a `select!` or a timeout around `call`.
        let cancelled = b.call(
            |_: &io::Error| true,
            std::future::pending::<Result<(), io::Error>>,
        );
        assert!(tokio::time::timeout(Duration::from_secs(1), cancelled)
            .await
            .is_err());
        assert_eq!(b.state(), Open);
        assert_eq!(retry_in(&b), COOLDOWN, "a fresh cooldown from the drop");
        advance(COOLDOWN).await;
        b.try_acquire().expect("a new probe is admitted").success();
        assert_eq!(b.state(), Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_ordinary_permits_count_for_nothing() {
        let b = Breaker::new("redis", config());
        fail(&b, 2);
        for _ in 0..10 {
            drop(b.try_acquire().unwrap());
        }
        assert_eq!(b.state(), Closed);
        fail(&b, 1);
        assert_eq!(
            b.state(),
            Open,
            "the drops neither failed nor reset the count"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stale_permits_do_not_move_the_breaker() {
        let b = Breaker::new("redis", config());
        let slow = b.try_acquire().unwrap();
        fail(&b, 3);
        slow.success();
        assert_eq!(
            b.state(),
            Open,
            "a call from before the opening cannot close it"
        );
        advance(COOLDOWN).await;
        let probe = b.try_acquire().unwrap();
        let slow = b.clone();
        probe.success();
        let late = slow.try_acquire().unwrap();
        fail(&b, 2);
        assert_eq!(b.state(), Closed);
        late.failure();
        assert_eq!(b.state(), Open, "a current permit still counts");
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_and_observers_see_the_exact_sequence() {
        let b = Breaker::new("redis", config());
        let seen = observe(&b);
        // An observer that reads the breaker must not deadlock.
        let reader = b.clone();
        let states = Arc::new(Mutex::new(Vec::new()));
        let s = states.clone();
        b.on_transition(move |_, _| s.lock().unwrap().push(reader.state()));
        open_and_wait(&b).await;
        b.try_acquire().unwrap().failure();
        advance(COOLDOWN).await;
        drop(b.try_acquire().unwrap());
        advance(COOLDOWN).await;
        b.try_acquire().unwrap().success();
        let expected = vec![
            (Closed, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Open),
            (Open, HalfOpen),
            (HalfOpen, Closed),
        ];
        assert_eq!(*seen.lock().unwrap(), expected);
        assert_eq!(b.transitions(), 7);
        let tos: Vec<_> = expected.iter().map(|t| t.1).collect();
        assert_eq!(*states.lock().unwrap(), tos);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_observer_does_not_stop_the_others() {
        let b = Breaker::new("redis", config());
        b.on_transition(|_, _| panic!("observer bug"));
        let seen = observe(&b);
        open_and_wait(&b).await;
        b.try_acquire().unwrap().success();
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn call_counts_only_errors_that_indict_redis() {
        let b = Breaker::new("redis", config());
        let wrongtype = || async { Err::<(), _>(io::Error::other("WRONGTYPE")) };
        let is_failure = |e: &io::Error| e.kind() != io::ErrorKind::Other;
        for _ in 0..10 {
            let r = b.call(is_failure, wrongtype).await;
            assert!(matches!(r, Err(CallError::Inner(ref e)) if e.to_string() == "WRONGTYPE"));
        }
        assert_eq!(b.state(), Closed);
        assert_eq!(
            b.call(is_failure, || async { Ok::<_, io::Error>(7) })
                .await
                .unwrap(),
            7
        );
        let runs = AtomicU32::new(0);
        let down = || async {
            runs.fetch_add(1, Ordering::Relaxed);
            Err::<(), _>(io::Error::from(io::ErrorKind::ConnectionRefused))
        };
        for _ in 0..5 {
            let _ = b.call(is_failure, down).await;
        }
        assert_eq!(b.state(), Open);
        assert_eq!(runs.load(Ordering::Relaxed), 3, "nothing is sent once open");
        let r = b.call(is_failure, down).await;
        assert!(
            matches!(r, Err(CallError::Rejected(Rejected { retry_in })) if retry_in == COOLDOWN)
        );
    }
}
