use std::time::Duration;

use crate::harness::*;

fn batch(prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": prompt, "max_tokens": max_tokens, "priority": "batch"})
}

/// Submits a long task and waits until it runs, so the pool's only slot is busy.
pub(crate) async fn occupy_the_slot(s: &Stack) -> String {
    let a = s.submit_ok(task("the", 8000)).await;
    wait_for("long task running", Duration::from_secs(10), || async {
        (s.status(&a.task_id).await.started_at_ms.is_some()).then_some(())
    })
    .await;
    a.task_id
}

// covers: ORCH-2205
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_times_more_tasks_than_slots_all_complete_without_oversubscribing_engines() {
    let toml = format!("{}{}", pool_toml("a", 2, 4096), pool_toml("b", 2, 4096));
    let s = Stack::start(StackOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    s.wait_pools_ready(2).await;
    let mut ids = Vec::new();
    for k in 0..12 {
        ids.push(s.submit_ok(task(&format!("task {k}"), 600)).await.task_id);
    }
    // While they run, no engine ever holds more requests than its slots: nothing is deferred
    // inside llama-server and busy slots never exceed 2.
    let mut samples = 0;
    loop {
        for pool in ["a", "b"] {
            s.assert_engine_not_oversubscribed(pool, 2).await;
            samples += 1;
        }
        let mut done = 0;
        for id in &ids {
            if s.status(id).await.finished_at_ms.is_some() {
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(samples > 4, "too few samples to mean anything");
    let mut pools = std::collections::BTreeSet::new();
    for id in &ids {
        let st = s.status(id).await;
        assert_eq!(
            st.state,
            llorch_contracts::tasks::TaskState::Completed,
            "{st:?}"
        );
        assert_eq!(st.tokens_out, 600);
        pools.insert(st.pool_id.unwrap());
    }
    assert_eq!(pools.len(), 2, "both pools took work");
}

// covers: ORCH-2107
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_tasks_submitted_after_batch_tasks_start_first() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let long = occupy_the_slot(&s).await;
    let mut batch_ids = Vec::new();
    for k in 0..3 {
        batch_ids.push(s.submit_ok(batch(&format!("batch {k}"), 300)).await.task_id);
    }
    let mut interactive_ids = Vec::new();
    for k in 0..2 {
        interactive_ids.push(
            s.submit_ok(task(&format!("interactive {k}"), 300))
                .await
                .task_id,
        );
    }
    let st = s.status(&interactive_ids[0]).await;
    assert_eq!(
        st.queue_position,
        Some(0),
        "interactive jumps ahead of queued batch"
    );
    s.wait_task(&long, Duration::from_secs(30)).await;
    let mut last_interactive_start = 0;
    for id in &interactive_ids {
        last_interactive_start = last_interactive_start.max(
            s.wait_task(id, Duration::from_secs(30))
                .await
                .started_at_ms
                .unwrap(),
        );
    }
    for id in &batch_ids {
        let b = s.wait_task(id, Duration::from_secs(30)).await;
        assert!(
            b.started_at_ms.unwrap() >= last_interactive_start,
            "batch {id} started before an interactive task"
        );
    }
}

// covers: ORCH-2105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_with_reject_policy_answers_429_with_retry_after_and_backoff() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        orch_env: vec![
            ("ORCHD_ADMISSION_CAPACITY", "2".into()),
            ("ORCHD_ADMISSION_POLICY", "reject".into()),
        ],
        ..Default::default()
    })
    .await;
    occupy_the_slot(&s).await;
    s.submit_ok(batch("q1", 10)).await;
    s.submit_ok(batch("q2", 10)).await;
    let r = s.submit(task("one too many", 10)).await;
    assert_eq!(r.status(), 429);
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let backoff: u64 = r.headers()["x-backoff-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1 && backoff >= 1000);
    assert!(r.headers().contains_key("x-correlation-id"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "ADMISSION_REJECT");
    assert_eq!(body["policy_label"], "reject");
    assert_eq!(body["retriable"], true);
    assert_eq!(body["retry_after_ms"], backoff);
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "tasks_rejected_total", &[("reason", "queue_full")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "queue_depth", &[("priority", "batch")]),
        Some(2.0)
    );
}

// covers: ORCH-2106
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_with_drop_lru_ends_the_oldest_batch_task_and_admits_the_new_one() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        orch_env: vec![
            ("ORCHD_ADMISSION_CAPACITY", "2".into()),
            ("ORCHD_ADMISSION_POLICY", "drop-lru".into()),
        ],
        ..Default::default()
    })
    .await;
    let long = occupy_the_slot(&s).await;
    let oldest = s.submit_ok(batch("oldest", 10)).await.task_id;
    let mut oldest_events = s.open_events(&oldest, None).await;
    let newer = s.submit_ok(batch("newer", 10)).await.task_id;
    let newest = s.submit_ok(task("newest", 10)).await.task_id;
    let err = oldest_events.frame_named("error").await.unwrap();
    assert_eq!(data(&err)["code"], "QUEUE_FULL_DROP_LRU");
    assert_eq!(data(&err)["policy_label"], "drop-lru");
    assert!(s.cancel(&long).await == 204);
    for id in [&newer, &newest] {
        let frames = s.events(id).await;
        assert_eq!(names(&frames).last(), Some(&"end"), "{id}: {frames:?}");
    }
    assert_eq!(
        s.status(&oldest).await.attempts,
        0,
        "dropped task reached an engine"
    );
}

// covers: ORCH-2102, ORCH-2103, AUTH-5111
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_in_the_envelope() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![
            ("ORCHD_MAX_TOKENS_CAP", "512".into()),
            ("ORCHD_MAX_BODY_BYTES", "4096".into()),
        ],
        ..Default::default()
    })
    .await;
    let url = format!("{}/v2/tasks", s.base);
    let raw = |body: String| {
        s.http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-correlation-id", "bad-input-1")
            .body(body)
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed json", "{not json".into(), 400, "INVALID_PARAMS"),
        (
            "missing prompt",
            r#"{"model_ref":"tiny","max_tokens":5}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "empty prompt",
            r#"{"model_ref":"tiny","prompt":"","max_tokens":5}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "max_tokens 0",
            r#"{"model_ref":"tiny","prompt":"x","max_tokens":0}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "max_tokens above cap",
            r#"{"model_ref":"tiny","prompt":"x","max_tokens":513}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "unknown priority",
            r#"{"model_ref":"tiny","prompt":"x","max_tokens":5,"priority":"urgent"}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "unknown field",
            r#"{"model_ref":"tiny","prompt":"x","max_tokens":5,"bogus":1}"#.into(),
            400,
            "INVALID_PARAMS",
        ),
        (
            "oversized body",
            format!(
                r#"{{"model_ref":"tiny","prompt":"{}","max_tokens":5}}"#,
                "x".repeat(8192)
            ),
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "unknown model",
            r#"{"model_ref":"no-such-model","prompt":"x","max_tokens":5}"#.into(),
            503,
            "MODEL_NOT_AVAILABLE",
        ),
    ];
    for (what, body, status, code) in cases {
        let r = raw(body).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        assert_eq!(r.headers()["x-correlation-id"], "bad-input-1", "{what}");
        if status == 503 {
            assert!(r.headers().contains_key("retry-after"), "{what}");
        }
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["code"], code, "{what}: {body}");
        assert!(!body["message"].as_str().unwrap().is_empty(), "{what}");
    }
    let no_ct = s
        .http
        .post(&url)
        .body(r#"{"model_ref":"tiny","prompt":"x","max_tokens":5}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(no_ct.status(), 400, "missing content-type");
    assert_eq!(
        s.http
            .get(format!("{}/v2/tasks/nope", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let anon = reqwest::Client::new()
        .post(&url)
        .json(&task("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "tasks_rejected_total", &[("reason", "invalid_params")]),
        Some(8.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "tasks_rejected_total",
            &[("reason", "payload_too_large")]
        ),
        Some(1.0)
    );
    assert!(!s.orch_log().contains(TOKEN));
}

// covers: ORCH-2104
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_the_same_task_id_is_idempotent() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        ..Default::default()
    })
    .await;
    let body = serde_json::json!({"task_id": "same-1", "model_ref": "tiny", "prompt": "x", "max_tokens": 5});
    let a = s.submit_ok(body.clone()).await;
    let b = s.submit_ok(body).await;
    assert_eq!(a.task_id, b.task_id);
    s.wait_task("same-1", Duration::from_secs(10)).await;
    assert_eq!(s.status("same-1").await.attempts, 1);
    let conflict = s.submit(serde_json::json!({"task_id": "same-1", "model_ref": "tiny", "prompt": "other", "max_tokens": 5})).await;
    assert_eq!(conflict.status(), 409);
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "tasks_enqueued_total", &[("priority", "interactive")]),
        Some(1.0)
    );
}

// covers: ORCH-2108
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_that_cannot_start_before_its_deadline_ends_with_deadline_unmet() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let long = occupy_the_slot(&s).await;
    let body = serde_json::json!({"model_ref": "tiny", "prompt": "x", "max_tokens": 5, "deadline_ms": 150});
    let id = s.submit_ok(body).await.task_id;
    let frames = s.events(&id).await;
    let last = frames.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(data(last)["code"], "DEADLINE_UNMET");
    assert!(!names(&frames).contains(&"started"));
    s.cancel(&long).await;
}

// covers: ORCH-2114
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_every_per_slot_context_is_refused_at_admission_by_the_engines_count()
{
    // 1024 tokens over 2 slots: 512 per slot.
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 1024),
        ..Default::default()
    })
    .await;
    let long = "the river and the stone ".repeat(150);
    let r = s.submit(task(&long, 8)).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "INVALID_PARAMS");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("largest per-slot context of model \"tiny\" is 512"),
        "{message}"
    );
    // The count is the engine's: what its own tokenizer makes of the prompt.
    let tokens: serde_json::Value = s
        .engine_request(reqwest::Method::POST, "p0", "/tokenize")
        .json(&serde_json::json!({"content": long, "add_special": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let n = tokens["tokens"].as_array().unwrap().len();
    assert!(
        message.contains(&format!("the prompt is {n} tokens")),
        "{message}"
    );
    // One that fits is admitted and runs.
    let fits = "the river and the stone ".repeat(20);
    let a = s.submit_ok(task(&fits, 8)).await;
    let st = s.wait_task(&a.task_id, Duration::from_secs(30)).await;
    assert_eq!(
        st.state,
        llorch_contracts::tasks::TaskState::Completed,
        "{st:?}"
    );
}
