use std::time::Duration;

use llorch_contracts::{HandoffFile, PoolState, ProvisioningMode};

use crate::harness::*;

// covers: POOL-3103, POOL-3201
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pools_from_one_config_reach_ready_with_slots_and_handoff_files() {
    let model = tiny_model();
    let toml = format!(
        "{}{}",
        pool_toml("alpha", &model, 2, 1024),
        pool_toml("beta", &model, 3, 1536)
    );
    let d = Daemon::start(DaemonOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    let a = d.wait_ready("alpha").await;
    let b = d.wait_ready("beta").await;
    assert_eq!(a.slots_total, 2);
    assert_eq!(b.slots_total, 3);
    assert_eq!(a.model_id, "tiny");
    assert_eq!(a.node_id, "test-node");
    assert_eq!(a.ctx_max, Some(512));
    assert_eq!(a.provisioning_mode, ProvisioningMode::Managed);

    let all = d.pools().await;
    let ids: Vec<_> = all.pools.iter().map(|p| p.pool_id.as_str()).collect();
    assert_eq!(ids, vec!["alpha", "beta"]);
    assert!(all.pools.iter().all(|p| p.state == PoolState::Ready));
    assert_eq!(all.node_id, "test-node");
    assert!(["nvml", "cpu-only"].contains(&all.gpu_discovery.as_str()));

    for (id, slots, status) in [("alpha", 2, &a), ("beta", 3, &b)] {
        let bytes = std::fs::read(d.runtime_dir.join(format!("{id}.json"))).unwrap();
        let file = HandoffFile::parse(&bytes).unwrap();
        assert_eq!(file.pool_id, id);
        assert_eq!(file.slots_total, slots);
        assert_eq!(file.provisioning_mode, ProvisioningMode::Managed);
        assert_eq!(Some(&file.url), status.url.as_ref());
        assert!(file.url.starts_with("http://127.0.0.1:"));
        // The engine behind the handoff file really serves.
        let health = reqwest::get(format!("{}/health", file.url)).await.unwrap();
        assert_eq!(health.status(), 200);
        assert!(pid_alive(file.pid.unwrap()));
    }
}

// covers: POOL-3112
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_within_grace_and_no_engine_survives() {
    let model = tiny_model();
    let toml = format!(
        "{}{}",
        pool_toml("p1", &model, 1, 512),
        pool_toml("p2", &model, 1, 512)
    );
    let mut d = Daemon::start(DaemonOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    d.wait_ready("p1").await;
    d.wait_ready("p2").await;
    let pids: Vec<u32> = ["p1", "p2"]
        .iter()
        .map(|id| {
            let f = HandoffFile::parse(
                &std::fs::read(d.runtime_dir.join(format!("{id}.json"))).unwrap(),
            )
            .unwrap();
            f.pid.unwrap()
        })
        .collect();
    assert!(pids.iter().all(|p| pid_alive(*p)));

    d.signal("TERM");
    // Grace is 3 s for engines plus 2 s for the server; exit must come within that.
    let status = tokio::time::timeout(Duration::from_secs(6), d.child.wait())
        .await
        .expect("daemon did not exit within the grace period")
        .unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log()
    );
    for pid in pids {
        assert!(!pid_alive(pid), "engine {pid} survived the daemon");
    }
    assert!(
        !d.runtime_dir.join("p1.json").exists(),
        "handoff file left behind"
    );
}

// covers: POOL-3104
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_mask_reaches_the_engine_as_cuda_visible_devices() {
    let toml = pool_toml("masked", &tiny_model(), 1, 512)
        .replace("slots = 1", "slots = 1\ndevice_mask = \"1,GPU-abc\"");
    let d = Daemon::start(DaemonOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    let st = d.wait_ready("masked").await;
    assert_eq!(st.device_mask.as_deref(), Some("1,GPU-abc"));
    let pid = HandoffFile::parse(&std::fs::read(d.runtime_dir.join("masked.json")).unwrap())
        .unwrap()
        .pid
        .unwrap();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    assert!(
        vars.contains(&&b"CUDA_VISIBLE_DEVICES=1,GPU-abc"[..]),
        "engine environment lacks the device mask"
    );
}

/// `/proc/{pid}/{what}` as text (NULs as spaces or newlines are kept as NULs).
fn proc_text(pid: u32, what: &str) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/{what}")).unwrap()).into_owned()
}

// covers: POOL-3120, POOL-3121
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_answers_only_its_own_key_which_no_command_line_log_or_other_engine_holds() {
    let model = tiny_model();
    let d = Daemon::start(DaemonOptions {
        pools_toml: format!(
            "{}{}",
            pool_toml("k1", &model, 1, 512),
            pool_toml("k2", &model, 1, 512)
        ),
        ..Default::default()
    })
    .await;
    let status = d.wait_ready("k1").await;
    d.wait_ready("k2").await;
    let url = status.url.unwrap();
    let key = llorch_handoff::read_key(&d.runtime_dir, "k1")
        .unwrap()
        .unwrap();
    let other = llorch_handoff::read_key(&d.runtime_dir, "k2")
        .unwrap()
        .unwrap();
    assert_ne!(key, other, "two engines share a key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(llorch_handoff::key_path(&d.runtime_dir, "k1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let http = reqwest::Client::new();
    let completion = serde_json::json!({"prompt": "the", "n_predict": 2});
    let post = |key: Option<&str>| {
        let mut rb = http.post(format!("{url}/completion")).json(&completion);
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        async move { rb.send().await.unwrap().status().as_u16() }
    };
    // A local user without the key (or with another engine's) gets nothing; /health is open.
    assert_eq!(post(None).await, 401);
    assert_eq!(post(Some(&other)).await, 401);
    assert_eq!(post(Some(TOKEN)).await, 401);
    assert_eq!(post(Some(&key)).await, 200);
    for path in ["/slots", "/metrics", "/props"] {
        let s = http
            .get(format!("{url}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(s, 401, "{path} open without the key");
    }
    assert_eq!(
        http.get(format!("{url}/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // The proxy presents the key (the node token stays with pool-managerd), and the probes do:
    // the pool reports its slots.
    assert_eq!(d.complete_through_proxy("k1").await, 200);
    assert_eq!(d.status("k1").await.unwrap().slots_free, 1);

    // The key is in the engine's environment alone: not its command line, not a log; and the
    // daemon's token is not in the engine's environment at all.
    let pid = HandoffFile::parse(&std::fs::read(d.runtime_dir.join("k1.json")).unwrap())
        .unwrap()
        .pid
        .unwrap();
    let environ = proc_text(pid, "environ");
    assert!(environ
        .split('\0')
        .any(|v| v == format!("LLAMA_API_KEY={key}")));
    assert!(
        !environ.contains(TOKEN),
        "the daemon's token reached the engine"
    );
    assert!(!environ.contains("POOL_MANAGERD_"), "{environ}");
    assert!(!proc_text(pid, "cmdline").contains(&key));
    let engine_log = std::fs::read_to_string(d.runtime_dir.join("logs/k1.log")).unwrap();
    assert!(!engine_log.is_empty());
    assert!(!engine_log.contains(&key), "the engine logged its key");
    let log = d.log();
    assert!(!log.is_empty());
    assert!(!log.contains(&key), "pool-managerd logged the engine's key");
}

/// A copy of the engine (its directory: the binary finds its libraries beside itself) that any
/// user may read and run, in `dir`.
fn engine_for_anyone(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let engine = std::fs::canonicalize(engine_binary()).unwrap();
    let from = engine.parent().unwrap();
    let to = dir.join("engine");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        match std::fs::read_link(&path) {
            Ok(link) => std::os::unix::fs::symlink(link, &target).unwrap(),
            Err(_) => {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    for d in [dir, to.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    to.join(engine.file_name().unwrap())
}

// covers: POOL-3122
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_run_as_the_configured_user_and_still_serve() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_for_anyone(dir.path());
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("u1", &tiny_model(), 1, 512),
        extra_env: vec![
            ("POOL_MANAGERD_ENGINE_USER".into(), "nobody".into()),
            (
                "POOL_MANAGERD_ENGINE_BINARY".into(),
                engine.display().to_string(),
            ),
        ],
        ..Default::default()
    })
    .await;
    d.wait_ready("u1").await;
    let pid = HandoffFile::parse(&std::fs::read(d.runtime_dir.join("u1.json")).unwrap())
        .unwrap()
        .pid
        .unwrap();
    let status = proc_text(pid, "status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(uid, "65534", "the engine does not run as nobody: {status}");
    assert_eq!(d.complete_through_proxy("u1").await, 200);
}
