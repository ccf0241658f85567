//! Roles and ownership, through the router in process: every route answers each kind of
//! caller (none, a wrong key, a client, a node, an admin) as the role table says, a client sees
//! only its own tasks (another's answer 404, as for no task), and an admin sees them all.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::kit::*;

const MS: std::time::Duration = std::time::Duration::from_millis(1);
const ALICE: &str = "alice-secret-0123456789";
const BOB: &str = "bob-secret-012345678901";
const ADMIN: &str = "admin-secret-0123456789";
const NODE: &str = "node-secret-01234567890";

struct Keys {
    h: Harness,
    _dir: tempfile::TempDir,
}

fn harness() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(dir.path(), "keys", &format!("alice:{ALICE}\nbob:{BOB}\n"));
    let file = format!("--api-keys-file={}", keys.display());
    let admin = format!("--admin-token={ADMIN}");
    let node = format!("--node-token={NODE}");
    let h = Harness::start_with_keys(&[&file, &admin, &node]);
    h.add_pool("p", 1);
    Keys { h, _dir: dir }
}

async fn call(h: &Harness, method: &str, path: &str, key: Option<&str>, body: &str) -> StatusCode {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let app = crate::api::router(h.orch.clone());
    app.oneshot(req.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap()
        .status()
}

// covers: AUTH-5101, OBS-6110
#[tokio::test(start_paused = true)]
async fn every_route_answers_each_role_as_the_role_table_says() {
    let k = harness();
    h_submit_owned(&k.h, "t-alice", ALICE).await;
    let task = r#"{"model_ref":"tiny","prompt":"p","max_tokens":3}"#;
    let reg = r#"{"node_id":"n1","address":"http://n1","gpus":[],"pools":[]}"#;
    let drain = r#"{"deadline_ms":1}"#;
    // (method, path, body, [none, wrong, client, node, admin])
    use StatusCode as S;
    let (ok, acc) = (S::OK, S::ACCEPTED);
    let (u, f) = (S::UNAUTHORIZED, S::FORBIDDEN);
    let table: Vec<(&str, &str, &str, [StatusCode; 5])> = vec![
        ("POST", "/v2/tasks", task, [u, u, acc, f, acc]),
        ("GET", "/v2/tasks/t-alice", "", [u, u, ok, f, ok]),
        ("GET", "/v2/tasks/t-alice/events", "", [u, u, ok, f, ok]),
        (
            "POST",
            "/v2/tasks/t-alice/cancel",
            "",
            [u, u, S::NO_CONTENT, f, S::NO_CONTENT],
        ),
        // No such session (404) — past the door.
        (
            "GET",
            "/v2/sessions/s1",
            "",
            [u, u, S::NOT_FOUND, f, S::NOT_FOUND],
        ),
        ("GET", "/v2/meta/capabilities", "", [u, u, ok, f, ok]),
        ("GET", "/v2/meta/version", "", [u, u, ok, f, ok]),
        ("GET", "/v2/pools", "", [u, u, ok, f, ok]),
        ("GET", "/v2/pools/p/health", "", [u, u, ok, f, ok]),
        ("GET", "/v2/nodes", "", [u, u, f, f, ok]),
        // HOME: drain goes to pool-managerd, unreachable here (503) — past the door.
        (
            "POST",
            "/v2/pools/p/drain",
            drain,
            [u, u, f, f, S::SERVICE_UNAVAILABLE],
        ),
        (
            "POST",
            "/v2/pools/p/reload",
            r#"{"new_model_ref":"/models/m.gguf"}"#,
            [u, u, f, f, S::SERVICE_UNAVAILABLE],
        ),
        // Registration is off in HOME (409) — past the door for a node only.
        ("POST", "/v2/nodes/register", reg, [u, u, f, S::CONFLICT, f]),
        (
            "POST",
            "/v2/nodes/n1/heartbeat",
            "",
            [u, u, f, S::NOT_FOUND, f],
        ),
        ("DELETE", "/v2/nodes/n1", "", [u, u, f, f, S::NOT_FOUND]),
        ("GET", "/v2/overview", "", [u, u, f, f, ok]),
        (
            "GET",
            "/v2/overview?tasks=501",
            "",
            [u, u, f, f, S::BAD_REQUEST],
        ),
        // The console's page and assets hold no data: open to all (its calls carry the token).
        ("GET", "/ui", "", [ok, ok, ok, ok, ok]),
        ("GET", "/ui/console.js", "", [ok, ok, ok, ok, ok]),
        ("GET", "/ui/console.css", "", [ok, ok, ok, ok, ok]),
        ("GET", "/v1/models", "", [u, u, ok, f, ok]),
        (
            "DELETE",
            "/v2/sessions/s1",
            "",
            [u, u, S::NOT_FOUND, f, S::NOT_FOUND],
        ),
        ("GET", "/v1/models/tiny", "", [u, u, ok, f, ok]),
        // An empty OpenAI body (400) — past the door.
        (
            "POST",
            "/v1/chat/completions",
            "{}",
            [u, u, S::BAD_REQUEST, f, S::BAD_REQUEST],
        ),
        (
            "POST",
            "/v1/completions",
            "{}",
            [u, u, S::BAD_REQUEST, f, S::BAD_REQUEST],
        ),
        (
            "POST",
            "/v1/embeddings",
            "{}",
            [u, u, S::BAD_REQUEST, f, S::BAD_REQUEST],
        ),
        ("GET", "/health", "", [ok, ok, ok, ok, ok]),
        ("GET", "/ready", "", [ok, ok, ok, ok, ok]),
        ("GET", "/metrics", "", [ok, ok, ok, ok, ok]),
    ];
    let keys = [
        None,
        Some("wrong-secret-0123456789"),
        Some(ALICE),
        Some(NODE),
        Some(ADMIN),
    ];
    for (method, path, body, want) in table {
        for (key, want) in keys.iter().zip(want) {
            let got = call(&k.h, method, path, *key, body).await;
            let who = key.map_or("none", |k| &k[..4]);
            assert_eq!(got, want, "{method} {path} as {who}");
        }
    }
}

/// Submits task `id` as `key`'s owner through the router.
async fn h_submit_owned(h: &Harness, id: &str, key: &str) {
    h_submit_owned_body(h, id, key, "p").await
}

/// Submits task `id` with `prompt` as `key`'s owner through the router (202 expected).
async fn h_submit_owned_body(h: &Harness, id: &str, key: &str, prompt: &str) {
    let body =
        serde_json::json!({"task_id": id, "model_ref": "tiny", "prompt": prompt, "max_tokens": 3})
            .to_string();
    assert_eq!(
        call(h, "POST", "/v2/tasks", Some(key), &body).await,
        StatusCode::ACCEPTED
    );
}

// covers: AUTH-5105
#[tokio::test(start_paused = true)]
async fn a_client_sees_only_its_own_tasks_and_an_admin_sees_all() {
    let k = harness();
    h_submit_owned(&k.h, "mine", ALICE).await;
    for path in ["/v2/tasks/mine", "/v2/tasks/mine/events"] {
        assert_eq!(
            call(&k.h, "GET", path, Some(BOB), "").await,
            StatusCode::NOT_FOUND,
            "{path}"
        );
        // Indistinguishable from a task that does not exist.
        let none = path.replace("mine", "no-such-task");
        assert_eq!(
            call(&k.h, "GET", &none, Some(BOB), "").await,
            StatusCode::NOT_FOUND
        );
        // Naming the owner does not help a client.
        let named = format!("{path}?owner=alice");
        assert_eq!(
            call(&k.h, "GET", &named, Some(BOB), "").await,
            StatusCode::NOT_FOUND
        );
    }
    assert_eq!(
        call(&k.h, "POST", "/v2/tasks/mine/cancel", Some(BOB), "").await,
        StatusCode::NOT_FOUND
    );
    let alices = k.h.orch.task("alice", "mine").unwrap();
    assert!(!alices.is_terminal(), "bob cancelled alice's task");
    // Its owner and the admin can.
    assert_eq!(
        call(&k.h, "GET", "/v2/tasks/mine", Some(ALICE), "").await,
        StatusCode::OK
    );
    assert_eq!(
        call(&k.h, "GET", "/v2/tasks/mine", Some(ADMIN), "").await,
        StatusCode::OK
    );
    // Task ids are scoped per key: bob's "mine" (another request) is his own task.
    h_submit_owned_body(&k.h, "mine", BOB, "bob's prompt").await;
    let bobs = k.h.orch.task("bob", "mine").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&alices, &bobs));
    // Now two keys use the id: an admin names the owner.
    assert_eq!(
        call(&k.h, "GET", "/v2/tasks/mine", Some(ADMIN), "").await,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(
            &k.h,
            "POST",
            "/v2/tasks/mine/cancel?owner=alice",
            Some(ADMIN),
            ""
        )
        .await,
        StatusCode::NO_CONTENT
    );
    let (code, _) = outcome(&alices).await;
    assert_eq!(code, "CANCELLED");
    assert!(!bobs.is_terminal(), "the admin cancelled alice's task only");
    // Bob's own cancel reaches his task.
    assert_eq!(
        call(&k.h, "POST", "/v2/tasks/mine/cancel", Some(BOB), "").await,
        StatusCode::NO_CONTENT
    );
    let (code, _) = outcome(&bobs).await;
    assert_eq!(code, "CANCELLED");
}

// covers: AUTH-5120
#[tokio::test(start_paused = true)]
async fn two_keys_use_one_task_id_and_neither_learns_of_the_other() {
    let k = harness();
    h_submit_owned_body(&k.h, "shared-id", ALICE, "alice's prompt").await;
    // Bob's submission under the id is admitted (not 409), with a body alice never sent.
    h_submit_owned_body(&k.h, "shared-id", BOB, "bob's prompt").await;
    // Each resubmits his own request: the same task (idempotent), not the other's.
    h_submit_owned_body(&k.h, "shared-id", ALICE, "alice's prompt").await;
    h_submit_owned_body(&k.h, "shared-id", BOB, "bob's prompt").await;
    // Another body under one's own id is still 409.
    let other = r#"{"task_id":"shared-id","model_ref":"tiny","prompt":"x","max_tokens":3}"#;
    assert_eq!(
        call(&k.h, "POST", "/v2/tasks", Some(BOB), other).await,
        StatusCode::CONFLICT
    );
    let alice = k.h.orch.task("alice", "shared-id").unwrap();
    let bob = k.h.orch.task("bob", "shared-id").unwrap();
    assert!(!std::sync::Arc::ptr_eq(&alice, &bob));
    assert_eq!(k.h.orch.tasks.filtered(|t| t.id == "shared-id").len(), 2);
    assert_ne!(alice.digest(), bob.digest());
}
/// Waits until `task` has a `started` frame (it holds the slot).
async fn started(task: &crate::tasks::Task) {
    let mut rx = task.watch_frames();
    while !names(task).contains(&"started") {
        rx.changed().await.unwrap();
    }
}

/// The order in which alice's burst (a1..a4) and bob's one task (b1) run on one slot, with
/// a1 already running when the rest arrive.
async fn run_order(flags: &[&str]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(dir.path(), "keys", &format!("alice:{ALICE}\nbob:{BOB}\n"));
    let file = format!("--api-keys-file={}", keys.display());
    let mut all = vec![file.as_str()];
    all.extend_from_slice(flags);
    let h = Harness::start_with_keys(&all);
    h.add_pool("p", 1);
    h.engine.always(tokens(2, 10 * MS));
    h_submit_owned(&h, "a1", ALICE).await;
    started(&h.task("a1").unwrap()).await;
    for id in ["a2", "a3", "a4"] {
        h_submit_owned(&h, id, ALICE).await;
    }
    h_submit_owned(&h, "b1", BOB).await;
    // Awaited together: each ends when its own task does.
    let tasks: Vec<_> = ["a1", "a2", "a3", "a4", "b1"]
        .map(|id| h.task(id).unwrap())
        .to_vec();
    let ended = futures_util::future::join_all(tasks.iter().map(|t| outcome(t))).await;
    let mut ends: Vec<_> = ended
        .into_iter()
        .zip(&tasks)
        .map(|((code, at), t)| {
            assert_eq!(code, "end");
            (at, t.id.clone())
        })
        .collect();
    ends.sort();
    ends.into_iter().map(|(_, id)| id).collect()
}

// covers: ORCH-2120
#[tokio::test(start_paused = true)]
async fn keys_take_turns_within_a_priority_class_unless_fifo_is_asked_for() {
    // Bob's task runs after alice's next one, not after her whole burst.
    assert_eq!(run_order(&[]).await, ["a1", "a2", "b1", "a3", "a4"]);
    assert_eq!(
        run_order(&["--queue-fairness=fifo"]).await,
        ["a1", "a2", "a3", "a4", "b1"]
    );
}

const CAROL: &str = "carol-secret-0123456789";
const DAVE: &str = "dave-secret-01234567890";

/// Keys with limits: carol 2 admissions a second (burst 2), dave one unfinished task at a time.
fn limited() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(
        dir.path(),
        "keys",
        &format!("carol:{CAROL} rate=2 burst=2\ndave:{DAVE} concurrent=1\n"),
    );
    let file = format!("--api-keys-file={}", keys.display());
    let h = Harness::start_with_keys(&[&file, "--metrics-key-labels=true"]);
    h.add_pool("p", 1);
    Keys { h, _dir: dir }
}

/// Submits as `key`; the status and the refusal's body.
async fn submit_as(h: &Harness, key: &str, id: &str) -> (StatusCode, serde_json::Value) {
    let body = format!(r#"{{"task_id":"{id}","model_ref":"tiny","prompt":"p","max_tokens":3}}"#);
    let req = Request::post("/v2/tasks")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body))
        .unwrap();
    let resp = crate::api::router(h.orch.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

// covers: ORCH-2116
#[tokio::test(start_paused = true)]
async fn a_key_over_its_rate_gets_429_until_its_bucket_refills_exactly() {
    let k = limited();
    k.h.engine.always(tokens(1, MS));
    assert_eq!(submit_as(&k.h, CAROL, "c1").await.0, StatusCode::ACCEPTED);
    assert_eq!(submit_as(&k.h, CAROL, "c2").await.0, StatusCode::ACCEPTED);
    let (status, body) = submit_as(&k.h, CAROL, "c3").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["code"], "ADMISSION_REJECT");
    assert_eq!(body["policy_label"], "key_rate");
    assert_eq!(body["retry_after_ms"], 500, "one token comes every 500 ms");
    // Other keys are not held back by carol's limit.
    assert_eq!(submit_as(&k.h, DAVE, "d1").await.0, StatusCode::ACCEPTED);
    tokio::time::sleep(499 * MS).await;
    assert_eq!(
        submit_as(&k.h, CAROL, "c4").await.0,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(MS).await;
    assert_eq!(submit_as(&k.h, CAROL, "c5").await.0, StatusCode::ACCEPTED);
    let m = &k.h.orch.metrics.key_tasks;
    assert_eq!(m.with_label_values(&["carol", "admitted"]).get(), 3);
    assert_eq!(m.with_label_values(&["carol", "key_rate"]).get(), 2);
}

// covers: ORCH-2116
#[tokio::test(start_paused = true)]
async fn a_key_at_its_concurrency_limit_gets_429_until_its_task_ends() {
    let k = limited();
    k.h.engine.push(tokens(1000, 10 * MS));
    assert_eq!(submit_as(&k.h, DAVE, "d1").await.0, StatusCode::ACCEPTED);
    let (status, body) = submit_as(&k.h, DAVE, "d2").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["policy_label"], "key_concurrency");
    // Its first task ends (cancelled): the next one is admitted.
    let first = k.h.task("d1").unwrap();
    k.h.orch.cancel(
        &first,
        llorch_contracts::ErrorEnvelope::new(llorch_contracts::ErrorCode::Cancelled, "test"),
    );
    outcome(&first).await;
    k.h.engine.push(tokens(3, MS));
    assert_eq!(submit_as(&k.h, DAVE, "d3").await.0, StatusCode::ACCEPTED);
    let (code, _) = outcome(&k.h.task("d3").unwrap()).await;
    assert_eq!(code, "end");
    // The key's streamed tokens: the cancelled task's and the finished one's three.
    assert_eq!(
        k.h.orch
            .metrics
            .key_tokens_out
            .with_label_values(&["dave"])
            .get(),
        u64::from(first.tokens_out()) + 3
    );
    // Ended: the slot is free again.
    k.h.engine.push(tokens(3, MS));
    assert_eq!(submit_as(&k.h, DAVE, "d4").await.0, StatusCode::ACCEPTED);
}

// covers: AUTH-5106
#[tokio::test(start_paused = true)]
async fn a_node_id_bound_to_its_own_token_answers_only_that_token_and_that_token_only_it() {
    const NODE_A: &str = "node-a-own-secret-0123456";
    let dir = tempfile::tempdir().unwrap();
    let nodes = secret_file(
        dir.path(),
        "node-tokens",
        &format!("# node_id:secret\nnode-a:{NODE_A}\n"),
    );
    let h = Harness::start_with_keys(&[
        "--profile=cloud",
        "--node-registration=true",
        &format!("--node-token={NODE}"),
        &format!("--admin-token={ADMIN}"),
        &format!("--node-tokens-file={}", nodes.display()),
    ]);
    let reg = |id: &str, address: &str| {
        format!(r#"{{"node_id":"{id}","address":"{address}","gpus":[],"pools":[]}}"#)
    };
    let register = "/v2/nodes/register";
    // The node registers with its own token.
    assert_eq!(
        call(
            &h,
            "POST",
            register,
            Some(NODE_A),
            &reg("node-a", "http://a:9200")
        )
        .await,
        StatusCode::OK
    );
    // The shared node token cannot take the id over (from another address), nor heartbeat it.
    assert_eq!(
        call(
            &h,
            "POST",
            register,
            Some(NODE),
            &reg("node-a", "http://evil:9200")
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&h, "POST", "/v2/nodes/node-a/heartbeat", Some(NODE), "").await,
        StatusCode::FORBIDDEN
    );
    let addresses: Vec<String> = h.orch.managers.list().into_iter().map(|m| m.url).collect();
    assert_eq!(addresses, vec!["http://a:9200"]);
    // The node's token speaks for its node only.
    assert_eq!(
        call(
            &h,
            "POST",
            register,
            Some(NODE_A),
            &reg("node-b", "http://b:9200")
        )
        .await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&h, "POST", "/v2/nodes/node-b/heartbeat", Some(NODE_A), "").await,
        StatusCode::FORBIDDEN
    );
    // An unbound id still registers with the shared node token; the node's own heartbeat works.
    assert_eq!(
        call(
            &h,
            "POST",
            register,
            Some(NODE),
            &reg("node-b", "http://b:9200")
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        call(&h, "POST", "/v2/nodes/node-a/heartbeat", Some(NODE_A), "").await,
        StatusCode::NO_CONTENT
    );
    // Node-supplied numbers are checked: free GPU memory above the total is refused.
    let bad_gpu = r#"{"node_id":"node-a","address":"http://a:9200","gpus":[{"index":0,"name":"g","uuid":null,"memory_total_bytes":1,"memory_free_bytes":2}],"pools":[]}"#;
    assert_eq!(
        call(&h, "POST", register, Some(NODE_A), bad_gpu).await,
        StatusCode::BAD_REQUEST
    );
}

// covers: AUTH-5115
#[tokio::test(start_paused = true)]
async fn a_session_belongs_to_its_key_and_another_key_using_its_id_shares_nothing() {
    let k = harness();
    k.h.add_pool("q", 1);
    k.h.engine.always(tokens(1, MS));
    let submit = |key: &'static str, id: &'static str, placement: &'static str| {
        let body = format!(
            r#"{{"task_id":"{id}","session_id":"s1","model_ref":"tiny","prompt":"p","max_tokens":3{placement}}}"#
        );
        let h = &k.h;
        async move {
            assert_eq!(
                call(h, "POST", "/v2/tasks", Some(key), &body).await,
                StatusCode::ACCEPTED
            );
            let task = h.task(id).unwrap();
            outcome(&task).await;
            task.status(None).pool_id.unwrap()
        }
    };
    // Alice's session runs on "q" (pinned there).
    let pin_q = r#","placement":{"mode":"pin","pin_pool_id":"q"}"#;
    assert_eq!(submit(ALICE, "a1", pin_q).await, "q");
    // Another key reads or deletes it as a session that does not exist.
    assert_eq!(
        call(&k.h, "GET", "/v2/sessions/s1", Some(BOB), "").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&k.h, "DELETE", "/v2/sessions/s1", Some(BOB), "").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&k.h, "GET", "/v2/sessions/s1", Some(ALICE), "").await,
        StatusCode::OK
    );
    // Bob's "s1" is a session of his own: no affinity to Alice's pool (without one, equal free
    // slots are taken by pool id: "p" before "q"), and no turn of hers.
    assert_eq!(submit(BOB, "b1", "").await, "p");
    let turns = |key| {
        let h = &k.h;
        async move {
            let app = crate::api::router(h.orch.clone());
            let r = app
                .oneshot(
                    Request::get("/v2/sessions/s1")
                        .header("authorization", format!("Bearer {key}"))
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["turns"].clone()
        }
    };
    assert_eq!(turns(ALICE).await, 1);
    assert_eq!(turns(BOB).await, 1);
    assert_eq!(
        call(&k.h, "DELETE", "/v2/sessions/s1", Some(BOB), "").await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&k.h, "GET", "/v2/sessions/s1", Some(ALICE), "").await,
        StatusCode::OK
    );
}

// covers: ORCH-2116
#[tokio::test(start_paused = true)]
async fn a_key_past_its_rate_gets_no_prompt_counted_on_an_engine() {
    let k = limited();
    // A pool small enough that a long prompt is counted by an engine before admission.
    k.h.orch.pools.upsert(crate::pools::PoolEntry {
        ctx_max: Some(64),
        ..pool("p", 1)
    });
    let long = vec!["word"; 300].join(" ");
    let body = format!(r#"{{"model_ref":"tiny","prompt":"{long}","max_tokens":3}}"#);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(call(&k.h, "POST", "/v2/tasks", Some(CAROL), &body).await);
    }
    // Two within the rate, counted and refused as too long; the third never reaches an engine.
    assert_eq!(
        statuses,
        [
            StatusCode::BAD_REQUEST,
            StatusCode::BAD_REQUEST,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
    assert_eq!(k.h.engine.tokenized().len(), 2);
}

// covers: AUTH-5118
#[tokio::test(start_paused = true)]
async fn a_key_holds_at_most_its_streams_and_a_task_at_most_its_subscribers() {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(
        dir.path(),
        "keys",
        &format!("alice:{ALICE} conns=2\nbob:{BOB}\n"),
    );
    let h = Harness::start_with_keys(&[
        &format!("--api-keys-file={}", keys.display()),
        &format!("--admin-token={ADMIN}"),
        "--max-subscribers-per-task=3",
        "--metrics-key-labels=true",
    ]);
    h.add_pool("p", 1);
    h.engine.always(Script::NoAnswer);
    h_submit_owned(&h, "held", ALICE).await;
    let subscribe = |key: &'static str| {
        let app = crate::api::router(h.orch.clone());
        async move {
            app.oneshot(
                Request::get("/v2/tasks/held/events")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap()
        }
    };
    let refused = |r: &axum::response::Response, label: &str| {
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            r.headers()["connection"],
            "close",
            "a refused stream keeps its connection"
        );
        assert_eq!(r.headers()["x-backoff-ms"], "1000", "{label}");
    };
    // Alice's two streams are open (their bodies held); her third is refused, whatever task.
    let first = subscribe(ALICE).await;
    let second = subscribe(ALICE).await;
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    refused(&subscribe(ALICE).await, "key_streams");
    // One closes: her next one is open.
    drop(first);
    let third = subscribe(ALICE).await;
    assert_eq!(third.status(), StatusCode::OK);
    // The task's third subscriber (the admin's) is its last; a fourth is refused.
    let admin = subscribe(ADMIN).await;
    assert_eq!(admin.status(), StatusCode::OK);
    refused(&subscribe(ADMIN).await, "task_subscribers");
    assert_eq!(
        k_streams(&h, "alice"),
        1,
        "one refusal of alice's counted under key_streams"
    );
    drop((second, third, admin));
}

fn k_streams(h: &Harness, key: &str) -> u64 {
    h.orch
        .metrics
        .key_tasks
        .with_label_values(&[key, "key_streams"])
        .get()
}

// covers: OBS-6117
#[tokio::test(start_paused = true)]
async fn the_open_metrics_name_no_key_unless_key_labels_are_asked_for() {
    let k = harness();
    k.h.engine.always(tokens(2, MS));
    h_submit_owned(&k.h, "a1", ALICE).await;
    h_submit_owned(&k.h, "b1", BOB).await;
    outcome(&k.h.task("b1").unwrap()).await;
    let scrape = || async {
        let r = crate::api::router(k.h.orch.clone())
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        let body = axum::body::to_bytes(r.into_body(), 1 << 22).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    };
    let text = scrape().await;
    assert!(
        text.contains(r#"orchd_key_tasks_total{key="-",outcome="admitted"} 2"#),
        "{text}"
    );
    assert!(!text.contains("alice") && !text.contains("bob"), "{text}");
    // Asked for (ORCHD_METRICS_KEY_LABELS=true): by name from then on.
    k.h.orch.metrics.name_keys(true);
    h_submit_owned(&k.h, "a2", ALICE).await;
    assert!(scrape()
        .await
        .contains(r#"orchd_key_tasks_total{key="alice",outcome="admitted"} 1"#));
}

// covers: ORCH-2119
#[tokio::test(start_paused = true)]
async fn a_full_queue_under_drop_lru_ends_the_submitting_keys_own_oldest_batch_task() {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(dir.path(), "keys", &format!("alice:{ALICE}\nbob:{BOB}\n"));
    let h = Harness::start_with_keys(&[
        &format!("--api-keys-file={}", keys.display()),
        "--admission-capacity=2",
        "--admission-policy=drop-lru",
    ]);
    h.add_pool("p", 1);
    h.engine.always(Script::NoAnswer);
    let batch = |id: &str| {
        format!(
            r#"{{"task_id":"{id}","model_ref":"tiny","prompt":"p","max_tokens":3,"priority":"batch"}}"#
        )
    };
    // a0 takes the one slot; a1 (alice's) then b1 (bob's) fill the queue.
    for (key, id) in [(ALICE, "a0"), (ALICE, "a1"), (BOB, "b1")] {
        assert_eq!(
            call(&h, "POST", "/v2/tasks", Some(key), &batch(id)).await,
            StatusCode::ACCEPTED
        );
        settle().await;
    }
    // Bob's next one ends bob's own b1, not alice's older a1.
    assert_eq!(
        call(&h, "POST", "/v2/tasks", Some(BOB), &batch("b2")).await,
        StatusCode::ACCEPTED
    );
    let (name, data, _) = terminal(&h.task("b1").unwrap()).await;
    assert_eq!(
        (name, data["code"].as_str()),
        ("error", Some("QUEUE_FULL_DROP_LRU"))
    );
    assert!(
        !h.task("a1").unwrap().is_terminal(),
        "alice's task was dropped for bob's"
    );
}
