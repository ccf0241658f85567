//! Pure core of llama-orch: supervision (pool-managerd) and admission, queue, placement,
//! sessions, prediction (orchestratord). Every function here takes the current time (`Instant`) and any
//! randomness (`jitter` in `[0, 1)`) as arguments: no clock reads, no IO, so everything is
//! unit- and property-tested deterministically.

pub mod backoff;
pub mod breaker;
pub mod estimate;
pub mod expiry;
pub mod placement;
pub mod queue;
pub mod registry;
pub mod sessions;
pub mod supervision;

pub use backoff::Backoff;
pub use breaker::CircuitBreaker;
pub use estimate::ThroughputEstimator;
pub use expiry::ExpiryHeap;
pub use placement::{place, Decision, PlacementRequest, PoolView};
pub use queue::{AdmissionPolicy, AdmissionQueue, Admitted, QueueFull};
pub use registry::Registry;
pub use sessions::{SessionInfo, SessionTable};
pub use supervision::{FailureAction, Supervision, SupervisionPolicy};
