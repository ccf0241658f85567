//! Pool and GPU status as pool-managerd reports it (`GET /v2/pools`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    Starting,
    Ready,
    Draining,
    Restarting,
    Failed,
    Stopped,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Starting => "starting",
            PoolState::Ready => "ready",
            PoolState::Draining => "draining",
            PoolState::Restarting => "restarting",
            PoolState::Failed => "failed",
            PoolState::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pool_id: String,
    pub node_id: String,
    pub state: PoolState,
    /// The engine process (or external engine) answers at all.
    pub live: bool,
    /// The pool can take work now.
    pub ready: bool,
    pub draining: bool,
    pub slots_total: u32,
    pub slots_free: u32,
    pub engine: String,
    #[serde(default)]
    pub engine_version: Option<String>,
    pub model_id: String,
    #[serde(default)]
    pub device_mask: Option<String>,
    #[serde(default)]
    pub ctx_max: Option<u32>,
    #[serde(default)]
    pub vram_total_bytes: Option<u64>,
    #[serde(default)]
    pub vram_free_bytes: Option<u64>,
    pub restart_count: u32,
    #[serde(default)]
    pub last_error: Option<String>,
    /// `managed` or `external`.
    pub provisioning_mode: crate::ProvisioningMode,
    /// Engine base URL (loopback for managed engines).
    #[serde(default)]
    pub url: Option<String>,
    /// The engine serves `/v1/embeddings`.
    #[serde(default)]
    pub embeddings: bool,
}

impl PoolStatus {
    /// The checks a node's report must pass before orchestratord uses it: the same limits as
    /// pool-managerd's own pools (a pool id that can name a file, 1..=`SLOTS_MAX` slots, a
    /// model id of at most 256 bytes).
    pub fn validate(&self) -> Result<(), String> {
        if !crate::handoff::is_valid_pool_id(&self.pool_id) {
            return Err("pool_id must be 1-64 characters of A-Z a-z 0-9 . _ -".into());
        }
        if self.slots_total == 0 || self.slots_total > crate::handoff::SLOTS_MAX {
            return Err(format!(
                "slots_total {} is not between 1 and {}",
                self.slots_total,
                crate::handoff::SLOTS_MAX
            ));
        }
        if self.model_id.is_empty() || self.model_id.len() > 256 {
            return Err("model_id must be 1-256 bytes".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolsResponse {
    pub node_id: String,
    /// `nvml` when GPUs were discovered, `cpu-only` otherwise.
    pub gpu_discovery: String,
    pub gpus: Vec<GpuInfo>,
    pub pools: Vec<PoolStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRequest {
    /// How long in-flight requests may take before the engine is stopped anyway.
    pub deadline_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// Path to the GGUF file of the new model (pool-managerd side).
    pub new_model_ref: String,
}
