//! Streaming `/v1/chat/completions` through orchestratord versus the same llama-server's own
//! `/v1/chat/completions`: same messages, same length, `concurrency` streams at once, rounds
//! interleaved (direct, then through orchestratord). First token is measured from the request
//! to the first chunk with content on the wire; tokens/s per stream from that chunk to
//! `[DONE]`, and per round as all content chunks over the round's wall time.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use llorch_bench::{home_orchestratord, listening_base, percentile, wait_ok, TOKEN};
use llorch_client::SseParser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    orchestratord: PathBuf,
    #[arg(long)]
    engine: PathBuf,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: u32,
    #[arg(long, default_value_t = 512)]
    tokens: u32,
    /// Stream k of a round is sent k × this many microseconds after the first (both paths):
    /// how much arrival skew the engine's batching tolerates before a request misses the
    /// batch the others' prompts are processed in.
    #[arg(long, default_value_t = 0)]
    stagger_us: u64,
    /// Prints each round's first tokens, sorted.
    #[arg(long)]
    per_round: bool,
}

struct Stream {
    first_token_ms: f64,
    tokens: u32,
    decode_s: f64,
}

/// One streamed chat request; counts the content chunks.
async fn chat(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    tokens: u32,
    k: u32,
    send_at: Instant,
) -> anyhow::Result<Stream> {
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": format!("the river and the stone {k}")}],
        "max_tokens": tokens, "stream": true, "seed": k
    });
    // A spin, not a timer: tokio's timers tick in milliseconds.
    while Instant::now() < send_at {
        std::hint::spin_loop();
    }
    let t0 = Instant::now();
    let mut rb = http.post(url).json(&body);
    if let Some(t) = bearer {
        rb = rb.bearer_auth(t);
    }
    let mut resp = rb.send().await?;
    if !resp.status().is_success() {
        bail!("{url} answered {}", resp.status());
    }
    let mut parser = SseParser::new();
    let mut first: Option<Instant> = None;
    let mut n = 0;
    while let Some(chunk) = resp.chunk().await? {
        for f in parser.push(&chunk) {
            if f.data == "[DONE]" {
                let first = first.context("no content chunk")?;
                return Ok(Stream {
                    first_token_ms: first.duration_since(t0).as_secs_f64() * 1000.0,
                    tokens: n,
                    decode_s: first.elapsed().as_secs_f64(),
                });
            }
            let v: serde_json::Value = serde_json::from_str(&f.data).unwrap_or_default();
            if v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
            {
                first.get_or_insert_with(Instant::now);
                n += 1;
            }
        }
    }
    bail!("stream ended without [DONE]")
}

/// One round: `a.concurrency` concurrent streams; returns them and the round's tokens/s.
async fn round(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    a: &Args,
) -> anyhow::Result<(Vec<Stream>, f64)> {
    let t0 = Instant::now();
    let runs = (0..a.concurrency).map(|k| {
        let send_at = t0 + std::time::Duration::from_micros(a.stagger_us * u64::from(k));
        // Each stream its own task, so one spinning until its time holds up no other.
        let (http, url, bearer) = (http.clone(), url.to_string(), bearer.map(str::to_string));
        let tokens = a.tokens;
        tokio::spawn(async move { chat(&http, &url, bearer.as_deref(), tokens, k, send_at).await })
    });
    let streams: Vec<Stream> = futures_util::future::try_join_all(runs)
        .await?
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    if a.per_round {
        let mut ft: Vec<f64> = streams.iter().map(|s| s.first_token_ms).collect();
        ft.sort_by(|a, b| a.total_cmp(b));
        println!("{url}: first tokens (ms) {ft:.2?}");
    }
    let total: u32 = streams.iter().map(|s| s.tokens).sum();
    Ok((streams, f64::from(total) / t0.elapsed().as_secs_f64()))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn report(name: &str, streams: &[Stream], rounds: &[f64]) -> (f64, f64, f64) {
    let mut ft: Vec<f64> = streams.iter().map(|s| s.first_token_ms).collect();
    ft.sort_by(|a, b| a.total_cmp(b));
    let mut tps: Vec<f64> = streams
        .iter()
        .map(|s| f64::from(s.tokens.saturating_sub(1)) / s.decode_s)
        .collect();
    tps.sort_by(|a, b| a.total_cmp(b));
    let mut agg = rounds.to_vec();
    agg.sort_by(|a, b| a.total_cmp(b));
    let (ft50, tps50, agg50) = (
        percentile(&ft, 0.5),
        percentile(&tps, 0.5),
        percentile(&agg, 0.5),
    );
    println!(
        "{name:>14}: first token p50 {ft50:.2} ms (p90 {:.2}); per-stream tokens/s p50 {tps50:.0}; round tokens/s p50 {agg50:.0}",
        percentile(&ft, 0.9)
    );
    (ft50, tps50, agg50)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    println!("load average before: {}", loadavg());
    let dir = std::env::temp_dir().join(format!("llorch-oa-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let slots = a.concurrency.to_string();
    let mut engine = tokio::process::Command::new(&a.engine)
        .args(["--model", &a.model.display().to_string()])
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(["--parallel", &slots, "--threads", "1", "--ctx-size", "8192"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let engine_url = listening_base(&engine).await?;
    wait_ok(&http, &format!("{engine_url}/health")).await?;
    let (mut orch, base) = home_orchestratord(
        &http,
        &a.orchestratord,
        &runtime,
        &engine_url,
        a.concurrency,
        TOKEN,
    )
    .await?;

    let direct_url = format!("{engine_url}/v1/chat/completions");
    let via_url = format!("{base}/v1/chat/completions");
    let (mut direct, mut via) = (Vec::new(), Vec::new());
    let (mut direct_rounds, mut via_rounds) = (Vec::new(), Vec::new());
    for r in 0..a.rounds + 1 {
        let d = round(&http, &direct_url, None, &a).await?;
        let o = round(&http, &via_url, Some(TOKEN), &a).await?;
        if r >= 1 {
            direct.extend(d.0);
            direct_rounds.push(d.1);
            via.extend(o.0);
            via_rounds.push(o.1);
        }
    }
    println!(
        "{} rounds × {} concurrent streams × {} tokens, interleaved (one warm-up round dropped):",
        a.rounds, a.concurrency, a.tokens
    );
    let (dft, dtps, dagg) = report("direct", &direct, &direct_rounds);
    let (oft, otps, oagg) = report("orchestratord", &via, &via_rounds);
    println!(
        "added first token p50 {:.2} ms; tokens/s ratio per stream {:.1}%, per round {:.1}%",
        oft - dft,
        otps / dtps * 100.0,
        oagg / dagg * 100.0
    );
    println!("load average after: {}", loadavg());
    let _ = orch.kill().await;
    let _ = engine.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
