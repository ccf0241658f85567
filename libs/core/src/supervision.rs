//! Supervision state machine of one managed pool (DESIGN §4).
//!
//! ```text
//!            spawned            healthy
//!  (new) ──► starting ───────────────────► ready ──drain──► draining ──► stopped
//!               ▲  │ exit/timeout           │ exit / hung
//!               │  ▼                        ▼
//!           restarting ◄──── failure (breaker closed)
//!                          failure (breaker open) ──► failed
//! ```
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
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureAction {
    /// Restart the engine after this delay.
    RestartAfter(Duration),
    /// The circuit is open: stay `failed` until an operator acts (reload).
    GiveUp,
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
}

impl Supervision {
    pub fn new(policy: SupervisionPolicy) -> Self {
        Self {
            backoff: Backoff::new(policy.backoff_base, policy.backoff_max),
            breaker: CircuitBreaker::new(policy.breaker_failures, policy.breaker_window),
            policy,
            state: PoolState::Starting,
            restart_count: 0,
            last_error: None,
            ready_since: None,
            probe_failures: 0,
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
        }
    }

    /// A periodic health probe succeeded. After a healthy period the backoff starts over.
    pub fn on_probe_ok(&mut self, now: Instant) {
        self.probe_failures = 0;
        if let Some(since) = self.ready_since {
            if now.saturating_duration_since(since) >= self.policy.healthy_reset_after {
                self.backoff.reset();
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
        if self.breaker.record_failure(now) {
            self.state = PoolState::Failed;
            return FailureAction::GiveUp;
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
                FailureAction::GiveUp => break,
                FailureAction::Stop => unreachable!(),
            }
        }
        assert_eq!(s.state(), PoolState::Failed);
        assert_eq!(restarts, 4);
        assert_eq!(s.last_error(), Some("exited with status 1"));
    }

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

    proptest! {
        /// Whatever happens, restarts inside any 5-minute window stay bounded (no restart storm),
        /// and `failed` is absorbing until a reload.
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
