//! Givens that start (or reuse) the daemons of a scenario.

use cucumber::gherkin::Step;
use cucumber::given;

use crate::daemons::{self, PoolSpec, Setup};
use crate::world::Bdd;

/// The rows of a step's table, header row left out.
fn rows(step: &Step) -> Vec<Vec<String>> {
    step.table
        .as_ref()
        .expect("this step needs a table")
        .rows
        .clone()
}

fn pool_specs(step: &Step) -> Vec<PoolSpec> {
    let rows = rows(step);
    assert_eq!(
        rows[0],
        ["pool", "slots", "model", "ctx"],
        "the pool table's header"
    );
    rows[1..]
        .iter()
        .map(|r| PoolSpec {
            id: r[0].clone(),
            slots: r[1].parse().unwrap(),
            model: r[2].clone(),
            ctx: r[3].parse().unwrap(),
        })
        .collect()
}

#[given("orchestratord runs with:")]
fn orchestratord_runs_with(w: &mut Bdd, step: &Step) {
    w.orch_env = rows(step)
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
}

#[given("a HOME stack with the pools:")]
async fn home_stack(w: &mut Bdd, step: &Step) {
    w.home(pool_specs(step), false).await;
}

#[given("a HOME stack with separate client, admin and node secrets and the pools:")]
async fn home_stack_with_roles(w: &mut Bdd, step: &Step) {
    w.home(pool_specs(step), true).await;
}

#[given("orchestratord alone on an empty runtime directory, beside a llama-server of our own")]
async fn lone_orchestratord(w: &mut Bdd) {
    w.daemons = Some(daemons::acquire(Setup::Lone).await);
}

#[given(expr = "a CLOUD cluster of {int} nodes in network namespaces")]
async fn cloud_cluster(w: &mut Bdd, nodes: usize) {
    w.daemons = Some(daemons::acquire(Setup::Cloud { nodes }).await);
    w.client_token = llorch_e2e_cloud::TOKEN.into();
    w.admin_token = llorch_e2e_cloud::TOKEN.into();
}
