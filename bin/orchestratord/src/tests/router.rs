//! The HTTP surface in process (tower `oneshot`, no socket): unknown routes, wrong methods and
//! the envelope they answer with; an event stream whose last subscriber leaves.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::kit::*;

const MS: std::time::Duration = std::time::Duration::from_millis(1);
const TOKEN: &str = "inprocess-test-token-0123";

async fn call(h: &Harness, method: &str, path: &str) -> (StatusCode, serde_json::Value) {
    let app = crate::api::router(h.orch.clone());
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

/// Opens the task's event stream through the router and reads it until a token came: the
/// open body, and what was read.
async fn follow_until_a_token(h: &Harness, id: &str) -> (axum::body::BodyDataStream, String) {
    use futures_util::StreamExt;
    let req = Request::builder()
        .uri(format!("/v2/tasks/{id}/events"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let app = crate::api::router(h.orch.clone());
    let mut body = app
        .oneshot(req)
        .await
        .unwrap()
        .into_body()
        .into_data_stream();
    let mut seen = String::new();
    while !seen.contains("event: token") {
        let chunk = body.next().await.unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    (body, seen)
}

// covers: ORCH-2103
#[tokio::test]
async fn an_unknown_route_answers_404_not_found_in_the_envelope() {
    let h = Harness::start(&[]);
    let (status, body) = call(&h, "GET", "/v2/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "NOT_FOUND");
    assert_eq!(body["retriable"], false);
}

// covers: ORCH-2103
#[tokio::test]
async fn a_wrong_method_answers_405_method_not_allowed_in_the_envelope() {
    let h = Harness::start(&[]);
    for (method, path) in [
        ("GET", "/v2/tasks"),
        ("DELETE", "/v2/pools"),
        ("POST", "/health"),
        ("PUT", "/v2/tasks/x/cancel"),
    ] {
        let (status, body) = call(&h, method, path).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert_eq!(
            body["code"], "METHOD_NOT_ALLOWED",
            "{method} {path}: {body}"
        );
    }
}

// covers: ORCH-2309
#[tokio::test(start_paused = true)]
async fn the_last_subscriber_leaving_cancels_a_running_task_and_frees_its_slot_after_the_grace() {
    let h = Harness::start(&["--disconnect-grace-ms=2000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(1000, 10 * MS));
    let task = h.submit(task(1000));
    let (body, _) = follow_until_a_token(&h, &task.id).await;
    // A token has streamed: go away.
    let left_at = tokio::time::Instant::now();
    drop(body);
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at - left_at, 2000 * MS);
    assert_eq!(h.engine.open_streams(), 0, "engine request not aborted");
    assert_eq!(
        h.orch.pools.get("a").unwrap().in_flight,
        0,
        "slot not freed"
    );
}

// covers: ORCH-2305
#[tokio::test(start_paused = true)]
async fn a_replay_of_frames_the_log_cap_dropped_answers_410_replay_unavailable() {
    let h = Harness::start(&["--task-log-max-bytes=4096"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(200, MS));
    let task = h.submit(task(200));
    let (code, _) = outcome(&task).await;
    assert_eq!(code, "end");
    let first_kept = match task.frames_from(0) {
        Err(gap) => gap.first_kept,
        Ok(_) => panic!("200 token frames fit in 4096 bytes"),
    };
    let app = crate::api::router(h.orch.clone());
    let get = |last: u64| {
        Request::builder()
            .uri(format!("/v2/tasks/{}/events", task.id))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("last-event-id", last.to_string())
            .body(Body::empty())
            .unwrap()
    };
    let resp = app.clone().oneshot(get(first_kept - 2)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::GONE);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["code"], "REPLAY_UNAVAILABLE");
    assert_eq!(body["retriable"], false);
    let hint = format!("Last-Event-ID {}", first_kept - 1);
    assert!(body["message"].as_str().unwrap().contains(&hint), "{body}");
    // From the id it names, the rest replays up to the end.
    let resp = app.oneshot(get(first_kept - 1)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    assert!(
        text.starts_with(&format!("id: {first_kept}\n")),
        "{text:.200}"
    );
    assert!(text.contains("event: end"), "{text:.200}");
}

// covers: ORCH-2305
#[tokio::test(start_paused = true)]
async fn a_subscriber_that_falls_behind_the_log_cap_gets_replay_unavailable_and_the_task_goes_on() {
    use futures_util::StreamExt;
    let h = Harness::start(&["--task-log-max-bytes=4096", "--disconnect-grace-ms=60000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(400, 10 * MS));
    let task = h.submit(task(400));
    let (mut body, mut seen) = follow_until_a_token(&h, &task.id).await;
    // Not reading while 200 tokens (far more than 4 KiB of log) stream.
    tokio::time::sleep(2000 * MS).await;
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let last = seen.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: replay_unavailable\n"), "{last}");
    assert!(
        !last.contains("id:"),
        "the gap notice is not a task frame: {last}"
    );
    assert!(last.contains("REPLAY_UNAVAILABLE"), "{last}");
    assert!(!task.is_terminal(), "a slow reader ended the task");
    let (code, _) = outcome(&task).await;
    assert_eq!(code, "end");
}
