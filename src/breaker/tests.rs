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
    let ratio =
        config()
            .with_failure_threshold(100)
            .with_failure_ratio(0.5, Duration::from_secs(10), 20);
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
    let ratio =
        config()
            .with_failure_threshold(100)
            .with_failure_ratio(0.5, Duration::from_secs(10), 20);
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
    assert!(matches!(r, Err(CallError::Rejected(Rejected { retry_in })) if retry_in == COOLDOWN));
}
