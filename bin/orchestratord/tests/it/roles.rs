//! Separate credentials on real processes: a client key submits and follows its task, the
//! admin token drains through orchestratord (which speaks to pool-managerd with the node
//! token), and pool-managerd refuses the client key.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::harness::*;

const ALICE: &str = "alice-key-0123456789abcdef";
const ADMIN: &str = "admin-key-0123456789abcdef";
const NODE: &str = "node-key-0123456789abcdefg";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_keys_work_end_to_end_and_pool_managerd_refuses_a_client_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, format!("alice:{ALICE}\n")).unwrap();
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 1024),
        orch_env: vec![
            ("LLORCH_API_TOKEN", String::new()),
            ("ORCHD_API_KEYS_FILE", keys.display().to_string()),
            ("LLORCH_ADMIN_TOKEN", ADMIN.into()),
            ("LLORCH_NODE_TOKEN", NODE.into()),
        ],
        // The node token takes the place of the shared one there.
        pm_env: vec![("LLORCH_NODE_TOKEN", NODE.into())],
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
    let log = s.orch_log();
    for secret in [ALICE, ADMIN, NODE] {
        assert!(
            !log.contains(secret),
            "a secret reached orchestratord's log"
        );
    }
}
