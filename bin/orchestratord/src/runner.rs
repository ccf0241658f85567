//! Runs one task on one pool: `POST {engine}/completion` with `stream: true`, relaying each
//! chunk as a `token` event the moment it arrives. The slot lease is held for exactly the life
//! of this function (a drop guard), so the dispatcher never exceeds a pool's slots.
//!
//! Failure rules (DESIGN §3): the engine failing before the first token → retried once on
//! another pool; after it → `WORKER_RESET`; no chunk within the timeout → `DECODE_TIMEOUT`;
//! cancel → the engine request is dropped (llama-server stops generating) and `CANCELLED`.

use std::sync::Arc;
use std::time::Instant;

use llamacpp_client::sse::SseParser;
use llamacpp_client::{CompletionChunk, CompletionRequest};
use llorch_contracts::tasks::TaskEvent;
use llorch_contracts::{ErrorCode, ErrorEnvelope};

use crate::orchestrator::Orchestrator;
use crate::pools::{PoolEntry, SlotLease};
use crate::tasks::Task;

enum Outcome {
    Done {
        finish_reason: String,
        decode_ms: u64,
        engine_tokens: Option<u32>,
    },
    Cancelled,
    /// Nothing reached the client yet: safe to try another pool.
    BeforeFirstToken(String),
    WorkerReset(String),
    DecodeTimeout(String),
    EngineRefused(String),
}

pub async fn run(orch: Arc<Orchestrator>, task: Arc<Task>, lease: SlotLease) {
    let pool_id = lease.pool_id().to_string();
    let Some(pool) = orch.pools.get(&pool_id) else {
        drop(lease);
        orch.requeue(task);
        return;
    };
    if task.cancel.is_cancelled() {
        orch.metrics
            .tasks_canceled
            .with_label_values(&["running"])
            .inc();
        orch.finish(&task, TaskEvent::Error(task.cancel_reason()));
        return;
    }
    let (attempt, queue_time_ms) = task.start_attempt(&pool_id);
    orch.metrics
        .tasks_started
        .with_label_values(&[&pool_id])
        .inc();
    if let Some(session) = &task.req.session_id {
        orch.sessions
            .lock()
            .record_turn(session, &pool_id, tokio::time::Instant::now().into_std());
    }
    task.emit(&TaskEvent::Started {
        pool_id: pool_id.clone(),
        node_id: pool.node_id.clone(),
        engine: pool.engine.clone(),
        engine_version: pool.engine_version.clone(),
        queue_time_ms,
    });
    tracing::debug!(task_id = %task.id, pool_id = %pool_id, attempt, "task dispatched");

    let dispatched = Instant::now();
    let mut first_token: Option<Instant> = None;
    let span = tracing::info_span!(
        "dispatch",
        task_id = %task.id,
        pool_id = %pool_id,
        session_id = task.req.session_id.as_deref(),
        attempt
    );
    llorch_observability::adopt(&span, &task.trace);
    let outcome = tracing::Instrument::instrument(
        stream(&orch, &task, &pool, &mut first_token, &span),
        span.clone(),
    )
    .await;
    let tokens_out = task.status(None).tokens_out;
    match outcome {
        Outcome::Done {
            finish_reason,
            decode_ms,
            engine_tokens,
        } => {
            let first = first_token.map(|f| f.duration_since(dispatched).as_secs_f64() * 1000.0);
            let decode_wall = first_token.map(|f| f.elapsed()).unwrap_or_default();
            if let Some(ft) = first {
                orch.metrics
                    .first_token_ms
                    .with_label_values(&[&pool_id])
                    .observe(ft);
                orch.metrics
                    .decode_ms
                    .with_label_values(&[&pool_id])
                    .observe(decode_wall.as_secs_f64() * 1000.0);
                orch.estimator
                    .lock()
                    .record(tokens_out, decode_wall.as_secs_f64() * 1000.0, ft);
            }
            let tps = if decode_wall.as_secs_f64() > 0.0 {
                f64::from(tokens_out) / decode_wall.as_secs_f64()
            } else {
                0.0
            };
            task.emit(&TaskEvent::Metrics(serde_json::json!({
                "first_token_ms": first.map(|f| f.round() as u64),
                "tokens_per_s": (tps * 10.0).round() / 10.0,
                "engine_tokens": engine_tokens,
            })));
            orch.finish(
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
            orch.metrics
                .tasks_canceled
                .with_label_values(&["running"])
                .inc();
            orch.finish(&task, TaskEvent::Error(task.cancel_reason()));
        }
        Outcome::BeforeFirstToken(reason) if attempt < 2 && orch.is_accepting() => {
            tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine failed before the first token; retrying once");
            task.requeued(&pool_id);
            drop(lease);
            orch.requeue(task);
        }
        Outcome::BeforeFirstToken(reason) | Outcome::WorkerReset(reason) => {
            tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine failed during the task");
            orch.finish(
                &task,
                TaskEvent::Error(
                    ErrorEnvelope::new(
                        ErrorCode::WorkerReset,
                        format!("engine of pool {pool_id} failed: {reason}"),
                    )
                    .with_retry_after_ms(1000)
                    .with_engine("llamacpp"),
                ),
            );
        }
        Outcome::DecodeTimeout(reason) => {
            tracing::warn!(task_id = %task.id, pool_id = %pool_id, %reason, "engine stream stalled");
            orch.finish(
                &task,
                TaskEvent::Error(
                    ErrorEnvelope::new(ErrorCode::DecodeTimeout, reason).with_engine("llamacpp"),
                ),
            );
        }
        Outcome::EngineRefused(reason) => {
            orch.finish(
                &task,
                TaskEvent::Error(
                    ErrorEnvelope::new(ErrorCode::InvalidParams, reason).with_engine("llamacpp"),
                ),
            );
        }
    }
}

async fn stream(
    orch: &Orchestrator,
    task: &Task,
    pool: &PoolEntry,
    first_token: &mut Option<Instant>,
    span: &tracing::Span,
) -> Outcome {
    let req = &task.req;
    let body = CompletionRequest {
        prompt: req.prompt.clone(),
        n_predict: req.max_tokens,
        stream: true,
        cache_prompt: true,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop: req.stop.clone(),
    };
    let url = format!("{}/completion", pool.url);
    let first_timeout = orch.config.first_token_timeout;
    let decode_timeout = orch.config.decode_timeout;
    // CLOUD: through the pool-managerd proxy, which wants the token.
    let bearer = pool
        .manager
        .as_ref()
        .and(orch.config.token.as_ref())
        .map(|t| t.expose());
    // W3C traceparent: pool-managerd's engine_proxy span continues this dispatch span.
    let mut headers = reqwest::header::HeaderMap::new();
    llorch_observability::inject(span, &mut headers);
    let send = llamacpp_client::send_completion(&orch.engine_http, &url, bearer, &headers, &body);
    let lost = pool.lost.clone();
    let mut resp = tokio::select! {
        _ = task.cancel.cancelled() => return Outcome::Cancelled,
        _ = lost.cancelled() => return Outcome::BeforeFirstToken("the pool's node was lost".into()),
        r = tokio::time::timeout(first_timeout, send) => match r {
            Err(_) => return Outcome::BeforeFirstToken("engine did not answer in time".into()),
            Ok(Err(e)) => return Outcome::BeforeFirstToken(format!("engine unreachable: {e}")),
            Ok(Ok(r)) => r,
        },
    };
    let status = resp.status();
    if status.is_client_error() {
        let text = resp.text().await.unwrap_or_default();
        return Outcome::EngineRefused(format!(
            "engine refused the request ({status}): {}",
            text.chars().take(300).collect::<String>()
        ));
    }
    if !status.is_success() {
        return Outcome::BeforeFirstToken(format!("engine answered {status}"));
    }
    let mut parser = SseParser::new();
    let mut i: u32 = 0;
    // Looked up once: the loop below runs per token.
    let tokens_out = orch.metrics.tokens_out.with_label_values(&[&pool.pool_id]);
    loop {
        let wait = if i == 0 {
            first_timeout
        } else {
            decode_timeout
        };
        let chunk = tokio::select! {
            _ = task.cancel.cancelled() => return Outcome::Cancelled,
            _ = lost.cancelled() => {
                let reason = "the pool's node was lost".to_string();
                return if i == 0 { Outcome::BeforeFirstToken(reason) } else { Outcome::WorkerReset(reason) };
            }
            c = tokio::time::timeout(wait, resp.chunk()) => c,
        };
        let bytes = match chunk {
            Err(_) => {
                return Outcome::DecodeTimeout(format!(
                    "no output from the engine for {} ms",
                    wait.as_millis()
                ));
            }
            Ok(Err(e)) => {
                let reason = format!("stream broken: {e}");
                return if i == 0 {
                    Outcome::BeforeFirstToken(reason)
                } else {
                    Outcome::WorkerReset(reason)
                };
            }
            Ok(Ok(None)) => {
                let reason = "engine closed the stream before the end".to_string();
                return if i == 0 {
                    Outcome::BeforeFirstToken(reason)
                } else {
                    Outcome::WorkerReset(reason)
                };
            }
            Ok(Ok(Some(b))) => b,
        };
        for frame in parser.push(&bytes) {
            // Straight into the typed chunk: this runs once per token.
            let c = match serde_json::from_str::<CompletionChunk>(&frame.data) {
                Ok(c) => c,
                Err(_) => {
                    let value: serde_json::Value =
                        serde_json::from_str(&frame.data).unwrap_or_default();
                    match value.get("error") {
                        Some(err) => return Outcome::EngineRefused(format!("engine error: {err}")),
                        None => continue,
                    }
                }
            };
            if let Some(err) = &c.error {
                return Outcome::EngineRefused(format!("engine error: {err}"));
            }
            if !c.content.is_empty() {
                if first_token.is_none() {
                    *first_token = Some(Instant::now());
                }
                task.emit(&TaskEvent::Token { t: c.content, i });
                tokens_out.inc();
                i += 1;
            }
            if c.stop {
                let finish_reason = match c.stop_type.as_deref() {
                    Some("limit") => "length",
                    Some("eos") | Some("word") => "stop",
                    _ => "stop",
                };
                let timings = c.timings.unwrap_or_default();
                return Outcome::Done {
                    finish_reason: finish_reason.into(),
                    decode_ms: timings.predicted_ms.unwrap_or(0.0).round() as u64,
                    engine_tokens: c.tokens_predicted.or(timings.predicted_n),
                };
            }
        }
    }
}
