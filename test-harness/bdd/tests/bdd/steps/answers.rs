//! Requests by role and the answers they get: status, error envelope, headers.

use std::time::Duration;

use cucumber::{given, then, when};
use llorch_test_support::wait_for;

use super::{Caller, WRONG_TOKEN};
use crate::world::{Answer, Bdd};

#[when(expr = "a request {caller} GETs {string}")]
async fn get(w: &mut Bdd, caller: Caller, path: String) {
    let r = caller
        .client(w)
        .get(format!("{}{path}", w.base()))
        .send()
        .await
        .unwrap();
    w.answer = Some(Answer::read(r).await);
}

#[when(expr = "a request {caller} GETs {string} with X-Correlation-Id {string}")]
async fn get_with_correlation(w: &mut Bdd, caller: Caller, path: String, correlation: String) {
    let r = caller
        .client(w)
        .get(format!("{}{path}", w.base()))
        .header("x-correlation-id", correlation)
        .send()
        .await
        .unwrap();
    w.answer = Some(Answer::read(r).await);
}

#[when(expr = "a request {caller} POSTs {string} with {string}")]
async fn post(w: &mut Bdd, caller: Caller, path: String, body: String) {
    let r = caller
        .client(w)
        .post(format!("{}{path}", w.base()))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let a = Answer::read(r).await;
    // A drained or reloaded pool is no longer the stack other scenarios expect.
    if (200..300).contains(&a.status) && (path.ends_with("/drain") || path.ends_with("/reload")) {
        crate::daemons::spoil().await;
    }
    w.answer = Some(a);
}

#[then(expr = "the answer is {int}")]
fn status_is(w: &mut Bdd, status: u16) {
    let a = w.answer();
    assert_eq!(a.status, status, "{}", a.text);
}

#[then(expr = "the answer is {int} with code {string}")]
fn status_and_code(w: &mut Bdd, status: u16, code: String) {
    let a = w.answer();
    assert_eq!(a.status, status, "{}", a.text);
    // The one error envelope: {code, message, retriable, retry_after_ms?, policy_label?}.
    let body = a.json();
    assert_eq!(body["code"], code.as_str(), "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(body["retriable"].is_boolean(), "{body}");
}

#[then("the answer carries an X-Correlation-Id")]
fn has_correlation_id(w: &mut Bdd) {
    let id = w.answer().header("x-correlation-id");
    assert!(
        id.is_some_and(|v| !v.is_empty()),
        "{:?}",
        w.answer().headers
    );
}

#[then(expr = "the answer echoes X-Correlation-Id {string}")]
fn echoes_correlation_id(w: &mut Bdd, correlation: String) {
    assert_eq!(
        w.answer().header("x-correlation-id"),
        Some(correlation.as_str())
    );
}

#[then("the answer carries Retry-After and X-Backoff-Ms of at least one second")]
fn retry_headers(w: &mut Bdd) {
    let a = w.answer();
    let retry_after: u64 = a.header("retry-after").unwrap().parse().unwrap();
    let backoff: u64 = a.header("x-backoff-ms").unwrap().parse().unwrap();
    assert!(retry_after >= 1, "Retry-After: {retry_after}");
    assert!(backoff >= 1000, "X-Backoff-Ms: {backoff}");
    assert_eq!(a.json()["retry_after_ms"], backoff, "{}", a.text);
}

#[then(expr = "the error is retriable with policy label {string}")]
fn retriable_with_label(w: &mut Bdd, label: String) {
    let body = w.answer().json();
    assert_eq!(body["retriable"], true, "{body}");
    assert_eq!(body["policy_label"], label.as_str(), "{body}");
}

#[then(expr = "the admission gives a queue position and the event streams of task {string}")]
fn admission_body(w: &mut Bdd, name: String) {
    let id = w.task_id(&name);
    let body = w.answer().json();
    assert_eq!(body["task_id"], id.as_str(), "{body}");
    assert!(body["queue_position"].is_u64(), "{body}");
    assert!(body["predicted_start_ms"].is_u64(), "{body}");
    assert!(body["backoff_ms"].is_u64(), "{body}");
    assert_eq!(
        body["streams"]["sse"],
        format!("/v2/tasks/{id}/events"),
        "{body}"
    );
    assert!(body["streams"]["sse_verbose"].is_string(), "{body}");
}

#[then("the answer does not contain the wrong token")]
fn no_echo(w: &mut Bdd) {
    let a = w.answer();
    assert!(!a.text.contains(WRONG_TOKEN), "{}", a.text);
    for (name, value) in &a.headers {
        assert!(
            !value.to_str().unwrap_or("").contains(WRONG_TOKEN),
            "header {name} echoes the token"
        );
    }
}

#[then(expr = "a request {caller} for task {string} is answered {int}")]
async fn task_seen_by(w: &mut Bdd, caller: Caller, name: String, status: u16) {
    let id = w.task_id(&name);
    let r = caller
        .client(w)
        .get(format!("{}/v2/tasks/{id}", w.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), status, "{:?}", r.text().await);
}

#[then(expr = "pool-managerd answers {int} to a request {caller} for {string}")]
async fn pool_managerd_answers(w: &mut Bdd, status: u16, caller: Caller, path: String) {
    let base = w.d().home().pm_base.clone();
    let r = caller
        .client(w)
        .get(format!("{base}{path}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), status, "{:?}", r.text().await);
}

async fn public_get(w: &Bdd, path: &str) -> Answer {
    Answer::read(reqwest::get(format!("{}{path}", w.base())).await.unwrap()).await
}

#[then(expr = "{string} answers {int} without a token")]
async fn public_answers(w: &mut Bdd, path: String, status: u16) {
    let a = public_get(w, &path).await;
    assert_eq!(a.status, status, "{}", a.text);
}

#[given("orchestratord is not ready")]
async fn not_ready(w: &mut Bdd) {
    let a = public_get(w, "/ready").await;
    assert_eq!(a.status, 503, "{}", a.text);
}

#[then(expr = "{string} answers {int} without a token within {int} second(s)")]
async fn public_answers_within(w: &mut Bdd, path: String, status: u16, secs: u64) {
    wait_for(
        &format!("{path} answering {status}"),
        Duration::from_secs(secs),
        || async { (public_get(w, &path).await.status == status).then_some(()) },
    )
    .await;
}

#[then(expr = "{string} answers {int} without a token with {int} ready pool(s)")]
async fn ready_with_pools(w: &mut Bdd, path: String, status: u16, pools: u64) {
    let a = public_get(w, &path).await;
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.json()["pools_ready"], pools, "{}", a.text);
}
