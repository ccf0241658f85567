//! Faults of the handoff directory on a real HOME orchestratord: a flood of handoff files, and
//! the directory removed and created again while the daemon runs. orchestratord runs alone (the
//! directory is its only input, no pool-managerd writes there) and every file names one real
//! llama-server. The periodic rescan is set to ten minutes: what happens within a test's
//! deadline comes from the directory watch.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llorch_contracts::HandoffFile;
use tokio::process::Child;

use crate::harness::*;

/// Longer than any test: a change seen within a deadline was seen by the watch.
const RESCAN_MS: &str = "600000";

/// A HOME orchestratord on its own runtime directory.
struct Home {
    _orch: Child,
    base: String,
    runtime_dir: PathBuf,
    log: PathBuf,
    api: llorch_client::OrchClient,
    _dir: tempfile::TempDir,
    _runtime: tempfile::TempDir,
}

impl Home {
    async fn start(extra: &[(&'static str, String)]) -> Home {
        let dir = tempfile::tempdir().unwrap();
        // A runtime directory lives on tmpfs (`/run`); so does this one where `/dev/shm` is
        // there, so that a burst of writes measures the watcher rather than the disk.
        let runtime = tempfile::tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let runtime_dir = runtime.path().join("run");
        // There before the daemon, as pool-managerd would make it: a write never races its
        // creation.
        std::fs::create_dir(&runtime_dir).unwrap();
        let log = dir.path().join("orchestratord.log");
        let mut env = vec![
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".to_string()),
            ("ORCHD_RUNTIME_DIR", runtime_dir.display().to_string()),
            ("ORCHD_HANDOFF_WATCH_INTERVAL_MS", RESCAN_MS.into()),
            ("ORCHD_SHUTDOWN_GRACE_MS", "3000".into()),
        ];
        env.extend(extra.iter().cloned());
        let mut orch = spawn(&workspace_binary("orchestratord"), &env, &log);
        let addr = logged_addr(
            &mut orch,
            &log,
            "orchestratord listening",
            Duration::from_secs(30),
        )
        .await;
        let base = format!("http://{addr}");
        wait_http_ok(
            "orchestratord health",
            &format!("{base}/health"),
            Duration::from_secs(30),
        )
        .await;
        Home {
            _orch: orch,
            api: llorch_client::OrchClient::new(&base, Some(TOKEN)),
            base,
            runtime_dir,
            log,
            _dir: dir,
            _runtime: runtime,
        }
    }

    async fn pool_ids(&self) -> Option<BTreeSet<String>> {
        let pools = self.api.pools().await.ok()?;
        Some(pools.pools.into_iter().map(|p| p.pool_id).collect())
    }

    /// Waits until `GET /v2/pools` lists exactly `ids`; returns how long that took.
    async fn wait_pools(&self, ids: &[&str], within: Duration) -> Duration {
        let want: BTreeSet<String> = ids.iter().map(|s| s.to_string()).collect();
        let started = Instant::now();
        wait_for(&format!("pools {ids:?}"), within, || async {
            (self.pool_ids().await? == want).then_some(())
        })
        .await;
        started.elapsed()
    }

    /// Waits until `GET /v2/pools` lists `n` pools, all healthy; returns how long that took.
    async fn wait_healthy_count(&self, n: usize, within: Duration) -> Duration {
        let started = Instant::now();
        wait_for(&format!("{n} healthy pools"), within, || async {
            let pools = self.api.pools().await.ok()?.pools;
            (pools.len() == n && pools.iter().all(|p| p.healthy)).then_some(())
        })
        .await;
        started.elapsed()
    }

    fn log_lines(&self, message: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(message))
            .count()
    }
}

/// `GET /health` asked back to back (each answer within 1 s) until stopped.
struct HealthPoll {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<HealthSeen>,
}

#[derive(Debug)]
struct HealthSeen {
    answered: usize,
    slowest: Duration,
    failures: Vec<String>,
}

impl HealthPoll {
    fn start(base: &str) -> HealthPoll {
        let stop = Arc::new(AtomicBool::new(false));
        let url = format!("{base}/health");
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut seen = HealthSeen {
                    answered: 0,
                    slowest: Duration::ZERO,
                    failures: Vec::new(),
                };
                while !stop.load(Ordering::Relaxed) {
                    let asked = Instant::now();
                    match http.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            seen.answered += 1;
                            seen.slowest = seen.slowest.max(asked.elapsed());
                        }
                        Ok(r) => seen.failures.push(format!("status {}", r.status())),
                        Err(e) => seen.failures.push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                seen
            }
        });
        HealthPoll { stop, task }
    }

    async fn stop(self) -> HealthSeen {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

// covers: POOL-3208
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_handoff_files_in_one_second_are_all_bound_then_all_unbound_while_health_answers(
) {
    const FILES: usize = 1000;
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let home = Home::start(&[
        // Every bound pool is probed at once on each tick: at 1000 pools that would measure
        // the prober, not the watcher. Binding still probes each pool once.
        ("ORCHD_POOL_HEALTH_INTERVAL_MS", "60000".into()),
    ])
    .await;
    let health = HealthPoll::start(&home.base);

    let started = Instant::now();
    let written = tokio::task::spawn_blocking({
        let dir = home.runtime_dir.clone();
        let url = engine.url.clone();
        move || {
            for i in 0..FILES {
                let file = HandoffFile::external(&format!("flood-{i:04}"), &url, "tiny", 1);
                llorch_handoff::write_atomic(&dir, &file).unwrap();
            }
            started.elapsed()
        }
    })
    .await
    .unwrap();
    // About 0.1 s on tmpfs; a loaded machine may take longer, and the watcher is tested all
    // the same (timings are printed, not asserted: this runs beside other tests on 2 cores).
    let bound = home
        .wait_healthy_count(FILES, Duration::from_secs(20))
        .await;

    let deleting = Instant::now();
    for i in 0..FILES {
        std::fs::remove_file(home.runtime_dir.join(format!("flood-{i:04}.json"))).unwrap();
    }
    let unbound = home.wait_pools(&[], Duration::from_secs(20)).await;
    let seen = health.stop().await;

    assert!(seen.failures.is_empty(), "/health failed: {seen:?}");
    assert!(
        seen.answered >= 10,
        "/health was asked too rarely: {seen:?}"
    );
    // Each file bound and unbound exactly once: nothing lost, nothing repeated.
    assert_eq!(home.log_lines("pool bound from handoff file"), FILES);
    assert_eq!(home.log_lines("handoff file deleted; pool unbound"), FILES);
    assert_eq!(home.log_lines("ignoring invalid handoff file"), 0);
    eprintln!(
        "{FILES} files written in {written:?}, all bound {bound:?} later; deleted in {:?}, all \
         unbound {unbound:?} later; /health: {seen:?}",
        deleting.elapsed() - unbound
    );
}

// covers: POOL-3207
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_dir_removed_and_created_again_unbinds_its_pools_and_is_watched_again() {
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let home = Home::start(&[]).await;
    let write = |dir: &Path, id: &str| {
        llorch_handoff::write_atomic(dir, &HandoffFile::external(id, &engine.url, "tiny", 1))
            .unwrap();
    };
    write(&home.runtime_dir, "a");
    write(&home.runtime_dir, "b");
    home.wait_pools(&["a", "b"], Duration::from_secs(10)).await;

    std::fs::remove_dir_all(&home.runtime_dir).unwrap();
    let retired = home.wait_pools(&[], Duration::from_secs(5)).await;

    std::fs::create_dir(&home.runtime_dir).unwrap();
    write(&home.runtime_dir, "c");
    let rebound = home.wait_pools(&["c"], Duration::from_secs(5)).await;
    // `c` may have come from the rescan that follows a new watch; `d` only from the watch.
    write(&home.runtime_dir, "d");
    let watched = home.wait_pools(&["c", "d"], Duration::from_secs(5)).await;
    assert_eq!(
        home.log_lines("handoff directory is back; watching it again"),
        1,
        "the return is logged once"
    );
    eprintln!(
        "retired {retired:?} after the removal; c bound {rebound:?} after the directory came \
         back, d {watched:?} after its write (rescan every {RESCAN_MS} ms)"
    );
}

// covers: POOL-3207
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_managerd_writes_its_handoff_file_again_when_the_runtime_dir_comes_back() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        ..Default::default()
    })
    .await;
    // pool-managerd may write into it while it is being removed: try again until it is gone.
    wait_for(
        "the runtime dir removed",
        Duration::from_secs(10),
        || async { std::fs::remove_dir_all(&s.runtime_dir).ok() },
    )
    .await;
    wait_for(
        "the pool gone with its file",
        Duration::from_secs(10),
        || async {
            let v: serde_json::Value = s.get("/v2/pools").await.json().await.unwrap();
            v["pools"]
                .as_array()
                .is_some_and(Vec::is_empty)
                .then_some(())
        },
    )
    .await;
    std::fs::create_dir(&s.runtime_dir).unwrap();
    // The engine never stopped: pool-managerd writes its file again at its next health probe.
    s.wait_pools_ready(1).await;
    let a = s.submit_ok(task("the", 4)).await;
    let st = s.wait_task(&a.task_id, Duration::from_secs(30)).await;
    assert_eq!(st.state, llorch_contracts::tasks::TaskState::Completed);
    let log = std::fs::read_to_string(s.runtime_dir.with_file_name("pool-managerd.log")).unwrap();
    assert!(
        log.contains("handoff file of a serving pool is gone; writing it again"),
        "{log}"
    );
}
