//! A client key's limits as admission keeps them (`rate=`, `burst=`, `concurrent=` in the keys
//! file): its token bucket and its count of unfinished tasks, and the 429 a limit answers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llorch_contracts::ErrorCode;
use llorch_http::ApiError;
use tokio::time::Instant;

/// A limited key's admission bucket and its unfinished tasks.
pub(crate) struct KeyState {
    tokens: f64,
    refilled: Instant,
    active: Arc<AtomicUsize>,
}

impl KeyState {
    /// A key's state on its first admission: a full bucket.
    pub fn new(limits: auth_min::KeyLimits, now: Instant) -> Self {
        Self {
            tokens: burst(limits),
            refilled: now,
            active: Arc::default(),
        }
    }

    /// Takes one token from the bucket (refilled at `rate` a second up to the key's burst);
    /// `Err(ms)`: empty, the next token comes in `ms`.
    pub fn take(
        &mut self,
        limits: auth_min::KeyLimits,
        rate: f64,
        now: Instant,
    ) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst(limits));
        self.refilled = now;
        if self.tokens < 1.0 {
            return Err((((1.0 - self.tokens) / rate * 1000.0).ceil() as u64).max(1));
        }
        self.tokens -= 1.0;
        Ok(())
    }

    /// One more of the key's unfinished tasks, unless it has `most` already.
    pub fn slot(&self, most: u32) -> Option<KeySlot> {
        if self.active.load(Ordering::SeqCst) >= most as usize {
            return None;
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        Some(KeySlot(self.active.clone()))
    }
}

/// A key's bucket size: its `burst=`, else its rate rounded up (at least 1).
fn burst(limits: auth_min::KeyLimits) -> f64 {
    f64::from(
        limits
            .burst
            .unwrap_or_else(|| limits.rate_per_s.map_or(1.0, f64::ceil).max(1.0) as u32),
    )
}

/// One of a key's concurrent tasks, taken at admission and given back when dropped: by a
/// refusal after it was taken, or by its task at the terminal event.
pub(crate) struct KeySlot(Arc<AtomicUsize>);

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// 429 `ADMISSION_REJECT` for a limit reached (`label`: which one), retry after `retry_ms`.
pub(crate) fn over_limit(label: &'static str, message: String, retry_ms: u64) -> ApiError {
    ApiError::new(ErrorCode::AdmissionReject, message)
        .with_retry_after(retry_ms)
        .with_policy_label(label)
}
