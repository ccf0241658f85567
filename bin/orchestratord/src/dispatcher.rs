//! The dispatcher: whenever capacity may have appeared it places queued tasks (placement →
//! slot lease → runner), ends queued tasks whose deadline or longest queue wait passed, tells
//! queued tasks their new positions, and applies each runner's `Outcome` (finish, requeue,
//! estimator) — the one place a task's attempt ends.

use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::tasks::{Determinism, TaskEvent, TaskMetrics};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_core::{place, Decision, PlacementRequest};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pools::{PoolEntry, SlotLease};
use crate::runner::{Outcome, Runner};
use crate::state::{expiry_of, Orchestrator, Queue};
use crate::tasks::Task;

/// Position updates are coalesced: at most one pass per interval, however fast the queue
/// churns (each pass is linear in the queue length).
pub(crate) const POSITION_INTERVAL: Duration = Duration::from_millis(50);

/// Runs until `cancel`.
pub(crate) async fn run(orch: Arc<Orchestrator>, cancel: CancellationToken) {
    let mut last_publish = Instant::now() - POSITION_INTERVAL;
    let mut published_reorders = 0;
    let mut pool_generation = orch.pools.generation();
    loop {
        // Only when pools changed: the pass is linear in the queue.
        let generation = orch.pools.generation();
        if generation != pool_generation {
            pool_generation = generation;
            orch.end_inadmissible();
        }
        orch.dispatch_ready();
        let mut next = orch.expire_queued();
        // An ejected pool takes work again when its cool-down ends.
        if let Some(end) = orch.pools.next_ejection_end() {
            next = Some(next.map_or(end, |n| n.min(end)));
        }
        if orch.queue.lock().tasks.reorders() != published_reorders {
            let due = last_publish + POSITION_INTERVAL;
            if Instant::now() >= due {
                published_reorders = orch.publish_positions();
                last_publish = Instant::now();
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        {
            // Told to admission under the queue lock, with the queue's earliest expiry as it
            // is now: a task queued after this that expires sooner wakes the dispatcher.
            let mut q = orch.queue.lock();
            if let Some(at) = q.expiries.next_at().map(Instant::from_std) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            q.dispatcher_wakes_at = next;
        }
        let sleep = tokio::time::sleep_until(
            next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
        );
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = orch.wake.notified() => {}
            _ = sleep => {}
        }
    }
}

/// One attempt in flight: what `apply` needs to judge its outcome.
struct Attempt {
    task: Arc<Task>,
    pool_id: String,
    number: u32,
    dispatched: Instant,
}

impl Orchestrator {
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
            if self.config.cache_balance.is_some() {
                for v in views.iter().filter(|v| !v.ready) {
                    self.pools.forget_slots(&v.pool_id, None);
                }
            }
            let picked = {
                let sessions = self.sessions.lock();
                let mut queue = self.queue.lock();
                let aware = self.config.cache_balance;
                // Cache-aware placement only: the prefix index (pools that went away take what
                // they held with them) and views to fill with each task's matches.
                let mut prefixes = aware.map(|_| {
                    let mut index = self.prefix_index.lock();
                    // A pool not ready now may come back with a fresh engine: what it held
                    // is forgotten (its slots too, before this pass: see above).
                    index.retain_pools(|p| views.iter().any(|v| v.pool_id == p && v.ready));
                    (index, views.clone())
                });
                queue.tasks.take_first(|t| {
                    // Not before its admission is durable (a withdrawn one never runs).
                    if t.durable() != Some(true) {
                        return None;
                    }
                    let avoid = t.retry_avoid();
                    let session_pool = t.session.as_deref().and_then(|s| sessions.affinity(s, now));
                    let req = PlacementRequest {
                        model: &t.req.model_ref,
                        placement: t.req.placement.as_ref(),
                        session_pool,
                        retry_avoid: avoid.as_deref(),
                        min_ctx: t.needed_ctx(),
                        single_slot: t.req.determinism == Some(Determinism::Strict),
                        embeddings: t.is_embeddings(),
                        cache_balance: aware,
                    };
                    // Each pool's cached prefix of this task's prompt.
                    let views = match &mut prefixes {
                        Some((index, with_prefix)) if !t.prefix_chain.is_empty() => {
                            for v in with_prefix.iter_mut() {
                                v.prefix_blocks = index.matched(&v.pool_id, &t.prefix_chain);
                            }
                            &*with_prefix
                        }
                        _ => &views,
                    };
                    match place(views, &req) {
                        Decision::Place(pool) => Some(pool),
                        Decision::Wait => None,
                    }
                })
            };
            let Some((task, pool_id)) = picked else { break };
            let placement = tracing::info_span!("placement", task_id = %task.id, %pool_id);
            llorch_observability::adopt(&placement, &task.trace);
            let _placement = placement.entered();
            let Some((pool, lease)) = self.pools.lease(&pool_id) else {
                // The pool changed under us; try again on the next wake.
                let mut q = self.queue.lock();
                let key = q.tasks.requeue_front(
                    task.clone(),
                    task.req.priority,
                    u64::from(task.req.max_tokens),
                );
                task.set_queue_key(key);
                break;
            };
            self.update_depth();
            self.start(task, pool, lease);
        }
    }

    /// Starts an attempt of `task` on `pool`, holding `lease` until the runner is done.
    fn start(self: &Arc<Self>, task: Arc<Task>, pool: PoolEntry, mut lease: SlotLease) {
        if task.cancel.is_cancelled() {
            drop(lease);
            self.metrics
                .tasks_canceled
                .with_label_values(&["running"])
                .inc();
            self.finish(&task, TaskEvent::Error(task.cancel_reason()));
            return;
        }
        let pool_id = pool.pool_id.clone();
        let (number, queue_time_ms) = task.start_attempt(&pool_id);
        self.metrics
            .tasks_started
            .with_label_values(&[&pool_id])
            .inc();
        let mut predicted_blocks = 0;
        if self.config.cache_balance.is_some() && !task.is_embeddings() {
            // Every request to the pool is pinned to an engine slot (the free one whose cache
            // shares the most with this prompt), so the slots this orchestrator sees free are
            // free in the engine.
            let pick = self
                .pools
                .pin_slot(&mut lease, pool.slots_total, &task.prefix_chain);
            // The pool's engine will hold this prompt: later prompts sharing its start go
            // there when they can.
            let matched = {
                let mut index = self.prefix_index.lock();
                let matched = index.matched(&pool_id, &task.prefix_chain);
                index.insert(&pool_id, &task.prefix_chain);
                matched
            };
            predicted_blocks = pick.as_ref().map_or(0, |p| p.matched);
            if !task.prefix_chain.is_empty() {
                self.count_prefix(&task, matched);
            }
        }
        if let Some(session) = &task.session {
            self.sessions
                .lock()
                .record_turn(session, &pool_id, Instant::now().into_std());
        }
        task.emit(&TaskEvent::Started {
            pool_id: pool_id.clone(),
            node_id: pool.node_id.clone(),
            engine: pool.engine.clone(),
            engine_version: pool.engine_version.clone(),
            queue_time_ms,
        });
        tracing::debug!(task_id = %task.id, pool_id = %pool_id, attempt = number, "task dispatched");
        let span = tracing::info_span!(
            "dispatch",
            task_id = %task.id,
            pool_id = %pool_id,
            session_id = task.req.session_id.as_deref(),
            attempt = number
        );
        llorch_observability::adopt(&span, &task.trace);
        let attempt = Attempt {
            task,
            pool_id,
            number,
            dispatched: Instant::now(),
        };
        let orch = self.clone();
        self.runners.spawn(async move {
            let runner = Runner {
                engine: orch.engine.as_ref(),
                first_token_timeout: orch.config.first_token_timeout,
                decode_timeout: orch.config.decode_timeout,
                tokens_out: crate::metrics::TokensOut::new(&orch.metrics, &pool.pool_id),
                // Only a durable journal marks tasks journaled.
                journal: attempt.task.journaled().then(|| orch.journal.as_ref()),
                journal_timeout: orch.config.journal_timeout,
                journal_errors: orch.metrics.journal_errors.clone(),
            };
            let outcome = tracing::Instrument::instrument(
                runner.run(&attempt.task, &pool, lease.slot(), &span),
                span.clone(),
            )
            .await;
            // Ejection is decided before the slot is free: a dispatcher pass woken by the
            // release must not place on a pool this very outcome ejects.
            orch.count_dispatch(&attempt.pool_id, &outcome);
            orch.prompt_cache_feedback(&attempt, lease.slot(), predicted_blocks);
            // The slot is free before the outcome is applied: a retry may take it.
            drop(lease);
            orch.apply(attempt, outcome);
        });
    }

    /// Counts a cache-aware dispatch: whether the pool had served a prefix of the prompt.
    fn count_prefix(&self, task: &Task, matched: u32) {
        let outcome = if matched > 0 { "hit" } else { "miss" };
        self.metrics
            .prefix_placements
            .with_label_values(&[outcome])
            .inc();
        self.metrics
            .prefix_blocks
            .with_label_values(&["matched"])
            .inc_by(u64::from(matched));
        self.metrics
            .prefix_blocks
            .with_label_values(&["prompt"])
            .inc_by(task.prefix_chain.len() as u64);
    }

    /// The engine's report of the prompt (tokens from its cache, tokens evaluated), counted; an
    /// engine that took nothing from its cache where the slot map expected a shared prefix lost
    /// its caches (a restart between two probes, or another client): what it was thought to
    /// hold is forgotten, but the prompt it just took.
    fn prompt_cache_feedback(&self, attempt: &Attempt, slot: Option<u32>, predicted_blocks: usize) {
        let Some((cached, evaluated)) = attempt.task.take_engine_prompt() else {
            return;
        };
        let m = &self.metrics.engine_prompt_tokens;
        m.with_label_values(&["cached"]).inc_by(u64::from(cached));
        m.with_label_values(&["evaluated"])
            .inc_by(u64::from(evaluated));
        if cached == 0 && predicted_blocks > 0 && slot.is_some() {
            tracing::debug!(pool_id = %attempt.pool_id, predicted_blocks, "engine held no cached prompt where one was expected; forgetting the pool's prefixes");
            self.pools.forget_slots(&attempt.pool_id, slot);
            let mut index = self.prefix_index.lock();
            index.forget_pool(&attempt.pool_id);
            index.insert(&attempt.pool_id, &attempt.task.prefix_chain);
        }
    }

    /// Outlier ejection: whether the engine served (or answered: a refusal is about the
    /// request) or failed this dispatch.
    fn count_dispatch(&self, pool_id: &str, outcome: &Outcome) {
        let ok = match outcome {
            Outcome::Done { .. } | Outcome::EngineRefused(_) => true,
            Outcome::BeforeFirstToken(_) | Outcome::WorkerReset(_) | Outcome::DecodeTimeout(_) => {
                false
            }
            Outcome::Cancelled => return,
        };
        if let Some(cooldown) = self.pools.record_dispatch(pool_id, ok) {
            self.metrics
                .pool_ejections
                .with_label_values(&[pool_id])
                .inc();
            tracing::warn!(
                %pool_id,
                cooldown_ms = cooldown.as_millis() as u64,
                "pool failed {} dispatches in a row; ejected from placement",
                crate::pools::EJECT_AFTER
            );
        }
    }

    /// Ends an attempt: the one place a runner's outcome changes the orchestrator's state.
    fn apply(&self, attempt: Attempt, outcome: Outcome) {
        let Attempt {
            task,
            pool_id,
            number,
            dispatched,
        } = attempt;
        let tokens_out = task.tokens_out();
        let worker_reset = |reason: &str| {
            ErrorEnvelope::new(
                ErrorCode::WorkerReset,
                format!("engine of pool {pool_id} failed: {reason}"),
            )
            .with_retry_after_ms(1000)
            .with_engine("llamacpp")
        };
        match outcome {
            Outcome::Done {
                finish_reason,
                decode_ms,
                engine_tokens,
                first_token,
            } => {
                let first_ms =
                    first_token.map(|f| f.duration_since(dispatched).as_secs_f64() * 1000.0);
                if let (Some(at), Some(ms)) = (first_token, first_ms) {
                    self.metrics.rates.add_first_token(at, ms);
                }
                let decode_wall = first_token.map(|f| f.elapsed()).unwrap_or_default();
                if let Some(ft) = first_ms {
                    self.metrics
                        .first_token_ms
                        .with_label_values(&[&pool_id])
                        .observe(ft);
                    self.metrics
                        .decode_ms
                        .with_label_values(&[&pool_id])
                        .observe(decode_wall.as_secs_f64() * 1000.0);
                    self.estimator.lock().record(
                        tokens_out,
                        decode_wall.as_secs_f64() * 1000.0,
                        ft,
                    );
                }
                let tps = if decode_wall.as_secs_f64() > 0.0 {
                    f64::from(tokens_out) / decode_wall.as_secs_f64()
                } else {
                    0.0
                };
                task.emit(&TaskEvent::Metrics(TaskMetrics {
                    first_token_ms: first_ms.map(|f| f.round() as u64),
                    tokens_per_s: (tps * 10.0).round() / 10.0,
                    engine_tokens,
                }));
                self.finish(
                    &task,
                    TaskEvent::End {
                        tokens_out,
                        decode_time_ms: decode_wall.as_millis() as u64,
                        decode_ms,
                        finish_reason,
                    },
                );
            }
            Outcome::Cancelled => {
                self.metrics
                    .tasks_canceled
                    .with_label_values(&["running"])
                    .inc();
                self.finish(&task, TaskEvent::Error(task.cancel_reason()));
            }
            Outcome::BeforeFirstToken(reason) if number < 2 => {
                tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine failed before the first token; retrying once");
                // No more work there until its source says it is healthy again (the next probe
                // or poll, or its restart): the retry goes elsewhere or waits for it.
                self.pools.set_health(&pool_id, false, Some(reason.clone()));
                task.requeued(&pool_id);
                if let Err(task) = self.requeue(task) {
                    self.finish(&task, TaskEvent::Error(worker_reset(&reason)));
                }
            }
            Outcome::BeforeFirstToken(reason) | Outcome::WorkerReset(reason) => {
                tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine failed during the task");
                self.finish(&task, TaskEvent::Error(worker_reset(&reason)));
            }
            Outcome::DecodeTimeout(reason) => {
                tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine stream stalled");
                self.finish(
                    &task,
                    TaskEvent::Error(
                        ErrorEnvelope::new(ErrorCode::DecodeTimeout, reason)
                            .with_engine("llamacpp"),
                    ),
                );
            }
            Outcome::EngineRefused(reason) => {
                self.finish(
                    &task,
                    TaskEvent::Error(
                        ErrorEnvelope::new(ErrorCode::InvalidParams, reason)
                            .with_engine("llamacpp"),
                    ),
                );
            }
        }
    }

    /// Puts a task that failed before its first token back at the front of the queue; gives
    /// it back when the queue no longer takes tasks (shutdown).
    fn requeue(&self, task: Arc<Task>) -> Result<(), Arc<Task>> {
        {
            let mut q = self.queue.lock();
            if !q.accepting {
                return Err(task);
            }
            q.schedule_expiry(&task, self.config.max_queue_wait);
            let (priority, weight) = (task.req.priority, u64::from(task.req.max_tokens));
            let key = q.tasks.requeue_front(task.clone(), priority, weight);
            task.set_queue_key(key);
        }
        self.update_depth();
        self.wake.notify_one();
        Ok(())
    }

    /// Ends queued tasks past their deadline (DEADLINE_UNMET) or past the longest queue wait
    /// (POOL_UNAVAILABLE). Returns the next instant something expires.
    fn expire_queued(&self) -> Option<Instant> {
        let now = Instant::now();
        let max_wait = self.config.max_queue_wait;
        let (expired, next) = {
            let mut q = self.queue.lock();
            let Queue {
                tasks, expiries, ..
            } = &mut *q;
            let mut expired = Vec::new();
            for t in expiries.pop_due(now.into_std()) {
                if t.is_terminal() {
                    continue;
                }
                if let Some(t) = t.queue_key().and_then(|key| tasks.remove_key(key)) {
                    expired.push(t);
                }
            }
            // Entries of tasks that left the queue early stay until their time; rebuild when
            // they dominate, so memory follows the queue, not the traffic.
            expiries.compact_if_bloated(
                tasks.len(),
                1024,
                tasks
                    .iter()
                    .map(|t| (expiry_of(t, max_wait).into_std(), t.clone())),
            );
            (expired, expiries.next_at().map(Instant::from_std))
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

    /// Ends queued tasks whose model is no longer admissible (every pool serving it failed,
    /// or none served it within the memory window) rather than letting them wait out the
    /// longest queue wait.
    fn end_inadmissible(&self) {
        let now = Instant::now();
        let memory = self.config.model_memory;
        let mut verdicts: std::collections::HashMap<String, bool> = Default::default();
        let ended: Vec<Arc<Task>> = {
            let mut q = self.queue.lock();
            let mut ended = Vec::new();
            while let Some(t) = q.tasks.remove(|t| {
                !*verdicts
                    .entry(t.req.model_ref.clone())
                    .or_insert_with(|| self.pools.admissible(&t.req.model_ref, now, memory))
            }) {
                ended.push(t);
            }
            ended
        };
        for t in &ended {
            self.finish(
                t,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::PoolUnavailable,
                        format!(
                            "no pool can serve model {:?}: every pool serving it failed",
                            t.req.model_ref
                        ),
                    )
                    .with_retry_after_ms(5000),
                ),
            );
        }
        if !ended.is_empty() {
            self.update_depth();
        }
    }

    /// Sends `queued` updates to the followed tasks whose position changed (a task nobody
    /// follows is told its position when a subscriber comes); returns the queue's reorder
    /// count they reflect. The pass costs what is followed, not the queue's length.
    fn publish_positions(&self) -> u64 {
        let (free, total) = self.pools.slot_totals();
        let (changed, reorders): (Vec<(Arc<Task>, u32, u64)>, u64) = {
            let mut queue = self.queue.lock();
            let Queue {
                tasks, followed, ..
            } = &mut *queue;
            let mut out = Vec::new();
            followed.retain(|_, t| {
                let rank = t.queue_key().and_then(|key| tasks.rank(key));
                let Some((pos, ahead_tokens)) = rank.filter(|_| t.followed()) else {
                    return false; // left the queue, or nobody follows it any more
                };
                if t.last_position() != Some(pos as u32) {
                    out.push((t.clone(), pos as u32, ahead_tokens));
                }
                true
            });
            (out, tasks.reorders())
        };
        let estimator = self.estimator.lock().clone();
        let now = Instant::now();
        for (t, pos, ahead_tokens) in changed {
            let predicted = estimator.predicted_start_ms(
                u64::from(pos),
                ahead_tokens,
                t.req.max_tokens,
                free,
                total,
            ) + self.pools.restart_wait_ms(&t.req.model_ref, now);
            t.emit(&TaskEvent::Queued {
                queue_position: pos,
                predicted_start_ms: predicted,
            });
        }
        reorders
    }
}
