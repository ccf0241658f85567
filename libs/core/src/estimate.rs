//! Start-time prediction from measured throughput (not a constant).

/// Exponentially weighted moving average of per-task decode throughput (tokens/s) and of the
/// time from dispatch to first token.
#[derive(Debug, Clone, Default)]
pub struct ThroughputEstimator {
    tokens_per_s: Option<f64>,
    first_token_ms: Option<f64>,
}

const ALPHA: f64 = 0.2;

fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (sample - o),
        None => sample,
    }
}

impl ThroughputEstimator {
    /// Records a finished task: `tokens` decoded in `decode_ms` after `first_token_ms`.
    pub fn record(&mut self, tokens: u32, decode_ms: f64, first_token_ms: f64) {
        if tokens > 0 && decode_ms > 0.0 {
            self.tokens_per_s = Some(ewma(
                self.tokens_per_s,
                f64::from(tokens) * 1000.0 / decode_ms,
            ));
        }
        if first_token_ms >= 0.0 {
            self.first_token_ms = Some(ewma(self.first_token_ms, first_token_ms));
        }
    }

    pub fn tokens_per_s(&self) -> Option<f64> {
        self.tokens_per_s
    }

    /// When a task will start, given the `ahead` tasks before it in the queue (their count and
    /// the sum of their `max_tokens`): the work of those beyond the slots free now, spread over
    /// all slots. 0 until a task has been measured.
    pub fn predicted_start_ms(
        &self,
        ahead: u64,
        ahead_tokens: u64,
        free_slots: u32,
        total_slots: u32,
    ) -> u64 {
        let Some(tps) = self.tokens_per_s else {
            return 0;
        };
        let waiting = ahead.saturating_sub(u64::from(free_slots));
        if waiting == 0 {
            return 0;
        }
        // Tasks ahead are assumed alike: the waiting share of their tokens.
        let tokens = ahead_tokens as f64 * waiting as f64 / ahead as f64;
        let work = waiting as f64 * self.first_token_ms.unwrap_or(0.0) + tokens * 1000.0 / tps;
        (work / f64::from(total_slots.max(1))).round().max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_is_zero_until_measured_then_follows_the_queue() {
        let mut e = ThroughputEstimator::default();
        assert_eq!(e.predicted_start_ms(2, 200, 0, 1), 0);
        e.record(1000, 1000.0, 0.0); // 1000 tokens/s
        assert_eq!(e.predicted_start_ms(2, 200, 0, 1), 200);
        assert_eq!(e.predicted_start_ms(2, 200, 0, 2), 100);
        assert_eq!(e.predicted_start_ms(2, 200, 1, 1), 100);
        assert_eq!(e.predicted_start_ms(0, 0, 0, 1), 0);
        assert_eq!(e.predicted_start_ms(1, 100, 3, 4), 0);
    }
}
