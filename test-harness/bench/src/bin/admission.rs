//! Admission throughput and latency of `POST /v2/tasks`, queue only: orchestratord knows one
//! pool serving the model, but its engine never becomes healthy, so every task stays queued and
//! no engine work is measured. C concurrent keep-alive clients submit N tasks in total. With
//! `--journals none,normal,full` the run is repeated once per journal setting (a fresh
//! orchestratord and data directory each), side by side in one invocation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use llorch_bench::{percentile, queue_only_orchestratord, TOKEN};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    orchestratord: PathBuf,
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Journal settings to compare: `none`, `normal`, `full` (ORCHD_JOURNAL / _SYNC).
    #[arg(long, value_delimiter = ',', default_value = "none")]
    journals: Vec<String>,
}

/// One run's figures.
struct Figures {
    rate: f64,
    p50: f64,
    p99: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut results = Vec::new();
    for journal in &args.journals {
        results.push((journal.clone(), run(&args, journal).await?));
    }
    if let Some((_, base)) = results.iter().find(|(j, _)| j == "none") {
        println!("journal | tasks/s | vs none | p50 ms | added p50 | p99 ms | added p99");
        for (journal, f) in &results {
            println!(
                "{journal} | {:.0} | {:.2}x | {:.3} | {:+.3} | {:.3} | {:+.3}",
                f.rate,
                f.rate / base.rate,
                f.p50,
                f.p50 - base.p50,
                f.p99,
                f.p99 - base.p99
            );
        }
    }
    Ok(())
}

async fn run(args: &Args, journal: &str) -> anyhow::Result<Figures> {
    let (kind, sync) = match journal {
        "none" => ("none", "full"),
        "normal" => ("sqlite", "normal"),
        "full" => ("sqlite", "full"),
        other => bail!("--journals: {other:?} is not one of none, normal, full"),
    };
    let dir = std::env::temp_dir().join(format!(
        "llorch-admission-bench-{}-{journal}",
        std::process::id()
    ));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients * 2)
        .build()?;
    let env = [
        ("ORCHD_JOURNAL", kind.to_string()),
        ("ORCHD_JOURNAL_SYNC", sync.to_string()),
        (
            "ORCHD_ADMISSION_CAPACITY",
            (args.tasks * 2 + 10_000).to_string(),
        ),
    ];
    let (mut orch, base) = queue_only_orchestratord(&http, &args.orchestratord, &dir, &env).await?;
    let body =
        serde_json::json!({"model_ref": "tiny", "prompt": "benchmark prompt", "max_tokens": 16});
    // Warm-up: connections, allocator.
    for _ in 0..1000 {
        let r = http
            .post(format!("{base}/v2/tasks"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await?;
        if r.status() != 202 {
            bail!("warm-up submit answered {}", r.status());
        }
    }
    let per_client = args.tasks / args.clients;
    let started = Instant::now();
    let body = Arc::new(body);
    let mut handles = Vec::new();
    for _ in 0..args.clients {
        let http = http.clone();
        let url = format!("{base}/v2/tasks");
        let body = body.clone();
        handles.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .json(&*body)
                    .send()
                    .await?;
                let status = r.status();
                let _ = r.bytes().await?;
                if status != 202 {
                    anyhow::bail!("submit answered {status}");
                }
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::with_capacity(args.tasks);
    for h in handles {
        all.extend(h.await??);
    }
    let wall = started.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.total_cmp(b));
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let server_count = metrics
        .lines()
        .find(|l| l.starts_with("admission_latency_ms_count"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_string();
    let server_sum = metrics
        .lines()
        .find(|l| l.starts_with("admission_latency_ms_sum"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!(
        "admission (journal {journal}): {} tasks, {} clients: {:.0} tasks/s; client-side latency p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms; server-side mean {:.4} ms over {} admissions",
        all.len(),
        args.clients,
        all.len() as f64 / wall,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all[all.len() - 1],
        server_sum / server_count.parse::<f64>().unwrap_or(1.0),
        server_count
    );
    let _ = orch.kill().await;
    let _ = orch.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        rate: all.len() as f64 / wall,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
    })
}
