//! CLOUD profile end to end, across network namespaces: orchestratord in one, pool-managerd
//! "GPU nodes" in others, each node with its own runtime directory and real engines. The test
//! reaches orchestratord over its own link; nothing crosses but authenticated HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use llorch_e2e_cloud::*;

/// A node: its pools, and a token of its own (None: the cluster's).
type NodeSpec<'a> = (&'a [PoolSpec<'a>], Option<&'a str>);

struct Cluster {
    net: Net,
    orch: Host,
    nodes: Vec<Host>,
    orch_idx: usize,
    orch_env: Vec<(&'static str, String)>,
    node_idx: Vec<usize>,
    api: OrchClient,
}

impl Cluster {
    /// orchestratord (cloud, polling every node) plus one pool-managerd per `nodes` entry.
    async fn start(nodes: &[NodeSpec<'_>], orch_env: &[(&'static str, String)]) -> Cluster {
        let mut net = Net::new();
        let orch = net.orchestrator_host();
        let hosts: Vec<Host> = (1..=nodes.len() as u32)
            .map(|n| net.node_host(&orch, n))
            .collect();
        let mut env = net.cloud_orchestratord_env(&hosts);
        env.push(("ORCHD_POOL_POLL_INTERVAL_MS", "1000".into()));
        env.extend(orch_env.iter().cloned());
        let orch_idx = net.spawn_in(
            &orch.ns,
            &workspace_binary("orchestratord"),
            &env,
            &net.path("orchestratord.log"),
        );
        let orch_env = env;
        let mut node_idx = Vec::new();
        for (i, ((pools, token), host)) in nodes.iter().zip(&hosts).enumerate() {
            node_idx.push(start_node(&mut net, host, i, pools, *token));
        }
        let base = format!("http://{}:8080", orch.addr);
        wait_http_ok(
            "orchestratord across the link",
            &format!("{base}/health"),
            Duration::from_secs(20),
        )
        .await;
        Cluster {
            net,
            orch,
            nodes: hosts,
            orch_idx,
            orch_env,
            node_idx,
            api: OrchClient::new(base, TOKEN),
        }
    }

    async fn healthy(&self, id: &str) -> Option<bool> {
        self.api
            .pools()
            .await
            .iter()
            .find(|p| p["pool_id"] == id)
            .map(|p| p["healthy"] == true)
    }

    async fn wait_healthy(&self, id: &str, want: bool, within: Duration) -> Duration {
        let t0 = Instant::now();
        wait_for(&format!("pool {id} healthy={want}"), within, || async {
            (self.healthy(id).await == Some(want)).then_some(())
        })
        .await;
        t0.elapsed()
    }

    /// Kills orchestratord (SIGKILL: no goodbye to anyone) and starts a fresh one.
    async fn restart_orchestratord(&mut self) {
        self.net.children[self.orch_idx].start_kill().unwrap();
        let _ = self.net.children[self.orch_idx].wait().await;
        self.orch_idx = self.net.spawn_in(
            &self.orch.ns,
            &workspace_binary("orchestratord"),
            &self.orch_env,
            &self.net.path("orchestratord-2.log"),
        );
        wait_http_ok(
            "restarted orchestratord",
            &format!("{}/health", self.api.base),
            Duration::from_secs(20),
        )
        .await;
    }

    /// Free slots of a pool as its own pool-managerd reports them (asked inside the node).
    fn node_slots_free(&self, node: usize, pool: &str) -> Option<u64> {
        node_slots_free(&self.nodes[node], pool)
    }

    fn node_runtime(&self, i: usize) -> std::path::PathBuf {
        self.net.path(&format!("node{i}-run"))
    }
}

fn task(prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": prompt, "max_tokens": max_tokens})
}

// covers: CLOUD-4116
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_handoff_is_seen_within_two_seconds_and_tasks_route_across_nodes() {
    let c = Cluster::start(
        &[
            (&[("a0", "tiny", 2, 4096)], None),
            (
                &[("b0", "tiny", 2, 4096), ("b-only", "tiny-b", 1, 4096)],
                None,
            ),
        ],
        &[],
    )
    .await;
    // Node b's engine becomes ready when its handoff file appears; orchestratord must see it
    // within 2 s of that, over HTTP only.
    let handoff = c.node_runtime(1).join("b0.json");
    wait_for(
        "engine ready on node b",
        Duration::from_secs(40),
        || async { handoff.exists().then_some(()) },
    )
    .await;
    let seen = c.wait_healthy("b0", true, Duration::from_secs(2)).await;
    assert!(seen <= Duration::from_secs(2), "{seen:?}");
    c.wait_healthy("a0", true, Duration::from_secs(40)).await;
    c.wait_healthy("b-only", true, Duration::from_secs(40))
        .await;

    let mut ids = Vec::new();
    for k in 0..8 {
        ids.push(c.api.submit(task(&format!("burst {k}"), 400)).await);
    }
    let only_b = c
        .api
        .submit(serde_json::json!({"model_ref": "tiny-b", "prompt": "x", "max_tokens": 5}))
        .await;
    let mut used = std::collections::BTreeSet::new();
    for id in &ids {
        let st = c.api.finish(id, Duration::from_secs(30)).await;
        assert_eq!(st["state"], "completed", "{st}");
        used.insert(st["pool_id"].as_str().unwrap().to_string());
    }
    assert_eq!(used.len(), 2, "burst used {used:?}");
    assert_eq!(
        c.api.finish(&only_b, Duration::from_secs(30)).await["pool_id"],
        "b-only"
    );
}

// covers: CLOUD-4103, CLOUD-4105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_and_partitioned_node_become_unavailable_and_the_partition_recovers() {
    let mut c = Cluster::start(
        &[
            (&[("a0", "tiny", 1, 4096)], None),
            (&[("b0", "tiny", 1, 4096)], None),
        ],
        &[],
    )
    .await;
    c.wait_healthy("a0", true, Duration::from_secs(40)).await;
    c.wait_healthy("b0", true, Duration::from_secs(40)).await;

    // Kill pool-managerd on node a: unavailable within 2.5 s at a 1 s poll interval.
    let a = c.node_idx[0];
    c.net.children[a].start_kill().unwrap();
    let took = c
        .wait_healthy("a0", false, Duration::from_millis(2500))
        .await;
    assert!(took <= Duration::from_millis(2500), "{took:?}");
    let id = c.api.submit(task("to the survivor", 10)).await;
    assert_eq!(
        c.api.finish(&id, Duration::from_secs(20)).await["pool_id"],
        "b0"
    );

    // Partition node b (link down): its polls time out, it becomes unavailable.
    c.net.set_link(&c.orch, &c.nodes[1], false);
    let took = c
        .wait_healthy("b0", false, Duration::from_millis(2500))
        .await;
    assert!(took <= Duration::from_millis(2500), "{took:?}");
    // No pool now: the task waits in the queue …
    let waiting = c.api.submit(task("waits for the link", 10)).await;
    // … and runs once the link is back and b had its good polls.
    c.net.set_link(&c.orch, &c.nodes[1], true);
    c.wait_healthy("b0", true, Duration::from_secs(10)).await;
    let st = c.api.finish(&waiting, Duration::from_secs(20)).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pool_id"], "b0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_across_the_wire() {
    let c = Cluster::start(
        &[
            (&[("good0", "tiny", 1, 4096)], None),
            (
                &[("rogue0", "tiny", 4, 4096)],
                Some("another-token-000000000000"),
            ),
        ],
        &[("ORCHD_NODE_REGISTRATION", "true".into())],
    )
    .await;
    c.wait_healthy("good0", true, Duration::from_secs(40)).await;
    for k in 0..3 {
        let id = c.api.submit(task(&format!("t{k}"), 5)).await;
        assert_eq!(
            c.api.finish(&id, Duration::from_secs(20)).await["pool_id"],
            "good0"
        );
    }
    assert!(
        c.api.pools().await.iter().all(|p| p["pool_id"] != "rogue0"),
        "pool of a node with another token was used"
    );
    let wrong = authed_client("wrong-token-0000000000000000")
        .post(format!("{}/v2/nodes/register", c.api.base))
        .json(&serde_json::json!({"node_id": "intruder", "address": "http://10.0.0.1:9200", "gpus": [], "pools": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let anon = reqwest::Client::new()
        .get(format!("{}/v2/pools", c.api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let log = read_log(&c.net.path("orchestratord.log"));
    assert!(!log.contains(TOKEN), "token in orchestratord's log");
}

// covers: ORCH-2410, ORCH-2413
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_streaming_through_an_orchestratord_crash_ends_worker_reset_and_runs_again_only_under_a_new_id(
) {
    let mut c = Cluster::start(&[(&[("a0", "tiny-slow", 1, 4096)], None)], &[]).await;
    c.wait_healthy("a0", true, Duration::from_secs(40)).await;
    // Long enough (many seconds on the slow model) that only an abort frees the slot within
    // the wait below.
    let body = serde_json::json!({"task_id": "resubmit-1", "model_ref": "tiny-slow", "prompt": "the", "max_tokens": 2000});
    c.api.submit(body.clone()).await;
    wait_for(
        "task streaming on node a",
        Duration::from_secs(10),
        || async { (c.node_slots_free(0, "a0") == Some(0)).then_some(()) },
    )
    .await;
    wait_for(
        "the first token journaled and sent",
        Duration::from_secs(10),
        || async {
            let v = c.api.get_json("/v2/tasks/resubmit-1").await;
            (v["tokens_out"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    )
    .await;
    // SIGKILL; the journal on its data directory survives.
    c.restart_orchestratord().await;
    // The old request died with the old orchestratord: the engine slot is free again.
    // (Finishing on its own takes over 5 s on the slow model; an abort shows within one.)
    wait_for(
        "old request aborted on the engine",
        Duration::from_secs(1),
        || async { (c.node_slots_free(0, "a0") == Some(1)).then_some(()) },
    )
    .await;
    c.wait_healthy("a0", true, Duration::from_secs(10)).await;
    // The task is known after the restart, ended with a retriable WORKER_RESET: a generation
    // cannot be resumed, and it is never run a second time under its id.
    let st = c.api.finish("resubmit-1", Duration::from_secs(10)).await;
    assert_eq!(st["state"], "failed", "{st}");
    assert_eq!(st["error"]["code"], "WORKER_RESET", "{st}");
    assert_eq!(st["error"]["retriable"], true, "{st}");
    let again = c
        .api
        .http
        .post(format!("{}/v2/tasks", c.api.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 202, "a resubmission answers the same task");
    assert_eq!(c.node_slots_free(0, "a0"), Some(1), "and does not run it");
    // Under a new id it runs, once.
    let mut retry = body.clone();
    retry["task_id"] = "resubmit-2".into();
    c.api.submit(retry).await;
    let st = c.api.finish("resubmit-2", Duration::from_secs(60)).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["attempts"], 1);
    assert_eq!(st["tokens_out"], 2000);
}

// covers: CLOUD-4116
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_chat_stream_runs_through_the_nodes_proxy() {
    let c = Cluster::start(&[(&[("a0", "tiny", 1, 4096)], None)], &[]).await;
    c.wait_healthy("a0", true, Duration::from_secs(40)).await;
    let resp = c
        .api
        .http
        .post(format!("{}/v1/chat/completions", c.api.base))
        .json(&serde_json::json!({
            "model": "tiny", "messages": [{"role": "user", "content": "Across the wire"}],
            "max_tokens": 16, "stream": true, "stream_options": {"include_usage": true}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-llorch-task-id"]
        .to_str()
        .unwrap()
        .to_string();
    let text = resp.text().await.unwrap();
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!content.is_empty(), "{text}");
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let st = c.api.finish(&id, Duration::from_secs(10)).await;
    assert_eq!(st["state"], "completed", "{st}");
    assert_eq!(st["pool_id"], "a0");
}

/// `curl` inside `ns`: the HTTP status of `method url` with `token`.
fn status_from(ns: &str, method: &str, url: &str, token: &str) -> u16 {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args([
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "-d",
            "{}",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

// covers: AUTH-5116
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_own_token_opens_that_node_only_and_orchestratord_presents_each_its_own() {
    use std::os::unix::fs::PermissionsExt;
    const A: &str = "node-zero-own-token-0a1b2c3d";
    const B: &str = "node-one-own-token-4e5f6a7b";
    let mut net = Net::new();
    let orch = net.orchestrator_host();
    let hosts = [net.node_host(&orch, 1), net.node_host(&orch, 2)];
    let tokens = net.path("node-tokens");
    std::fs::write(&tokens, format!("node0:{A}\nnode1:{B}\n")).unwrap();
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut env = net.cloud_orchestratord_env(&hosts);
    env.extend([
        ("ORCHD_POOL_POLL_INTERVAL_MS", "1000".to_string()),
        ("ORCHD_NODE_TOKENS_FILE", tokens.display().to_string()),
        (
            "ORCHD_POOL_MANAGERS",
            format!(
                "node0=http://{}:9200,node1=http://{}:9200",
                hosts[0].addr, hosts[1].addr
            ),
        ),
    ]);
    net.spawn_in(
        &orch.ns,
        &workspace_binary("orchestratord"),
        &env,
        &net.path("orchestratord.log"),
    );
    // Each node holds the shared token too (the spawn's LLORCH_API_TOKEN): its own overrides it.
    for (i, (own, pool)) in [(A, "a0"), (B, "b0")].into_iter().enumerate() {
        start_node_with(
            &mut net,
            &hosts[i],
            i,
            &[(pool, "tiny", 1, 4096)],
            &[("POOL_MANAGERD_REGISTRATION_TOKEN", own.to_string())],
        );
    }
    let api = OrchClient::new(format!("http://{}:8080", orch.addr), TOKEN);
    api.wait_healthy(&["a0", "b0"], Duration::from_secs(40))
        .await;
    // orchestratord polls and proxies with each node's own token: work runs on both.
    for pool in ["a0", "b0"] {
        let id = api
            .submit(
                serde_json::json!({"model_ref": "tiny", "prompt": "x", "max_tokens": 5,
                "placement": {"mode": "pin", "pin_pool_id": pool}}),
            )
            .await;
        let st = api.finish(&id, Duration::from_secs(20)).await;
        assert_eq!(st["state"], "completed", "{st}");
    }
    // Node 1's token (or the shared one) opens nothing on node 0: not its pools, its drain or
    // its engines; node 0's own does.
    let node0 = format!("http://{}:9200", hosts[0].addr);
    for token in [B, TOKEN] {
        assert_eq!(
            status_from(&orch.ns, "GET", &format!("{node0}/v2/pools"), token),
            401
        );
        assert_eq!(
            status_from(
                &orch.ns,
                "POST",
                &format!("{node0}/v2/pools/a0/drain"),
                token
            ),
            401
        );
        assert_eq!(
            status_from(
                &orch.ns,
                "POST",
                &format!("{node0}/v2/pools/a0/engine/completion"),
                token
            ),
            401
        );
    }
    assert_eq!(
        status_from(&orch.ns, "GET", &format!("{node0}/v2/pools"), A),
        200
    );
}

// covers: CLOUD-4117
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_credential_cannot_take_another_nodes_address_or_retire_it() {
    let c = Cluster::start(
        &[
            (&[("a0", "tiny", 1, 4096)], None),
            (&[("b0", "tiny", 1, 4096)], None),
        ],
        &[("ORCHD_NODE_REGISTRATION", "true".into())],
    )
    .await;
    c.wait_healthy("a0", true, Duration::from_secs(40)).await;
    c.wait_healthy("b0", true, Duration::from_secs(40)).await;
    let register = |address: String| {
        let url = format!("{}/v2/nodes/register", c.api.base);
        async move {
            authed_client(TOKEN)
                .post(url)
                .json(&serde_json::json!({"node_id": "intruder", "address": address, "gpus": [], "pools": []}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The shared node credential, at node 0's address (spelt another way too): refused.
    let victim = format!("http://{}:9200", c.nodes[0].addr);
    assert_eq!(register(victim.clone()).await, 409);
    assert_eq!(register(format!("{victim}/")).await, 409);
    // The same id elsewhere (the test's own end of the link: nothing listens there) is a node
    // of its own, and retires nobody.
    let (net, _) = c.orch.addr.rsplit_once('.').unwrap();
    let elsewhere = format!("http://{net}.1:9");
    assert_eq!(register(elsewhere.clone()).await, 200);
    // Once the intruder was polled (and found wanting), node 0 still serves and work runs there.
    wait_for("the intruder polled", Duration::from_secs(10), || async {
        c.api
            .nodes()
            .await
            .iter()
            .any(|n| n["address"] == elsewhere.as_str() && n["availability"] == "unavailable")
            .then_some(())
    })
    .await;
    assert_eq!(c.healthy("a0").await, Some(true));
    let id = c
        .api
        .submit(
            serde_json::json!({"model_ref": "tiny", "prompt": "x", "max_tokens": 5,
            "placement": {"mode": "pin", "pin_pool_id": "a0"}}),
        )
        .await;
    assert_eq!(
        c.api.finish(&id, Duration::from_secs(20)).await["state"],
        "completed"
    );
    let nodes = c.api.nodes().await;
    assert!(
        nodes
            .iter()
            .any(|n| n["address"] == victim.as_str() && n["availability"] == "available"),
        "{nodes:?}"
    );
}
