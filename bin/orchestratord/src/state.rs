//! The state every room of orchestratord shares, and the few operations on it that more than
//! one room needs (look a task up, end a task, publish queue depth, predict a start). Rooms:
//! `admission` (new tasks in), `dispatcher` (queued tasks out to runners, and each runner's
//! `Outcome` applied), `runner` (one attempt on one engine), `retention` (finished tasks and
//! sessions forgotten).
//!
//! Locks (parking_lot, never held across `.await`): `tasks` → `queue`; `sessions` → `queue`;
//! a task's own lock is innermost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::tasks::{Priority, TaskEvent};
use llorch_core::{AdmissionQueue, ExpiryHeap, SessionTable, ThroughputEstimator};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pools::PoolTable;
use crate::tasks::Task;

/// The state as the HTTP fronts hold it.
pub type AppState = Arc<Orchestrator>;

pub(crate) struct Orchestrator {
    pub config: Config,
    pub pools: Arc<PoolTable>,
    /// CLOUD: the pool-managerd poll set (empty in HOME).
    pub managers: Arc<crate::cloud_source::Managers>,
    pub metrics: Arc<Metrics>,
    pub tasks: crate::task_map::TaskMap,
    /// Finished tasks, oldest first, for retention.
    pub retired: Arc<Mutex<crate::task_map::Retired>>,
    pub queue: Mutex<Queue>,
    pub sessions: Mutex<SessionTable>,
    pub estimator: Mutex<ThroughputEstimator>,
    /// Wakes the dispatcher: capacity may have appeared, or the queue changed.
    pub wake: Arc<Notify>,
    /// How runners and probes reach engines (HTTP; a scripted engine in tests).
    pub engine: Arc<dyn Engine>,
    pub control_http: reqwest::Client,
    /// Owner of every task runner.
    pub runners: TaskTracker,
    /// Each limited key's admission bucket and count of unfinished tasks.
    pub key_limits: Mutex<HashMap<Arc<str>, crate::limits::KeyState>>,
    /// When the listener that takes node heartbeats was last full (a heartbeat missed then is
    /// not the node's fault).
    pub node_door: Arc<llorch_http::Saturation>,
    /// Streams each key holds open now (`crate::sse::StreamSlot`).
    pub key_streams: Mutex<HashMap<Arc<str>, Arc<std::sync::atomic::AtomicU32>>>,
    /// Which prompt prefixes each pool served recently (cache-aware placement). Innermost
    /// lock: taken under the queue lock, never the other way.
    pub prefix_index: Mutex<llorch_core::PrefixIndex>,
    /// Where admissions, first tokens and endings are made durable (`none`: nowhere).
    pub journal: Arc<dyn crate::journal::Journal>,
    /// Terminal events waiting for their journal record (waited for at shutdown).
    pub finishing: TaskTracker,
}

/// The queue, when its tasks expire, and whether it takes new tasks: one lock, so a task can
/// never slip in after shutdown emptied the queue.
pub(crate) struct Queue {
    pub tasks: AdmissionQueue<Arc<Task>>,
    pub expiries: ExpiryHeap<Arc<Task>>,
    pub accepting: bool,
    /// Queued tasks a subscriber follows (by address): the only ones told their position as
    /// it changes, so a pass costs what is followed, not the queue's length.
    pub followed: HashMap<usize, Arc<Task>>,
    /// When the dispatcher wakes next by itself (`None`: not before it is woken): a new task
    /// that expires earlier wakes it.
    pub dispatcher_wakes_at: Option<Instant>,
}

impl Queue {
    /// Queues `task`'s expiry: its deadline or its longest queue wait, whichever is first.
    pub fn schedule_expiry(&mut self, task: &Arc<Task>, max_wait: Duration) {
        self.expiries
            .push(expiry_of(task, max_wait).into_std(), task.clone());
    }
}

pub(crate) fn expiry_of(task: &Task, max_wait: Duration) -> Instant {
    let limit = task.submitted_at + max_wait;
    task.deadline.map_or(limit, |d| d.min(limit))
}

impl Orchestrator {
    pub fn new(
        config: Config,
        metrics: Arc<Metrics>,
        engine: Arc<dyn Engine>,
    ) -> anyhow::Result<Self> {
        let journal: Arc<dyn crate::journal::Journal> = match &config.journal {
            crate::config::JournalSetting::None => Arc::new(crate::journal::NoJournal),
            crate::config::JournalSetting::Sqlite { dir, sync } => Arc::new(
                crate::journal::SqliteJournal::open(dir, *sync).map_err(anyhow::Error::msg)?,
            ),
        };
        Self::with_journal(config, metrics, engine, journal)
    }

    /// [`Orchestrator::new`] over a given journal (a fault-injection one in tests).
    pub fn with_journal(
        config: Config,
        metrics: Arc<Metrics>,
        engine: Arc<dyn Engine>,
        journal: Arc<dyn crate::journal::Journal>,
    ) -> anyhow::Result<Self> {
        let wake = Arc::new(Notify::new());
        metrics.name_keys(config.metrics_key_labels);
        let control_http = config
            .client_tls
            .builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            retired: Arc::default(),
            pools: Arc::new(PoolTable::new(wake.clone())),
            managers: Arc::new(crate::cloud_source::Managers::new(
                &config.pool_managers,
                config.node_credentials.clone(),
            )),
            queue: Mutex::new(Queue {
                tasks: AdmissionQueue::new(config.admission_capacity),
                expiries: ExpiryHeap::new(),
                accepting: true,
                followed: HashMap::new(),
                dispatcher_wakes_at: None,
            }),
            sessions: Mutex::new(SessionTable::new(config.session_ttl)),
            estimator: Mutex::new(ThroughputEstimator::default()),
            tasks: crate::task_map::TaskMap::default(),
            runners: TaskTracker::new(),
            key_limits: Mutex::new(HashMap::new()),
            key_streams: Mutex::new(HashMap::new()),
            node_door: Arc::default(),
            journal,
            finishing: TaskTracker::new(),
            prefix_index: Mutex::new(llorch_core::PrefixIndex::new(config.prefix_index_blocks)),
            wake,
            engine,
            control_http,
            metrics,
            config,
        })
    }

    /// The task `owner` submitted under `id` (ids are scoped per key).
    pub fn task(&self, owner: &str, id: &str) -> Option<Arc<Task>> {
        self.tasks.get(&crate::tasks::scoped(owner, id))
    }

    /// The task `id` if `caller` may see it; otherwise, as for a task that does not exist,
    /// 404: no one learns whether another key's task exists. Task ids are scoped per key: a
    /// client addresses its own tasks. An admin addresses another key's with `owner`, or
    /// without it a task no other key shares the id of (its own first); an id several keys use
    /// is 409 and names no key.
    pub(crate) fn visible_task(
        &self,
        id: &str,
        owner: Option<&str>,
        caller: &auth_min::Principal,
    ) -> Result<Arc<Task>, llorch_http::ApiError> {
        use llorch_contracts::ErrorCode;
        use llorch_http::ApiError;
        let admin = caller.may(auth_min::Role::Admin);
        let found = match owner {
            Some(owner) if admin || owner == &*caller.name => self.task(owner, id),
            Some(_) => None,
            None => match self.task(&caller.name, id) {
                Some(own) => Some(own),
                None if admin => {
                    // A walk of the table: admins' lookups are rare.
                    let mut holders = self.tasks.filtered(|t| t.id == id);
                    if holders.len() > 1 {
                        return Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!(
                                "{} keys use task_id {id:?}; name one with ?owner=",
                                holders.len()
                            ),
                        ));
                    }
                    holders.pop()
                }
                None => None,
            },
        };
        found.ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no task {id:?}")))
    }

    /// Where `task` stands in the queue (none once it left it).
    pub fn queue_position(&self, task: &Task) -> Option<u32> {
        let key = task.queue_key()?;
        self.queue.lock().tasks.rank(key).map(|(p, _)| p as u32)
    }

    /// A subscriber now follows `task`: a queued task is told its current position (nobody
    /// was told while nobody followed) and is then kept up to date while it is followed.
    pub fn follow_position(&self, task: &Arc<Task>) {
        let Some(key) = task.queue_key() else { return };
        let (position, ahead_tokens) = {
            let mut q = self.queue.lock();
            let Some(rank) = q.tasks.rank(key) else {
                return;
            };
            q.followed
                .entry(Arc::as_ptr(task) as usize)
                .or_insert_with(|| task.clone());
            rank
        };
        let position = position as u32;
        if task.last_position() == Some(position) {
            return;
        }
        let predicted = self.predicted_start_ms(
            &task.req.model_ref,
            u64::from(position),
            ahead_tokens,
            task.req.max_tokens,
        );
        task.emit(&TaskEvent::Queued {
            queue_position: position,
            predicted_start_ms: predicted,
        });
    }

    pub fn is_accepting(&self) -> bool {
        self.queue.lock().accepting
    }

    /// Appends a terminal event (once) and counts the outcome. A journaled task's ending is
    /// written to the journal first: the terminal frame follows the record (the task takes
    /// no other event meanwhile).
    pub fn finish(&self, task: &Arc<Task>, event: TaskEvent) {
        if !matches!(event, TaskEvent::End { .. } | TaskEvent::Error(_)) {
            return;
        }
        // Only a durable journal marks tasks journaled.
        if !task.journaled() {
            finish_now(&self.metrics, &self.retired, task, &event);
            return;
        }
        if !task.claim_terminal() {
            return;
        }
        let ending = crate::journal::Ending {
            task_id: task.id.clone(),
            owner: task.owner.to_string(),
            event: serde_json::to_string(&event).unwrap_or_default(),
            tokens_out: task.tokens_out(),
            finished_ms: crate::tasks::now_ms(),
        };
        let written = self.journal.end(ending);
        let (metrics, retired, task, timeout) = (
            self.metrics.clone(),
            self.retired.clone(),
            task.clone(),
            self.config.journal_timeout,
        );
        self.finishing.spawn(async move {
            match tokio::time::timeout(timeout, written).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    metrics.journal_errors.inc();
                    tracing::error!(task_id = %task.id, %error, "task ending not journaled; a restart may end it again");
                }
                Err(_) => {
                    metrics.journal_errors.inc();
                    tracing::error!(task_id = %task.id, timeout_ms = timeout.as_millis() as u64, "task ending not journaled in time; a restart may end it again");
                }
            }
            finish_now(&metrics, &retired, &task, &event);
        });
    }

    pub fn update_depth(&self) {
        let q = self.queue.lock();
        let m = &self.metrics.queue_depth;
        m.with_label_values(&["interactive"])
            .set(q.tasks.depth(Priority::Interactive) as i64);
        m.with_label_values(&["batch"])
            .set(q.tasks.depth(Priority::Batch) as i64);
    }

    /// Predicted start from measured throughput: the work of the `ahead` tasks (with
    /// `ahead_tokens` between them) beyond the free slots, spread over all ready slots.
    /// A restart of the model's pools in progress adds the measured restart time left.
    pub fn predicted_start_ms(
        &self,
        model: &str,
        ahead: u64,
        ahead_tokens: u64,
        own_tokens: u32,
    ) -> u64 {
        let (free, total) = self.pools.slot_totals();
        let queue =
            self.estimator
                .lock()
                .predicted_start_ms(ahead, ahead_tokens, own_tokens, free, total);
        queue + self.pools.restart_wait_ms(model, Instant::now())
    }
}

pub(crate) fn priority_label(p: Priority) -> &'static str {
    match p {
        Priority::Interactive => "interactive",
        Priority::Batch => "batch",
    }
}

/// Appends the terminal event and counts it (the in-memory half of `finish`).
fn finish_now(
    metrics: &Metrics,
    retired: &Mutex<crate::task_map::Retired>,
    task: &Arc<Task>,
    event: &TaskEvent,
) {
    let outcome = match event {
        TaskEvent::End { .. } => "end".to_string(),
        TaskEvent::Error(e) => e.code.as_str().to_string(),
        _ => return,
    };
    if task.emit(event) {
        task.release_inputs();
        retired.lock().push(task);
        let pool = task.pool_id().unwrap_or_else(|| "none".into());
        metrics
            .tasks_completed
            .with_label_values(&[&outcome, &pool, task.api()])
            .inc();
        let tokens = task.tokens_out();
        if tokens > 0 {
            metrics
                .key_tokens_out
                .with_label_values(&[metrics.key(&task.owner)])
                .inc_by(u64::from(tokens));
        }
        tracing::info!(task_id = %task.id, pool_id = %pool, session_id = task.req.session_id.as_deref(), correlation_id = %task.correlation_id, outcome, "task finished");
    }
}
