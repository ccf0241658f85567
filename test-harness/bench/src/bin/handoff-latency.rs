//! Handoff-file-to-ready latency of pool-managerd: write N handoff files (atomically, as an
//! external provisioner would) pointing at one real llama-server, and time each from the rename
//! until `GET /v2/pools/{id}/status` reports the pool ready. Prints median, p90, p99, max.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llorch_bench::{listening_base, percentile, wait_ok, TOKEN};
use llorch_contracts::HandoffFile;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    pool_managerd: PathBuf,
    #[arg(long)]
    engine: PathBuf,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 100)]
    files: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    let http = reqwest::Client::new();

    let mut engine = tokio::process::Command::new(&args.engine)
        .args([
            "--model",
            &args.model.display().to_string(),
            "--host",
            "127.0.0.1",
        ])
        .args(["--port", "0", "--parallel", "1", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start llama-server")?;
    let engine_url = listening_base(&engine).await?;
    wait_ok(&http, &format!("{engine_url}/health")).await?;

    let mut pm = tokio::process::Command::new(&args.pool_managerd)
        .env("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0")
        .env("POOL_MANAGERD_RUNTIME_DIR", &runtime)
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("start pool-managerd")?;
    let base = listening_base(&pm).await?;
    wait_ok(&http, &format!("{base}/health")).await?;

    let mut samples = Vec::with_capacity(args.files);
    for i in 0..args.files {
        let pool_id = format!("bench-{i}");
        let file = HandoffFile::external(&pool_id, &engine_url, "tiny", 1);
        let tmp = runtime.join(format!(".{pool_id}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&file)?)?;
        let status_url = format!("{base}/v2/pools/{pool_id}/status");
        let start = Instant::now();
        std::fs::rename(&tmp, runtime.join(format!("{pool_id}.json")))?;
        loop {
            let r = http.get(&status_url).bearer_auth(TOKEN).send().await?;
            if r.status() == 200 {
                let v: serde_json::Value = r.json().await?;
                if v["ready"] == true {
                    break;
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("{pool_id} not ready within 10 s");
            }
        }
        samples.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "handoff-to-ready over {} files: median {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
    let _ = pm.kill().await;
    let _ = engine.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
