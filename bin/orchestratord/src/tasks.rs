//! A task and its event log. Every event is appended as a pre-serialised SSE frame with a
//! sequential id; subscribers replay from any id and then follow new frames (a `watch` of the
//! frame count), so several subscribers and `Last-Event-ID` resumption need no extra
//! machinery. `emit` refuses anything after the terminal event: exactly one terminal event per
//! task, by construction. The log is capped in bytes (`ORCHD_TASK_LOG_MAX_BYTES`): beyond it
//! the oldest frames are dropped, and a replay that asks for them gets [`ReplayGap`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use llorch_contracts::tasks::{TaskEvent, TaskRequest, TaskState, TaskStatus};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One SSE frame: `id`, `event` and the JSON `data`.
#[derive(Debug, Clone)]
pub struct Frame {
    pub id: u64,
    pub event: &'static str,
    /// Shared by every subscriber (a clone is a reference count, not a copy of the text).
    pub data: std::sync::Arc<str>,
}

pub struct Task {
    /// The id the client chose (or admission made): unique only within its owner's tasks.
    pub id: String,
    /// Its key in the task table: the id scoped by the owner ([`scoped`]), so two keys may use
    /// one id and neither learns of the other's task.
    pub key: String,
    /// The request as submitted, except its prompt (held in `prompt` until the task ends).
    pub req: TaskRequest,
    /// SHA-256 of the whole request as submitted: answers an idempotent resubmission after
    /// the prompt is gone.
    digest: [u8; 32],
    /// The prompt, dropped when the task ends: a finished task keeps no input.
    prompt: Mutex<String>,
    pub submitted_at: Instant,
    pub submitted_ms: u64,
    pub deadline: Option<Instant>,
    /// Cancelled when the task must stop (client cancel, disconnect, shutdown).
    pub cancel: CancellationToken,
    /// Trace context of the task's `admission` span: placement, dispatch and SSE spans hang
    /// below it, so one task is one trace.
    pub trace: llorch_observability::TraceContext,
    /// The submitting request's `X-Correlation-Id` (the task id when it had none): sent on
    /// every request made for the task, so both daemons' logs of it can be joined.
    pub correlation_id: String,
    /// An OpenAI request: the engine route and body, and the engine's choices as they arrive.
    pub openai: Option<crate::job::Job>,
    /// The prompt's length in tokens, when admission counted it (a prompt that might not fit
    /// some pool's per-slot context).
    pub prompt_tokens: Option<u32>,
    /// The name of the key that submitted it: only that key (and admins) may see it.
    pub owner: std::sync::Arc<str>,
    /// Its session in the session table: the session id scoped by the owner ([`scoped`]),
    /// so two keys using one session id share no affinity and neither sees the other's.
    pub session: Option<String>,
    /// Its prompt's block names, for cache-aware placement (`llorch_core::prefix_chain`).
    pub prefix_chain: Vec<u64>,
    inner: Mutex<TaskInner>,
    frames_tx: watch::Sender<u64>,
    subscribers: AtomicUsize,
    /// Most bytes the event log keeps; the oldest frames go first (never the last one).
    log_cap: usize,
    /// Bumped each time the last subscriber leaves: a grace timer cancels only if no
    /// subscriber came and went since it started.
    departures: AtomicUsize,
    /// Its admission is in the journal: its first token and its ending are written there too.
    journaled: bool,
    /// Read back from the journal after a restart: the first frame id of its new log (0 for
    /// a task of this run).
    log_base: u64,
    /// Whether its admission record is durable yet: `None` while the journal has not
    /// answered. It is not dispatched before (a withdrawn admission never runs).
    durable: watch::Sender<Option<bool>>,
}

/// Frame ids of a log rebuilt after restart number `n` start at `n << RESTART_SHIFT`: above
/// any id an earlier run's log gave a client, so a reconnecting client's `Last-Event-ID`
/// replays the new log whole.
pub const RESTART_SHIFT: u32 = 40;

/// A replay asked for frames the task's log no longer holds (its byte cap dropped them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayGap {
    /// The oldest frame id still kept.
    pub first_kept: u64,
}

struct TaskInner {
    state: TaskState,
    /// The kept frames: ids `first_id ..` in order.
    frames: VecDeque<Frame>,
    /// Id of `frames[0]` (frames before it were dropped by the byte cap).
    first_id: u64,
    /// Bytes of the kept frames (data plus a fixed overhead per frame).
    log_bytes: usize,
    terminal: bool,
    /// Its terminal event is decided and being journaled: no other event is taken.
    closing: bool,
    pool_id: Option<String>,
    attempts: u32,
    started_at_ms: Option<u64>,
    first_token_at_ms: Option<u64>,
    finished_at_ms: Option<u64>,
    finished_at: Option<Instant>,
    queue_time_ms: Option<u64>,
    tokens_out: u32,
    last_position: Option<u32>,
    /// Where it sits in the queue while queued (a retry queues it under a new key).
    queue_key: Option<llorch_core::QueueKey>,
    /// The engine's report of the last attempt's prompt: tokens from cache, tokens evaluated.
    engine_prompt: Option<(u32, u32)>,
    error: Option<ErrorEnvelope>,
    /// Why `cancel` fired (CANCELLED for clients, POOL_UNAVAILABLE at shutdown).
    cancel_reason: Option<ErrorEnvelope>,
    /// The pool that failed this task before its first token (placement avoids it once).
    retry_avoid: Option<String>,
    /// One of its key's concurrent tasks (a key with a concurrency limit), until it ends.
    key_slot: Option<crate::limits::KeySlot>,
}

/// SHA-256 of a request's JSON form (serde writes fields in declaration order).
pub(crate) fn request_digest(req: &TaskRequest) -> [u8; 32] {
    use sha2::Digest;
    // Written straight into the hasher: no copy of a prompt of up to a mebibyte.
    let mut hasher = sha2::Sha256::new();
    let _ = serde_json::to_writer(&mut hasher, req);
    hasher.finalize().into()
}

/// The most prompt blocks cache-aware placement looks at (32 KiB of prompt).
pub const PREFIX_BLOCKS_MAX: usize = 512;

/// What a frame costs besides its data (the struct, its id and event name).
const FRAME_OVERHEAD: usize = 48;

/// An id (of a task or a session) under the name of the key that uses it: the key of the task
/// and session tables. Names and ids never hold U+001F, so the pair is unambiguous.
pub fn scoped(owner: &str, id: &str) -> String {
    let mut key = String::with_capacity(owner.len() + 1 + id.len());
    scope_into(&mut key, owner, id);
    key
}

/// [`scoped`] into `key`'s buffer (admission writes each task's key once, without formatting).
fn scope_into(key: &mut String, owner: &str, id: &str) {
    key.clear();
    key.push_str(owner);
    key.push('\u{1f}');
    key.push_str(id);
}

/// The owner of tasks and sessions submitted without authentication.
pub const ANONYMOUS: &str = "anonymous";

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Task {
    pub fn new(
        id: String,
        mut req: TaskRequest,
        now: Instant,
        trace: llorch_observability::TraceContext,
        correlation_id: String,
        openai: Option<crate::job::Job>,
        log_cap: usize,
    ) -> Self {
        let digest = request_digest(&req);
        let prompt = std::mem::take(&mut req.prompt);
        let session = req.session_id.as_deref().map(|s| scoped(ANONYMOUS, s));
        let deadline = req
            .deadline_ms
            .map(|ms| now + std::time::Duration::from_millis(ms));
        Self {
            key: scoped(ANONYMOUS, &id),
            id,
            req,
            digest,
            prompt: Mutex::new(prompt),
            submitted_at: now,
            submitted_ms: now_ms(),
            deadline,
            cancel: CancellationToken::new(),
            trace,
            correlation_id,
            openai,
            prompt_tokens: None,
            session,
            owner: std::sync::Arc::from(ANONYMOUS),
            prefix_chain: Vec::new(),
            inner: Mutex::new(TaskInner {
                state: TaskState::Queued,
                frames: VecDeque::new(),
                first_id: 0,
                log_bytes: 0,
                terminal: false,
                closing: false,
                pool_id: None,
                attempts: 0,
                started_at_ms: None,
                first_token_at_ms: None,
                finished_at_ms: None,
                finished_at: None,
                queue_time_ms: None,
                tokens_out: 0,
                last_position: None,
                queue_key: None,
                engine_prompt: None,
                error: None,
                cancel_reason: None,
                retry_avoid: None,
                key_slot: None,
            }),
            frames_tx: watch::channel(0).0,
            subscribers: AtomicUsize::new(0),
            log_cap,
            departures: AtomicUsize::new(0),
            journaled: false,
            log_base: 0,
            durable: watch::channel(Some(true)).0,
        }
    }

    /// Holds one of its key's concurrent tasks until it ends (or, never admitted, is dropped).
    pub fn with_key_slot(mut self, slot: Option<crate::limits::KeySlot>) -> Self {
        self.inner.get_mut().key_slot = slot;
        self
    }

    /// Owned by the key named `owner`.
    pub fn with_owner(mut self, owner: std::sync::Arc<str>) -> Self {
        self.session = self.req.session_id.as_deref().map(|s| scoped(&owner, s));
        scope_into(&mut self.key, &owner, &self.id);
        self.owner = owner;
        self
    }

    /// With its prompt's block names (cache-aware placement).
    pub fn with_prefix_chain(mut self, chain: Vec<u64>) -> Self {
        self.prefix_chain = chain;
        self
    }

    /// Its admission is (being) journaled: not durable until [`Task::set_durable`].
    pub fn with_journal(mut self) -> Self {
        self.journaled = true;
        self.durable.send_replace(None);
        self
    }

    /// The journal answered its admission record: durable, or not (withdrawn).
    pub fn set_durable(&self, durable: bool) {
        self.durable.send_replace(Some(durable));
    }

    /// Whether its admission is durable (`None`: not answered yet).
    pub fn durable(&self) -> Option<bool> {
        *self.durable.borrow()
    }

    /// Waits until the journal answered its admission, at most `within`.
    pub async fn wait_durable(&self, within: std::time::Duration) -> Option<bool> {
        let mut rx = self.durable.subscribe();
        let answered = tokio::time::timeout(within, rx.wait_for(Option::is_some)).await;
        match answered {
            Ok(Ok(state)) => *state,
            _ => None,
        }
    }

    pub fn journaled(&self) -> bool {
        self.journaled
    }

    /// A task read back from the journal after a restart: the digest it was admitted with,
    /// its submission time and its deadline (from the wall clock) instead of now's.
    /// `restart`: how many times the journal was opened before this run (its log starts at
    /// `restart << RESTART_SHIFT`).
    pub fn recovered(
        mut self,
        digest: [u8; 32],
        submitted_ms: u64,
        deadline: Option<Instant>,
        restart: u64,
    ) -> Self {
        self.digest = digest;
        self.submitted_ms = submitted_ms;
        self.deadline = deadline;
        self.journaled = true;
        self.durable.send_replace(Some(true));
        let base = restart.clamp(1, u64::MAX >> RESTART_SHIFT) << RESTART_SHIFT;
        self.log_base = base;
        self.inner.get_mut().first_id = base;
        self.frames_tx.send_replace(base);
        self
    }

    /// Where a subscription asking for frames from `from` starts: a task recovered after a
    /// restart has a new log, numbered from its log base, so an id of an older log (what a
    /// client reconnecting after the restart has seen) replays the new log whole.
    pub fn resume_point(&self, from: u64) -> u64 {
        from.max(self.log_base)
    }

    /// Nobody has followed its events yet.
    pub fn never_followed(&self) -> bool {
        self.subscribers.load(Ordering::SeqCst) == 0 && self.departures.load(Ordering::SeqCst) == 0
    }

    /// A finished task read back from the journal: its count of tokens streamed.
    pub fn restore_tokens_out(&self, n: u32) {
        self.inner.lock().tokens_out = n;
    }

    /// Decides the terminal event ahead of appending it (while it is journaled): true for the
    /// first caller; from then on no other event is taken.
    pub fn claim_terminal(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.terminal || inner.closing {
            return false;
        }
        inner.closing = true;
        true
    }

    /// With the prompt's length in tokens (admission counted it).
    pub fn with_prompt_tokens(mut self, tokens: Option<u32>) -> Self {
        self.prompt_tokens = tokens;
        self
    }

    /// The per-slot context the task needs: its `ctx`, and its counted prompt plus
    /// `max_tokens`, whichever is larger.
    pub fn needed_ctx(&self) -> Option<u32> {
        let counted = self
            .prompt_tokens
            .map(|p| p.saturating_add(self.req.max_tokens));
        self.req.ctx.max(counted)
    }

    /// SHA-256 of the request it was admitted with.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The prompt (empty once the task ended).
    pub fn prompt(&self) -> String {
        self.prompt.lock().clone()
    }

    /// Drops what the task was given to work on (its prompt, an OpenAI body): called once it
    /// ended, so retained tasks cost their event log and little else.
    pub fn release_inputs(&self) {
        *self.prompt.lock() = String::new();
        if let Some(job) = &self.openai {
            job.release();
        }
    }

    /// Which API submitted the task: the `api` label of its metrics.
    pub fn api(&self) -> &'static str {
        if self.openai.is_some() {
            "openai"
        } else {
            "v2"
        }
    }

    /// Appends an event. Returns false (and drops it) once the task has its terminal event.
    pub fn emit(&self, event: &TaskEvent) -> bool {
        let data = match event {
            // The hot path: one small JSON object per token, written directly.
            TaskEvent::Token { t, i } => {
                let text = serde_json::to_string(t).unwrap_or_else(|_| "\"\"".into());
                format!("{{\"t\":{text},\"i\":{i}}}")
            }
            TaskEvent::Queued {
                queue_position,
                predicted_start_ms,
            } => format!(
                "{{\"queue_position\":{queue_position},\"predicted_start_ms\":{predicted_start_ms}}}"
            ),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|mut v| v.get_mut("data").map(serde_json::Value::take))
                .map(|v| v.to_string())
                .unwrap_or_else(|| "{}".into()),
        };
        let size = data.len() + FRAME_OVERHEAD;
        let count = {
            let mut inner = self.inner.lock();
            if inner.terminal || (inner.closing && !event.is_terminal()) {
                return false;
            }
            match event {
                TaskEvent::Token { .. } => {
                    inner.tokens_out += 1;
                    if inner.first_token_at_ms.is_none() {
                        inner.first_token_at_ms = Some(now_ms());
                    }
                }
                TaskEvent::End { .. } => {
                    inner.state = TaskState::Completed;
                }
                TaskEvent::Error(e) => {
                    inner.state = if e.code == ErrorCode::Cancelled {
                        TaskState::Cancelled
                    } else {
                        TaskState::Failed
                    };
                    inner.error = Some(e.clone());
                }
                TaskEvent::Queued { queue_position, .. } => {
                    inner.last_position = Some(*queue_position)
                }
                _ => {}
            }
            if event.is_terminal() {
                // Its key's slot goes back with the terminal event.
                inner.key_slot = None;
                inner.terminal = true;
                inner.finished_at_ms = Some(now_ms());
                inner.finished_at = Some(Instant::now());
            }
            let id = inner.first_id + inner.frames.len() as u64;
            inner.frames.push_back(Frame {
                id,
                event: event.name(),
                data: data.into(),
            });
            inner.log_bytes += size;
            while inner.log_bytes > self.log_cap && inner.frames.len() > 1 {
                let Some(old) = inner.frames.pop_front() else {
                    break;
                };
                inner.first_id = old.id + 1;
                inner.log_bytes -= old.data.len() + FRAME_OVERHEAD;
            }
            id + 1
        };
        self.frames_tx.send_replace(count);
        true
    }

    /// Memory the task keeps for replay: its event log and (OpenAI) the engine's chunks.
    pub fn retained_bytes(&self) -> usize {
        self.inner.lock().log_bytes + self.openai.as_ref().map_or(0, |j| j.log.bytes())
    }

    /// The oldest frame id the log still keeps.
    pub fn first_kept(&self) -> u64 {
        self.inner.lock().first_id
    }

    /// Frames with id ≥ `from`, and whether the terminal frame is among all frames; a gap
    /// when frames from `from` on were dropped by the log's byte cap.
    pub fn frames_from(&self, from: u64) -> Result<(Vec<Frame>, bool), ReplayGap> {
        let inner = self.inner.lock();
        if from < inner.first_id {
            return Err(ReplayGap {
                first_kept: inner.first_id,
            });
        }
        let start = ((from - inner.first_id) as usize).min(inner.frames.len());
        Ok((
            inner.frames.range(start..).cloned().collect(),
            inner.terminal,
        ))
    }

    /// Wakes the followers of the frame watch without a new frame (something they read
    /// besides frames changed).
    pub fn poke(&self) {
        self.frames_tx.send_modify(|_| {});
    }

    pub fn watch_frames(&self) -> watch::Receiver<u64> {
        self.frames_tx.subscribe()
    }

    pub fn is_terminal(&self) -> bool {
        self.inner.lock().terminal
    }

    pub fn finished_at(&self) -> Option<Instant> {
        self.inner.lock().finished_at
    }

    pub fn last_position(&self) -> Option<u32> {
        self.inner.lock().last_position
    }

    /// Set under the queue lock when the task is queued.
    pub fn set_queue_key(&self, key: llorch_core::QueueKey) {
        self.inner.lock().queue_key = Some(key);
    }

    /// Its key in the queue (stale once it left: the queue then finds nothing under it).
    pub fn queue_key(&self) -> Option<llorch_core::QueueKey> {
        self.inner.lock().queue_key
    }

    pub fn set_engine_prompt(&self, report: (u32, u32)) {
        self.inner.lock().engine_prompt = Some(report);
    }

    /// Prompt tokens the engine took from its cache and evaluated, when it said, taken: each
    /// attempt's report is counted once, and a retry that reports nothing counts nothing.
    pub fn take_engine_prompt(&self) -> Option<(u32, u32)> {
        self.inner.lock().engine_prompt.take()
    }

    /// An OpenAI embeddings request (no generation, no slot pinning).
    pub fn is_embeddings(&self) -> bool {
        self.openai
            .as_ref()
            .is_some_and(crate::job::Job::is_embeddings)
    }

    /// Its subscribers now.
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load(Ordering::SeqCst)
    }

    /// Whether some subscriber follows it now.
    pub fn followed(&self) -> bool {
        self.subscribers.load(Ordering::SeqCst) > 0
    }

    pub fn add_subscriber(&self) {
        self.subscribers.fetch_add(1, Ordering::SeqCst);
    }

    /// `Some(departure)` when this was the last subscriber: the number of that departure.
    pub fn remove_subscriber(&self) -> Option<usize> {
        (self.subscribers.fetch_sub(1, Ordering::SeqCst) == 1)
            .then(|| self.departures.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Whether nobody subscribed since `departure` (and nobody is subscribed now).
    pub fn still_abandoned(&self, departure: usize) -> bool {
        self.subscribers.load(Ordering::SeqCst) == 0
            && self.departures.load(Ordering::SeqCst) == departure
    }

    /// Marks a dispatch to `pool_id`; returns the attempt number (1 = first).
    pub fn start_attempt(&self, pool_id: &str) -> (u32, u64) {
        let mut inner = self.inner.lock();
        inner.attempts += 1;
        inner.state = TaskState::Running;
        inner.pool_id = Some(pool_id.to_string());
        inner.last_position = None;
        let now = now_ms();
        if inner.started_at_ms.is_none() {
            inner.started_at_ms = Some(now);
        }
        let queue_time = self.submitted_at.elapsed().as_millis() as u64;
        inner.queue_time_ms.get_or_insert(queue_time);
        (inner.attempts, queue_time)
    }

    /// Back to the queue after an engine failed before the first token.
    pub fn requeued(&self, failed_pool: &str) {
        let mut inner = self.inner.lock();
        inner.state = TaskState::Queued;
        inner.retry_avoid = Some(failed_pool.to_string());
    }

    pub fn retry_avoid(&self) -> Option<String> {
        self.inner.lock().retry_avoid.clone()
    }

    pub fn pool_id(&self) -> Option<String> {
        self.inner.lock().pool_id.clone()
    }

    /// Cancels with a reason; the first reason wins.
    pub fn cancel_with(&self, reason: ErrorEnvelope) {
        self.inner.lock().cancel_reason.get_or_insert(reason);
        self.cancel.cancel();
    }

    pub fn cancel_reason(&self) -> ErrorEnvelope {
        self.inner
            .lock()
            .cancel_reason
            .clone()
            .unwrap_or_else(|| ErrorEnvelope::new(ErrorCode::Cancelled, "task cancelled"))
    }

    /// Token events appended so far.
    pub fn tokens_out(&self) -> u32 {
        self.inner.lock().tokens_out
    }

    pub fn status(&self, queue_position: Option<u32>) -> TaskStatus {
        let inner = self.inner.lock();
        TaskStatus {
            task_id: self.id.clone(),
            state: inner.state,
            priority: self.req.priority,
            model_ref: self.req.model_ref.clone(),
            session_id: self.req.session_id.clone(),
            pool_id: inner.pool_id.clone(),
            queue_position,
            attempts: inner.attempts,
            tokens_out: inner.tokens_out,
            submitted_at_ms: self.submitted_ms,
            started_at_ms: inner.started_at_ms,
            first_token_at_ms: inner.first_token_at_ms,
            finished_at_ms: inner.finished_at_ms,
            queue_time_ms: inner.queue_time_ms,
            error: inner.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        task_capped(usize::MAX)
    }

    fn task_capped(log_cap: usize) -> Task {
        let req: TaskRequest = serde_json::from_value(serde_json::json!({
            "model_ref": "m", "prompt": "p", "max_tokens": 3
        }))
        .unwrap();
        Task::new(
            "t".into(),
            req,
            Instant::now(),
            Default::default(),
            "t".into(),
            None,
            log_cap,
        )
    }

    // covers: ORCH-2411
    #[test]
    fn a_log_rebuilt_after_a_restart_starts_above_every_id_of_earlier_runs() {
        // Run 0 gave a client ids 0..; after the first restart the log starts at 1 << 40, and
        // after the second at 2 << 40, above the first restart's ids too.
        let first = task().recovered([0; 32], 0, None, 1);
        assert_eq!(first.first_kept(), 1 << RESTART_SHIFT);
        assert_eq!(first.resume_point(7), 1 << RESTART_SHIFT);
        let second = task().recovered([0; 32], 0, None, 2);
        let seen_in_first_restart = (1 << RESTART_SHIFT) + 3;
        assert_eq!(
            second.resume_point(seen_in_first_restart),
            2 << RESTART_SHIFT
        );
        assert!(second.emit(&TaskEvent::End {
            tokens_out: 0,
            decode_time_ms: 0,
            decode_ms: 0,
            finish_reason: "stop".into(),
        }));
        // The whole new log, terminal frame included, for a client of either earlier run.
        let (frames, done) = second
            .frames_from(second.resume_point(seen_in_first_restart))
            .unwrap();
        assert_eq!(frames.len(), 1);
        assert!(done);
        // A task of this run is unchanged.
        assert_eq!(task().resume_point(5), 5);
    }

    // covers: ORCH-2303
    #[test]
    fn only_one_terminal_event_is_ever_recorded() {
        let t = task();
        assert!(t.emit(&TaskEvent::Token {
            t: "a".into(),
            i: 0
        }));
        assert!(t.emit(&TaskEvent::Error(ErrorEnvelope::new(
            ErrorCode::Cancelled,
            "x"
        ))));
        assert!(!t.emit(&TaskEvent::End {
            tokens_out: 1,
            decode_time_ms: 0,
            decode_ms: 0,
            finish_reason: "stop".into()
        }));
        assert!(!t.emit(&TaskEvent::Token {
            t: "b".into(),
            i: 1
        }));
        let (frames, terminal) = t.frames_from(0).unwrap();
        assert!(terminal);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].event, "error");
        assert_eq!(t.status(None).state, TaskState::Cancelled);
        assert_eq!(&*frames[0].data, r#"{"t":"a","i":0}"#);
        let parsed: serde_json::Value = serde_json::from_str(&frames[0].data).unwrap();
        assert_eq!(parsed, serde_json::json!({"t": "a", "i": 0}));
    }

    proptest::proptest! {
        /// The hand-written frames of the hot path (`token`, `queued`) are byte for byte what
        /// serde writes for the same event.
        #[test]
        fn fast_path_frames_equal_their_serde_form(
            text in ".*",
            i in proptest::prelude::any::<u32>(),
            position in proptest::prelude::any::<u32>(),
            predicted in proptest::prelude::any::<u64>(),
        ) {
            let t = task();
            let events = [
                TaskEvent::Token { t: text.clone(), i },
                TaskEvent::Queued { queue_position: position, predicted_start_ms: predicted },
            ];
            for event in &events {
                proptest::prop_assert!(t.emit(event));
            }
            let (frames, _) = t.frames_from(0).unwrap();
            for (frame, event) in frames.iter().zip(&events) {
                let serde_form = serde_json::to_string(event).unwrap();
                let framed = format!("{{\"event\":\"{}\",\"data\":{}}}", frame.event, frame.data);
                proptest::prop_assert_eq!(framed, serde_form);
            }
        }
    }

    // covers: ORCH-2304
    #[test]
    fn replay_starts_after_the_given_id() {
        let t = task();
        for i in 0..5 {
            t.emit(&TaskEvent::Token {
                t: format!("{i}"),
                i,
            });
        }
        let (frames, terminal) = t.frames_from(3).unwrap();
        assert!(!terminal);
        assert_eq!(frames.iter().map(|f| f.id).collect::<Vec<_>>(), vec![3, 4]);
        assert!(t.frames_from(99).unwrap().0.is_empty());
    }

    // covers: ORCH-2305
    #[test]
    fn the_log_keeps_at_most_its_cap_dropping_the_oldest_frames_and_says_where_it_starts() {
        // Each token frame is its data plus FRAME_OVERHEAD: room for about four of them.
        let frame = r#"{"t":"0","i":0}"#.len() + FRAME_OVERHEAD;
        let t = task_capped(4 * frame + frame / 2);
        for i in 0..10 {
            t.emit(&TaskEvent::Token {
                t: format!("{i}"),
                i,
            });
            assert!(t.retained_bytes() <= 4 * frame + frame / 2);
        }
        let (kept, _) = t.frames_from(6).unwrap();
        assert_eq!(
            kept.iter().map(|f| f.id).collect::<Vec<_>>(),
            vec![6, 7, 8, 9]
        );
        assert_eq!(t.frames_from(5).unwrap_err(), ReplayGap { first_kept: 6 });
        assert_eq!(t.frames_from(0).unwrap_err(), ReplayGap { first_kept: 6 });
        // The terminal frame is kept even when it alone is over the cap.
        let big = "x".repeat(10 * frame);
        assert!(t.emit(&TaskEvent::Error(ErrorEnvelope::new(
            ErrorCode::Internal,
            big
        ))));
        let (kept, terminal) = t.frames_from(10).unwrap();
        assert!(terminal);
        assert_eq!(
            kept.iter().map(|f| (f.id, f.event)).collect::<Vec<_>>(),
            vec![(10, "error")]
        );
        assert_eq!(t.frames_from(9).unwrap_err(), ReplayGap { first_kept: 10 });
    }
}
