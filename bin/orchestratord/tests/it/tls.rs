//! TLS between every party, with certificates from a throwaway CA made in the test: clients →
//! orchestratord over https (HOME and CLOUD); orchestratord → pool-managerd (HOME's GPU memory
//! reads, CLOUD's polls and engine proxy) verified against `LLORCH_TLS_CA_FILE`; pool-managerd →
//! orchestratord (registration, heartbeats) with a client certificate under mutual TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llorch_test_support::pki::TestCa;

use crate::harness::*;

fn pools_file(dir: &Path, pools: &str) -> String {
    let path = dir.join("pools.toml");
    std::fs::write(&path, pools).unwrap();
    path.display().to_string()
}

fn log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until the log at `path` has a line containing every one of `parts`; returns it.
async fn logged_line(path: &Path, parts: &[&str], within: Duration) -> String {
    wait_for(&format!("a log line with {parts:?}"), within, || async {
        log(path)
            .lines()
            .find(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
    })
    .await
}

// covers: AUTH-5201
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_over_tls_streams_a_task_and_the_cli_refuses_a_server_of_another_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"), "cluster");
    let other = TestCa::new(&dir.path().join("pki"), "other");
    let pm_cert = ca.leaf("pool-managerd");
    let orch_cert = ca.leaf("orchestratord");
    let runtime = dir.path().join("run");
    let pm_log = dir.path().join("pool-managerd.log");
    let mut pm = spawn(
        &workspace_binary("pool-managerd"),
        &[
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            (
                "POOL_MANAGERD_CONFIG",
                pools_file(dir.path(), &pool_toml("h0", 1, 2048)),
            ),
            ("POOL_MANAGERD_RUNTIME_DIR", runtime.display().to_string()),
            (
                "POOL_MANAGERD_ENGINE_BINARY",
                engine_binary().display().to_string(),
            ),
            (
                "POOL_MANAGERD_TLS_CERT_FILE",
                pm_cert.cert.display().to_string(),
            ),
            (
                "POOL_MANAGERD_TLS_KEY_FILE",
                pm_cert.key.display().to_string(),
            ),
        ],
        &pm_log,
    );
    let pm_addr = logged_addr(
        &mut pm,
        &pm_log,
        "pool-managerd listening",
        Duration::from_secs(30),
    )
    .await;
    let orch_log = dir.path().join("orchestratord.log");
    let mut orch = spawn(
        &workspace_binary("orchestratord"),
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", runtime.display().to_string()),
            ("ORCHD_POOL_MANAGER_URL", format!("https://{pm_addr}")),
            ("ORCHD_POOL_HEALTH_INTERVAL_MS", "200".into()),
            ("ORCHD_TLS_CERT_FILE", orch_cert.cert.display().to_string()),
            ("ORCHD_TLS_KEY_FILE", orch_cert.key.display().to_string()),
            ("LLORCH_TLS_CA_FILE", ca.ca.display().to_string()),
            // The failed GPU-memory read of pool-managerd is logged at debug.
            ("RUST_LOG", "info,orchestratord=debug".into()),
        ],
        &orch_log,
    );
    let addr = logged_addr(
        &mut orch,
        &orch_log,
        "orchestratord listening",
        Duration::from_secs(30),
    )
    .await;
    assert!(
        log(&orch_log).contains("tls=on") || log(&orch_log).contains("tls=\"on\""),
        "{}",
        log(&orch_log)
    );
    let base = format!("https://{addr}");
    let api = OrchClient::over_tls(base.clone(), TOKEN, &ca.ca);
    api.wait_healthy(&["h0"], Duration::from_secs(40)).await;

    let id = api.submit(task("over tls", 16)).await;
    let st = api.finish(&id, Duration::from_secs(30)).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["tokens_out"], 16);
    // Several probe rounds have read pool-managerd's pool list over https by now.
    assert!(
        !log(&orch_log).contains("pool list unavailable"),
        "{}",
        log(&orch_log)
    );
    // Plain HTTP to the TLS port is not served.
    assert!(reqwest::get(format!("http://{addr}/health")).await.is_err());

    // The CLI over https: the right CA streams; another CA's is refused, saying why.
    let cli = |ca_file: &Path| {
        std::process::Command::new(workspace_binary("llorch"))
            .env_clear()
            .env("LLORCH_URL", &base)
            .env("LLORCH_API_TOKEN", TOKEN)
            .env("LLORCH_TLS_CA_FILE", ca_file)
            .args([
                "submit",
                "--model",
                "tiny",
                "--prompt",
                "cli",
                "--max-tokens",
                "4",
            ])
            .output()
            .unwrap()
    };
    let ok = cli(&ca.ca);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!ok.stdout.is_empty());
    let refused = cli(&other.ca);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");

    // Rotation: new files in place and SIGHUP; new connections get the new certificate.
    let next = other.leaf("orchestratord-next");
    std::fs::copy(&next.cert, &orch_cert.cert).unwrap();
    std::fs::copy(&next.key, &orch_cert.key).unwrap();
    signal(orch.id().unwrap(), "-HUP");
    logged_line(
        &orch_log,
        &["TLS certificate reloaded"],
        Duration::from_secs(10),
    )
    .await;
    let rotated = OrchClient::over_tls(base.clone(), TOKEN, &other.ca);
    assert_eq!(
        rotated.get_json("/v2/meta/version").await["service"],
        "orchestratord"
    );
    assert!(
        cli(&ca.ca).status.code() != Some(0),
        "the old CA still verifies the new certificate"
    );
}

// covers: AUTH-5202
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_over_mutual_tls_registers_polls_and_proxies_and_refuses_nodes_without_the_cluster_ca_or_their_name(
) {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&dir.path().join("pki"), "cluster");
    let other = TestCa::new(&dir.path().join("pki"), "other");
    let orch_cert = ca.leaf("orchestratord");
    let orch_log = dir.path().join("orchestratord.log");
    let mut orch = spawn(
        &workspace_binary("orchestratord"),
        &[
            ("ORCHD_PROFILE", "cloud".into()),
            ("ORCHD_NODE_REGISTRATION", "true".into()),
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_POOL_POLL_INTERVAL_MS", "300".into()),
            ("ORCHD_TLS_CERT_FILE", orch_cert.cert.display().to_string()),
            ("ORCHD_TLS_KEY_FILE", orch_cert.key.display().to_string()),
            ("ORCHD_TLS_CLIENT_CA_FILE", ca.ca.display().to_string()),
            ("LLORCH_TLS_CA_FILE", ca.ca.display().to_string()),
        ],
        &orch_log,
    );
    let addr = logged_addr(
        &mut orch,
        &orch_log,
        "orchestratord listening",
        Duration::from_secs(30),
    )
    .await;
    let base = format!("https://{addr}");
    let api = OrchClient::over_tls(base.clone(), TOKEN, &ca.ca);

    // A node: its own certificate of the cluster CA serves its API and proves it to
    // orchestratord.
    let node =
        |name: &str, pools: &str, cert: &llorch_test_support::pki::CertFiles, trusts: &Path| {
            let home = dir.path().join(name);
            std::fs::create_dir_all(&home).unwrap();
            let log_path = home.join("pool-managerd.log");
            let mut env =
                pool_managerd_env(Path::new(&pools_file(&home, pools)), &home.join("run"));
            env.extend([
                ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
                ("POOL_MANAGERD_NODE_ID", name.to_string()),
                ("POOL_MANAGERD_HEARTBEAT_INTERVAL_MS", "500".into()),
                ("POOL_MANAGERD_ORCHESTRATORD_URL", base.clone()),
                (
                    "POOL_MANAGERD_TLS_CERT_FILE",
                    cert.cert.display().to_string(),
                ),
                ("POOL_MANAGERD_TLS_KEY_FILE", cert.key.display().to_string()),
                ("LLORCH_TLS_CA_FILE", trusts.display().to_string()),
            ]);
            let child = spawn(&workspace_binary("pool-managerd"), &env, &log_path);
            (child, log_path)
        };
    // Its address, from the line it logged on binding port 0.
    let url_of = |mut started: (tokio::process::Child, PathBuf)| async move {
        let addr = logged_addr(
            &mut started.0,
            &started.1,
            "pool-managerd listening",
            Duration::from_secs(20),
        )
        .await;
        (started.0, started.1, format!("https://{addr}"))
    };
    let (_a, _a_log, a_url) = url_of(node(
        "node-a",
        &pool_toml("a0", 1, 2048),
        &ca.leaf("node-a"),
        &ca.ca,
    ))
    .await;
    api.wait_healthy(&["a0"], Duration::from_secs(40)).await;
    assert_eq!(api.node_at(&a_url).await["node_id"], "node-a");
    let id = api.submit(task("through the proxy over tls", 16)).await;
    let st = api.finish(&id, Duration::from_secs(30)).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pool_id"], "a0");
    assert_eq!(st["tokens_out"], 16);

    // Nodes that must not get in, each with the line its log must show and what it must say:
    // a certificate another CA signed (the handshake refuses it); a node trusting another CA
    // (it refuses orchestratord's certificate and says what to check); a node of the cluster
    // CA whose certificate names another node (its token would let it register as "node-b",
    // its certificate does not).
    let rogue = other.leaf("rogue");
    let lost = ca.leaf("lost");
    let impostor = ca.leaf("node-c");
    let refused = [
        (
            "rogue",
            "r0",
            &rogue,
            &ca.ca,
            "will retry registration",
            &["certificate"][..],
        ),
        (
            "lost",
            "l0",
            &lost,
            &other.ca,
            "will retry registration",
            &["UnknownIssuer", "LLORCH_TLS_CA_FILE"][..],
        ),
        (
            "node-b",
            "b0",
            &impostor,
            &ca.ca,
            "registration refused",
            &["403"][..],
        ),
    ];
    let mut held = Vec::new();
    for (name, pool, cert, trusts, marker, says) in refused {
        let (child, log) = node(name, &pool_toml(pool, 1, 2048), cert, trusts);
        let line = logged_line(&log, &[marker], Duration::from_secs(30)).await;
        assert!(says.iter().all(|w| line.contains(w)), "{name}: {line}");
        held.push(child);
    }
    let nodes: Vec<_> = api
        .nodes()
        .await
        .into_iter()
        .map(|n| n["node_id"].clone())
        .collect();
    assert_eq!(nodes, vec![serde_json::json!("node-a")]);

    // The node token without a client certificate is not enough to register.
    let r = api
        .http
        .post(format!("{base}/v2/nodes/register"))
        .json(&serde_json::json!({
            "node_id": "tokened", "address": "https://127.0.0.1:1", "gpus": [], "pools": []
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "FORBIDDEN", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("client certificate"),
        "{body}"
    );
}
