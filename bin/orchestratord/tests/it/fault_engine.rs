//! Fault injection only: an "engine" that answers `GET /health` and `GET /slots` like
//! llama-server but drops every completion request before answering (an engine dying before
//! its first token), or answers each one with llama-server's 500 and an error body (a request
//! it cannot serve, e.g. a chat template refusing the messages), or answers `400` with a
//! `content-length` and then never sends the body. Never used for a happy path.

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

/// What every completion request gets.
#[derive(Clone, Copy)]
enum Completion {
    /// The connection is dropped without a word.
    Drop,
    /// 500 with this body.
    Refuse(&'static str),
    /// 400 headers announcing a body that never comes; the connection stays open.
    WithholdBody,
}

pub async fn start_dropping_completions() -> FaultEngine {
    start(Completion::Drop).await
}

pub async fn start_refusing_completions() -> FaultEngine {
    start(Completion::Refuse(
        r#"{"error":{"code":500,"message":"the chat template refused the messages","type":"server_error"}}"#,
    ))
    .await
}

pub async fn start_refusing_without_a_body() -> FaultEngine {
    start(Completion::WithholdBody).await
}

async fn start(completion: Completion) -> FaultEngine {
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
                    ("200 OK", r#"{"status":"ok"}"#)
                } else if head.starts_with("GET /slots") {
                    ("200 OK", r#"[{"id":0,"is_processing":false}]"#)
                } else {
                    match completion {
                        Completion::Drop => return,
                        Completion::Refuse(body) => ("500 Internal Server Error", body),
                        Completion::WithholdBody => {
                            let head = "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 512\r\n\r\n";
                            let _ = sock.write_all(head.as_bytes()).await;
                            // Held open until the client leaves: the body never arrives.
                            while sock.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                            return;
                        }
                    }
                };
                let (status, b) = answer;
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{b}",
                    b.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    FaultEngine { url, task }
}
