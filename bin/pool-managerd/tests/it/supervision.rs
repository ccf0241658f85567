use std::time::Duration;

use llorch_contracts::{PoolState, PoolStatus};

use crate::harness::*;

fn engine_pid(d: &Daemon, id: &str) -> u32 {
    let bytes = std::fs::read(d.runtime_dir.join(format!("{id}.json"))).unwrap();
    llorch_contracts::HandoffFile::parse(&bytes)
        .unwrap()
        .pid
        .unwrap()
}

// covers: POOL-3105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_engine_is_restarted_and_the_other_pool_is_never_disturbed() {
    let model = tiny_model();
    let toml = format!(
        "{}{}",
        pool_toml("victim", &model, 1, 512),
        pool_toml("bystander", &model, 1, 512)
    );
    let d = Daemon::start(DaemonOptions {
        pools_toml: toml,
        ..Default::default()
    })
    .await;
    let before = d.wait_ready("victim").await;
    let bystander = d.wait_ready("bystander").await;
    let victim_pid = engine_pid(&d, "victim");
    let bystander_pid = engine_pid(&d, "bystander");

    // Watch the bystander on every poll while the victim dies and comes back.
    signal(victim_pid, "-KILL");
    let saw_not_ready = std::cell::Cell::new(false);
    let after: PoolStatus = wait_for(
        "victim restarted and ready",
        Duration::from_secs(30),
        || {
            let d = &d;
            let saw = &saw_not_ready;
            let bystander = &bystander;
            async move {
                let pools = d.pools().await.pools;
                let by = pools.iter().find(|p| p.pool_id == "bystander").unwrap();
                assert!(by.ready, "bystander disturbed: {by:?}");
                assert_eq!(by.restart_count, 0);
                assert_eq!(by.url, bystander.url);
                let v = pools.into_iter().find(|p| p.pool_id == "victim").unwrap();
                if !v.ready {
                    saw.set(true);
                }
                (v.ready && v.restart_count > 0).then_some(v)
            }
        },
    )
    .await;
    assert!(
        saw_not_ready.get(),
        "victim never reported not-ready after kill -9"
    );
    assert_eq!(after.restart_count, before.restart_count + 1);
    assert!(
        after
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("signal 9"),
        "{after:?}"
    );
    assert_ne!(engine_pid(&d, "victim"), victim_pid);
    assert_eq!(engine_pid(&d, "bystander"), bystander_pid);
    assert!(pid_alive(bystander_pid));
    let m = d.metrics().await;
    assert_eq!(
        metric_value(&m, "pool_engine_restarts_total", &[("pool_id", "victim")]),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "pool_engine_restarts_total",
            &[("pool_id", "bystander")]
        ),
        Some(0.0)
    );
}

// covers: POOL-3107
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_crashing_engine_ends_failed_with_last_error_and_bounded_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let broken = broken_model(dir.path());
    let d = Daemon::start_in(
        dir,
        DaemonOptions {
            pools_toml: pool_toml("crashy", &broken, 1, 512),
            ..Default::default()
        },
    )
    .await;
    let failed = d
        .wait_pool("crashy", "failed", Duration::from_secs(30), |s| {
            s.state == PoolState::Failed
        })
        .await;
    assert!(!failed.ready && !failed.live);
    let err = failed.last_error.clone().unwrap_or_default();
    assert!(err.contains("before becoming healthy"), "last_error: {err}");
    // Circuit: 5 failures inside the window → 4 restarts, then failed.
    assert_eq!(failed.restart_count, 4, "{failed:?}");
    // That the circuit then stays open for its whole period (no restart meanwhile) is timed on
    // the paused clock (`supervisor_bounds::the_fifth_failure_within_five_minutes_opens_…`).
    let m = d.metrics().await;
    assert_eq!(
        metric_value(&m, "pool_engine_restarts_total", &[("pool_id", "crashy")]),
        Some(4.0)
    );
    assert_eq!(
        metric_value(&m, "pool_ready", &[("pool_id", "crashy")]),
        Some(0.0)
    );
}

/// `/proc/<pid>/stat` field 22 (start time in clock ticks after boot).
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = stat.rsplit_once(')').unwrap();
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// A runtime dir whose pid record names a running engine, with this start time and boot id.
async fn runtime_with_orphan(
    start: impl Fn(u32) -> u64,
    boot: &str,
) -> (tempfile::TempDir, ExternalEngine) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(runtime.join("engines")).unwrap();
    let orphan = ExternalEngine::start(&tiny_model(), 1).await;
    let pid = orphan.child.id().unwrap();
    std::fs::write(
        runtime.join("engines/old.a.pid"),
        serde_json::json!({
            "pid": pid, "pool_id": "old", "binary": engine_binary().display().to_string(),
            "start_ticks": start(pid), "boot_id": boot
        })
        .to_string(),
    )
    .unwrap();
    (dir, orphan)
}

// covers: POOL-3113
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_daemon_kills_engines_left_behind() {
    // An engine recorded by a "previous run" in the runtime dir's pid records.
    let (dir, mut orphan) = runtime_with_orphan(start_ticks, &boot_id()).await;
    let d = Daemon::start_in(dir, DaemonOptions::default()).await;
    // The daemon answers /health only after cleanup, so the orphan must be gone already.
    let status = tokio::time::timeout(Duration::from_secs(5), orphan.child.wait()).await;
    assert!(status.is_ok(), "orphan engine still running");
    assert!(!d.runtime_dir.join("engines/old.a.pid").exists());
    assert!(d.log().contains("killing engine left behind"));
}

// covers: POOL-3113
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pid_from_another_start_or_boot_is_left_alone() {
    // Same pid and binary, but the record is of an earlier process (another start time), or
    // of another boot: a reused pid, not our engine.
    for (start, boot) in [
        (
            Box::new(|pid| start_ticks(pid) + 1) as Box<dyn Fn(u32) -> u64>,
            boot_id(),
        ),
        (
            Box::new(start_ticks),
            "00000000-0000-0000-0000-000000000000".to_string(),
        ),
    ] {
        let (dir, mut orphan) = runtime_with_orphan(start, &boot).await;
        let d = Daemon::start_in(dir, DaemonOptions::default()).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), orphan.child.wait())
                .await
                .is_err(),
            "an unrelated process was killed"
        );
        assert!(
            !d.runtime_dir.join("engines/old.a.pid").exists(),
            "stale record kept"
        );
        assert!(d.log().contains("leaving it alone"), "{}", d.log());
    }
}

// covers: POOL-3108
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_engine_is_killed_and_restarted() {
    let d = Daemon::start(DaemonOptions {
        pools_toml: pool_toml("hung", &tiny_model(), 1, 512),
        ..Default::default()
    })
    .await;
    d.wait_ready("hung").await;
    let pid = engine_pid(&d, "hung");
    // SIGSTOP: the process lives but answers nothing — a hang, not a crash.
    signal(pid, "-STOP");
    let after = d
        .wait_pool(
            "hung",
            "restarted after hang",
            Duration::from_secs(30),
            |s| s.ready && s.restart_count == 1,
        )
        .await;
    assert!(
        after
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("engine hung"),
        "{after:?}"
    );
    assert!(!pid_alive(pid), "hung engine was not killed");
    let m = d.metrics().await;
    assert!(
        metric_value(
            &m,
            "pool_health_checks_total",
            &[("pool_id", "hung"), ("outcome", "fail")]
        )
        .unwrap()
            >= 3.0
    );
}
