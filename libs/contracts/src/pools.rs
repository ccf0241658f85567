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
        if !crate::handoff::is_valid_pool_id(&self.node_id) {
            return Err("node_id must be 1-64 characters of A-Z a-z 0-9 . _ -".into());
        }
        if self.slots_free > self.slots_total {
            return Err(format!(
                "slots_free {} is above slots_total {}",
                self.slots_free, self.slots_total
            ));
        }
        if let Some(ctx) = self.ctx_max {
            if ctx == 0 || ctx > CTX_MAX {
                return Err(format!("ctx_max {ctx} is not between 1 and {CTX_MAX}"));
            }
        }
        if let (Some(free), Some(total)) = (self.vram_free_bytes, self.vram_total_bytes) {
            if free > total {
                return Err(format!(
                    "vram_free_bytes {free} is above vram_total_bytes {total}"
                ));
            }
        }
        for (field, value, max) in [
            ("engine", Some(&self.engine), 64),
            ("engine_version", self.engine_version.as_ref(), 256),
            ("device_mask", self.device_mask.as_ref(), 256),
            ("last_error", self.last_error.as_ref(), 4096),
            ("url", self.url.as_ref(), 2048),
        ] {
            if value.is_some_and(|v| v.len() > max) {
                return Err(format!("{field} is longer than {max} bytes"));
            }
        }
        Ok(())
    }
}

/// The largest per-slot context a node may report (tokens).
pub const CTX_MAX: u32 = 1 << 24;

/// The most GPUs one node may report.
pub const GPUS_MAX: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

impl GpuInfo {
    /// The checks a node's GPU list must pass: at most [`GPUS_MAX`] GPUs, names and UUIDs of
    /// at most 256 bytes, free memory no more than total.
    pub fn validate_all(gpus: &[GpuInfo]) -> Result<(), String> {
        if gpus.len() > GPUS_MAX {
            return Err(format!("{} GPUs reported; at most {GPUS_MAX}", gpus.len()));
        }
        for g in gpus {
            if g.name.len() > 256 || g.uuid.as_ref().is_some_and(|u| u.len() > 256) {
                return Err(format!(
                    "GPU {}: name or uuid longer than 256 bytes",
                    g.index
                ));
            }
            if g.memory_free_bytes > g.memory_total_bytes {
                return Err(format!(
                    "GPU {}: memory_free_bytes {} is above memory_total_bytes {}",
                    g.index, g.memory_free_bytes, g.memory_total_bytes
                ));
            }
        }
        Ok(())
    }
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
