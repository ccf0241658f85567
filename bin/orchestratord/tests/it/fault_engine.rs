//! Fault injection only: a "engine" that answers `GET /health` and `GET /slots` like
//! llama-server but drops every completion request before answering (an engine dying before
//! its first token). Never used for a happy path.

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
                let body = if head.starts_with("GET /health") {
                    Some(r#"{"status":"ok"}"#)
                } else if head.starts_with("GET /slots") {
                    Some(r#"[{"id":0,"is_processing":false}]"#)
                } else {
                    None // completion: drop the connection without a word
                };
                if let Some(b) = body {
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                        b.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                }
            });
        }
    });
    FaultEngine { url, task }
}
