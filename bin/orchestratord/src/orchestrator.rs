//! The orchestrator: admission, cancellation, the dispatcher loop and task completion. Pure
//! decisions (queue order, placement, prediction, sessions) come from `llorch_core`; this
//! module holds the state and does the IO around them.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::tasks::{
    AdmissionResponse, PlacementMode, Priority, TaskEvent, TaskRequest, TaskStreams,
};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_core::{
    place, AdmissionQueue, Decision, PlacementRequest, SessionTable, ThroughputEstimator,
};
use llorch_http::ApiError;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pools::PoolTable;
use crate::tasks::Task;

pub struct Orchestrator {
    pub config: Config,
    pub pools: Arc<PoolTable>,
    /// CLOUD: the pool-managerd poll set (empty in HOME).
    pub managers: Arc<crate::cloud_source::Managers>,
    pub metrics: Arc<Metrics>,
    tasks: RwLock<HashMap<String, Arc<Task>>>,
    queue: Mutex<AdmissionQueue<Arc<Task>>>,
    /// When each queued task expires (deadline or longest queue wait), earliest first.
    expiries: Mutex<BinaryHeap<Expiry>>,
    pub sessions: Mutex<SessionTable>,
    pub estimator: Mutex<ThroughputEstimator>,
    pub wake: Arc<Notify>,
    pub engine_http: reqwest::Client,
    pub control_http: reqwest::Client,
    accepting: AtomicBool,
    /// Owner of every task runner.
    pub runners: TaskTracker,
}

const ID_MAX: usize = 128;

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidParams, msg)
}

impl Orchestrator {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        let wake = Arc::new(Notify::new());
        let engine_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()?;
        let control_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            pools: Arc::new(PoolTable::new(wake.clone())),
            managers: Arc::new(crate::cloud_source::Managers::new(&config.pool_managers)),
            queue: Mutex::new(AdmissionQueue::new(config.admission_capacity)),
            expiries: Mutex::new(BinaryHeap::new()),
            sessions: Mutex::new(SessionTable::new(config.session_ttl)),
            estimator: Mutex::new(ThroughputEstimator::default()),
            tasks: RwLock::new(HashMap::new()),
            accepting: AtomicBool::new(true),
            runners: TaskTracker::new(),
            wake,
            engine_http,
            control_http,
            metrics,
            config,
        })
    }

    pub fn task(&self, id: &str) -> Option<Arc<Task>> {
        self.tasks.read().get(id).cloned()
    }

    pub fn queue_position(&self, id: &str) -> Option<u32> {
        self.queue.lock().position(|t| t.id == id).map(|p| p as u32)
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    fn validate(&self, req: &TaskRequest) -> Result<(), ApiError> {
        if let Some(id) = &req.task_id {
            if !valid_id(id) {
                return Err(invalid(
                    "task_id must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                ));
            }
        }
        if let Some(id) = &req.session_id {
            if !valid_id(id) {
                return Err(invalid(
                    "session_id must be 1-128 characters of A-Z a-z 0-9 - _ . :",
                ));
            }
        }
        if req.model_ref.trim().is_empty() {
            return Err(invalid("model_ref must not be empty"));
        }
        if req.prompt.is_empty() {
            return Err(invalid("prompt must not be empty"));
        }
        if req.max_tokens == 0 || req.max_tokens > self.config.max_tokens_cap {
            return Err(invalid(format!(
                "max_tokens must be between 1 and {}",
                self.config.max_tokens_cap
            )));
        }
        if let Some(engine) = &req.engine {
            if engine != "llamacpp" {
                return Err(invalid(format!(
                    "engine {engine:?} is not supported (llamacpp)"
                )));
            }
        }
        if let Some(t) = req.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(invalid("temperature must be between 0 and 2"));
            }
        }
        if let Some(p) = req.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(invalid("top_p must be in (0, 1]"));
            }
        }
        if req.top_k.is_some_and(|k| k > 1000) {
            return Err(invalid("top_k must be at most 1000"));
        }
        if req.stop.len() > 16 || req.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(invalid(
                "stop takes at most 16 non-empty strings of at most 256 bytes",
            ));
        }
        if req.deadline_ms == Some(0) {
            return Err(invalid("deadline_ms must be greater than 0"));
        }
        if let Some(p) = &req.placement {
            if p.mode == PlacementMode::Pin && p.pin_pool_id.as_deref().is_none_or(str::is_empty) {
                return Err(invalid("placement.mode pin needs placement.pin_pool_id"));
            }
        }
        Ok(())
    }

    fn reject(&self, reason: &str, error: ApiError) -> ApiError {
        self.metrics
            .tasks_rejected
            .with_label_values(&[reason])
            .inc();
        tracing::info!(reason, code = %error.0.code, "task rejected");
        error
    }

    /// `POST /v2/tasks`.
    pub fn admit(self: &Arc<Self>, mut req: TaskRequest) -> Result<AdmissionResponse, ApiError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "admission",
            task_id = tracing::field::Empty,
            session_id = req.session_id.as_deref(),
            model = %req.model_ref
        );
        let _entered = span.enter();
        self.validate(&req)
            .map_err(|e| self.reject("invalid_params", e))?;
        if !self.is_accepting() {
            return Err(self.reject(
                "shutting_down",
                ApiError::new(ErrorCode::PoolUnavailable, "orchestratord is shutting down")
                    .with_retry_after(5000),
            ));
        }
        let id = req
            .task_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        req.task_id = Some(id.clone());
        if !self.pools.serves(&req.model_ref) {
            return Err(self.reject(
                "model_not_available",
                ApiError::new(
                    ErrorCode::ModelNotAvailable,
                    format!("no pool serves model {:?}", req.model_ref),
                )
                .with_retry_after(5000),
            ));
        }
        if let Some(p) = req
            .placement
            .as_ref()
            .filter(|p| p.mode == PlacementMode::Pin)
        {
            let pin = p.pin_pool_id.clone().unwrap_or_default();
            let serves = self
                .pools
                .get(&pin)
                .is_some_and(|e| e.model_id == req.model_ref);
            if !serves && !p.allow_fallback {
                return Err(self.reject(
                    "pool_unavailable",
                    ApiError::new(
                        ErrorCode::PoolUnavailable,
                        format!(
                            "pinned pool {pin:?} does not serve model {:?} now",
                            req.model_ref
                        ),
                    )
                    .with_retry_after(5000),
                ));
            }
        }
        let priority = req.priority;
        let (task, admitted, ahead_tokens) = {
            let mut tasks = self.tasks.write();
            if let Some(existing) = tasks.get(&id) {
                if existing.req != req {
                    return Err(self.reject(
                        "conflict",
                        ApiError::new(
                            ErrorCode::Conflict,
                            format!("task_id {id:?} exists with a different request"),
                        ),
                    ));
                }
                let existing = existing.clone();
                drop(tasks);
                let (position, ahead_tokens) = self.ahead_of(&id);
                return Ok(self.admission_response(&existing, position, ahead_tokens));
            }
            span.record("task_id", id.as_str());
            let trace = llorch_observability::capture(&span);
            let task = Arc::new(Task::new(id.clone(), req, Instant::now(), trace));
            let mut queue = self.queue.lock();
            let weight = u64::from(task.req.max_tokens);
            match queue.admit(task.clone(), priority, weight, self.config.admission_policy) {
                Ok(a) => {
                    tasks.insert(id.clone(), task.clone());
                    let mut ahead_tokens = queue.class_weight(Priority::Interactive);
                    if priority == Priority::Batch {
                        ahead_tokens += queue.class_weight(Priority::Batch);
                    }
                    (task, a, ahead_tokens - weight)
                }
                Err(full) => {
                    drop(queue);
                    drop(tasks);
                    let backoff = self.backoff_ms();
                    return Err(self.reject(
                        "queue_full",
                        ApiError::new(
                            ErrorCode::AdmissionReject,
                            format!("queue is full ({} tasks)", full.capacity),
                        )
                        .with_retry_after(backoff)
                        .with_policy_label(self.config.admission_policy.label()),
                    ));
                }
            }
        };
        // Lock order: `expiries` before `queue` (as in `expire_queued`), never inside it.
        self.expiries
            .lock()
            .push(Expiry::of(&task, self.config.max_queue_wait));
        if let Some(dropped) = admitted.dropped {
            tracing::info!(task_id = %dropped.id, "queue full: dropped oldest queued batch task");
            self.finish(
                &dropped,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::QueueFullDropLru,
                        "dropped from a full queue for a newer task",
                    )
                    .with_retry_after_ms(self.backoff_ms())
                    .with_policy_label("drop-lru"),
                ),
            );
        }
        let position = admitted.position as u32;
        let predicted =
            self.predicted_start_ms(u64::from(position), ahead_tokens, task.req.max_tokens);
        task.emit(&TaskEvent::Queued {
            queue_position: position,
            predicted_start_ms: predicted,
        });
        self.metrics
            .tasks_enqueued
            .with_label_values(&[priority_label(priority)])
            .inc();
        self.update_depth();
        self.metrics
            .admission_latency_ms
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        tracing::debug!(task_id = %id, position, "task admitted");
        self.wake.notify_one();
        Ok(self.admission_response(&task, position, ahead_tokens))
    }

    /// Queue position of a task and the `max_tokens` queued ahead of it (0, 0 once dispatched).
    fn ahead_of(&self, id: &str) -> (u32, u64) {
        let queue = self.queue.lock();
        let mut tokens = 0;
        for (pos, (t, w)) in queue.iter_weighted().enumerate() {
            if t.id == id {
                return (pos as u32, tokens);
            }
            tokens += w;
        }
        (0, 0)
    }

    fn admission_response(
        &self,
        task: &Task,
        position: u32,
        ahead_tokens: u64,
    ) -> AdmissionResponse {
        let sse = format!("/v2/tasks/{}/events", task.id);
        AdmissionResponse {
            task_id: task.id.clone(),
            queue_position: position,
            predicted_start_ms: self.predicted_start_ms(
                u64::from(position),
                ahead_tokens,
                task.req.max_tokens,
            ),
            backoff_ms: 0,
            streams: TaskStreams {
                sse_verbose: format!("{sse}?verbose=true"),
                sse,
            },
        }
    }

    /// Predicted start from measured throughput: the work of the `ahead` tasks (with
    /// `ahead_tokens` between them) beyond the free slots, spread over all ready slots.
    fn predicted_start_ms(&self, ahead: u64, ahead_tokens: u64, own_tokens: u32) -> u64 {
        let (free, total) = self.pools.slot_totals();
        self.estimator
            .lock()
            .predicted_start_ms(ahead, ahead_tokens, own_tokens, free, total)
    }

    /// Suggested client backoff when the queue is full: the predicted wait of a task at the
    /// back of the queue, at least one second.
    fn backoff_ms(&self) -> u64 {
        let (depth, tokens) = {
            let q = self.queue.lock();
            (
                q.len() as u64,
                q.class_weight(Priority::Interactive) + q.class_weight(Priority::Batch),
            )
        };
        // A newcomer is assumed alike to the queue's average task.
        let own = u32::try_from(tokens.checked_div(depth).unwrap_or(0)).unwrap_or(u32::MAX);
        self.predicted_start_ms(depth, tokens, own).max(1000)
    }

    fn update_depth(&self) {
        let q = self.queue.lock();
        let m = &self.metrics.queue_depth;
        m.with_label_values(&["interactive"])
            .set(q.depth(Priority::Interactive) as i64);
        m.with_label_values(&["batch"])
            .set(q.depth(Priority::Batch) as i64);
    }

    /// Appends a terminal event (once) and counts the outcome.
    pub fn finish(&self, task: &Task, event: TaskEvent) {
        let outcome = match &event {
            TaskEvent::End { .. } => "end".to_string(),
            TaskEvent::Error(e) => e.code.as_str().to_string(),
            _ => return,
        };
        if task.emit(&event) {
            let pool = task.pool_id().unwrap_or_else(|| "none".into());
            self.metrics
                .tasks_completed
                .with_label_values(&[&outcome, &pool])
                .inc();
            tracing::info!(task_id = %task.id, pool_id = %pool, session_id = task.req.session_id.as_deref(), outcome, "task finished");
        }
    }

    /// Cancels a task: a queued one is removed and ends at once; a running one is ended by its
    /// runner, which aborts the engine request.
    pub fn cancel(&self, task: &Arc<Task>, reason: ErrorEnvelope) {
        if task.is_terminal() {
            return;
        }
        task.cancel_with(reason);
        let removed = self.queue.lock().remove(|t| t.id == task.id).is_some();
        if removed {
            self.metrics
                .tasks_canceled
                .with_label_values(&["queued"])
                .inc();
            self.finish(task, TaskEvent::Error(task.cancel_reason()));
            self.update_depth();
            self.wake.notify_one();
        }
    }

    /// The dispatcher: places queued tasks whenever capacity may have appeared, expires
    /// deadlines, and tells queued tasks their new positions.
    pub async fn dispatch_loop(self: Arc<Self>, cancel: CancellationToken) {
        // Position updates are coalesced: at most one pass per interval, however fast the
        // queue churns (each pass is linear in the queue length).
        const POSITION_INTERVAL: Duration = Duration::from_millis(50);
        let mut last_publish = Instant::now() - POSITION_INTERVAL;
        let mut published_reorders = 0;
        loop {
            self.dispatch_ready();
            let mut next = self.expire_queued();
            if self.queue.lock().reorders() != published_reorders {
                let due = last_publish + POSITION_INTERVAL;
                if Instant::now() >= due {
                    published_reorders = self.publish_positions();
                    last_publish = Instant::now();
                } else {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            let sleep = tokio::time::sleep_until(
                next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            );
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = sleep => {}
            }
        }
    }

    fn dispatch_ready(self: &Arc<Self>) {
        loop {
            let views = self.pools.views();
            if !views
                .iter()
                .any(|v| v.ready && !v.draining && v.free_slots() > 0)
            {
                break; // nothing can be placed: skip the queue walk
            }
            let now = Instant::now().into_std();
            let picked = {
                let sessions = self.sessions.lock();
                let mut queue = self.queue.lock();
                queue.take_first(|t| {
                    let avoid = t.retry_avoid();
                    let session_pool = t
                        .req
                        .session_id
                        .as_deref()
                        .and_then(|s| sessions.affinity(s, now));
                    let req = PlacementRequest {
                        model: &t.req.model_ref,
                        placement: t.req.placement.as_ref(),
                        session_pool,
                        retry_avoid: avoid.as_deref(),
                    };
                    match place(&views, &req) {
                        Decision::Place(pool) => Some(pool),
                        Decision::Wait => None,
                    }
                })
            };
            let Some((task, pool_id)) = picked else { break };
            let placement = tracing::info_span!("placement", task_id = %task.id, %pool_id);
            llorch_observability::adopt(&placement, &task.trace);
            let _placement = placement.entered();
            match self.pools.lease(&pool_id) {
                Some(lease) => {
                    self.update_depth();
                    let orch = self.clone();
                    self.runners.spawn(crate::runner::run(orch, task, lease));
                }
                None => {
                    // The pool changed under us; try again on the next wake.
                    self.queue.lock().requeue_front(
                        task.clone(),
                        task.req.priority,
                        u64::from(task.req.max_tokens),
                    );
                    break;
                }
            }
        }
    }

    /// Puts a task that failed before its first token back at the front of the queue.
    pub fn requeue(&self, task: Arc<Task>) {
        let priority = task.req.priority;
        let weight = u64::from(task.req.max_tokens);
        self.expiries
            .lock()
            .push(Expiry::of(&task, self.config.max_queue_wait));
        self.queue.lock().requeue_front(task, priority, weight);
        self.update_depth();
        self.wake.notify_one();
    }

    /// Ends queued tasks past their deadline (DEADLINE_UNMET) or past the longest queue wait
    /// (POOL_UNAVAILABLE). Returns the next instant something expires.
    fn expire_queued(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut heap = self.expiries.lock();
            let mut queue = self.queue.lock();
            let next = loop {
                match heap.peek() {
                    Some(e) if e.at <= now => {}
                    Some(e) => break Some(e.at),
                    None => break None,
                }
                let Some(e) = heap.pop() else { break None };
                if e.task.is_terminal() {
                    continue;
                }
                if let Some(t) = queue.remove(|t| Arc::ptr_eq(t, &e.task)) {
                    expired.push(t);
                }
            };
            // Entries of tasks that left the queue stay until their time; rebuild when they
            // dominate, so memory follows the queue, not the traffic.
            if heap.len() > 2 * queue.len() + 1024 {
                let max_wait = self.config.max_queue_wait;
                *heap = queue.iter().map(|t| Expiry::of(t, max_wait)).collect();
            }
            next
        };
        for t in &expired {
            let event = if t.deadline.is_some_and(|d| d <= now) {
                ErrorEnvelope::new(
                    ErrorCode::DeadlineUnmet,
                    "the task could not start before its deadline",
                )
            } else {
                ErrorEnvelope::new(
                    ErrorCode::PoolUnavailable,
                    "no pool could take the task in time",
                )
                .with_retry_after_ms(5000)
            };
            self.finish(t, TaskEvent::Error(event));
        }
        if !expired.is_empty() {
            self.update_depth();
        }
        next
    }

    /// Sends `queued` updates to tasks whose position changed; returns the queue's reorder
    /// count they reflect.
    fn publish_positions(&self) -> u64 {
        let (free, total) = self.pools.slot_totals();
        let (changed, reorders): (Vec<(Arc<Task>, u32, u64)>, u64) = {
            let queue = self.queue.lock();
            let mut ahead_tokens = 0;
            let mut out = Vec::new();
            for (pos, (t, w)) in queue.iter_weighted().enumerate() {
                if t.last_position() != Some(pos as u32) {
                    out.push((t.clone(), pos as u32, ahead_tokens));
                }
                ahead_tokens += w;
            }
            (out, queue.reorders())
        };
        let estimator = self.estimator.lock().clone();
        for (t, pos, ahead_tokens) in changed {
            let predicted = estimator.predicted_start_ms(
                u64::from(pos),
                ahead_tokens,
                t.req.max_tokens,
                free,
                total,
            );
            t.emit(&TaskEvent::Queued {
                queue_position: pos,
                predicted_start_ms: predicted,
            });
        }
        reorders
    }

    /// Shutdown, first step: refuse new tasks and end every queued one.
    pub fn stop_admitting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
        let queued: Vec<Arc<Task>> = {
            let mut q = self.queue.lock();
            std::iter::from_fn(|| q.take_first(|_| Some(())).map(|(t, ())| t)).collect()
        };
        for t in queued {
            self.finish(
                &t,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::PoolUnavailable,
                        "orchestratord is shutting down",
                    )
                    .with_retry_after_ms(5000),
                ),
            );
        }
        self.update_depth();
    }

    /// Shutdown, last step: end running tasks that did not finish within the grace period.
    pub fn cancel_running(&self) {
        let running: Vec<Arc<Task>> = self
            .tasks
            .read()
            .values()
            .filter(|t| !t.is_terminal())
            .cloned()
            .collect();
        for t in running {
            t.cancel_with(
                ErrorEnvelope::new(ErrorCode::PoolUnavailable, "orchestratord is shutting down")
                    .with_retry_after_ms(5000),
            );
        }
    }

    /// Forgets finished tasks past the retention period, and the oldest finished ones beyond
    /// the retention count, so memory follows the configuration, not the traffic.
    pub fn purge_finished(&self) {
        let retention = self.config.task_retention;
        let mut tasks = self.tasks.write();
        tasks.retain(|_, t| t.finished_at().is_none_or(|f| f.elapsed() < retention));
        let mut finished: Vec<(Instant, String)> = tasks
            .values()
            .filter_map(|t| t.finished_at().map(|f| (f, t.id.clone())))
            .collect();
        let excess = finished
            .len()
            .saturating_sub(self.config.task_retention_max);
        if excess > 0 {
            finished.sort_unstable();
            for (_, id) in finished.into_iter().take(excess) {
                tasks.remove(&id);
            }
        }
    }

    /// Forgets finished tasks older than the retention period and expired sessions.
    pub async fn purge_loop(self: Arc<Self>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    self.purge_finished();
                    self.sessions.lock().purge(Instant::now().into_std());
                }
            }
        }
    }
}

/// A queued task's expiry: its deadline or its longest queue wait, whichever comes first.
/// Ordered so that `BinaryHeap` pops the earliest.
struct Expiry {
    at: Instant,
    task: Arc<Task>,
}

impl Expiry {
    fn of(task: &Arc<Task>, max_wait: Duration) -> Self {
        let limit = task.submitted_at + max_wait;
        Self {
            at: task.deadline.map_or(limit, |d| d.min(limit)),
            task: task.clone(),
        }
    }
}

impl PartialEq for Expiry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Expiry {}

impl PartialOrd for Expiry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Expiry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}

pub fn priority_label(p: Priority) -> &'static str {
    match p {
        Priority::Interactive => "interactive",
        Priority::Batch => "batch",
    }
}
