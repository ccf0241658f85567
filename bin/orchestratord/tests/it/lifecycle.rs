use std::time::Duration;

use crate::harness::*;

fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
}

// covers: ORCH-2117, ORCH-2316
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_refuses_new_ones_and_exits_zero() {
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 4096),
        ..Default::default()
    })
    .await;
    let id = s.submit_ok(task("the", 1000)).await.task_id;
    let mut ev = s.open_events(&id, None).await;
    ev.frame_named("token").await.unwrap();
    sigterm(&s.orch);
    wait_for("admission closed", Duration::from_secs(3), || async {
        match s
            .http
            .post(format!("{}/v2/tasks", s.base))
            .json(&task("late", 5))
            .send()
            .await
        {
            Ok(r) if r.status() == 503 => Some(()),
            Ok(_) => None,
            Err(_) => Some(()), // listener already gone
        }
    })
    .await;
    let mut last = None;
    while let Some(f) = ev.frame().await {
        last = Some(f);
    }
    let last = last.expect("no frame after SIGTERM");
    assert_eq!(
        last.event.as_deref(),
        Some("end"),
        "running task was not allowed to finish: {last:?}"
    );
    assert_eq!(data(&last)["tokens_out"], 1000);
    let status = tokio::time::timeout(Duration::from_secs(8), s.orch.wait())
        .await
        .expect("no exit within the grace period")
        .unwrap();
    assert!(status.success(), "{status:?}\n{}", s.orch_log());
}

// covers: ORCH-2316
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_tasks_outliving_the_grace_period_with_an_error_event() {
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        orch_env: vec![("ORCHD_SHUTDOWN_GRACE_MS", "200".into())],
        ..Default::default()
    })
    .await;
    let running = s.submit_ok(task("the", 8000)).await.task_id;
    let queued = s.submit_ok(task("queued", 10)).await.task_id;
    let mut run_ev = s.open_events(&running, None).await;
    let mut queued_ev = s.open_events(&queued, None).await;
    run_ev.frame_named("token").await.unwrap();
    sigterm(&s.orch);
    for ev in [&mut run_ev, &mut queued_ev] {
        let err = ev
            .frame_named("error")
            .await
            .expect("stream ended without a terminal event");
        assert_eq!(data(&err)["code"], "POOL_UNAVAILABLE");
        assert_eq!(data(&err)["retriable"], true);
    }
    let status = tokio::time::timeout(Duration::from_secs(8), s.orch.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    // pool-managerd is untouched by orchestratord's shutdown.
    assert!(s.pm.try_wait().unwrap().is_none());
}

// covers: OBS-6110, OBS-6116
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_reload_are_forwarded_to_pool_managerd() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        ..Default::default()
    })
    .await;
    let r = s
        .http
        .post(format!("{}/v2/pools/p0/drain", s.base))
        .json(&serde_json::json!({"deadline_ms": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_for(
        "pool stopped at pool-managerd",
        Duration::from_secs(10),
        || async {
            let v: serde_json::Value = s
                .http
                .get(format!("{}/v2/pools/p0/status", s.pm_base))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["state"] == "stopped").then_some(())
        },
    )
    .await;
    wait_for(
        "orchestratord no longer ready",
        Duration::from_secs(5),
        || async {
            (reqwest::get(format!("{}/ready", s.base))
                .await
                .ok()?
                .status()
                == 503)
                .then_some(())
        },
    )
    .await;
    let r = s
        .http
        .post(format!("{}/v2/pools/p0/reload", s.base))
        .json(&serde_json::json!({"new_model_ref": tiny_model().display().to_string()}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    s.wait_pools_ready(1).await;
    let id = s.submit_ok(task("after reload", 8)).await.task_id;
    assert_eq!(names(&s.events(&id).await).last(), Some(&"end"));
    let bad = s
        .http
        .post(format!("{}/v2/pools/p0/drain", s.base))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

// covers: AUTH-5107, OBS-6106
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_correlation_and_task_fields_and_never_the_token() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![
            ("ORCHD_LOG_FORMAT", "json".into()),
            (
                "RUST_LOG",
                "info,orchestratord=debug,llorch_http=debug".into(),
            ),
        ],
        ..Default::default()
    })
    .await;
    let r = s
        .http
        .post(format!("{}/v2/tasks", s.base))
        .header("x-correlation-id", "corr-json-1")
        .json(&serde_json::json!({"task_id": "json-task-1", "model_ref": "tiny", "prompt": "x", "max_tokens": 3, "session_id": "sess-9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    s.wait_task("json-task-1", Duration::from_secs(10)).await;
    let log = s.orch_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!lines.is_empty(), "no JSON log lines:\n{log}");
    let request_lines: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|sp| sp["correlation_id"] == "corr-json-1"))
        })
        .collect();
    assert!(
        request_lines
            .iter()
            .any(|l| l["message"] == "request finished"
                && l["latency_ms"].is_number()
                && l["outcome"] == "ok"),
        "{request_lines:?}"
    );
    assert!(
        request_lines
            .iter()
            .any(|l| l["message"] == "task admitted"),
        "admission line lacks the request's correlation_id"
    );
    let finished = lines
        .iter()
        .find(|l| l["message"] == "task finished" && l["task_id"] == "json-task-1")
        .expect("task finished line");
    assert_eq!(finished["pool_id"], "p0");
    assert_eq!(finished["outcome"], "end");
    assert!(lines.iter().all(|l| l["target"].is_string()));
    assert!(!log.contains(TOKEN));
}

// covers: AUTH-5110
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_counted_and_logged_at_most_once_a_second_in_both_daemons() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        ..Default::default()
    })
    .await;
    let anon = reqwest::Client::new();
    let t0 = std::time::Instant::now();
    for base in [&s.base, &s.pm_base] {
        for k in 0..30 {
            let r = anon
                .get(format!("{base}/v2/pools"))
                .bearer_auth(format!("wrong-token-{k}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401);
        }
    }
    let elapsed_s = t0.elapsed().as_secs() + 1;
    let orch_m = s.metrics().await;
    // `/v2/pools` is a client route: the refusals count in its group.
    assert_eq!(
        metric_value(&orch_m, "auth_failures_total", &[("route_group", "client")]),
        Some(30.0)
    );
    assert_eq!(
        metric_value(&orch_m, "auth_failures_total", &[("route_group", "admin")]),
        Some(0.0)
    );
    let pm_m = s
        .http
        .get(format!("{}/metrics", s.pm_base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Every pool-managerd route needs the node token: the node group.
    assert_eq!(
        metric_value(&pm_m, "auth_failures_total", &[("route_group", "node")]),
        Some(30.0)
    );
    // One line per second at most (plus the first), however many refusals, in each daemon.
    let pm_log =
        std::fs::read_to_string(s.runtime_dir.with_file_name("pool-managerd.log")).unwrap();
    for (daemon, log) in [("orchestratord", s.orch_log()), ("pool-managerd", pm_log)] {
        let lines = log
            .lines()
            .filter(|l| l.contains("request refused"))
            .count() as u64;
        assert!(
            (1..=elapsed_s + 1).contains(&lines),
            "{daemon}: {lines} refusal lines in {elapsed_s} s"
        );
        assert!(
            !log.contains("wrong-token"),
            "{daemon} logged a presented token"
        );
    }
}

/// Opens a connection and sends the start of a request, never its end.
async fn trickle(base: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = base.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    sock
}

// covers: AUTH-5112, OBS-6110
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_headers_is_cut_off_and_http2_is_not_spoken() {
    use tokio::io::AsyncReadExt;
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![("ORCHD_HEADER_READ_TIMEOUT_MS", "500".into())],
        ..Default::default()
    })
    .await;
    let mut slow = trickle(&s.base).await;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("the connection was kept open");
    // Closed (with or without a 408 first): never a served request.
    if let Ok(n) = read {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() >= Duration::from_millis(400));
    // HTTP/2 with prior knowledge is refused; HTTP/1.1 is served.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(format!("{}/health", s.base)).send().await;
    assert!(r.is_err(), "{:?}", r.map(|r| (r.status(), r.version())));
    assert_eq!(s.get("/health").await.status(), 200);
}

// covers: AUTH-5112
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![("ORCHD_MAX_CONNECTIONS", "2".into())],
        ..Default::default()
    })
    .await;
    // Two clients hold both connections (retried until the stack's own readiness polling has
    // closed its connections); a third request waits in the accept queue...
    wait_for(
        "a request held back by the cap",
        Duration::from_secs(10),
        || async {
            let mut held = vec![trickle(&s.base).await, trickle(&s.base).await];
            let waiting = tokio::spawn(
                reqwest::Client::new()
                    .get(format!("{}/health", s.base))
                    .timeout(Duration::from_secs(5))
                    .send(),
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
            if waiting.is_finished() {
                return None;
            }
            // ...and is served, that very request, once one of them closes.
            held.pop();
            let r = waiting.await.unwrap().unwrap();
            assert_eq!(r.status(), 200);
            Some(())
        },
    )
    .await;
}
