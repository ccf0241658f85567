//! Supervision state machine of one managed pool (DESIGN §4).
//!
//! ```text
//!            spawned            healthy
//!  (new) ──► starting ───────────────────► ready ──drain──► draining ──► stopped
//!               ▲  │ exit/timeout           │ exit / hung
//!               │  ▼                        ▼
//!           restarting ◄──── failure (breaker closed)
//!                          failure (breaker open) ──► failed ──open period──► starting (trial)
//! ```
//!
//! The circuit half-opens: after its open period one trial start is made; a trial that becomes
//! ready closes the circuit, a failed one opens it again. Each opening lasts twice as long as
//! the one before (up to a ceiling) until the pool stays healthy for `healthy_reset_after`, so a
//! flapping engine is retried ever more rarely.
//!
//! Decisions only: the IO adapter spawns, probes and kills, and feeds what it saw back in.

use std::time::{Duration, Instant};

use llorch_contracts::PoolState;

use crate::{Backoff, CircuitBreaker};

#[derive(Debug, Clone)]
pub struct SupervisionPolicy {
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Failures inside `breaker_window` that open the circuit (state `failed`).
    pub breaker_failures: usize,
    pub breaker_window: Duration,
    /// A pool healthy this long has its backoff reset.
    pub healthy_reset_after: Duration,
    /// Consecutive failed health probes after which a running engine counts as hung.
    pub max_probe_failures: u32,
    /// How long an open circuit waits before its trial start; doubled after a failed trial.
    pub breaker_open_for: Duration,
    pub breaker_open_max: Duration,
}

impl Default for SupervisionPolicy {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            breaker_failures: 5,
            breaker_window: Duration::from_secs(300),
            healthy_reset_after: Duration::from_secs(60),
            max_probe_failures: 3,
            breaker_open_for: Duration::from_secs(300),
            breaker_open_max: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureAction {
    /// Restart the engine after this delay.
    RestartAfter(Duration),
    /// The circuit is open: stay `failed` for this long (or until an operator reloads), then
    /// make one trial start (`on_trial`).
    GiveUp { trial_after: Duration },
    /// The pool is being drained or stopped; a failure just ends it.
    Stop,
}

#[derive(Debug, Clone)]
pub struct Supervision {
    policy: SupervisionPolicy,
    state: PoolState,
    backoff: Backoff,
    breaker: CircuitBreaker,
    restart_count: u32,
    last_error: Option<String>,
    ready_since: Option<Instant>,
    probe_failures: u32,
    /// The current start is a half-open circuit's trial.
    trial: bool,
    /// The open period of the circuit's next opening.
    open_for: Duration,
}

impl Supervision {
    pub fn new(policy: SupervisionPolicy) -> Self {
        Self {
            backoff: Backoff::new(policy.backoff_base, policy.backoff_max),
            breaker: CircuitBreaker::new(policy.breaker_failures, policy.breaker_window),
            open_for: policy.breaker_open_for,
            policy,
            state: PoolState::Starting,
            restart_count: 0,
            last_error: None,
            ready_since: None,
            probe_failures: 0,
            trial: false,
        }
    }

    pub fn state(&self) -> PoolState {
        self.state
    }

    pub fn restart_count(&self) -> u32 {
        self.restart_count
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// An engine process was spawned (first start or restart).
    pub fn on_spawned(&mut self) {
        if matches!(self.state, PoolState::Restarting | PoolState::Starting) {
            self.state = PoolState::Starting;
        }
        self.probe_failures = 0;
    }

    /// The engine answered its readiness check.
    pub fn on_ready(&mut self, now: Instant) {
        if self.state == PoolState::Starting {
            self.state = PoolState::Ready;
            self.ready_since = Some(now);
            self.probe_failures = 0;
            if self.trial {
                // The trial worked: the circuit closes (the next opening stays long until a
                // healthy period proves the fix).
                self.trial = false;
                self.breaker.reset();
                self.backoff.reset();
            }
        }
    }

    /// The open period passed: one trial start (state `starting`).
    pub fn on_trial(&mut self) {
        if self.state == PoolState::Failed {
            self.state = PoolState::Starting;
            self.trial = true;
            self.probe_failures = 0;
        }
    }

    /// A periodic health probe succeeded. After a healthy period the backoff starts over.
    pub fn on_probe_ok(&mut self, now: Instant) {
        self.probe_failures = 0;
        if let Some(since) = self.ready_since {
            if now.saturating_duration_since(since) >= self.policy.healthy_reset_after {
                self.backoff.reset();
                self.open_for = self.policy.breaker_open_for;
            }
        }
    }

    /// A periodic health probe failed. Returns true when the engine must be treated as hung
    /// (killed and counted as a failure).
    pub fn on_probe_failed(&mut self) -> bool {
        self.probe_failures = self.probe_failures.saturating_add(1);
        self.probe_failures >= self.policy.max_probe_failures
    }

    /// The engine exited, failed to become ready, or was killed as hung. `jitter` in `[0, 1)`.
    pub fn on_failure(&mut self, now: Instant, error: String, jitter: f64) -> FailureAction {
        self.last_error = Some(error);
        self.ready_since = None;
        if matches!(self.state, PoolState::Draining | PoolState::Stopped) {
            self.state = PoolState::Stopped;
            return FailureAction::Stop;
        }
        // A failed trial opens the circuit again at once.
        let was_trial = std::mem::take(&mut self.trial);
        if was_trial || self.breaker.record_failure(now) {
            self.state = PoolState::Failed;
            let trial_after = self.open_for;
            self.open_for = (self.open_for * 2).min(self.policy.breaker_open_max);
            return FailureAction::GiveUp { trial_after };
        }
        self.state = PoolState::Restarting;
        self.restart_count = self.restart_count.saturating_add(1);
        FailureAction::RestartAfter(self.backoff.next_delay(jitter))
    }

    pub fn on_drain(&mut self) {
        if self.state != PoolState::Stopped {
            self.state = PoolState::Draining;
        }
    }

    pub fn on_stopped(&mut self) {
        self.state = PoolState::Stopped;
        self.ready_since = None;
    }

    /// An operator asked for a (re)load: the circuit closes and the pool starts again.
    pub fn on_reload(&mut self) {
        self.breaker.reset();
        self.backoff.reset();
        self.trial = false;
        self.open_for = self.policy.breaker_open_for;
        self.state = PoolState::Starting;
        self.probe_failures = 0;
    }

    /// Records an error that did not change the state (a failed reload that rolled back).
    pub fn note_error(&mut self, error: String) {
        self.last_error = Some(error);
    }

    pub fn failures_in_window(&mut self, now: Instant) -> usize {
        self.breaker.failures_in_window(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> SupervisionPolicy {
        SupervisionPolicy::default()
    }

    #[test]
    fn start_ready_crash_restart_ready() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        s.on_spawned();
        assert_eq!(s.state(), PoolState::Starting);
        s.on_ready(t0);
        assert_eq!(s.state(), PoolState::Ready);
        let action = s.on_failure(t0 + Duration::from_secs(5), "exit 137".into(), 0.0);
        assert_eq!(
            action,
            FailureAction::RestartAfter(Duration::from_millis(500))
        );
        assert_eq!(s.state(), PoolState::Restarting);
        assert_eq!(s.restart_count(), 1);
        assert_eq!(s.last_error(), Some("exit 137"));
        s.on_spawned();
        s.on_ready(t0 + Duration::from_secs(7));
        assert_eq!(s.state(), PoolState::Ready);
    }

    // covers: POOL-3107
    #[test]
    fn always_crashing_engine_ends_failed_after_five_failures() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        let mut t = t0;
        let mut restarts = 0;
        loop {
            s.on_spawned();
            match s.on_failure(t, "exited with status 1".into(), 0.5) {
                FailureAction::RestartAfter(d) => {
                    restarts += 1;
                    t += d;
                }
                FailureAction::GiveUp { trial_after } => {
                    assert_eq!(trial_after, Duration::from_secs(300));
                    break;
                }
                FailureAction::Stop => unreachable!(),
            }
        }
        assert_eq!(s.state(), PoolState::Failed);
        assert_eq!(restarts, 4);
        assert_eq!(s.last_error(), Some("exited with status 1"));
    }

    // covers: POOL-3106
    #[test]
    fn healthy_period_resets_backoff() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        s.on_spawned();
        for i in 0..3 {
            s.on_failure(t0 + Duration::from_secs(i), "x".into(), 0.0);
            s.on_spawned();
        }
        s.on_ready(t0 + Duration::from_secs(10));
        s.on_probe_ok(t0 + Duration::from_secs(100));
        // breaker window still holds 3 failures; the 4th is allowed and backoff starts at 1 s.
        let a = s.on_failure(t0 + Duration::from_secs(101), "x".into(), 1.0);
        assert_eq!(a, FailureAction::RestartAfter(Duration::from_secs(1)));
    }

    // covers: POOL-3108
    #[test]
    fn hung_after_consecutive_probe_failures_only() {
        let mut s = Supervision::new(policy());
        s.on_spawned();
        s.on_ready(Instant::now());
        assert!(!s.on_probe_failed());
        assert!(!s.on_probe_failed());
        s.on_probe_ok(Instant::now());
        assert!(!s.on_probe_failed());
        assert!(!s.on_probe_failed());
        assert!(s.on_probe_failed());
    }

    #[test]
    fn failure_while_draining_stops_instead_of_restarting() {
        let mut s = Supervision::new(policy());
        s.on_spawned();
        s.on_ready(Instant::now());
        s.on_drain();
        assert_eq!(s.state(), PoolState::Draining);
        assert_eq!(
            s.on_failure(Instant::now(), "gone".into(), 0.0),
            FailureAction::Stop
        );
        assert_eq!(s.state(), PoolState::Stopped);
    }

    #[test]
    fn reload_closes_the_circuit() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        for _ in 0..5 {
            s.on_failure(t0, "x".into(), 0.0);
        }
        assert_eq!(s.state(), PoolState::Failed);
        s.on_reload();
        assert_eq!(s.state(), PoolState::Starting);
        assert!(matches!(
            s.on_failure(t0, "x".into(), 0.0),
            FailureAction::RestartAfter(_)
        ));
    }

    // covers: POOL-3107
    #[test]
    fn a_trial_that_becomes_ready_closes_the_circuit() {
        let t0 = Instant::now();
        // A short open period: the trial comes while the five failures are still inside the
        // breaker's 5-minute window, so only closing the circuit lets the next failure restart.
        let mut s = Supervision::new(SupervisionPolicy {
            breaker_open_for: Duration::from_secs(60),
            ..policy()
        });
        for _ in 0..5 {
            s.on_failure(t0, "x".into(), 0.0);
        }
        assert_eq!(s.state(), PoolState::Failed);
        s.on_trial();
        assert_eq!(s.state(), PoolState::Starting);
        s.on_spawned();
        s.on_ready(t0 + Duration::from_secs(61));
        assert_eq!(s.state(), PoolState::Ready);
        // Closed: the next failure restarts (after the first backoff step), it does not give up.
        assert_eq!(
            s.on_failure(t0 + Duration::from_secs(62), "x".into(), 1.0),
            FailureAction::RestartAfter(Duration::from_secs(1))
        );
    }

    // covers: POOL-3107
    #[test]
    fn each_failed_trial_doubles_the_open_period_up_to_its_ceiling() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        for _ in 0..5 {
            s.on_failure(t0, "x".into(), 0.0);
        }
        let mut periods = Vec::new();
        for _ in 0..6 {
            s.on_trial();
            s.on_spawned();
            match s.on_failure(t0, "still broken".into(), 0.0) {
                FailureAction::GiveUp { trial_after } => periods.push(trial_after.as_secs()),
                other => panic!("a failed trial gave {other:?}"),
            }
            assert_eq!(s.state(), PoolState::Failed);
        }
        assert_eq!(periods, [600, 1200, 2400, 3600, 3600, 3600]);
    }

    #[test]
    fn a_flapping_engine_waits_longer_at_each_opening_until_it_stays_healthy() {
        let t0 = Instant::now();
        let mut s = Supervision::new(policy());
        let open = |s: &mut Supervision, at: Instant| -> Duration {
            loop {
                s.on_spawned();
                if let FailureAction::GiveUp { trial_after } = s.on_failure(at, "x".into(), 0.0) {
                    return trial_after;
                }
            }
        };
        assert_eq!(open(&mut s, t0), Duration::from_secs(300));
        // The trial becomes ready, then the engine falls over again quickly.
        s.on_trial();
        s.on_spawned();
        s.on_ready(t0 + Duration::from_secs(300));
        assert_eq!(
            open(&mut s, t0 + Duration::from_secs(310)),
            Duration::from_secs(600)
        );
        // This time it stays healthy for a minute: the next opening is short again.
        s.on_trial();
        s.on_spawned();
        s.on_ready(t0 + Duration::from_secs(1000));
        s.on_probe_ok(t0 + Duration::from_secs(1060));
        assert_eq!(
            open(&mut s, t0 + Duration::from_secs(1100)),
            Duration::from_secs(300)
        );
    }

    proptest! {
        /// Whatever happens, restarts inside any 5-minute window stay bounded (no restart storm),
        /// and `failed` is absorbing until a reload or a trial.
        #[test]
        fn restarts_per_window_are_bounded(events in proptest::collection::vec((0u8..4, 0u64..120_000), 1..200)) {
            let t0 = Instant::now();
            let mut s = Supervision::new(policy());
            let mut t = t0;
            let mut restarts_at: Vec<Instant> = Vec::new();
            for (kind, gap_ms) in events {
                t += Duration::from_millis(gap_ms);
                let was_failed = s.state() == PoolState::Failed;
                match kind {
                    0 => s.on_spawned(),
                    1 => s.on_ready(t),
                    2 => s.on_probe_ok(t),
                    _ => {
                        if let FailureAction::RestartAfter(d) = s.on_failure(t, "x".into(), 0.5) {
                            prop_assert!(d <= Duration::from_secs(60));
                            restarts_at.push(t);
                        }
                    }
                }
                if was_failed {
                    prop_assert_eq!(s.state(), PoolState::Failed);
                }
            }
            for (i, start) in restarts_at.iter().enumerate() {
                let in_window = restarts_at[i..]
                    .iter()
                    .take_while(|r| r.saturating_duration_since(*start) <= Duration::from_secs(300))
                    .count();
                prop_assert!(in_window <= 4, "{} restarts inside one window", in_window);
            }
        }
    }
}
