//! `determinism: strict` on the real engine: the same strict task twice gives the same tokens.

use crate::harness::*;

fn strict(seed: Option<u64>) -> serde_json::Value {
    serde_json::json!({
        "model_ref": "tiny", "prompt": "the river and the stone", "max_tokens": 40,
        "temperature": 0.9, "top_k": 40, "seed": seed, "determinism": "strict"
    })
}

fn tokens_of(frames: &[llorch_client::SseFrame]) -> Vec<String> {
    frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("token"))
        .map(|f| data(f)["t"].as_str().unwrap().to_string())
        .collect()
}

// covers: ORCH-2211
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_strict_task_twice_streams_the_same_tokens_on_a_single_slot_pool() {
    let toml = format!(
        "{}{}",
        pool_toml("wide", 2, 2048),
        pool_toml("single", 1, 1024)
    );
    let s = Stack::start(StackOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    s.wait_pools_ready(2).await;
    let r = s.submit(strict(None)).await;
    assert_eq!(r.status(), 400, "strict without a seed was accepted");
    let mut runs = Vec::new();
    for _ in 0..2 {
        let id = s.submit_ok(strict(Some(42))).await.task_id;
        let frames = s.events(&id).await;
        assert_eq!(names(&frames).last(), Some(&"end"), "{frames:?}");
        assert_eq!(s.status(&id).await.pool_id.as_deref(), Some("single"));
        runs.push(tokens_of(&frames));
    }
    assert!(!runs[0].is_empty());
    assert_eq!(
        runs[0], runs[1],
        "a strict task did not reproduce its tokens"
    );
}
