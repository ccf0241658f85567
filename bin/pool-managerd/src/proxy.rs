//! `ANY /v2/pools/{id}/engine/{*path}`: a streaming reverse proxy to the pool's engine.
//! Response bytes are relayed as they arrive (no buffering); when the client goes away the
//! response stream is dropped, which closes the upstream connection and makes llama-server
//! abort the generation. A connection the engine closed before answering is retried once on a
//! fresh connection (DESIGN §7).
//!
//! Only what orchestratord sends passes: the engine routes it uses, each with the body fields
//! it writes, and a generation limit no larger than the pool's per-slot context. Anything else
//! (slot save/restore/erase, LoRA scales, grammars, `/props`, …) is refused with 403: a holder
//! of the token reaches no more of llama-server than orchestratord does.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, Method};
use axum::response::Response;
use llorch_contracts::engine_routes::{EngineRoute as Route, ENGINE_ROUTES as ROUTES};
use llorch_contracts::{ErrorCode, PoolState};

use crate::state::AppState;
use llorch_http::ApiError;

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
    let route = allowed_route(&parts.method, &path).inspect_err(|_| counter("refused"))?;
    let body = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|e| {
            if llorch_http::is_body_timeout(&e) {
                ApiError::new(ErrorCode::RequestTimeout, e.to_string())
            } else {
                ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
            }
        })?;
    vet_body(route, &body, pool.ctx_max).inspect_err(|e| {
        counter("refused");
        tracing::info!(pool_id = %id, path = %path, reason = %e.0.message, "engine request refused");
    })?;
    // No query string: none of the allowed routes takes one.
    let target = format!("{url}/{}", route.path);
    let mut headers = HeaderMap::new();
    copy_headers(&parts.headers, &mut headers);
    // The caller's credential stays here; the engine gets its own key (one this daemon started).
    if let Some(key) = state.engine_keys.get(&url) {
        if let Ok(mut value) = axum::http::HeaderValue::from_str(&format!("Bearer {key}")) {
            value.set_sensitive(true);
            headers.insert(axum::http::header::AUTHORIZATION, value);
        }
    }

    let span = tracing::info_span!("engine_proxy", pool_id = %id, path = %path);
    let bounds = Bounds {
        deadline: tokio::time::Instant::now() + state.config.proxy_max_duration,
        idle: state.config.proxy_idle_timeout,
    };
    // One attempt through `http`, bounded: `Err(None)` when the engine stayed silent. Only
    // POST passes the allowlist, so the body always goes.
    let send = |http: &reqwest::Client| {
        let rb = http
            .post(&target)
            .headers(headers.clone())
            .body(body.clone());
        let sent = tracing::Instrument::instrument(rb.send(), span.clone());
        async move {
            match tokio::time::timeout_at(bounds.next(), sent).await {
                Ok(answer) => answer.map_err(Some),
                Err(_) => Err(None),
            }
        }
    };
    let silent = || {
        counter("timeout");
        tracing::warn!(pool_id = %id, path = %path, idle_ms = bounds.idle.as_millis() as u64, "engine did not answer through the proxy in time; request cut");
        ApiError::new(
            ErrorCode::DecodeTimeout,
            format!(
                "the engine of pool {id:?} did not answer within {} ms",
                bounds.idle.as_millis()
            ),
        )
    };
    let upstream = match send(&state.proxy_http).await {
        Ok(r) => r,
        Err(None) => return Err(silent()),
        Err(Some(e)) if llamacpp_client::is_retryable_connection_error(&e) => {
            tracing::debug!(pool_id = %id, "engine closed the connection before answering; retrying once");
            // On a new connection: the pool may hold more the engine has closed.
            match send(&state.proxy_fresh).await {
                Ok(r) => r,
                Err(None) => return Err(silent()),
                Err(Some(e)) => return Err(unreachable_engine(&id, &e)),
            }
        }
        Err(Some(e)) => return Err(unreachable_engine(&id, &e)),
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
    let cut = {
        let (counts, id, path) = (
            state.metrics.proxy_requests.clone(),
            id.clone(),
            path.clone(),
        );
        move || {
            counts.with_label_values(&[&id, "timeout"]).inc();
            tracing::warn!(pool_id = %id, path = %path, "engine answer cut: silent past the idle timeout or past the longest duration");
        }
    };
    resp.body(Body::from_stream(bounded(
        upstream.bytes_stream(),
        bounds,
        cut,
    )))
    .or_else(|_| Ok(Response::new(Body::empty())))
}

/// How long a proxied request may take: until `deadline` in all, and `idle` without a byte.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    deadline: tokio::time::Instant,
    idle: std::time::Duration,
}

impl Bounds {
    /// When the next piece must have come.
    fn next(&self) -> tokio::time::Instant {
        self.deadline.min(tokio::time::Instant::now() + self.idle)
    }
}

/// `body` until it ends, or fails with `TimedOut` (after calling `on_cut` once) when a piece
/// does not come within the bounds; dropping it closes the engine's connection, which makes
/// llama-server stop generating.
fn bounded<S, E>(
    body: S,
    bounds: Bounds,
    on_cut: impl FnOnce() + Send + 'static,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + Unpin + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    use futures_util::StreamExt;
    futures_util::stream::unfold((body, Some(on_cut)), move |(mut body, on_cut)| async move {
        let on_cut = on_cut?;
        match tokio::time::timeout_at(bounds.next(), body.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), (body, Some(on_cut)))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), (body, None))),
            Ok(None) => None,
            Err(_) => {
                on_cut();
                let e = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the engine went silent past the proxy's bounds",
                );
                Some((Err(e), (body, None)))
            }
        }
    })
}

fn forbidden(message: String) -> ApiError {
    ApiError::new(ErrorCode::Forbidden, message)
}

/// The route `POST {path}` names, if the proxy passes it.
fn allowed_route(method: &Method, path: &str) -> Result<&'static Route, ApiError> {
    let path = path.trim_matches('/');
    let route = Route::find(path);
    match route {
        Some(r) if *method == Method::POST => Ok(r),
        _ => Err(forbidden(format!(
            "{method} {path:?} is not an engine route this proxy passes (POST {})",
            ROUTES.iter().map(|r| r.path).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// A JSON object with only the route's fields, and its generation limit within the per-slot
/// context.
fn vet_body(route: &Route, body: &[u8], ctx_max: Option<u32>) -> Result<(), ApiError> {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<serde_json::Value>(body)
    else {
        return Err(ApiError::new(
            ErrorCode::InvalidParams,
            "the body must be a JSON object",
        ));
    };
    if let Some(field) = fields.keys().find(|k| !route.passes(k)) {
        let shown: String = format!("{field:?}").chars().take(64).collect();
        return Err(forbidden(format!(
            "field {shown} is not passed to the engine on {}",
            route.path
        )));
    }
    if let Some(limit) = route.limit {
        let most = ctx_max.unwrap_or(u32::MAX);
        match fields.get(limit).and_then(serde_json::Value::as_u64) {
            Some(n) if n >= 1 && n <= u64::from(most) => {}
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidParams,
                    format!("{limit} must be between 1 and the pool's per-slot context ({most})"),
                ))
            }
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vet(method: Method, path: &str, body: serde_json::Value) -> Result<(), ErrorCode> {
        let route = allowed_route(&method, path).map_err(|e| e.0.code)?;
        vet_body(route, body.to_string().as_bytes(), Some(512)).map_err(|e| e.0.code)
    }

    type Piece = Result<bytes::Bytes, std::io::Error>;

    /// A body whose pieces the test sends by hand.
    fn body() -> (
        tokio::sync::mpsc::UnboundedSender<Piece>,
        std::pin::Pin<Box<dyn futures_util::Stream<Item = Piece> + Send>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|piece| (piece, rx))
        });
        (tx, Box::pin(stream))
    }

    // covers: CLOUD-4115
    #[tokio::test(start_paused = true)]
    async fn an_answer_silent_past_the_idle_timeout_is_cut_exactly_then_and_counted_once() {
        use futures_util::StreamExt;
        let (tx, rx) = body();
        let idle = std::time::Duration::from_millis(1000);
        let start = tokio::time::Instant::now();
        let bounds = Bounds {
            deadline: start + std::time::Duration::from_secs(3600),
            idle,
        };
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = cuts.clone();
        let mut out = Box::pin(bounded(rx, bounds, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        // Pieces 999 ms apart keep it going.
        for k in 1..=3u64 {
            tokio::time::sleep(idle - std::time::Duration::from_millis(1)).await;
            tx.send(Ok(bytes::Bytes::from_static(b"x"))).unwrap();
            assert!(out.next().await.unwrap().is_ok());
            assert_eq!(start.elapsed(), std::time::Duration::from_millis(999 * k));
        }
        let last = tokio::time::Instant::now();
        let e = out.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(last.elapsed(), idle);
        assert!(out.next().await.is_none(), "nothing after the cut");
        assert_eq!(cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    // covers: CLOUD-4115
    #[tokio::test(start_paused = true)]
    async fn an_answer_that_keeps_flowing_is_cut_at_the_longest_duration() {
        use futures_util::StreamExt;
        let (tx, rx) = body();
        let start = tokio::time::Instant::now();
        let bounds = Bounds {
            deadline: start + std::time::Duration::from_millis(2500),
            idle: std::time::Duration::from_millis(1000),
        };
        let cuts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = cuts.clone();
        let mut out = Box::pin(bounded(rx, bounds, move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(400)).await;
                if tx.send(Ok(bytes::Bytes::from_static(b"x"))).is_err() {
                    return;
                }
            }
        });
        let mut pieces = 0;
        let end = loop {
            match out.next().await {
                Some(Ok(_)) => pieces += 1,
                Some(Err(e)) => break e,
                None => panic!("ended without the cut"),
            }
        };
        assert_eq!(end.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), std::time::Duration::from_millis(2500));
        assert_eq!(pieces, 6, "pieces at 400 ms .. 2400 ms");
        assert_eq!(
            cuts.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the cut is counted"
        );
        feeder.abort();
    }

    // covers: CLOUD-4114
    #[test]
    fn every_field_of_the_shared_completion_request_passes() {
        // orchestratord writes `/completion` bodies with this very type: a field added there
        // and not here would have every CLOUD task refused.
        let body = llamacpp_client::CompletionRequest {
            prompt: "p".into(),
            n_predict: 8,
            stream: true,
            cache_prompt: true,
            temperature: Some(0.5),
            top_p: Some(0.9),
            top_k: Some(40),
            seed: Some(1),
            stop: vec!["x".into()],
            id_slot: Some(1),
        };
        let value = serde_json::to_value(&body).unwrap();
        assert_eq!(vet(Method::POST, "completion", value), Ok(()));
    }

    // covers: CLOUD-4114
    #[test]
    fn what_orchestratord_sends_passes() {
        let ok = [
            (
                "completion",
                serde_json::json!({"prompt": "p", "n_predict": 8, "stream": true, "cache_prompt": true, "seed": 1, "stop": ["x"], "id_slot": 1}),
            ),
            (
                "v1/chat/completions",
                serde_json::json!({"messages": [], "max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}, "tools": [], "id_slot": 0}),
            ),
            (
                "v1/completions",
                serde_json::json!({"prompt": "p", "max_tokens": 512, "id_slot": 3}),
            ),
            (
                "v1/embeddings",
                serde_json::json!({"input": "p", "encoding_format": "float"}),
            ),
            (
                "tokenize",
                serde_json::json!({"content": "p", "add_special": true}),
            ),
        ];
        for (path, body) in ok {
            assert_eq!(vet(Method::POST, path, body), Ok(()), "{path}");
        }
    }

    // covers: CLOUD-4114
    #[test]
    fn other_routes_methods_fields_and_limits_are_refused() {
        let refused = [
            (Method::GET, "slots", serde_json::json!({})),
            (
                Method::POST,
                "slots/0",
                serde_json::json!({"filename": "x"}),
            ),
            (Method::POST, "lora-adapters", serde_json::json!([])),
            (Method::GET, "completion", serde_json::json!({})),
            (Method::POST, "props", serde_json::json!({})),
        ];
        for (method, path, body) in refused {
            assert_eq!(
                vet(method.clone(), path, body),
                Err(ErrorCode::Forbidden),
                "{method} {path}"
            );
        }
        let grammar = serde_json::json!({"prompt": "p", "n_predict": 8, "grammar": "root ::= x"});
        assert_eq!(
            vet(Method::POST, "completion", grammar),
            Err(ErrorCode::Forbidden)
        );
        let unbounded = serde_json::json!({"prompt": "p", "n_predict": -1});
        assert_eq!(
            vet(Method::POST, "completion", unbounded),
            Err(ErrorCode::InvalidParams)
        );
        let missing = serde_json::json!({"prompt": "p"});
        assert_eq!(
            vet(Method::POST, "completion", missing),
            Err(ErrorCode::InvalidParams)
        );
        let over = serde_json::json!({"messages": [], "max_tokens": 513});
        assert_eq!(
            vet(Method::POST, "v1/chat/completions", over),
            Err(ErrorCode::InvalidParams)
        );
        let not_object = serde_json::json!(["prompt"]);
        assert_eq!(
            vet(Method::POST, "tokenize", not_object),
            Err(ErrorCode::InvalidParams)
        );
    }
}
