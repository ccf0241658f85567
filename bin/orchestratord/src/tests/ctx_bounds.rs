//! A prompt's length against the pools' per-slot contexts: a prompt that cannot fit any pool of
//! its model is refused at admission with the largest context there is; one that fits only some
//! pools runs only there; a prompt short enough is never sent to a tokenizer.

use llorch_contracts::tasks::TaskRequest;

use super::kit::*;
use crate::pools::PoolEntry;

fn words(n: usize) -> String {
    vec!["word"; n].join(" ")
}

fn req(prompt: String, max_tokens: u32) -> TaskRequest {
    TaskRequest::new("tiny", prompt, max_tokens)
}

/// Pools `a-small` (64 tokens per slot) and `b-large` (256): by id alone `a-small` comes first.
fn harness() -> Harness {
    let h = Harness::start(&[]);
    h.orch.pools.upsert(PoolEntry {
        ctx_max: Some(64),
        ..pool("a-small", 1)
    });
    h.orch.pools.upsert(PoolEntry {
        ctx_max: Some(256),
        ..pool("b-large", 1)
    });
    h
}

// covers: ORCH-2114
#[tokio::test(start_paused = true)]
async fn a_prompt_short_enough_for_every_pool_is_never_counted() {
    let h = harness();
    // 30 bytes + 2 + 8 ≤ 64: it fits whatever its tokens.
    let short = req("a few words, thirty bytes long".into(), 8);
    assert_eq!(h.orch.count_prompt(&short).await.unwrap(), None);
    assert!(h.engine.tokenized().is_empty());
}

// covers: ORCH-2114
#[tokio::test(start_paused = true)]
async fn a_prompt_too_long_for_every_pool_is_refused_with_the_largest_per_slot_context() {
    let h = harness();
    // 300 words: 301 tokens (the scripted tokenizer) + 8 > 256.
    let err = h.orch.count_prompt(&req(words(300), 8)).await.unwrap_err();
    assert_eq!(err.0.code, llorch_contracts::ErrorCode::InvalidParams);
    assert!(
        err.0.message.contains("the prompt is 301 tokens"),
        "{}",
        err.0.message
    );
    assert!(err.0.message.contains("is 256"), "{}", err.0.message);
    assert_eq!(h.engine.tokenized().len(), 1);
}

// covers: ORCH-2201
#[tokio::test(start_paused = true)]
async fn a_prompt_that_fits_only_the_larger_pool_runs_there() {
    let h = harness();
    // 100 words: 101 tokens + 8 = 109: over 64, under 256.
    let long = req(words(100), 8);
    let counted = h.orch.count_prompt(&long).await.unwrap();
    assert_eq!(counted, Some(101));
    h.engine
        .push(tokens(8, std::time::Duration::from_millis(1)));
    let owner = auth_min::Principal::everything("test");
    let id = h
        .orch
        .admit_with(long, None, counted, &owner)
        .unwrap()
        .task_id;
    let task = h.task(&id).unwrap();
    assert_eq!(task.needed_ctx(), Some(109));
    assert_eq!(outcome(&task).await.0, "end");
    assert_eq!(task.pool_id().as_deref(), Some("b-large"));
}
