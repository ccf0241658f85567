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
