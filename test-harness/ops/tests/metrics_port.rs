//! The metrics port and the old variable names, on live daemons: `/metrics` alone on a second
//! port (`ORCHD_METRICS_PORT`; pool-managerd through the old shared name
//! `PROMETHEUS_METRICS_PORT`, still behind its node token), the deprecation logged with the
//! new name, and an old and a new name that disagree refusing the start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use llorch_test_support::*;
use tokio::process::Command;

const TOKEN: &str = "ops-metrics-port-token-7c1d2e";

fn daemon(bin: &str, env: &[(&str, String)], log: &std::path::Path) -> Command {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(workspace_binary(bin));
    cmd.env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

async fn status_of(req: reqwest::RequestBuilder) -> (u16, String) {
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

// covers: OBS-6105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_serve_metrics_alone_on_their_metrics_port_and_old_names_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pm_log = d.join("pool-managerd.log");
    let mut pm = daemon(
        "pool-managerd",
        &[
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            (
                "POOL_MANAGERD_RUNTIME_DIR",
                d.join("run").display().to_string(),
            ),
            // 0: the kernel picks, and the daemon logs what it bound.
            ("PROMETHEUS_METRICS_PORT", "0".into()),
            ("POOL_MANAGERD_WATCH_INTERVAL_MS", "700".into()),
        ],
        &pm_log,
    )
    .spawn()
    .unwrap();
    let orch_log = d.join("orchestratord.log");
    let mut orch = daemon(
        "orchestratord",
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", d.join("run").display().to_string()),
            ("ORCHD_METRICS_PORT", "0".into()),
        ],
        &orch_log,
    )
    .spawn()
    .unwrap();
    let wait = Duration::from_secs(30);
    let orch_api = logged_addr(&mut orch, &orch_log, "orchestratord listening", wait).await;
    let orch_metrics = logged_addr(&mut orch, &orch_log, "metrics port listening", wait).await;
    let pm_api = logged_addr(&mut pm, &pm_log, "pool-managerd listening", wait).await;
    let pm_metrics = logged_addr(&mut pm, &pm_log, "metrics port listening", wait).await;
    wait_http_ok(
        "orchestratord health",
        &format!("http://{orch_api}/health"),
        Duration::from_secs(30),
    )
    .await;
    wait_http_ok(
        "pool-managerd health",
        &format!("http://{pm_api}/health"),
        Duration::from_secs(30),
    )
    .await;
    let http = reqwest::Client::new();

    // orchestratord: the same open exposition on both ports; nothing else on the metrics port.
    let (status, text) = status_of(http.get(format!("http://{orch_metrics}/metrics"))).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("# TYPE queue_depth gauge"), "{text}");
    for path in ["/v2/pools", "/health", "/ready", "/v2/tasks"] {
        let (status, body) = status_of(http.get(format!("http://{orch_metrics}{path}"))).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("serves /metrics only"), "{body}");
    }
    let (status, _) = status_of(http.get(format!("http://{orch_api}/metrics"))).await;
    assert_eq!(status, 200, "the API port keeps its /metrics");

    // pool-managerd: its metrics still need the node token on the metrics port.
    let url = format!("http://{pm_metrics}/metrics");
    assert_eq!(status_of(http.get(&url)).await.0, 401);
    let (status, text) = status_of(http.get(&url).bearer_auth(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("auth_failures_total"), "{text}");
    let (status, _) = status_of(
        http.get(format!("http://{pm_metrics}/v2/pools"))
            .bearer_auth(TOKEN),
    )
    .await;
    assert_eq!(status, 404);

    // Each old name in use is logged once, with the name that replaced it.
    let log = std::fs::read_to_string(&pm_log).unwrap();
    for (old, new) in [
        ("PROMETHEUS_METRICS_PORT", "POOL_MANAGERD_METRICS_PORT"),
        (
            "POOL_MANAGERD_WATCH_INTERVAL_MS",
            "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS",
        ),
    ] {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("deprecated environment variable") && l.contains(old))
            .collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(lines[0].contains(new), "{}", lines[0]);
    }
    assert!(log.contains("metrics port listening"), "{log}");
    assert!(!std::fs::read_to_string(&orch_log)
        .unwrap()
        .contains("deprecated environment variable"));
}

// covers: AUTH-5114, OBS-6105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_and_a_new_name_that_disagree_refuse_the_start_and_a_taken_metrics_port_too() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = d.join("conflict.log");
    let out = daemon(
        "pool-managerd",
        &[
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".to_string()),
            (
                "POOL_MANAGERD_RUNTIME_DIR",
                d.join("run").display().to_string(),
            ),
            ("POOL_MANAGERD_WATCH_INTERVAL_MS", "500".into()),
            ("POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS", "250".into()),
        ],
        &log,
    )
    .status()
    .await
    .unwrap();
    assert_eq!(out.code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("POOL_MANAGERD_WATCH_INTERVAL_MS and POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS are both set, to different values"),
        "{text}"
    );

    // One PROMETHEUS_METRICS_PORT for two daemons on one machine: the second says what to do.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let log = d.join("taken.log");
    let out = daemon(
        "orchestratord",
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".to_string()),
            ("ORCHD_RUNTIME_DIR", d.join("run").display().to_string()),
            ("PROMETHEUS_METRICS_PORT", port.to_string()),
        ],
        &log,
    )
    .status()
    .await
    .unwrap();
    assert_eq!(out.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!("cannot bind the metrics port 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.contains("POOL_MANAGERD_METRICS_PORT"), "{text}");
}
