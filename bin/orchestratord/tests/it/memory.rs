//! Memory stays bounded by what is running, not by what was submitted: finished tasks keep no
//! prompt.

use std::time::Duration;

use crate::harness::*;

// covers: ORCH-2415
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submitting_and_cancelling_large_prompts_does_not_grow_memory() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 16384),
        ..Default::default()
    })
    .await;
    let pid = s.orch.id().unwrap();
    // The slot busy: every probe task is admitted, queued and cancelled there (the engine
    // never spends time on a 0.9 MB prompt).
    let busy = crate::admission::occupy_the_slot(&s).await;
    let prompt = "p".repeat(900_000);
    let round = |n: usize, tag: &'static str| {
        let (s, prompt) = (&s, &prompt);
        async move {
            for k in 0..n {
                let body = serde_json::json!({
                    "task_id": format!("{tag}-{k}"), "model_ref": "tiny",
                    "prompt": prompt, "max_tokens": 4
                });
                let id = s.submit_ok(body).await.task_id;
                assert_eq!(s.cancel(&id).await, 204);
            }
        }
    };
    // Warm-up: allocator arenas and buffers reach their working size.
    round(10, "warm").await;
    let before = rss_kib(pid).unwrap();
    round(400, "probe").await;
    // 400 × 0.9 MB went through (the probe that once grew it by 353 MB); the finished tasks are retained (status, replay) but hold
    // none of it.
    let grown_mib = rss_kib(pid).unwrap().saturating_sub(before) / 1024;
    println!("submit-and-cancel probe: 400 × 0.9 MB, RSS grew by {grown_mib} MiB");
    assert!(grown_mib < 50, "orchestratord grew by {grown_mib} MiB");
    let st = s.wait_task("probe-399", Duration::from_secs(5)).await;
    assert_eq!(st.state, llorch_contracts::tasks::TaskState::Cancelled);
    s.cancel(&busy).await;
}
