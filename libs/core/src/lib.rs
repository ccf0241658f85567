//! Pure core of llama-orch. Every function here takes the current time (`Instant`) and any
//! randomness (`jitter` in `[0, 1)`) as arguments: no clock reads, no IO, so everything is
//! unit- and property-tested deterministically.

pub mod backoff;
pub mod breaker;
pub mod registry;
pub mod supervision;

pub use backoff::Backoff;
pub use breaker::CircuitBreaker;
pub use registry::Registry;
pub use supervision::{FailureAction, Supervision, SupervisionPolicy};
