//! CPU time per relayed token. One pool-managerd runs one engine (tiny model, 4 slots); in
//! front of it an orchestratord HOME (reads the handoff file, calls the engine on loopback) and
//! an orchestratord CLOUD (polls pool-managerd, calls the engine through its authenticated
//! proxy); the third path calls pool-managerd's proxy directly, the fourth the engine itself
//! (its address from the handoff file): the baseline of each path's tokens/s. Each round sends `streams`
//! concurrent streams of `tokens` tokens down one path, rounds interleaved, and divides the CPU
//! time each daemon used over the round by the tokens relayed. CPU time is the sum of
//! `/proc/<pid>/task/*/schedstat` (nanoseconds on a CPU, every thread): `/proc/<pid>/stat`
//! counts 10 ms ticks, too coarse for a round. Each daemon's idle CPU over a window before the
//! load is printed beside it.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use llorch_bench::{
    listening_base, pool_managerd, read_stream, spawn, via_orchestratord, wait_ok, TOKEN,
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    stack: llorch_bench::StackBinaries,
    /// Measured rounds per path (one warm-up round each is dropped).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 4)]
    streams: usize,
    #[arg(long, default_value_t = 512)]
    tokens: u32,
    /// Length of the idle measurement before the load.
    #[arg(long, default_value_t = 10)]
    idle_s: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Home,
    Cloud,
    Proxy,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Home, Path::Cloud, Path::Proxy];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "engine direct",
            Path::Home => "orchestratord HOME",
            Path::Cloud => "orchestratord CLOUD",
            Path::Proxy => "pool-managerd proxy",
        }
    }
}

/// The three daemons, in the order of `Path`: HOME, CLOUD, pool-managerd.
struct Daemons {
    pids: [u32; 3],
    home: String,
    cloud: String,
    pm: String,
    engine: String,
    /// The engine's API key (its key file), for the direct path; none from a pool-managerd
    /// that gives its engines none (an older build, compared side by side).
    engine_key: Option<String>,
}

impl Daemons {
    fn cpu(&self) -> [Duration; 3] {
        self.pids.map(cpu_time)
    }

    /// The daemon a path's tokens are charged to (none for the engine alone).
    fn charged(&self, path: Path) -> Option<usize> {
        match path {
            Path::Direct => None,
            Path::Home => Some(0),
            Path::Cloud => Some(1),
            Path::Proxy => Some(2),
        }
    }
}

/// Time every thread of `pid` has spent on a CPU so far.
fn cpu_time(pid: u32) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// One stream of llama-server's own `/completion` at `url` (pool-managerd's proxy, with the
/// token, or the engine itself); returns its tokens.
async fn native_stream(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    tokens: u32,
    seed: u64,
) -> anyhow::Result<u32> {
    let t0 = Instant::now();
    let mut req = http.post(url);
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    let resp = req
        .json(&serde_json::json!({
            "prompt": "the river and the stone", "n_predict": tokens, "stream": true, "seed": seed
        }))
        .send()
        .await?;
    let sample = read_stream(resp, t0, |f| {
        let v: serde_json::Value = serde_json::from_str(&f.data).unwrap_or_default();
        let n = u32::from(v["content"].as_str().is_some_and(|c| !c.is_empty()));
        (n, v["stop"] == true)
    })
    .await?;
    Ok(sample.tokens)
}

/// One round: `streams` concurrent streams down `path`; returns the tokens relayed.
async fn round(d: &Daemons, a: &Args, path: Path, round: usize) -> anyhow::Result<u32> {
    let http = reqwest::Client::new();
    let mut set = tokio::task::JoinSet::new();
    for s in 0..a.streams {
        let http = http.clone();
        let seed = (round * a.streams + s) as u64;
        let tokens = a.tokens;
        let engine_key = d.engine_key.clone();
        let base = match path {
            Path::Direct => format!("{}/completion", d.engine),
            Path::Home => d.home.clone(),
            Path::Cloud => d.cloud.clone(),
            Path::Proxy => format!("{}/v2/pools/bench/engine/completion", d.pm),
        };
        set.spawn(async move {
            match path {
                Path::Direct => {
                    return native_stream(&http, &base, engine_key.as_deref(), tokens, seed).await
                }
                Path::Proxy => {
                    return native_stream(&http, &base, Some(TOKEN), tokens, seed).await
                }
                Path::Home | Path::Cloud => {}
            }
            let body = serde_json::json!({
                "model_ref": "tiny", "prompt": "the river and the stone", "max_tokens": tokens, "seed": seed
            });
            Ok(via_orchestratord(&http, &base, TOKEN, &body).await?.tokens)
        });
    }
    let mut total = 0;
    while let Some(r) = set.join_next().await {
        total += r??;
    }
    Ok(total)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-relay-cpu-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    std::fs::write(
        dir.join("pools.toml"),
        format!(
            "[[pools]]\nid = \"bench\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = {}\nctx = {}\nargs = [\"--threads\", \"1\"]\n",
            a.stack.model.display(),
            a.streams,
            a.streams as u32 * (a.tokens + 64),
        ),
    )?;
    let pm = pool_managerd(&a.stack, &dir, &runtime)?;
    let pm_base = listening_base(&pm).await?;
    let home = spawn(
        &a.stack.orchestratord,
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", runtime.display().to_string()),
            (
                "ORCHD_DATA_DIR",
                runtime.join("home-data").display().to_string(),
            ),
        ],
    )?;
    let cloud = spawn(
        &a.stack.orchestratord,
        &[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            (
                "ORCHD_DATA_DIR",
                runtime.join("cloud-data").display().to_string(),
            ),
            ("ORCHD_PROFILE", "cloud".into()),
            ("ORCHD_POOL_MANAGERS", pm_base.clone()),
        ],
    )?;
    let d = Daemons {
        pids: [
            home.id().context("HOME orchestratord exited")?,
            cloud.id().context("CLOUD orchestratord exited")?,
            pm.id().context("pool-managerd exited")?,
        ],
        home: listening_base(&home).await?,
        cloud: listening_base(&cloud).await?,
        pm: pm_base,
        engine: String::new(),
        engine_key: None,
    };
    let http = reqwest::Client::new();
    wait_ok(&http, &format!("{}/ready", d.home)).await?;
    wait_ok(&http, &format!("{}/ready", d.cloud)).await?;
    // HOME is ready: pool-managerd wrote the pool's handoff file, which names the engine.
    let handoff: llorch_contracts::HandoffFile =
        serde_json::from_slice(&std::fs::read(runtime.join("bench.json"))?)?;
    let engine_key = llorch_handoff::read_key(&runtime, "bench")?;
    let d = Daemons {
        engine: handoff.url,
        engine_key,
        ..d
    };

    // Idle first: nothing submitted, every periodic job at its default interval.
    let before = d.cpu();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(a.idle_s)).await;
    let idle_wall = t0.elapsed().as_secs_f64();
    let after = d.cpu();
    let idle: Vec<f64> = (0..3)
        .map(|i| (after[i] - before[i]).as_secs_f64() / idle_wall * 100.0)
        .collect();

    // Per path and round: CPU of every daemon over the round, and the tokens relayed.
    let mut per_token: Vec<Vec<f64>> = vec![Vec::new(); PATHS.len()];
    let mut others: Vec<Vec<[f64; 3]>> = vec![Vec::new(); PATHS.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); PATHS.len()];
    for r in 0..=a.rounds {
        for (p, path) in PATHS.iter().enumerate() {
            let before = d.cpu();
            let t0 = Instant::now();
            let tokens = round(&d, &a, *path, r).await?;
            let wall = t0.elapsed().as_secs_f64();
            let after = d.cpu();
            if r == 0 {
                continue; // warm-up
            }
            let us: [f64; 3] = std::array::from_fn(|i| {
                (after[i] - before[i]).as_secs_f64() * 1e6 / f64::from(tokens)
            });
            if let Some(i) = d.charged(*path) {
                per_token[p].push(us[i]);
            }
            others[p].push(us);
            rates[p].push(f64::from(tokens) / wall);
        }
    }

    println!(
        "{} rounds per path (1 warm-up dropped), {} concurrent streams x {} tokens, one engine with {} slots",
        a.rounds, a.streams, a.tokens, a.streams
    );
    println!(
        "idle over {idle_wall:.1} s before the load: HOME {:.2}% of a core, CLOUD {:.2}%, pool-managerd {:.2}%",
        idle[0], idle[1], idle[2]
    );
    println!("| path | CPU per token (median) | min | max | tokens/s per round (median) | vs direct | pool-managerd CPU per token during it |");
    println!("|---|---|---|---|---|---|---|");
    let direct = median(rates[0].clone());
    for (p, path) in PATHS.iter().enumerate() {
        let v = &per_token[p];
        let rate = median(rates[p].clone());
        let pm_us = median(others[p].iter().map(|u| u[2]).collect());
        let cpu = if v.is_empty() {
            "— | — | —".to_string()
        } else {
            let min = v.iter().copied().fold(f64::INFINITY, f64::min);
            let max = v.iter().copied().fold(0.0, f64::max);
            format!("{:.1} µs | {min:.1} µs | {max:.1} µs", median(v.clone()))
        };
        println!(
            "| {} | {cpu} | {rate:.0} | {:.1} % | {pm_us:.1} µs |",
            path.name(),
            rate / direct * 100.0,
        );
    }
    drop((home, cloud, pm));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
