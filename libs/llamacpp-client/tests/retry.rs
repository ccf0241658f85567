//! DESIGN §7: llama-server closes keep-alive connections on its own, so a request can meet a
//! connection closed before any response. `send_completion` retries that once on a fresh
//! connection. The server here is a fault injector: it drops the first N connections after
//! reading the request, then answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamacpp_client::{send_completion, CompletionRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server_dropping_first(n: usize) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/completion", listener.local_addr().unwrap());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            let k = counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 8192];
            let _ = sock.read(&mut buf).await;
            if k < n {
                drop(sock); // closed before a response
                continue;
            }
            let body = r#"{"content":"ok","stop":true}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            sock.write_all(resp.as_bytes()).await.unwrap();
        }
    });
    (url, seen)
}

fn request() -> CompletionRequest {
    CompletionRequest {
        prompt: "x".into(),
        n_predict: 1,
        stream: false,
        cache_prompt: true,
        temperature: None,
        top_p: None,
        top_k: None,
        seed: None,
        stop: Vec::new(),
    }
}

#[tokio::test]
async fn connection_closed_before_response_is_retried_once_on_a_fresh_connection() {
    let (url, seen) = server_dropping_first(1).await;
    let http = reqwest::Client::new();
    let resp = send_completion(&http, &url, None, &Default::default(), &request())
        .await
        .expect("retry should succeed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "exactly one retry on a new connection"
    );
}

#[tokio::test]
async fn a_second_failure_is_returned_not_retried_forever() {
    let (url, seen) = server_dropping_first(usize::MAX).await;
    let http = reqwest::Client::new();
    let err = send_completion(&http, &url, None, &Default::default(), &request())
        .await
        .unwrap_err();
    assert!(
        llamacpp_client::is_retryable_connection_error(&err),
        "{err:?}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}
