//! Bodies of orchestratord's and pool-managerd's service endpoints: liveness, readiness,
//! capabilities, version, sessions, and orchestratord's view of pools and nodes.

use serde::{Deserialize, Serialize};

use crate::GpuInfo;

/// `GET /health` of both daemons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// Always `ok`: the process answers.
    pub status: String,
    /// pool-managerd: the node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

/// `GET /ready` of orchestratord when it can place work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyResponse {
    /// Always `ready` (a daemon that is not ready answers the error envelope).
    pub status: String,
    pub pools_ready: usize,
}

/// `GET /v2/meta/version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionResponse {
    pub service: String,
    pub version: String,
    pub api_version: String,
}

/// `GET /v2/meta/capabilities`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub api_version: String,
    /// `home` or `cloud`.
    pub profile: String,
    /// Models some ready pool serves now.
    pub models: Vec<ModelCapability>,
    pub limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCapability {
    pub model_id: String,
    /// Ready pools serving it.
    pub pools: u32,
    pub slots_total: u32,
    /// The largest per-slot context among those pools (0 when unknown).
    pub ctx_max: u32,
    pub engine: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_tokens: u32,
    pub max_body_bytes: usize,
    pub queue_capacity: usize,
    pub admission_policy: String,
}

/// `GET /v2/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionResponse {
    pub session_id: String,
    pub ttl_ms_remaining: u64,
    pub turns: u32,
    /// The session's last pool is still ready (its KV cache may still hold the session).
    pub kv_warmth: bool,
    pub last_pool_id: Option<String>,
}

/// One pool as orchestratord sees it (`GET /v2/pools`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrchPool {
    pub pool_id: String,
    pub model_id: String,
    /// Base URL of the engine API: HOME, the loopback llama-server; CLOUD, the pool-managerd
    /// proxy `{manager}/v2/pools/{id}/engine`.
    pub url: String,
    /// CLOUD: the pool-managerd that owns the pool.
    pub manager: Option<String>,
    pub slots_total: u32,
    pub ctx_max: Option<u32>,
    pub engine: String,
    pub engine_version: Option<String>,
    pub node_id: Option<String>,
    pub device_mask: Option<String>,
    /// The last health probe (HOME) or poll (CLOUD) found it usable.
    pub healthy: bool,
    pub draining: bool,
    pub last_error: Option<String>,
    /// Tasks this orchestratord runs there now.
    pub in_flight: u32,
    /// `serving`, `restarting` (its work queues) or `failed` (its work is refused).
    pub phase: String,
    /// Free GPU memory of the pool as its node reported it (CLOUD).
    pub vram_free_bytes: Option<u64>,
    /// Ejected from placement for this much longer: its last dispatches failed in a row
    /// while its health probe passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
}

/// `GET /v2/pools` of orchestratord.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrchPoolsResponse {
    pub pools: Vec<OrchPool>,
}

/// `GET /v2/pools/{id}/health` of orchestratord.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolHealth {
    pub pool_id: String,
    pub live: bool,
    pub ready: bool,
    pub draining: bool,
    pub slots_total: u32,
    pub slots_free: u32,
    pub in_flight: u32,
    pub model_id: String,
    pub last_error: Option<String>,
}

/// A pool-managerd as orchestratord's CLOUD poller sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Availability {
    /// Not polled successfully yet.
    Unknown,
    Available,
    Unavailable,
}

/// One node (`GET /v2/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: Option<String>,
    pub address: String,
    /// Came through `/v2/nodes/register` (and is expected to heartbeat).
    pub registered: bool,
    pub availability: Availability,
    pub online: bool,
    pub last_heartbeat_ms_ago: Option<u64>,
    pub pools: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub last_error: Option<String>,
}

/// `GET /v2/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodesResponse {
    pub nodes: Vec<NodeView>,
}

/// `POST /v2/nodes/register` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRegistered {
    pub node_id: String,
    /// How often the node should heartbeat.
    pub heartbeat_interval_ms: u64,
}
