//! Daemons stopped under load: pool-managerd SIGKILLed mid-stream and restarted, pool-managerd
//! SIGTERMed with a task running, orchestratord SIGTERMed with an OpenAI stream in flight.
//! Each admitted task ends exactly once; no engine outlives its pool-managerd.

use std::time::Duration;

use llorch_contracts::tasks::TaskState;

use crate::harness::*;

fn terminal_count(frames: &[llorch_client::SseFrame]) -> usize {
    names(frames)
        .iter()
        .filter(|n| **n == "end" || **n == "error")
        .count()
}

// covers: ORCH-2213
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_managerd_killed_mid_stream_and_restarted_ends_the_stream_once_and_serves_the_tasks_that_waited(
) {
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        // The pool's model stays admissible while its engine is gone: new work queues.
        orch_env: vec![("ORCHD_MODEL_MEMORY_MS", "60000".into())],
        ..Default::default()
    })
    .await;
    let engine_pid = s.handoff("p0").pid.unwrap();
    let running = s.submit_ok(task("the", 4000)).await.task_id;
    let mut ev = s.open_events(&running, None).await;
    ev.frame_named("token").await.unwrap();
    s.kill_and_restart_pm().await;
    // The engine dies with its pool-managerd (parent-death signal, delivered asynchronously).
    wait_for("the old engine gone", Duration::from_secs(5), || async {
        (!pid_alive(engine_pid)).then_some(())
    })
    .await;
    let mut frames = vec![];
    while let Some(f) = ev.frame().await {
        frames.push(f);
    }
    assert_eq!(terminal_count(&frames), 1, "{:?}", names(&frames));
    let last = frames.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(data(last)["code"], "WORKER_RESET");
    // Submitted while the new pool-managerd brings the engine back: it waits, then runs.
    let waited = s.submit_ok(task("the", 8)).await.task_id;
    let st = s.wait_task(&waited, Duration::from_secs(60)).await;
    assert_eq!(st.state, TaskState::Completed, "{st:?}");
    assert_ne!(s.handoff("p0").pid.unwrap(), engine_pid);
}

// covers: POOL-3112
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_managerd_sigterm_with_a_task_running_ends_it_once_and_leaves_no_engine() {
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        ..Default::default()
    })
    .await;
    let engine_pid = s.handoff("p0").pid.unwrap();
    let running = s.submit_ok(task("the", 4000)).await.task_id;
    let mut ev = s.open_events(&running, None).await;
    ev.frame_named("token").await.unwrap();
    signal(s.pm.id().unwrap(), "-TERM");
    let exit = tokio::time::timeout(Duration::from_secs(10), s.pm.wait())
        .await
        .expect("pool-managerd did not exit")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!pid_alive(engine_pid), "the engine outlived pool-managerd");
    let mut frames = vec![];
    while let Some(f) = ev.frame().await {
        frames.push(f);
    }
    assert_eq!(terminal_count(&frames), 1, "{:?}", names(&frames));
    // Its engine stopped under it: the one ending is an error, and the status says failed.
    let last = frames.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"), "{:?}", names(&frames));
    let st = s.wait_task(&running, Duration::from_secs(10)).await;
    assert_eq!(st.state, TaskState::Failed, "{st:?}");
    // Its handoff file is gone: orchestratord retires the pool.
    wait_for("the pool retired", Duration::from_secs(10), || async {
        let pools: serde_json::Value = s.get("/v2/pools").await.json().await.unwrap();
        pools["pools"].as_array().unwrap().is_empty().then_some(())
    })
    .await;
}

// covers: OAI-7112
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestratord_sigterm_lets_an_openai_stream_in_flight_finish_with_done() {
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        orch_env: vec![("ORCHD_SHUTDOWN_GRACE_MS", "20000".into())],
        ..Default::default()
    })
    .await;
    let resp = s
        .http
        .post(format!("{}/v1/completions", s.base))
        .json(&serde_json::json!({"model": "tiny", "prompt": "the", "max_tokens": 300, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    let mut text = String::new();
    while !text.contains("\"text\"") {
        text.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    signal(s.orch.id().unwrap(), "-TERM");
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "{}",
        &text[text.len().saturating_sub(300)..]
    );
    assert!(
        text.contains("\"finish_reason\":\"length\""),
        "the stream was cut short"
    );
    let exit = tokio::time::timeout(Duration::from_secs(10), s.orch.wait())
        .await
        .expect("orchestratord did not exit")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
