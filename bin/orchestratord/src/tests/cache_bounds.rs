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

/// Submits a long task with prompt `text`; the pool it went to once dispatched.
async fn placed(h: &Harness, id: &str, text: &str) -> Option<String> {
    h.engine.push(tokens(1000, 10 * MS));
    let task = h.submit(serde_json::json!({
        "task_id": id, "model_ref": "tiny", "prompt": text, "max_tokens": 1000
    }));
    settle().await;
    task.pool_id()
}

// covers: ORCH-2209
#[tokio::test(start_paused = true)]
async fn a_shared_prompt_prefix_goes_to_the_pool_serving_it_until_that_pool_is_too_busy() {
    let h = Harness::start(&["--cache-balance=2"]);
    h.add_pool("a", 4);
    h.add_pool("z", 4);
    assert_eq!(
        placed(&h, "t1", &prompt("first question")).await.as_deref(),
        Some("a")
    );
    // Least busy is z; a holds the shared prefix and is one request busier: a takes it.
    assert_eq!(
        placed(&h, "t2", &prompt("second question"))
            .await
            .as_deref(),
        Some("a")
    );
    assert_eq!(
        placed(&h, "t3", &prompt("third question")).await.as_deref(),
        Some("a"),
        "3 in flight vs 0 is not yet beyond 2"
    );
    // Now a has 3 in flight and z none: beyond the balance, z takes it.
    assert_eq!(
        placed(&h, "t4", &prompt("fourth question"))
            .await
            .as_deref(),
        Some("z")
    );
    // An unrelated prompt goes to the least busy pool.
    assert_eq!(
        placed(&h, "t5", &"unrelated text, ".repeat(20))
            .await
            .as_deref(),
        Some("z")
    );
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
    assert_eq!(
        placed(&h, "t1", &prompt("first question")).await.as_deref(),
        Some("a")
    );
    assert_eq!(
        placed(&h, "t2", &prompt("second question"))
            .await
            .as_deref(),
        Some("z")
    );
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

/// Submits `text` on an engine that answers one token, then reports `cached` / `evaluated`
/// prompt tokens, and waits for the task's end.
/// `text`'s block names in the scope of the harness's own key (`test`).
fn test_chain(text: &str) -> Vec<u64> {
    llorch_core::scoped_prefix_chain(
        llorch_core::prefix_scope("test"),
        text,
        crate::tasks::PREFIX_BLOCKS_MAX,
    )
}

async fn run_reporting(h: &Harness, id: &str, text: &str, cached: u32, evaluated: u32) {
    h.engine.push(Script::Stream(vec![
        Step::Token(MS, "x"),
        Step::StopCached(MS, cached, evaluated),
    ]));
    let t = h.submit(serde_json::json!({
        "task_id": id, "model_ref": "tiny", "prompt": text, "max_tokens": 5
    }));
    let _ = outcome(&t).await;
}

// covers: ORCH-2216
#[tokio::test(start_paused = true)]
async fn a_prompt_is_pinned_to_the_idle_engine_slot_that_served_its_start() {
    let h = Harness::start(&[]);
    h.add_pool("a", 2);
    let system_a = "You are a pirate. ".repeat(20);
    let system_b = "You are a lawyer. ".repeat(20);
    run_reporting(&h, "t1", &format!("{system_a} hello"), 0, 90).await;
    run_reporting(&h, "t2", &format!("{system_b} hello"), 0, 90).await;
    // The least recently used slot would be 0; slot 1 holds this prompt's start.
    run_reporting(&h, "t3", &format!("{system_b} hello, and more"), 80, 10).await;
    // Two at once: both slots, the one holding the start for the task that shares it.
    h.engine.push(tokens(100, 10 * MS));
    h.engine.push(tokens(100, 10 * MS));
    let _busy = h.submit(serde_json::json!({
        "task_id": "t4", "model_ref": "tiny", "prompt": format!("{system_a} again"), "max_tokens": 100
    }));
    let _other = h.submit(serde_json::json!({
        "task_id": "t5", "model_ref": "tiny", "prompt": format!("{system_a} once more"), "max_tokens": 100
    }));
    settle().await;
    assert_eq!(
        h.engine.slots(),
        [Some(0), Some(1), Some(1), Some(0), Some(1)],
        "t5 shares t4's start but slot 0 is busy: the free slot"
    );
    let m = &h.orch.metrics.engine_prompt_tokens;
    assert_eq!(m.with_label_values(&["cached"]).get(), 80);
    assert_eq!(m.with_label_values(&["evaluated"]).get(), 190);
}

// covers: ORCH-2216
#[tokio::test(start_paused = true)]
async fn without_cache_aware_placement_the_engine_picks_the_slot() {
    let h = Harness::start(&["--cache-aware=false"]);
    h.add_pool("a", 2);
    run_reporting(&h, "t1", &"You are a pirate. ".repeat(20), 0, 90).await;
    assert_eq!(h.engine.slots(), [None]);
}

// covers: ORCH-2216
#[tokio::test(start_paused = true)]
async fn an_engine_that_took_nothing_from_a_cache_thought_warm_is_taken_as_cold() {
    let h = Harness::start(&[]);
    h.add_pool("a", 2);
    let pirate = format!("{} hello", "You are a pirate. ".repeat(20));
    let lawyer = format!("{} hello", "You are a lawyer. ".repeat(20));
    run_reporting(&h, "t1", &pirate, 0, 90).await;
    run_reporting(&h, "t2", &lawyer, 0, 90).await;
    let chain = |text: &str| test_chain(text);
    assert!(h.orch.prefix_index.lock().matched("a", &chain(&pirate)) > 0);
    // Slot 1 held the lawyer's start, yet the engine evaluated the whole prompt: it lost its
    // caches (a restart between two probes, say). What the pool was thought to hold goes,
    // but this prompt, which the engine holds now.
    let longer = format!("{lawyer}, and more");
    run_reporting(&h, "t3", &longer, 0, 100).await;
    assert_eq!(h.orch.prefix_index.lock().matched("a", &chain(&pirate)), 0);
    assert_eq!(h.orch.pools.slot_matched("a", &chain(&pirate)), 0);
    assert_eq!(
        h.orch.prefix_index.lock().matched("a", &chain(&longer)) as usize,
        chain(&longer).len()
    );
    assert_eq!(
        h.orch.pools.slot_matched("a", &chain(&longer)),
        chain(&longer).len()
    );
}

// covers: ORCH-2216
#[tokio::test(start_paused = true)]
async fn a_pool_removed_and_back_under_its_id_has_no_slot_prompts_of_the_one_before() {
    let h = Harness::start(&[]);
    h.add_pool("a", 2);
    let pirate = format!("{} hello", "You are a pirate. ".repeat(20));
    run_reporting(&h, "t1", &pirate, 0, 90).await;
    let chain = test_chain(&pirate);
    assert_eq!(h.orch.pools.slot_matched("a", &chain), chain.len());
    h.orch.pools.remove("a");
    h.add_pool("a", 2);
    assert_eq!(h.orch.pools.slot_matched("a", &chain), 0);
}

// covers: ORCH-2217
#[tokio::test(start_paused = true)]
async fn a_keys_prompt_finds_no_prefix_of_another_keys_unless_the_scope_is_global() {
    for (flags, shared) in [(&[][..], false), (&["--cache-scope=global"][..], true)] {
        let h = Harness::start(flags);
        h.add_pool("a", 2);
        h.add_pool("b", 2);
        let system = "You are a pirate. ".repeat(20);
        let run_as = |key: &'static str, id: &'static str| {
            h.engine.push(tokens(1, MS));
            let req: llorch_contracts::tasks::TaskRequest = serde_json::from_value(serde_json::json!({
                "task_id": id, "model_ref": "tiny", "prompt": format!("{system} {id}"), "max_tokens": 5
            }))
            .unwrap();
            let owner = auth_min::Principal::new(key, &[auth_min::Role::Client]);
            h.orch.admit_with(req, None, None, &owner).unwrap();
            let task = h.task(id).unwrap();
            async move {
                outcome(&task).await;
                task.prefix_chain.clone()
            }
        };
        let alice = run_as("alice", "a1").await;
        let bob = run_as("bob", "b1").await;
        // Bob's prompt starts like alice's: in his own scope no pool served a block of it, so
        // his placement is a miss; in the global scope, a hit.
        assert_eq!(alice == bob, shared);
        let placements = |outcome: &str| {
            h.orch
                .metrics
                .prefix_placements
                .with_label_values(&[outcome])
                .get()
        };
        assert_eq!(
            (placements("hit"), placements("miss")),
            if shared { (1, 1) } else { (0, 2) },
            "global scope: {shared}"
        );
    }
}
