//! Chaos soak with an exactly-once oracle, CLOUD profile across network namespaces:
//! orchestratord and two pool-managerd nodes, a fault proxy (a process in orchestratord's
//! namespace) on the path to each node, clients doing what clients do (read to the end and
//! resume when a connection breaks, cancel, walk away, come back with `Last-Event-ID`, submit
//! the same task twice) while faults come and go: latency, low bandwidth, silent peers,
//! connection resets, partitions (link down) and engine kills.
//!
//! The oracle reads each task as its client finishes with it (a long run outlives the retention
//! of its first tasks): every admitted task ended, exactly once
//! (one terminal frame, last, matching its status); token indices contiguous from 0 and
//! `tokens_out` equal to their count; frame ids contiguous; what each client saw live agrees
//! with the replay and never went backwards across resumes; no slot leaked (in-flight 0 in
//! orchestratord, every slot free on the nodes); one engine per pool and none left after the
//! nodes stop; orchestratord's peak RSS bounded.
//!
//! `LLORCH_SOAK_SECS` (default 45) sets the chaos phase; `LLORCH_SOAK_SEED` replays a run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llorch_e2e_cloud::*;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SLOTS: u32 = 2;
const CLIENTS: usize = 6;
/// orchestratord's RSS may not pass this during the soak (a debug build idles near 30 MiB).
const RSS_LIMIT_KIB: u64 = 256 * 1024;

/// What one client saw of one task.
#[derive(Debug, Default)]
struct Seen {
    /// Frame id → (event, data), across every connection the client made.
    frames: BTreeMap<u64, (String, String)>,
    /// A frame id came that was not above the previous one (a resume went backwards).
    went_backwards: bool,
    kind: &'static str,
}

#[derive(Default)]
struct Tally {
    /// What clients saw of the tasks they are still working with.
    tasks: BTreeMap<String, Seen>,
    admitted: u64,
    refused: u64,
    /// Tasks the oracle read, by outcome (`end` or the error code).
    outcomes: BTreeMap<String, u64>,
    /// What the oracle found wrong (lost, duplicated, diverging views).
    problems: Vec<String>,
}

/// A fault proxy process on the path orchestratord → node, with its control connection.
struct Proxy {
    control: String,
}

impl Proxy {
    async fn set(&self, fault: &str) {
        let conn = tokio::net::TcpStream::connect(&self.control).await.unwrap();
        let (read, mut write) = conn.into_split();
        write
            .write_all(format!("{fault}\n").as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await.unwrap();
        assert_eq!(line.trim(), "ok", "fault {fault}: {line}");
    }
}

fn engines_in(ns: &str) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "llama-server")
        })
        .count()
}

/// Every frame of a task's log (`verbose`: `metrics` frames too), from the start.
async fn replay(api: &OrchClient, id: &str) -> Vec<llorch_client::SseFrame> {
    let mut resp = api
        .http
        .get(format!("{}/v2/tasks/{id}/events?verbose=true", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{id}");
    let mut parser = llorch_sse::SseParser::new();
    let mut frames = Vec::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        frames.extend(parser.push(&chunk));
    }
    frames
}

/// Reads a task's stream until its terminal frame, recording what came; resumes with
/// `Last-Event-ID` when a connection breaks. `stop_after`: walk away after that many frames
/// (returns false then).
async fn follow(
    api: &llorch_client::OrchClient,
    id: &str,
    seen: &Mutex<Tally>,
    stop_after: Option<usize>,
    give_up: Instant,
) -> bool {
    let mut last: Option<u64> = {
        let t = seen.lock();
        t.tasks[id].frames.keys().next_back().copied()
    };
    let mut count = 0;
    while Instant::now() < give_up {
        let Ok(mut events) = api.events(id, last).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while let Some(f) = events.frame().await {
            let Some(fid) = f.id.as_deref().and_then(|i| i.parse::<u64>().ok()) else {
                continue;
            };
            let event = f.event.clone().unwrap_or_default();
            let terminal = event == "end" || event == "error";
            {
                let mut t = seen.lock();
                let s = t.tasks.get_mut(id).unwrap();
                if last.is_some_and(|l| fid <= l) {
                    s.went_backwards = true;
                }
                s.frames.insert(fid, (event, f.data.clone()));
            }
            last = Some(fid);
            count += 1;
            if terminal {
                return true;
            }
            if stop_after.is_some_and(|n| count >= n) {
                return false;
            }
        }
        // Broken (a fault on the way): come back as a browser's EventSource would.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn client(n: usize, seed: u64, oracle: OrchClient, tally: Arc<Mutex<Tally>>, until: Instant) {
    let (api, http, base) = (&oracle.typed, oracle.http.clone(), oracle.base.clone());
    let mut rng = StdRng::seed_from_u64(seed ^ (n as u64).wrapping_mul(0x9e37_79b9));
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let id = format!("soak-{n}-{i}");
        let body = serde_json::json!({
            "task_id": id,
            "model_ref": "tiny",
            "prompt": format!("client {n} turn {i}"),
            "max_tokens": rng.random_range(4..48),
            "priority": if rng.random_bool(0.3) { "batch" } else { "interactive" },
        });
        let roll: f64 = rng.random();
        let kind = match roll {
            r if r < 0.40 => "follow",
            r if r < 0.55 => "cancel",
            r if r < 0.70 => "walk-away",
            r if r < 0.85 => "resume",
            _ => "resubmit",
        };
        let submits = if kind == "resubmit" { 2 } else { 1 };
        let mut admitted = false;
        for _ in 0..submits {
            match http
                .post(format!("{base}/v2/tasks"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status() == 202 || r.status() == 200 => admitted = true,
                // Refused (429/503 while pools are faulted) or unreachable: not admitted.
                _ => {}
            }
        }
        if !admitted {
            tally.lock().refused += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        {
            let mut t = tally.lock();
            t.admitted += 1;
            t.tasks.insert(
                id.clone(),
                Seen {
                    kind,
                    ..Default::default()
                },
            );
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        match kind {
            "cancel" => {
                let frames = rng.random_range(1..4);
                if !follow(api, &id, &tally, Some(frames), give_up).await {
                    let _ = api.cancel(&id).await;
                    follow(api, &id, &tally, None, give_up).await;
                }
            }
            "walk-away" => {
                let frames = rng.random_range(1..4);
                follow(api, &id, &tally, Some(frames), give_up).await;
            }
            "resume" => {
                let frames = rng.random_range(1..4);
                if !follow(api, &id, &tally, Some(frames), give_up).await {
                    let away = rng.random_range(0..600);
                    tokio::time::sleep(Duration::from_millis(away)).await;
                    follow(api, &id, &tally, None, give_up).await;
                }
            }
            _ => {
                follow(api, &id, &tally, None, give_up).await;
            }
        }
        // The oracle reads the task now, while orchestratord still keeps it (a long run
        // outlives the retention period of its first tasks).
        let seen = tally.lock().tasks.remove(&id).unwrap_or_default();
        let verdict = check(&oracle, &id, &seen).await;
        let mut t = tally.lock();
        match verdict {
            Ok(outcome) => *t.outcomes.entry(outcome).or_default() += 1,
            Err(problem) => t.problems.push(problem),
        }
    }
}

/// The oracle for one task: it ends (within 90 s of its client being done with it) with one
/// terminal frame, last, matching its status; frame ids and token indices are contiguous and
/// `tokens_out` counts the tokens; what its client saw live is what the replay holds, and never
/// went backwards. `Ok`: its outcome (`end` or the error code).
async fn check(api: &OrchClient, id: &str, seen: &Seen) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        // Status reads do not subscribe: a client that walked away stays away.
        let v = api.get_json(&format!("/v2/tasks/{id}")).await;
        if v["finished_at_ms"].is_u64() {
            break v;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{id} ({}): lost, not ended within 90 s: {v}",
                seen.kind
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let frames = replay(api, id).await;
    let ids: Vec<u64> = frames
        .iter()
        .filter_map(|f| f.id.as_deref()?.parse().ok())
        .collect();
    if ids != (0..frames.len() as u64).collect::<Vec<_>>() {
        return Err(format!("{id}: frame ids {ids:?}"));
    }
    let terminals = frames
        .iter()
        .filter(|f| matches!(f.event.as_deref(), Some("end" | "error")))
        .count();
    let last = frames.last().ok_or_else(|| format!("{id}: no frames"))?;
    if terminals != 1 || !matches!(last.event.as_deref(), Some("end" | "error")) {
        return Err(format!(
            "{id}: {terminals} terminal frames, the last is {:?}",
            last.event
        ));
    }
    let tokens: Vec<u64> = frames
        .iter()
        .filter(|f| f.event.as_deref() == Some("token"))
        .filter_map(|f| serde_json::from_str::<serde_json::Value>(&f.data).ok()?["i"].as_u64())
        .collect();
    if tokens != (0..tokens.len() as u64).collect::<Vec<_>>() {
        return Err(format!("{id}: token indices {tokens:?}"));
    }
    let data: serde_json::Value = serde_json::from_str(&last.data).unwrap_or_default();
    let (outcome, state) = match last.event.as_deref() {
        Some("end") => {
            if data["tokens_out"] != tokens.len() as u64 {
                return Err(format!(
                    "{id}: tokens_out {} for {} tokens",
                    data["tokens_out"],
                    tokens.len()
                ));
            }
            ("end".to_string(), "completed")
        }
        _ => {
            let code = data["code"].as_str().unwrap_or("?").to_string();
            let state = if code == "CANCELLED" {
                "cancelled"
            } else {
                "failed"
            };
            (code, state)
        }
    };
    if status["state"] != state {
        return Err(format!(
            "{id}: ended {outcome} but its status says {}",
            status["state"]
        ));
    }
    if seen.went_backwards {
        return Err(format!(
            "{id} ({}): a resume replayed old frames",
            seen.kind
        ));
    }
    for (fid, (event, data)) in &seen.frames {
        let f = frames
            .get(*fid as usize)
            .ok_or_else(|| format!("{id}: frame {fid} seen, not kept"))?;
        if (f.event.as_deref(), f.data.as_str()) != (Some(event.as_str()), data.as_str()) {
            return Err(format!(
                "{id}: frame {fid} seen live differs from its replay"
            ));
        }
    }
    Ok(outcome)
}

// covers: ORCH-2303
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_every_admitted_task_ends_exactly_once_and_nothing_leaks() {
    let secs: u64 = std::env::var("LLORCH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed: u64 = std::env::var("LLORCH_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("soak: seed {seed}, {secs} s of chaos");

    let mut net = Net::new();
    let orch = net.orchestrator_host();
    let nodes: Vec<Host> = (1..=2).map(|n| net.node_host(&orch, n)).collect();
    let pools = ["a0", "b0"];
    let mut proxies = Vec::new();
    let mut managers = Vec::new();
    for (i, host) in nodes.iter().enumerate() {
        let listen = format!("127.0.0.1:{}", 9301 + i);
        let control = format!("{}:{}", orch.addr, 9401 + i);
        net.spawn_in(
            &orch.ns,
            &workspace_binary("llorch-fault-proxy"),
            &[
                ("FAULT_PROXY_LISTEN", listen.clone()),
                ("FAULT_PROXY_UPSTREAM", format!("{}:9200", host.addr)),
                ("FAULT_PROXY_CONTROL", control.clone()),
            ],
            &net.path(&format!("proxy{i}.log")),
        );
        managers.push(format!("http://{listen}"));
        proxies.push(Proxy { control });
    }
    let orch_idx = net.spawn_in(
        &orch.ns,
        &workspace_binary("orchestratord"),
        &[
            ("ORCHD_PROFILE", "cloud".to_string()),
            ("ORCHD_BIND_ADDR", "0.0.0.0:8080".into()),
            (
                "ORCHD_DATA_DIR",
                net.path("orchestratord-data").display().to_string(),
            ),
            ("ORCHD_POOL_MANAGERS", managers.join(",")),
            ("ORCHD_POOL_POLL_INTERVAL_MS", "500".into()),
            ("ORCHD_FIRST_TOKEN_TIMEOUT_MS", "5000".into()),
            ("ORCHD_DECODE_TIMEOUT_MS", "2000".into()),
            ("ORCHD_DISCONNECT_GRACE_MS", "1500".into()),
            ("ORCHD_MAX_QUEUE_WAIT_MS", "20000".into()),
            ("ORCHD_SSE_KEEPALIVE_MS", "1000".into()),
        ],
        &net.path("orchestratord.log"),
    );
    let orch_pid = net.children[orch_idx].id().unwrap();
    let node_idx: Vec<usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, host)| start_node(&mut net, host, i, &[(pools[i], "tiny", SLOTS, 2048)], None))
        .collect();
    let base = format!("http://{}:8080", orch.addr);
    let api = OrchClient::new(base.clone(), TOKEN);
    wait_http_ok(
        "orchestratord",
        &format!("{base}/health"),
        Duration::from_secs(20),
    )
    .await;
    for proxy in &proxies {
        wait_for(
            "the fault proxy's control port",
            Duration::from_secs(10),
            || async { tokio::net::TcpStream::connect(&proxy.control).await.ok() },
        )
        .await;
    }
    api.wait_healthy(&pools, Duration::from_secs(60)).await;

    // Clients and a memory sampler run while faults come and go.
    let until = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                n,
                seed,
                OrchClient::new(base.clone(), TOKEN),
                tally.clone(),
                until,
            ))
        })
        .collect();
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, on) = (peak_rss.clone(), sampling.clone());
        tokio::spawn(async move {
            while on.load(Ordering::SeqCst) {
                peak.fetch_max(rss_kib(orch_pid).unwrap_or(0), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Engine kills per node in the last five minutes: the fifth would open the node's circuit
    // breaker (5 failures in 5 min) and fail the pool for its open period, by design.
    let mut kills: Vec<Vec<Instant>> = vec![Vec::new(); nodes.len()];
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..1500))).await;
        let i = rng.random_range(0..nodes.len());
        let hold = Duration::from_millis(rng.random_range(300..2000));
        kills[i].retain(|t| t.elapsed() < Duration::from_secs(300));
        let kind = match rng.random_range(0..6) {
            0 => "latency",
            1 => "bandwidth",
            2 => "half-open",
            3 => "reset",
            4 => "partition",
            _ if kills[i].len() >= 4 => "reset",
            _ => "engine-kill",
        };
        *faults.entry(kind).or_default() += 1;
        match kind {
            "latency" => proxies[i].set("latency=40").await,
            "bandwidth" => proxies[i].set("bandwidth=20000").await,
            "half-open" => proxies[i].set("half-open").await,
            "reset" => proxies[i].set("reset").await,
            "partition" => net.set_link(&orch, &nodes[i], false),
            _ => {
                let run = net
                    .path(&format!("node{i}-run"))
                    .join(format!("{}.json", pools[i]));
                let pid = std::fs::read(&run)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|v| v["pid"].as_u64());
                // The file may name an engine already gone (restarting): kill only a live
                // llama-server, never whatever reused its pid.
                let engine = pid.map(|p| p as u32).filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "llama-server")
                });
                if let Some(pid) = engine {
                    signal(pid, "-KILL");
                    kills[i].push(Instant::now());
                }
            }
        }
        tokio::time::sleep(hold).await;
        proxies[i].set("pass").await;
        net.set_link(&orch, &nodes[i], true);
    }
    for c in clients {
        c.await.unwrap();
    }

    // Every admitted task was read by the oracle as its client finished with it.
    let tally = std::mem::take(&mut *tally.lock());
    let checked: u64 = tally.outcomes.values().sum::<u64>() + tally.problems.len() as u64;
    assert_eq!(checked, tally.admitted, "tasks admitted but never checked");
    assert!(
        tally.problems.is_empty(),
        "{} of {} tasks wrong: {:?}",
        tally.problems.len(),
        tally.admitted,
        &tally.problems[..tally.problems.len().min(20)]
    );
    let outcomes = &tally.outcomes;

    // Nothing leaked: no task in flight in orchestratord, every slot free on the nodes, one
    // engine per pool.
    wait_for(
        "nothing in flight in orchestratord",
        Duration::from_secs(30),
        || async {
            let pools = api.pools().await;
            (pools.len() == 2
                && pools
                    .iter()
                    .all(|p| p["in_flight"] == 0 && p["healthy"] == true))
            .then_some(())
        },
    )
    .await;
    for (i, host) in nodes.iter().enumerate() {
        wait_for(
            &format!("every slot of {} free", pools[i]),
            Duration::from_secs(30),
            || async { (node_slots_free(host, pools[i]) == Some(u64::from(SLOTS))).then_some(()) },
        )
        .await;
        wait_for(
            &format!("one engine on node {i}"),
            Duration::from_secs(30),
            || async { (engines_in(&host.ns) == 1).then_some(()) },
        )
        .await;
    }
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak_rss.load(Ordering::SeqCst);
    let fault_total: u64 = faults.values().sum();
    println!(
        "soak: seed {seed}: {} tasks admitted ({} refused while faulted), {fault_total} faults {faults:?}, outcomes {outcomes:?}, lost 0, duplicated 0, orchestratord peak RSS {} MiB",
        tally.admitted,
        tally.refused,
        peak / 1024
    );
    assert!(peak < RSS_LIMIT_KIB, "orchestratord peak RSS {peak} KiB");
    assert!(tally.admitted >= secs, "too few tasks to mean anything");
    assert!(fault_total >= secs / 5, "too few faults to mean anything");

    // The nodes stop: no engine is left behind.
    for idx in node_idx {
        signal(net.children[idx].id().unwrap(), "-TERM");
    }
    for (i, host) in nodes.iter().enumerate() {
        wait_for(
            &format!("no engine left on node {i}"),
            Duration::from_secs(15),
            || async { (engines_in(&host.ns) == 0).then_some(()) },
        )
        .await;
    }
}
