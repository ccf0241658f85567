//! How orchestratord reaches an engine: a streamed completion and a health probe. This is the
//! IO seam of the data path: `HttpEngine` speaks HTTP to llama-server (HOME) or to
//! pool-managerd's authenticated proxy (CLOUD); the in-process tests put a scripted engine
//! here to drive the runner and dispatcher on tokio's paused clock.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{FutureExt, StreamExt};
use llamacpp_client::{EngineClient, Health};

/// Why a call to an engine got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EngineError {
    /// No answer came: the engine (or its node) is unreachable or reset the connection.
    #[error("{what} unreachable: {reason}")]
    Unreachable { what: &'static str, reason: String },
    /// It answered with a status that is no answer to this call.
    #[error("{what} answered {status}")]
    Status { what: &'static str, status: u16 },
    /// Its answer broke off.
    #[error("{what} broken: {reason}")]
    Broken { what: &'static str, reason: String },
    /// Its answer is larger than this side reads.
    #[error("{what} over {cap} bytes")]
    TooLarge { what: &'static str, cap: usize },
    /// Its answer is not what it should be.
    #[error("{what} unreadable: {reason}")]
    Unreadable { what: &'static str, reason: String },
}

/// The body of a completion as it arrives, chunk by chunk.
pub(crate) type ByteStream = BoxStream<'static, Result<Bytes, EngineError>>;

/// One completion request to the engine behind `base_url`.
pub(crate) struct CompletionCall<'a> {
    pub base_url: &'a str,
    /// `/completion` (llama-server's own) or an OpenAI route (`/v1/chat/completions`, ...).
    pub path: &'a str,
    /// CLOUD: the token pool-managerd's proxy wants.
    pub bearer: Option<&'a str>,
    /// Trace context (`traceparent`) for the hop.
    pub headers: reqwest::header::HeaderMap,
    /// The JSON body.
    pub body: Bytes,
}

/// How the engine answered a completion request.
pub(crate) enum Answer {
    /// 2xx: the streamed body.
    Stream(ByteStream),
    /// 4xx, or 500/501 with an error body: the engine refused this request (not worth retrying
    /// elsewhere, and no sign of a sick engine).
    Refused { status: u16, body: String },
    /// Any other status.
    Failed { status: u16 },
}

pub(crate) trait Engine: Send + Sync + 'static {
    /// Sends a completion request; `Err` when no answer came (unreachable, reset).
    fn completion<'a>(
        &'a self,
        call: CompletionCall<'a>,
    ) -> BoxFuture<'a, Result<Answer, EngineError>>;

    /// `GET {base_url}/health` within `timeout`.
    fn health<'a>(
        &'a self,
        base_url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>>;

    /// How many tokens the engine's tokenizer makes of `text` (`POST {base_url}/tokenize`,
    /// special tokens included, as a completion adds them). The caller bounds the time.
    fn tokenize<'a>(
        &'a self,
        base_url: &'a str,
        bearer: Option<&'a str>,
        text: &'a str,
    ) -> BoxFuture<'a, Result<u32, EngineError>>;
}

/// The largest tokenizer answer read (a 1 MiB prompt is at most about a million tokens of a
/// few bytes each in JSON).
const TOKENIZE_BODY_MAX: usize = 16 * 1024 * 1024;

/// The most of an engine's error body that is read (the rest is dropped with the connection).
const ERROR_BODY_MAX: usize = 4096;

/// A whole body of at most `cap` bytes; more is an error (the other side is not trusted to be
/// small). Bounded in time by the caller.
pub(crate) async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
    what: &'static str,
) -> Result<Vec<u8>, EngineError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| EngineError::Broken {
        what,
        reason: e.to_string(),
    })? {
        if body.len() + chunk.len() > cap {
            return Err(EngineError::TooLarge { what, cap });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// At most `cap` bytes of a body (lossy UTF-8), the rest dropped; the read is bounded in size
/// here and in time by the caller's timeout and cancel.
async fn read_prefix(mut resp: reqwest::Response, cap: usize) -> String {
    let mut body = Vec::new();
    while body.len() < cap {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            _ => break,
        }
    }
    body.truncate(cap);
    String::from_utf8_lossy(&body).into_owned()
}

/// The real engine: HTTP with reqwest.
pub(crate) struct HttpEngine {
    /// Completions: no overall timeout (streams are long), short idle pool.
    streams: reqwest::Client,
    /// The one retry of a completion whose pooled connection the engine had closed.
    fresh: reqwest::Client,
    probes: reqwest::Client,
}

impl HttpEngine {
    /// `tls`: how engines behind pool-managerd's proxy are reached over https://.
    pub fn new(tls: &llorch_http::tls::ClientTls) -> anyhow::Result<Self> {
        Ok(Self {
            streams: tls
                .builder()
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .build()?,
            fresh: llamacpp_client::fresh_connection_client_from(tls.builder())?,
            probes: tls
                .builder()
                .connect_timeout(Duration::from_secs(1))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
        })
    }
}

impl Engine for HttpEngine {
    fn completion<'a>(
        &'a self,
        call: CompletionCall<'a>,
    ) -> BoxFuture<'a, Result<Answer, EngineError>> {
        async move {
            let url = format!("{}{}", call.base_url, call.path);
            let resp = llamacpp_client::send_completion(
                &self.streams,
                &self.fresh,
                &url,
                call.bearer,
                &call.headers,
                call.body,
            )
            .await
            .map_err(|e| EngineError::Unreachable {
                what: "engine",
                reason: llamacpp_client::error_chain(&e),
            })?;
            let status = resp.status();
            // 401: the engine (or the node) did not take our credential, a fault of the pool
            // (a key that changed with a restart), not of the request: tried elsewhere.
            if status == reqwest::StatusCode::UNAUTHORIZED {
                return Ok(Answer::Failed {
                    status: status.as_u16(),
                });
            }
            if status.is_client_error() {
                let body = read_prefix(resp, ERROR_BODY_MAX).await;
                return Ok(Answer::Refused {
                    status: status.as_u16(),
                    body,
                });
            }
            if matches!(status.as_u16(), 500 | 501) {
                // llama-server answers 500/501 with an error body to a request it cannot serve
                // (a chat template refusing the messages, an unsupported route): an answer about
                // this request, not a sick engine.
                let body = read_prefix(resp, ERROR_BODY_MAX).await;
                let about_request = serde_json::from_str::<serde_json::Value>(&body)
                    .is_ok_and(|v| v.get("error").is_some());
                if about_request {
                    return Ok(Answer::Refused {
                        status: status.as_u16(),
                        body,
                    });
                }
                return Ok(Answer::Failed {
                    status: status.as_u16(),
                });
            }
            if !status.is_success() {
                return Ok(Answer::Failed {
                    status: status.as_u16(),
                });
            }
            let stream = resp.bytes_stream().map(|r| {
                r.map_err(|e| EngineError::Broken {
                    what: "engine stream",
                    reason: e.to_string(),
                })
            });
            Ok(Answer::Stream(stream.boxed()))
        }
        .boxed()
    }

    fn health<'a>(
        &'a self,
        base_url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>> {
        async move {
            EngineClient::new(self.probes.clone(), base_url, timeout)
                .health()
                .await
                .map_err(|e| EngineError::Unreachable {
                    what: "engine health",
                    reason: e.to_string(),
                })
        }
        .boxed()
    }

    fn tokenize<'a>(
        &'a self,
        base_url: &'a str,
        bearer: Option<&'a str>,
        text: &'a str,
    ) -> BoxFuture<'a, Result<u32, EngineError>> {
        async move {
            let mut req = self
                .probes
                .post(format!("{base_url}/tokenize"))
                .json(&serde_json::json!({"content": text, "add_special": true}));
            if let Some(token) = bearer {
                req = req.bearer_auth(token);
            }
            let resp = req.send().await.map_err(|e| EngineError::Unreachable {
                what: "tokenizer",
                reason: llamacpp_client::error_chain(&e),
            })?;
            if !resp.status().is_success() {
                return Err(EngineError::Status {
                    what: "tokenizer",
                    status: resp.status().as_u16(),
                });
            }
            let body = read_capped(resp, TOKENIZE_BODY_MAX, "tokenizer answer").await?;
            #[derive(serde::Deserialize)]
            struct Tokens {
                tokens: Vec<serde::de::IgnoredAny>,
            }
            let unreadable = |reason: String| EngineError::Unreadable {
                what: "tokenizer answer",
                reason,
            };
            let tokens: Tokens =
                serde_json::from_slice(&body).map_err(|e| unreadable(e.to_string()))?;
            u32::try_from(tokens.tokens.len()).map_err(|_| unreadable("too many tokens".into()))
        }
        .boxed()
    }
}
