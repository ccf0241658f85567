use std::time::Duration;

use llorch_contracts::tasks::TaskState;

use crate::harness::*;

async fn wait_slot_idle(s: &Stack, within: Duration) {
    wait_for("engine slot idle", within, || async {
        (s.engine_slots_busy("p0").await == 0).then_some(())
    })
    .await;
}

// covers: ORCH-2306, ORCH-2307
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_queued_task_never_reaches_the_engine() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let long = s.submit_ok(task("the", 8000)).await.task_id;
    let queued = s.submit_ok(task("never runs", 50)).await.task_id;
    assert_eq!(s.status(&queued).await.state, TaskState::Queued);
    assert_eq!(s.cancel(&queued).await, 204);
    assert_eq!(s.cancel(&queued).await, 204, "cancel is idempotent");
    let frames = s.events(&queued).await;
    assert_eq!(names(&frames).last(), Some(&"error"));
    assert_eq!(data(frames.last().unwrap())["code"], "CANCELLED");
    assert!(!names(&frames).contains(&"started"));
    s.cancel(&long).await;
    s.wait_task(&long, Duration::from_secs(10)).await;
    let st = s.status(&queued).await;
    assert_eq!(st.state, TaskState::Cancelled);
    assert_eq!(st.attempts, 0);
    assert!(st.pool_id.is_none());
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "tasks_started_total", &[("pool_id", "p0")]),
        Some(1.0),
        "only the long task was dispatched"
    );
    assert_eq!(
        metric_value(&m, "tasks_canceled_total", &[("stage", "queued")]),
        Some(1.0)
    );
}

// covers: ORCH-2308
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_running_task_ends_cancelled_and_frees_the_engine_slot_within_a_second() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        ..Default::default()
    })
    .await;
    let id = s.submit_ok(task("the", 2000)).await.task_id;
    let mut ev = s.open_events(&id, None).await;
    ev.frame_named("token").await.unwrap();
    assert_eq!(s.engine_slots_busy("p0").await, 1);
    assert_eq!(s.cancel(&id).await, 204);
    let err = ev.frame_named("error").await.unwrap();
    assert_eq!(data(&err)["code"], "CANCELLED");
    wait_slot_idle(&s, Duration::from_secs(1)).await;
    assert_eq!(s.status(&id).await.state, TaskState::Cancelled);
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "tasks_canceled_total", &[("stage", "running")]),
        Some(1.0)
    );
}

// covers: ORCH-2309
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_last_event_stream_cancels_the_task_after_the_grace_and_frees_the_slot() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        orch_env: vec![("ORCHD_DISCONNECT_GRACE_MS", "300".into())],
        ..Default::default()
    })
    .await;
    let id = s.submit_ok(task("the", 2000)).await.task_id;
    let mut first = s.open_events(&id, None).await;
    let mut second = s.open_events(&id, None).await;
    first.frame_named("token").await.unwrap();
    second.frame_named("token").await.unwrap();
    drop(first);
    // One subscriber is still there: the task keeps running.
    second.frame_named("token").await.unwrap();
    assert_eq!(s.status(&id).await.state, TaskState::Running);
    let left_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    drop(second);
    let st = s.wait_task(&id, Duration::from_secs(2)).await;
    assert_eq!(st.state, TaskState::Cancelled);
    // Not at once: the grace (300 ms) passed first (its exact instant is tested on paused time).
    assert!(
        st.finished_at_ms.unwrap() >= left_ms + 300,
        "cancelled {} ms after the last subscriber left",
        st.finished_at_ms.unwrap().saturating_sub(left_ms)
    );
    wait_slot_idle(&s, Duration::from_secs(1)).await;
}

// covers: ORCH-2310
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_does_not_cancel_when_configured_off() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 4096),
        orch_env: vec![("ORCHD_CANCEL_ON_DISCONNECT", "false".into())],
        ..Default::default()
    })
    .await;
    let id = s.submit_ok(task("the", 2000)).await.task_id;
    let mut ev = s.open_events(&id, None).await;
    ev.frame_named("token").await.unwrap();
    drop(ev);
    let st = s.wait_task(&id, Duration::from_secs(10)).await;
    assert_eq!(st.state, TaskState::Completed);
    assert_eq!(st.tokens_out, 2000);
}

// covers: ORCH-2311
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_behind_a_cancelled_one_are_told_their_new_position() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let long = s.submit_ok(task("the", 8000)).await.task_id;
    wait_for("long task running", Duration::from_secs(10), || async {
        s.status(&long).await.started_at_ms.map(|_| ())
    })
    .await;
    let first = s.submit_ok(task("first", 5)).await.task_id;
    let second = s.submit_ok(task("second", 5)).await;
    assert_eq!(second.queue_position, 1);
    let mut ev = s.open_events(&second.task_id, None).await;
    let q = ev.frame_named("queued").await.unwrap();
    assert_eq!(data(&q)["queue_position"], 1);
    s.cancel(&first).await;
    let moved = ev.frame_named("queued").await.unwrap();
    assert_eq!(data(&moved)["queue_position"], 0);
    s.cancel(&long).await;
    assert!(ev.frame_named("end").await.is_some());
}

// covers: ORCH-2304, ORCH-2309
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_within_the_grace_resumes_with_last_event_id_and_the_task_completes() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "p0", 1, 4096),
        orch_env: vec![("ORCHD_DISCONNECT_GRACE_MS", "5000".into())],
        ..Default::default()
    })
    .await;
    let id = s.submit_ok(task("the", 1500)).await.task_id;
    let mut ev = s.open_events(&id, None).await;
    let mut last = 0;
    for _ in 0..3 {
        let f = ev.frame_named("token").await.unwrap();
        last = f.id.unwrap().parse::<u64>().unwrap();
    }
    drop(ev);
    // The client is away for a moment (a dropped connection, a proxy's idle timeout).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.status(&id).await.state, TaskState::Running);
    let mut back = s.open_events(&id, Some(last)).await;
    let first = back.frame().await.unwrap();
    assert_eq!(
        first.id.unwrap().parse::<u64>().unwrap(),
        last + 1,
        "replay starts after the last seen frame"
    );
    let mut terminal = None;
    while let Some(f) = back.frame().await {
        terminal = f.event.clone();
    }
    assert_eq!(terminal.as_deref(), Some("end"));
    let st = s.status(&id).await;
    assert_eq!(st.state, TaskState::Completed);
    assert_eq!(st.tokens_out, 1500);
}
