//! Exponential backoff with equal jitter: attempt `n` waits between half and all of
//! `min(base * 2^n, max)`.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The un-jittered delay of the next attempt.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// Delay before the next attempt; `jitter` in `[0, 1)` spreads it over the upper half of the
    /// ceiling so that pools failing together do not restart in lockstep.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        ceiling / 2 + ceiling.mul_f64(jitter / 2.0)
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // covers: POOL-3105
    #[test]
    fn doubles_from_one_second_to_sixty() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..9)
            .map(|_| {
                let c = b.ceiling().as_secs();
                b.next_delay(0.0);
                c
            })
            .collect();
        assert_eq!(ceilings, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    proptest! {
        // covers: POOL-3105
        #[test]
        fn delay_stays_within_half_and_full_ceiling(attempts in 0u32..100, jitter in 0.0f64..1.0) {
            let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(60));
            for _ in 0..attempts { b.next_delay(0.5); }
            let ceiling = b.ceiling();
            let d = b.next_delay(jitter);
            prop_assert!(d >= ceiling / 2);
            prop_assert!(d <= ceiling);
            prop_assert!(d <= Duration::from_secs(60));
        }

        #[test]
        fn ceiling_never_decreases_until_reset(attempts in 1u32..80) {
            let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(60));
            let mut last = Duration::ZERO;
            for _ in 0..attempts {
                let c = b.ceiling();
                prop_assert!(c >= last);
                last = c;
                b.next_delay(0.3);
            }
        }
    }
}
