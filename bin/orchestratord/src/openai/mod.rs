//! The OpenAI-compatible front (DESIGN §3): `/v1/models`, `/v1/chat/completions`,
//! `/v1/completions`, `/v1/embeddings`. An OpenAI request is a task: it is admitted, queued, placed and
//! cancelled like a `/v2` one (visible in `GET /v2/tasks/{id}` under its `chatcmpl-…`/`cmpl-…`
//! id); only its engine request (llama-server's own OpenAI route, allowlisted fields) and its
//! answer differ. Streams are OpenAI's wire: `data:` chunks, `data: [DONE]` last, queue
//! position and keep-alives as comments.

mod wire;

pub(crate) use crate::job::Route;

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llorch_contracts::openai::{
    ChatRequest, Chunk, Completion, CompletionRequest, Embedding, EmbeddingRequest,
    EmbeddingResponse, EmbeddingUsage, Model, ModelList, Usage,
};
use llorch_contracts::ErrorCode;
use llorch_http::{ApiError, ApiJson, ApiPath};

use crate::job::{gather, ChunkLog, Job};
use crate::pools::PoolPhase;
use crate::sse::SubscriberGuard;
use crate::state::AppState;
use crate::state::Orchestrator;
use crate::tasks::Task;
use wire::OaError;

const TASK_HEADER: &str = "x-llorch-task-id";

/// The `/v1` routes, with their own auth answer and unknown-route answers in OpenAI's shape.
pub(crate) fn router(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/models", get(models))
        // Model ids may hold slashes (`org/model`).
        .route("/models/{*id}", get(model))
        .route("/chat/completions", post(chat))
        .route("/completions", post(completions))
        .route("/embeddings", post(embeddings))
        .route_layer(axum::middleware::from_fn_with_state(
            llorch_http::Gate {
                keys: state.config.keys.clone(),
                role: auth_min::Role::Client,
            },
            wire::require_key,
        ))
        .fallback(wire::not_found)
        .method_not_allowed_fallback(wire::method_not_allowed)
}

fn unix_now() -> u64 {
    crate::tasks::now_ms() / 1000
}

/// Model ids served now: by a pool that is serving or restarting (not failed).
fn served_models(orch: &Orchestrator) -> Vec<String> {
    let mut ids: Vec<String> = orch
        .pools
        .list()
        .into_iter()
        .filter(|p| p.phase != PoolPhase::Failed)
        .map(|p| p.model_id)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn model_entry(id: String) -> Model {
    Model {
        id,
        object: "model".into(),
        created: 0,
        owned_by: "llama-orch".into(),
    }
}

async fn models(State(orch): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: served_models(&orch).into_iter().map(model_entry).collect(),
    })
}

async fn model(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Model>, OaError> {
    if served_models(&orch).contains(&id) {
        Ok(Json(model_entry(id)))
    } else {
        Err(OaError::model_not_found(&id))
    }
}

async fn chat(
    State(orch): State<AppState>,
    axum::Extension(principal): axum::Extension<auth_min::Principal>,
    headers: HeaderMap,
    body: Result<ApiJson<ChatRequest>, ApiError>,
) -> Result<Response, OaError> {
    let ApiJson(mut req) = checked(&orch, body.map_err(OaError::from))?;
    let (body, max_tokens) = checked(&orch, wire::chat_body(&orch.config, &mut req))?;
    let model = std::mem::take(&mut req.model);
    run(
        &orch,
        Caller {
            headers: &headers,
            principal: &principal,
        },
        Route::Chat,
        &model,
        &req.sampling,
        body,
        max_tokens,
    )
    .await
}

async fn completions(
    State(orch): State<AppState>,
    axum::Extension(principal): axum::Extension<auth_min::Principal>,
    headers: HeaderMap,
    body: Result<ApiJson<CompletionRequest>, ApiError>,
) -> Result<Response, OaError> {
    let ApiJson(req) = checked(&orch, body.map_err(OaError::from))?;
    let (body, max_tokens) = checked(&orch, wire::completion_body(&orch.config, &req))?;
    let route = Route::Completions;
    run(
        &orch,
        Caller {
            headers: &headers,
            principal: &principal,
        },
        route,
        &req.model,
        &req.sampling,
        body,
        max_tokens,
    )
    .await
}

/// Passes `r` on; a refusal is counted and logged like a `/v2` one (the parameter only: the
/// message may quote the client's text).
fn checked<T>(orch: &Orchestrator, r: Result<T, OaError>) -> Result<T, OaError> {
    r.inspect_err(|e| {
        let reason = if e.body().error.code.as_deref() == Some("payload_too_large") {
            "payload_too_large"
        } else {
            "invalid_params"
        };
        orch.count_rejection(reason);
        let param = e.body().error.param.as_deref().unwrap_or("body");
        tracing::info!(reason, param, api = "openai", "task rejected");
    })
}

/// `resp` with the id of the task it answers (`GET /v2/tasks/{id}`), success or not.
fn named(mut resp: Response, task: &Task) -> Response {
    if let Ok(v) = HeaderValue::from_str(&task.id) {
        resp.headers_mut().insert(TASK_HEADER, v);
    }
    resp
}

/// Who asked: the request's headers and the key that made it.
#[derive(Clone, Copy)]
struct Caller<'a> {
    headers: &'a HeaderMap,
    principal: &'a auth_min::Principal,
}

/// Admits the task and answers: a stream of chunks, or the whole answer once it ends.
async fn run(
    orch: &Arc<Orchestrator>,
    caller: Caller<'_>,
    route: Route,
    model: &str,
    sampling: &llorch_contracts::openai::Sampling,
    body: serde_json::Map<String, serde_json::Value>,
    max_tokens: u32,
) -> Result<Response, OaError> {
    // A streamed answer holds its connection: one of the key's stream slots, taken before the
    // task is admitted.
    let slot = match sampling.stream {
        true => match orch.open_stream(caller.principal) {
            Ok(slot) => Some(slot),
            Err(refused) => {
                return Ok(llorch_http::closing(OaError::from(refused).into_response()))
            }
        },
        false => None,
    };
    let task = admit(
        orch,
        caller,
        route,
        model,
        sampling.user.as_deref(),
        body,
        max_tokens,
    )?;
    let resp = if sampling.stream {
        let include_usage = sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        stream(orch, task.clone(), include_usage, slot).into_response()
    } else {
        whole(orch, &task).await.into_response()
    };
    Ok(named(resp, &task))
}

/// Makes the task of an OpenAI request (its queueing view from the `X-Llorch-*` headers, its
/// engine request from `body`) and admits it.
fn admit(
    orch: &Arc<Orchestrator>,
    caller: Caller<'_>,
    route: Route,
    model: &str,
    user: Option<&str>,
    body: serde_json::Map<String, serde_json::Value>,
    max_tokens: u32,
) -> Result<Arc<Task>, OaError> {
    if model.trim().is_empty() {
        return checked(
            orch,
            Err(OaError::invalid("model", "model must not be empty")),
        );
    }
    let headers = caller.headers;
    let queueing = checked(orch, wire::queueing(headers, user))?;
    let prefix = match route {
        Route::Chat => "chatcmpl",
        Route::Completions => "cmpl",
        Route::Embeddings => "embd",
    };
    let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let req = wire::task_request(id, model, max_tokens, queueing);
    let body = serde_json::to_vec(&serde_json::Value::Object(body))
        .map_err(|e| OaError::new(500, format!("cannot encode the engine request: {e}")))?;
    let job = Job::new(route, body.into(), unix_now(), model.to_string());
    let correlation_id = headers
        .get(llorch_http::CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    orch.admit_openai(req, job, correlation_id, caller.principal)
        .map_err(|e| {
            let unknown = e.0.code == ErrorCode::ModelNotAvailable
                && !orch.pools.list().iter().any(|p| p.model_id == model);
            if unknown {
                OaError::model_not_found(model)
            } else {
                OaError::from(e)
            }
        })
}

async fn embeddings(
    State(orch): State<AppState>,
    axum::Extension(principal): axum::Extension<auth_min::Principal>,
    headers: HeaderMap,
    body: Result<ApiJson<EmbeddingRequest>, ApiError>,
) -> Result<Response, OaError> {
    let ApiJson(req) = checked(&orch, body.map_err(OaError::from))?;
    let body = checked(&orch, wire::embedding_body(&req))?;
    let user = req.user.as_deref();
    let task = admit(
        &orch,
        Caller {
            headers: &headers,
            principal: &principal,
        },
        Route::Embeddings,
        &req.model,
        user,
        body,
        1,
    )?;
    let resp = match embedded(&orch, &task, &req.model).await {
        Ok(answer) => answer.into_response(),
        Err(e) => e.into_response(),
    };
    Ok(named(resp, &task))
}

/// The embeddings of an ended task, read from the engine's answer as it was logged.
async fn embedded(
    orch: &Arc<Orchestrator>,
    task: &Arc<Task>,
    model: &str,
) -> Result<Json<EmbeddingResponse>, OaError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        data: Vec<Embedding>,
    }
    wait_end(orch, task).await?;
    let log = &job_of(task)?.log;
    let answer: Answer = log
        .parse_first()
        .ok_or_else(|| OaError::new(502, "the engine's answer holds no embeddings"))?;
    let usage = log.usage().unwrap_or_default();
    Ok(Json(EmbeddingResponse {
        object: "list".into(),
        data: answer.data,
        model: model.to_string(),
        usage: EmbeddingUsage {
            prompt_tokens: usage.prompt_tokens,
            total_tokens: usage.total_tokens,
        },
    }))
}

/// The job of a task admitted by this module (always present).
fn job_of(task: &Task) -> Result<&Job, OaError> {
    task.openai
        .as_ref()
        .ok_or_else(|| OaError::new(500, "task has no OpenAI request"))
}

fn usage_of(task: &Task, log: &ChunkLog) -> Usage {
    log.usage().unwrap_or_else(|| {
        let out = task.status(None).tokens_out;
        Usage {
            prompt_tokens: 0,
            completion_tokens: out,
            total_tokens: out,
        }
    })
}

/// Waits for the task's end (a client that disconnects drops this future, and the guard
/// cancels the task); its error, if it failed.
async fn wait_end(orch: &Arc<Orchestrator>, task: &Arc<Task>) -> Result<(), OaError> {
    let _guard = SubscriberGuard::without_grace(orch.clone(), task.clone());
    let mut frames = task.watch_frames();
    while !task.is_terminal() {
        if frames.changed().await.is_err() {
            break;
        }
    }
    match task.status(None).error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Non-stream: everything at once, when the task has ended.
async fn whole(orch: &Arc<Orchestrator>, task: &Arc<Task>) -> Result<Json<Completion>, OaError> {
    wait_end(orch, task).await?;
    let job = job_of(task)?;
    Ok(Json(Completion {
        id: task.id.clone(),
        object: job.route.object().into(),
        created: job.created,
        model: job.model.clone(),
        choices: vec![gather(job.route, &job.log.from(0))],
        usage: usage_of(task, &job.log),
    }))
}

struct Relay {
    task: Arc<Task>,
    include_usage: bool,
    /// `{"id":…,"object":…,"created":…,"model":…,"choices":[` of every chunk, written once.
    prefix: String,
    /// The queue position last told (as a comment).
    told_position: Option<u32>,
    next_choice: usize,
    frames: tokio::sync::watch::Receiver<u64>,
    pending: std::collections::VecDeque<Event>,
    done: bool,
    _guard: SubscriberGuard,
    _slot: Option<crate::sse::StreamSlot>,
}

impl Relay {
    fn usage_chunk(&self, job: &Job) -> Event {
        let chunk = Chunk {
            id: self.task.id.clone(),
            object: job.route.chunk_object().into(),
            created: job.created,
            model: job.model.clone(),
            choices: Vec::new(),
            usage: Some(usage_of(&self.task, &job.log)),
        };
        Event::default().data(serde_json::to_string(&chunk).unwrap_or_default())
    }

    /// Moves whatever is new (queue position, choices, the end) into `pending`; false when
    /// nothing was.
    fn collect(&mut self, job: &Job) -> bool {
        // The end first: every choice of an ended task was logged before it ended.
        let terminal = self.task.is_terminal();
        let before = self.pending.len();
        let position = self.task.last_position();
        if let Some(p) = position.filter(|p| Some(*p) != self.told_position) {
            self.pending
                .push_back(Event::default().comment(format!("queued position={p}")));
        }
        self.told_position = position;
        let (prefix, pending) = (&self.prefix, &mut self.pending);
        self.next_choice = job.log.for_each_from(self.next_choice, |c| {
            pending.push_back(Event::default().data(format!("{prefix}{c}]}}")));
        });
        if terminal {
            self.done = true;
            match self.task.status(None).error {
                Some(e) => {
                    let error = OaError::from(e);
                    let data = serde_json::to_string(error.body()).unwrap_or_default();
                    self.pending.push_back(Event::default().data(data));
                }
                None => {
                    if self.include_usage {
                        let event = self.usage_chunk(job);
                        self.pending.push_back(event);
                    }
                    self.pending.push_back(Event::default().data("[DONE]"));
                }
            }
        }
        self.done || self.pending.len() > before
    }
}

/// The fixed start of every chunk of `task`: id, object, created and model, then `choices`.
fn chunk_prefix(task: &Task, job: &Job) -> String {
    let text = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"id\":{},\"object\":\"{}\",\"created\":{},\"model\":{},\"choices\":[",
        text(&task.id),
        job.route.chunk_object(),
        job.created,
        text(&job.model)
    )
}

/// Stream: chunks as the engine produces them; the queue position as comments while waiting;
/// `[DONE]` last, or one error chunk and the end of the stream. Dropping the stream (the client
/// went away) cancels the task.
fn stream(
    orch: &Arc<Orchestrator>,
    task: Arc<Task>,
    include_usage: bool,
    slot: Option<crate::sse::StreamSlot>,
) -> Response {
    let Some(prefix) = task.openai.as_ref().map(|j| chunk_prefix(&task, j)) else {
        return OaError::new(500, "task has no OpenAI request").into_response();
    };
    let relay = Relay {
        frames: task.watch_frames(),
        _guard: SubscriberGuard::without_grace(orch.clone(), task.clone()),
        _slot: slot,
        task,
        include_usage,
        prefix,
        told_position: None,
        next_choice: 0,
        pending: Default::default(),
        done: false,
    };
    let keepalive = orch.config.sse_keepalive;
    let events = futures_util::stream::unfold(relay, |mut r| async move {
        loop {
            if let Some(e) = r.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(e), r));
            }
            if r.done {
                return None;
            }
            let task = r.task.clone();
            let job = task.openai.as_ref()?;
            // Marks the watch seen before reading, so nothing logged after the read is missed.
            r.frames.borrow_and_update();
            if r.collect(job) {
                continue;
            }
            if r.frames.changed().await.is_err() {
                return None;
            }
        }
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}
