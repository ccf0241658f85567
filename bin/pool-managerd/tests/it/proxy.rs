use std::time::Duration;

use futures_util::StreamExt;

use crate::harness::*;

/// Reads SSE `data:` payloads from a streaming completion response.
fn data_lines(buf: &mut String) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    while let Some(pos) = buf.find("\n\n") {
        let frame: String = buf.drain(..pos + 2).collect();
        for line in frame.lines() {
            if let Some(json) = line.strip_prefix("data: ") {
                if let Ok(v) = serde_json::from_str(json) {
                    out.push(v);
                }
            }
        }
    }
    out
}

async fn busy_slots(engine: &reqwest::Client, engine_url: &str) -> usize {
    let slots: Vec<serde_json::Value> = engine
        .get(format!("{engine_url}/slots"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    slots.iter().filter(|s| s["is_processing"] == true).count()
}

// covers: CLOUD-4113
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completion_through_proxy_arrives_while_engine_still_generating() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("stream", &tiny_model(), 1, 4096),
        ..Default::default()
    })
    .await;
    let status = d.wait_ready("stream").await;
    let engine_url = status.url.unwrap();
    let engine = d.engine_client("stream");
    let resp = d
        .http
        .post(format!("{}/v2/pools/stream/engine/completion", d.base))
        .json(&serde_json::json!({
            "prompt": "the river", "n_predict": 3000, "stream": true
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut chunks = Vec::new();
    let mut busy_at_first_token = None;
    while let Some(piece) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&piece.unwrap()));
        for v in data_lines(&mut buf) {
            if busy_at_first_token.is_none() {
                // The first token is here: the engine must still be generating the rest.
                busy_at_first_token = Some(busy_slots(&engine, &engine_url).await);
            }
            chunks.push(v);
        }
    }
    assert_eq!(
        busy_at_first_token,
        Some(1),
        "first token arrived only after generation ended"
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["stop"], true);
    assert_eq!(last["tokens_predicted"], 3000);
    assert!(
        chunks.len() > 100,
        "only {} chunks: the answer was buffered",
        chunks.len()
    );
}

// covers: CLOUD-4113
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_aborts_the_upstream_generation() {
    let d = Daemon::start(DaemonOptions {
        // The slow model: finishing 2000 tokens takes seconds, an abort shows within one.
        pools_toml: pool_toml("abort", &slow_model(), 1, 4096),
        ..Default::default()
    })
    .await;
    let engine_url = d.wait_ready("abort").await.url.unwrap();
    let engine = d.engine_client("abort");
    let resp = d
        .http
        .post(format!("{}/v2/pools/abort/engine/completion", d.base))
        .json(&serde_json::json!({
            "prompt": "the", "n_predict": 2000, "stream": true
        }))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(busy_slots(&engine, &engine_url).await, 1);
    drop(body);
    wait_for(
        "engine slot to go idle after client disconnect",
        Duration::from_secs(1),
        || {
            let url = engine_url.clone();
            let engine = engine.clone();
            async move { (busy_slots(&engine, &url).await == 0).then_some(()) }
        },
    )
    .await;
}

// covers: CLOUD-4113
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_unknown_pool_is_404_envelope() {
    let d = Daemon::start(DaemonOptions::default()).await;
    let r = d
        .http
        .post(format!("{}/v2/pools/nope/engine/completion", d.base))
        .json(&serde_json::json!({"prompt": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.headers().contains_key("x-correlation-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "NOT_FOUND");
}

// covers: CLOUD-4114
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_passes_only_the_engine_routes_and_fields_orchestratord_uses() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("locked", &tiny_model(), 1, 1024),
        ..Default::default()
    })
    .await;
    d.wait_ready("locked").await;
    let at = |path: &str| format!("{}/v2/pools/locked/engine/{path}", d.base);
    // Slot save/erase, props, metrics, a grammar, an unbounded generation: refused, in the
    // envelope, before the engine sees them.
    let refused = [
        d.http.get(at("slots")),
        d.http
            .post(at("slots/0?action=erase"))
            .json(&serde_json::json!({})),
        d.http.get(at("props")),
        d.http.get(at("metrics")),
        d.http
            .post(at("completion"))
            .json(&serde_json::json!({"prompt": "x", "n_predict": 4, "grammar": "root ::= \"x\""})),
    ];
    for rb in refused {
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], "FORBIDDEN", "{body}");
    }
    let unbounded = d
        .http
        .post(at("completion"))
        .json(&serde_json::json!({"prompt": "x", "n_predict": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unbounded.status(), 400);
    // What orchestratord sends still works, the tokenizer included.
    let tokens: serde_json::Value = d
        .http
        .post(at("tokenize"))
        .json(&serde_json::json!({"content": "the river", "add_special": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!tokens["tokens"].as_array().unwrap().is_empty());
    let done: serde_json::Value = d
        .http
        .post(at("completion"))
        .json(&serde_json::json!({"prompt": "the", "n_predict": 4, "cache_prompt": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["tokens_predicted"], 4);
}
