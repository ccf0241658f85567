//! Circuit breaker: opens when `max_failures` failures fall inside a sliding `window`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    window: Duration,
    max_failures: usize,
    failures: VecDeque<Instant>,
    open: bool,
}

impl CircuitBreaker {
    pub fn new(max_failures: usize, window: Duration) -> Self {
        Self {
            window,
            max_failures: max_failures.max(1),
            failures: VecDeque::new(),
            open: false,
        }
    }

    /// Records a failure at `now`; returns true when the breaker is (now) open.
    pub fn record_failure(&mut self, now: Instant) -> bool {
        self.failures.push_back(now);
        self.forget_before(now);
        if self.failures.len() >= self.max_failures {
            self.open = true;
        }
        self.open
    }

    /// Failures counted inside the window ending at `now`.
    pub fn failures_in_window(&mut self, now: Instant) -> usize {
        self.forget_before(now);
        self.failures.len()
    }

    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Closes the breaker and forgets past failures (an operator reload, say).
    pub fn reset(&mut self) {
        self.open = false;
        self.failures.clear();
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&first) = self.failures.front() {
            if now.saturating_duration_since(first) > self.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // covers: POOL-3107
    #[test]
    fn opens_on_fifth_failure_inside_five_minutes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(5, Duration::from_secs(300));
        for i in 0..4 {
            assert!(!b.record_failure(t0 + Duration::from_secs(i * 10)));
        }
        assert!(b.record_failure(t0 + Duration::from_secs(50)));
        assert!(b.is_open());
    }

    // covers: POOL-3107
    #[test]
    fn failures_spread_beyond_the_window_never_open_it() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(5, Duration::from_secs(300));
        for i in 0..50 {
            assert!(!b.record_failure(t0 + Duration::from_secs(i * 80)));
        }
    }

    proptest! {
        #[test]
        fn open_iff_some_window_held_max_failures(gaps in proptest::collection::vec(0u64..200, 1..40)) {
            let t0 = Instant::now();
            let mut b = CircuitBreaker::new(5, Duration::from_secs(300));
            let mut times = Vec::new();
            let mut t = 0u64;
            let mut opened = false;
            for g in gaps {
                t += g;
                times.push(t);
                opened = b.record_failure(t0 + Duration::from_secs(t));
            }
            // Reference: is there any run of 5 consecutive failures spanning <= 300 s?
            let expected = times.windows(5).any(|w| w[4] - w[0] <= 300);
            prop_assert_eq!(opened, expected);
        }
    }
}
