//! Fault injection only: an "engine" that answers `GET /health` and `GET /slots` like
//! llama-server but drops every completion request before answering (an engine dying before
//! its first token), or answers each one with llama-server's 500 and an error body (a request
//! it cannot serve, e.g. a chat template refusing the messages). Never used for a happy path.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct FaultEngine {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_dropping_completions() -> FaultEngine {
    start(None).await
}

pub async fn start_refusing_completions() -> FaultEngine {
    start(Some(
        r#"{"error":{"code":500,"message":"the chat template refused the messages","type":"server_error"}}"#,
    ))
    .await
}

/// `refusal`: the 500 body every completion gets (none: the connection is dropped).
async fn start(refusal: Option<&'static str>) -> FaultEngine {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]);
                let answer = if head.starts_with("GET /health") {
                    Some(("200 OK", r#"{"status":"ok"}"#))
                } else if head.starts_with("GET /slots") {
                    Some(("200 OK", r#"[{"id":0,"is_processing":false}]"#))
                } else {
                    // A completion: refused, or dropped without a word.
                    refusal.map(|b| ("500 Internal Server Error", b))
                };
                if let Some((status, b)) = answer {
                    let resp = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    FaultEngine { url, task }
}
