//! `GET /v2/tasks/{id}/events`: the task's frames as SSE. Replays from `Last-Event-ID` (or the
//! start), then follows new frames until the terminal one. Several subscribers may watch one
//! task. When the last subscriber goes away before the end, the task is cancelled (unless
//! `ORCHD_CANCEL_ON_DISCONNECT=false`) — a drop guard does it, so every way a connection ends
//! is covered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_http::{ApiError, ApiPath};
use serde::Deserialize;

use crate::api::AppState;
use crate::state::Orchestrator;
use crate::tasks::{Frame, Task};

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Include `metrics` events.
    #[serde(default)]
    verbose: bool,
}

/// Counts a subscriber of a task while it lives; the last one to go cancels the unfinished task
/// (unless `ORCHD_CANCEL_ON_DISCONNECT=false`).
pub(crate) struct SubscriberGuard {
    orch: Arc<Orchestrator>,
    task: Arc<Task>,
}

impl SubscriberGuard {
    pub fn new(orch: Arc<Orchestrator>, task: Arc<Task>) -> Self {
        task.add_subscriber();
        Self { orch, task }
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let last = self.task.remove_subscriber();
        if last && self.orch.config.cancel_on_disconnect && !self.task.is_terminal() {
            tracing::info!(task_id = %self.task.id, "last subscriber disconnected; cancelling task");
            self.orch.cancel(
                &self.task,
                ErrorEnvelope::new(ErrorCode::Cancelled, "the last subscriber disconnected"),
            );
        }
    }
}

struct StreamState {
    task: Arc<Task>,
    next: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    pending: VecDeque<Frame>,
    done: bool,
    verbose: bool,
    _guard: SubscriberGuard,
    /// Lives as long as the stream: the span's duration is the subscription's.
    _span: tracing::Span,
}

pub async fn events(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::new(ErrorCode::InvalidParams, e.body_text()))?;
    let task = orch
        .task(&id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no task {id:?}")))?;
    let next = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|n| n + 1)
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidParams, "Last-Event-ID must be a frame id")
            })?,
    };
    let span = tracing::info_span!("sse_stream", task_id = %task.id, from_frame = next);
    llorch_observability::adopt(&span, &task.trace);
    let state = StreamState {
        _span: span,
        rx: task.watch_frames(),
        _guard: SubscriberGuard::new(orch.clone(), task.clone()),
        task,
        next,
        pending: VecDeque::new(),
        done: false,
        verbose: query.verbose,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(f) = s.pending.pop_front() {
                if f.event == "metrics" && !s.verbose {
                    continue;
                }
                let event = Event::default()
                    .id(f.id.to_string())
                    .event(f.event)
                    .data(f.data);
                return Some((Ok::<Event, Infallible>(event), s));
            }
            if s.done {
                return None;
            }
            let (frames, terminal) = s.task.frames_from(s.next);
            if let Some(last) = frames.last() {
                s.next = last.id + 1;
                s.pending.extend(frames);
                s.done = terminal;
                continue;
            }
            if terminal || s.rx.changed().await.is_err() {
                return None;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(orch.config.sse_keepalive))
        .into_response())
}
