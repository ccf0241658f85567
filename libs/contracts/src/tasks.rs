//! Task admission and SSE event types (DESIGN §3).

use serde::{Deserialize, Serialize};

use crate::ErrorEnvelope;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    #[default]
    Completion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Determinism {
    Strict,
    BestEffort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlacementMode {
    #[default]
    Auto,
    Pin,
    Prefer,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub mode: PlacementMode,
    #[serde(default)]
    pub pin_pool_id: Option<String>,
    #[serde(default)]
    pub prefer_pools: Vec<String>,
    #[serde(default)]
    pub avoid_pools: Vec<String>,
    #[serde(default)]
    pub allow_fallback: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskRequest {
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub workload: Workload,
    pub model_ref: String,
    #[serde(default)]
    pub engine: Option<String>,
    pub prompt: String,
    pub max_tokens: u32,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub ctx: Option<u32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<u32>,
    #[serde(default)]
    pub stop: Vec<String>,
    #[serde(default)]
    pub determinism: Option<Determinism>,
    #[serde(default)]
    pub placement: Option<Placement>,
}

impl TaskRequest {
    /// A completion of `max_tokens` tokens for `prompt` on `model_ref`; every other field at
    /// its default (interactive, auto placement, the engine's sampling defaults).
    pub fn new(model_ref: impl Into<String>, prompt: impl Into<String>, max_tokens: u32) -> Self {
        Self {
            task_id: None,
            session_id: None,
            workload: Workload::default(),
            model_ref: model_ref.into(),
            engine: None,
            prompt: prompt.into(),
            max_tokens,
            priority: Priority::default(),
            deadline_ms: None,
            ctx: None,
            seed: None,
            temperature: None,
            top_p: None,
            top_k: None,
            stop: Vec::new(),
            determinism: None,
            placement: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStreams {
    pub sse: String,
    pub sse_verbose: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionResponse {
    pub task_id: String,
    pub queue_position: u32,
    pub predicted_start_ms: u64,
    pub backoff_ms: u64,
    pub streams: TaskStreams,
}

/// The `metrics` event (verbose streams): how the task ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMetrics {
    /// From dispatch to the first token.
    pub first_token_ms: Option<u64>,
    pub tokens_per_s: f64,
    /// The engine's own count of generated tokens (can exceed `tokens_out` when byte-fallback
    /// tokens are merged into one piece).
    pub engine_tokens: Option<u32>,
}

/// One SSE event; the variant name is the SSE `event:` field, the payload its `data:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "data", rename_all = "snake_case")]
pub enum TaskEvent {
    Queued {
        queue_position: u32,
        predicted_start_ms: u64,
    },
    Started {
        pool_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_id: Option<String>,
        engine: String,
        #[serde(default)]
        engine_version: Option<String>,
        queue_time_ms: u64,
    },
    Token {
        t: String,
        i: u32,
    },
    Metrics(TaskMetrics),
    End {
        tokens_out: u32,
        decode_time_ms: u64,
        decode_ms: u64,
        finish_reason: String,
    },
    Error(ErrorEnvelope),
}

impl TaskEvent {
    pub fn name(&self) -> &'static str {
        match self {
            TaskEvent::Queued { .. } => "queued",
            TaskEvent::Started { .. } => "started",
            TaskEvent::Token { .. } => "token",
            TaskEvent::Metrics(_) => "metrics",
            TaskEvent::End { .. } => "end",
            TaskEvent::Error(_) => "error",
        }
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskEvent::End { .. } | TaskEvent::Error(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

/// `GET /v2/tasks/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    pub task_id: String,
    pub state: TaskState,
    pub priority: Priority,
    pub model_ref: String,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub pool_id: Option<String>,
    #[serde(default)]
    pub queue_position: Option<u32>,
    /// Dispatches to an engine (a retry before the first token makes it 2).
    pub attempts: u32,
    pub tokens_out: u32,
    pub submitted_at_ms: u64,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    #[serde(default)]
    pub first_token_at_ms: Option<u64>,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub queue_time_ms: Option<u64>,
    #[serde(default)]
    pub error: Option<ErrorEnvelope>,
}
