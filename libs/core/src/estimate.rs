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

    /// When a task will start. `ahead` tasks are queued before it (with `ahead_tokens` of
    /// `max_tokens` between them), `own_tokens` is its own `max_tokens`, and `free_slots` of
    /// `total_slots` are idle now. The task needs a slot: it waits for `ahead + 1 - free`
    /// tasks to finish, spread over all slots, each costing the measured first-token time plus
    /// its tokens at the measured rate (running tasks are assumed alike to the queued ones).
    /// 0 until a task has been measured.
    pub fn predicted_start_ms(
        &self,
        ahead: u64,
        ahead_tokens: u64,
        own_tokens: u32,
        free_slots: u32,
        total_slots: u32,
    ) -> u64 {
        let Some(tps) = self.tokens_per_s else {
            return 0;
        };
        let waiting = (ahead + 1).saturating_sub(u64::from(free_slots));
        if waiting == 0 {
            return 0;
        }
        let per_task_tokens = if ahead > 0 {
            ahead_tokens as f64 / ahead as f64
        } else {
            f64::from(own_tokens)
        };
        let per_task_ms = self.first_token_ms.unwrap_or(0.0) + per_task_tokens * 1000.0 / tps;
        (waiting as f64 * per_task_ms / f64::from(total_slots.max(1)))
            .round()
            .max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: ORCH-2118
    #[test]
    fn prediction_is_zero_until_measured_then_follows_the_queue_and_busy_slots() {
        let mut e = ThroughputEstimator::default();
        assert_eq!(e.predicted_start_ms(2, 200, 100, 0, 1), 0);
        e.record(1000, 1000.0, 0.0); // 1000 tokens/s, no first-token time
                                     // Two queued ahead, no free slot: three tasks of 100 tokens must finish first.
        assert_eq!(e.predicted_start_ms(2, 200, 100, 0, 1), 300);
        assert_eq!(e.predicted_start_ms(2, 200, 100, 0, 2), 150);
        // A free slot takes one of them.
        assert_eq!(e.predicted_start_ms(2, 200, 100, 1, 1), 200);
        // First in line behind a busy slot waits for one task like itself.
        assert_eq!(e.predicted_start_ms(0, 0, 400, 0, 1), 400);
        // First in line with a free slot starts now.
        assert_eq!(e.predicted_start_ms(0, 0, 400, 1, 1), 0);
        assert_eq!(e.predicted_start_ms(1, 100, 100, 3, 4), 0);
    }
}
