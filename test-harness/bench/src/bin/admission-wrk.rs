//! Admission at a deep queue, measured by an external load generator (`wrk`), side by side
//! with the bare handler (`bare-admission`): the same JSON parsed into the same request type and
//! pushed onto a mutex queue, nothing else. Each round starts both servers afresh. orchestratord runs queue only (its one pool's
//! engine never becomes healthy; journal `none`: the journal's own cost is `make
//! bench-journal`'s figure), and both servers hold `--queued` tasks before wrk starts. Per
//! round, in this order: new tasks on orchestratord (each with its own `task_id`), the
//! resubmission of a queued task's id (the idempotent lookup), new tasks on the bare handler.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llorch_bench::{queue_only_orchestratord, wait_ok, TOKEN};
use tokio::io::AsyncBufReadExt;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    orchestratord: PathBuf,
    #[arg(long)]
    bare: PathBuf,
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Tasks queued on each server before the first measurement.
    #[arg(long, default_value_t = 100_000)]
    queued: usize,
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// wrk's threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

/// What wrk's `done` hook reports.
#[derive(Debug)]
struct Run {
    requests: u64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    non_2xx: u64,
    socket_errors: u64,
}

const SCRIPT: &str = r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer __TOKEN__"
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
local n = 0
function request()
  n = n + 1
  local id = "__FIXED__"
  if id == "" then id = string.format("w__RUN__-%d-%d", tid, n) end
  return wrk.format(nil, nil, nil, string.format('{"task_id":"%s","model_ref":"tiny","prompt":"benchmark prompt","max_tokens":16}', id))
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %f %f %f %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-admission-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;

    println!(
        "round | server | requests | req/s | p50 ms | p99 ms | max ms | non-2xx | socket errors"
    );
    let mut figures: Vec<(&str, Run)> = Vec::new();
    for round in 0..args.rounds {
        // Fresh servers each round, each holding `--queued` tasks when wrk starts.
        let (mut orch, orch_url) = start_orchestratord(&args, &dir, &http).await?;
        let (mut bare, bare_url) = start_bare(&args.bare).await?;
        wait_ok(&http, &format!("{bare_url}/health")).await?;
        let started = Instant::now();
        prefill(&http, &orch_url, args.queued, "o").await?;
        prefill(&http, &bare_url, args.queued, "b").await?;
        eprintln!(
            "round {round}: queued {} tasks on each server in {:.1} s; load average: {}",
            args.queued,
            started.elapsed().as_secs_f64(),
            load_average()
        );
        let queued_id = format!("prefill-o-{}", args.queued - 1);
        for (name, url, fixed) in [
            ("orchestratord", &orch_url, ""),
            ("orchestratord resubmit", &orch_url, queued_id.as_str()),
            ("bare handler", &bare_url, ""),
        ] {
            let run = wrk(&args, &dir, url, &format!("{round}{}", name.len()), fixed).await?;
            println!(
                "{round} | {name} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {}",
                run.requests,
                run.rate,
                run.p50_ms,
                run.p99_ms,
                run.max_ms,
                run.non_2xx,
                run.socket_errors
            );
            figures.push((name, run));
        }
        let depth = orch_depth(&http, &orch_url).await?;
        eprintln!("round {round}: orchestratord's queue at the end: {depth} tasks");
        let _ = orch.kill().await;
        let _ = bare.kill().await;
        let _ = orch.wait().await;
        let _ = bare.wait().await;
    }
    println!("load average after: {}", load_average());
    for (name, _) in figures.iter().take(3) {
        let runs: Vec<&Run> = figures
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, r)| r)
            .collect();
        let rate = runs.iter().map(|r| r.rate).sum::<f64>() / runs.len() as f64;
        let p99 = runs.iter().map(|r| r.p99_ms).fold(0.0, f64::max);
        println!("{name}: mean {rate:.0} req/s, worst p99 {p99:.3} ms");
    }
    let mean = |name: &str| {
        let r: Vec<f64> = figures
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, r)| r.rate)
            .collect();
        r.iter().sum::<f64>() / r.len().max(1) as f64
    };
    println!(
        "orchestratord / bare handler: {:.2}x",
        mean("orchestratord") / mean("bare handler")
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn start_orchestratord(
    args: &Args,
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let env = [
        ("ORCHD_JOURNAL", "none".to_string()),
        ("ORCHD_ADMISSION_CAPACITY", "5000000".to_string()),
        // Nothing may expire during the run.
        ("ORCHD_MAX_QUEUE_WAIT_MS", "3600000".to_string()),
    ];
    queue_only_orchestratord(http, &args.orchestratord, dir, &env).await
}

async fn start_bare(bin: &Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut child = tokio::process::Command::new(bin)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the bare handler")?;
    let stdout = child.stdout.take().context("bare handler stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("the bare handler did not say where it listens")??
        .context("the bare handler exited")?;
    let addr = line
        .strip_prefix("listening on ")
        .context("unexpected first line from the bare handler")?;
    Ok((child, format!("http://{addr}")))
}

/// Queues `n` tasks (ids `prefill-{tag}-{i}`) with 16 concurrent clients.
async fn prefill(http: &reqwest::Client, base: &str, n: usize, tag: &str) -> anyhow::Result<()> {
    let clients = 16;
    let mut handles = Vec::new();
    for c in 0..clients {
        let http = http.clone();
        let url = format!("{base}/v2/tasks");
        let tag = tag.to_string();
        handles.push(tokio::spawn(async move {
            for i in (c..n).step_by(clients) {
                let body = serde_json::json!({
                    "task_id": format!("prefill-{tag}-{i}"),
                    "model_ref": "tiny",
                    "prompt": "benchmark prompt",
                    "max_tokens": 16,
                });
                let r = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await?;
                if r.status() != 202 {
                    bail!("prefill submit answered {}", r.status());
                }
            }
            Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(())
}

async fn wrk(args: &Args, dir: &Path, url: &str, run: &str, fixed: &str) -> anyhow::Result<Run> {
    let script = dir.join(format!("admit-{run}.lua"));
    let text = SCRIPT
        .replace("__TOKEN__", TOKEN)
        .replace("__RUN__", run)
        .replace("__FIXED__", fixed);
    std::fs::File::create(&script)?.write_all(text.as_bytes())?;
    let out = tokio::process::Command::new(&args.wrk)
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.duration))
        .arg("-s")
        .arg(&script)
        .arg(format!("{url}/v2/tasks"))
        .output()
        .await
        .with_context(|| format!("run {} (apt-get install wrk)", args.wrk.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .with_context(|| format!("wrk printed no result: {stdout}"))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()?;
    if f.len() != 7 {
        bail!("unexpected wrk result line {line:?}");
    }
    Ok(Run {
        requests: f[0] as u64,
        rate: f[0] / (f[1] / 1e6),
        p50_ms: f[2] / 1000.0,
        p99_ms: f[3] / 1000.0,
        max_ms: f[4] / 1000.0,
        non_2xx: f[5] as u64,
        socket_errors: f[6] as u64,
    })
}

async fn orch_depth(http: &reqwest::Client, base: &str) -> anyhow::Result<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("queue_depth"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
