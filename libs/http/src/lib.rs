//! HTTP pieces shared by orchestratord and pool-managerd, so both speak the same envelope,
//! correlation ids, trace context and auth rules (DESIGN §3, §5).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_contracts::{ErrorCode, ErrorEnvelope};

pub mod env_alias;
pub mod metrics_port;
mod serve;
pub mod tls;

pub use serve::{
    is_body_timeout, per_address_refusals, serve, serve_watched, BodyTimeout, ConnLimits,
    ReservedConn, Saturation, Unvouched, MAX_HEADERS, MAX_HEAD_BYTES,
};

pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// The one error type of both APIs; `IntoResponse` is the one place a code becomes a status
/// (through `ErrorCode::http_status`) and retry hints become headers.
#[derive(Debug)]
pub struct ApiError(pub ErrorEnvelope);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ErrorEnvelope::new(code, message))
    }

    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.0 = self.0.with_retry_after_ms(ms);
        self
    }

    pub fn with_policy_label(mut self, label: impl Into<String>) -> Self {
        self.0 = self.0.with_policy_label(label);
        self
    }
}

impl From<ErrorEnvelope> for ApiError {
    fn from(e: ErrorEnvelope) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(&self.0)).into_response();
        set_refusal_headers(resp.headers_mut(), status, self.0.retry_after_ms);
        let headers = resp.headers_mut();
        if let Some(ms) = self.0.retry_after_ms {
            if matches!(
                self.0.code,
                ErrorCode::AdmissionReject | ErrorCode::QueueFullDropLru
            ) {
                if let Ok(v) = HeaderValue::from_str(&ms.to_string()) {
                    headers.insert("x-backoff-ms", v);
                }
            }
        }
        resp
    }
}

/// The headers every refusal carries, whatever its body's shape: `Retry-After` (whole seconds,
/// at least 1) when a retry hint exists, `WWW-Authenticate: Bearer` on a 401.
pub fn set_refusal_headers(
    headers: &mut axum::http::HeaderMap,
    status: StatusCode,
    retry_after_ms: Option<u64>,
) {
    if let Some(ms) = retry_after_ms {
        let secs = ms.div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            headers.insert(header::RETRY_AFTER, v);
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
}

/// `Json` whose rejections use the envelope: 400 `INVALID_PARAMS`, or 413 for a body over the
/// limit.
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
    if is_body_timeout(&r) {
        ApiError::new(ErrorCode::RequestTimeout, r.body_text())
    } else if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large")
    } else {
        ApiError::new(ErrorCode::InvalidParams, r.body_text())
    }
}

/// `Path` whose rejections use the envelope.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(r) => Err(path_rejection(r)),
        }
    }
}

/// `Query` whose rejections use the envelope (400 `INVALID_PARAMS`).
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(ApiError::new(ErrorCode::InvalidParams, r.body_text())),
        }
    }
}

fn path_rejection(r: PathRejection) -> ApiError {
    ApiError::new(ErrorCode::InvalidParams, r.body_text())
}

/// The request's `X-Correlation-Id` when it is sane (1–128 visible ASCII characters), else a
/// new one.
fn request_correlation_id(headers: &axum::http::HeaderMap) -> String {
    headers
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Echoes a sane `X-Correlation-Id` or makes one; runs the request in a span carrying it.
pub async fn correlation_id(mut req: Request, next: Next) -> Response {
    let id = request_correlation_id(req.headers());
    let value = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    req.headers_mut().insert(CORRELATION_HEADER, value.clone());
    let span = tracing::info_span!("request", correlation_id = %id, method = %req.method(), path = %req.uri().path());
    // A caller's W3C `traceparent` (the other daemon, or a client) makes this request part of
    // its trace.
    llorch_observability::set_parent_from(&span, req.headers());
    let started = std::time::Instant::now();
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    let status = resp.status().as_u16();
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, latency_ms, outcome = "error", "request finished");
        } else {
            tracing::debug!(
                status,
                latency_ms,
                outcome = if status < 400 { "ok" } else { "rejected" },
                "request finished"
            );
        }
    });
    resp.headers_mut().insert(CORRELATION_HEADER, value);
    resp
}

/// Refused requests of this process by the route group they asked for, named by the role its
/// routes need (`auth_failures_total{route_group}` of both daemons).
static AUTH_FAILURES: [std::sync::atomic::AtomicU64; 3] = [
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
    std::sync::atomic::AtomicU64::new(0),
];

/// The route groups refusals are counted by (the role each group's routes need).
pub const ROUTE_GROUPS: [auth_min::Role; 3] = [
    auth_min::Role::Client,
    auth_min::Role::Admin,
    auth_min::Role::Node,
];

fn group_index(role: auth_min::Role) -> usize {
    match role {
        auth_min::Role::Client => 0,
        auth_min::Role::Admin => 1,
        auth_min::Role::Node => 2,
    }
}

/// Requests refused for their credentials since the process started, all groups.
pub fn auth_failures() -> u64 {
    ROUTE_GROUPS.iter().map(|&g| auth_failures_of(g)).sum()
}

/// Requests to the routes that need `group` refused for their credentials since the process
/// started.
pub fn auth_failures_of(group: auth_min::Role) -> u64 {
    AUTH_FAILURES[group_index(group)].load(std::sync::atomic::Ordering::Relaxed)
}

/// At most one log line per `interval`: a flood of refusals (a scanner, a misconfigured client)
/// costs one line per second, which says how many were not logged.
pub(crate) struct LogThrottle {
    interval_ms: u64,
    /// When the last line was logged (ms on the caller's clock, +1 so 0 means never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogThrottle {
    pub(crate) const fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(events not logged since the last line)` when a line may be logged at `now_ms`.
    pub(crate) fn due(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::SeqCst;
        let last = self.last.load(SeqCst);
        let stamp = now_ms + 1;
        let free = last == 0 || stamp >= last + self.interval_ms;
        if free
            && self
                .last
                .compare_exchange(last, stamp, SeqCst, SeqCst)
                .is_ok()
        {
            Some(self.suppressed.swap(0, SeqCst))
        } else {
            self.suppressed.fetch_add(1, SeqCst);
            None
        }
    }
}

static REFUSAL_LOG: LogThrottle = LogThrottle::new(1000);

/// Milliseconds since this process first asked (a monotonic clock for throttles).
pub(crate) fn process_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The keys a daemon accepts; `None`: no authentication (allowed on loopback only, explicitly).
/// Behind a lock so a reload (SIGHUP) can swap the client keys; never held across an await.
pub type Keys = Option<std::sync::Arc<std::sync::RwLock<auth_min::Keyring>>>;

/// A route group's door: the keys, and the role a caller needs.
#[derive(Clone)]
pub struct Gate {
    pub keys: Keys,
    pub role: auth_min::Role,
}

fn refused(req: &Request, group: auth_min::Role, reason: &dyn std::fmt::Display) {
    AUTH_FAILURES[group_index(group)].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(suppressed) = REFUSAL_LOG.due(process_ms()) {
        let presented = presented_fingerprint(req.headers());
        tracing::warn!(%reason, path = %req.uri().path(), route_group = group.as_str(), %presented, suppressed, "request refused");
    }
}

/// What credential a refused request presented, as a log may show it: `token:<fp6>` of its
/// Bearer token (one misconfigured client shows one fingerprint; a scan, many), `none`, or
/// `not a bearer token`. Never the token or the header.
fn presented_fingerprint(headers: &axum::http::HeaderMap) -> String {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return "none".into();
    };
    let text = value.to_str().unwrap_or("");
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            auth_min::fingerprint(token.trim())
        }
        _ => "not a bearer token".into(),
    }
}

/// Who is calling, and whether they hold the gate's role: 401 for no or a wrong key, 403 for a
/// key without the role. Refusals are counted (`auth_failures`) and logged with their reason at
/// most once a second; neither the header nor the presented token ever reaches a log (the
/// key's name does).
pub fn check_auth(gate: &Gate, req: &Request) -> Result<auth_min::Principal, ApiError> {
    let Some(keys) = &gate.keys else {
        // No keys: loopback without authentication, explicitly allowed. A web page elsewhere
        // whose host name resolves to 127.0.0.1 (DNS rebinding) would reach the API through a
        // browser here: only loopback host names are served.
        if let Some(host) = foreign_host(req) {
            let reason = format!(
                "host {host:?} is not a loopback name; without a token only localhost, 127.0.0.1 and [::1] are served"
            );
            refused(req, gate.role, &reason);
            return Err(ApiError::new(ErrorCode::Forbidden, reason));
        }
        return Ok(auth_min::Principal::everything("anonymous"));
    };
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    let found = keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .identify(header);
    let principal = found.map_err(|reason| {
        refused(req, gate.role, &reason);
        ApiError::new(ErrorCode::Unauthorized, reason.to_string())
    })?;
    // A valid key: the connection no longer counts as a stranger's.
    if let Some(unvouched) = req.extensions().get::<serve::Unvouched>() {
        unvouched.vouch();
    }
    if !principal.may(gate.role) {
        let reason = format!(
            "key {:?} holds no {} role",
            principal.name,
            gate.role.as_str()
        );
        refused(req, gate.role, &reason);
        return Err(ApiError::new(ErrorCode::Forbidden, reason));
    }
    Ok(principal)
}

/// The request's `Host` when it names something other than this machine's loopback (shown
/// cut, escaped); `None` for a loopback name or no `Host` at all.
fn foreign_host(req: &Request) -> Option<String> {
    let host = req.headers().get(header::HOST)?;
    let text = host.to_str().unwrap_or("");
    let name = match text.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => text.rsplit_once(':').map_or(text, |(name, _port)| name),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!("{:?}", String::from_utf8_lossy(host.as_bytes()))
            .chars()
            .take(80)
            .collect()
    })
}

/// Middleware: `from_fn_with_state(gate, require_role)` on a group of routes. The caller's
/// [`auth_min::Principal`] goes into the request's extensions for the handlers.
pub async fn require_role(
    axum::extract::State(gate): axum::extract::State<Gate>,
    mut req: Request,
    next: Next,
) -> Response {
    match check_auth(&gate, &req) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// `pretty` or `json` (true) for the `*_LOG_FORMAT` variables.
pub fn parse_log_format(variable: &str, value: &str) -> Result<bool, String> {
    match value {
        "json" => Ok(true),
        "pretty" => Ok(false),
        other => Err(format!("{variable} {other:?} is not one of: pretty, json")),
    }
}

/// `value` unless it is below `min`: out-of-range settings are refused with the variable's
/// name, never clamped silently.
pub fn at_least<T: PartialOrd + std::fmt::Display>(
    variable: &str,
    value: T,
    min: T,
) -> Result<T, String> {
    if value < min {
        Err(format!("{variable} must be at least {min} (got {value})"))
    } else {
        Ok(value)
    }
}

/// A `*_MS` setting that must be positive, as a `Duration`.
pub fn positive_ms(variable: &str, value: u64) -> Result<std::time::Duration, String> {
    if value == 0 {
        Err(format!("{variable} must be greater than 0"))
    } else {
        Ok(std::time::Duration::from_millis(value))
    }
}

/// The one way both daemons assemble their API: `public` routes open, each `gated` group behind
/// its gate (a key holding its role), envelope answers for unknown routes and methods, the body limit, and the
/// correlation-id layer outermost.
pub fn assemble<S: Clone + Send + Sync + 'static>(
    public: axum::Router<S>,
    gated: Vec<(axum::Router<S>, Gate)>,
    max_body_bytes: usize,
) -> axum::Router<S> {
    let mut router = public;
    for (routes, gate) in gated {
        router = router
            .merge(routes.route_layer(axum::middleware::from_fn_with_state(gate, require_role)));
    }
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(correlation_id))
}

/// `resp` with `Connection: close`: hyper closes the connection once it is written.
pub fn closing(mut resp: axum::response::Response) -> axum::response::Response {
    resp.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    resp
}

pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
}

/// Something a daemon reads again on SIGHUP: what it loaded (for the log), or why it could not
/// (the previous one then stays).
pub type Reload = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// On each SIGHUP, runs every reload and logs what each did, until `cancel`.
pub async fn reload_on_sighup(
    reloads: Vec<(&'static str, Reload)>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    if reloads.is_empty() {
        return;
    }
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; files are read at start only");
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                for (what, reload) in &reloads {
                    match reload() {
                        Ok(loaded) => tracing::info!(what, "{loaded}"),
                        Err(error) => tracing::error!(what, %error, "not reloaded; the previous one stays"),
                    }
                }
            }
        }
    }
}

/// The SIGHUP reload of a server's TLS files.
pub fn tls_reload(tls: std::sync::Arc<tls::ServerTls>) -> Reload {
    Box::new(move || {
        tls.reload().map_err(|e| e.to_string())?;
        Ok(format!(
            "TLS certificate reloaded from {}",
            tls.files().cert.display()
        ))
    })
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when
/// the future is first polled): a signal that comes while the daemon is still starting is
/// taken as a request to stop, not met by the default action that would kill it on the spot.
/// Call it inside the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_presented_token_by_its_fingerprint_only() {
        let with = |value: Option<&str>| {
            let mut h = axum::http::HeaderMap::new();
            if let Some(v) = value {
                h.insert(header::AUTHORIZATION, v.parse().unwrap());
            }
            presented_fingerprint(&h)
        };
        let fp = auth_min::fingerprint("wrong-token-0123456789");
        assert_eq!(with(Some("Bearer wrong-token-0123456789")), fp);
        assert_eq!(with(Some("bearer  wrong-token-0123456789")), fp);
        assert!(fp.starts_with("token:") && fp.len() == "token:".len() + 6);
        assert_eq!(with(None), "none");
        assert_eq!(with(Some("Basic dXNlcjpwdw==")), "not a bearer token");
    }

    // covers: AUTH-5119
    #[tokio::test]
    async fn without_keys_only_loopback_host_names_are_served() {
        use tower::ServiceExt;
        let app = assemble::<()>(
            axum::Router::new(),
            vec![(
                axum::Router::new().route("/x", axum::routing::get(|| async { "ok" })),
                Gate {
                    keys: None,
                    role: auth_min::Role::Client,
                },
            )],
            1024,
        );
        let status = |host: Option<&str>| {
            let app = app.clone();
            let mut req = axum::http::Request::get("/x");
            if let Some(h) = host {
                req = req.header("host", h);
            }
            async move {
                app.oneshot(req.body(axum::body::Body::empty()).unwrap())
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        };
        for host in [
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
        ] {
            assert_eq!(status(Some(host)).await, 200, "{host}");
        }
        assert_eq!(status(None).await, 200);
        // A rebinding page's name, another address of this machine, or garbage: refused.
        for host in [
            "evil.example:8080",
            "evil.example",
            "10.0.0.5:8080",
            "localhost.evil",
            "[::2]:80",
        ] {
            assert_eq!(status(Some(host)).await, 403, "{host}");
        }
    }

    // covers: AUTH-5110
    #[test]
    fn a_throttle_logs_once_per_interval_and_counts_what_it_held_back() {
        let t = LogThrottle::new(1000);
        assert_eq!(t.due(0), Some(0));
        assert_eq!(t.due(10), None);
        assert_eq!(t.due(999), None);
        assert_eq!(t.due(1000), Some(2), "two refusals were not logged");
        assert_eq!(t.due(1500), None);
        assert_eq!(t.due(5000), Some(1));
    }
}
