//! Hostile or broken HTTP clients against both daemons, on real sockets: headers trickled
//! (slowloris), a body trickled, heads too large (431), bodies too large (413), malformed
//! JSON and invalid UTF-8 (400 in the envelope), a client that half-closes after its request,
//! and the connection cap of pool-managerd. Each daemon stays healthy afterwards.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

async fn stack() -> Stack {
    let quick = |name| (name, "600".to_string());
    Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![
            quick("ORCHD_HEADER_READ_TIMEOUT_MS"),
            quick("ORCHD_BODY_READ_TIMEOUT_MS"),
        ],
        pm_env: vec![
            quick("POOL_MANAGERD_HEADER_READ_TIMEOUT_MS"),
            quick("POOL_MANAGERD_BODY_READ_TIMEOUT_MS"),
            ("POOL_MANAGERD_MAX_BODY_BYTES", "4096".into()),
            ("POOL_MANAGERD_MAX_CONNECTIONS", "2".into()),
        ],
        ..Default::default()
    })
    .await
}

async fn connect(base: &str) -> TcpStream {
    TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Everything the server sends until it closes (or 10 s pass).
async fn answer(sock: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status line's code and the JSON body of a raw HTTP/1.1 answer.
fn parse(raw: &str) -> (u16, serde_json::Value) {
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_default())
}

fn post_head(path: &str, len: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    )
}

// covers: AUTH-5111
#[tokio::test]
async fn a_trickled_body_is_answered_408_request_timeout_by_both_daemons() {
    let s = stack().await;
    for (base, path) in [(&s.base, "/v2/tasks"), (&s.pm_base, "/v2/pools/p0/drain")] {
        let mut sock = connect(base).await;
        sock.write_all(post_head(path, 100).as_bytes())
            .await
            .unwrap();
        sock.write_all(b"{\"model_ref\":").await.unwrap();
        let sent = Instant::now();
        let raw = answer(&mut sock).await;
        let (status, body) = parse(&raw);
        assert_eq!(
            (status, body["code"].as_str()),
            (408, Some("REQUEST_TIMEOUT")),
            "{base}: {raw}"
        );
        assert!(
            sent.elapsed() >= Duration::from_millis(500),
            "{base}: answered early"
        );
    }
    assert_eq!(s.get("/health").await.status(), 200);
}

// covers: AUTH-5112
#[tokio::test]
async fn trickled_headers_are_cut_off_by_pool_managerd_too() {
    let s = stack().await;
    let mut sock = connect(&s.pm_base).await;
    sock.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let sent = Instant::now();
    let raw = answer(&mut sock).await;
    assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 408"), "{raw}");
    assert!(sent.elapsed() >= Duration::from_millis(500));
    assert!(sent.elapsed() < Duration::from_secs(10), "never cut off");
}

// covers: AUTH-5111
#[tokio::test]
async fn too_many_or_too_large_headers_are_answered_431_by_both_daemons() {
    let s = stack().await;
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    let large = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    for base in [&s.base, &s.pm_base] {
        for extra in [&many, &large] {
            let mut sock = connect(base).await;
            let req =
                format!("GET /health HTTP/1.1\r\nhost: x\r\n{extra}connection: close\r\n\r\n");
            // The server may answer and close before it read everything: a failed write is fine.
            let _ = sock.write_all(req.as_bytes()).await;
            let raw = answer(&mut sock).await;
            assert!(
                raw.starts_with("HTTP/1.1 431"),
                "{base} {}: {:.80}",
                extra.len(),
                raw
            );
        }
        assert_eq!(
            reqwest::get(format!("{base}/health"))
                .await
                .unwrap()
                .status(),
            200
        );
    }
}

// covers: AUTH-5111
#[tokio::test]
async fn a_body_over_the_limit_is_answered_413_by_pool_managerd() {
    let s = stack().await;
    let r = s
        .http
        .post(format!("{}/v2/pools/p0/drain", s.pm_base))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"deadline_ms\":1,\"pad\":\"{}\"}}",
            "x".repeat(8192)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "PAYLOAD_TOO_LARGE");
}

// covers: ORCH-2102, OAI-7103
#[tokio::test]
async fn malformed_json_and_invalid_utf8_are_typed_400s_on_both_apis() {
    let s = stack().await;
    let bodies: [&[u8]; 3] = [
        b"{\"model_ref\": \"tiny\", \"prompt\": ",
        b"{\"model_ref\": \"tiny\", \"prompt\": \"\xff\xfe\", \"max_tokens\": 4}",
        b"\xc3\x28",
    ];
    let refused = |path: &'static str, body: &'static [u8]| {
        let rb = s
            .http
            .post(format!("{}{path}", s.base))
            .header("content-type", "application/json")
            .body(body.to_vec());
        async move {
            let r = rb.send().await.unwrap();
            assert_eq!(r.status(), 400, "{path}");
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    for body in bodies {
        let v = refused("/v2/tasks", body).await;
        assert_eq!(v["code"], "INVALID_PARAMS", "{v}");
        let v = refused("/v1/chat/completions", body).await;
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!(s.get("/health").await.status(), 200);
}

/// HTTP/1.1 servers may treat a half-close as the client leaving; hyper does (half-close
/// support off), which is what lets a disconnect cancel a queued task at once. The request may
/// or may not have been admitted by then: either it never was, or it runs to its one end.
// covers: AUTH-5113
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_is_treated_as_gone_and_nothing_hangs() {
    let s = stack().await;
    let mut body = task("the", 4);
    body["task_id"] = "half-closed-1".into();
    let body = serde_json::to_string(&body).unwrap();
    let mut sock = connect(&s.base).await;
    sock.write_all(post_head("/v2/tasks", body.len()).as_bytes())
        .await
        .unwrap();
    sock.write_all(body.as_bytes()).await.unwrap();
    sock.shutdown().await.unwrap();
    let closed = answer(&mut sock).await;
    assert!(
        closed.is_empty() || closed.starts_with("HTTP/1.1 202"),
        "{closed}"
    );
    let r = s.get("/v2/tasks/half-closed-1").await;
    if r.status() != 404 {
        assert_eq!(r.status(), 200);
        let st = s.wait_task("half-closed-1", Duration::from_secs(30)).await;
        assert_eq!(
            st.state,
            llorch_contracts::tasks::TaskState::Completed,
            "{st:?}"
        );
    }
    // A whole request on a new connection is served as ever.
    let a = s.submit_ok(task("the", 4)).await;
    let st = s.wait_task(&a.task_id, Duration::from_secs(30)).await;
    assert_eq!(st.state, llorch_contracts::tasks::TaskState::Completed);
}

// covers: AUTH-5112
#[tokio::test]
async fn pool_managerd_serves_at_most_its_connection_cap_and_the_next_when_one_closes() {
    let s = stack().await;
    // Two connections held open mid-headers fill the cap of two.
    let opened = Instant::now();
    let mut held = vec![];
    for _ in 0..2 {
        let mut sock = connect(&s.pm_base).await;
        sock.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        held.push(sock);
    }
    // A third waits until the header timeout (600 ms) cuts the held ones off.
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::get(format!("{}/health", s.pm_base)),
    )
    .await
    .expect("the third connection was never served")
    .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        opened.elapsed() >= Duration::from_millis(500),
        "served beside two held connections: no cap"
    );
    for mut sock in held {
        let raw = answer(&mut sock).await;
        assert!(raw.is_empty() || raw.starts_with("HTTP/1.1 408"), "{raw}");
    }
}
