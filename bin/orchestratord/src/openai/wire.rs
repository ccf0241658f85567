//! The OpenAI wire at the edge: its error shape, its JSON extractor, its auth answer, the
//! llama-orch headers (priority, session, deadline), and the checks and allowlist that turn a
//! client's request into a task and an engine body.

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_contracts::openai::{
    ChatRequest, CompletionRequest, EmbeddingInput, EmbeddingRequest, ErrorBody, ErrorResponse,
    Prompt, Sampling,
};
use llorch_contracts::tasks::{Priority, TaskRequest};
use llorch_contracts::{ErrorCode, ErrorEnvelope};
use llorch_http::ApiError;
use sha2::Digest;

use crate::config::Config;

/// A failure on an OpenAI route: OpenAI's `{"error": {...}}` with the status of its code.
#[derive(Debug)]
pub(crate) struct OaError {
    status: StatusCode,
    body: ErrorResponse,
    retry_after_ms: Option<u64>,
}

impl OaError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status.as_u16() {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        Self {
            status,
            body: ErrorResponse {
                error: ErrorBody {
                    message: message.into(),
                    kind: kind.into(),
                    param: None,
                    code: None,
                },
            },
            retry_after_ms: None,
        }
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::new(400, message).param(param)
    }

    pub fn param(mut self, param: &str) -> Self {
        self.body.error.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &str) -> Self {
        self.body.error.code = Some(code.into());
        self
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(404, format!("The model `{model}` does not exist"))
            .param("model")
            .code("model_not_found")
    }

    pub fn body(&self) -> &ErrorResponse {
        &self.body
    }
}

/// The OpenAI form of a llama-orch error: same status and retry hint; `code` is ours in lower
/// case, with OpenAI's own names where it has one.
impl From<ErrorEnvelope> for OaError {
    fn from(e: ErrorEnvelope) -> Self {
        let code = match e.code {
            ErrorCode::Unauthorized => "invalid_api_key".to_string(),
            ErrorCode::AdmissionReject | ErrorCode::QueueFullDropLru => "queue_full".to_string(),
            other => other.as_str().to_ascii_lowercase(),
        };
        let mut out = OaError::new(e.code.http_status(), e.message).code(&code);
        out.retry_after_ms = e.retry_after_ms;
        out
    }
}

impl From<ApiError> for OaError {
    fn from(e: ApiError) -> Self {
        e.0.into()
    }
}

impl IntoResponse for OaError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(&self.body)).into_response();
        llorch_http::set_refusal_headers(resp.headers_mut(), self.status, self.retry_after_ms);
        resp
    }
}

/// Middleware: a client key, refused in OpenAI's shape (`invalid_api_key`); the caller goes
/// into the request's extensions.
pub(crate) async fn require_key(
    axum::extract::State(gate): axum::extract::State<llorch_http::Gate>,
    mut req: Request,
    next: Next,
) -> Response {
    match llorch_http::check_auth(&gate, &req) {
        Ok(principal) => {
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => OaError::from(e).into_response(),
    }
}

pub(crate) async fn not_found(req: Request) -> OaError {
    OaError::new(
        404,
        format!("Invalid URL ({} {})", req.method(), req.uri().path()),
    )
}

pub(crate) async fn method_not_allowed(req: Request) -> OaError {
    OaError::new(
        405,
        format!(
            "Method {} is not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// What the `X-Llorch-*` headers (and `user`) ask of queueing.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Queueing {
    pub priority: Priority,
    pub session_id: Option<String>,
    pub deadline_ms: Option<u64>,
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, OaError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| OaError::invalid(name, format!("{name} must be visible ASCII")))
        })
        .transpose()
}

/// `X-Llorch-Priority: interactive|batch`, `X-Llorch-Session`, `X-Llorch-Deadline-Ms`; without
/// a session header, `user` keys the session (hashed when it is not a valid session id).
pub(crate) fn queueing(headers: &HeaderMap, user: Option<&str>) -> Result<Queueing, OaError> {
    const PRIORITY: &str = "X-Llorch-Priority";
    const SESSION: &str = "X-Llorch-Session";
    const DEADLINE: &str = "X-Llorch-Deadline-Ms";
    let priority = match header_str(headers, PRIORITY)? {
        None | Some("interactive") => Priority::Interactive,
        Some("batch") => Priority::Batch,
        Some(other) => {
            return Err(OaError::invalid(
                PRIORITY,
                format!("{PRIORITY} {other:?} is not one of: interactive, batch"),
            ))
        }
    };
    let session_id = match header_str(headers, SESSION)? {
        Some(s) if crate::admission::valid_id(s) => Some(s.to_string()),
        Some(_) => {
            return Err(OaError::invalid(
                SESSION,
                format!("{SESSION} must be 1-128 characters of A-Z a-z 0-9 - _ . :"),
            ))
        }
        None => user.filter(|u| !u.is_empty()).map(|u| {
            if crate::admission::valid_id(u) {
                u.to_string()
            } else {
                format!(
                    "user-{}",
                    &hex::encode(sha2::Sha256::digest(u.as_bytes()))[..32]
                )
            }
        }),
    };
    let deadline_ms = match header_str(headers, DEADLINE)? {
        None => None,
        Some(v) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Some(ms),
            _ => {
                return Err(OaError::invalid(
                    DEADLINE,
                    format!("{DEADLINE} must be a positive number of milliseconds"),
                ))
            }
        },
    };
    Ok(Queueing {
        priority,
        session_id,
        deadline_ms,
    })
}

fn range(param: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<(), OaError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => Err(OaError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}"),
        )),
        _ => Ok(()),
    }
}

/// Checks the shared fields and writes the allowlisted ones into the engine body; returns the
/// generation limit.
pub(crate) fn sampling(
    config: &Config,
    s: &Sampling,
    body: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<u32, OaError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(OaError::invalid(
            "n",
            "n must be 1: one choice per request (send several requests for several choices)",
        ));
    }
    let (param, asked) = match (s.max_completion_tokens, s.max_tokens) {
        (Some(n), _) => ("max_completion_tokens", Some(n)),
        (None, n) => ("max_tokens", n),
    };
    let max_tokens = asked.unwrap_or(config.openai_default_max_tokens);
    if max_tokens == 0 || max_tokens > config.max_tokens_cap {
        return Err(OaError::invalid(
            param,
            format!("{param} must be between 1 and {}", config.max_tokens_cap),
        ));
    }
    range("temperature", s.temperature, 0.0, 2.0)?;
    range("presence_penalty", s.presence_penalty, -2.0, 2.0)?;
    range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)?;
    range("min_p", s.min_p, 0.0, 1.0)?;
    if s.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(OaError::invalid("top_p", "top_p must be in (0, 1]"));
    }
    if s.top_k.is_some_and(|k| k > 1000) {
        return Err(OaError::invalid("top_k", "top_k must be at most 1000"));
    }
    let stop = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > 16 || stop.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(OaError::invalid(
            "stop",
            "stop takes at most 16 non-empty strings of at most 256 bytes",
        ));
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(OaError::invalid(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    body.insert("max_tokens".into(), max_tokens.into());
    body.insert("stream".into(), true.into());
    body.insert(
        "stream_options".into(),
        serde_json::json!({"include_usage": true}),
    );
    let mut put = |k: &str, v: Option<serde_json::Value>| {
        if let Some(v) = v {
            body.insert(k.into(), v);
        }
    };
    put("temperature", s.temperature.map(Into::into));
    put("top_p", s.top_p.map(Into::into));
    put("top_k", s.top_k.map(Into::into));
    put("min_p", s.min_p.map(Into::into));
    put("seed", s.seed.map(Into::into));
    put("presence_penalty", s.presence_penalty.map(Into::into));
    put("frequency_penalty", s.frequency_penalty.map(Into::into));
    put("stop", (!stop.is_empty()).then(|| stop.into()));
    Ok(max_tokens)
}

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// `messages`: a non-empty list of objects, each with a known `role`.
pub(crate) fn messages(messages: &[serde_json::Value]) -> Result<(), OaError> {
    if messages.is_empty() {
        return Err(OaError::invalid("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        if !role.is_some_and(|r| ROLES.contains(&r)) {
            return Err(OaError::invalid(
                &format!("messages[{i}].role"),
                format!("messages[{i}].role must be one of: {}", ROLES.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The one prompt of `/v1/completions`.
pub(crate) fn prompt(prompt: &Prompt) -> Result<&str, OaError> {
    let [p] = prompt.as_slice() else {
        return Err(OaError::invalid(
            "prompt",
            "prompt takes one string per request",
        ));
    };
    if p.is_empty() {
        return Err(OaError::invalid("prompt", "prompt must not be empty"));
    }
    Ok(p)
}

/// Most inputs one embeddings request may carry.
const EMBEDDING_INPUTS_MAX: usize = 2048;

/// `input` of `/v1/embeddings`: a non-empty string, or a list of 1..=2048 of them.
pub(crate) fn embedding_input(input: &EmbeddingInput) -> Result<serde_json::Value, OaError> {
    let all = input.as_slice();
    if all.is_empty() || all.len() > EMBEDDING_INPUTS_MAX {
        return Err(OaError::invalid(
            "input",
            format!("input takes 1 to {EMBEDDING_INPUTS_MAX} strings"),
        ));
    }
    if all.iter().any(|s| s.is_empty()) {
        return Err(OaError::invalid("input", "input strings must not be empty"));
    }
    serde_json::to_value(input).map_err(|e| OaError::new(500, e.to_string()))
}

/// What queueing and placement read of an OpenAI task.
/// (Sampling lives in the engine body only: nothing in queueing or placement reads it.)
pub(crate) fn task_request(id: String, model: &str, max_tokens: u32, q: Queueing) -> TaskRequest {
    let mut req = TaskRequest::new(model, "", max_tokens);
    req.task_id = Some(id);
    req.priority = q.priority;
    req.session_id = q.session_id;
    req.deadline_ms = q.deadline_ms;
    req
}

type EngineBody = serde_json::Map<String, serde_json::Value>;

/// The engine body of a chat request (its messages are moved in) and its generation limit.
pub(crate) fn chat_body(
    config: &Config,
    req: &mut ChatRequest,
) -> Result<(EngineBody, u32), OaError> {
    messages(&req.messages)?;
    let mut body = EngineBody::new();
    body.insert("messages".into(), std::mem::take(&mut req.messages).into());
    if let Some(f) = req.response_format.take() {
        if !f.get("type").is_some_and(|t| t.is_string()) {
            return Err(OaError::invalid(
                "response_format",
                "response_format must be an object with a type",
            ));
        }
        body.insert("response_format".into(), f);
    }
    if let Some(tools) = req.tools.take() {
        if tools.iter().any(|t| !t.is_object()) {
            return Err(OaError::invalid("tools", "tools must be a list of objects"));
        }
        body.insert("tools".into(), tools.into());
    }
    if let Some(choice) = req.tool_choice.take() {
        if !(choice.is_string() || choice.is_object()) {
            return Err(OaError::invalid(
                "tool_choice",
                "tool_choice must be a string or an object",
            ));
        }
        body.insert("tool_choice".into(), choice);
    }
    let max_tokens = sampling(config, &req.sampling, &mut body)?;
    Ok((body, max_tokens))
}

/// The engine body of a completion request and its generation limit.
pub(crate) fn completion_body(
    config: &Config,
    req: &CompletionRequest,
) -> Result<(EngineBody, u32), OaError> {
    let mut body = EngineBody::new();
    body.insert("prompt".into(), prompt(&req.prompt)?.into());
    let max_tokens = sampling(config, &req.sampling, &mut body)?;
    Ok((body, max_tokens))
}

/// The engine body of an embeddings request.
pub(crate) fn embedding_body(req: &EmbeddingRequest) -> Result<EngineBody, OaError> {
    let mut body = EngineBody::new();
    body.insert("input".into(), embedding_input(&req.input)?);
    body.insert(
        "encoding_format".into(),
        serde_json::to_value(req.encoding_format).unwrap_or_default(),
    );
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of every engine body orchestratord writes, `id_slot` (slot pinning)
    /// included, is on pool-managerd's proxy list for its route: a field added here and not
    /// there would have every CLOUD request of that kind refused.
    // covers: CLOUD-4114
    #[test]
    fn every_engine_body_field_passes_the_nodes_proxy() {
        use llorch_contracts::engine_routes::EngineRoute;
        let config = Config::from_args(
            <crate::config::Args as clap::Parser>::try_parse_from([
                "orchestratord",
                "--api-token=inprocess-test-token-0123",
            ])
            .unwrap(),
        )
        .unwrap();
        let sampling = serde_json::json!({
            "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
            "stop": ["x"], "seed": 1, "presence_penalty": 0.1, "frequency_penalty": 0.1,
            "user": "u", "stream": true, "stream_options": {"include_usage": true}
        });
        let with = |mut extra: serde_json::Value| {
            extra
                .as_object_mut()
                .unwrap()
                .extend(sampling.as_object().unwrap().clone());
            extra
        };
        let mut chat: ChatRequest = serde_json::from_value(with(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"
        })))
        .unwrap();
        let completion: CompletionRequest =
            serde_json::from_value(with(serde_json::json!({"model": "m", "prompt": "p"}))).unwrap();
        let embedding: EmbeddingRequest =
            serde_json::from_value(serde_json::json!({"model": "m", "input": "p"})).unwrap();
        let bodies = [
            (
                "v1/chat/completions",
                chat_body(&config, &mut chat).unwrap().0,
                true,
            ),
            (
                "v1/completions",
                completion_body(&config, &completion).unwrap().0,
                true,
            ),
            ("v1/embeddings", embedding_body(&embedding).unwrap(), false),
        ];
        for (path, body, pinned) in bodies {
            // Pinned as the runner pins it, and read back.
            let body = if pinned {
                let bytes =
                    crate::runner::with_id_slot(serde_json::to_vec(&body).unwrap().into(), 0);
                serde_json::from_slice(&bytes).unwrap()
            } else {
                body
            };
            assert_eq!(body.contains_key("id_slot"), pinned, "{path}");
            let route = EngineRoute::find(path).unwrap();
            for key in body.keys() {
                assert!(
                    route.passes(key),
                    "{path}: {key:?} is not passed by the proxy"
                );
            }
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, axum::http::HeaderValue::from_static(v));
        }
        h
    }

    // covers: OAI-7108
    #[test]
    fn headers_set_priority_session_and_deadline() {
        let q = queueing(
            &headers(&[
                ("x-llorch-priority", "batch"),
                ("x-llorch-session", "s-1"),
                ("x-llorch-deadline-ms", "2500"),
            ]),
            Some("ignored when the header is set"),
        )
        .unwrap();
        assert_eq!(
            q,
            Queueing {
                priority: Priority::Batch,
                session_id: Some("s-1".into()),
                deadline_ms: Some(2500)
            }
        );
    }

    // covers: OAI-7108
    #[test]
    fn user_keys_the_session_when_no_header_does() {
        let plain = queueing(&HeaderMap::new(), Some("alice")).unwrap();
        assert_eq!(plain.session_id.as_deref(), Some("alice"));
        let mail = queueing(&HeaderMap::new(), Some("alice@example.org")).unwrap();
        let id = mail.session_id.unwrap();
        assert!(
            id.starts_with("user-") && crate::admission::valid_id(&id),
            "{id}"
        );
        // The same user is the same session, another user another one.
        let again = queueing(&HeaderMap::new(), Some("alice@example.org")).unwrap();
        assert_eq!(again.session_id.as_deref(), Some(id.as_str()));
        let bob = queueing(&HeaderMap::new(), Some("bob@example.org")).unwrap();
        assert_ne!(bob.session_id.as_deref(), Some(id.as_str()));
        assert_eq!(queueing(&HeaderMap::new(), None).unwrap().session_id, None);
    }

    // covers: OAI-7108
    #[test]
    fn bad_headers_name_themselves() {
        for (h, v) in [
            ("x-llorch-priority", "urgent"),
            ("x-llorch-session", "no spaces allowed"),
            ("x-llorch-deadline-ms", "0"),
            ("x-llorch-deadline-ms", "soon"),
        ] {
            let e = queueing(&headers(&[(h, v)]), None).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                e.body.error.param.as_deref().map(str::to_ascii_lowercase),
                Some(h.to_string())
            );
        }
    }

    // covers: OAI-7103
    #[test]
    fn error_codes_map_to_openai_types() {
        let e = OaError::from(ErrorEnvelope::new(ErrorCode::AdmissionReject, "full"));
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(e.body.error.kind, "rate_limit_error");
        assert_eq!(e.body.error.code.as_deref(), Some("queue_full"));
        let e = OaError::from(ErrorEnvelope::new(ErrorCode::Unauthorized, "no"));
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert_eq!(e.body.error.code.as_deref(), Some("invalid_api_key"));
        let e = OaError::from(ErrorEnvelope::new(ErrorCode::PoolUnavailable, "gone"));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.body.error.kind, "server_error");
    }
}
