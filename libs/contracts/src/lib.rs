//! Wire types of llama-orch. Serde only: no IO, no logic beyond (de)serialisation and the one
//! table that maps an error code to its HTTP status.

pub mod address;
pub mod engine_routes;
mod error;
pub mod handoff;
pub mod meta;
pub mod nodes;
pub mod openai;
pub mod overview;
mod pools;
pub mod tasks;

pub use error::{ErrorCode, ErrorEnvelope};
pub use handoff::{HandoffFile, HandoffModel, ProvisioningMode, HANDOFF_VERSION};
pub use pools::{DrainRequest, GpuInfo, PoolState, PoolStatus, PoolsResponse, ReloadRequest};
