//! Cache-aware placement through the real dispatcher: a task whose prompt starts like one a
//! pool is serving goes to that pool while it is at most `ORCHD_CACHE_BALANCE` requests busier
//! than the least busy one; beyond, or with the feature off, the least busy pool takes it.

use std::time::Duration;

use super::kit::*;

const MS: Duration = Duration::from_millis(1);

/// A prompt of a shared 4-block system part and its own tail.
fn prompt(tail: &str) -> String {
    format!("{}{tail}", "You are a helpful assistant. ".repeat(10))
}

fn submit_prompt(h: &Harness, id: &str, text: &str) -> std::sync::Arc<crate::tasks::Task> {
    h.engine.push(tokens(1000, 10 * MS));
    h.submit(serde_json::json!({
        "task_id": id, "model_ref": "tiny", "prompt": text, "max_tokens": 1000
    }))
}

// covers: ORCH-2209
#[tokio::test(start_paused = true)]
async fn a_shared_prompt_prefix_goes_to_the_pool_serving_it_until_that_pool_is_too_busy() {
    let h = Harness::start(&["--cache-balance=2"]);
    h.add_pool("a", 4);
    h.add_pool("z", 4);
    let first = submit_prompt(&h, "t1", &prompt("first question"));
    settle().await;
    assert_eq!(first.pool_id().as_deref(), Some("a"));
    // Least busy is z; a holds the shared prefix and is one request busier: a takes it.
    let second = submit_prompt(&h, "t2", &prompt("second question"));
    settle().await;
    assert_eq!(second.pool_id().as_deref(), Some("a"));
    let third = submit_prompt(&h, "t3", &prompt("third question"));
    settle().await;
    assert_eq!(
        third.pool_id().as_deref(),
        Some("a"),
        "3 in flight vs 0 is not yet beyond 2"
    );
    // Now a has 3 in flight and z none: beyond the balance, z takes it.
    let fourth = submit_prompt(&h, "t4", &prompt("fourth question"));
    settle().await;
    assert_eq!(fourth.pool_id().as_deref(), Some("z"));
    // An unrelated prompt goes to the least busy pool.
    let other = submit_prompt(&h, "t5", &"unrelated text, ".repeat(20));
    settle().await;
    assert_eq!(other.pool_id().as_deref(), Some("z"));
    let m = &h.orch.metrics.prefix_placements;
    assert_eq!(m.with_label_values(&["hit"]).get(), 2);
    assert_eq!(m.with_label_values(&["miss"]).get(), 3);
}

// covers: ORCH-2209
#[tokio::test(start_paused = true)]
async fn with_cache_aware_placement_off_the_least_busy_pool_takes_every_task() {
    let h = Harness::start(&["--cache-aware=false"]);
    h.add_pool("a", 4);
    h.add_pool("z", 4);
    let first = submit_prompt(&h, "t1", &prompt("first question"));
    settle().await;
    assert_eq!(first.pool_id().as_deref(), Some("a"));
    let second = submit_prompt(&h, "t2", &prompt("second question"));
    settle().await;
    assert_eq!(second.pool_id().as_deref(), Some("z"));
    let m = &h.orch.metrics;
    for (counter, label) in [
        (&m.prefix_placements, "miss"),
        (&m.prefix_placements, "hit"),
        (&m.prefix_blocks, "prompt"),
        (&m.prefix_blocks, "matched"),
    ] {
        assert_eq!(
            counter.with_label_values(&[label]).get(),
            0,
            "{label} counted when off"
        );
    }
}
