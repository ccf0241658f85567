//! A daemon with nothing to do uses (almost) no CPU: periodic jobs run at their configured
//! intervals only, and nothing reacts to its own reads. Each test leaves a daemon idle for 10 s
//! and reads its CPU time from `/proc/<pid>/stat`.

use std::time::Duration;

use llorch_contracts::HandoffFile;

use crate::cloud::{start_node, start_orchestratord};
use crate::harness::*;

pub const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Share of one core an idle daemon may use.
pub const IDLE_CPU_MAX: f64 = 0.05;

// covers: OBS-6114
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_orchestratord_idle_for_10s_uses_under_5_percent_of_a_core() {
    // The HOME shape of `make up`: pool-managerd and orchestratord watch one directory, which
    // holds a managed pool's file and an external provisioner's file.
    let stack = Stack::start(StackOptions {
        pools_toml: pool_toml("managed", 1, 1024),
        ..Default::default()
    })
    .await;
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let file = HandoffFile::external("ext", &engine.url, "tiny", 1);
    llorch_handoff::write_atomic(&stack.runtime_dir, &file).unwrap();
    stack.wait_pools_ready(2).await;

    let pids = [stack.orch.id().unwrap(), stack.pm.id().unwrap()];
    let shares = cpu_shares(&pids, IDLE_WINDOW).await;
    assert!(
        shares[0] < IDLE_CPU_MAX,
        "idle HOME orchestratord used {:.1}% of a core over {IDLE_WINDOW:?}",
        shares[0] * 100.0
    );
    // Its neighbour on the same directory must not be woken by orchestratord's reads either.
    assert!(
        shares[1] < IDLE_CPU_MAX,
        "idle pool-managerd beside HOME orchestratord used {:.1}% of a core",
        shares[1] * 100.0
    );
}

// covers: OBS-6114
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_orchestratord_idle_for_10s_uses_under_5_percent_of_a_core() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "node-a", &pool_toml("a0", 1, 1024), &[]).await;
    let cloud = start_orchestratord(dir, &[("ORCHD_POOL_MANAGERS", node.url.clone())]).await;
    cloud
        .api
        .wait_healthy(&["a0"], Duration::from_secs(40))
        .await;

    let pids = [cloud.orch.id().unwrap(), node.child.id().unwrap()];
    let shares = cpu_shares(&pids, IDLE_WINDOW).await;
    assert!(
        shares[0] < IDLE_CPU_MAX,
        "idle CLOUD orchestratord used {:.1}% of a core over {IDLE_WINDOW:?}",
        shares[0] * 100.0
    );
    assert!(
        shares[1] < IDLE_CPU_MAX,
        "idle polled pool-managerd used {:.1}% of a core",
        shares[1] * 100.0
    );
}
