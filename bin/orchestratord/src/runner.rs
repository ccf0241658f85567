//! One attempt of one task on one pool: send the completion, relay each chunk as a `token`
//! event the moment it arrives, and return what happened as an `Outcome`. The runner touches
//! nothing but the task's own event log; the dispatcher applies the outcome (finish, requeue,
//! estimator) in one place.
//!
//! Failure rules (DESIGN §3): no answer, or a broken stream, before the first token →
//! `BeforeFirstToken` (the dispatcher retries once elsewhere); after it → `WorkerReset`; no chunk
//! within the first-token or decode timeout → `DecodeTimeout`; cancel → the engine request is
//! dropped (llama-server stops generating) and `Cancelled`.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use llamacpp_client::sse::SseParser;
use llamacpp_client::{CompletionChunk, CompletionRequest};
use llorch_contracts::tasks::{Determinism, TaskEvent};
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::engine::{Answer, CompletionCall, Engine};
use crate::job::Piece;
use crate::pools::PoolEntry;
use crate::tasks::Task;

/// The longest SSE frame accepted from an engine (a token chunk is well under 1 KiB).
const ENGINE_FRAME_MAX: usize = 1024 * 1024;
/// The largest whole (embeddings) answer read from an engine: 2 048 inputs of a 4 096-wide
/// float vector as JSON stay well below it.
const WHOLE_ANSWER_MAX: usize = 256 * 1024 * 1024;

#[derive(Debug)]
pub(crate) enum Outcome {
    Done {
        finish_reason: String,
        /// The engine's own decode time.
        decode_ms: u64,
        engine_tokens: Option<u32>,
        /// When the first token arrived (none for an empty generation).
        first_token: Option<Instant>,
    },
    Cancelled,
    /// Nothing reached the client yet: safe to try another pool.
    BeforeFirstToken(String),
    WorkerReset(String),
    DecodeTimeout(String),
    EngineRefused(String),
}

/// What a runner needs, borrowed from the orchestrator: it reads, it never writes back.
pub(crate) struct Runner<'a> {
    pub engine: &'a dyn Engine,
    pub first_token_timeout: Duration,
    pub decode_timeout: Duration,
    /// `orchd_tokens_out_total` of this pool, looked up once: the loop below runs per token.
    pub tokens_out: crate::metrics::TokensOut,
    /// A journaled task's journal: its first token is marked there before it leaves.
    pub journal: Option<&'a dyn crate::journal::Journal>,
    pub journal_timeout: Duration,
    pub journal_errors: IntCounter,
}

impl Runner<'_> {
    /// Journals that the task's first token is about to leave (from then on it cannot run
    /// again): the token waits for the record. A journal that fails is logged and counted, and
    /// the stream goes on (after a crash the task would then be run again).
    async fn mark_first_token(&self, task: &Task) {
        let Some(journal) = self.journal else {
            return;
        };
        let error = match tokio::time::timeout(
            self.journal_timeout,
            journal.first_token(&task.owner, &task.id),
        )
        .await
        {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} ms", self.journal_timeout.as_millis()),
        };
        self.journal_errors.inc();
        tracing::error!(task_id = %task.id, %error, "first token not journaled; a restart may run the task again");
    }

    /// Runs one attempt of `task` on `pool`, in engine slot `slot` when pinned.
    pub async fn run(
        &self,
        task: &Task,
        pool: &PoolEntry,
        slot: Option<u32>,
        span: &tracing::Span,
    ) -> Outcome {
        let (path, body, mut decoder) = match &task.openai {
            Some(job) => (
                job.route.path(),
                match slot {
                    Some(slot) => with_id_slot(job.body(), slot),
                    None => job.body(),
                },
                Decoder::OpenAi(crate::job::Decoder::new(job, task.req.max_tokens)),
            ),
            None => match native_body(task, slot) {
                Ok(body) => ("/completion", body, Decoder::Native),
                Err(e) => return Outcome::EngineRefused(e),
            },
        };
        // W3C traceparent: pool-managerd's engine_proxy span continues this dispatch span.
        let mut headers = reqwest::header::HeaderMap::new();
        llorch_observability::inject(span, &mut headers);
        if let Ok(id) = reqwest::header::HeaderValue::from_str(&task.correlation_id) {
            headers.insert(llorch_http::CORRELATION_HEADER, id);
        }
        let call = CompletionCall {
            base_url: &pool.url,
            path,
            bearer: pool.credential.as_ref().map(auth_min::Token::expose),
            headers,
            body,
        };
        let lost = pool.lost.clone();
        let send = self.engine.completion(call);
        let answer = tokio::select! {
            _ = task.cancel.cancelled() => return Outcome::Cancelled,
            _ = lost.cancelled() => return Outcome::BeforeFirstToken("the pool's node was lost".into()),
            r = tokio::time::timeout(self.first_token_timeout, send) => match r {
                Err(_) => return Outcome::BeforeFirstToken("engine did not answer in time".into()),
                Ok(Err(e)) => return Outcome::BeforeFirstToken(e.to_string()),
                Ok(Ok(a)) => a,
            },
        };
        let mut stream = match answer {
            Answer::Stream(s) => s,
            Answer::Refused { status, body } => {
                // The upstream's words stay in the log (bounded, escaped): a client never
                // reads what an address behind a node or a handoff file answered.
                let said: String = body.escape_debug().take(300).collect();
                tracing::warn!(task_id = %task.id, correlation_id = %task.correlation_id, status, body = %said, "engine refused the request");
                return Outcome::EngineRefused(format!(
                    "the engine refused the request ({status}); its answer is in orchestratord's log under correlation id {}",
                    task.correlation_id
                ));
            }
            Answer::Failed { status } => {
                return Outcome::BeforeFirstToken(format!("engine answered {status}"))
            }
        };
        if let Some(job) = task.openai.as_ref().filter(|j| j.is_embeddings()) {
            return self.whole_answer(task, job, stream, &lost).await;
        }
        let mut parser = SseParser::with_max_frame(ENGINE_FRAME_MAX);
        let mut i: u32 = 0;
        // Every piece of visible output (text or not), for the generation limit.
        let mut units: u64 = 0;
        let mut first_token = None;
        // Only progress (a token, or other output the client sees) moves the deadline: chunks
        // of comments or empty data keep nothing alive.
        let mut wait = self.first_token_timeout;
        // Made once and polled again for every chunk: a cancellation future registers with
        // its token, a sleep with the timer wheel, and this loop runs per token.
        let cancelled = task.cancel.cancelled();
        let node_lost = lost.cancelled();
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(cancelled, node_lost, deadline);
        loop {
            // Retried elsewhere only while the client has seen nothing of this attempt.
            let relayed = i > 0 || decoder.relayed();
            let broken = |reason: String| {
                if !relayed {
                    Outcome::BeforeFirstToken(reason)
                } else {
                    Outcome::WorkerReset(reason)
                }
            };
            let chunk = tokio::select! {
                // A cancel wins over a chunk that is ready at the same time, and a chunk over
                // the deadline.
                biased;
                _ = &mut cancelled => return Outcome::Cancelled,
                _ = &mut node_lost => return broken("the pool's node was lost".into()),
                c = stream.next() => c,
                _ = &mut deadline => {
                    return Outcome::DecodeTimeout(format!(
                        "no output from the engine for {} ms",
                        wait.as_millis()
                    ));
                }
            };
            let bytes = match chunk {
                Some(Err(e)) => return broken(format!("stream broken: {e}")),
                None => {
                    return match decoder.at_end() {
                        Some((finish_reason, decode_ms, engine_tokens)) => Outcome::Done {
                            finish_reason,
                            decode_ms,
                            engine_tokens,
                            first_token,
                        },
                        None => broken("engine closed the stream before the end".into()),
                    }
                }
                Some(Ok(b)) => b,
            };
            let frames = match parser.try_push(&bytes) {
                Ok(frames) => frames,
                Err(e) => return broken(format!("engine stream refused: {e}")),
            };
            for frame in frames {
                let piece = match decoder.decode(&frame.data) {
                    Ok(p) => p,
                    Err(refused) => return Outcome::EngineRefused(refused),
                };
                if let Some(report) = piece.prompt_cache {
                    task.set_engine_prompt(report);
                }
                let progress = piece.visible;
                if progress {
                    units += 1;
                }
                if let Some(t) = piece.token {
                    if i >= task.req.max_tokens {
                        // The engine overran the limit it was given: the task is complete.
                        return cut_off(i, first_token);
                    }
                    if first_token.is_none() {
                        self.mark_first_token(task).await;
                        if task.cancel.is_cancelled() {
                            // Cancelled while the mark was written: nothing leaves.
                            return Outcome::Cancelled;
                        }
                    }
                    first_token.get_or_insert_with(Instant::now);
                    task.emit(&TaskEvent::Token { t, i });
                    self.tokens_out.inc();
                    i += 1;
                } else if piece.logged {
                    // A choice without text (role, tool-call fragment): wake its relay.
                    task.poke();
                }
                // Output of any kind counts against the limit: an engine that streams tool-call
                // fragments or reasoning without end is cut off too.
                if units > u64::from(task.req.max_tokens) + 16 {
                    return cut_off(i, first_token);
                }
                if let Some((finish_reason, decode_ms, engine_tokens)) = piece.done {
                    return Outcome::Done {
                        finish_reason,
                        decode_ms,
                        engine_tokens,
                        first_token,
                    };
                }
                if progress {
                    wait = self.decode_timeout;
                    deadline.as_mut().reset(Instant::now() + wait);
                }
            }
        }
    }
}

impl Runner<'_> {
    /// A request the engine answers at once (embeddings): the whole body within the
    /// first-token timeout, logged for the responder.
    async fn whole_answer(
        &self,
        task: &Task,
        job: &crate::job::Job,
        mut stream: crate::engine::ByteStream,
        lost: &tokio_util::sync::CancellationToken,
    ) -> Outcome {
        let read = async {
            let mut body = Vec::new();
            while let Some(chunk) = stream.next().await {
                body.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
                if body.len() > WHOLE_ANSWER_MAX {
                    return Err(format!("answer over {} MiB", WHOLE_ANSWER_MAX >> 20));
                }
            }
            Ok::<_, String>(body)
        };
        let body = tokio::select! {
            _ = task.cancel.cancelled() => return Outcome::Cancelled,
            _ = lost.cancelled() => return Outcome::BeforeFirstToken("the pool's node was lost".into()),
            r = tokio::time::timeout(self.first_token_timeout, read) => match r {
                Err(_) => return Outcome::DecodeTimeout(format!(
                    "no answer from the engine for {} ms",
                    self.first_token_timeout.as_millis()
                )),
                Ok(Err(e)) => return Outcome::BeforeFirstToken(format!("answer broken: {e}")),
                Ok(Ok(b)) => b,
            },
        };
        match job.log.whole(body) {
            Ok(()) => Outcome::Done {
                finish_reason: "stop".into(),
                decode_ms: 0,
                engine_tokens: None,
                first_token: None,
            },
            Err(e) => Outcome::EngineRefused(e),
        }
    }
}

/// llama-server's own `/completion` body for a `/v2` task.
fn native_body(task: &Task, id_slot: Option<u32>) -> Result<Bytes, String> {
    let req = &task.req;
    let body = CompletionRequest {
        prompt: task.prompt(),
        n_predict: req.max_tokens,
        stream: true,
        // A strict task recomputes its prompt: a cached prefix from another request must not
        // change its numerics.
        cache_prompt: req.determinism != Some(Determinism::Strict),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        seed: req.seed,
        stop: req.stop.clone(),
        id_slot,
    };
    serde_json::to_vec(&body)
        .map(Bytes::from)
        .map_err(|e| format!("cannot encode the engine request: {e}"))
}

/// An OpenAI request body (allowlisted fields, an object) with the engine slot to run in. The
/// body is a JSON object as serde_json wrote it (no `id_slot`: it is not on the client's
/// list), so the field is spliced in before its closing brace rather than the body parsed
/// and written again on every dispatch.
pub(crate) fn with_id_slot(body: Bytes, slot: u32) -> Bytes {
    let Some(inner) = body.strip_prefix(b"{").and_then(|b| b.strip_suffix(b"}")) else {
        return body;
    };
    let mut out = Vec::with_capacity(body.len() + 24);
    out.push(b'{');
    out.extend_from_slice(inner);
    if !inner.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(format!("\"id_slot\":{slot}}}").as_bytes());
    Bytes::from(out)
}

/// How the engine's stream is read: llama-server's own chunks, or an OpenAI route's.
enum Decoder<'a> {
    Native,
    OpenAi(crate::job::Decoder<'a>),
}

impl Decoder<'_> {
    fn decode(&mut self, data: &str) -> Result<Piece, String> {
        match self {
            Decoder::OpenAi(d) => d.decode(data),
            Decoder::Native => Ok(match parse_chunk(data)? {
                None => Piece::default(),
                Some(c) => Piece {
                    prompt_cache: c
                        .timings
                        .as_ref()
                        .and_then(llamacpp_client::Timings::prompt_cache),
                    visible: !c.content.is_empty(),
                    token: (!c.content.is_empty()).then_some(c.content),
                    logged: false,
                    done: c.stop.then(|| {
                        let finish_reason = match c.stop_type.as_deref() {
                            Some("limit") => "length",
                            _ => "stop",
                        };
                        let timings = c.timings.unwrap_or_default();
                        (
                            finish_reason.to_string(),
                            timings.predicted_ms.unwrap_or(0.0).round() as u64,
                            c.tokens_predicted.or(timings.predicted_n),
                        )
                    }),
                },
            }),
        }
    }

    fn relayed(&self) -> bool {
        match self {
            Decoder::OpenAi(d) => d.relayed(),
            Decoder::Native => false,
        }
    }

    /// The stream closed by itself: whether that was the end of the generation.
    fn at_end(&self) -> Option<(String, u64, Option<u32>)> {
        match self {
            Decoder::OpenAi(d) => d.at_end(),
            Decoder::Native => None,
        }
    }
}

/// One `data:` frame of the engine's stream: a chunk, nothing to use (`None`), or the engine's
/// error report (`Err`). Parsed straight into the typed chunk: this runs once per token.
fn parse_chunk(data: &str) -> Result<Option<CompletionChunk>, String> {
    match serde_json::from_str::<CompletionChunk>(data) {
        Ok(c) => match &c.error {
            Some(err) => Err(format!("engine error: {err}")),
            None => Ok(Some(c)),
        },
        Err(_) => {
            let value: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            match value.get("error") {
                Some(err) => Err(format!("engine error: {err}")),
                None => Ok(None),
            }
        }
    }
}

/// The engine went past the task's limit: the task is complete at `tokens`, ended for length.
fn cut_off(tokens: u32, first_token: Option<Instant>) -> Outcome {
    Outcome::Done {
        finish_reason: "length".into(),
        decode_ms: 0,
        engine_tokens: Some(tokens),
        first_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_is_spliced_into_the_body_as_a_field() {
        let body = serde_json::to_vec(&serde_json::json!({
            "messages": [{"role": "user", "content": "a } in text {"}], "max_tokens": 4
        }))
        .unwrap();
        let pinned = with_id_slot(Bytes::from(body.clone()), 3);
        let mut want: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&body).unwrap();
        want.insert("id_slot".into(), 3.into());
        let got: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&pinned).unwrap();
        assert_eq!(got, want);
        let empty = with_id_slot(Bytes::from_static(b"{}"), 0);
        assert_eq!(&empty[..], br#"{"id_slot":0}"#);
    }
}
