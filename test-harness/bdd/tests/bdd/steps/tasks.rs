//! Submitting, queueing, cancelling and finishing tasks.

use std::time::Duration;

use cucumber::{given, then, when};

use super::task_body;
use crate::world::Bdd;

/// Long enough to keep a slot of the slow model busy for the rest of any scenario (the scenario's
/// clean-up cancels it).
const LONG_TASK_TOKENS: u32 = 3000;

const FINISH_WITHIN: Duration = Duration::from_secs(30);

fn batch(prompt: &str, max_tokens: u32) -> serde_json::Value {
    let mut b = task_body(prompt, max_tokens);
    b["priority"] = "batch".into();
    b
}

#[when(expr = "a client submits an interactive task {string} of {int} tokens")]
async fn submit_interactive(w: &mut Bdd, name: String, tokens: u32) {
    w.submit(Some(&name), task_body(&name, tokens)).await;
}

#[when(expr = "a client submits a task with max_tokens {int}")]
async fn submit_with_max_tokens(w: &mut Bdd, tokens: u32) {
    w.submit(None, task_body("x", tokens)).await;
}

#[when(expr = "a client submits the task {string} twice with one body")]
async fn submit_twice(w: &mut Bdd, name: String) {
    let mut body = task_body("twice", 8);
    body["task_id"] = name.clone().into();
    w.submit(Some(&name), body.clone()).await;
    w.submit(Some(&name), body).await;
}

#[when(expr = "a client submits the task {string} again with another body")]
async fn submit_again_other_body(w: &mut Bdd, name: String) {
    let mut body = task_body("another body", 8);
    body["task_id"] = name.clone().into();
    w.submit(None, body).await;
}

#[when(expr = "a client submits {int} tasks of {int} tokens")]
async fn submit_many(w: &mut Bdd, n: usize, tokens: u32) {
    for k in 1..=n {
        let name = format!("burst-{k}");
        w.submit_ok(&name, task_body(&name, tokens)).await;
    }
}

#[given(expr = "a long task {string} is running")]
async fn long_task_running(w: &mut Bdd, name: String) {
    let id = w.submit_ok(&name, task_body("the", LONG_TASK_TOKENS)).await;
    w.wait_started(&id, Duration::from_secs(10)).await;
}

async fn queue(w: &mut Bdd, name: &str, body: serde_json::Value) {
    let id = w.submit_ok(name, body).await;
    let s = w.status(&id).await;
    assert_eq!(s["state"], "queued", "task {name} is not queued: {s}");
}

#[given(expr = "batch tasks {string} and {string} are queued")]
async fn two_batch_tasks_queued(w: &mut Bdd, first: String, second: String) {
    queue(w, &first, batch(&first, 8)).await;
    queue(w, &second, batch(&second, 8)).await;
}

#[given(expr = "a batch task {string} is queued")]
async fn batch_task_queued(w: &mut Bdd, name: String) {
    queue(w, &name, batch(&name, 8)).await;
}

#[given(expr = "an interactive task {string} is queued")]
async fn interactive_task_queued(w: &mut Bdd, name: String) {
    queue(w, &name, task_body(&name, 8)).await;
}

#[given(expr = "a completed task {string} of {int} tokens")]
async fn completed_task(w: &mut Bdd, name: String, tokens: u32) {
    let id = w.submit_ok(&name, task_body("the river", tokens)).await;
    let s = w.wait_finished(&id, FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
}

#[when(expr = "task {string} is cancelled")]
async fn cancel(w: &mut Bdd, name: String) {
    let id = w.task_id(&name);
    assert_eq!(w.cancel(&id).await, 204, "cancel of task {name}");
}

#[then(expr = "cancelling task {string} again answers {int}")]
async fn cancel_again(w: &mut Bdd, name: String, status: u16) {
    let id = w.task_id(&name);
    assert_eq!(w.cancel(&id).await, status);
}

#[then(expr = "task {string} completes on pool {string}")]
async fn completes_on(w: &mut Bdd, name: String, pool: String) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["pool_id"], pool.as_str(), "{s}");
}

#[then(expr = "a task of {int} tokens completes on pool {string}")]
async fn a_task_completes_on(w: &mut Bdd, tokens: u32, pool: String) {
    let id = w.submit_ok("probe", task_body("probe", tokens)).await;
    let s = w.wait_finished(&id, FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["pool_id"], pool.as_str(), "{s}");
    assert!(s["tokens_out"].as_u64().unwrap() >= 1, "{s}");
}

#[then(expr = "the {int} tasks complete")]
async fn all_complete(w: &mut Bdd, n: usize) {
    for k in 1..=n {
        let id = w.task_id(&format!("burst-{k}"));
        let s = w.wait_finished(&id, FINISH_WITHIN).await;
        assert_eq!(s["state"], "completed", "{s}");
        w.pools_seen
            .insert(format!("burst-{k}"), s["pool_id"].as_str().unwrap().into());
    }
}

#[then(expr = "pools {string} and {string} both ran some of them")]
fn both_pools_ran(w: &mut Bdd, a: String, b: String) {
    let used: std::collections::BTreeSet<&String> = w.pools_seen.values().collect();
    assert!(
        used.contains(&a) && used.contains(&b),
        "the tasks ran on {used:?}"
    );
}

#[then(expr = "task {string} is in state {string}")]
async fn in_state(w: &mut Bdd, name: String, state: String) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["state"], state.as_str(), "{s}");
}

#[then(expr = "task {string} is at queue position {int}")]
async fn at_queue_position(w: &mut Bdd, name: String, position: u64) {
    let s = w.status(&w.task_id(&name)).await;
    assert_eq!(s["state"], "queued", "{s}");
    assert_eq!(s["queue_position"], position, "{s}");
}

#[then(expr = "task {string} starts before task {string}")]
async fn starts_before(w: &mut Bdd, first: String, second: String) {
    let a = w.wait_started(&w.task_id(&first), FINISH_WITHIN).await;
    let b = w.wait_started(&w.task_id(&second), FINISH_WITHIN).await;
    let (a, b) = (
        a["started_at_ms"].as_u64().unwrap(),
        b["started_at_ms"].as_u64().unwrap(),
    );
    assert!(a <= b, "{first} started at {a}, {second} at {b}");
}

#[then(expr = "task {string} ends with error {string}")]
async fn ends_with_error(w: &mut Bdd, name: String, code: String) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["error"]["code"], code.as_str(), "{s}");
}

#[then(expr = "task {string} never reached an engine")]
async fn never_reached_an_engine(w: &mut Bdd, name: String) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["attempts"], 0, "{s}");
    assert!(s["pool_id"].is_null(), "{s}");
    assert!(s["started_at_ms"].is_null(), "{s}");
}

#[then(expr = "task {string} reached an engine once")]
async fn reached_an_engine_once(w: &mut Bdd, name: String) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["attempts"], 1, "{s}");
}

#[then(expr = "both answers are {int} for task {string}")]
fn both_answers(w: &mut Bdd, status: u16, name: String) {
    assert_eq!(w.answers.len(), 2);
    for a in &w.answers {
        assert_eq!(a.status, status, "{}", a.text);
        assert_eq!(a.json()["task_id"], name.as_str(), "{}", a.text);
    }
}

#[then(
    expr = "the status of task {string} reports it completed on pool {string} after {int} attempt(s) with its token count"
)]
async fn status_reports(w: &mut Bdd, name: String, pool: String, attempts: u64) {
    let s = w.wait_finished(&w.task_id(&name), FINISH_WITHIN).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["pool_id"], pool.as_str(), "{s}");
    assert_eq!(s["attempts"], attempts, "{s}");
    let tokens = w.streams[&name]
        .iter()
        .filter(|f| f.event.as_deref() == Some("token"))
        .count();
    assert_eq!(s["tokens_out"], tokens as u64, "{s}");
}
