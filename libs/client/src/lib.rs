//! Typed client of orchestratord's HTTP API. Requests and answers are the contract types of
//! `llorch-contracts`, so a contract change breaks the build of every client, not a user.
//! Used by the `llorch` CLI, the test harnesses and the benchmarks.

use llorch_contracts::meta::{
    Capabilities, NodesResponse, OrchPoolsResponse, ReadyResponse, SessionResponse, VersionResponse,
};
use llorch_contracts::openai::{ChatRequest, ErrorBody, ErrorResponse, ModelList, Usage};
use llorch_contracts::tasks::{AdmissionResponse, TaskEvent, TaskRequest, TaskStatus};
use llorch_contracts::{DrainRequest, ErrorEnvelope, PoolStatus, ReloadRequest};
pub use llorch_sse::{SseFrame, SseParser};
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("orchestratord unreachable: {0}")]
    Unreachable(String),
    /// orchestratord answered with its error envelope.
    #[error("{status} {}: {}", .error.code, .error.message)]
    Api { status: u16, error: ErrorEnvelope },
    /// An OpenAI route answered with OpenAI's error shape (over HTTP, or as a stream chunk).
    #[error("{status} {}: {}", .error.kind, .error.message)]
    OpenAi { status: u16, error: ErrorBody },
    /// An answer that is neither the expected body nor the envelope.
    #[error("unexpected answer {status}: {body}")]
    Unexpected { status: u16, body: String },
}

#[derive(Clone)]
pub struct OrchClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl OrchClient {
    /// `base` like `http://127.0.0.1:8080`; `token` is sent as `Authorization: Bearer`.
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self::with_http(base, token, reqwest::Client::new())
    }

    /// [`OrchClient::new`] over `http` (a client with its own TLS settings, say).
    pub fn with_http(base: &str, token: Option<&str>, http: reqwest::Client) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request to `path` with the token; for calls this client has no method for.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = rb
            .send()
            .await
            .map_err(|e| ClientError::Unreachable(llamacpp_client::error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        if let Ok(e) = serde_json::from_str::<ErrorResponse>(&body) {
            return Err(ClientError::OpenAi {
                status,
                error: e.error,
            });
        }
        Err(match serde_json::from_str::<ErrorEnvelope>(&body) {
            Ok(error) => ClientError::Api { status, error },
            Err(_) => ClientError::Unexpected { status, body },
        })
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = self.send(rb).await?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable(llamacpp_client::error_chain(&e)))?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Unexpected {
            status,
            body: format!("{e}: {}", String::from_utf8_lossy(&body)),
        })
    }

    /// `POST /v2/tasks`.
    pub async fn submit(&self, req: &TaskRequest) -> Result<AdmissionResponse, ClientError> {
        self.typed(self.request(reqwest::Method::POST, "/v2/tasks").json(req))
            .await
    }

    /// `GET /v2/tasks/{id}`.
    pub async fn task(&self, id: &str) -> Result<TaskStatus, ClientError> {
        self.typed(self.request(reqwest::Method::GET, &format!("/v2/tasks/{id}")))
            .await
    }

    /// `POST /v2/tasks/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<(), ClientError> {
        self.send(self.request(reqwest::Method::POST, &format!("/v2/tasks/{id}/cancel")))
            .await
            .map(drop)
    }

    /// `GET /v2/tasks/{id}/events`, from the frame after `last_event_id` when given.
    pub async fn events(
        &self,
        id: &str,
        last_event_id: Option<u64>,
    ) -> Result<EventStream, ClientError> {
        let mut rb = self.request(reqwest::Method::GET, &format!("/v2/tasks/{id}/events"));
        if let Some(last) = last_event_id {
            rb = rb.header("last-event-id", last.to_string());
        }
        Ok(EventStream {
            resp: self.send(rb).await?,
            parser: SseParser::new(),
            pending: Default::default(),
        })
    }

    /// `GET /v2/sessions/{id}`.
    pub async fn session(&self, id: &str) -> Result<SessionResponse, ClientError> {
        self.typed(self.request(reqwest::Method::GET, &format!("/v2/sessions/{id}")))
            .await
    }

    /// `GET /v2/pools`.
    pub async fn pools(&self) -> Result<OrchPoolsResponse, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/v2/pools"))
            .await
    }

    /// `GET /v2/nodes`.
    pub async fn nodes(&self) -> Result<NodesResponse, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/v2/nodes"))
            .await
    }

    /// `GET /v2/meta/capabilities`.
    pub async fn capabilities(&self) -> Result<Capabilities, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/v2/meta/capabilities"))
            .await
    }

    /// `GET /v2/meta/version`.
    pub async fn version(&self) -> Result<VersionResponse, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/v2/meta/version"))
            .await
    }

    /// `GET /ready` (open): an answer while some pool is ready, 503 `POOL_UNAVAILABLE` (an
    /// [`ClientError::Api`]) while none is or while shutting down.
    pub async fn ready(&self) -> Result<ReadyResponse, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/ready"))
            .await
    }

    /// `GET /metrics` (open): the Prometheus text exposition.
    pub async fn metrics_text(&self) -> Result<String, ClientError> {
        self.send(self.request(reqwest::Method::GET, "/metrics"))
            .await?
            .text()
            .await
            .map_err(|e| ClientError::Unreachable(llamacpp_client::error_chain(&e)))
    }

    /// `POST /v2/pools/{id}/drain` (forwarded to the pool's pool-managerd).
    pub async fn drain(&self, pool: &str, req: &DrainRequest) -> Result<PoolStatus, ClientError> {
        let path = format!("/v2/pools/{pool}/drain");
        self.typed(self.request(reqwest::Method::POST, &path).json(req))
            .await
    }

    /// `POST /v2/pools/{id}/reload` (forwarded to the pool's pool-managerd).
    pub async fn reload(&self, pool: &str, req: &ReloadRequest) -> Result<PoolStatus, ClientError> {
        let path = format!("/v2/pools/{pool}/reload");
        self.typed(self.request(reqwest::Method::POST, &path).json(req))
            .await
    }
}

impl OrchClient {
    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<ModelList, ClientError> {
        self.typed(self.request(reqwest::Method::GET, "/v1/models"))
            .await
    }

    /// `POST /v1/chat/completions`, streamed (`stream` is set here, with usage asked for);
    /// `session` goes in `X-Llorch-Session`.
    pub async fn chat_stream(
        &self,
        req: &ChatRequest,
        session: Option<&str>,
    ) -> Result<ChatStream, ClientError> {
        let mut req = req.clone();
        req.sampling.stream = true;
        req.sampling.stream_options = Some(llorch_contracts::openai::StreamOptions {
            include_usage: true,
        });
        let mut rb = self
            .request(reqwest::Method::POST, "/v1/chat/completions")
            .json(&req);
        if let Some(s) = session {
            rb = rb.header("x-llorch-session", s);
        }
        let resp = self.send(rb).await?;
        let task_id = resp
            .headers()
            .get("x-llorch-task-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(ChatStream {
            resp,
            parser: SseParser::new(),
            pending: Default::default(),
            task_id,
        })
    }
}

/// One chunk of a chat stream, as far as a console needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatPiece {
    pub content: Option<String>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// A streamed chat answer.
pub struct ChatStream {
    resp: reqwest::Response,
    parser: SseParser,
    pending: std::collections::VecDeque<SseFrame>,
    /// The task the request became (`GET /v2/tasks/{id}`).
    pub task_id: Option<String>,
}

impl ChatStream {
    /// The next chunk; `Ok(None)` after `[DONE]`. An error chunk, or a stream that ends
    /// without `[DONE]`, is an `Err`.
    pub async fn next(&mut self) -> Result<Option<ChatPiece>, ClientError> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                if f.data == "[DONE]" {
                    return Ok(None);
                }
                let v: serde_json::Value =
                    serde_json::from_str(&f.data).map_err(|e| ClientError::Unexpected {
                        status: 200,
                        body: format!("{e}: {}", f.data),
                    })?;
                if let Ok(e) = serde_json::from_value::<ErrorResponse>(v.clone()) {
                    return Err(ClientError::OpenAi {
                        status: 200,
                        error: e.error,
                    });
                }
                let choice = &v["choices"][0];
                return Ok(Some(ChatPiece {
                    content: choice["delta"]["content"].as_str().map(str::to_string),
                    finish_reason: choice["finish_reason"].as_str().map(str::to_string),
                    usage: serde_json::from_value(v["usage"].clone()).ok(),
                }));
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .map_err(|e| ClientError::Unreachable(llamacpp_client::error_chain(&e)))?;
            match chunk {
                Some(c) => self.pending.extend(self.parser.push(&c)),
                None => {
                    return Err(ClientError::Unexpected {
                        status: 200,
                        body: "the stream ended without [DONE]".into(),
                    })
                }
            }
        }
    }
}

/// A task's event stream.
pub struct EventStream {
    resp: reqwest::Response,
    parser: SseParser,
    pending: std::collections::VecDeque<SseFrame>,
}

impl EventStream {
    /// The next raw frame; `None` when the stream ended (or broke).
    pub async fn frame(&mut self) -> Option<SseFrame> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Some(f);
            }
            let chunk = self.resp.chunk().await.ok()??;
            self.pending.extend(self.parser.push(&chunk));
        }
    }

    /// The next raw frame whose event is `name`.
    pub async fn frame_named(&mut self, name: &str) -> Option<SseFrame> {
        while let Some(f) = self.frame().await {
            if f.event.as_deref() == Some(name) {
                return Some(f);
            }
        }
        None
    }

    /// The next event with its frame id; `None` when the stream ended. Frames that are not a
    /// known event (keep-alive comments never are frames) are skipped.
    pub async fn next(&mut self) -> Option<(u64, TaskEvent)> {
        loop {
            let f = self.frame().await?;
            if let Some(event) = decode(&f) {
                let id = f.id.as_deref().and_then(|i| i.parse().ok()).unwrap_or(0);
                return Some((id, event));
            }
        }
    }
}

/// The typed event of a frame (`event:` names the variant, `data:` its payload).
pub fn decode(f: &SseFrame) -> Option<TaskEvent> {
    let name = serde_json::to_string(f.event.as_deref()?).ok()?;
    serde_json::from_str(&format!("{{\"event\":{name},\"data\":{}}}", f.data)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_decode_into_their_typed_events() {
        let f = SseFrame {
            event: Some("token".into()),
            id: Some("3".into()),
            data: r#"{"t":"hi","i":2}"#.into(),
        };
        assert_eq!(
            decode(&f),
            Some(TaskEvent::Token {
                t: "hi".into(),
                i: 2
            })
        );
        let unknown = SseFrame {
            event: Some("nope".into()),
            id: None,
            data: "{}".into(),
        };
        assert_eq!(decode(&unknown), None);
    }
}
