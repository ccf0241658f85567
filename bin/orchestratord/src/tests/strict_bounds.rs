//! `determinism: strict` runs only where llama.cpp reproduces output: single-slot pools of one
//! engine build. Anything else is refused, never run best-effort.

use llorch_contracts::tasks::TaskRequest;

use super::kit::*;
use crate::pools::PoolEntry;

fn strict() -> TaskRequest {
    serde_json::from_value(serde_json::json!({
        "model_ref": "tiny", "prompt": "p", "max_tokens": 3,
        "determinism": "strict", "seed": 7
    }))
    .unwrap()
}

fn single_slot(id: &str, build: &str) -> PoolEntry {
    PoolEntry {
        engine_version: Some(build.into()),
        ..pool(id, 1)
    }
}

// covers: ORCH-2115
#[tokio::test(start_paused = true)]
async fn a_strict_task_is_refused_when_its_single_slot_pools_run_different_engine_builds() {
    let h = Harness::start(&[]);
    h.orch.pools.upsert(single_slot("a", "b5000"));
    h.orch.pools.upsert(single_slot("b", "b5001"));
    let err = h.orch.admit(strict()).unwrap_err();
    assert_eq!(err.0.code, llorch_contracts::ErrorCode::InvalidParams);
    assert!(
        err.0.message.contains("a on b5000; b on b5001"),
        "{}",
        err.0.message
    );
}

// covers: ORCH-2211
#[tokio::test(start_paused = true)]
async fn a_strict_task_runs_when_its_single_slot_pools_share_one_build_and_never_on_a_batching_pool(
) {
    let h = Harness::start(&[]);
    h.orch.pools.upsert(single_slot("b", "b5000"));
    h.orch.pools.upsert(single_slot("c", "b5000"));
    // More free slots, an older build, two slots: never where a strict task runs.
    h.orch.pools.upsert(PoolEntry {
        engine_version: Some("b4000".into()),
        ..pool("a", 4)
    });
    h.engine
        .push(tokens(3, std::time::Duration::from_millis(1)));
    let id = h.orch.admit(strict()).unwrap().task_id;
    let task = h.task(&id).unwrap();
    assert_eq!(outcome(&task).await.0, "end");
    assert_eq!(task.pool_id().as_deref(), Some("b"));
}
