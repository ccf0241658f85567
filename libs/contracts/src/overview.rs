//! `GET /v2/overview` of orchestratord: in one answer, what the operator console shows — pools
//! (with what their nodes last reported), nodes, queue depth, the most recent tasks and a short
//! history of token rates and first-token latency. Admin only; it never carries a prompt.

use serde::{Deserialize, Serialize};

use crate::meta::{NodeView, OrchPool};
use crate::tasks::{Priority, TaskState};
use crate::ErrorCode;

/// `GET /v2/overview`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// When this answer was made (ms since the Unix epoch).
    pub at_ms: u64,
    /// `home` or `cloud`.
    pub profile: String,
    pub pools: Vec<OverviewPool>,
    /// CLOUD: every node, as `GET /v2/nodes` shows it (empty in HOME).
    pub nodes: Vec<NodeView>,
    pub queue: QueueDepth,
    /// The most recent tasks (by submission), newest first.
    pub tasks: Vec<TaskSummary>,
    pub rates: RateHistory,
}

/// One pool: orchestratord's view of it joined with its node's last report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverviewPool {
    pub pool_id: String,
    pub node_id: Option<String>,
    pub model_id: String,
    /// The node's state (`starting`, `ready`, `draining`, `restarting`, `failed`, `stopped`)
    /// when it reported the pool lately; `ejected` while orchestratord keeps it out of
    /// placement after failed dispatches; otherwise orchestratord's own view (`ready`,
    /// `unhealthy`, `draining`, `restarting`, `failed`).
    pub state: String,
    /// orchestratord places work on it now.
    pub placeable: bool,
    pub slots_total: u32,
    /// Slots running this orchestratord's tasks now.
    pub slots_used: u32,
    /// Memory of the pool's GPUs as its node reported it.
    pub vram_total_bytes: Option<u64>,
    pub vram_free_bytes: Option<u64>,
    /// Engine restarts the node counted.
    pub restart_count: Option<u32>,
    pub last_error: Option<String>,
    /// How old the node's report is (none: no recent report).
    pub reported_ms_ago: Option<u64>,
    /// The pool as `GET /v2/pools` shows it; absent for a pool only its node still reports (a
    /// drained, stopped pool orchestratord no longer places work on).
    pub listed: Option<OrchPool>,
}

/// Tasks waiting in the queue, by priority.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDepth {
    pub interactive: u64,
    pub batch: u64,
    /// `ORCHD_ADMISSION_CAPACITY`.
    pub capacity: usize,
}

/// One task, without its input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub task_id: String,
    pub state: TaskState,
    pub priority: Priority,
    /// Its last pool (none while it was never dispatched).
    pub pool_id: Option<String>,
    /// The model it asked for (`model_ref`).
    pub model: String,
    /// The name of the key that submitted it.
    pub owner: String,
    /// `v2` or `openai`.
    pub api: String,
    pub submitted_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub tokens_out: u32,
    /// Its error's code, when it failed or was cancelled.
    pub error_code: Option<ErrorCode>,
}

/// Token rate and first-token latency per bucket over the last minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateHistory {
    /// Width of a bucket (10 000).
    pub bucket_ms: u64,
    /// Oldest first; the last one is the bucket in progress.
    pub buckets: Vec<RateBucket>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateBucket {
    /// When the bucket starts (ms since the Unix epoch).
    pub start_ms: u64,
    /// How much of it has passed: `bucket_ms`, except for the bucket in progress.
    pub span_ms: u64,
    /// Token events streamed to clients in it.
    pub tokens: u64,
    /// `tokens` over `span_ms`.
    pub tokens_per_s: f64,
    /// First tokens that arrived in it.
    pub first_tokens: u32,
    /// Median time from dispatch to the first token of those (none without any).
    pub first_token_p50_ms: Option<f64>,
}
