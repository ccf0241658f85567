//! Admission: validate a request, answer a resubmission idempotently, queue the task under the
//! queue policy, tell it its position. Also the ways out of the queue that are not a dispatch:
//! a client's cancel, and shutdown.

use std::sync::Arc;

use llorch_contracts::tasks::{
    AdmissionResponse, Determinism, PlacementMode, Priority, TaskEvent, TaskRequest, TaskStreams,
};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_http::ApiError;
use tokio::time::Instant;

use crate::config::Config;
use crate::limits::{over_limit, KeySlot, KeyState};
use crate::state::{priority_label, Orchestrator};
use crate::tasks::Task;

const ID_MAX: usize = 128;

pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidParams, msg)
}

fn shutting_down() -> ErrorEnvelope {
    ErrorEnvelope::new(ErrorCode::PoolUnavailable, "orchestratord is shutting down")
        .with_retry_after_ms(5000)
}

fn validate(config: &Config, req: &TaskRequest) -> Result<(), ApiError> {
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
    if req.max_tokens == 0 || req.max_tokens > config.max_tokens_cap {
        return Err(invalid(format!(
            "max_tokens must be between 1 and {}",
            config.max_tokens_cap
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
    if let Some(ctx) = req.ctx {
        if ctx < req.max_tokens {
            return Err(invalid(format!(
                "ctx ({ctx}) must hold max_tokens ({})",
                req.max_tokens
            )));
        }
    }
    if req.determinism == Some(Determinism::Strict) && req.seed.is_none() {
        return Err(invalid(
            "determinism strict needs a seed (the same seed, prompt and sampling parameters reproduce the output)",
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

/// The largest prompt admission has an engine count (bigger ones are judged by the engine).
pub const COUNT_PROMPT_MAX_BYTES: usize = 64 * 1024;

/// The journal's record of a task id (`None`: it holds none), or why it could not be read.
type JournalLookup = Result<Option<crate::journal::Record>, crate::journal::JournalError>;

/// Resolves once an admission is durable (or failed to be).
pub(crate) type Durable =
    futures_util::future::BoxFuture<'static, Result<(), crate::journal::JournalError>>;

/// The answer to a submission whose admission could not be made durable.
fn journal_refusal() -> ApiError {
    ApiError::new(
        ErrorCode::JournalUnavailable,
        "the admission could not be made durable; nothing was admitted: retry",
    )
    .with_retry_after(1000)
}

impl Orchestrator {
    /// A key's state under its limits (made on its first admission).
    fn key_state<'a>(
        keys: &'a mut std::collections::HashMap<std::sync::Arc<str>, KeyState>,
        owner: &auth_min::Principal,
        now: Instant,
    ) -> &'a mut KeyState {
        keys.entry(owner.name.clone())
            .or_insert_with(|| KeyState::new(owner.limits, now))
    }

    /// A refusal under a key's limit, counted for the key.
    fn key_refusal(
        &self,
        owner: &auth_min::Principal,
        reason: &'static str,
        message: String,
        retry_ms: u64,
    ) -> ApiError {
        self.metrics
            .key_tasks
            .with_label_values(&[self.metrics.key(&owner.name), reason])
            .inc();
        self.reject(reason, over_limit(reason, message, retry_ms))
    }

    /// A key's admission rate: takes one token from its bucket, or 429 when it is empty (retry
    /// when the next token comes). Taken at the door of every admission, before anything costs
    /// the service work (the prompt's count on an engine, the journal), so a key past its rate
    /// gets nothing done, and a resubmission counts like any request.
    pub(crate) fn key_rate(&self, owner: &auth_min::Principal) -> Result<(), ApiError> {
        let Some(rate) = owner.limits.rate_per_s else {
            return Ok(());
        };
        let now = Instant::now();
        let mut keys = self.key_limits.lock();
        let taken = Self::key_state(&mut keys, owner, now).take(owner.limits, rate, now);
        drop(keys);
        taken.map_err(|wait_ms| {
            self.key_refusal(
                owner,
                "key_rate",
                format!(
                    "key {:?} submits faster than its limit ({rate}/s)",
                    owner.name
                ),
                wait_ms,
            )
        })
    }

    /// A key's concurrency: 429 when it has its most tasks unfinished. `Some`: the slot the new
    /// task takes.
    fn key_gate(&self, owner: &auth_min::Principal) -> Result<Option<KeySlot>, ApiError> {
        let Some(most) = owner.limits.concurrent else {
            return Ok(None);
        };
        let mut keys = self.key_limits.lock();
        let slot = Self::key_state(&mut keys, owner, Instant::now()).slot(most);
        drop(keys);
        match slot {
            Some(slot) => Ok(Some(slot)),
            None => Err(self.key_refusal(
                owner,
                "key_concurrency",
                format!(
                    "key {:?} has {most} tasks unfinished, its limit",
                    owner.name
                ),
                1000,
            )),
        }
    }

    fn reject(&self, reason: &str, error: ApiError) -> ApiError {
        self.count_rejection(reason);
        tracing::info!(reason, code = %error.0.code, "task rejected");
        error
    }

    /// `tasks_rejected_total{reason}`: every refused submission, whichever API refused it.
    pub(crate) fn count_rejection(&self, reason: &str) {
        self.metrics
            .tasks_rejected
            .with_label_values(&[reason])
            .inc();
    }

    /// Admits a task submitted without a correlation id (its task id serves as one).
    #[cfg(test)]
    pub fn admit(&self, req: TaskRequest) -> Result<AdmissionResponse, ApiError> {
        self.admit_with(req, None, None, &auth_min::Principal::everything("test"))
    }

    /// An admission without waiting for the journal (in-process tests; `POST /v2/tasks` uses
    /// [`Orchestrator::admit_durable`]).
    #[cfg(test)]
    pub fn admit_with(
        &self,
        req: TaskRequest,
        correlation_id: Option<String>,
        prompt_tokens: Option<u32>,
        owner: &auth_min::Principal,
    ) -> Result<AdmissionResponse, ApiError> {
        validate(&self.config, &req).map_err(|e| self.reject("invalid_params", e))?;
        self.enqueue(req, correlation_id, None, prompt_tokens, owner, None)
            .map(|(_, a, _)| a)
    }

    /// `POST /v2/tasks` (with the request's `X-Correlation-Id`, and the prompt's length in
    /// tokens when [`Orchestrator::count_prompt`] counted it), answered only once the
    /// admission is durable: with the
    /// journal on, the 202 waits for the admission record (at most `ORCHD_JOURNAL_TIMEOUT_MS`).
    /// A journal that fails or does not answer in time gets the client a retriable 503
    /// `JOURNAL_UNAVAILABLE`, and the task is withdrawn (never run, ended in the journal).
    pub async fn admit_durable(
        self: &Arc<Self>,
        req: TaskRequest,
        correlation_id: Option<String>,
        owner: &auth_min::Principal,
    ) -> Result<AdmissionResponse, ApiError> {
        validate(&self.config, &req).map_err(|e| self.reject("invalid_params", e))?;
        // The key's rate first: a key past it gets no prompt counted on an engine.
        self.key_rate(owner)?;
        let prompt_tokens = self.count_prompt(&req).await?;
        let journaled = self.read_journal(&owner.name, req.task_id.as_deref()).await;
        let (task, answer, written) =
            self.enqueue(req, correlation_id, None, prompt_tokens, owner, journaled)?;
        if let Some(written) = written {
            // Settled apart from this request: a client that goes away while the journal
            // writes must not leave the task waiting for ever.
            let (orch, settling) = (self.clone(), task.clone());
            self.finishing
                .spawn(async move { orch.settle_admission(settling, written).await });
        }
        // A new admission, or the same task submitted again: answered as its admission is.
        // The settling above answers within the journal timeout; the margin only guards it.
        match task.wait_durable(self.config.journal_timeout * 2).await {
            Some(true) => Ok(answer),
            _ => Err(self.reject("journal_unavailable", journal_refusal())),
        }
    }

    /// Waits for the journal's answer to `task`'s admission record (at most
    /// `ORCHD_JOURNAL_TIMEOUT_MS`): durable, it may run; otherwise it is withdrawn — never
    /// dispatched (the dispatcher waits for durability), ended, and forgotten, so the client's
    /// retry under the same id is a new admission.
    async fn settle_admission(self: Arc<Self>, task: Arc<Task>, written: Durable) {
        let why = match tokio::time::timeout(self.config.journal_timeout, written).await {
            Ok(Ok(())) => {
                task.set_durable(true);
                self.wake.notify_one();
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!(
                "no answer within {} ms",
                self.config.journal_timeout.as_millis()
            ),
        };
        self.metrics.journal_errors.inc();
        tracing::error!(task_id = %task.id, error = %why, "admission not durable; the task is withdrawn");
        task.set_durable(false);
        self.cancel(&task, journal_refusal().0);
        self.tasks.remove_same(&task);
        if let Err(error) = self.journal.withdraw(&task.owner, &task.id).await {
            self.metrics.journal_errors.inc();
            tracing::error!(task_id = %task.id, %error, "withdrawn admission not removed from the journal; a restart ends it");
        }
    }

    /// The prompt's length in tokens, counted by an engine of its model (prompts up to
    /// [`COUNT_PROMPT_MAX_BYTES`]) when the prompt might
    /// not fit the per-slot context of some pool (a prompt of B bytes makes at most B + 2
    /// tokens, so a prompt short enough is never counted). Refused (400) when prompt plus
    /// `max_tokens` exceeds the largest per-slot context of every pool of the model. When no
    /// engine can count it now (none ready, no answer within 2 s), `None`: the engine judges.
    pub async fn count_prompt(&self, req: &TaskRequest) -> Result<Option<u32>, ApiError> {
        let Some(fit) = self.pools.ctx_fit(&req.model_ref) else {
            return Ok(None);
        };
        let most = (req.prompt.len() as u64)
            .saturating_add(2)
            .saturating_add(u64::from(req.max_tokens));
        if most <= u64::from(fit.smallest) {
            return Ok(None);
        }
        if req.prompt.len() > COUNT_PROMPT_MAX_BYTES {
            // Counting costs the engine's CPU outside any slot: a larger prompt is left to the
            // engine to judge.
            return Ok(None);
        }
        let bearer = fit.credential.as_ref().map(auth_min::Token::expose);
        let counted = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.engine
                .tokenize(&fit.tokenizer_url, bearer, &req.prompt),
        )
        .await;
        let tokens = match counted {
            Ok(Ok(n)) => n,
            Ok(Err(error)) => {
                tracing::debug!(%error, "prompt not counted; the engine judges its length");
                return Ok(None);
            }
            Err(_) => {
                tracing::debug!("prompt not counted in time; the engine judges its length");
                return Ok(None);
            }
        };
        let needed = u64::from(tokens) + u64::from(req.max_tokens);
        if needed > u64::from(fit.largest) {
            return Err(self.reject(
                "invalid_params",
                invalid(format!(
                    "the prompt is {tokens} tokens: with max_tokens {} it needs a context of {needed}, and the largest per-slot context of model {:?} is {}",
                    req.max_tokens, req.model_ref, fit.largest
                )),
            ));
        }
        Ok(Some(tokens))
    }

    /// An OpenAI request, validated by its route: `req` holds what queueing and placement read
    /// (model, priority, session, deadline, `max_tokens`), `job` what the engine gets.
    pub fn admit_openai(
        &self,
        req: TaskRequest,
        job: crate::job::Job,
        correlation_id: Option<String>,
        owner: &auth_min::Principal,
    ) -> Result<Arc<Task>, ApiError> {
        self.key_rate(owner)?;
        self.enqueue(req, correlation_id, Some(job), None, owner, None)
            .map(|(t, _, _)| t)
    }

    fn enqueue(
        &self,
        mut req: TaskRequest,
        correlation_id: Option<String>,
        openai: Option<crate::job::Job>,
        prompt_tokens: Option<u32>,
        owner: &auth_min::Principal,
        journaled: Option<JournalLookup>,
    ) -> Result<(Arc<Task>, AdmissionResponse, Option<Durable>), ApiError> {
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "admission",
            task_id = tracing::field::Empty,
            session_id = req.session_id.as_deref(),
            model = %req.model_ref
        );
        let _entered = span.enter();
        // Only an id the client chose can be a resubmission: an OpenAI request's id and a
        // `/v2` task without one are random (UUID v4) ids made here, so neither the task
        // table nor the journal (a read of its file) is asked about them.
        let chosen = req.task_id.is_some() && openai.is_none();
        let id = req
            .task_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        req.task_id = Some(id.clone());
        // A resubmission is answered before any other check (model, pin, capacity, shutdown):
        // a client retrying a submission whose answer it lost learns about its task.
        // Ids are scoped per key: only the owner's own tasks are looked at, so another key's
        // use of the id is neither refused nor told.
        if let Some(existing) = chosen.then(|| self.task(&owner.name, &id)).flatten() {
            return self
                .answer_existing(&existing, crate::tasks::request_digest(&req))
                .map(|(t, a)| (t, a, None));
        }
        if chosen {
            // Read before (off the workers) when it could be; otherwise here.
            let lookup = journaled.unwrap_or_else(|| self.journal_lookup(&owner.name, &id));
            if let Some(existing) = self.journaled_task(&id, lookup)? {
                return self
                    .answer_existing(&existing, crate::tasks::request_digest(&req))
                    .map(|(t, a)| (t, a, None));
            }
        }
        if !self
            .pools
            .admissible(&req.model_ref, Instant::now(), self.config.model_memory)
        {
            return Err(self.reject(
                "model_not_available",
                ApiError::new(
                    ErrorCode::ModelNotAvailable,
                    format!(
                        "no pool serves model {:?} (none did recently, or every one failed)",
                        req.model_ref
                    ),
                )
                .with_retry_after(5000),
            ));
        }
        let embeddings = openai.as_ref().is_some_and(crate::job::Job::is_embeddings);
        if self.pools.serves_kind(&req.model_ref, embeddings) == Some(false) {
            // Refused now rather than queued for a pool that can never take it.
            let (kind, declared) = if embeddings {
                ("embeddings", "embeddings = true")
            } else {
                ("generation", "embeddings = false")
            };
            return Err(self.reject(
                "invalid_params",
                invalid(format!(
                    "model {:?} has no pool for {kind} (pools with {declared})",
                    req.model_ref
                )),
            ));
        }
        if req.determinism == Some(Determinism::Strict) {
            if let Err(why) = self.pools.strict_ready(&req.model_ref) {
                // Never run best-effort in its place.
                return Err(self.reject("invalid_params", invalid(why)));
            }
        }
        if let Some(ctx) = req.ctx {
            // Refused now rather than queued for a pool that can never take it.
            if let Some(largest) = self.pools.largest_ctx(&req.model_ref) {
                if ctx > largest {
                    return Err(self.reject(
                        "invalid_params",
                        invalid(format!(
                            "ctx {ctx} exceeds the largest per-slot context of model {:?} ({largest})",
                            req.model_ref
                        )),
                    ));
                }
            }
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
        let correlation_id = correlation_id.unwrap_or_else(|| id.clone());
        // Built before the locks: the request's JSON copies a prompt of up to a mebibyte.
        // `/v2` tasks are journaled (an OpenAI request lives and dies with its connection).
        let journaled =
            (self.journal.durable() && openai.is_none()).then(|| crate::journal::Admission {
                task_id: id.clone(),
                owner: owner.name.to_string(),
                digest: [0; 32],
                request: serde_json::to_string(&req).unwrap_or_default(),
                correlation_id: correlation_id.clone(),
                submitted_ms: crate::tasks::now_ms(),
                deadline_ms: req
                    .deadline_ms
                    .map(|d| crate::tasks::now_ms().saturating_add(d)),
            });
        // Cache-aware placement's block names, only when it is on; in the key's own scope
        // unless ORCHD_CACHE_SCOPE=global.
        let chain = |text: &str| {
            let scope = match self.config.cache_scope_global {
                true => 0,
                false => llorch_core::prefix_scope(&owner.name),
            };
            llorch_core::scoped_prefix_chain(scope, text, crate::tasks::PREFIX_BLOCKS_MAX)
        };
        let prefix_chain = match (&self.config.cache_balance, &openai) {
            (None, _) => Vec::new(),
            (Some(_), None) => chain(&req.prompt),
            (Some(_), Some(job)) => job.prefix_text().map(|t| chain(&t)).unwrap_or_default(),
        };
        // Dropped (giving the key's slot back) on any refusal below.
        let slot = self.key_gate(owner)?;
        span.record("task_id", id.as_str());
        let trace = llorch_observability::capture(&span);
        // Built before the locks too: admissions wait on each other only for the queue's
        // bookkeeping, not for a task's allocations and digest.
        let mut task = Task::new(
            id.clone(),
            req,
            Instant::now(),
            trace,
            correlation_id,
            openai,
            self.config.task_log_max_bytes,
        )
        .with_prompt_tokens(prompt_tokens)
        .with_owner(owner.name.clone())
        .with_prefix_chain(prefix_chain)
        .with_key_slot(slot);
        if journaled.is_some() {
            task = task.with_journal();
        }
        let task = Arc::new(task);
        let weight = u64::from(task.req.max_tokens);
        let expiry = crate::state::expiry_of(&task, self.config.max_queue_wait);
        // Hashed before the locks are taken.
        let flow = self.queue_flow(&task.owner);
        let (admitted, ahead_tokens, written, dispatcher_due) = {
            let mut tasks = self.tasks.shard_for(&task.key);
            // Checked again under the lock: two first submissions of one id may race here.
            if let Some(existing) = tasks.get(&task.key).cloned() {
                drop(tasks);
                return self
                    .answer_existing(&existing, task.digest())
                    .map(|(t, a)| (t, a, None));
            }
            let mut queue = self.queue.lock();
            // Checked under the queue lock that shutdown empties the queue under: no task is
            // queued after that.
            if !queue.accepting {
                drop(queue);
                drop(tasks);
                return Err(self.reject("shutting_down", ApiError::from(shutting_down())));
            }
            let reorders = queue.tasks.reorders();
            // A full queue under drop-lru ends the submitting key's own oldest batch task
            // first: one key's burst does not end another key's work.
            match queue.tasks.admit_dropping_own(
                task.clone(),
                priority,
                weight,
                self.config.admission_policy,
                flow,
                |queued| queued.owner == task.owner,
            ) {
                Ok(a) => {
                    task.set_queue_key(a.key);
                    // Sent under the queue lock, before any dispatch of the task can write
                    // its first token: the journal takes writes in order.
                    let written = journaled.map(|mut admission| {
                        admission.digest = task.digest();
                        self.journal.admit(admission)
                    });
                    tasks.insert(task.key.clone(), task.clone());
                    queue.schedule_expiry(&task, self.config.max_queue_wait);
                    // The dispatcher has something to do for this task only if it expires
                    // before the dispatcher's next wake, or a followed task moved back (or
                    // a slot is free: checked below, after the task is in the queue).
                    let due = queue.dispatcher_wakes_at.is_none_or(|at| expiry < at)
                        || (queue.tasks.reorders() != reorders && !queue.followed.is_empty());
                    let ahead_tokens = a.weight_ahead;
                    (a, ahead_tokens, written, due)
                }
                Err(full) => {
                    drop(queue);
                    drop(tasks);
                    let backoff = self.backoff_ms(&task.req.model_ref);
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
        if let Some(dropped) = admitted.dropped {
            tracing::info!(task_id = %dropped.id, "queue full: dropped oldest queued batch task");
            self.finish(
                &dropped,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::QueueFullDropLru,
                        "dropped from a full queue for a newer task",
                    )
                    .with_retry_after_ms(self.backoff_ms(&task.req.model_ref))
                    .with_policy_label("drop-lru"),
                ),
            );
        }
        let position = admitted.position as u32;
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
        self.metrics
            .tasks_enqueued
            .with_label_values(&[priority_label(priority), task.api()])
            .inc();
        self.metrics
            .key_tasks
            .with_label_values(&[self.metrics.key(&owner.name), "admitted"])
            .inc();
        self.update_depth();
        self.metrics
            .admission_latency_ms
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        tracing::debug!(task_id = %id, position, "task admitted");
        if dispatcher_due || self.pools.slot_totals().0 > 0 {
            self.wake.notify_one();
        }
        let answer = admission_response(&task, position, predicted);
        Ok((task, answer, written))
    }

    /// The queue flow of `owner`'s tasks: with ORCHD_QUEUE_FAIRNESS=keys each key is a flow of
    /// its own (keys take turns within a priority class); with `fifo`, one flow for all.
    pub(crate) fn queue_flow(&self, owner: &str) -> u64 {
        match self.config.fair_share {
            true => llorch_core::prefix_scope(owner),
            false => 0,
        }
    }

    /// What the journal holds under `owner`'s `id`, read on this thread (nothing to read
    /// without a journal).
    fn journal_lookup(&self, owner: &str, id: &str) -> JournalLookup {
        if self.journal.durable() {
            self.journal.lookup(owner, id)
        } else {
            Ok(None)
        }
    }

    /// What the journal holds under a client's task id: read on the blocking pool (a read of
    /// its file must not hold up a worker thread), or `None` when there is nothing to read (no
    /// journal, or a task with that id in memory, which is answered first).
    async fn read_journal(&self, owner: &str, id: Option<&str>) -> Option<JournalLookup> {
        let id = id?;
        if !self.journal.durable() || self.task(owner, id).is_some() {
            return None;
        }
        let (journal, owner, id) = (self.journal.clone(), owner.to_string(), id.to_string());
        Some(
            tokio::task::spawn_blocking(move || journal.lookup(&owner, &id))
                .await
                .unwrap_or_else(|e| {
                    Err(crate::journal::JournalError::Read(format!(
                        "the lookup did not finish: {e}"
                    )))
                }),
        )
    }

    /// A finished task the journal still remembers (past the in-memory retention), put back
    /// in memory so a resubmission of its id is answered as for any task: the same task for
    /// the same request, 409 for another (the lookup was of the submitting key's own ids).
    fn journaled_task(
        &self,
        id: &str,
        lookup: JournalLookup,
    ) -> Result<Option<Arc<Task>>, ApiError> {
        let record = match lookup {
            Ok(Some(r)) if r.ending.is_some() => r,
            Ok(_) => return Ok(None),
            Err(error) => {
                tracing::warn!(task_id = %id, %error, "journal lookup failed; the id is taken as new");
                return Ok(None);
            }
        };
        let Some(task) = crate::recovery::finished_task(self, &record) else {
            return Ok(None);
        };
        let task = match self.tasks.shard_for(&task.key).entry(task.key.clone()) {
            std::collections::hash_map::Entry::Occupied(known) => known.get().clone(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                self.retired.lock().push(&task);
                slot.insert(task).clone()
            }
        };
        Ok(Some(task))
    }

    /// The answer to a resubmitted `task_id`: the existing task, or 409 for another body.
    fn answer_existing(
        &self,
        existing: &Arc<Task>,
        digest: [u8; 32],
    ) -> Result<(Arc<Task>, AdmissionResponse), ApiError> {
        if existing.digest() != digest {
            return Err(self.reject(
                "conflict",
                ApiError::new(
                    ErrorCode::Conflict,
                    format!("task_id {:?} exists with a different request", existing.id),
                ),
            ));
        }
        let (position, ahead_tokens) = self.ahead_of(existing);
        let predicted = self.predicted_start_ms(
            &existing.req.model_ref,
            u64::from(position),
            ahead_tokens,
            existing.req.max_tokens,
        );
        Ok((
            existing.clone(),
            admission_response(existing, position, predicted),
        ))
    }

    /// Queue position of a task and the `max_tokens` queued ahead of it (0, 0 once dispatched).
    fn ahead_of(&self, task: &Task) -> (u32, u64) {
        let Some(key) = task.queue_key() else {
            return (0, 0);
        };
        match self.queue.lock().tasks.rank(key) {
            Some((position, tokens)) => (position as u32, tokens),
            None => (0, 0),
        }
    }

    /// Suggested client backoff when the queue is full: the predicted wait of a task at the
    /// back of the queue, at least one second.
    fn backoff_ms(&self, model: &str) -> u64 {
        let (depth, tokens) = {
            let q = self.queue.lock();
            (
                q.tasks.len() as u64,
                q.tasks.class_weight(Priority::Interactive) + q.tasks.class_weight(Priority::Batch),
            )
        };
        // A newcomer is assumed alike to the queue's average task.
        let own = u32::try_from(tokens.checked_div(depth).unwrap_or(0)).unwrap_or(u32::MAX);
        self.predicted_start_ms(model, depth, tokens, own).max(1000)
    }

    /// Cancels a task: a queued one is removed and ends at once; a running one is ended by its
    /// runner, which aborts the engine request.
    pub fn cancel(&self, task: &Arc<Task>, reason: ErrorEnvelope) {
        if task.is_terminal() {
            return;
        }
        task.cancel_with(reason);
        let removed = task
            .queue_key()
            .and_then(|key| self.queue.lock().tasks.remove_key(key))
            .is_some();
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

    /// Shutdown, first step: refuse new tasks and end every queued one.
    pub fn stop_admitting(&self) {
        let queued: Vec<Arc<Task>> = {
            let mut q = self.queue.lock();
            q.accepting = false;
            std::iter::from_fn(|| q.tasks.take_first(|_| Some(())).map(|(t, ())| t)).collect()
        };
        for t in queued {
            self.finish(&t, TaskEvent::Error(shutting_down()));
        }
        self.update_depth();
    }

    /// Shutdown, last step: end running tasks that did not finish within the grace period.
    pub fn cancel_running(&self) {
        let running = self.tasks.filtered(|t| !t.is_terminal());
        for t in running {
            t.cancel_with(shutting_down());
        }
    }
}

/// The `202` answer: where the task stands and where its events stream.
fn admission_response(task: &Task, position: u32, predicted_start_ms: u64) -> AdmissionResponse {
    let sse = format!("/v2/tasks/{}/events", task.id);
    AdmissionResponse {
        task_id: task.id.clone(),
        queue_position: position,
        predicted_start_ms,
        backoff_ms: 0,
        streams: TaskStreams {
            sse_verbose: format!("{sse}?verbose=true"),
            sse,
        },
    }
}
