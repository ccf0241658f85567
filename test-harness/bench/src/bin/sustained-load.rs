//! Sustained load on a CLOUD stack: orchestratord in a network namespace of its own and two
//! pool-managerd nodes in theirs (each one pool of the tiny model), reached from this process
//! over orchestratord's link, as the CLOUD end-to-end tests build it. An open loop submits short
//! tasks at `--rate` per second for `--secs` seconds over a bounded pool of keep-alive
//! connections: each submission is due at its place in the schedule, whatever the earlier ones
//! answered; when every connection is busy the submission waits, and that lag is counted and
//! printed, not hidden. No event stream is opened: completions are read from orchestratord's
//! `tasks_completed_total` every window. CPU time is the sum of `/proc/<pid>/task/*/schedstat`
//! over every thread of orchestratord, both pool-managerds and every engine.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llorch_e2e_cloud::{Host, Net, TOKEN};
use parking_lot::Mutex;
use tokio::sync::Semaphore;

#[derive(Parser, Clone)]
struct Args {
    #[command(flatten)]
    stack: llorch_bench::StackBinaries,
    /// Submissions per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of the load.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Slots of each node's one pool.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Share of submissions with priority `interactive` (the rest `batch`).
    #[arg(long, default_value_t = 0.2)]
    interactive_share: f64,
    /// orchestratord's journal: `sqlite` (its default) or `none`.
    #[arg(long, default_value = "sqlite", value_parser = ["sqlite", "none"])]
    journal: String,
    /// Keep-alive connections (at most this many submissions in flight).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds per printed row.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// After the load, how long to wait at most for the admitted tasks to end.
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
    /// `max_tokens` of every task.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// An extra `KEY=VALUE` for orchestratord's environment (repeatable), e.g.
    /// `ORCHD_WORKER_THREADS=1`.
    #[arg(long, value_parser = parse_env)]
    orchd_env: Vec<(String, String)>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A submission later than this behind its schedule counts as late.
const LATE: Duration = Duration::from_millis(10);

/// What the submitters saw in one window (and, in `Run::totals`, over the run).
#[derive(Default)]
struct Window {
    offered: u64,
    admitted: u64,
    refused: u64,
    /// Anything but 202 and 429: status or transport error, counted by kind.
    errors: BTreeMap<String, u64>,
    /// Send → whole answer, ms, of every answered submission.
    latency_ms: Vec<f64>,
    late: u64,
    max_lag_ms: f64,
}

impl Window {
    fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    fn absorb(&mut self, w: &Window) {
        self.offered += w.offered;
        self.admitted += w.admitted;
        self.refused += w.refused;
        for (k, v) in &w.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.latency_ms.extend_from_slice(&w.latency_ms);
        self.late += w.late;
        self.max_lag_ms = self.max_lag_ms.max(w.max_lag_ms);
    }
}

/// Processes whose CPU is counted. Engines are read anew at each sample (children of a
/// pool-managerd); an engine that went away keeps the last time it was seen with.
struct Processes {
    orch: u32,
    managers: [u32; 2],
    engine_cpu: HashMap<u32, Duration>,
}

#[derive(Clone, Copy, Default)]
struct Cpu {
    orch: Duration,
    managers: Duration,
    engines: Duration,
    client: Duration,
    /// Every core's busy time (`/proc/stat`): whatever ran, ours or not.
    machine: Duration,
}

impl Cpu {
    /// orchestratord, pool-managerds, engines and this client.
    fn ours(&self) -> Duration {
        self.orch + self.managers + self.engines + self.client
    }
}

impl Processes {
    fn sample(&mut self) -> Cpu {
        for pid in self.managers.iter().flat_map(|m| children(*m)) {
            self.engine_cpu.insert(pid, Duration::ZERO);
        }
        for (pid, t) in self.engine_cpu.iter_mut() {
            if let Some(now) = cpu_time(*pid) {
                *t = now;
            }
        }
        Cpu {
            orch: cpu_time(self.orch).unwrap_or_default(),
            managers: self.managers.iter().filter_map(|p| cpu_time(*p)).sum(),
            engines: self.engine_cpu.values().sum(),
            client: cpu_time(std::process::id()).unwrap_or_default(),
            machine: machine_busy(),
        }
    }

    fn engines(&self) -> usize {
        self.engine_cpu.len()
    }
}

impl std::ops::Sub for Cpu {
    type Output = Cpu;
    fn sub(self, o: Cpu) -> Cpu {
        Cpu {
            orch: self.orch.saturating_sub(o.orch),
            managers: self.managers.saturating_sub(o.managers),
            engines: self.engines.saturating_sub(o.engines),
            client: self.client.saturating_sub(o.client),
            machine: self.machine.saturating_sub(o.machine),
        }
    }
}

/// Time every thread of `pid` has spent on a CPU so far; `None` once it is gone.
fn cpu_time(pid: u32) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(Duration::from_nanos(ns))
}

/// Busy time of all cores since boot: the `cpu` line of `/proc/stat` (user, nice, system, irq,
/// softirq, steal) in USER_HZ ticks, which Linux fixes at 100 per second.
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|rest| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Child processes of `pid` (every thread's `children` list).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

fn rss_mib(pid: u32) -> f64 {
    llorch_e2e_cloud::rss_kib(pid).unwrap_or(0) as f64 / 1024.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What one scrape of orchestratord's `/metrics` says.
#[derive(Default, Clone)]
struct Scrape {
    /// `tasks_completed_total` summed over pools and APIs, by outcome.
    completed: BTreeMap<String, u64>,
    queue_depth: u64,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if let Some(labels) = name.strip_prefix("tasks_completed_total{") {
                let outcome = labels
                    .split_once("outcome=\"")
                    .and_then(|(_, rest)| rest.split_once('"'))
                    .map(|(o, _)| o.to_string())
                    .unwrap_or_default();
                *s.completed.entry(outcome).or_default() += value as u64;
            } else if name.starts_with("queue_depth{") || name == "queue_depth" {
                s.queue_depth += value as u64;
            }
        }
        s
    }

    fn total(&self) -> u64 {
        self.completed.values().sum()
    }

    fn ended(&self) -> u64 {
        self.completed.get("end").copied().unwrap_or(0)
    }

    /// Completions since `before`, by outcome (outcomes with none left out).
    fn since(&self, before: &Scrape) -> BTreeMap<String, u64> {
        self.completed
            .iter()
            .map(|(k, v)| {
                let b = before.completed.get(k).copied().unwrap_or(0);
                (k.clone(), v.saturating_sub(b))
            })
            .filter(|(_, v)| *v > 0)
            .collect()
    }
}

fn outcomes(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentiles(v: &mut [f64]) -> [f64; 3] {
    v.sort_by(|a, b| a.total_cmp(b));
    [0.50, 0.95, 0.99].map(|p| llorch_bench::percentile(v, p))
}

/// The stack: the network (its drop kills every process and removes the namespaces) and where
/// to reach orchestratord.
struct Stack {
    net: Net,
    base: String,
    procs: Processes,
}

fn pools_file(model: &Path, id: &str, slots: u32) -> String {
    format!(
        "[[pools]]\nid = \"{id}\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = {slots}\nctx = {}\nargs = [\"--threads\", \"1\"]\n",
        model.display(),
        slots * 512,
    )
}

fn start_manager(net: &mut Net, a: &Args, host: &Host, i: usize, id: &str) -> usize {
    let config = net.path(&format!("node{i}.toml"));
    let written = std::fs::write(&config, pools_file(&a.stack.model, id, a.slots));
    if let Err(e) = written {
        eprintln!("cannot write {}: {e}", config.display());
    }
    let env = [
        ("POOL_MANAGERD_BIND_ADDR", format!("{}:9200", host.addr)),
        ("POOL_MANAGERD_CONFIG", config.display().to_string()),
        (
            "POOL_MANAGERD_RUNTIME_DIR",
            net.path(&format!("node{i}-run")).display().to_string(),
        ),
        (
            "POOL_MANAGERD_ENGINE_BINARY",
            a.stack.engine.display().to_string(),
        ),
        ("POOL_MANAGERD_NODE_ID", format!("node{i}")),
        ("RUST_LOG", "warn".into()),
    ];
    let log = net.path(&format!("node{i}.log"));
    net.spawn_in(&host.ns, &a.stack.pool_managerd, &env, &log)
}

/// Builds the network, starts the daemons and waits until both pools are healthy.
async fn start(a: &Args, http: &reqwest::Client) -> anyhow::Result<Stack> {
    let mut net = Net::new();
    let orch = net.orchestrator_host();
    let nodes = [net.node_host(&orch, 1), net.node_host(&orch, 2)];
    let mut env = net.cloud_orchestratord_env(&nodes);
    env.push(("RUST_LOG", "warn".into()));
    if a.journal == "none" {
        env.push(("ORCHD_JOURNAL", "none".into()));
    }
    for (k, v) in &a.orchd_env {
        env.push((k.as_str(), v.clone()));
    }
    let log = net.path("orchestratord.log");
    let orch_idx = net.spawn_in(&orch.ns, &a.stack.orchestratord, &env, &log);
    let m0 = start_manager(&mut net, a, &nodes[0], 0, "a0");
    let m1 = start_manager(&mut net, a, &nodes[1], 1, "b0");
    let pid = |net: &Net, i: usize, what: &str| {
        net.children[i]
            .id()
            .with_context(|| format!("{what} exited at start"))
    };
    let procs = Processes {
        orch: pid(&net, orch_idx, "orchestratord")?,
        managers: [
            pid(&net, m0, "pool-managerd a")?,
            pid(&net, m1, "pool-managerd b")?,
        ],
        engine_cpu: HashMap::new(),
    };
    let stack = Stack {
        base: format!("http://{}:8080", orch.addr),
        net,
        procs,
    };
    if let Err(e) = llorch_bench::wait_pools(
        http,
        &stack.base,
        Duration::from_secs(90),
        "both pools healthy",
        |p| llorch_bench::healthy(p) == 2,
    )
    .await
    {
        stack.print_logs();
        return Err(e);
    }
    Ok(stack)
}

impl Stack {
    fn print_logs(&self) {
        for name in ["orchestratord.log", "node0.log", "node1.log"] {
            let text = std::fs::read_to_string(self.net.path(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            eprintln!("--- last lines of {name}:");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }

    /// SIGTERM to every daemon (pool-managerd stops its engines in order), then up to 15 s
    /// for them to exit; `Net`'s drop kills what is left.
    async fn stop(&mut self) {
        for child in &self.net.children {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in &mut self.net.children {
            let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        }
    }

    async fn scrape(&self, http: &reqwest::Client) -> anyhow::Result<Scrape> {
        let text = http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(Scrape::parse(&text))
    }
}

/// One submission (its connection already taken, `lag` behind its schedule): sends, reads the
/// whole answer and records it in the current window.
async fn submit(
    http: reqwest::Client,
    url: Arc<str>,
    body: &'static str,
    window: Arc<Mutex<Window>>,
    lag: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let t = Instant::now();
    let answer = http
        .post(&*url)
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let outcome = match answer {
        Ok(r) => {
            let status = r.status().as_u16();
            // The whole answer, so the connection goes back to the pool.
            match r.bytes().await {
                Ok(_) => Ok(status),
                Err(e) => Err(format!("body: {}", kind(&e))),
            }
        }
        Err(e) => Err(kind(&e)),
    };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut w = window.lock();
    match outcome {
        Ok(202) => w.admitted += 1,
        Ok(429) => w.refused += 1,
        Ok(s) => *w.errors.entry(format!("HTTP {s}")).or_default() += 1,
        Err(e) => *w.errors.entry(e).or_default() += 1,
    }
    w.latency_ms.push(ms);
    if lag > LATE {
        w.late += 1;
    }
    w.max_lag_ms = w.max_lag_ms.max(lag.as_secs_f64() * 1000.0);
}

fn kind(e: &reqwest::Error) -> String {
    // The first failure, told whole once (the counts say how often).
    static TOLD: std::sync::Once = std::sync::Once::new();
    TOLD.call_once(|| eprintln!("first submission error: {e:?}"));
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "transport".into()
    }
}

/// SplitMix64: a fixed sequence of priorities, the same for every run.
fn mix(i: u64) -> f64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The open loop: submission `i` is due at `t0 + i / rate`.
async fn offer(
    a: Args,
    http: reqwest::Client,
    url: Arc<str>,
    window: Arc<Mutex<Window>>,
    connections: Arc<Semaphore>,
    t0: tokio::time::Instant,
) {
    let bodies: [&'static str; 2] = [
        Box::leak(
            format!(r#"{{"model_ref":"tiny","prompt":"the river and the stone","max_tokens":{},"priority":"interactive"}}"#, a.max_tokens)
                .into_boxed_str(),
        ),
        Box::leak(
            format!(r#"{{"model_ref":"tiny","prompt":"the river and the stone","max_tokens":{},"priority":"batch"}}"#, a.max_tokens)
                .into_boxed_str(),
        ),
    ];
    let total = (a.rate * a.secs as f64) as u64;
    for i in 0..total {
        let due = t0 + Duration::from_secs_f64(i as f64 / a.rate);
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let Ok(permit) = connections.clone().acquire_owned().await else {
            return;
        };
        let lag = tokio::time::Instant::now().saturating_duration_since(due);
        window.lock().offered += 1;
        let body = bodies[usize::from(mix(i) >= a.interactive_share)];
        tokio::spawn(submit(
            http.clone(),
            url.clone(),
            body,
            window.clone(),
            lag,
            permit,
        ));
    }
}

/// The figures a window row and the summary need from the whole run.
struct Run {
    totals: Window,
    rss_mib: Vec<f64>,
    /// Completions (outcome `end`) per second of each window during the load, with whether
    /// the queue was non-empty at its end (the engines had more work than they took).
    window_rates: Vec<(f64, bool)>,
}

async fn run(a: &Args, stack: &mut Stack, http: &reqwest::Client) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = load_average();
    let url: Arc<str> = Arc::from(format!("{}/v2/tasks", stack.base));
    let window = Arc::new(Mutex::new(Window::default()));
    let connections = Arc::new(Semaphore::new(a.connections));
    let mut run = Run {
        totals: Window::default(),
        rss_mib: Vec::new(),
        window_rates: Vec::new(),
    };
    println!(
        "CLOUD: orchestratord + 2 pool-managerd nodes in network namespaces, 1 pool each ({} slots, 1 engine thread); journal {}",
        a.slots, a.journal
    );
    if !a.orchd_env.is_empty() {
        let extra: Vec<String> = a
            .orchd_env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("orchestratord also with {}", extra.join(" "));
    }
    println!(
        "open loop: {} tasks/s for {} s, {:.0} % interactive, max_tokens {}, {} keep-alive connections; {} cores; load average before: {load_before}",
        a.rate,
        a.secs,
        a.interactive_share * 100.0,
        a.max_tokens,
        a.connections,
        cores
    );
    println!("| elapsed s | offered | admitted | 429 | other errors | late (>10 ms) / max lag ms | completed in window | queue depth | admission p50 / p95 / p99 ms | orchestratord RSS MiB | cores busy: engines / orchestration / client / other work |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");

    let first = stack.scrape(http).await?;
    let cpu0 = stack.procs.sample();
    let mut prev_cpu = cpu0;
    let t0 = tokio::time::Instant::now();
    let load = tokio::spawn(offer(
        a.clone(),
        http.clone(),
        url,
        window.clone(),
        connections.clone(),
        t0,
    ));
    let period = Duration::from_secs(a.window);
    let load_end = t0 + Duration::from_secs(a.secs);
    let (mut prev, mut prev_at) = (first.clone(), t0);
    let mut at_load_end: Option<(Scrape, Cpu, f64)> = None;
    let mut load = Some(load);
    loop {
        let at = match at_load_end {
            None => (prev_at + period).min(load_end),
            // Draining: a row per window, or as soon as every admitted task ended.
            Some(_) => {
                let target = prev_at + period;
                let mut t = prev_at;
                while t < target {
                    t = (t + Duration::from_secs(1)).min(target);
                    tokio::time::sleep_until(t).await;
                    let ended = stack
                        .scrape(http)
                        .await?
                        .total()
                        .saturating_sub(first.total());
                    if ended >= run.totals.admitted {
                        break;
                    }
                }
                t
            }
        };
        tokio::time::sleep_until(at).await;
        let load_window = at_load_end.is_none();
        if load_window && at == load_end {
            // The last load window: every submission sent, then every answer in.
            if let Some(offering) = load.take() {
                offering.await?;
            }
            let _ = connections.acquire_many(a.connections as u32).await;
        }
        let now = stack.scrape(http).await?;
        let w = std::mem::take(&mut *window.lock());
        let rss = rss_mib(stack.procs.orch);
        run.rss_mib.push(rss);
        let cpu_now = stack.procs.sample();
        let used = cpu_now - prev_cpu;
        prev_cpu = cpu_now;
        let wsecs = at.duration_since(prev_at).as_secs_f64().max(1e-3);
        let cores = |d: Duration| d.as_secs_f64() / wsecs;
        let done = now.since(&prev);
        let elapsed = at.duration_since(t0).as_secs_f64();
        let mut lat = w.latency_ms.clone();
        let [p50, p95, p99] = percentiles(&mut lat);
        println!(
            "| {elapsed:.0}{} | {} | {} | {} | {} | {} / {:.0} | {} | {} | {:.2} / {:.2} / {:.2} | {rss:.1} | {:.2} / {:.2} / {:.2} / {:.2} |",
            if load_window { "" } else { " (drain)" },
            w.offered,
            w.admitted,
            w.refused,
            w.errors_total(),
            w.late,
            w.max_lag_ms,
            outcomes(&done),
            now.queue_depth,
            p50,
            p95,
            p99,
            cores(used.engines),
            cores(used.orch + used.managers),
            cores(used.client),
            cores(used.machine.saturating_sub(used.ours())),
        );
        if load_window {
            let ended = now.ended().saturating_sub(prev.ended());
            let secs = at.duration_since(prev_at).as_secs_f64().max(1e-3);
            run.window_rates
                .push((ended as f64 / secs, now.queue_depth > 0));
        }
        run.totals.absorb(&w);
        if load_window && at == load_end {
            at_load_end = Some((
                now.clone(),
                stack.procs.sample(),
                t0.elapsed().as_secs_f64(),
            ));
        }
        prev = now;
        prev_at = at;
        if at_load_end.is_some() {
            let all_ended = prev.total().saturating_sub(first.total()) >= run.totals.admitted;
            let drain_over =
                tokio::time::Instant::now() > load_end + Duration::from_secs(a.drain_secs);
            if all_ended || drain_over {
                break;
            }
        }
    }
    let last = prev;
    let cpu_end = stack.procs.sample();
    let wall = t0.elapsed().as_secs_f64();
    let (at_end, cpu_load, load_wall) = at_load_end.context("the load never ended")?;
    summary(
        stack,
        &run,
        Phases {
            first: &first,
            at_load_end: &at_end,
            last: &last,
            cpu: [cpu0, cpu_load, cpu_end],
            load_wall,
            wall,
            cores,
            load_before,
        },
    );
    Ok(())
}

struct Phases<'a> {
    first: &'a Scrape,
    at_load_end: &'a Scrape,
    last: &'a Scrape,
    /// CPU at the start of the load, at its end, and once the drain ended.
    cpu: [Cpu; 3],
    load_wall: f64,
    wall: f64,
    cores: usize,
    load_before: String,
}

fn summary(stack: &Stack, run: &Run, p: Phases<'_>) {
    let t = &run.totals;
    let mut lat = t.latency_ms.clone();
    let [p50, p95, p99] = percentiles(&mut lat);
    let max = lat.last().copied().unwrap_or(f64::NAN);
    let in_load = p.at_load_end.ended().saturating_sub(p.first.ended());
    let all = p.last.since(p.first);
    let ended_all = p.last.ended().saturating_sub(p.first.ended());
    let cpu = p.cpu[2] - p.cpu[0];
    let orchestration = cpu.orch + cpu.managers;
    let secs = |d: Duration| d.as_secs_f64();
    let rss_min = run.rss_mib.iter().copied().fold(f64::INFINITY, f64::min);
    let rss_max = run.rss_mib.iter().copied().fold(0.0, f64::max);
    let completion_rate = in_load as f64 / p.load_wall;
    println!();
    println!(
        "load: {:.1} s, then {:.1} s until the admitted tasks ended{}",
        p.load_wall,
        p.wall - p.load_wall,
        if p.last.total().saturating_sub(p.first.total()) >= t.admitted {
            ""
        } else {
            " (drain cut off: not every admitted task ended)"
        }
    );
    println!(
        "offered {} ({:.1}/s), admitted {} ({:.1} %), refused 429 {} ({:.1} %), other errors {}{}",
        t.offered,
        t.offered as f64 / p.load_wall,
        t.admitted,
        pct(t.admitted, t.offered),
        t.refused,
        pct(t.refused, t.offered),
        t.errors_total(),
        if t.errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", outcomes(&t.errors))
        }
    );
    println!(
        "schedule: {} submissions more than 10 ms late, max lag {:.1} ms",
        t.late, t.max_lag_ms
    );
    println!("admission latency over the run: p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    println!(
        "completed: {in_load} during the load ({completion_rate:.1}/s); {ended_all} in all, by outcome: {}",
        outcomes(&all)
    );
    let failed = all.values().sum::<u64>().saturating_sub(ended_all);
    if failed > 0 {
        println!(
            "WARNING: {failed} admitted tasks ended in an error, not `end`: the completion figures below measure failures, not capacity"
        );
    }
    println!(
        "orchestratord RSS: min {rss_min:.1} MiB, max {rss_max:.1} MiB; queue depth at the end of the load {}",
        p.at_load_end.queue_depth
    );
    println!(
        "CPU over {:.1} s: orchestratord {:.2} s, pool-managerds {:.2} s, engines ({}) {:.2} s, this client {:.2} s, other work on the machine {:.2} s; machine {} cores",
        p.wall,
        secs(cpu.orch),
        secs(cpu.managers),
        stack.procs.engines(),
        secs(cpu.engines),
        secs(cpu.client),
        secs(cpu.machine.saturating_sub(cpu.ours())),
        p.cores
    );
    let per_task = |d: Duration| {
        if ended_all == 0 {
            f64::NAN
        } else {
            secs(d) * 1e6 / ended_all as f64
        }
    };
    println!(
        "orchestration CPU per completed task: {:.0} µs (orchestratord {:.0} µs, pool-managerds {:.0} µs); engines {:.0} µs; engines' share of the stack's CPU {:.1} %",
        per_task(orchestration),
        per_task(cpu.orch),
        per_task(cpu.managers),
        per_task(cpu.engines),
        100.0 * secs(cpu.engines) / secs(orchestration + cpu.engines).max(1e-9)
    );
    println!(
        "load average before: {}, after: {}",
        p.load_before,
        load_average()
    );

    if completion_rate < 0.95 * t.offered as f64 / p.load_wall {
        let saturated: Vec<f64> = run
            .window_rates
            .iter()
            .skip(1)
            .filter(|(_, queued)| *queued)
            .map(|(r, _)| *r)
            .collect();
        let (mean, top) = if saturated.is_empty() {
            (completion_rate, completion_rate)
        } else {
            (
                saturated.iter().sum::<f64>() / saturated.len() as f64,
                saturated.iter().copied().fold(0.0, f64::max),
            )
        };
        println!(
            "completions fell behind the offered rate: sustained completion maximum {mean:.1} tasks/s (mean of {} windows with a queue; best window {top:.1}/s)",
            saturated.len()
        );
        let during = p.cpu[1] - p.cpu[0];
        let engine_cores = secs(during.engines) / p.load_wall;
        let orch_cores = secs(during.orch + during.managers) / p.load_wall;
        let client_cores = secs(during.client) / p.load_wall;
        let machine_cores = secs(during.machine) / p.load_wall;
        let other_cores = secs(during.machine.saturating_sub(during.ours())) / p.load_wall;
        let engine_cap = p.cores.min(stack.procs.engines().max(1)) as f64;
        let verdict = if failed > ended_all {
            "none named: more tasks failed than completed".to_string()
        } else if engine_cores >= 0.8 * engine_cap {
            "the engines: they use nearly all the cores they can".to_string()
        } else if machine_cores >= 0.85 * p.cores as f64 && other_cores >= 0.25 {
            format!("undecided: the machine's CPU was saturated and other work took {other_cores:.2} cores of it; rerun on a quiet machine")
        } else if machine_cores >= 0.85 * p.cores as f64 {
            "orchestration: the machine's CPU is saturated and orchestration takes cores the engines would use".to_string()
        } else {
            "orchestration: neither the engines nor the machine's CPU are saturated".to_string()
        };
        println!(
            "during the load: engines {engine_cores:.2} cores, orchestratord + pool-managerds {orch_cores:.2}, this client {client_cores:.2}, other work {other_cores:.2}; machine busy {machine_cores:.2} of {} cores",
            p.cores
        );
        println!("bottleneck: {verdict}");
    }
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        100.0 * n as f64 / of as f64
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.rate.is_nan() || a.rate <= 0.0 || a.secs == 0 || a.window == 0 || a.connections == 0 {
        bail!("--rate, --secs, --window and --connections must be positive");
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.connections)
        // The daemons close a keep-alive connection idle for their header-read timeout (10 s);
        // a client that keeps idle connections longer races that close on its next request.
        .pool_idle_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut stack = start(&a, &http).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        r = run(&a, &mut stack, &http) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    if outcome.is_err() {
        stack.print_logs();
    }
    stack.stop().await;
    // Dropping the stack kills whatever is left and removes the namespaces.
    drop(stack);
    outcome
}
