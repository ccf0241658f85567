//! Separate credentials on real processes: a client key submits and follows its task, the
//! admin token drains through orchestratord (which speaks to pool-managerd with the node
//! token), and pool-managerd refuses the client key. Both daemons log at `trace` and export
//! spans over OTLP meanwhile: no secret reaches a log line, a span, a metric or an error body.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::*;

const ALICE: &str = "alice-key-0123456789abcdef";
const ADMIN: &str = "admin-key-0123456789abcdef";
const NODE: &str = "node-key-0123456789abcdefg";
/// Presented but never valid: a refused secret must not be echoed or logged either.
const WRONG: &str = "wrong-key-0123456789abcdef";

// covers: AUTH-5102
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_keys_work_end_to_end_and_pool_managerd_refuses_a_client_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("alice:{ALICE}\n")).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (otlp, spans) = crate::trace::otlp_receiver().await;
    let observed = [
        ("RUST_LOG", "trace".to_string()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let mut orch_env = vec![
        ("LLORCH_API_TOKEN", String::new()),
        ("ORCHD_API_KEYS_FILE", keys.display().to_string()),
        ("LLORCH_ADMIN_TOKEN", ADMIN.into()),
        ("LLORCH_NODE_TOKEN", NODE.into()),
    ];
    orch_env.extend(observed.iter().cloned());
    // The node token takes the place of the shared one there.
    let mut pm_env = vec![("LLORCH_NODE_TOKEN", NODE.into())];
    pm_env.extend(observed.iter().cloned());
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env,
        pm_env,
        ..Default::default()
    })
    .await;
    let (alice, admin, node) = (
        authed_client(ALICE),
        authed_client(ADMIN),
        authed_client(NODE),
    );
    let a: serde_json::Value = alice
        .post(format!("{}/v2/tasks", s.base))
        .json(&task("the", 8))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = a["task_id"].as_str().unwrap();
    let events = alice
        .get(format!("{}/v2/tasks/{id}/events", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(events.contains("event: end"), "{events}");
    // The shared token of the other tests is no key here.
    assert_eq!(s.get(&format!("/v2/tasks/{id}")).await.status(), 401);
    // pool-managerd takes the node token only.
    let pm = |c: &reqwest::Client| c.get(format!("{}/v2/pools", s.pm_base)).send();
    assert_eq!(pm(&alice).await.unwrap().status(), 401);
    assert_eq!(pm(&admin).await.unwrap().status(), 401);
    assert_eq!(pm(&node).await.unwrap().status(), 200);
    // Drain: not a client's, not a node's; the admin's, forwarded with the node token.
    let drain = |c: &reqwest::Client| {
        c.post(format!("{}/v2/pools/p0/drain", s.base))
            .json(&serde_json::json!({"deadline_ms": 1000}))
            .send()
    };
    assert_eq!(drain(&alice).await.unwrap().status(), 403);
    assert_eq!(drain(&node).await.unwrap().status(), 403);
    assert_eq!(drain(&admin).await.unwrap().status(), 202);
    wait_for(
        "the pool stopped at pool-managerd",
        Duration::from_secs(10),
        || async {
            let v: serde_json::Value = node
                .get(format!("{}/v2/pools/p0/status", s.pm_base))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            (v["state"] == "stopped").then_some(())
        },
    )
    .await;
    // A refused key is not echoed in the refusal, by either daemon.
    let wrong = authed_client(WRONG);
    for url in [
        format!("{}/v2/tasks/{id}", s.base),
        format!("{}/v2/pools", s.pm_base),
    ] {
        let r = wrong.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let body = r.text().await.unwrap();
        assert!(!body.contains(WRONG) && !body.contains("Bearer"), "{body}");
    }

    // Spans of both daemons have been exported by now (the task's, the pool's checks).
    let got = wait_for("spans of both daemons", Duration::from_secs(15), || async {
        let got = spans.lock().clone();
        let services: std::collections::BTreeSet<_> =
            got.iter().map(|s| s.service.clone()).collect();
        (got.iter().any(|s| s.name == "admission") && services.len() >= 2).then_some(got)
    })
    .await;
    let metrics = [
        s.get("/metrics").await.text().await.unwrap(),
        node.get(format!("{}/metrics", s.pm_base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    ];
    let pm_log =
        std::fs::read_to_string(s.runtime_dir.with_file_name("pool-managerd.log")).unwrap();
    let orch_log = s.orch_log();
    assert!(
        orch_log.contains("TRACE") && pm_log.contains("TRACE"),
        "the daemons did not log at trace"
    );
    let places = [
        ("orchestratord's log", orch_log),
        ("pool-managerd's log", pm_log),
        ("the exported spans", format!("{got:?}")),
        ("orchestratord's metrics", metrics[0].clone()),
        ("pool-managerd's metrics", metrics[1].clone()),
    ];
    for (place, text) in &places {
        for secret in [ALICE, ADMIN, NODE, WRONG] {
            assert!(
                !text.contains(secret),
                "the secret {}… reached {place}",
                &secret[..6]
            );
        }
    }
}
