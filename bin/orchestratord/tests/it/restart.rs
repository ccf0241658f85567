//! A pool whose engine restarts keeps its model: submissions queue instead of 503, and run
//! after the restart; a pool whose circuit opens makes its model unavailable at once. Real
//! engines, HOME and CLOUD.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cloud::{start_node, start_orchestratord};
use crate::harness::*;

// covers: ORCH-2111
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_killed_while_clients_submit_gets_no_503_and_tasks_submitted_meanwhile_complete() {
    let s = Arc::new(
        Stack::start(StackOptions {
            pools_toml: pool_toml("p0", 2, 4096),
            ..Default::default()
        })
        .await,
    );
    let pid = s.handoff("p0").pid.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<parking_lot::Mutex<Option<Instant>>> = Default::default();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (s, stop, killed_at) = (s.clone(), stop.clone(), killed_at.clone());
            tokio::spawn(async move {
                // (task id, submitted after the kill)
                let mut mine = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let body = serde_json::json!({
                        "task_id": format!("c{c}-{n}"), "model_ref": "tiny",
                        "prompt": format!("client {c} task {n}"), "max_tokens": 16
                    });
                    let after_kill = killed_at.lock().is_some();
                    let r = s.submit(body.clone()).await;
                    assert_eq!(r.status(), 202, "{:?}", r.text().await);
                    // The same submission again (a client that lost the answer) is the same task.
                    let again = s.submit_ok(body).await;
                    assert_eq!(again.task_id, format!("c{c}-{n}"));
                    mine.push((again.task_id, after_kill));
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                mine
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    *killed_at.lock() = Some(Instant::now());
    signal(pid, "-KILL");
    // Keep submitting through the restart until a new engine serves, and a little after.
    wait_for("a new engine", Duration::from_secs(30), || async {
        let f = std::fs::read(s.runtime_dir.join("p0.json")).ok()?;
        let h = llorch_contracts::HandoffFile::parse(&f).ok()?;
        (h.pid != Some(pid) && h.state.is_none()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut during = 0;
    for c in clients {
        for (id, after_kill) in c.await.unwrap() {
            let st = s.wait_task(&id, Duration::from_secs(60)).await;
            let frames = s.events(&id).await;
            let n = names(&frames);
            let terminals = n.iter().filter(|e| **e == "end" || **e == "error").count();
            assert_eq!(terminals, 1, "{id}: {n:?}");
            if after_kill {
                during += 1;
                assert_eq!(
                    n.last(),
                    Some(&"end"),
                    "{id} submitted after the kill: {st:?}"
                );
            }
        }
    }
    assert!(during > 0, "no submission happened during the restart");
}

// covers: ORCH-2112
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_circuit_opens_ends_its_queued_tasks_and_its_model_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tiny_model(), &model).unwrap();
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&model, "p0", 1, 1024),
        ..Default::default()
    })
    .await;
    let pid = s.handoff("p0").pid.unwrap();
    // From now on every start fails: the model file is garbage.
    std::fs::write(&model, b"GGUF not a model any more").unwrap();
    signal(pid, "-KILL");
    // Restarting: a new task is admitted and queues.
    let queued = s.submit_ok(task("waits for the restart", 8)).await.task_id;
    let killed = Instant::now();
    let st = s.wait_task(&queued, Duration::from_secs(60)).await;
    assert_eq!(st.error.unwrap().code.as_str(), "POOL_UNAVAILABLE");
    // Ended when the circuit opened (five quick failures), not after the 5-minute queue wait.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    let r = s.submit(task("after the circuit opened", 8)).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["code"], "MODEL_NOT_AVAILABLE");
}

/// The engine pid of `pool` on a CLOUD node, from the node's own handoff file.
fn node_engine(node: &crate::cloud::Node, pool: &str) -> (Option<u32>, bool) {
    std::fs::read(node.runtime_dir.join(format!("{pool}.json")))
        .ok()
        .and_then(|b| llorch_contracts::HandoffFile::parse(&b).ok())
        .map(|h| (h.pid, h.state.is_none()))
        .unwrap_or((None, false))
}

/// One node (pool `a0`, restart backoff 200 ms) polled by a CLOUD orchestratord; returns them
/// and the engine's pid once the pool is healthy.
async fn cloud_with_one_pool(
    dir: tempfile::TempDir,
    pools: &str,
) -> (crate::cloud::Node, crate::cloud::Cloud, u32) {
    let node = start_node(
        dir.path(),
        "node-a",
        pools,
        &[("POOL_MANAGERD_RESTART_BACKOFF_MS", "200".into())],
    )
    .await;
    let cloud = start_orchestratord(dir, &[("ORCHD_POOL_MANAGERS", node.url.clone())]).await;
    cloud
        .api
        .wait_healthy(&["a0"], Duration::from_secs(40))
        .await;
    let pid = node_engine(&node, "a0").0.unwrap();
    (node, cloud, pid)
}

// covers: CLOUD-4106
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_engine_killed_while_clients_submit_gets_no_503_and_tasks_submitted_meanwhile_complete(
) {
    let dir = tempfile::tempdir().unwrap();
    let (node, cloud, pid) = cloud_with_one_pool(dir, &pool_toml("a0", 2, 4096)).await;
    let mut submitted = Vec::new();
    let mut killed = false;
    let started = Instant::now();
    let mut restarted_at: Option<Instant> = None;
    let mut n = 0;
    // Submit (and resubmit) every 50 ms: before the kill, through the restart, and 500 ms past it.
    while restarted_at.is_none_or(|r| r.elapsed() < Duration::from_millis(500)) {
        assert!(started.elapsed() < Duration::from_secs(60), "no restart");
        if !killed && started.elapsed() > Duration::from_millis(300) {
            signal(pid, "-KILL");
            killed = true;
        }
        let body = serde_json::json!({
            "task_id": format!("t-{n}"), "model_ref": "tiny", "prompt": format!("task {n}"),
            "max_tokens": 16
        });
        let id = cloud.api.submit(body.clone()).await;
        assert_eq!(
            cloud.api.submit(body).await,
            id,
            "resubmission is the same task"
        );
        submitted.push((id, killed));
        n += 1;
        if killed && restarted_at.is_none() {
            let (new_pid, serving) = node_engine(&node, "a0");
            if serving && new_pid.is_some_and(|p| p != pid) {
                restarted_at = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut during = 0;
    for (id, after_kill) in &submitted {
        let st = cloud.api.finish(id, Duration::from_secs(60)).await;
        if *after_kill {
            during += 1;
            assert_eq!(
                st["state"], "completed",
                "{id} submitted after the kill: {st}"
            );
        }
    }
    assert!(during > 0);
}

// covers: CLOUD-4106
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_pool_whose_circuit_opens_ends_its_queued_tasks_and_its_model_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tiny_model(), &model).unwrap();
    let pools = pool_toml_for(&model, "a0", 1, 1024);
    let (_node, cloud, pid) = cloud_with_one_pool(dir, &pools).await;
    std::fs::write(&model, b"GGUF not a model any more").unwrap();
    signal(pid, "-KILL");
    let queued = cloud.api.submit(task("waits for the restart", 8)).await;
    let killed = Instant::now();
    let st = cloud.api.finish(&queued, Duration::from_secs(60)).await;
    assert_eq!(st["error"]["code"], "POOL_UNAVAILABLE", "{st}");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    let r = cloud
        .api
        .http
        .post(format!("{}/v2/tasks", cloud.api.base))
        .json(&task("after the circuit opened", 8))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
}
