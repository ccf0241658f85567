//! First-token latency and tokens/s through orchestratord (submit + SSE) versus calling the
//! same llama-server directly (`POST /completion`, stream), same prompt, same length, runs
//! interleaved. The engine runs one slot on one thread.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use clap::Parser;
use llorch_bench::{
    home_orchestratord, listening_base, read_stream, summary, via_orchestratord, wait_ok, TOKEN,
};

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

const PROMPT: &str = "the river and the stone";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-stream-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    let http = reqwest::Client::new();
    let mut engine = tokio::process::Command::new(&a.engine)
        .args([
            "--model",
            &a.model.display().to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--parallel", "1", "--threads", "1", "--ctx-size", "4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let engine_url = listening_base(&engine).await?;
    wait_ok(&http, &format!("{engine_url}/health")).await?;
    let (mut orch, base) =
        home_orchestratord(&http, &a.orchestratord, &runtime, &engine_url, 1, TOKEN).await?;

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

        let body = serde_json::json!({"model_ref": "tiny", "prompt": PROMPT, "max_tokens": a.tokens, "seed": run});
        let o = via_orchestratord(&http, &base, TOKEN, &body).await?;
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
