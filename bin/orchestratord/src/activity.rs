//! A short history of the fleet's activity for the console: a ring of 30 buckets of 10 s, fed
//! where tokens and first tokens are already counted (`metrics::TokensOut` in the runner, the
//! first-token latency where the dispatcher observes it): reading it costs 30 buckets, whatever
//! the traffic, and its memory is bounded.

use std::time::Duration;

use llorch_contracts::overview::{RateBucket, RateHistory};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Width of one bucket of the rate history.
pub(crate) const BUCKET: Duration = Duration::from_secs(10);
/// Buckets kept: five minutes.
pub(crate) const BUCKETS: u64 = 30;
/// First-token latencies kept per bucket for its median; beyond, every other one is dropped
/// (and from then on only every other one kept), so the median stays one of the whole bucket.
const SAMPLES_MAX: usize = 256;

/// Tokens and first-token latencies per bucket over the last `BUCKETS` buckets.
pub(crate) struct Rates {
    origin: Instant,
    ring: Mutex<Vec<Bucket>>,
}

#[derive(Clone, Default)]
struct Bucket {
    /// Which bucket the slot holds (buckets since `origin`); none: never used.
    number: Option<u64>,
    tokens: u64,
    first_tokens: u32,
    /// Latencies (ms) of the first tokens numbered 0, `stride`, 2·`stride`, … in the bucket.
    samples: Vec<f32>,
    stride: u32,
}

impl Bucket {
    fn fresh(number: u64) -> Self {
        Self {
            number: Some(number),
            stride: 1,
            ..Self::default()
        }
    }

    fn median(&self) -> Option<f64> {
        let mut s = self.samples.clone();
        s.sort_by(f32::total_cmp);
        let mid = s.len() / 2;
        match s.len() {
            0 => None,
            n if n % 2 == 1 => Some(f64::from(s[mid])),
            _ => Some((f64::from(s[mid - 1]) + f64::from(s[mid])) / 2.0),
        }
    }
}

impl Rates {
    /// Buckets start at `origin` (the daemon's start).
    pub fn new(origin: Instant) -> Self {
        Self {
            origin,
            ring: Mutex::new(vec![Bucket::default(); BUCKETS as usize]),
        }
    }

    fn number(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_millis() / BUCKET.as_millis()) as u64
    }

    /// The bucket `number` in the ring, made fresh when its slot held an older one; `None` when
    /// the slot already holds a newer one (`number` is older than the ring keeps).
    fn slot(ring: &mut [Bucket], number: u64) -> Option<&mut Bucket> {
        let b = &mut ring[(number % BUCKETS) as usize];
        match b.number {
            Some(held) if held == number => {}
            Some(held) if held > number => return None,
            _ => *b = Bucket::fresh(number),
        }
        Some(b)
    }

    /// `n` token events streamed at `at`.
    pub fn add_tokens(&self, at: Instant, n: u64) {
        let number = self.number(at);
        if let Some(b) = Self::slot(&mut self.ring.lock(), number) {
            b.tokens += n;
        }
    }

    /// A first token that arrived at `at`, `latency_ms` after its dispatch.
    pub fn add_first_token(&self, at: Instant, latency_ms: f64) {
        let number = self.number(at);
        let mut ring = self.ring.lock();
        let Some(b) = Self::slot(&mut ring, number) else {
            return;
        };
        let seen = b.first_tokens;
        b.first_tokens += 1;
        if seen % b.stride != 0 {
            return;
        }
        if b.samples.len() == SAMPLES_MAX {
            // Keep the first tokens numbered 0, 2·stride, 4·stride, …
            let mut i = 0;
            b.samples.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            b.stride *= 2;
            if seen % b.stride != 0 {
                return;
            }
        }
        b.samples.push(latency_ms as f32);
    }

    /// The buckets of the last five minutes up to `now` (the daemon's first ones only, while
    /// it is younger), oldest first; `now_ms` is `now` on the wall clock.
    pub fn history(&self, now: Instant, now_ms: u64) -> RateHistory {
        let current = self.number(now);
        let ring = self.ring.lock();
        let buckets = (current.saturating_sub(BUCKETS - 1)..=current)
            .map(|n| {
                let start = self.origin + BUCKET * n as u32;
                let span = if n == current {
                    now.saturating_duration_since(start)
                } else {
                    BUCKET
                };
                let empty = Bucket::default();
                let b = ring
                    .get((n % BUCKETS) as usize)
                    .filter(|b| b.number == Some(n))
                    .unwrap_or(&empty);
                let secs = span.as_secs_f64();
                RateBucket {
                    start_ms: now_ms
                        .saturating_sub(now.saturating_duration_since(start).as_millis() as u64),
                    span_ms: span.as_millis() as u64,
                    tokens: b.tokens,
                    tokens_per_s: if secs > 0.0 {
                        b.tokens as f64 / secs
                    } else {
                        0.0
                    },
                    first_tokens: b.first_tokens,
                    first_token_p50_ms: b.median(),
                }
            })
            .collect();
        RateHistory {
            bucket_ms: BUCKET.as_millis() as u64,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn tokens_per_bucket(h: &RateHistory) -> Vec<u64> {
        h.buckets.iter().map(|b| b.tokens).collect()
    }

    // covers: OBS-6113
    #[tokio::test(start_paused = true)]
    async fn tokens_fall_in_ten_second_buckets_split_exactly_at_their_edges() {
        let origin = Instant::now();
        let rates = Rates::new(origin);
        rates.add_tokens(origin, 1);
        rates.add_tokens(origin + 10 * S - MS, 2);
        rates.add_tokens(origin + 10 * S, 4);
        rates.add_tokens(origin + 25 * S, 8);
        tokio::time::advance(25 * S).await;
        let now = Instant::now();
        let h = rates.history(now, 1_000_000);
        assert_eq!(h.bucket_ms, 10_000);
        assert_eq!(tokens_per_bucket(&h), vec![3, 4, 8]);
        // Complete buckets span 10 s; the one in progress what has passed of it.
        let spans: Vec<u64> = h.buckets.iter().map(|b| b.span_ms).collect();
        assert_eq!(spans, vec![10_000, 10_000, 5_000]);
        assert_eq!(h.buckets[0].tokens_per_s, 0.3);
        assert_eq!(h.buckets[2].tokens_per_s, 8.0 / 5.0);
        // Wall-clock starts: now is 1 000 000 ms, 25 s after the first bucket began.
        let starts: Vec<u64> = h.buckets.iter().map(|b| b.start_ms).collect();
        assert_eq!(starts, vec![975_000, 985_000, 995_000]);
    }

    // covers: OBS-6113
    #[tokio::test(start_paused = true)]
    async fn the_history_keeps_five_minutes_and_forgets_what_is_older() {
        let origin = Instant::now();
        let rates = Rates::new(origin);
        rates.add_tokens(origin, 7);
        // 299.999 s later the first bucket is still the oldest of the 30 shown.
        tokio::time::advance(300 * S - MS).await;
        let h = rates.history(Instant::now(), 0);
        assert_eq!(h.buckets.len(), 30);
        assert_eq!(h.buckets[0].tokens, 7);
        // One millisecond on, bucket 30 begins and bucket 0 leaves the window.
        tokio::time::advance(MS).await;
        let h = rates.history(Instant::now(), 0);
        assert_eq!(h.buckets.len(), 30);
        assert_eq!(h.buckets.iter().map(|b| b.tokens).sum::<u64>(), 0);
        assert_eq!(h.buckets[29].span_ms, 0);
        assert_eq!(h.buckets[29].tokens_per_s, 0.0);
        // Its slot is reused by bucket 30: the old count does not leak into it.
        rates.add_tokens(Instant::now(), 1);
        let h = rates.history(Instant::now(), 0);
        assert_eq!(h.buckets[29].tokens, 1);
        // A token older than the ring keeps (bucket 0, whose slot bucket 30 holds) is dropped.
        rates.add_tokens(origin, 5);
        assert_eq!(
            rates
                .history(Instant::now(), 0)
                .buckets
                .iter()
                .map(|b| b.tokens)
                .sum::<u64>(),
            1
        );
    }

    // covers: OBS-6113
    #[tokio::test(start_paused = true)]
    async fn a_late_first_token_lands_in_the_bucket_it_arrived_in() {
        let origin = Instant::now();
        let rates = Rates::new(origin);
        tokio::time::advance(45 * S).await;
        // Observed when its task ended, at 45 s; it arrived at 12 s.
        rates.add_first_token(origin + 12 * S, 30.0);
        rates.add_first_token(origin + 12 * S + 500 * MS, 10.0);
        rates.add_first_token(origin + 41 * S, 20.0);
        let h = rates.history(Instant::now(), 0);
        let counts: Vec<u32> = h.buckets.iter().map(|b| b.first_tokens).collect();
        assert_eq!(counts, vec![0, 2, 0, 0, 1]);
        let p50: Vec<Option<f64>> = h.buckets.iter().map(|b| b.first_token_p50_ms).collect();
        assert_eq!(p50, vec![None, Some(20.0), None, None, Some(20.0)]);
    }

    // covers: OBS-6113
    #[tokio::test(start_paused = true)]
    async fn the_median_of_a_busy_bucket_stays_bounded_and_spread_over_the_whole_bucket() {
        let origin = Instant::now();
        let rates = Rates::new(origin);
        // 1000 first tokens in one bucket, latency rising 0..999 ms.
        for i in 0..1000u32 {
            rates.add_first_token(origin + Duration::from_millis(u64::from(i)), f64::from(i));
        }
        let ring = rates.ring.lock();
        let b = &ring[0];
        assert_eq!(b.first_tokens, 1000);
        assert!(b.samples.len() <= SAMPLES_MAX);
        // Kept: every 4th (0, 4, 8, …, 996): the median of those is that of the whole bucket.
        assert_eq!(b.stride, 4);
        assert_eq!(b.samples.len(), 250);
        assert_eq!(b.samples.last().copied(), Some(996.0));
        assert_eq!(b.median(), Some(498.0));
    }
}
