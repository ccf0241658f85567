//! HTTP API (DESIGN §4): public `/health`; everything else Bearer-authenticated. One error
//! envelope for every failure, extractor rejections included; `X-Correlation-Id` on every
//! response.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use llorch_contracts::meta::HealthResponse;
use llorch_contracts::{DrainRequest, ErrorCode, PoolsResponse, ReloadRequest};
pub use llorch_http::{ApiError, ApiJson};
use tokio::sync::oneshot;

pub use crate::state::AppState;
use crate::state::{Command, Shared};

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
        .route("/metrics", get(metrics));
    let public = Router::new().route("/health", get(health));
    // One key, the node's: client keys are never configured here.
    let keys = state.config.token.clone().map(|token| {
        let mut ring = auth_min::Keyring::default();
        // A single key cannot be a duplicate.
        let _ = ring.add(
            auth_min::Principal::new("node", &[auth_min::Role::Node]),
            token,
        );
        std::sync::Arc::new(std::sync::RwLock::new(ring))
    });
    let gate = llorch_http::Gate {
        keys,
        role: auth_min::Role::Node,
    };
    llorch_http::assemble(public, vec![(authed, gate)], state.config.max_body_bytes)
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        node_id: Some(state.config.node_id.clone()),
    })
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
    // One answer whether the path is missing, elsewhere or not a file: the network learns
    // nothing about this node's files.
    let path = crate::config::model_under(
        &state.config.model_dirs,
        std::path::Path::new(&req.new_model_ref),
    )
    .ok_or_else(|| {
        ApiError::new(
            ErrorCode::InvalidParams,
            "new_model_ref is not a model file in this node's model directories (POOL_MANAGERD_MODEL_DIRS)",
        )
    })?;
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
        Ok(Ok(Err(error))) => {
            // The reason (with the engine's last log lines) stays on this node.
            tracing::warn!(pool_id = %id, %error, "reload failed");
            Err(ApiError::new(
                ErrorCode::PoolUnready,
                format!("reload of pool {id:?} failed; the previous model keeps serving (the reason is in this node's log)"),
            )
            .with_retry_after(5000))
        }
        _ => Err(ApiError::new(
            ErrorCode::Internal,
            "reload did not finish in time",
        )),
    }
}
