//! pool-managerd with nothing to do uses (almost) no CPU: its supervisor probes at the
//! configured interval, and reading a handoff file does not wake its own watcher.

use std::time::Duration;

use llorch_contracts::HandoffFile;

use crate::harness::*;

// covers: OBS-6114
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_managerd_idle_for_10s_with_managed_and_external_pools_uses_under_5_percent_of_a_core()
{
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("managed", &tiny_model(), 1, 1024),
        ..Default::default()
    })
    .await;
    d.wait_ready("managed").await;
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let file = HandoffFile::external("ext", &engine.url, "tiny", 1);
    llorch_handoff::write_atomic(&d.runtime_dir, &file).unwrap();
    d.wait_ready("ext").await;

    let window = Duration::from_secs(10);
    let share = cpu_shares(&[d.child.id().unwrap()], window).await[0];
    assert!(
        share < 0.05,
        "idle pool-managerd used {:.1}% of a core over {window:?}",
        share * 100.0
    );
}
