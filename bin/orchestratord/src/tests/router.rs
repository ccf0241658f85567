//! The HTTP surface in process (tower `oneshot`, no socket): unknown routes, wrong methods and
//! the envelope they answer with.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::kit::*;

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

#[tokio::test]
async fn an_unknown_route_answers_404_not_found_in_the_envelope() {
    let h = Harness::start(&[]);
    let (status, body) = call(&h, "GET", "/v2/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "NOT_FOUND");
    assert_eq!(body["retriable"], false);
}

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
