//! Recovery at start, from the journal: every task that got a 202 before a crash is known
//! again and reaches exactly one terminal event.
//! - Ended in the journal: restored as finished (status, idempotent resubmission).
//! - Its first token had left: ended with a retriable `WORKER_RESET` (a generation cannot be
//!   resumed bit-identically).
//! - Never started streaming: queued again, in admission order within its priority class,
//!   with its deadline on the wall clock (one already past ends `DEADLINE_UNMET`), its session
//!   and its owner. For `ORCHD_RECOVERY_REATTACH_MS` such a task waits for its client; after
//!   that, one that nobody follows is cancelled as a disconnected one would be (when
//!   disconnect-cancel is on).

use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::tasks::{TaskEvent, TaskRequest};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::journal::Record;
use crate::state::Orchestrator;
use crate::tasks::{now_ms, Task};

/// What recovery did, for the start-up log line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub requeued: u64,
    pub reset: u64,
    pub restored: u64,
    pub expired: u64,
    pub unreadable: u64,
}

/// The task a record describes, not yet in any table: its request (without the prompt once
/// ended), digest, owner, times.
fn task_of(orch: &Orchestrator, r: &Record, now: Instant) -> Option<Task> {
    // An ended task's record keeps no prompt.
    let parsed =
        serde_json::from_str::<serde_json::Value>(&r.admission.request).and_then(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.entry("prompt").or_insert_with(|| "".into());
            }
            serde_json::from_value::<TaskRequest>(v)
        });
    let req = match parsed {
        Ok(req) => req,
        Err(error) => {
            tracing::error!(task_id = %r.admission.task_id, %error, "journal record unreadable; task skipped");
            return None;
        }
    };
    let wall = now_ms();
    let deadline = r
        .admission
        .deadline_ms
        .map(|d| now + Duration::from_millis(d.saturating_sub(wall)));
    Some(
        Task::new(
            r.admission.task_id.clone(),
            req,
            now,
            llorch_observability::TraceContext::default(),
            r.admission.correlation_id.clone(),
            None,
            orch.config.task_log_max_bytes,
        )
        .with_owner(Arc::from(r.admission.owner.as_str()))
        .recovered(
            r.admission.digest,
            r.admission.submitted_ms,
            deadline,
            orch.journal.restarts(),
        ),
    )
}

/// A task the journal holds as ended, rebuilt for status and resubmission answers (its log
/// holds only the terminal event).
pub(crate) fn finished_task(orch: &Orchestrator, r: &Record) -> Option<Arc<Task>> {
    let ending = r.ending.as_ref()?;
    let task = task_of(orch, r, Instant::now())?;
    let event: TaskEvent = match serde_json::from_str(&ending.event) {
        Ok(e) => e,
        Err(error) => {
            tracing::error!(task_id = %r.admission.task_id, %error, "journaled ending unreadable; task skipped");
            return None;
        }
    };
    task.restore_tokens_out(ending.tokens_out);
    task.release_inputs();
    task.emit(&event);
    Some(Arc::new(task))
}

/// Replays the journal into `orch` (before it serves): see the module's rules. Re-queued
/// tasks keep their order; the dispatcher, started after, takes them first.
pub(crate) fn recover(
    orch: &Arc<Orchestrator>,
    cancel: &CancellationToken,
) -> Result<Recovered, crate::journal::JournalError> {
    let records = orch.journal.recover()?;
    let mut done = Recovered::default();
    let now = Instant::now();
    let count = |outcome: &str| {
        orch.metrics
            .recovered_tasks
            .with_label_values(&[outcome])
            .inc()
    };
    for r in records {
        if r.ending.is_some() {
            match finished_task(orch, &r) {
                Some(task) => {
                    orch.retired.lock().push(&task);
                    orch.tasks.insert(task);
                    done.restored += 1;
                    count("restored");
                }
                None => done.unreadable += 1,
            }
            continue;
        }
        let Some(task) = task_of(orch, &r, now) else {
            done.unreadable += 1;
            continue;
        };
        let task = Arc::new(task);
        orch.tasks.insert(task.clone());
        if r.first_token {
            task.release_inputs();
            orch.finish(
                &task,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::WorkerReset,
                        "orchestratord restarted while this task was streaming; a generation cannot be resumed: submit it again under a new task_id",
                    )
                    .with_retry_after_ms(1000),
                ),
            );
            done.reset += 1;
            count("reset");
            continue;
        }
        if task.deadline.is_some_and(|d| d <= now) {
            orch.finish(
                &task,
                TaskEvent::Error(ErrorEnvelope::new(
                    ErrorCode::DeadlineUnmet,
                    "the deadline passed while orchestratord was down",
                )),
            );
            done.expired += 1;
            count("expired");
            continue;
        }
        {
            let mut queue = orch.queue.lock();
            let weight = u64::from(task.req.max_tokens);
            let key = queue.tasks.admit_forced(
                task.clone(),
                task.req.priority,
                weight,
                orch.queue_flow(&task.owner),
            );
            task.set_queue_key(key);
            queue.schedule_expiry(&task, orch.config.max_queue_wait);
        }
        task.emit(&TaskEvent::Queued {
            queue_position: orch.queue_position(&task).unwrap_or(0),
            predicted_start_ms: 0,
        });
        if orch.config.cancel_on_disconnect {
            tokio::spawn(reattach_window(
                orch.clone(),
                task.clone(),
                cancel.child_token(),
            ));
        }
        done.requeued += 1;
        count("requeued");
    }
    orch.update_depth();
    orch.wake.notify_one();
    Ok(done)
}

/// After the reattach window, a recovered task that nobody has followed is cancelled, as one
/// whose client disconnected.
async fn reattach_window(orch: Arc<Orchestrator>, task: Arc<Task>, cancel: CancellationToken) {
    let window = orch.config.recovery_reattach;
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = tokio::time::sleep(window) => {}
    }
    if task.is_terminal() || !task.never_followed() {
        return;
    }
    tracing::info!(task_id = %task.id, window_ms = window.as_millis() as u64, "no client reattached to a recovered task; cancelling it");
    orch.cancel(
        &task,
        ErrorEnvelope::new(
            ErrorCode::Cancelled,
            format!(
                "no client followed the task within {} ms of the restart (ORCHD_RECOVERY_REATTACH_MS)",
                window.as_millis()
            ),
        ),
    );
}
