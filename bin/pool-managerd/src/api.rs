//! HTTP API (DESIGN §4): public `/health`; everything else Bearer-authenticated. One error
//! envelope for every failure, extractor rejections included; `X-Correlation-Id` on every
//! response.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use llorch_contracts::{DrainRequest, ErrorCode, ErrorEnvelope, PoolsResponse, ReloadRequest};
use tokio::sync::oneshot;

use crate::state::Shared;
use crate::supervisor::Command;

pub type AppState = Arc<Shared>;

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The one error type of the API; `IntoResponse` is the one place codes become statuses.
#[derive(Debug)]
pub struct ApiError(pub ErrorEnvelope);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorEnvelope::new(code, message))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(&self.0)).into_response();
        if let Some(ms) = self.0.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.0.code == ErrorCode::Unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// `Json` whose rejections use the envelope (400, or 413 for an oversized body).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
    } else {
        ApiError::new(ErrorCode::InvalidParams, r.body_text())
    }
}

pub fn router(state: AppState) -> Router {
    let authed = Router::new()
        .route("/v2/pools", get(list_pools))
        .route("/v2/pools/{id}/status", get(pool_status))
        .route("/v2/pools/{id}/drain", post(drain))
        .route("/v2/pools/{id}/reload", post(reload))
        .route(
            "/v2/pools/{id}/engine/{*path}",
            any(crate::proxy::engine_proxy),
        )
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(
            state.config.max_body_bytes,
        ))
        .layer(middleware::from_fn(correlation_id))
        .with_state(state)
}

/// Echoes a sane `X-Correlation-Id` or makes one, and logs the request inside a span with it.
async fn correlation_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(CORRELATION_HEADER, value.clone());
    let span = tracing::info_span!("request", correlation_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    resp.headers_mut().insert(CORRELATION_HEADER, value);
    resp
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.config.token {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(reason) = auth_min::authorize(header, token) {
            tracing::warn!(%reason, path = %req.uri().path(), "request refused");
            return ApiError::new(ErrorCode::Unauthorized, reason.to_string()).into_response();
        }
    }
    next.run(req).await
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "node_id": state.config.node_id}))
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "method not allowed on this endpoint")
}

async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.metrics.render(&state.pools());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn list_pools(State(state): State<AppState>) -> Json<PoolsResponse> {
    let gpus = state.gpus.read().clone();
    Json(PoolsResponse {
        node_id: state.config.node_id.clone(),
        gpu_discovery: gpus.mode.to_string(),
        gpus: gpus.gpus,
        pools: state.pools(),
    })
}

fn unknown_pool(id: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no pool {id:?} on this node"))
}

async fn pool_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let status = state.pool(&id).ok_or_else(|| unknown_pool(&id))?;
    Ok(Json(status).into_response())
}

fn supervisor(state: &Shared, id: &str) -> Result<tokio::sync::mpsc::Sender<Command>, ApiError> {
    match state.supervisors.get(id) {
        Some(tx) => Ok(tx.clone()),
        None if state.pool(id).is_some() => Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "pool {id:?} is provisioned externally; drain or reload it where it was started"
            ),
        )),
        None => Err(unknown_pool(id)),
    }
}

async fn drain(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Response, ApiError> {
    let tx = supervisor(&state, &id)?;
    let (reply, rx) = oneshot::channel();
    tx.send(Command::Drain {
        deadline: Duration::from_millis(req.deadline_ms),
        reply,
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::PoolUnavailable, "pool supervisor has stopped"))?;
    let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
    let status = state.pool(&id).ok_or_else(|| unknown_pool(&id))?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

async fn reload(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ReloadRequest>,
) -> Result<Response, ApiError> {
    let path = std::path::PathBuf::from(&req.new_model_ref);
    if !path.is_file() {
        return Err(ApiError::new(
            ErrorCode::InvalidParams,
            format!(
                "new_model_ref {:?} is not a model file on this node",
                req.new_model_ref
            ),
        ));
    }
    let tx = supervisor(&state, &id)?;
    let (reply, rx) = oneshot::channel();
    tx.send(Command::Reload {
        model_path: path,
        reply,
    })
    .await
    .map_err(|_| ApiError::new(ErrorCode::PoolUnavailable, "pool supervisor has stopped"))?;
    let wait = state.config.engine_start_timeout + Duration::from_secs(30);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(Ok(status))) => Ok(Json(status).into_response()),
        Ok(Ok(Err(error))) => Err(ApiError::new(
            ErrorCode::PoolUnready,
            format!("reload failed; the previous model keeps serving: {error}"),
        )
        .into_retry_after(5000)),
        _ => Err(ApiError::new(
            ErrorCode::Internal,
            "reload did not finish in time",
        )),
    }
}

impl ApiError {
    pub fn into_retry_after(mut self, ms: u64) -> Self {
        self.0 = self.0.with_retry_after_ms(ms);
        self
    }
}

/// Headers never forwarded between client and engine (hop-by-hop, and our own credentials).
pub fn is_unforwarded_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "host"
            | "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
    )
}

pub fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !is_unforwarded_header(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

pub fn method_allows_body(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD)
}

pub fn stream_body(resp: reqwest::Response) -> Body {
    Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other))
}
