//! `ANY /v2/pools/{id}/engine/{*path}`: a streaming reverse proxy to the pool's engine.
//! Response bytes are relayed as they arrive (no buffering); when the client goes away the
//! response stream is dropped, which closes the upstream connection and makes llama-server
//! abort the generation. A connection the engine closed before answering is retried once on a
//! fresh connection (DESIGN §7).

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, Method};
use axum::response::Response;
use futures_util::TryStreamExt;
use llorch_contracts::{ErrorCode, PoolState};

use crate::api::{ApiError, AppState};

pub async fn engine_proxy(
    State(state): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    let pool = state.pool(&id).ok_or_else(|| {
        ApiError::new(ErrorCode::NotFound, format!("no pool {id:?} on this node"))
    })?;
    let counter = |outcome: &str| {
        state
            .metrics
            .proxy_requests
            .with_label_values(&[&id, outcome])
            .inc()
    };
    let url = match (&pool.url, pool.state) {
        (Some(url), PoolState::Ready) => url.clone(),
        _ => {
            counter("unavailable");
            return Err(ApiError::new(
                ErrorCode::PoolUnready,
                format!(
                    "pool {id:?} is {} and takes no requests",
                    pool.state.as_str()
                ),
            )
            .with_retry_after(1000));
        }
    };
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|e| {
            if llorch_http::is_body_timeout(&e) {
                ApiError::new(ErrorCode::RequestTimeout, e.to_string())
            } else {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
            }
        })?;
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let target = format!("{url}/{}{query}", path.trim_start_matches('/'));
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);

    let send = || {
        let mut rb = state
            .proxy_http
            .request(parts.method.clone(), &target)
            .headers(headers.clone());
        if method_allows_body(&parts.method) {
            rb = rb.body(body.clone());
        }
        rb.send()
    };
    let span = tracing::info_span!("engine_proxy", pool_id = %id, path = %path);
    let upstream = match tracing::Instrument::instrument(send(), span.clone()).await {
        Ok(r) => r,
        Err(e) if llamacpp_client::is_retryable_connection_error(&e) => {
            tracing::debug!(pool_id = %id, "engine closed the connection before answering; retrying once");
            // On a new connection: the pool may hold more the engine has closed.
            let mut rb = state
                .proxy_fresh
                .request(parts.method.clone(), &target)
                .headers(headers.clone());
            if method_allows_body(&parts.method) {
                rb = rb.body(body.clone());
            }
            tracing::Instrument::instrument(rb.send(), span.clone())
                .await
                .map_err(|e| unreachable_engine(&id, &e))?
        }
        Err(e) => return Err(unreachable_engine(&id, &e)),
    };
    // One line per proxied request, in the request's span: its correlation id joins this
    // node's log with orchestratord's.
    tracing::info!(pool_id = %id, path = %path, status = upstream.status().as_u16(), "engine request proxied");
    counter(if upstream.status().is_server_error() {
        "engine_error"
    } else {
        "ok"
    });
    let mut resp = Response::builder().status(upstream.status());
    if let Some(h) = resp.headers_mut() {
        copy_headers(upstream.headers(), h);
    }
    resp.body(stream_body(upstream))
        .or_else(|_| Ok(Response::new(Body::empty())))
}

fn unreachable_engine(id: &str, e: &reqwest::Error) -> ApiError {
    tracing::warn!(pool_id = %id, error = %e, "engine unreachable through proxy");
    ApiError::new(
        ErrorCode::PoolUnavailable,
        format!("engine of pool {id:?} is unreachable"),
    )
    .with_retry_after(1000)
}

/// Headers never forwarded between client and engine (hop-by-hop, and our own credentials).
fn is_unforwarded_header(name: &HeaderName) -> bool {
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

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !is_unforwarded_header(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

fn method_allows_body(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD)
}

fn stream_body(resp: reqwest::Response) -> Body {
    Body::from_stream(resp.bytes_stream().map_err(std::io::Error::other))
}
