//! First-token latency and tokens/s through orchestratord (submit + SSE) versus calling the
//! same llama-server directly (`POST /completion`, stream), same prompt, same length, runs
//! interleaved. The engine runs one slot on one thread.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use llamacpp_client::sse::SseParser;
use llorch_bench::{free_port, wait_ok};
use llorch_contracts::HandoffFile;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    orchestratord: PathBuf,
    #[arg(long)]
    engine: PathBuf,
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 1024)]
    tokens: u32,
}

const TOKEN: &str = "bench-token-0123456789abcdef";
const PROMPT: &str = "the river and the stone";

struct Sample {
    first_token_ms: f64,
    tokens: u32,
    decode_s: f64,
}

/// Reads an SSE response; `token_of` says how many tokens a frame carries.
async fn read_stream(
    mut resp: reqwest::Response,
    t0: Instant,
    token_of: impl Fn(&llamacpp_client::sse::SseFrame) -> (u32, bool),
) -> anyhow::Result<Sample> {
    let mut parser = SseParser::new();
    let mut first: Option<Instant> = None;
    let mut tokens = 0;
    while let Some(chunk) = resp.chunk().await? {
        for f in parser.push(&chunk) {
            let (n, done) = token_of(&f);
            if n > 0 && first.is_none() {
                first = Some(Instant::now());
            }
            tokens += n;
            if done {
                let first = first.context("no token")?;
                return Ok(Sample {
                    first_token_ms: first.duration_since(t0).as_secs_f64() * 1000.0,
                    tokens,
                    decode_s: first.elapsed().as_secs_f64(),
                });
            }
        }
    }
    bail!("stream ended early")
}

fn summary(name: &str, s: &[Sample]) -> (f64, f64) {
    let mut ft: Vec<f64> = s.iter().map(|x| x.first_token_ms).collect();
    ft.sort_by(|a, b| a.total_cmp(b));
    let mut tps: Vec<f64> = s
        .iter()
        .map(|x| f64::from(x.tokens.saturating_sub(1)) / x.decode_s)
        .collect();
    tps.sort_by(|a, b| a.total_cmp(b));
    let (ft_med, tps_med) = (ft[ft.len() / 2], tps[tps.len() / 2]);
    println!("{name:>14}: first token median {ft_med:.2} ms (min {:.2}, max {:.2}); tokens/s median {tps_med:.0}", ft[0], ft[ft.len() - 1]);
    (ft_med, tps_med)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-stream-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    let http = reqwest::Client::new();
    let eport = free_port()?;
    let mut engine = tokio::process::Command::new(&a.engine)
        .args([
            "--model",
            &a.model.display().to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            &eport.to_string(),
        ])
        .args(["--parallel", "1", "--threads", "1", "--ctx-size", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let engine_url = format!("http://127.0.0.1:{eport}");
    wait_ok(&http, &format!("{engine_url}/health")).await?;
    let file = HandoffFile::external("bench", &engine_url, "tiny", 1);
    std::fs::write(runtime.join("bench.json"), serde_json::to_vec(&file)?)?;
    let oport = free_port()?;
    let mut orch = tokio::process::Command::new(&a.orchestratord)
        .env("ORCHD_BIND_ADDR", format!("127.0.0.1:{oport}"))
        .env("ORCHD_RUNTIME_DIR", &runtime)
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let base = format!("http://127.0.0.1:{oport}");
    wait_ok(&http, &format!("{base}/ready")).await?;

    let mut direct = Vec::new();
    let mut via = Vec::new();
    for run in 0..a.runs + 2 {
        let t0 = Instant::now();
        let resp = http
            .post(format!("{engine_url}/completion"))
            .json(&serde_json::json!({"prompt": PROMPT, "n_predict": a.tokens, "stream": true, "seed": run, "cache_prompt": true}))
            .send()
            .await?;
        let d = read_stream(resp, t0, |f| {
            let v: serde_json::Value = serde_json::from_str(&f.data).unwrap_or_default();
            let n = if v["content"].as_str().is_some_and(|c| !c.is_empty()) {
                1
            } else {
                0
            };
            (n, v["stop"] == true)
        })
        .await?;

        let t0 = Instant::now();
        let admitted: serde_json::Value = http
            .post(format!("{base}/v2/tasks"))
            .bearer_auth(TOKEN)
            .json(&serde_json::json!({"model_ref": "tiny", "prompt": PROMPT, "max_tokens": a.tokens, "seed": run}))
            .send()
            .await?
            .json()
            .await?;
        let sse = admitted["streams"]["sse"].as_str().context("no sse url")?;
        let resp = http
            .get(format!("{base}{sse}"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        let o = read_stream(resp, t0, |f| match f.event.as_deref() {
            Some("token") => (1, false),
            Some("end") | Some("error") => (0, true),
            _ => (0, false),
        })
        .await?;
        if run >= 2 {
            direct.push(d);
            via.push(o);
        }
    }
    println!("{} runs of {} tokens each, interleaved:", a.runs, a.tokens);
    let (dft, dtps) = summary("direct", &direct);
    let (oft, otps) = summary("orchestratord", &via);
    println!(
        "first-token overhead {:.2} ms; tokens/s ratio {:.1}%",
        oft - dft,
        otps / dtps * 100.0
    );
    let _ = orch.kill().await;
    let _ = engine.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
