//! Sessions, retention of finished tasks and start predictions, on the real HOME stack.

use std::time::Duration;

use crate::admission::occupy_the_slot;
use crate::harness::*;

// covers: ORCH-2207, ORCH-2208
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_affinity_and_report_turns_until_deleted() {
    let toml = format!("{}{}", pool_toml("a", 2, 32768), pool_toml("b", 2, 32768));
    let s = Stack::start(StackOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    s.wait_pools_ready(2).await;
    let turn = |k: u32| serde_json::json!({"model_ref": "tiny", "prompt": format!("turn {k}"), "max_tokens": 4, "session_id": "chat-1"});
    let first = s.submit_ok(turn(0)).await.task_id;
    let home = s
        .wait_task(&first, Duration::from_secs(10))
        .await
        .pool_id
        .unwrap();
    let other = if home == "a" { "b" } else { "a" };
    // Make the session's pool the less attractive one: a long task pinned there takes a slot,
    // so the other pool has more free slots.
    let pin = serde_json::json!({"model_ref": "tiny", "prompt": "hog", "max_tokens": 8000,
        "placement": {"mode": "pin", "pin_pool_id": home}});
    let hog = s.submit_ok(pin).await.task_id;
    wait_for("hog running", Duration::from_secs(10), || async {
        s.status(&hog).await.started_at_ms.map(|_| ())
    })
    .await;
    let mut pools = vec![home.clone()];
    for k in 1..3 {
        let id = s.submit_ok(turn(k)).await.task_id;
        pools.push(
            s.wait_task(&id, Duration::from_secs(10))
                .await
                .pool_id
                .unwrap(),
        );
    }
    assert!(
        pools.iter().all(|p| p == &home),
        "session moved between pools: {pools:?}"
    );
    // Control: without a session the same task goes to the pool with more free slots.
    let free = s.submit_ok(task("no session", 4)).await.task_id;
    assert_eq!(
        s.wait_task(&free, Duration::from_secs(10))
            .await
            .pool_id
            .as_deref(),
        Some(other)
    );
    s.cancel(&hog).await;
    let v: serde_json::Value = s
        .http
        .get(format!("{}/v2/sessions/chat-1", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["turns"], 3);
    assert_eq!(v["last_pool_id"], home.as_str());
    assert_eq!(v["kv_warmth"], true);
    assert!(v["ttl_ms_remaining"].as_u64().unwrap() > 0);
    let del = s
        .http
        .delete(format!("{}/v2/sessions/chat-1", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 204);
    let gone = s
        .http
        .get(format!("{}/v2/sessions/chat-1", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    let caps: serde_json::Value = s
        .http
        .get(format!("{}/v2/meta/capabilities", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(caps["models"][0]["model_id"], "tiny");
    assert_eq!(caps["models"][0]["pools"], 2);
    assert_eq!(caps["models"][0]["slots_total"], 4);
}

// covers: ORCH-2414
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_beyond_the_retention_count_are_forgotten_oldest_first() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![("ORCHD_TASK_RETENTION_MAX", "2".into())],
        ..Default::default()
    })
    .await;
    let mut ids = Vec::new();
    for k in 0..4 {
        let id = s.submit_ok(task(&format!("r{k}"), 2)).await.task_id;
        s.wait_task(&id, Duration::from_secs(10)).await;
        ids.push(id);
    }
    // The purge runs every 5 s.
    wait_for(
        "oldest finished tasks forgotten",
        Duration::from_secs(12),
        || async {
            let r = s
                .http
                .get(format!("{}/v2/tasks/{}", s.base, ids[1]))
                .send()
                .await
                .ok()?;
            (r.status() == 404).then_some(())
        },
    )
    .await;
    assert_eq!(
        s.http
            .get(format!("{}/v2/tasks/{}", s.base, ids[0]))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    for id in &ids[2..] {
        assert_eq!(
            s.status(id).await.task_id,
            *id,
            "newest finished tasks are kept"
        );
    }
}

// covers: ORCH-2118
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predicted_start_follows_measured_throughput() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    // Before anything ran there is no measurement: no prediction.
    let long = occupy_the_slot(&s).await;
    let blind = s.submit_ok(task("blind", 500)).await;
    assert_eq!(blind.predicted_start_ms, 0);
    s.cancel(&long).await;
    s.cancel(&blind.task_id).await;
    // One measured task, then a queue behind a busy slot: the prediction grows with the work ahead.
    let measured = s.submit_ok(task("measure", 500)).await.task_id;
    s.wait_task(&measured, Duration::from_secs(10)).await;
    let long = occupy_the_slot(&s).await;
    let first = s.submit_ok(task("first", 2000)).await;
    let second = s.submit_ok(task("second", 2000)).await;
    assert!(first.predicted_start_ms > 0, "{first:?}");
    assert!(
        second.predicted_start_ms > first.predicted_start_ms,
        "{first:?} {second:?}"
    );
    s.cancel(&long).await;
}
