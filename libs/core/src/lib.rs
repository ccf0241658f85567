//! Pure core of llama-orch: supervision (pool-managerd) and admission, queue, placement,
//! sessions, prediction (orchestratord). Every function here takes the current time (`Instant`) and any
//! randomness (`jitter` in `[0, 1)`) as arguments: no clock reads, no IO, so everything is
//! unit- and property-tested deterministically.

mod backoff;
mod breaker;
mod estimate;
mod expiry;
mod models;
mod placement;
mod prefix;
mod queue;
mod registry;
mod sessions;
mod slots;
mod supervision;

pub use backoff::Backoff;
pub use breaker::CircuitBreaker;
pub use estimate::ThroughputEstimator;
pub use expiry::ExpiryHeap;
pub use models::{may_swap, plan_load, CatalogModel, LoadPlan, NoLoad, NodeModels, Resident};
pub use placement::{place, Decision, PlacementRequest, PoolView};
pub use prefix::{prefix_chain, prefix_scope, scoped_prefix_chain, PrefixIndex};
pub use queue::{AdmissionPolicy, AdmissionQueue, Admitted, QueueFull, QueueKey};
pub use registry::Registry;
pub use sessions::{SessionInfo, SessionTable};
pub use slots::{SlotMap, SlotPick};
pub use supervision::{FailureAction, Supervision, SupervisionPolicy};
