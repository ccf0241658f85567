//! Durable admissions on paused time: a journal that fails or holds gets the client a 503
//! and never a run; recovery re-queues in order with the wall-clock deadline, ends what was
//! streaming, restores what had ended, and cancels recovered tasks nobody reattaches to at
//! exactly the reattach window. The journal here is `ScriptedJournal`, a fault-and-timing
//! double of the seam: the SQLite journal itself is tested in `journal::tests`, and the whole
//! on real processes killed with SIGKILL in `tests/it/durability.rs`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::ServiceExt;

use super::kit::*;
use crate::journal::{Admission, Ending, Journal, JournalError, Record};

const MS: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Keeps every write (in memory), acknowledged at once.
    Keep,
    /// Every write fails.
    Fail,
    /// No write is ever acknowledged.
    Hold,
}

/// A journal double: records what it is given, in order, and answers as its mode says.
struct ScriptedJournal {
    mode: Mutex<Mode>,
    records: Mutex<Vec<Record>>,
}

impl ScriptedJournal {
    fn new(mode: Mode, records: Vec<Record>) -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(mode),
            records: Mutex::new(records),
        })
    }

    fn answer(&self) -> BoxFuture<'static, Result<(), JournalError>> {
        match *self.mode.lock() {
            Mode::Keep => async { Ok(()) }.boxed(),
            Mode::Fail => async {
                Err(JournalError::Write {
                    path: "scripted".into(),
                    reason: "disk full".into(),
                })
            }
            .boxed(),
            Mode::Hold => futures_util::future::pending().boxed(),
        }
    }

    fn record(&self, id: &str) -> Option<Record> {
        self.records
            .lock()
            .iter()
            .find(|r| r.admission.task_id == id)
            .cloned()
    }
}

impl Journal for ScriptedJournal {
    fn durable(&self) -> bool {
        true
    }
    fn admit(&self, admission: Admission) -> BoxFuture<'static, Result<(), JournalError>> {
        if *self.mode.lock() == Mode::Keep {
            self.records.lock().push(Record {
                admission,
                first_token: false,
                ending: None,
            });
        }
        self.answer()
    }
    fn first_token(
        &self,
        owner: &str,
        task_id: &str,
    ) -> BoxFuture<'static, Result<(), JournalError>> {
        if let Some(r) = self
            .records
            .lock()
            .iter_mut()
            .find(|r| r.admission.owner == owner && r.admission.task_id == task_id)
        {
            r.first_token = true;
        }
        self.answer()
    }
    fn end(&self, ending: Ending) -> BoxFuture<'static, Result<(), JournalError>> {
        if let Some(r) =
            self.records.lock().iter_mut().find(|r| {
                r.admission.owner == ending.owner && r.admission.task_id == ending.task_id
            })
        {
            r.ending.get_or_insert(ending);
        }
        self.answer()
    }
    fn lookup(&self, owner: &str, task_id: &str) -> Result<Option<Record>, JournalError> {
        Ok(self.record(task_id).filter(|r| r.admission.owner == owner))
    }
    fn recover(&self) -> Result<Vec<Record>, JournalError> {
        Ok(self.records.lock().clone())
    }
    fn restarts(&self) -> u64 {
        1
    }
    fn withdraw(&self, owner: &str, task_id: &str) -> BoxFuture<'static, Result<(), JournalError>> {
        self.records
            .lock()
            .retain(|r| r.admission.owner != owner || r.admission.task_id != task_id);
        self.answer()
    }
    fn compact(&self, _: u64, _: u64) -> BoxFuture<'static, Result<u64, JournalError>> {
        async { Ok(0) }.boxed()
    }
}

async fn submit(h: &Harness, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
    let req = Request::post("/v2/tasks")
        .header("authorization", "Bearer inprocess-test-token-0123")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let r = crate::api::router(h.orch.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = r.status();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn flags() -> Vec<&'static str> {
    vec![
        "--api-token=inprocess-test-token-0123",
        "--journal-timeout-ms=500",
        "--recovery-reattach-ms=5000",
    ]
}

// covers: ORCH-2401
#[tokio::test(start_paused = true)]
async fn an_admission_the_journal_fails_is_refused_503_and_never_runs() {
    let journal = ScriptedJournal::new(Mode::Fail, vec![]);
    let h = Harness::start_with_journal(&flags(), journal);
    h.add_pool("p", 1);
    let (status, body) = submit(
        &h,
        serde_json::json!({"task_id": "t1", "model_ref": "tiny", "prompt": "p", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "JOURNAL_UNAVAILABLE");
    assert_eq!(body["retriable"], true);
    settle().await;
    assert!(h.engine.calls().is_empty(), "a refused admission ran");
    // Forgotten: a retry of the id is a new admission.
    assert!(h.task("t1").is_none());
    assert!(h.position("t1").is_none());
    // The admission, then its ending and its withdrawal, each failed and counted.
    assert_eq!(h.orch.metrics.journal_errors.get(), 3);
}

// covers: ORCH-2402
#[tokio::test(start_paused = true)]
async fn an_admission_the_journal_holds_is_refused_503_at_exactly_the_journal_timeout_and_never_runs(
) {
    let journal = ScriptedJournal::new(Mode::Hold, vec![]);
    let h = Harness::start_with_journal(&flags(), journal.clone());
    // A free pool: only the missing durability keeps the task from running.
    h.add_pool("p", 1);
    let body =
        serde_json::json!({"task_id": "t1", "model_ref": "tiny", "prompt": "p", "max_tokens": 3});
    let sent = Instant::now();
    let (status, answer) = submit(&h, body.clone()).await;
    assert_eq!(sent.elapsed(), 500 * MS);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["code"], "JOURNAL_UNAVAILABLE");
    settle().await;
    assert!(h.engine.calls().is_empty(), "a withdrawn admission ran");
    assert!(h.position("t1").is_none(), "withdrawn from the queue");
    // The client retries the same id once the journal answers: a new admission, which runs.
    *journal.mode.lock() = Mode::Keep;
    h.engine.push(tokens(3, MS));
    let (status, answer) = submit(&h, body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let t = h.task("t1").unwrap();
    assert_eq!(outcome(&t).await.0, "end");
    assert_eq!(h.engine.calls().len(), 1);
}

// covers: ORCH-2403
#[tokio::test(start_paused = true)]
async fn a_resubmission_while_the_first_admission_waits_for_the_journal_is_answered_with_it() {
    let journal = ScriptedJournal::new(Mode::Hold, vec![]);
    let h = Harness::start_with_journal(&flags(), journal);
    h.add_pool("p", 1);
    let body =
        serde_json::json!({"task_id": "t1", "model_ref": "tiny", "prompt": "p", "max_tokens": 3});
    let (first, second) = tokio::join!(submit(&h, body.clone()), async {
        tokio::time::sleep(100 * MS).await;
        submit(&h, body.clone()).await
    });
    // Neither got a 202 for an admission that never became durable.
    assert_eq!(first.0, StatusCode::SERVICE_UNAVAILABLE, "{}", first.1);
    assert_eq!(second.0, StatusCode::SERVICE_UNAVAILABLE, "{}", second.1);
    assert!(h.engine.calls().is_empty());
}

// covers: ORCH-2415
#[tokio::test(start_paused = true)]
async fn a_resubmission_of_a_task_only_the_journal_remembers_is_answered_from_it() {
    // Nothing to recover at the start; then the journal holds an ended task the memory does
    // not (as after the in-memory retention forgot it).
    let journal = ScriptedJournal::new(Mode::Keep, vec![]);
    let h = Harness::start_with_journal(&flags(), journal.clone());
    h.add_pool("p", 1);
    journal.records.lock().push(ended("old"));
    assert!(h.task("old").is_none());
    let same = serde_json::json!({"task_id": "old", "model_ref": "tiny", "prompt": "p", "max_tokens": 3, "priority": "batch"});
    let (status, body) = submit(&h, same).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["task_id"], "old");
    // Answered as the ended task it is, back in memory, never run again.
    let task = h.task("old").expect("restored from the journal");
    assert!(task.is_terminal());
    let other = serde_json::json!({"task_id": "old", "model_ref": "tiny", "prompt": "other", "max_tokens": 3});
    let (status, body) = submit(&h, other).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(h.engine.calls().is_empty());
    assert_eq!(
        journal.records.lock().len(),
        1,
        "no second admission record"
    );
}

fn record(id: &str, priority: &str, wall_deadline: Option<u64>, first_token: bool) -> Record {
    let req = serde_json::json!({"task_id": id, "model_ref": "tiny", "prompt": "p", "max_tokens": 3, "priority": priority});
    let parsed: llorch_contracts::tasks::TaskRequest = serde_json::from_value(req.clone()).unwrap();
    let digest = crate::tasks::Task::new(
        id.into(),
        parsed,
        Instant::now(),
        Default::default(),
        id.into(),
        None,
        1 << 20,
    )
    .digest();
    Record {
        admission: Admission {
            task_id: id.into(),
            owner: "shared".into(),
            digest,
            request: req.to_string(),
            correlation_id: id.into(),
            submitted_ms: crate::tasks::now_ms(),
            deadline_ms: wall_deadline,
        },
        first_token,
        ending: None,
    }
}

/// The record of a batch task that streamed and ended (3 tokens, length).
fn ended(id: &str) -> Record {
    let mut r = record(id, "batch", None, true);
    r.ending = Some(Ending {
        task_id: id.into(),
        owner: r.admission.owner.clone(),
        event: serde_json::to_string(&llorch_contracts::tasks::TaskEvent::End {
            tokens_out: 3,
            decode_time_ms: 1,
            decode_ms: 1,
            finish_reason: "length".into(),
        })
        .unwrap(),
        tokens_out: 3,
        finished_ms: crate::tasks::now_ms(),
    });
    r
}

// covers: ORCH-2410
#[tokio::test(start_paused = true)]
async fn recovery_requeues_in_order_ends_what_streamed_restores_what_ended_and_keeps_wall_deadlines(
) {
    let ended = ended("done");
    let wall = crate::tasks::now_ms();
    let journal = ScriptedJournal::new(
        Mode::Keep,
        vec![
            record("b1", "batch", None, false),
            record("i1", "interactive", None, false),
            record("streaming", "batch", None, true),
            record("b2", "batch", Some(wall + 3000), false),
            record("late", "batch", Some(wall.saturating_sub(1)), false),
            ended,
            record("i2", "interactive", None, false),
        ],
    );
    let h = Harness::start_with_journal(&flags(), journal.clone());
    let cancel = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    // The wall clock is not paused: what is left of b2's deadline is read from it at recovery.
    let left = (wall + 3000).saturating_sub(crate::tasks::now_ms());
    let done = crate::recovery::recover(&h.orch, &cancel).unwrap();
    assert_eq!(
        (done.requeued, done.reset, done.restored, done.expired),
        (4, 1, 1, 1)
    );
    // Queue order: interactive first, each class in admission order.
    let order: Vec<String> = h
        .orch
        .queue
        .lock()
        .tasks
        .iter()
        .map(|t| t.id.clone())
        .collect();
    assert_eq!(order, ["i1", "i2", "b1", "b2"]);
    let streaming = h.task("streaming").unwrap();
    assert_eq!(outcome(&streaming).await.0, "WORKER_RESET");
    assert_eq!(outcome(&h.task("late").unwrap()).await.0, "DEADLINE_UNMET");
    let restored = h.task("done").unwrap();
    assert_eq!(restored.status(None).tokens_out, 3);
    assert_eq!(outcome(&restored).await.0, "end");
    // Endings of recovery went to the journal before their frames.
    assert!(journal.record("streaming").unwrap().ending.is_some());
    // b2's deadline is the wall-clock one it was admitted with: 3 s from its admission, what
    // is left of them at recovery.
    let (code, at) = outcome(&h.task("b2").unwrap()).await;
    assert_eq!(code, "DEADLINE_UNMET");
    let waited = at - start;
    let expected = Duration::from_millis(left);
    assert!(
        waited <= expected && waited + 20 * MS >= expected,
        "{waited:?} for {expected:?}"
    );
    // A resubmission of an ended id answers the same task; another body is refused.
    let same = serde_json::json!({"task_id": "done", "model_ref": "tiny", "prompt": "p", "max_tokens": 3, "priority": "batch"});
    assert_eq!(submit(&h, same).await.0, StatusCode::ACCEPTED);
    let other = serde_json::json!({"task_id": "done", "model_ref": "tiny", "prompt": "q", "max_tokens": 3, "priority": "batch"});
    assert_eq!(submit(&h, other).await.0, StatusCode::CONFLICT);
}

// covers: ORCH-2412
#[tokio::test(start_paused = true)]
async fn recovered_tasks_nobody_follows_are_cancelled_at_exactly_the_reattach_window() {
    let journal = ScriptedJournal::new(
        Mode::Keep,
        vec![
            record("alone", "batch", None, false),
            record("followed", "batch", None, false),
        ],
    );
    let h = Harness::start_with_journal(&flags(), journal);
    let cancel = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    crate::recovery::recover(&h.orch, &cancel).unwrap();
    // Its client comes back (and stays) within the window.
    tokio::time::sleep(1000 * MS).await;
    h.task("followed").unwrap().add_subscriber();
    let (code, at) = outcome(&h.task("alone").unwrap()).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at - start, 5000 * MS);
    settle().await;
    assert!(!h.task("followed").unwrap().is_terminal());
    assert!(h.position("followed").is_some());
}

// covers: ORCH-2404
#[tokio::test(start_paused = true)]
async fn an_admission_settles_even_when_its_client_goes_away_while_the_journal_writes() {
    let journal = ScriptedJournal::new(Mode::Hold, vec![]);
    let h = Harness::start_with_journal(&flags(), journal);
    h.add_pool("p", 1);
    let body =
        serde_json::json!({"task_id": "t1", "model_ref": "tiny", "prompt": "p", "max_tokens": 3});
    // The request's future is dropped (its connection closed) before the journal answers.
    let gone = tokio::time::timeout(100 * MS, submit(&h, body)).await;
    assert!(gone.is_err());
    assert!(h.task("t1").is_some(), "queued, waiting for the journal");
    // At the journal timeout the admission is withdrawn all the same: nothing waits for ever.
    tokio::time::sleep(400 * MS).await;
    settle().await;
    assert!(h.task("t1").is_none());
    assert!(h.position("t1").is_none());
    assert!(h.engine.calls().is_empty());
}
