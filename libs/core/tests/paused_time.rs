//! The supervision decisions driven by a real async loop on tokio's paused clock: restart
//! delays are actually slept, the clock only moves when every task waits, and the test runs in
//! microseconds of real time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use llorch_contracts::PoolState;
use llorch_core::{FailureAction, Supervision, SupervisionPolicy};
use tokio::time::Instant;

/// An engine that fails `fail_for` after every start, supervised until the circuit opens or
/// `budget` of virtual time has passed. Returns (restarts, final state, elapsed virtual time).
async fn supervise(fail_after: Duration, budget: Duration) -> (u32, PoolState, Duration) {
    let start = Instant::now();
    let mut s = Supervision::new(SupervisionPolicy::default());
    loop {
        s.on_spawned();
        s.on_ready(Instant::now().into_std());
        tokio::time::sleep(fail_after).await;
        match s.on_failure(
            Instant::now().into_std(),
            "engine exited with status 1".into(),
            1.0,
        ) {
            FailureAction::RestartAfter(d) => tokio::time::sleep(d).await,
            FailureAction::GiveUp | FailureAction::Stop => break,
        }
        if start.elapsed() > budget {
            break;
        }
    }
    (s.restart_count(), s.state(), start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn fast_crash_loop_opens_the_circuit_after_four_restarts_with_doubling_delays() {
    let (restarts, state, elapsed) =
        supervise(Duration::from_millis(100), Duration::from_secs(3600)).await;
    assert_eq!(state, PoolState::Failed);
    assert_eq!(restarts, 4);
    // 5 runs of 100 ms plus delays 1 + 2 + 4 + 8 s (jitter 1.0 = the full ceiling).
    assert_eq!(
        elapsed,
        Duration::from_millis(500) + Duration::from_secs(15)
    );
}

#[tokio::test(start_paused = true)]
async fn engine_that_crashes_every_ten_minutes_is_restarted_forever() {
    // Failures 10 minutes apart never put 5 inside a 5-minute window.
    let (restarts, state, elapsed) =
        supervise(Duration::from_secs(600), Duration::from_secs(6 * 3600)).await;
    assert_ne!(state, PoolState::Failed);
    assert!(restarts >= 30, "{restarts}");
    assert!(elapsed >= Duration::from_secs(6 * 3600));
}

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_a_healthy_period() {
    let mut s = Supervision::new(SupervisionPolicy::default());
    s.on_spawned();
    s.on_ready(Instant::now().into_std());
    let first = s.on_failure(Instant::now().into_std(), "x".into(), 1.0);
    assert_eq!(first, FailureAction::RestartAfter(Duration::from_secs(1)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.on_spawned();
    s.on_ready(Instant::now().into_std());
    let second = s.on_failure(Instant::now().into_std(), "x".into(), 1.0);
    assert_eq!(second, FailureAction::RestartAfter(Duration::from_secs(2)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.on_spawned();
    s.on_ready(Instant::now().into_std());
    // Healthy for a minute, probed: the next failure starts the backoff over.
    tokio::time::sleep(Duration::from_secs(61)).await;
    s.on_probe_ok(Instant::now().into_std());
    let third = s.on_failure(Instant::now().into_std(), "x".into(), 1.0);
    assert_eq!(third, FailureAction::RestartAfter(Duration::from_secs(1)));
}
