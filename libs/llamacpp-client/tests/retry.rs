//! DESIGN §7: llama-server closes keep-alive connections on its own, so a request can meet a
//! connection closed before any response. `send_completion` retries that once on a fresh
//! connection. The server here is a fault injector: it drops the first N connections after
//! reading the request, then answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use llamacpp_client::{fresh_connection_client, send_completion, CompletionRequest};
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
            answer_ok(&mut sock).await;
        }
    });
    (url, seen)
}

/// A complete, keep-alive 200 answer with a final completion chunk.
async fn answer_ok(sock: &mut tokio::net::TcpStream) {
    let body = r#"{"content":"ok","stop":true}"#;
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(resp.as_bytes()).await.unwrap();
}

/// `send_completion` of [`request`] through `http`, with a fresh-connection client for the retry.
async fn complete(http: &reqwest::Client, url: &str) -> Result<reqwest::Response, reqwest::Error> {
    send_completion(
        http,
        &fresh_connection_client().unwrap(),
        url,
        None,
        &Default::default(),
        serde_json::to_vec(&request()).unwrap().into(),
    )
    .await
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
        id_slot: None,
    }
}

#[tokio::test]
async fn connection_closed_before_response_is_retried_once_on_a_fresh_connection() {
    let (url, seen) = server_dropping_first(1).await;
    let http = reqwest::Client::new();
    let resp = complete(&http, &url).await.expect("retry should succeed");
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
    let err = complete(&http, &url).await.unwrap_err();
    assert!(
        llamacpp_client::is_retryable_connection_error(&err),
        "{err:?}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

/// Reads one HTTP/1.1 request (headers, then a `content-length` body); false at end of stream.
async fn read_request(sock: &mut tokio::net::TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match sock.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).await.is_ok()
}

/// Every connection answers its first request (kept alive), then closes without answering
/// the next: each idle pooled connection is one the engine has given up on.
async fn server_with_one_request_per_connection() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/completion", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if !read_request(&mut sock).await {
                    return;
                }
                answer_ok(&mut sock).await;
                // The next request on this connection gets no answer: closed.
                let _ = read_request(&mut sock).await;
            });
        }
    });
    (url, connections)
}

#[tokio::test]
async fn the_retry_uses_a_new_connection_even_when_the_pool_holds_more_closed_ones() {
    let (url, connections) = server_with_one_request_per_connection().await;
    let http = reqwest::Client::new();
    // Two concurrent requests leave two idle keep-alive connections in the pool.
    let (a, b) = tokio::join!(
        http.post(&url).json(&request()).send(),
        http.post(&url).json(&request()).send()
    );
    a.unwrap().text().await.unwrap();
    b.unwrap().text().await.unwrap();
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    // The first try meets one of them closed; a pooled retry would meet the other.
    let resp = complete(&http, &url)
        .await
        .expect("the retry on a new connection should succeed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        3,
        "the retry opened one new connection"
    );
}
