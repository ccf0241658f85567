use std::time::Duration;

use llorch_contracts::PoolState;

use crate::harness::*;

// covers: POOL-3111
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_model_and_a_failed_reload_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let other = other_model(dir.path());
    let broken = broken_model(dir.path());
    let models = dir.path().display().to_string();
    let d = Daemon::start_in(
        dir,
        DaemonOptions {
            pools_toml: pool_toml("rl", &tiny_model(), 1, 512),
            extra_env: vec![("POOL_MANAGERD_MODEL_DIRS".into(), models.clone())],
            ..Default::default()
        },
    )
    .await;
    let before = d.wait_ready("rl").await;

    let r = d
        .http
        .post(format!("{}/v2/pools/rl/reload", d.base))
        .json(&serde_json::json!({"new_model_ref": other.display().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let switched = d.status("rl").await.unwrap();
    assert!(switched.ready);
    assert_eq!(switched.model_id, "tiny-other");
    assert_ne!(switched.url, before.url, "a new engine serves after reload");
    let props: serde_json::Value = d
        .engine_client("rl")
        .get(format!("{}/props", switched.url.clone().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        props["model_path"]
            .as_str()
            .unwrap()
            .ends_with("tiny-other.gguf"),
        "{props}"
    );

    let r = d
        .http
        .post(format!("{}/v2/pools/rl/reload", d.base))
        .json(&serde_json::json!({"new_model_ref": broken.display().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "POOL_UNREADY");
    // The engine's log lines stay on the node.
    assert_eq!(
        body["message"],
        "reload of pool \"rl\" failed; the previous model keeps serving (the reason is in this node's log)"
    );
    let kept = d.status("rl").await.unwrap();
    assert!(kept.ready);
    assert_eq!(kept.url, switched.url, "rollback keeps the serving engine");
    assert!(kept.last_error.unwrap().contains("rolled back"));

    // Missing, outside the model directories, not a file, or leading out of them through `..`
    // (judged where it leads): one answer for all.
    let escape = format!("{models}/../../etc/hostname");
    let mut answers = Vec::new();
    for path in ["/nonexistent.gguf", "/etc/hostname", "/etc", &escape] {
        let r = d
            .http
            .post(format!("{}/v2/pools/rl/reload", d.base))
            .json(&serde_json::json!({"new_model_ref": path}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        answers.push(r.json::<serde_json::Value>().await.unwrap());
    }
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
}

// covers: POOL-3110
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_in_flight_work_then_stops_the_engine() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("dr", &tiny_model(), 1, 8192),
        ..Default::default()
    })
    .await;
    let st = d.wait_ready("dr").await;
    let engine_url = st.url.unwrap();
    let http = d.http.clone();
    let url = format!("{}/v2/pools/dr/engine/completion", d.base);
    let in_flight = tokio::spawn(async move {
        http.post(url)
            .json(&serde_json::json!({"prompt": "the", "n_predict": 4000}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    let engine = d.engine_client("dr");
    wait_for("request in flight", Duration::from_secs(5), || {
        let (u, engine) = (engine_url.clone(), engine.clone());
        async move {
            let slots: Vec<serde_json::Value> = engine
                .get(format!("{u}/slots"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            slots
                .iter()
                .any(|s| s["is_processing"] == true)
                .then_some(())
        }
    })
    .await;
    let r = d
        .http
        .post(format!("{}/v2/pools/dr/drain", d.base))
        .json(&serde_json::json!({"deadline_ms": 20000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["draining"], true);
    assert!(
        !d.runtime_dir.join("dr.json").exists(),
        "draining pool still advertised"
    );
    // New work is refused while draining.
    let refused = d
        .http
        .post(format!("{}/v2/pools/dr/engine/completion", d.base))
        .json(&serde_json::json!({"prompt": "x", "n_predict": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    // The in-flight request completes in full.
    let done = in_flight.await.unwrap();
    assert_eq!(done["tokens_predicted"], 4000);
    d.wait_pool("dr", "stopped", Duration::from_secs(10), |s| {
        s.state == PoolState::Stopped
    })
    .await;
    assert!(
        reqwest::get(format!("{engine_url}/health")).await.is_err(),
        "engine still up"
    );

    let bad = d
        .http
        .post(format!("{}/v2/pools/dr/drain", d.base))
        .body("{\"deadline\": 1}")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(body["code"], "INVALID_PARAMS");
}

// covers: OBS-6103
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_pool_gauges_and_health_check_counters() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("mx", &tiny_model(), 2, 512),
        ..Default::default()
    })
    .await;
    d.wait_ready("mx").await;
    let m = wait_for("a health probe counted", Duration::from_secs(5), || async {
        let m = d.metrics().await;
        metric_value(
            &m,
            "pool_health_checks_total",
            &[("pool_id", "mx"), ("outcome", "ok")],
        )
        .filter(|v| *v >= 1.0)
        .map(|_| m)
    })
    .await;
    assert_eq!(
        metric_value(&m, "pool_ready", &[("pool_id", "mx")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&m, "pool_slots_total", &[("pool_id", "mx")]),
        Some(2.0)
    );
    assert_eq!(
        metric_value(&m, "pool_slots_free", &[("pool_id", "mx")]),
        Some(2.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "mx"), ("outcome", "managed")]
        ),
        Some(1.0)
    );
    for name in [
        "# TYPE pool_handoff_files_processed_total counter",
        "# TYPE pool_ready gauge",
        "# TYPE pool_slots_total gauge",
        "# TYPE pool_slots_free gauge",
        "# TYPE pool_health_checks_total counter",
    ] {
        assert!(m.contains(name), "missing {name}");
    }
}
