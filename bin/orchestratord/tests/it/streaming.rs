use std::time::{Duration, Instant};

use llorch_contracts::HandoffFile;

use crate::harness::*;

// covers: ORCH-2101, ORCH-2301, ORCH-2303, ORCH-2304, ORCH-2306
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_streams_started_tokens_and_end_with_matching_count() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 2048),
        ..Default::default()
    })
    .await;
    let r = s.submit(task("the river", 40)).await;
    assert_eq!(r.status(), 202);
    assert!(r.headers().contains_key("x-correlation-id"));
    let a: serde_json::Value = r.json().await.unwrap();
    let id = a["task_id"].as_str().unwrap().to_string();
    assert!(
        a["queue_position"].is_u64()
            && a["predicted_start_ms"].is_u64()
            && a["backoff_ms"].is_u64()
    );
    assert_eq!(a["streams"]["sse"], format!("/v2/tasks/{id}/events"));

    let frames = s.events(&id).await;
    let n = names(&frames);
    let started = n
        .iter()
        .position(|e| *e == "started")
        .expect("started event");
    assert!(n[..started].iter().all(|e| *e == "queued"), "{n:?}");
    assert_eq!(data(&frames[started])["pool_id"], "p0");
    let tokens: Vec<_> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("token"))
        .collect();
    assert!(!tokens.is_empty());
    for (k, f) in tokens.iter().enumerate() {
        assert_eq!(data(f)["i"], k as u64, "token indices increase by one");
    }
    assert_eq!(*n.last().unwrap(), "end");
    assert_eq!(
        n.iter().filter(|e| **e == "end" || **e == "error").count(),
        1
    );
    let end = data(frames.last().unwrap());
    assert_eq!(end["tokens_out"], tokens.len() as u64);
    assert!(["length", "stop"].contains(&end["finish_reason"].as_str().unwrap()));
    // Frame ids increase (the plain stream leaves out `metrics` frames; the verbose one has them).
    let ids: Vec<u64> = frames
        .iter()
        .map(|f| f.id.as_deref().unwrap().parse().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let verbose = s
        .http
        .get(format!(
            "{}{}",
            s.base,
            a["streams"]["sse_verbose"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(verbose.contains("event: metrics"), "{verbose}");
    let st = s.status(&id).await;
    assert_eq!(st.tokens_out, tokens.len() as u32);
    assert_eq!(st.attempts, 1);
    assert_eq!(st.pool_id.as_deref(), Some("p0"));

    // Last-Event-ID replay, and a second subscriber sees the same frames.
    let mut resumed = s.open_events(&id, Some(3)).await;
    let first = resumed.frame().await.unwrap();
    assert_eq!(first.id.as_deref(), Some("4"));
    assert_eq!(s.events(&id).await, frames);

    let m = s.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "tasks_completed_total",
            &[("outcome", "end"), ("pool_id", "p0")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "tokens_out_total", &[("pool_id", "p0")]),
        Some(tokens.len() as f64)
    );
    assert!(metric_value(&m, "latency_first_token_ms_count", &[("pool_id", "p0")]).unwrap() >= 1.0);
    assert!(metric_value(&m, "admission_latency_ms_count", &[]).unwrap() >= 1.0);
}

// covers: ORCH-2302
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_relayed_while_the_engine_is_still_generating() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let a = s.submit_ok(task("the", 6000)).await;
    let mut ev = s.open_events(&a.task_id, None).await;
    ev.frame_named("token").await.unwrap();
    assert_eq!(
        s.engine_slots_busy("p0").await,
        1,
        "first token arrived only after generation ended"
    );
    let end = ev.frame_named("end").await.unwrap();
    assert!(data(&end)["tokens_out"].as_u64().unwrap() > 100);
}

// covers: ORCH-2213
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_mid_stream_ends_with_worker_reset_and_later_tasks_succeed() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let pid = s.handoff("p0").pid.unwrap();
    let a = s.submit_ok(task("the", 8000)).await;
    let mut ev = s.open_events(&a.task_id, None).await;
    ev.frame_named("token").await.unwrap();
    let killed_at = Instant::now();
    signal(pid, "-KILL");
    let err = tokio::time::timeout(Duration::from_secs(2), ev.frame_named("error"))
        .await
        .expect("no error event within 2 s of the engine dying")
        .unwrap();
    assert!(killed_at.elapsed() < Duration::from_secs(2));
    assert_eq!(data(&err)["code"], "WORKER_RESET");
    assert!(
        ev.frame().await.is_none(),
        "stream continues after the terminal event"
    );

    // pool-managerd restarts the engine; orchestratord picks up the new handoff file.
    wait_for("a new engine", Duration::from_secs(30), || async {
        let f = std::fs::read(s.runtime_dir.join("p0.json")).ok()?;
        let h = HandoffFile::parse(&f).ok()?;
        (h.pid != Some(pid)).then_some(())
    })
    .await;
    s.wait_pools_ready(1).await;
    let b = s.submit_ok(task("the river", 20)).await;
    let frames = s.events(&b.task_id).await;
    assert_eq!(names(&frames).last(), Some(&"end"), "{frames:?}");
}

// covers: ORCH-2312
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_engine_stream_ends_with_decode_timeout() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        orch_env: vec![("ORCHD_DECODE_TIMEOUT_MS", "400".into())],
        ..Default::default()
    })
    .await;
    let pid = s.handoff("p0").pid.unwrap().to_string();
    let a = s.submit_ok(task("the", 8000)).await;
    let mut ev = s.open_events(&a.task_id, None).await;
    ev.frame_named("token").await.unwrap();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), ev.frame_named("error")).await;
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    let err = err.expect("no error after the engine stalled").unwrap();
    assert_eq!(data(&err)["code"], "DECODE_TIMEOUT");
}

// covers: ORCH-2212
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_failing_before_first_token_is_retried_once_on_another_pool() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("real", 1, 2048),
        ..Default::default()
    })
    .await;
    let fault = crate::fault_engine::start_dropping_completions().await;
    // More free slots than the real pool: placement picks the faulty one first.
    let file = HandoffFile::external("faulty", &fault.url, "tiny", 8);
    llorch_handoff::write_atomic(&s.runtime_dir, &file).unwrap();
    s.wait_pools_ready(2).await;
    let a = s.submit_ok(task("the", 10)).await;
    let frames = s.events(&a.task_id).await;
    let n = names(&frames);
    assert_eq!(n.last(), Some(&"end"), "{n:?}");
    let started: Vec<_> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("started"))
        .map(|f| data(f)["pool_id"].clone())
        .collect();
    assert_eq!(started, vec!["faulty", "real"]);
    let st = s.status(&a.task_id).await;
    assert_eq!(st.attempts, 2);
    assert_eq!(st.pool_id.as_deref(), Some("real"));
}

// covers: ORCH-2216
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engines_prompt_cache_report_is_counted_and_a_second_turn_reuses_the_first() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 2048),
        ..Default::default()
    })
    .await;
    let system = "You are a careful assistant who answers in short sentences. ".repeat(6);
    let turns = [
        format!("{system}\nUser: where do rivers start?\nAssistant:"),
        format!("{system}\nUser: where do rivers start?\nAssistant: in hills.\nUser: and end?\nAssistant:"),
    ];
    for turn in &turns {
        let r = s.submit(task(turn, 4)).await;
        assert_eq!(r.status(), 202);
        let a: serde_json::Value = r.json().await.unwrap();
        let frames = s.events(a["task_id"].as_str().unwrap()).await;
        assert_eq!(names(&frames).last().copied(), Some("end"));
    }
    // The engine's own report: the second turn took the shared start from the slot's cache.
    let m = s.metrics().await;
    let cached = metric_value(
        &m,
        "orchd_engine_prompt_tokens_total",
        &[("kind", "cached")],
    );
    let evaluated = metric_value(
        &m,
        "orchd_engine_prompt_tokens_total",
        &[("kind", "evaluated")],
    );
    assert!(
        cached.is_some_and(|c| c > 50.0),
        "cached {cached:?}, evaluated {evaluated:?}"
    );
    assert!(evaluated.is_some_and(|e| e > 0.0));
}
