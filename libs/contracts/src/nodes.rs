//! Node registration (CLOUD profile, DESIGN §3): pool-managerd → orchestratord.

use serde::{Deserialize, Serialize};

use crate::{GpuInfo, PoolStatus};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node_id: String,
    /// URL at which orchestratord reaches this pool-managerd.
    pub address: String,
    pub gpus: Vec<GpuInfo>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    pub pools: Vec<PoolStatus>,
}
