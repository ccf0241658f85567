//! The engine proxy's time bounds, exact on paused time: an engine that never answers is cut
//! at the idle timeout (504 `DECODE_TIMEOUT`), counted as `timeout`.

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use llorch_contracts::{PoolState, PoolStatus, ProvisioningMode};
use tower::ServiceExt;

use super::kit::*;

/// Pool `p`, ready, its engine at `url`.
fn ready_pool(url: String) -> PoolStatus {
    PoolStatus {
        pool_id: "p".into(),
        node_id: "test-node".into(),
        state: PoolState::Ready,
        live: true,
        ready: true,
        draining: false,
        slots_total: 2,
        slots_free: 2,
        engine: "llamacpp".into(),
        engine_version: None,
        model_id: "tiny".into(),
        device_mask: None,
        ctx_max: Some(512),
        vram_total_bytes: None,
        vram_free_bytes: None,
        restart_count: 0,
        last_error: None,
        provisioning_mode: ProvisioningMode::Managed,
        url: Some(url),
        embeddings: false,
    }
}

// covers: CLOUD-4115
#[tokio::test(start_paused = true)]
async fn an_engine_that_never_answers_is_cut_at_the_idle_timeout_with_504() {
    let b = build(&["--proxy-idle-timeout-ms=1500"]);
    // Accepts connections and reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    b.shared.registry.write().upsert(ready_pool(url));
    let app = crate::api::router(b.shared.clone());
    let req = Request::post("/v2/pools/p/engine/completion")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt":"x","n_predict":4}"#))
        .unwrap();
    let sent = tokio::time::Instant::now();
    let r = app.oneshot(req).await.unwrap();
    assert_eq!(sent.elapsed(), Duration::from_millis(1500));
    assert_eq!(r.status(), 504);
    let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["code"], "DECODE_TIMEOUT", "{v}");
    assert_eq!(
        b.shared
            .metrics
            .proxy_requests
            .with_label_values(&["p", "timeout"])
            .get(),
        1
    );
}
