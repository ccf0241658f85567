//! `GET /v2/tasks/{id}/events`: the task's frames as SSE. Replays from `Last-Event-ID` (or the
//! start), then follows new frames until the terminal one. Several subscribers may watch one
//! task. When the last subscriber goes away before the end, the task is cancelled after
//! `ORCHD_DISCONNECT_GRACE_MS` unless one comes back (or never, with
//! `ORCHD_CANCEL_ON_DISCONNECT=false`) — a drop guard does it, so every way a connection ends
//! is covered.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_http::{ApiError, ApiPath, ApiQuery};
use serde::Deserialize;

use crate::state::AppState;
use crate::state::Orchestrator;
use crate::tasks::{Frame, ReplayGap, Task};

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Include `metrics` events.
    #[serde(default)]
    verbose: bool,
    /// Another key's task, by that key's name (admins only; task ids are scoped per key).
    owner: Option<String>,
}

/// Counts a subscriber of a task while it lives. When the last one goes and the task has not
/// ended, it is cancelled (unless `ORCHD_CANCEL_ON_DISCONNECT=false`): after `grace` — a
/// subscriber that comes back within it (a reconnect with `Last-Event-ID`) keeps the task — or
/// at once for a zero grace.
pub(crate) struct SubscriberGuard {
    orch: Arc<Orchestrator>,
    task: Arc<Task>,
    grace: Duration,
}

impl SubscriberGuard {
    /// A `/v2` event subscriber: `ORCHD_DISCONNECT_GRACE_MS` to come back.
    pub fn new(orch: Arc<Orchestrator>, task: Arc<Task>) -> Self {
        let grace = orch.config.disconnect_grace;
        Self::with_grace(orch, task, grace)
    }

    /// A client that cannot come back (an OpenAI request): its task ends when it leaves.
    pub fn without_grace(orch: Arc<Orchestrator>, task: Arc<Task>) -> Self {
        Self::with_grace(orch, task, Duration::ZERO)
    }

    fn with_grace(orch: Arc<Orchestrator>, task: Arc<Task>, grace: Duration) -> Self {
        task.add_subscriber();
        orch.follow_position(&task);
        Self { orch, task, grace }
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        let Some(departure) = self.task.remove_subscriber() else {
            return;
        };
        if !self.orch.config.cancel_on_disconnect || self.task.is_terminal() {
            return;
        }
        if self.grace.is_zero() {
            abandon(&self.orch, &self.task);
            return;
        }
        let (orch, task, grace) = (self.orch.clone(), self.task.clone(), self.grace);
        // Tracked with the runners: it ends with its task at the latest, as they do.
        self.orch.runners.spawn(async move {
            let expiry = tokio::time::sleep(grace);
            tokio::pin!(expiry);
            let mut frames = task.watch_frames();
            // It may have ended between the departure and this subscription.
            if task.is_terminal() {
                return;
            }
            loop {
                tokio::select! {
                    _ = &mut expiry => break,
                    changed = frames.changed() => {
                        if changed.is_err() || task.is_terminal() {
                            return;
                        }
                    }
                }
            }
            if task.still_abandoned(departure) && !task.is_terminal() {
                abandon(&orch, &task);
            }
        });
    }
}

/// One of a key's open streams, taken before a stream starts and given back when it is dropped
/// (every way a connection ends). A key holds at most its `conns=` (else
/// `ORCHD_KEY_MAX_STREAMS`), so one key cannot take the connections every other key and the
/// nodes need.
pub(crate) struct StreamSlot(Arc<std::sync::atomic::AtomicU32>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Orchestrator {
    /// A stream slot of `caller`'s key, or 429 when it holds its most.
    pub(crate) fn open_stream(&self, caller: &auth_min::Principal) -> Result<StreamSlot, ApiError> {
        use std::sync::atomic::Ordering;
        let most = caller.limits.conns.unwrap_or(self.config.key_max_streams);
        let open = self
            .key_streams
            .lock()
            .entry(caller.name.clone())
            .or_default()
            .clone();
        let taken = open.fetch_add(1, Ordering::SeqCst);
        let slot = StreamSlot(open);
        if taken >= most {
            drop(slot);
            self.metrics
                .key_tasks
                .with_label_values(&[self.metrics.key(&caller.name), "key_streams"])
                .inc();
            tracing::info!(key = %caller.name, most, "stream refused: the key holds its most open streams");
            return Err(crate::limits::over_limit(
                "key_streams",
                format!(
                    "key {:?} holds {most} open streams, its limit (conns= in the keys file, else ORCHD_KEY_MAX_STREAMS)",
                    caller.name
                ),
                1000,
            ));
        }
        Ok(slot)
    }

    /// Refused (429) when `task` has its most subscribers (ORCHD_MAX_SUBSCRIBERS_PER_TASK).
    pub(crate) fn room_to_follow(&self, task: &Task) -> Result<(), ApiError> {
        let most = self.config.max_subscribers_per_task;
        if task.subscriber_count() >= most {
            tracing::info!(task_id = %task.id, most, "subscription refused: the task has its most subscribers");
            return Err(crate::limits::over_limit(
                "task_subscribers",
                format!(
                    "task {} has {most} subscribers, the most one task may have (ORCHD_MAX_SUBSCRIBERS_PER_TASK)",
                    task.id
                ),
                1000,
            ));
        }
        Ok(())
    }
}

fn abandon(orch: &Orchestrator, task: &Arc<Task>) {
    tracing::info!(task_id = %task.id, "last subscriber gone; cancelling task");
    orch.cancel(
        task,
        ErrorEnvelope::new(ErrorCode::Cancelled, "the last subscriber disconnected"),
    );
}

/// `REPLAY_UNAVAILABLE`: frames `from..gap.first_kept` are gone.
fn replay_gap(task: &Task, from: u64, gap: ReplayGap) -> ErrorEnvelope {
    ErrorEnvelope::new(
        ErrorCode::ReplayUnavailable,
        format!(
            "frames {from}..{} of task {} are no longer kept (per-task log cap ORCHD_TASK_LOG_MAX_BYTES); resume with Last-Event-ID {} or later, or read GET /v2/tasks/{}",
            gap.first_kept - 1,
            task.id,
            gap.first_kept - 1,
            task.id
        ),
    )
}

struct StreamState {
    task: Arc<Task>,
    next: u64,
    rx: tokio::sync::watch::Receiver<u64>,
    pending: VecDeque<Frame>,
    done: bool,
    verbose: bool,
    _guard: SubscriberGuard,
    _slot: StreamSlot,
    /// Lives as long as the stream: the span's duration is the subscription's.
    _span: tracing::Span,
}

pub async fn events(
    State(orch): State<AppState>,
    axum::Extension(caller): axum::Extension<auth_min::Principal>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let task = orch.visible_task(&id, query.owner.as_deref(), &caller)?;
    // Refused for want of room: the connection goes too (a client that opens thousands and
    // reads nothing must not keep them as idle keep-alives).
    let slot = match orch
        .room_to_follow(&task)
        .and_then(|()| orch.open_stream(&caller))
    {
        Ok(slot) => slot,
        Err(refused) => return Ok(llorch_http::closing(refused.into_response())),
    };
    let next = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidParams, "Last-Event-ID must be a frame id")
            })?,
    };
    let next = task.resume_point(next);
    let first_kept = task.first_kept();
    if next < first_kept {
        tracing::info!(task_id = %task.id, from_frame = next, first_kept, "replay of dropped frames refused");
        return Err(ApiError::from(replay_gap(
            &task,
            next,
            ReplayGap { first_kept },
        )));
    }
    let span = tracing::info_span!("sse_stream", task_id = %task.id, from_frame = next);
    llorch_observability::adopt(&span, &task.trace);
    let state = StreamState {
        _span: span,
        rx: task.watch_frames(),
        _guard: SubscriberGuard::new(orch.clone(), task.clone()),
        _slot: slot,
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
            let (frames, terminal) = match s.task.frames_from(s.next) {
                Ok(found) => found,
                Err(gap) => {
                    // This subscriber fell behind by more than the log keeps: one
                    // `replay_unavailable` event (no id: not one of the task's frames; not
                    // `error`, which would read as the task's end), then the stream ends. A
                    // client that reconnects gets 410 with the id to resume from; the task
                    // goes on for the disconnect grace, as for any subscriber that left.
                    tracing::warn!(task_id = %s.task.id, next_frame = s.next, first_kept = gap.first_kept, "subscriber fell behind the task's log cap");
                    s.done = true;
                    let data = serde_json::to_string(&replay_gap(&s.task, s.next, gap))
                        .unwrap_or_default();
                    let event = Event::default().event("replay_unavailable").data(data);
                    return Some((Ok(event), s));
                }
            };
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
