//! A small client for the llama-server endpoints llama-orch uses (DESIGN §7).

pub use llorch_sse as sse;

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("engine unreachable: {0}")]
    Unreachable(String),
    #[error("engine timed out after {0:?}")]
    Timeout(Duration),
    #[error("engine answered HTTP {0}")]
    Status(u16),
    #[error("engine answered an unexpected body: {0}")]
    Body(String),
}

/// What `GET /health` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// 503 while the model loads.
    Loading,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Slot {
    pub id: u32,
    #[serde(default)]
    pub is_processing: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Props {
    #[serde(default)]
    pub total_slots: Option<u32>,
    #[serde(default)]
    pub build_info: Option<String>,
    #[serde(default)]
    pub model_path: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_label_less_samples() {
        let text = "# HELP x y\n# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 2\nllamacpp:predicted_tokens_seconds 1234.5\nother{a=\"b\"} 1\n";
        let s = parse_prometheus_samples(text);
        assert_eq!(
            s,
            vec![
                ("llamacpp:requests_deferred".to_string(), 2.0),
                ("llamacpp:predicted_tokens_seconds".to_string(), 1234.5)
            ]
        );
    }
}

#[derive(Clone)]
pub struct EngineClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
    /// The engine's API key (`--api-key`), sent on every request.
    api_key: Option<std::sync::Arc<str>>,
}

impl EngineClient {
    /// `base` like `http://127.0.0.1:41234`; `timeout` bounds each probe request.
    pub fn new(http: reqwest::Client, base: impl Into<String>, timeout: Duration) -> Self {
        let base = base.into().trim_end_matches('/').to_string();
        Self {
            http,
            base,
            timeout,
            api_key: None,
        }
    }

    /// With the engine's API key on every request (`/health` needs none, the rest does).
    pub fn with_api_key(mut self, key: Option<std::sync::Arc<str>>) -> Self {
        self.api_key = key;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn get(&self, path: &str) -> Result<reqwest::Response, EngineError> {
        let mut req = self
            .http
            .get(format!("{}{}", self.base, path))
            .timeout(self.timeout);
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        req.send().await.map_err(|e| classify(e, self.timeout))
    }

    pub async fn health(&self) -> Result<Health, EngineError> {
        let resp = self.get("/health").await?;
        match resp.status().as_u16() {
            200 => Ok(Health::Ok),
            503 => Ok(Health::Loading),
            s => Err(EngineError::Status(s)),
        }
    }

    pub async fn slots(&self) -> Result<Vec<Slot>, EngineError> {
        let resp = self.get("/slots").await?;
        if !resp.status().is_success() {
            return Err(EngineError::Status(resp.status().as_u16()));
        }
        resp.json::<Vec<Slot>>()
            .await
            .map_err(|e| EngineError::Body(e.to_string()))
    }

    /// The engine's own Prometheus counters (`--metrics`), as `(name, value)` pairs.
    pub async fn metrics(&self) -> Result<Vec<(String, f64)>, EngineError> {
        let resp = self.get("/metrics").await?;
        if !resp.status().is_success() {
            return Err(EngineError::Status(resp.status().as_u16()));
        }
        let text = resp
            .text()
            .await
            .map_err(|e| EngineError::Body(e.to_string()))?;
        Ok(parse_prometheus_samples(&text))
    }

    pub async fn props(&self) -> Result<Props, EngineError> {
        let resp = self.get("/props").await?;
        if !resp.status().is_success() {
            return Err(EngineError::Status(resp.status().as_u16()));
        }
        resp.json::<Props>()
            .await
            .map_err(|e| EngineError::Body(e.to_string()))
    }
}

fn classify(e: reqwest::Error, timeout: Duration) -> EngineError {
    if e.is_timeout() {
        EngineError::Timeout(timeout)
    } else {
        EngineError::Unreachable(error_chain(&e))
    }
}

/// The TCP addresses `pid` listens on, read from `/proc` (its socket inodes joined with the
/// kernel's LISTEN table): an engine (or daemon) started on port 0 is found on the port the kernel
/// gave it, and a port a process reports can be checked to be its own. Linux only (empty
/// elsewhere).
pub fn listening_addrs(pid: u32) -> Vec<std::net::SocketAddr> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address, state (0A: LISTEN), inode
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                if let Some(addr) = proc_addr(f[1]) {
                    found.push(addr);
                }
            }
        }
    }
    found
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6) as `/proc/net/tcp*` writes them.
fn proc_addr(field: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(u32::from_be(u32::from_str_radix(ip, 16).ok()?)).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, word) in (0..4).map(|w| &ip[w * 8..w * 8 + 8]).enumerate() {
                let v = u32::from_str_radix(word, 16)
                    .ok()?
                    .swap_bytes()
                    .to_be_bytes();
                bytes[i * 4..i * 4 + 4].copy_from_slice(&v);
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// The port in an engine's log line `... listening on http://HOST:PORT ...`: llama-server
/// started with `--port 0` binds a port the kernel gives it and says which here.
pub fn listening_port(line: &str) -> Option<u16> {
    let (_, rest) = line.split_once("listening on http://")?;
    let address = rest.split_whitespace().next()?;
    let (_, port) = address.trim_end_matches('/').rsplit_once(':')?;
    let digits: String = port.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|p| *p != 0)
}

/// The cause chain of a request error, without the URL (reqwest prints it; the message reads
/// better without, and never carries query strings into logs).
pub fn error_chain(e: &reqwest::Error) -> String {
    let mut msg = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if msg.is_empty() {
        msg = e.to_string();
    }
    if let Some(hint) = tls_hint(&msg) {
        msg.push_str(" (");
        msg.push_str(hint);
        msg.push(')');
    }
    msg
}

/// What to check when a request failed in the TLS handshake (rustls's reasons are terse).
fn tls_hint(msg: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        ("UnknownIssuer", "the server's certificate is not signed by a CA this daemon trusts: check LLORCH_TLS_CA_FILE"),
        ("NotValidForName", "the server's certificate does not name the host of the URL"),
        ("Expired", "the server's certificate has expired"),
        ("alert: UnknownCA", "the server does not trust this daemon's client certificate: it must be signed by the server's client CA"),
        ("alert: BadCertificate", "the server does not accept this daemon's client certificate"),
        ("alert: CertificateRequired", "the server requires a client certificate: set this daemon's TLS certificate and key"),
        ("InvalidContentType", "the server did not answer TLS: is the URL https:// to a plain http:// server?"),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| msg.contains(needle))
        .map(|(_, hint)| *hint)
}

/// True for the failure DESIGN §7 describes: llama-server closed a pooled keep-alive connection
/// and the request never got an answer. Safe to retry once on a fresh connection.
pub fn is_retryable_connection_error(e: &reqwest::Error) -> bool {
    if e.is_connect() {
        return true;
    }
    if !e.is_request() {
        return false;
    }
    let text = error_chain(e).to_ascii_lowercase();
    text.contains("connection closed")
        || text.contains("connection reset")
        || text.contains("broken pipe")
        || text.contains("incomplete message")
}

/// Label-less samples of a Prometheus text exposition (what llama-server exports).
pub fn parse_prometheus_samples(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?;
            let value = parts.next()?.parse().ok()?;
            Some((name.to_string(), value))
        })
        .collect()
}

/// `POST /completion` body (the fields llama-orch uses).
#[derive(Debug, Clone, Serialize)]
pub struct CompletionRequest {
    pub prompt: String,
    pub n_predict: u32,
    pub stream: bool,
    pub cache_prompt: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// The engine slot to run in (cache-aware placement pins it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_slot: Option<u32>,
}

/// One `data:` chunk of a streamed completion.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionChunk {
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub stop: bool,
    /// `eos`, `limit`, `word` or `none` on the last chunk.
    #[serde(default)]
    pub stop_type: Option<String>,
    #[serde(default)]
    pub tokens_predicted: Option<u32>,
    #[serde(default)]
    pub timings: Option<Timings>,
    /// Set when the engine reports a failure in the stream instead of a token.
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Timings {
    #[serde(default)]
    pub prompt_ms: Option<f64>,
    #[serde(default)]
    pub predicted_ms: Option<f64>,
    #[serde(default)]
    pub predicted_n: Option<u32>,
    /// Prompt tokens taken from the slot's cache.
    #[serde(default)]
    pub cache_n: Option<u32>,
    /// Prompt tokens evaluated.
    #[serde(default)]
    pub prompt_n: Option<u32>,
}

impl Timings {
    /// (prompt tokens from the cache, prompt tokens evaluated), when the engine said both.
    pub fn prompt_cache(&self) -> Option<(u32, u32)> {
        self.cache_n.zip(self.prompt_n)
    }
}

/// A client that never reuses a connection: for the one retry of [`send_completion`].
pub fn fresh_connection_client() -> reqwest::Result<reqwest::Client> {
    fresh_connection_client_from(reqwest::Client::builder())
}

/// [`fresh_connection_client`] from `builder` (its TLS settings, say).
pub fn fresh_connection_client_from(
    builder: reqwest::ClientBuilder,
) -> reqwest::Result<reqwest::Client> {
    builder
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .tcp_nodelay(true)
        .build()
}

/// Sends a completion request (`body`: its JSON); a connection the engine closed before answering (or refused)
/// is retried once on a fresh connection (DESIGN §7): through `fresh`, a client that keeps no
/// idle connections ([`fresh_connection_client`]), since a retry through `http`'s pool can meet
/// another connection the engine has closed. `url` is the full endpoint URL.
pub async fn send_completion(
    http: &reqwest::Client,
    fresh: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    headers: &reqwest::header::HeaderMap,
    body: bytes::Bytes,
) -> Result<reqwest::Response, reqwest::Error> {
    let send = |client: &reqwest::Client| {
        let mut rb = client
            .post(url)
            .headers(headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(token) = bearer {
            rb = rb.bearer_auth(token);
        }
        rb.send()
    };
    match send(http).await {
        Err(e) if is_retryable_connection_error(&e) => send(fresh).await,
        other => other,
    }
}
