//! CLOUD: polling of the nodes, a node cut off or killed.

use std::time::Duration;

use cucumber::{given, then, when};
use llorch_test_support::{signal, wait_for};

use crate::daemons;
use crate::world::Bdd;

const CLOUD_READY_WITHIN: Duration = Duration::from_secs(40);

#[then(expr = "orchestratord lists pools {string} and {string} as ready within {int} seconds")]
async fn both_ready_within(w: &mut Bdd, a: String, b: String, secs: u64) {
    w.wait_pools_ready(&[a, b], Duration::from_secs(secs)).await;
}

#[given(expr = "pools {string} and {string} are ready")]
async fn both_ready(w: &mut Bdd, a: String, b: String) {
    w.wait_pools_ready(&[a, b], CLOUD_READY_WITHIN).await;
}

#[then(expr = "orchestratord lists {int} nodes online")]
async fn nodes_online(w: &mut Bdd, n: usize) {
    let r = w
        .http(&w.admin_token)
        .get(format!("{}/v2/nodes", w.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    let online = nodes.iter().filter(|n| n["online"] == true).count();
    assert_eq!(online, n, "{v}");
    assert_eq!(nodes.len(), n, "{v}");
}

#[when(expr = "the link to node {int} goes down")]
async fn link_down(w: &mut Bdd, n: usize) {
    // The scenario brings it back up; one that fails before is not reused (see clean_up).
    let c = w.d().cloud();
    c.net.set_link(&c.orch_host, c.node(n), false);
}

#[when(expr = "the link to node {int} comes back up")]
async fn link_up(w: &mut Bdd, n: usize) {
    let c = w.d().cloud();
    c.net.set_link(&c.orch_host, c.node(n), true);
}

#[when(expr = "pool-managerd on node {int} is killed")]
async fn kill_node(w: &mut Bdd, n: usize) {
    daemons::spoil().await;
    signal(w.d().cloud().node_pid(n), "-KILL");
}

#[then(expr = "pool {string} is unavailable within {int} ms")]
async fn unavailable_within(w: &mut Bdd, pool: String, ms: u64) {
    wait_for(
        &format!("pool {pool} unavailable"),
        Duration::from_millis(ms),
        || async {
            // orchestratord must answer: a daemon that is down says nothing of the pool.
            let p = w.pool(&pool).await;
            p.is_some_and(|p| p.is_none_or(|p| p["healthy"] == false))
                .then_some(())
        },
    )
    .await;
}
