//! HTTP API of orchestratord (DESIGN §3). Public: `/health`, `/ready`, `/metrics`. Everything
//! else is Bearer-authenticated. Every failure is the one envelope; `X-Correlation-Id` on every
//! response.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use llorch_contracts::meta::{
    Availability, Capabilities, HealthResponse, Limits, ModelCapability, NodeRegistered,
    NodesResponse, OrchPoolsResponse, ReadyResponse, SessionResponse, VersionResponse,
};
use llorch_contracts::tasks::TaskRequest;
use llorch_contracts::{DrainRequest, ErrorCode, ErrorEnvelope, ReloadRequest};
use llorch_http::{ApiError, ApiJson, ApiPath, ApiQuery};

use crate::pools::PoolEntry;
use crate::state::Orchestrator;

pub use crate::state::AppState;

pub fn router(state: AppState) -> Router {
    // Clients submit and follow their own tasks and read the service's state; admins operate
    // pools and nodes (and see every task); nodes register and heartbeat.
    let client = Router::new()
        .route("/v2/tasks", post(submit))
        .route("/v2/tasks/{id}", get(task_status))
        .route("/v2/tasks/{id}/events", get(crate::sse::events))
        .route("/v2/tasks/{id}/cancel", post(cancel))
        .route("/v2/sessions/{id}", get(session).delete(delete_session))
        .route("/v2/meta/capabilities", get(capabilities))
        .route("/v2/meta/version", get(version))
        .route("/v2/pools", get(pools))
        .route("/v2/pools/{id}/health", get(pool_health));
    let admin = Router::new()
        .route("/v2/pools/{id}/drain", post(drain))
        .route("/v2/pools/{id}/reload", post(reload))
        .route("/v2/nodes", get(nodes))
        .route("/v2/nodes/{id}", axum::routing::delete(deregister_node))
        .route("/v2/overview", get(crate::overview::overview));
    let gate = |role| llorch_http::Gate {
        keys: state.config.keys.clone(),
        role,
    };
    let mut gated = vec![
        (client, gate(auth_min::Role::Client)),
        (admin, gate(auth_min::Role::Admin)),
    ];
    // With a listener of their own (ORCHD_NODE_BIND_ADDR) the node routes are served there
    // only ([`node_router`]).
    if state.config.node_bind_addr.is_none() {
        gated.push((node_routes(&state), gate(auth_min::Role::Node)));
    }
    let public = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        // The console's page and assets hold no data: its API calls carry the admin token.
        .merge(crate::ui::router())
        // OpenAI's routes answer (auth included) in OpenAI's error shape.
        .nest("/v1", crate::openai::router(&state));
    let router = llorch_http::assemble(public, gated, state.config.max_body_bytes);
    // Only where connections are kept back for nodes (CLOUD without a node listener): no
    // per-request layer elsewhere.
    let router = match state.config.conn_limits.reserved {
        0 => router,
        _ => router.layer(axum::middleware::from_fn(nodes_only_on_reserve)),
    };
    router.with_state(state)
}

/// The node routes: registration and heartbeats (mutual TLS: a node certificate too).
fn node_routes(state: &AppState) -> Router<AppState> {
    let node = Router::new()
        .route("/v2/nodes/register", post(register_node))
        .route("/v2/nodes/{id}/heartbeat", post(heartbeat));
    if state.config.tls.as_ref().is_some_and(|t| t.mutual()) {
        node.route_layer(axum::middleware::from_fn(require_client_cert))
    } else {
        node
    }
}

/// The node listener's routes (ORCHD_NODE_BIND_ADDR): registration, heartbeats and `/health`.
pub fn node_router(state: AppState) -> Router {
    let gate = llorch_http::Gate {
        keys: state.config.keys.clone(),
        role: auth_min::Role::Node,
    };
    llorch_http::assemble(
        Router::new().route("/health", get(health)),
        vec![(node_routes(&state), gate)],
        state.config.max_body_bytes,
    )
    .with_state(state)
}

/// A connection on the reserved share of the connection cap (all the others are taken) serves
/// node registration and heartbeats only: whatever clients hold, a heartbeat gets in.
async fn nodes_only_on_reserve(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let for_nodes = {
        let path = req.uri().path();
        path == "/v2/nodes/register"
            || (path.starts_with("/v2/nodes/") && path.ends_with("/heartbeat"))
    };
    if req
        .extensions()
        .get::<llorch_http::ReservedConn>()
        .is_some()
        && !for_nodes
    {
        tracing::debug!(path = %req.uri().path(), "connection cap reached: a client request on a node connection refused");
        return llorch_http::closing(
            crate::limits::over_limit(
                "connection_cap",
                "orchestratord is at its connection cap (ORCHD_MAX_CONNECTIONS); retry".into(),
                1000,
            )
            .into_response(),
        );
    }
    next.run(req).await
}

/// Mutual TLS: a node route needs a client certificate that chained to ORCHD_TLS_CLIENT_CA_FILE
/// (checked in the handshake; its presence is the proof), besides the node token.
async fn require_client_cert(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if req
        .extensions()
        .get::<llorch_http::tls::ClientCert>()
        .is_none()
    {
        tracing::warn!(path = %req.uri().path(), "node route refused: no client certificate (ORCHD_TLS_CLIENT_CA_FILE is set)");
        return ApiError::new(
            ErrorCode::Forbidden,
            "this route needs a client certificate signed by the node CA (mutual TLS)",
        )
        .into_response();
    }
    next.run(req).await
}

async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "ok".into(),
        node_id: None,
    })
}

async fn ready(State(orch): State<AppState>) -> Result<Json<ReadyResponse>, ApiError> {
    let ready_pools = orch.pools.list().iter().filter(|p| p.ready()).count();
    if !orch.is_accepting() {
        return Err(
            ApiError::new(ErrorCode::PoolUnavailable, "shutting down").with_retry_after(5000)
        );
    }
    if ready_pools == 0 {
        return Err(
            ApiError::new(ErrorCode::PoolUnavailable, "no pool is ready").with_retry_after(1000),
        );
    }
    Ok(Json(ReadyResponse {
        status: "ready".into(),
        pools_ready: ready_pools,
    }))
}

async fn metrics(State(orch): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let pools: Vec<(String, bool)> = orch
                .pools
                .list()
                .into_iter()
                .map(|p| (p.pool_id.clone(), p.ready()))
                .collect();
            let nodes: Vec<(String, bool)> = orch
                .managers
                .list()
                .into_iter()
                .map(|m| {
                    let online = m.availability == Availability::Available;
                    (m.node_id.unwrap_or(m.url), online)
                })
                .collect();
            orch.metrics.render(&pools, &nodes)
        },
    )
        .into_response()
}

async fn submit(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    headers: axum::http::HeaderMap,
    body: Result<ApiJson<TaskRequest>, ApiError>,
) -> Result<Response, ApiError> {
    let ApiJson(req) = body.inspect_err(|e| {
        let reason = if e.0.code == ErrorCode::PayloadTooLarge {
            "payload_too_large"
        } else {
            "invalid_params"
        };
        orch.count_rejection(reason);
        tracing::info!(reason, message = %e.0.message, "task rejected");
    })?;
    // Set (echoed or made) by the correlation layer before any handler runs.
    let correlation_id = headers
        .get(llorch_http::CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let admitted = orch.admit_durable(req, correlation_id, &caller).await?;
    Ok((StatusCode::ACCEPTED, Json(admitted)).into_response())
}

/// `?owner=` on a task's routes: another key's task, by that key's name (admins only).
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct OwnerQuery {
    owner: Option<String>,
}

async fn task_status(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<OwnerQuery>,
) -> Result<Response, ApiError> {
    let task = orch.visible_task(&id, query.owner.as_deref(), &caller)?;
    Ok(Json(task.status(orch.queue_position(&task))).into_response())
}

async fn cancel(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<OwnerQuery>,
) -> Result<StatusCode, ApiError> {
    let task = orch.visible_task(&id, query.owner.as_deref(), &caller)?;
    orch.cancel(
        &task,
        ErrorEnvelope::new(ErrorCode::Cancelled, "cancelled by the client"),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Sessions belong to the key that uses them: a key reads and deletes its own only, and another
/// key's session id answers 404 like one never used.
async fn session(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let now = tokio::time::Instant::now().into_std();
    let info = orch
        .sessions
        .lock()
        .get(&crate::tasks::scoped(&caller.name, &id), now)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no session {id:?}")))?;
    let warm = info
        .last_pool_id
        .as_deref()
        .and_then(|p| orch.pools.get(p))
        .is_some_and(|p| p.ready());
    Ok(Json(SessionResponse {
        session_id: id,
        ttl_ms_remaining: info.ttl_remaining.as_millis() as u64,
        turns: info.turns,
        kv_warmth: warm,
        last_pool_id: info.last_pool_id,
    })
    .into_response())
}

async fn delete_session(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    if orch
        .sessions
        .lock()
        .remove(&crate::tasks::scoped(&caller.name, &id))
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no session {id:?}"),
        ))
    }
}

async fn capabilities(State(orch): State<AppState>) -> Json<Capabilities> {
    let c = &orch.config;
    let mut models: std::collections::BTreeMap<String, ModelCapability> = Default::default();
    for p in orch.pools.list().into_iter().filter(|p| p.ready()) {
        let m = models
            .entry(p.model_id.clone())
            .or_insert_with(|| ModelCapability {
                model_id: p.model_id.clone(),
                pools: 0,
                slots_total: 0,
                ctx_max: 0,
                engine: p.engine.clone(),
            });
        m.pools += 1;
        m.slots_total += p.slots_total;
        m.ctx_max = m.ctx_max.max(p.ctx_max.unwrap_or(0));
    }
    Json(Capabilities {
        api_version: "v2".into(),
        profile: c.profile.as_str().into(),
        models: models.into_values().collect(),
        limits: Limits {
            max_tokens: c.max_tokens_cap,
            max_body_bytes: c.max_body_bytes,
            queue_capacity: c.admission_capacity,
            admission_policy: c.admission_policy.label().into(),
        },
    })
}

async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        service: "orchestratord".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        api_version: "v2".into(),
    })
}

async fn pools(State(orch): State<AppState>) -> Json<OrchPoolsResponse> {
    Json(OrchPoolsResponse {
        pools: orch.pools.list().iter().map(PoolEntry::wire).collect(),
    })
}

async fn pool_health(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let p = orch
        .pools
        .get(&id)
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no pool {id:?}")))?;
    Ok(Json(p.health()).into_response())
}

async fn drain(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<DrainRequest>,
) -> Result<Response, ApiError> {
    forward(&orch, &id, "drain", &req, &headers).await
}

async fn reload(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<ReloadRequest>,
) -> Result<Response, ApiError> {
    forward(&orch, &id, "reload", &req, &headers).await
}

/// Forwards a control request to the pool-managerd that owns the pool (CLOUD) or the local one
/// (HOME) and relays its answer (status and body).
async fn forward<B: serde::Serialize>(
    orch: &Orchestrator,
    pool_id: &str,
    action: &str,
    body: &B,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let (manager, credential) = match orch.config.profile {
        crate::config::Profile::Home => (
            orch.config.pool_manager_url.clone(),
            orch.config.token.clone(),
        ),
        crate::config::Profile::Cloud => orch.managers.owner_of(pool_id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no pool-managerd serves pool {pool_id:?}"),
            )
        })?,
    };
    let url = format!("{manager}/v2/pools/{pool_id}/{action}");
    // The node's own credential (CLOUD; the node token in HOME); never logged.
    let mut rb = orch
        .control_http
        .post(&url)
        .json(body)
        .timeout(Duration::from_secs(300));
    if let Some(token) = &credential {
        rb = rb.bearer_auth(token.expose());
    }
    // The caller's correlation id goes on to pool-managerd, so both logs join.
    if let Some(id) = headers.get(llorch_http::CORRELATION_HEADER) {
        rb = rb.header(llorch_http::CORRELATION_HEADER, id.as_bytes());
    }
    let resp = rb.send().await.map_err(|e| {
        let cause = llamacpp_client::error_chain(&e);
        tracing::warn!(%manager, error = %cause, "pool-managerd unreachable for control request");
        ApiError::new(
            ErrorCode::PoolUnavailable,
            format!("pool-managerd {manager} is unreachable: {cause}"),
        )
        .with_retry_after(5000)
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    // pool-managerd's own typed answer (pool status or the envelope), relayed as it came.
    let body = resp.bytes().await.unwrap_or_default();
    Ok((status, [(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn nodes(State(orch): State<AppState>) -> Json<NodesResponse> {
    Json(NodesResponse {
        nodes: orch.managers.views(),
    })
}

/// Whether `caller` may speak for node `node_id`: a per-node token only for its own node, and
/// a node id bound to a per-node token (ORCHD_NODE_TOKENS_FILE) only with that token — so a
/// live node cannot be taken over with the shared node token.
fn speaks_for(
    orch: &crate::state::Orchestrator,
    caller: &auth_min::Principal,
    node_id: &str,
) -> Result<(), ApiError> {
    let refused = |why: String| {
        tracing::warn!(key = %caller.name, node_id = %node_id.chars().take(64).collect::<String>(), "{why}");
        Err(ApiError::new(ErrorCode::Forbidden, why))
    };
    match &caller.node {
        Some(own) if **own != *node_id => refused(format!(
            "this token speaks for node {own:?} only, not {node_id:?}"
        )),
        Some(_) => Ok(()),
        None if orch.config.node_credentials.per_node.contains_key(node_id) => refused(format!(
            "node {node_id:?} has its own token (ORCHD_NODE_TOKENS_FILE); only that token speaks for it"
        )),
        None => Ok(()),
    }
}

/// Under mutual TLS a node speaks only as the id its certificate names (a DNS name in its
/// subjectAltName), whatever its token allows.
fn certificate_names(
    orch: &crate::state::Orchestrator,
    cert: Option<&llorch_http::tls::ClientCert>,
    node_id: &str,
) -> Result<(), ApiError> {
    if !orch.config.tls.as_ref().is_some_and(|t| t.mutual()) {
        return Ok(());
    }
    if cert.is_some_and(|c| c.names(node_id)) {
        return Ok(());
    }
    let shown: String = node_id.chars().take(64).collect();
    tracing::warn!(node_id = %shown, "node route refused: the client certificate does not name this node id");
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!("the client certificate does not name node {shown:?}: under mutual TLS a node registers and heartbeats as the id its certificate names (a subjectAltName DNS name)"),
    ))
}

async fn register_node(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    cert: Option<Extension<llorch_http::tls::ClientCert>>,
    ApiJson(reg): ApiJson<llorch_contracts::nodes::NodeRegistration>,
) -> Result<Json<NodeRegistered>, ApiError> {
    if orch.config.profile != crate::config::Profile::Cloud || !orch.config.node_registration {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            "node registration is off (ORCHD_PROFILE=cloud with ORCHD_NODE_REGISTRATION=true turns it on)",
        ));
    }
    let address = llorch_contracts::address::base_url(
        &reg.address,
        crate::config::node_schemes(orch.config.tls.is_some()),
    )
    .map_err(|reason| {
        ApiError::new(
            ErrorCode::InvalidParams,
            format!("address must be a plain http:// or https:// base URL: {reason}"),
        )
    })?;
    let address = address.as_str();
    if !llorch_contracts::handoff::is_valid_pool_id(&reg.node_id) {
        return Err(ApiError::new(
            ErrorCode::InvalidParams,
            "node_id must be 1-64 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    speaks_for(&orch, &caller, &reg.node_id)?;
    certificate_names(&orch, cert.as_deref(), &reg.node_id)?;
    llorch_contracts::GpuInfo::validate_all(&reg.gpus)
        .map_err(|reason| ApiError::new(ErrorCode::InvalidParams, format!("gpus: {reason}")))?;
    let moved = orch
        .managers
        .register(&reg.node_id, address, reg.gpus, orch.config.max_nodes)
        .map_err(|refused| {
            tracing::warn!(node_id = %reg.node_id, %address, reason = %refused, "node registration refused");
            ApiError::new(ErrorCode::Conflict, refused.to_string())
        })?;
    for pool in &moved {
        // Bound to the node's old address: tasks there end now, the pool binds again at the
        // new address at the next poll.
        orch.pools
            .mark_lost(pool, format!("node {} moved to {address}", reg.node_id));
        orch.pools.remove(pool);
    }
    tracing::info!(node_id = %reg.node_id, %address, pools = reg.pools.len(), retired = moved.len(), "node registered");
    let interval = orch.config.node_heartbeat_timeout / 3;
    Ok(Json(NodeRegistered {
        node_id: reg.node_id,
        heartbeat_interval_ms: interval.as_millis() as u64,
    }))
}

async fn heartbeat(
    State(orch): State<AppState>,
    Extension(caller): Extension<auth_min::Principal>,
    cert: Option<Extension<llorch_http::tls::ClientCert>>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    speaks_for(&orch, &caller, &id)?;
    certificate_names(&orch, cert.as_deref(), &id)?;
    if orch.managers.heartbeat(&id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(
            ErrorCode::NotFound,
            format!("node {id:?} is not registered; register again"),
        ))
    }
}

async fn deregister_node(
    State(orch): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let pools = orch.managers.deregister(&id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("node {id:?} is not registered"),
        )
    })?;
    for pool in pools {
        orch.pools
            .mark_lost(&pool, format!("node {id} deregistered"));
        orch.pools.remove(&pool);
    }
    tracing::info!(node_id = %id, "node deregistered");
    Ok(StatusCode::NO_CONTENT)
}
