//! Placement, session affinity, provisioning and supervision of pools.

use std::time::Duration;

use cucumber::{given, then, when};
use llorch_contracts::HandoffFile;
use llorch_test_support::{authed_client, pid_alive, signal, wait_for};

use super::task_body;
use crate::daemons;
use crate::world::Bdd;

const FINISH_WITHIN: Duration = Duration::from_secs(30);

fn pinned(prompt: &str, tokens: u32, pool: &str) -> serde_json::Value {
    let mut b = task_body(prompt, tokens);
    b["placement"] = serde_json::json!({"mode": "pin", "pin_pool_id": pool});
    b
}

fn in_session(prompt: &str, tokens: u32, session: &str) -> serde_json::Value {
    let mut b = task_body(prompt, tokens);
    b["session_id"] = session.into();
    b
}

/// The pool a finished task ran on.
async fn pool_of(w: &Bdd, name: &str) -> String {
    let s = w.wait_finished(&w.task_id(name), FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
    s["pool_id"].as_str().unwrap().to_string()
}

#[when(expr = "a client submits a task {string} of {int} tokens pinned to pool {string}")]
async fn submit_pinned(w: &mut Bdd, name: String, tokens: u32, pool: String) {
    w.submit(Some(&name), pinned(&name, tokens, &pool)).await;
}

#[given(expr = "a task {string} of session {string} has completed")]
async fn session_turn_done(w: &mut Bdd, name: String, session: String) {
    w.submit_ok(&name, in_session(&name, 4, &session)).await;
    pool_of(w, &name).await;
}

#[given(expr = "a long task {string} pinned to the pool of task {string} is running")]
async fn long_pinned_task(w: &mut Bdd, name: String, other: String) {
    let pool = pool_of(w, &other).await;
    let id = w.submit_ok(&name, pinned("the", 3000, &pool)).await;
    w.wait_started(&id, Duration::from_secs(10)).await;
}

#[when(expr = "a client submits a task {string} of {int} tokens in session {string}")]
async fn submit_in_session(w: &mut Bdd, name: String, tokens: u32, session: String) {
    w.submit_ok(&name, in_session(&name, tokens, &session))
        .await;
}

#[then(expr = "task {string} completes on the pool of task {string}")]
async fn same_pool(w: &mut Bdd, name: String, other: String) {
    assert_eq!(pool_of(w, &name).await, pool_of(w, &other).await);
}

#[then(expr = "task {string} completes on the pool other than that of task {string}")]
async fn other_pool(w: &mut Bdd, name: String, other: String) {
    assert_ne!(pool_of(w, &name).await, pool_of(w, &other).await);
}

#[then(expr = "session {string} reports {int} turns, the last on the pool of task {string}")]
async fn session_reports(w: &mut Bdd, session: String, turns: u64, other: String) {
    let pool = pool_of(w, &other).await;
    let r = w
        .http(&w.client_token)
        .get(format!("{}/v2/sessions/{session}", w.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["turns"], turns, "{v}");
    assert_eq!(v["last_pool_id"], pool.as_str(), "{v}");
    assert!(v["ttl_ms_remaining"].as_u64().unwrap() > 0, "{v}");
}

/// The handoff file of a pool, when it is there (pool-managerd rewrites it on a restart).
fn try_handoff(w: &Bdd, pool: &str) -> Option<HandoffFile> {
    let path = w.d().home().runtime_dir.join(format!("{pool}.json"));
    HandoffFile::parse(&std::fs::read(path).ok()?).ok()
}

fn handoff(w: &Bdd, pool: &str) -> HandoffFile {
    try_handoff(w, pool).unwrap_or_else(|| panic!("no valid handoff file for pool {pool}"))
}

#[then(
    expr = "pool-managerd has written the handoff file of pool {string} naming a live engine on loopback"
)]
async fn handoff_written(w: &mut Bdd, pool: String) {
    let f = handoff(w, &pool);
    assert_eq!(f.pool_id, pool);
    assert!(f.url.starts_with("http://127.0.0.1:"), "{}", f.url);
    let pid = f.pid.expect("a provisioned engine's pid");
    assert!(pid_alive(pid), "engine {pid} is not running");
    let health = reqwest::get(format!("{}/health", f.url)).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[then(expr = "orchestratord lists pool {string} as ready with {int} slot(s)")]
async fn listed_ready_with_slots(w: &mut Bdd, pool: String, slots: u64) {
    w.wait_pools_ready(std::slice::from_ref(&pool), Duration::from_secs(20))
        .await;
    let p = w.pool(&pool).await.flatten().unwrap();
    assert_eq!(p["slots_total"], slots, "{p}");
}

#[when(expr = "the engine of pool {string} is killed")]
async fn kill_engine(w: &mut Bdd, pool: String) {
    // The restart count the next scenario would see is no longer zero.
    daemons::spoil().await;
    let pid = handoff(w, &pool).pid.unwrap();
    w.pids.insert(pool, pid);
    signal(pid, "-KILL");
}

/// pool-managerd's own view of a pool (node token, or the shared one); `None` unless it
/// answered 200.
async fn pm_status(w: &Bdd, pool: &str) -> Option<serde_json::Value> {
    let base = &w.d().home().pm_base;
    authed_client(&w.node_token)
        .get(format!("{base}/v2/pools/{pool}/status"))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()
}

#[then(
    expr = "pool-managerd reports pool {string} not ready and its handoff file says {string}, then ready again with restart count {int}"
)]
async fn restarted(w: &mut Bdd, pool: String, file_state: String, count: u64) {
    // One loop watches both while the engine restarts (at least half the 200 ms backoff plus
    // the engine's start), so neither is missed for having looked at the other first.
    let saw_not_ready = std::cell::Cell::new(false);
    let saw_file_state = std::cell::Cell::new(false);
    let s = wait_for(
        &format!("{pool} restarted at pool-managerd"),
        Duration::from_secs(30),
        || {
            let (saw_not_ready, saw_file_state) = (&saw_not_ready, &saw_file_state);
            let (w, pool, file_state) = (&*w, &pool, &file_state);
            async move {
                let f = try_handoff(w, pool);
                if f.and_then(|f| f.state).map(|s| s.as_str()) == Some(file_state.as_str()) {
                    saw_file_state.set(true);
                }
                let s = pm_status(w, pool).await?;
                if s["ready"] == false {
                    saw_not_ready.set(true);
                }
                (saw_not_ready.get() && s["ready"] == true).then_some(s)
            }
        },
    )
    .await;
    assert!(
        saw_file_state.get(),
        "the handoff file never said {file_state:?}"
    );
    assert_eq!(s["restart_count"], count, "{s}");
}

#[then(expr = "the handoff file of pool {string} names a new engine process")]
async fn new_engine(w: &mut Bdd, pool: String) {
    let old = w.pids[&pool];
    let new = wait_for("a new handoff file", Duration::from_secs(10), || async {
        try_handoff(w, &pool)?.pid.filter(|p| *p != old)
    })
    .await;
    assert!(pid_alive(new));
    assert!(!pid_alive(old), "the killed engine {old} still runs");
}

fn with_placement(prompt: &str, tokens: u32, placement: serde_json::Value) -> serde_json::Value {
    let mut b = task_body(prompt, tokens);
    b["placement"] = placement;
    b
}

#[when(expr = "a client submits a task {string} of {int} tokens preferring pool {string}")]
async fn submit_preferring(w: &mut Bdd, name: String, tokens: u32, pool: String) {
    let body = with_placement(
        &name,
        tokens,
        serde_json::json!({"mode": "prefer", "prefer_pools": [pool]}),
    );
    w.submit_ok(&name, body).await;
}

#[when(expr = "a client submits a task {string} of {int} tokens avoiding pool {string}")]
async fn submit_avoiding(w: &mut Bdd, name: String, tokens: u32, pool: String) {
    let body = with_placement(
        &name,
        tokens,
        serde_json::json!({"mode": "auto", "avoid_pools": [pool]}),
    );
    w.submit_ok(&name, body).await;
}

#[when(expr = "session {string} is deleted")]
async fn delete_session(w: &mut Bdd, session: String) {
    let r = w
        .http(&w.client_token)
        .delete(format!("{}/v2/sessions/{session}", w.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[then(expr = "session {string} is unknown")]
async fn session_unknown(w: &mut Bdd, session: String) {
    let r = w
        .http(&w.client_token)
        .get(format!("{}/v2/sessions/{session}", w.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// llama-server's own count of requests it is holding back for want of a slot.
async fn engine_deferred((url, key): &(String, String)) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    llorch_test_support::metric_value(&text, "llamacpp:requests_deferred", &[])
        .unwrap_or_else(|| panic!("no llamacpp:requests_deferred in {text}"))
}

#[then(expr = "the {int} tasks complete while no engine defers a request")]
async fn complete_without_deferring(w: &mut Bdd, n: usize) {
    let runtime_dir = w.d().home().runtime_dir.clone();
    // Each engine with its API key (pool-managerd's key file beside the handoff file).
    let engines: Vec<(String, String)> = std::fs::read_dir(&runtime_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let file = HandoffFile::parse(&std::fs::read(e.path()).unwrap()).unwrap();
            let key = llorch_handoff::read_key(&runtime_dir, &file.pool_id)
                .unwrap()
                .unwrap();
            (file.url, key)
        })
        .collect();
    assert!(!engines.is_empty());
    let ids: Vec<String> = (1..=n).map(|k| w.task_id(&format!("burst-{k}"))).collect();
    let deadline = std::time::Instant::now() + FINISH_WITHIN;
    let mut samples = 0;
    loop {
        for url in &engines {
            assert_eq!(
                engine_deferred(url).await,
                0.0,
                "engine {} deferred a request",
                url.0
            );
            samples += 1;
        }
        let mut done = 0;
        for id in &ids {
            if w.status(id).await["finished_at_ms"].is_u64() {
                done += 1;
            }
        }
        if done == ids.len() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the burst did not end in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        samples > engines.len(),
        "too few samples while the burst ran"
    );
    for (k, id) in ids.iter().enumerate() {
        let s = w.status(id).await;
        assert_eq!(s["state"], "completed", "{s}");
        w.pools_seen.insert(
            format!("burst-{}", k + 1),
            s["pool_id"].as_str().unwrap().into(),
        );
    }
}

#[then(
    expr = "the handoff file of pool {string} names model {string}, {int} slot(s), its context and the engine version"
)]
fn handoff_contents(w: &mut Bdd, pool: String, model: String, slots: u32) {
    let f = handoff(w, &pool);
    assert_eq!(f.model.id, model);
    assert!(f.model.path.is_some(), "{f:?}");
    assert_eq!(f.slots_total, slots);
    // Its context is the per-slot one: the pool's context over its slots.
    let spec = w.pool_specs.iter().find(|p| p.id == pool).unwrap();
    assert_eq!(f.ctx_max, Some(spec.ctx / spec.slots), "{f:?}");
    assert!(f.engine_version.is_some(), "{f:?}");
}

#[then(expr = "a task of {int} tokens pinned to pool {string} completes there")]
async fn pinned_task_completes(w: &mut Bdd, tokens: u32, pool: String) {
    let id = w.submit_ok("probe", pinned("probe", tokens, &pool)).await;
    let s = w.wait_finished(&id, FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["pool_id"], pool.as_str(), "{s}");
}

#[given(expr = "the engine of pool {string} is noted")]
fn note_engine(w: &mut Bdd, pool: String) {
    let pid = handoff(w, &pool).pid.unwrap();
    w.pids.insert(pool, pid);
}

#[then(expr = "pool {string} still runs the noted engine, ready and never restarted")]
async fn bystander_undisturbed(w: &mut Bdd, pool: String) {
    let pid = w.pids[&pool];
    assert_eq!(handoff(w, &pool).pid, Some(pid));
    assert!(pid_alive(pid));
    let s = pm_status(w, &pool).await.unwrap();
    assert_eq!(s["ready"], true, "{s}");
    assert_eq!(s["restart_count"], 0, "{s}");
}

#[then(expr = "pool-managerd reports pool {string} stopped within {int} seconds")]
async fn pm_stopped(w: &mut Bdd, pool: String, secs: u64) {
    wait_for(
        &format!("{pool} stopped at pool-managerd"),
        Duration::from_secs(secs),
        || async { (pm_status(w, &pool).await?["state"] == "stopped").then_some(()) },
    )
    .await;
}
