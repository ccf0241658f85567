//! The HTTP server loop both daemons run: HTTP/1.1 only, a cap on open connections, a deadline
//! for reading a request's headers (a client that trickles them — slowloris — is cut off; it
//! also closes idle keep-alive connections), a deadline for its body (a trickled body is
//! answered 408), headers bounded in count and bytes (431), and a graceful end. axum's own `serve` sets no timer, so hyper's header timeout never applies
//! there; this loop sets it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::tls::{ClientCert, ServerTls};

/// Bounds of the server's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections served at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Of `max_connections`, how many are kept for the daemon's own peers: a connection
    /// accepted while the rest are all taken carries [`ReservedConn`] on its requests, and the
    /// daemon serves only its peers' routes on it (orchestratord: node registration and
    /// heartbeats), so no client load can keep a heartbeat out.
    pub reserved: usize,
    /// A response the client does not read: a write that makes no progress for this long
    /// ends the connection (an SSE subscriber that stopped reading lets its connection go).
    pub write_stall_timeout: Duration,
    /// From a connection's first byte (or the end of its previous request) to the end of the
    /// next request's headers.
    pub header_read_timeout: Duration,
    /// From the end of a request's headers to the end of its body.
    pub body_read_timeout: Duration,
    /// Connections one source address (an IPv6 /64) may hold open before any of their
    /// requests presented a valid key; further ones are closed at once, taking no share of the
    /// cap. 0: no such bound (a daemon without keys: every connection is unauthenticated).
    pub per_address_unauthenticated: usize,
}

/// Connections refused for their source address's unauthenticated ones since the process
/// started (`connections_refused_total{reason="per_address"}`).
static PER_ADDRESS_REFUSALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// See [`PER_ADDRESS_REFUSALS`].
pub fn per_address_refusals() -> u64 {
    PER_ADDRESS_REFUSALS.load(std::sync::atomic::Ordering::Relaxed)
}

static PER_ADDRESS_LOG: crate::LogThrottle = crate::LogThrottle::new(1000);

/// A source as the per-address bound counts it: an IPv4 address (an IPv4-mapped IPv6 one
/// too), or an IPv6 /64 (one host's usual share).
fn source_of(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                std::net::IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Each source's open connections that no valid key has vouched for yet.
#[derive(Debug, Default)]
struct Strangers(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl Strangers {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// One more connection of `source`, unless it holds `most` already.
    fn enter(self: &Arc<Self>, source: std::net::IpAddr, most: usize) -> Option<Unvouched> {
        let mut open = self.lock();
        let n = open.entry(source).or_insert(0);
        if *n >= most {
            return None;
        }
        *n += 1;
        Some(Unvouched(Arc::new(UnvouchedConn {
            source,
            strangers: self.clone(),
            vouched: std::sync::atomic::AtomicBool::new(false),
        })))
    }

    fn leave(&self, source: std::net::IpAddr) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&source);
            }
        }
    }
}

/// On every request of a connection counted against its source address's unauthenticated
/// connections ([`ConnLimits::per_address_unauthenticated`]): a request with a valid key
/// vouches for it ([`Unvouched::vouch`]) and the connection no longer counts.
#[derive(Debug, Clone)]
pub struct Unvouched(Arc<UnvouchedConn>);

#[derive(Debug)]
struct UnvouchedConn {
    source: std::net::IpAddr,
    strangers: Arc<Strangers>,
    vouched: std::sync::atomic::AtomicBool,
}

impl Unvouched {
    /// A request of this connection presented a valid key already.
    fn vouched(&self) -> bool {
        self.0.vouched.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A request of this connection presented a valid key.
    pub fn vouch(&self) {
        if self.vouched() {
            return;
        }
        if !self
            .0
            .vouched
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.0.strangers.leave(self.0.source);
        }
    }
}

impl Drop for UnvouchedConn {
    fn drop(&mut self) {
        if !*self.vouched.get_mut() {
            self.strangers.leave(self.source);
        }
    }
}

/// Most header lines a request may carry (hyper answers 431 beyond).
pub const MAX_HEADERS: usize = 100;

/// Most bytes a request's head may take (hyper answers 431 beyond).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// When a listener last had every connection it may serve taken (its reserve included): a
/// peer's request may have waited in the accept queue since, so what did not arrive then is
/// not the peer's fault (orchestratord does not declare a node lost for heartbeats it could
/// not take in).
#[derive(Debug, Default)]
pub struct Saturation(std::sync::Mutex<Option<tokio::time::Instant>>);

impl Saturation {
    fn mark(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tokio::time::Instant::now());
    }

    /// The listener was full at some instant of the last `window`.
    pub fn within(&self, window: Duration) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() <= window)
    }

    /// Marks the listener full now (in-process tests of what depends on it).
    pub fn mark_full(&self) {
        self.mark();
    }
}

/// Serves `app` on `listener` until `shutdown`, then stops accepting, lets open requests end
/// (`graceful_shutdown` of every connection) and returns when they have. Accepted connections
/// get `TCP_NODELAY` (small SSE writes must not wait for delayed ACKs). HTTP/2 is not spoken: a
/// prior-knowledge HTTP/2 client gets its connection closed. With `tls`, every connection is
/// TLS: the handshake must end within the header-read timeout, and a failed one closes the
/// connection (logged at debug: scanners would flood the log).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
) {
    serve_watched(listener, app, limits, tls, shutdown, Arc::default()).await
}

/// [`serve`], marking `saturation` each time every connection it may serve is taken.
pub async fn serve_watched(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    tls: Option<Arc<ServerTls>>,
    shutdown: impl Future<Output = ()>,
    saturation: Arc<Saturation>,
) {
    let reserved = limits.reserved.min(limits.max_connections);
    let permits = Arc::new(Semaphore::new(limits.max_connections - reserved));
    let reserve = Arc::new(Semaphore::new(reserved));
    let (closing_tx, closing_rx) = watch::channel(false);
    let connections = tokio_util::task::TaskTracker::new();
    let strangers = Arc::new(Strangers::default());
    tokio::pin!(shutdown);
    loop {
        if permits.available_permits() == 0 && reserve.available_permits() == 0 {
            saturation.mark();
        }
        // The general share first; the reserve only when it is all taken.
        let (permit, on_reserve) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => (p, false),
                Err(_) => break,
            },
            p = reserve.clone().acquire_owned(), if reserved > 0 => match p {
                Ok(p) => (p, true),
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors, say: wait a little instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let unvouched = match limits.per_address_unauthenticated {
            0 => None,
            most => match strangers.enter(source_of(peer.ip()), most) {
                Some(u) => Some(u),
                None => {
                    // Closed at once: the permit goes back with it.
                    PER_ADDRESS_REFUSALS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(suppressed) = PER_ADDRESS_LOG.due(crate::process_ms()) {
                        tracing::warn!(source = %source_of(peer.ip()), most, suppressed, "connection refused: its source address holds its most unauthenticated connections");
                    }
                    continue;
                }
            },
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
        let app = app.clone();
        let closing = closing_rx.clone();
        let tls = tls.as_ref().map(|t| t.current());
        let marks = Marks {
            cert: None,
            reserved: on_reserve.then_some(ReservedConn),
            unvouched,
        };
        connections.spawn(async move {
            let _permit = permit;
            let stream = StallIo::new(stream, limits.write_stall_timeout);
            let Some(tls) = tls else {
                serve_connection(stream, app, limits, marks, closing).await;
                return;
            };
            let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
            match tokio::time::timeout(limits.header_read_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|leaf| ClientCert::new(leaf.clone().into_owned()));
                    serve_connection(stream, app, limits, Marks { cert, ..marks }, closing).await;
                }
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake not done within the header-read timeout")
                }
            }
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    connections.close();
    connections.wait().await;
}

/// A connection accepted on the reserved share of the connection cap ([`ConnLimits::reserved`]):
/// its requests carry this, and the daemon serves only its peers' routes to them.
#[derive(Debug, Clone, Copy)]
pub struct ReservedConn;

/// What every request of one connection carries in its extensions.
#[derive(Clone)]
struct Marks {
    cert: Option<ClientCert>,
    reserved: Option<ReservedConn>,
    unvouched: Option<Unvouched>,
}

/// One connection's requests, until it closes or the server closes (then gracefully).
async fn serve_connection<IO>(
    io: IO,
    app: Router,
    limits: ConnLimits,
    marks: Marks,
    mut closing: watch::Receiver<bool>,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let body_timeout = limits.body_read_timeout;
    let service = TowerToHyperService::new(app.map_request(move |req: Request<Incoming>| {
        let mut req = req.map(|body| Body::new(DeadlineBody::new(body, body_timeout)));
        if let Some(cert) = &marks.cert {
            req.extensions_mut().insert(cert.clone());
        }
        if let Some(reserved) = marks.reserved {
            req.extensions_mut().insert(reserved);
        }
        // Only until a valid key vouched for the connection: its later requests carry nothing.
        if let Some(unvouched) = marks.unvouched.as_ref().filter(|u| !u.vouched()) {
            req.extensions_mut().insert(unvouched.clone());
        }
        req
    }));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        changed = closing.changed() => {
            if changed.is_ok() {
                conn.as_mut().graceful_shutdown();
            }
            // Served until the in-flight request ends.
            conn.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// A connection whose writes must make progress: a write (or flush) that stays pending for
/// `timeout` fails with `TimedOut`, and hyper closes the connection. The timer is armed only
/// while a write waits, so a connection the client reads costs none.
struct StallIo<IO> {
    inner: IO,
    timeout: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> StallIo<IO> {
    fn new(inner: IO, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// After a write's poll: `Pending` arms (or checks) the stall timer, anything else
    /// disarms it.
    fn judge<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::task::Poll;
        if !polled.is_pending() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.timeout;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} ms", timeout.as_millis()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StallIo<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StallIo<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.judge(cx, polled)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.judge(cx, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.judge(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that must arrive whole within its deadline; past it, reading fails with
/// [`BodyTimeout`] (the JSON extractor answers 408 `REQUEST_TIMEOUT`). The timer is armed the
/// first time the body is not ready, so requests without a body cost none.
struct DeadlineBody {
    inner: Incoming,
    deadline: tokio::time::Instant,
    timeout: Duration,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
            sleep: None,
        }
    }
}

/// A request body did not arrive within the body-read timeout.
#[derive(Debug)]
pub struct BodyTimeout(pub Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {} ms",
            self.0.as_millis()
        )
    }
}

impl std::error::Error for BodyTimeout {}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => return Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {}
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout(this.timeout))))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `error` (or one of its sources) is a [`BodyTimeout`].
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cur) = e {
        if cur.is::<BodyTimeout>() {
            return true;
        }
        e = cur.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server with a JSON route, on paused time: its timers are exact.
    async fn server(limits: ConnLimits) -> std::net::SocketAddr {
        let app = Router::new().route(
            "/echo",
            axum::routing::post(
                |crate::ApiJson(v): crate::ApiJson<serde_json::Value>| async move { axum::Json(v) },
            ),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, limits, None, std::future::pending()));
        addr
    }

    const LIMITS: ConnLimits = ConnLimits {
        max_connections: 8,
        reserved: 0,
        write_stall_timeout: Duration::from_secs(30),
        header_read_timeout: Duration::from_secs(10),
        body_read_timeout: Duration::from_millis(1500),
        per_address_unauthenticated: 0,
    };

    // covers: AUTH-5111
    #[tokio::test(start_paused = true)]
    async fn a_body_not_whole_by_the_body_timeout_is_answered_408_exactly_then() {
        let addr = server(LIMITS).await;
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 20\r\n\r\n{\"a\":")
            .await
            .unwrap();
        let sent = tokio::time::Instant::now();
        // More of it, but never all of it: trickling does not extend the deadline.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        sock.write_all(b"1").await.unwrap();
        let mut answer = vec![0u8; 1024];
        let n = sock.read(&mut answer).await.unwrap();
        let answered = sent.elapsed();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("REQUEST_TIMEOUT"), "{text}");
        assert_eq!(answered, Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_whole_within_the_body_timeout_is_served() {
        let addr = server(LIMITS).await;
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 7\r\nconnection: close\r\n\r\n{\"a\":")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1400)).await;
        sock.write_all(b"1}").await.unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("{\"a\":1}"), "{answer}");
    }

    /// An endless response body of 64 KiB frames; when hyper drops it (the connection ended)
    /// the instant is recorded.
    struct Flood(Arc<std::sync::Mutex<Option<tokio::time::Instant>>>);

    impl Drop for Flood {
        fn drop(&mut self) {
            *self.0.lock().unwrap() = Some(tokio::time::Instant::now());
        }
    }

    impl http_body::Body for Flood {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from(
                vec![b'x'; 64 * 1024],
            )))))
        }
    }

    // covers: AUTH-5117
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_loses_its_connection_when_the_write_stalls_that_long() {
        let dropped = Arc::new(std::sync::Mutex::new(None));
        let seen = dropped.clone();
        let app = Router::new().route(
            "/flood",
            axum::routing::get(move || {
                let seen = seen.clone();
                async move { Body::new(Flood(seen)) }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, LIMITS, None, std::future::pending()));
        let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.write_all(b"GET /flood HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let asked = tokio::time::Instant::now();
        // The client reads nothing: the socket buffers fill at once, then no write progresses.
        tokio::time::sleep(LIMITS.write_stall_timeout - Duration::from_millis(1)).await;
        assert_eq!(
            *dropped.lock().unwrap(),
            None,
            "cut before the stall timeout"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        let at = dropped
            .lock()
            .unwrap()
            .expect("the stalled response was not cut");
        assert_eq!(at - asked, LIMITS.write_stall_timeout);
    }

    // covers: AUTH-5121
    #[tokio::test]
    async fn a_source_address_holds_its_most_unauthenticated_connections_and_a_valid_key_frees_one()
    {
        const SECRET: &str = "client-secret-0123456789";
        let mut ring = auth_min::Keyring::default();
        ring.add(
            auth_min::Principal::new("alice", &[auth_min::Role::Client]),
            auth_min::Token::new(SECRET).unwrap(),
        )
        .unwrap();
        let gate = crate::Gate {
            keys: Some(Arc::new(std::sync::RwLock::new(ring))),
            role: auth_min::Role::Client,
        };
        let app = Router::new()
            .route("/gated", axum::routing::get(|| async { "in" }))
            .layer(axum::middleware::from_fn_with_state(
                gate,
                crate::require_role,
            ))
            .route("/open", axum::routing::get(|| async { "open" }));
        let limits = ConnLimits {
            per_address_unauthenticated: 2,
            ..LIMITS
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, limits, None, std::future::pending()));
        let refused_before = per_address_refusals();
        /// A connection, and whether the server closed it at once (no request sent).
        async fn open(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, bool) {
            let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut buf = [0u8; 16];
            let closed =
                match tokio::time::timeout(Duration::from_millis(300), sock.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => true,
                    Ok(Ok(_)) => panic!("the server spoke first"),
                    Err(_) => false,
                };
            (sock, closed)
        }
        async fn ask(sock: &mut tokio::net::TcpStream, path: &str, key: &str) -> String {
            sock.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
            let mut buf = vec![0u8; 4096];
            let n = sock.read(&mut buf).await.unwrap();
            String::from_utf8_lossy(&buf[..n]).to_string()
        }
        let (mut first, closed) = open(addr).await;
        assert!(!closed);
        let (second, closed) = open(addr).await;
        assert!(!closed);
        // Two strangers' connections from 127.0.0.1: a third is closed at once.
        assert!(
            open(addr).await.1,
            "a third unauthenticated connection was kept"
        );
        // The first presents a valid key: it no longer counts, and one more is taken.
        assert!(ask(&mut first, "/gated", SECRET)
            .await
            .starts_with("HTTP/1.1 200"));
        let (mut third, closed) = open(addr).await;
        assert!(!closed, "a connection that authenticated still counted");
        // Open routes and wrong keys vouch for nothing.
        assert!(ask(&mut third, "/open", "")
            .await
            .starts_with("HTTP/1.1 200"));
        let wrong = ask(&mut third, "/gated", "wrong-secret-0123456789").await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        assert!(open(addr).await.1, "an open route or a wrong key vouched");
        // A stranger's connection that closes frees its place.
        drop(second);
        llorch_test_support::wait_for("a place freed", Duration::from_secs(5), || async {
            let (sock, closed) = open(addr).await;
            (!closed).then_some(sock)
        })
        .await;
        assert!(per_address_refusals() >= refused_before + 2);
        drop((first, third));
    }

    #[test]
    fn sources_are_addresses_and_ipv6_slash_64s() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff::9")),
            source_of(ip("2001:db8:1:2::1"))
        );
    }

    // covers: AUTH-5117
    #[tokio::test]
    async fn a_connection_accepted_on_the_reserve_says_so_and_the_rest_do_not() {
        let app = Router::new().route(
            "/who",
            axum::routing::get(
                |reserved: Option<axum::Extension<ReservedConn>>| async move {
                    if reserved.is_some() {
                        "reserve"
                    } else {
                        "general"
                    }
                },
            ),
        );
        let limits = ConnLimits {
            max_connections: 3,
            reserved: 1,
            ..LIMITS
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let full = Arc::new(Saturation::default());
        tokio::spawn(serve_watched(
            listener,
            app,
            limits,
            None,
            std::future::pending(),
            full.clone(),
        ));
        // Keep-alive connections, each asked once and held open.
        async fn ask(addr: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
            let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
            sock.write_all(b"GET /who HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            (sock, text)
        }
        let (first, a) = ask(addr).await;
        let (_second, b) = ask(addr).await;
        assert!(!full.within(Duration::from_secs(60)), "full before it was");
        let (_third, c) = ask(addr).await;
        assert!(a.ends_with("general") && b.ends_with("general"), "{a} {b}");
        assert!(c.ends_with("reserve"), "{c}");
        // Every connection taken, the reserve's too: the listener says it was full.
        llorch_test_support::wait_for("the listener full", Duration::from_secs(5), || async {
            full.within(Duration::from_secs(60)).then_some(())
        })
        .await;
        // A general connection closes: the next one is general again.
        drop(first);
        let d = llorch_test_support::wait_for(
            "a general connection free again",
            Duration::from_secs(5),
            || async {
                let (sock, text) = tokio::time::timeout(Duration::from_millis(500), ask(addr))
                    .await
                    .ok()?;
                drop(sock);
                text.ends_with("general").then_some(text)
            },
        )
        .await;
        assert!(d.ends_with("general"));
    }
}
