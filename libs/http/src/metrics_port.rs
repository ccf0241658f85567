//! The metrics port (`ORCHD_METRICS_PORT`, `POOL_MANAGERD_METRICS_PORT`, or the old shared name
//! `PROMETHEUS_METRICS_PORT`): a second listener, on the API's address with another port, that
//! serves only `/metrics` of the daemon's own router — the same answer, credentials and
//! connection bounds as on the API port — so a scraper can be let in where the API is not.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use llorch_contracts::ErrorCode;
use tokio::net::TcpListener;

use crate::tls::ServerTls;
use crate::{ApiError, ConnLimits, CORRELATION_HEADER};

/// The metrics listener's address: the API's IP with `port`; 0 lets the kernel pick one (the
/// bound address is logged: `metrics port listening`). The API's own port is refused with the
/// variable's name.
pub fn address(
    variable: &str,
    api: SocketAddr,
    port: Option<u16>,
) -> Result<Option<SocketAddr>, String> {
    match port {
        None => Ok(None),
        Some(p) if p != 0 && p == api.port() => Err(format!(
            "{variable} {p} is the API's own port; /metrics is served there already"
        )),
        Some(p) => Ok(Some(SocketAddr::new(api.ip(), p))),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot bind the metrics port {addr}: {reason} (both daemons on one machine need different ports: ORCHD_METRICS_PORT and POOL_MANAGERD_METRICS_PORT, not one PROMETHEUS_METRICS_PORT for both)")]
pub struct BindError {
    addr: SocketAddr,
    reason: std::io::Error,
}

/// Binds the metrics listener when one is configured.
pub async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, BindError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|reason| BindError { addr, reason })?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!(addr = %local, "metrics port listening (/metrics only)");
    Ok(Some(listener))
}

/// Serves `/metrics` of `app` on `listener` until `shutdown` (see [`crate::serve`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    crate::serve(listener, metrics_only(app), limits, tls, shutdown).await
}

/// `app` answering only `/metrics`; any other path gets 404 `NOT_FOUND`.
fn metrics_only(app: Router) -> Router {
    app.layer(axum::middleware::from_fn(only_metrics))
}

async fn only_metrics(req: Request, next: Next) -> Response {
    if req.uri().path() == "/metrics" {
        return next.run(req).await;
    }
    let id = crate::request_correlation_id(req.headers());
    let mut resp =
        ApiError::new(ErrorCode::NotFound, "this port serves /metrics only").into_response();
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(CORRELATION_HEADER, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    // covers: OBS-6105
    #[test]
    fn the_address_is_the_apis_ip_with_the_port_and_the_apis_own_port_is_refused() {
        let api: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(address("X_PORT", api, None), Ok(None));
        assert_eq!(
            address("X_PORT", api, Some(9464)),
            Ok(Some("0.0.0.0:9464".parse().unwrap()))
        );
        // 0: the kernel picks, as for the API itself on port 0.
        assert_eq!(
            address("X_PORT", api, Some(0)),
            Ok(Some("0.0.0.0:0".parse().unwrap()))
        );
        let on_zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            address("X_PORT", on_zero, Some(0)),
            Ok(Some(on_zero)),
            "two listeners on port 0 get two ports"
        );
        assert!(address("X_PORT", api, Some(8080))
            .unwrap_err()
            .contains("the API's own port"));
    }

    // covers: OBS-6105
    #[tokio::test]
    async fn only_metrics_is_served_and_other_paths_are_404_with_a_correlation_id() {
        let app = Router::new()
            .route("/metrics", axum::routing::get(|| async { "m 1\n" }))
            .route("/v2/pools", axum::routing::get(|| async { "pools" }));
        let app = metrics_only(app);
        let get = |path: &str| {
            Request::builder()
                .uri(path)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let ok = app.clone().oneshot(get("/metrics")).await.unwrap();
        assert_eq!(ok.status(), 200);
        let other = app.oneshot(get("/v2/pools")).await.unwrap();
        assert_eq!(other.status(), 404);
        assert!(other.headers().contains_key(CORRELATION_HEADER));
    }
}
