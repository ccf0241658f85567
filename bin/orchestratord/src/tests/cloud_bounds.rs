//! Bounds of the CLOUD poller: a node that goes away is unusable within two poll intervals,
//! comes back only after the configured number of good polls, and a registered node that
//! stops heartbeating is dropped at the first poll past the timeout.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use parking_lot::Mutex;

use super::kit::*;

/// How a scripted pool-managerd answers `GET /v2/pools`.
#[derive(Debug, Clone)]
pub enum Node {
    /// Answers at once with these ready pools (model `tiny`, 1 slot each).
    Up(Vec<&'static str>),
    /// Answers at once with these pools in these states.
    Pools(Vec<(&'static str, llorch_contracts::PoolState)>),
    /// Answers at once with these ready pools and their free GPU memory.
    Vram(Vec<(&'static str, u64)>),
    /// Answers at once with these pool reports, as they are.
    Reports(Vec<llorch_contracts::PoolStatus>),
    /// The connection is refused at once.
    Down,
    /// Never answers.
    Hang,
}

/// Scripted pool-managerds for the CLOUD poller, by base URL; polls are counted.
#[derive(Default)]
pub struct ScriptedNodes {
    nodes: Mutex<std::collections::HashMap<String, Node>>,
    polls: AtomicUsize,
    /// The credential each node was last presented.
    presented: Mutex<std::collections::HashMap<String, Option<String>>>,
    /// The correlation id of every poll, in order.
    correlation_ids: Mutex<Vec<String>>,
}

impl ScriptedNodes {
    pub fn set(&self, url: &str, node: Node) {
        self.nodes.lock().insert(url.to_string(), node);
    }

    pub fn polls(&self) -> usize {
        self.polls.load(Ordering::SeqCst)
    }

    /// The credential the node at `url` was last presented.
    pub fn presented(&self, url: &str) -> Option<Option<String>> {
        self.presented.lock().get(url).cloned()
    }
}

impl crate::cloud_source::NodeApi for ScriptedNodes {
    fn pools<'a>(
        &'a self,
        base_url: &'a str,
        credential: Option<&'a str>,
        headers: reqwest::header::HeaderMap,
    ) -> BoxFuture<'a, Result<llorch_contracts::PoolsResponse, crate::cloud_source::PollError>>
    {
        self.polls.fetch_add(1, Ordering::SeqCst);
        if let Some(id) = headers
            .get(llorch_http::CORRELATION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.correlation_ids.lock().push(id.to_string());
        }
        self.presented
            .lock()
            .insert(base_url.to_string(), credential.map(str::to_string));
        let node = self
            .nodes
            .lock()
            .get(base_url)
            .cloned()
            .unwrap_or(Node::Down);
        let node_id = base_url.trim_start_matches("http://").to_string();
        async move {
            use llorch_contracts::PoolState::Ready;
            let pools = match node {
                Node::Down => {
                    return Err(crate::cloud_source::PollError::Unreachable(
                        "connection refused".into(),
                    ))
                }
                Node::Hang => std::future::pending().await,
                Node::Up(ids) => ids
                    .into_iter()
                    .map(|id| pool_status(id, &node_id, Ready))
                    .collect(),
                Node::Pools(states) => states
                    .into_iter()
                    .map(|(id, state)| pool_status(id, &node_id, state))
                    .collect(),
                Node::Reports(reports) => reports,
                Node::Vram(frees) => frees
                    .into_iter()
                    .map(|(id, free)| llorch_contracts::PoolStatus {
                        vram_free_bytes: Some(free),
                        ..pool_status(id, &node_id, Ready)
                    })
                    .collect(),
            };
            Ok(llorch_contracts::PoolsResponse {
                node_id,
                gpu_discovery: "none".into(),
                gpus: Vec::new(),
                pools,
            })
        }
        .boxed()
    }
}

fn pool_status(
    id: &str,
    node_id: &str,
    state: llorch_contracts::PoolState,
) -> llorch_contracts::PoolStatus {
    let ready = state == llorch_contracts::PoolState::Ready;
    llorch_contracts::PoolStatus {
        pool_id: id.into(),
        node_id: node_id.into(),
        state,
        live: ready,
        ready,
        draining: false,
        slots_total: 1,
        slots_free: 1,
        engine: "llamacpp".into(),
        engine_version: None,
        model_id: "tiny".into(),
        device_mask: None,
        ctx_max: None,
        vram_total_bytes: None,
        vram_free_bytes: None,
        restart_count: 0,
        last_error: None,
        provisioning_mode: llorch_contracts::ProvisioningMode::Managed,
        url: None,
        embeddings: false,
    }
}

/// Whether the orchestrator would place on `pool` now.
pub fn usable(h: &Harness, pool: &str) -> bool {
    h.orch.pools.get(pool).is_some_and(|p| p.ready())
}

const MS: Duration = Duration::from_millis(1);
const INTERVAL: Duration = Duration::from_millis(1000);

/// A CLOUD orchestrator polling `http://n1` (pool `p1`) every second; returns when the first
/// poll made `p1` usable. Polls run at start + k × INTERVAL.
async fn cloud(extra: &[&str]) -> (Harness, Arc<ScriptedNodes>, Instant) {
    let mut flags = vec![
        "--profile=cloud",
        "--pool-managers=http://n1",
        "--pool-poll-interval-ms=1000",
    ];
    flags.extend_from_slice(extra);
    let h = Harness::start(&flags);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    let start = Instant::now();
    h.poll(nodes.clone());
    settle().await;
    assert!(usable(&h, "p1"), "first poll did not bind the pool");
    (h, nodes, start)
}

/// Steps the clock to `at` and lets the poll due then finish.
async fn at(t: Instant) {
    tokio::time::sleep_until(t).await;
    settle().await;
}

// covers: CLOUD-4103
#[tokio::test(start_paused = true)]
async fn a_refusing_node_is_unusable_at_the_next_poll_within_two_intervals_of_going_down() {
    let (h, nodes, start) = cloud(&[]).await;
    // Down just after a poll: the worst case for a refusal.
    at(start + MS).await;
    nodes.set("http://n1", Node::Down);
    at(start + INTERVAL - MS).await;
    assert!(usable(&h, "p1"), "judged before the next poll");
    at(start + INTERVAL).await;
    assert!(!usable(&h, "p1"), "still used after a failed poll");
}

// covers: CLOUD-4103
#[tokio::test(start_paused = true)]
async fn a_hanging_node_is_unusable_when_its_poll_times_out_at_eight_tenths_of_an_interval() {
    let (h, nodes, start) = cloud(&[]).await;
    at(start + MS).await;
    nodes.set("http://n1", Node::Hang);
    let poll = start + INTERVAL;
    at(poll + INTERVAL.mul_f64(0.8) - MS).await;
    assert!(usable(&h, "p1"), "judged before the poll timed out");
    at(poll + INTERVAL.mul_f64(0.8)).await;
    assert!(!usable(&h, "p1"));
    // Worst case from going silent: under two intervals.
    assert!(Instant::now() - (start + MS) < 2 * INTERVAL);
}

// covers: CLOUD-4104
#[tokio::test(start_paused = true)]
async fn a_running_task_on_a_node_that_fails_a_poll_ends_with_worker_reset_at_that_poll() {
    let (h, nodes, start) = cloud(&[]).await;
    h.engine.push(tokens(1000, 10 * MS));
    let task = h.submit(task(1000));
    at(start + 100 * MS).await;
    nodes.set("http://n1", Node::Down);
    let (code, when) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(when, start + INTERVAL);
}

// covers: CLOUD-4105
#[tokio::test(start_paused = true)]
async fn a_node_back_from_failure_is_used_only_after_the_configured_number_of_good_polls() {
    let (h, nodes, start) = cloud(&["--pool-poll-recovery=3"]).await;
    nodes.set("http://n1", Node::Down);
    at(start + INTERVAL).await;
    assert!(!usable(&h, "p1"));
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    at(start + 2 * INTERVAL).await;
    assert!(!usable(&h, "p1"), "used after 1 good poll of 3");
    at(start + 3 * INTERVAL).await;
    assert!(!usable(&h, "p1"), "used after 2 good polls of 3");
    at(start + 4 * INTERVAL).await;
    assert!(usable(&h, "p1"), "not used after 3 good polls");
}

// covers: CLOUD-4102
#[tokio::test(start_paused = true)]
async fn polls_run_at_the_configured_interval_and_no_faster() {
    let (_h, nodes, start) = cloud(&[]).await;
    at(start + 10 * INTERVAL - MS).await;
    assert_eq!(nodes.polls(), 10, "polls at 0, 1 s, ... 9 s");
    at(start + 10 * INTERVAL).await;
    assert_eq!(nodes.polls(), 11);
}

/// CLOUD, polling every second, a heartbeat timeout of 2.5 s: node `n2` (pool `p2`) registered
/// (a heartbeat) at the returned start, and polled at once.
async fn registered_n2() -> (Harness, Instant) {
    let h = Harness::start(&[
        "--profile=cloud",
        "--node-registration=true",
        "--pool-poll-interval-ms=1000",
        "--node-heartbeat-timeout-ms=2500",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://n2", Node::Up(vec!["p2"]));
    let start = Instant::now();
    h.poll(nodes.clone());
    settle().await;
    h.orch
        .managers
        .register("n2", "http://n2", Vec::new(), usize::MAX)
        .unwrap();
    settle().await;
    (h, start)
}

// covers: CLOUD-4108
#[tokio::test(start_paused = true)]
async fn a_registered_node_that_stops_heartbeating_is_dropped_at_the_first_poll_past_the_timeout() {
    let (h, start) = registered_n2().await;
    assert!(usable(&h, "p2"), "registration did not poll at once");
    let registered = Instant::now();
    // Polls at start + 1 s, 2 s: within the timeout. At 3 s the last heartbeat (at 0) is
    // 3 s old, past 2.5 s.
    at(start + 2 * INTERVAL).await;
    assert!(usable(&h, "p2"));
    at(start + 3 * INTERVAL).await;
    assert!(
        !usable(&h, "p2"),
        "a node without heartbeats was still used"
    );
    assert_eq!(registered, start);
    // A heartbeat brings it back after the recovery polls (2 by default).
    assert!(h.orch.managers.heartbeat("n2"));
    at(start + 4 * INTERVAL).await;
    assert!(!usable(&h, "p2"));
    at(start + 5 * INTERVAL).await;
    assert!(usable(&h, "p2"));
}

// covers: CLOUD-4109
#[tokio::test(start_paused = true)]
async fn a_pool_id_reported_by_a_second_node_is_ignored_and_the_first_keeps_it() {
    let h = Harness::start(&[
        "--profile=cloud",
        "--pool-managers=http://n1,http://n3",
        "--pool-poll-interval-ms=1000",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    nodes.set("http://n3", Node::Up(vec!["p1", "p3"]));
    let log = LogCapture::default();
    let _log = tracing::subscriber::set_default(log.subscriber());
    let start = Instant::now();
    h.poll(nodes.clone());
    for k in 0..3 {
        at(start + k * INTERVAL).await;
        let p1 = h.orch.pools.get("p1").unwrap();
        assert_eq!(p1.manager.as_deref(), Some("http://n1"));
        assert!(usable(&h, "p3"));
    }
    assert_eq!(
        h.orch
            .managers
            .owner_of("p1")
            .map(|(url, _)| url)
            .as_deref(),
        Some("http://n1")
    );
    // Three polls saw the conflict; it is logged once, when it began.
    assert_eq!(log.count("already served by another pool-managerd"), 1);
}

// covers: CLOUD-4109
#[tokio::test(start_paused = true)]
async fn a_pool_id_held_by_an_unavailable_node_moves_to_the_node_reporting_it_and_stays_there() {
    let h = Harness::start(&[
        "--profile=cloud",
        "--pool-managers=http://n1,http://n3",
        "--pool-poll-interval-ms=1000",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    nodes.set("http://n3", Node::Up(vec!["p1", "p3"]));
    let start = Instant::now();
    h.poll(nodes.clone());
    at(start).await;
    let holder = |h: &Harness| h.orch.pools.get("p1").and_then(|p| p.manager);
    assert_eq!(holder(&h).as_deref(), Some("http://n1"));
    // n1 goes away: at its failed poll p1 is lost; n3 reports p1 too and takes it over.
    nodes.set("http://n1", Node::Down);
    at(start + INTERVAL).await;
    at(start + 2 * INTERVAL).await;
    assert_eq!(holder(&h).as_deref(), Some("http://n3"));
    assert!(usable(&h, "p1"));
    assert_eq!(
        h.orch
            .managers
            .owner_of("p1")
            .map(|(url, _)| url)
            .as_deref(),
        Some("http://n3")
    );
    // n1 comes back reporting p1: n3 keeps it (n1's failed polls no longer touch it either).
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    for k in 3..6 {
        at(start + k * INTERVAL).await;
        assert_eq!(holder(&h).as_deref(), Some("http://n3"));
        assert!(usable(&h, "p1"));
    }
}

// covers: CLOUD-4106
#[tokio::test(start_paused = true)]
async fn tasks_for_a_restarting_cloud_pool_queue_and_a_failed_one_is_refused_at_the_next_poll() {
    use llorch_contracts::PoolState;
    let (h, nodes, start) = cloud(&[]).await;
    nodes.set(
        "http://n1",
        Node::Pools(vec![("p1", PoolState::Restarting)]),
    );
    at(start + INTERVAL).await;
    assert!(!usable(&h, "p1"));
    let queued = h.submit(task(1));
    nodes.set("http://n1", Node::Pools(vec![("p1", PoolState::Failed)]));
    at(start + 2 * INTERVAL).await;
    let (code, when) = outcome(&queued).await;
    assert_eq!(code, "POOL_UNAVAILABLE");
    assert_eq!(when, start + 2 * INTERVAL);
    let e = h
        .orch
        .admit(serde_json::from_value(task(1)).unwrap())
        .unwrap_err();
    assert_eq!(e.0.code, llorch_contracts::ErrorCode::ModelNotAvailable);
    // Back to ready: admitted and served again.
    nodes.set("http://n1", Node::Up(vec!["p1"]));
    at(start + 3 * INTERVAL).await;
    h.engine.push(tokens(1, MS));
    let served = h.submit(task(1));
    assert_eq!(terminal(&served).await.0, "end");
}

// covers: ORCH-2202
#[tokio::test(start_paused = true)]
async fn between_equally_free_cloud_pools_the_one_with_more_free_gpu_memory_takes_the_task() {
    let h = Harness::start(&[
        "--profile=cloud",
        "--pool-managers=http://n1",
        "--pool-poll-interval-ms=1000",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    // `a` sorts first by id; `b` reports more free memory.
    nodes.set(
        "http://n1",
        Node::Vram(vec![("a", 1 << 30), ("b", 8 << 30)]),
    );
    h.poll(nodes.clone());
    settle().await;
    assert_eq!(
        h.orch.pools.get("b").unwrap().vram_free_bytes,
        Some(8 << 30)
    );
    h.engine.always(tokens(1, MS));
    let t = h.submit(task(1));
    assert_eq!(terminal(&t).await.0, "end");
    assert_eq!(t.pool_id().as_deref(), Some("b"));
    // The figures change at the next poll, and so does the choice.
    nodes.set(
        "http://n1",
        Node::Vram(vec![("a", 8 << 30), ("b", 1 << 30)]),
    );
    tokio::time::sleep(INTERVAL).await;
    settle().await;
    let t = h.submit(task(1));
    assert_eq!(terminal(&t).await.0, "end");
    assert_eq!(t.pool_id().as_deref(), Some("a"));
}

// covers: CLOUD-4111
#[tokio::test(start_paused = true)]
async fn pools_a_node_reports_outside_the_limits_are_ignored_and_the_rest_is_used() {
    let (h, nodes, start) = cloud(&[]).await;
    use llorch_contracts::PoolState::Ready;
    nodes.set(
        "http://n1",
        Node::Reports(vec![
            pool_status("p1", "n1", Ready),
            pool_status("../escape", "n1", Ready),
            llorch_contracts::PoolStatus {
                slots_total: u32::MAX,
                slots_free: u32::MAX,
                ..pool_status("huge", "n1", Ready)
            },
            llorch_contracts::PoolStatus {
                model_id: String::new(),
                ..pool_status("nameless", "n1", Ready)
            },
        ]),
    );
    at(start + INTERVAL).await;
    assert!(usable(&h, "p1"));
    for bad in ["../escape", "huge", "nameless"] {
        assert!(h.orch.pools.get(bad).is_none(), "{bad} was bound");
    }
    // The slot count stays the valid pool's.
    assert_eq!(h.orch.pools.slot_totals().1, 1);
}

// covers: OBS-6104
#[tokio::test(start_paused = true)]
async fn metric_series_of_a_pool_that_went_away_leave_the_exposition() {
    let (h, nodes, start) = cloud(&[]).await;
    let render = || {
        let pools: Vec<(String, bool)> = h
            .orch
            .pools
            .list()
            .into_iter()
            .map(|p| (p.pool_id.clone(), p.ready()))
            .collect();
        h.orch.metrics.render(&pools, &[])
    };
    assert!(render().contains("pool_id=\"p1\""));
    nodes.set("http://n1", Node::Up(vec!["p2"]));
    at(start + INTERVAL).await;
    let text = render();
    assert!(!text.contains("pool_id=\"p1\""), "{text}");
    assert!(text.contains("pool_id=\"p2\""));
}

// covers: OBS-6104
#[tokio::test(start_paused = true)]
async fn every_failed_poll_is_counted_as_a_failed_health_check_of_the_nodes_pools() {
    let (h, nodes, start) = cloud(&[]).await;
    let checks = |outcome: &str| {
        h.orch
            .metrics
            .pool_health_checks
            .with_label_values(&["p1", outcome])
            .get()
    };
    assert_eq!((checks("ok"), checks("fail")), (1, 0));
    nodes.set("http://n1", Node::Down);
    at(start + INTERVAL).await;
    at(start + 2 * INTERVAL).await;
    nodes.set("http://n1", Node::Hang);
    at(start + 3 * INTERVAL + INTERVAL.mul_f64(0.8)).await;
    assert_eq!((checks("ok"), checks("fail")), (1, 3));
}

// covers: CLOUD-4110
#[tokio::test(start_paused = true)]
async fn a_node_registering_again_from_a_new_address_moves_its_pools_there_and_ends_work_at_the_old_one(
) {
    use tower::ServiceExt;
    let h = Harness::start(&[
        "--profile=cloud",
        "--node-registration=true",
        "--pool-poll-interval-ms=1000",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://old", Node::Up(vec!["p2"]));
    nodes.set("http://new", Node::Up(vec!["p2"]));
    h.poll(nodes.clone());
    let register = |address: &str| {
        let body =
            serde_json::json!({"node_id": "n2", "address": address, "gpus": [], "pools": []});
        axum::http::Request::post("/v2/nodes/register")
            .header("authorization", "Bearer inprocess-test-token-0123")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap()
    };
    let app = crate::api::router(h.orch.clone());
    let r = app.clone().oneshot(register("http://old")).await.unwrap();
    assert_eq!(r.status(), 200);
    settle().await;
    let manager = |h: &Harness| h.orch.pools.get("p2").and_then(|p| p.manager);
    assert_eq!(manager(&h).as_deref(), Some("http://old"));
    h.engine.push(tokens(5_000, 10 * MS));
    let task = h.submit(task(5_000));
    at(Instant::now() + 100 * MS).await;
    // The node restarts elsewhere and registers from its new address.
    let r = app.oneshot(register("http://new")).await.unwrap();
    assert_eq!(r.status(), 200);
    let moved = Instant::now();
    let (code, when) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(
        when, moved,
        "work at the old address ended when the node moved"
    );
    settle().await;
    assert_eq!(manager(&h).as_deref(), Some("http://new"));
    assert!(usable(&h, "p2"));
}

/// `POST /v2/nodes/register` of node `id` at `address` with the shared token; the status.
async fn register(h: &Harness, id: &str, address: &str) -> u16 {
    use tower::ServiceExt;
    let body = serde_json::json!({"node_id": id, "address": address, "gpus": [], "pools": []});
    let req = axum::http::Request::post("/v2/nodes/register")
        .header("authorization", "Bearer inprocess-test-token-0123")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let r = crate::api::router(h.orch.clone())
        .oneshot(req)
        .await
        .unwrap();
    r.status().as_u16()
}

fn addresses(h: &Harness) -> Vec<(String, Option<String>)> {
    h.orch
        .managers
        .list()
        .into_iter()
        .map(|m| (m.url, m.node_id))
        .collect()
}

// covers: CLOUD-4117
#[tokio::test(start_paused = true)]
async fn a_registration_at_an_address_another_node_holds_is_refused_and_the_holder_keeps_its_work()
{
    let (h, nodes, _) = cloud(&["--node-registration=true"]).await;
    h.engine.push(tokens(50, 10 * MS));
    let task = h.submit(task(50));
    at(Instant::now() + 100 * MS).await;
    // Another id at the configured manager's address (spelt another way), then that id
    // elsewhere: before, the first relabelled n1's entry and the second retired it as stale.
    assert_eq!(register(&h, "n2", "HTTP://N1/").await, 409);
    nodes.set("http://elsewhere", Node::Up(vec!["p9"]));
    assert_eq!(register(&h, "n2", "http://elsewhere").await, 200);
    let (code, _) = outcome(&task).await;
    assert_eq!(code, "end", "the holder's running task was ended");
    assert!(usable(&h, "p1"));
    assert_eq!(
        h.orch.pools.get("p1").and_then(|p| p.manager).as_deref(),
        Some("http://n1")
    );
    // A registered node's address is its own too, while it is not lost.
    assert_eq!(register(&h, "n3", "http://elsewhere").await, 409);
    assert_eq!(
        addresses(&h),
        vec![
            ("http://elsewhere".into(), Some("n2".into())),
            ("http://n1".into(), Some("n1".into())),
        ]
    );
    // Lost (its polls fail): the address is free for another id, and n2's pools go with it.
    nodes.set("http://elsewhere", Node::Down);
    at(Instant::now() + INTERVAL).await;
    assert!(!usable(&h, "p9"));
    nodes.set("http://elsewhere", Node::Up(vec!["p3"]));
    assert_eq!(register(&h, "n3", "http://elsewhere").await, 200);
    settle().await;
    assert!(h.orch.pools.get("p9").is_none());
    assert_eq!(
        addresses(&h)[0],
        ("http://elsewhere".into(), Some("n3".into()))
    );
}

// covers: CLOUD-4117
#[tokio::test(start_paused = true)]
async fn registrations_beyond_the_node_cap_are_refused_until_a_node_leaves() {
    let h = Harness::start(&[
        "--profile=cloud",
        "--node-registration=true",
        "--max-nodes=2",
    ]);
    h.poll(Arc::new(ScriptedNodes::default()));
    assert_eq!(register(&h, "a", "http://a").await, 200);
    assert_eq!(register(&h, "b", "http://b").await, 200);
    assert_eq!(register(&h, "c", "http://c").await, 409);
    // A registered node refreshing, or moving, is no new node.
    assert_eq!(register(&h, "a", "http://a").await, 200);
    assert_eq!(register(&h, "a", "http://a2").await, 200);
    assert_eq!(h.orch.managers.list().len(), 2);
    assert!(h.orch.managers.deregister("b").is_some());
    assert_eq!(register(&h, "c", "http://c").await, 200);
}

// covers: CLOUD-4117
#[tokio::test(start_paused = true)]
async fn a_registered_node_address_must_be_a_plain_base_url() {
    let h = Harness::start(&["--profile=cloud", "--node-registration=true"]);
    h.poll(Arc::new(ScriptedNodes::default()));
    for bad in [
        "ftp://a",
        "http://user:pw@a:9200",
        "http://a:9200/?redirect=x",
        "http://a:9200/#x",
        "a:9200",
    ] {
        assert_eq!(register(&h, "a", bad).await, 400, "{bad}");
    }
    assert!(h.orch.managers.list().is_empty());
}

// covers: AUTH-5116
#[tokio::test(start_paused = true)]
async fn each_node_is_presented_its_own_token_and_only_an_unnamed_one_the_shared_token() {
    const SHARED: &str = "shared-node-token-0123456";
    const A: &str = "node-a-own-token-0123456";
    const B: &str = "node-b-own-token-0123456";
    let dir = tempfile::tempdir().unwrap();
    let tokens = secret_file(
        dir.path(),
        "node-tokens",
        &format!("node-a:{A}\nnode-b:{B}\n"),
    );
    let h = Harness::start_with_keys(&[
        "--profile=cloud",
        "--node-registration=true",
        &format!("--node-token={SHARED}"),
        &format!("--node-tokens-file={}", tokens.display()),
        "--pool-managers=node-a=http://a,http://c",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    // Node a calls itself something else in its answers: the id the operator gave stays, and
    // so does the token it picks.
    nodes.set("http://a", Node::Up(vec!["pa"]));
    nodes.set("http://b", Node::Up(vec!["pb"]));
    nodes.set("http://c", Node::Up(vec!["pc"]));
    h.poll(nodes.clone());
    settle().await;
    let register = {
        use tower::ServiceExt;
        let body = r#"{"node_id":"node-b","address":"http://b","gpus":[],"pools":[]}"#;
        let req = axum::http::Request::post("/v2/nodes/register")
            .header("authorization", format!("Bearer {B}"))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .unwrap();
        crate::api::router(h.orch.clone())
            .oneshot(req)
            .await
            .unwrap()
    };
    assert_eq!(register.status(), 200);
    settle().await;
    let presented = |url: &str| nodes.presented(url).flatten();
    assert_eq!(presented("http://a").as_deref(), Some(A));
    assert_eq!(presented("http://b").as_deref(), Some(B));
    assert_eq!(presented("http://c").as_deref(), Some(SHARED));
    // What goes to each node's engine proxy, and with a drain or reload, is its own too.
    let pool_credential = |pool: &str| {
        h.orch
            .pools
            .get(pool)
            .and_then(|p| p.credential)
            .map(|t| t.expose().to_string())
    };
    assert_eq!(pool_credential("pa").as_deref(), Some(A));
    assert_eq!(pool_credential("pb").as_deref(), Some(B));
    assert_eq!(pool_credential("pc").as_deref(), Some(SHARED));
    let owner = h.orch.managers.owner_of("pa").unwrap();
    assert_eq!(owner.0, "http://a");
    assert_eq!(owner.1.map(|t| t.expose().to_string()).as_deref(), Some(A));
    let ids: Vec<Option<String>> = h
        .orch
        .managers
        .list()
        .into_iter()
        .map(|m| m.node_id)
        .collect();
    assert_eq!(
        ids,
        [
            Some("node-a".into()),
            Some("node-b".into()),
            Some("c".into())
        ]
    );
}

// covers: CLOUD-4108
#[tokio::test(start_paused = true)]
async fn heartbeats_missed_while_orchestratords_node_listener_was_full_are_not_held_against_the_node(
) {
    let (h, start) = registered_n2().await;
    assert!(usable(&h, "p2"));
    // The listener was full just before the poll that would have found the heartbeats late.
    at(start + 2 * INTERVAL + 800 * MS).await;
    h.orch.node_door.mark_full();
    at(start + 3 * INTERVAL).await;
    assert!(
        usable(&h, "p2"),
        "lost for heartbeats that could not get in"
    );
    at(start + 5 * INTERVAL).await;
    assert!(usable(&h, "p2"));
    // A heartbeat timeout after the listener was last full, the heartbeats count again.
    at(start + 6 * INTERVAL).await;
    assert!(
        !usable(&h, "p2"),
        "a node without heartbeats was still used"
    );
}

// covers: CLOUD-4108
#[tokio::test(start_paused = true)]
async fn a_heartbeat_reaches_the_registered_node_not_a_configured_manager_of_its_name() {
    let h = Harness::start(&[
        "--profile=cloud",
        "--node-registration=true",
        "--pool-managers=n2=http://configured",
        "--pool-poll-interval-ms=1000",
        "--node-heartbeat-timeout-ms=2500",
    ]);
    let nodes = Arc::new(ScriptedNodes::default());
    nodes.set("http://configured", Node::Up(vec!["p1"]));
    nodes.set("http://registered", Node::Up(vec!["p2"]));
    let start = Instant::now();
    h.poll(nodes.clone());
    settle().await;
    assert_eq!(register(&h, "n2", "http://registered").await, 200);
    settle().await;
    // Heartbeats every second: the registered node stays in use past the timeout.
    for k in 1..=5 {
        at(start + k * INTERVAL - MS).await;
        assert!(h.orch.managers.heartbeat("n2"));
    }
    at(start + 5 * INTERVAL).await;
    assert!(
        usable(&h, "p2"),
        "the registered node's heartbeats went elsewhere"
    );
}

// covers: OBS-6118
#[tokio::test(start_paused = true)]
async fn every_poll_carries_its_own_correlation_id_and_is_logged_with_it() {
    let log = LogCapture::default();
    let _log = tracing::subscriber::set_default(log.subscriber());
    let (_h, nodes, start) = cloud(&[]).await;
    nodes.set("http://n1", Node::Down);
    at(start + INTERVAL).await;
    let ids = nodes.correlation_ids.lock().clone();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert_ne!(ids[0], ids[1], "two polls shared a correlation id");
    // The good poll at debug, the failed one at warn; each line with its poll's id.
    assert_eq!(log.count("pool health check completed"), 2);
    assert_eq!(log.count(&format!("correlation_id={}", ids[0])), 1);
    assert_eq!(log.count(&format!("correlation_id={}", ids[1])), 1);
    assert_eq!(log.count("outcome=\"fail\""), 1);
}
