//! Added cost of the CLOUD path: one pool-managerd (one engine: tiny model, 1 slot, 1 thread)
//! and two orchestratords in front of it — HOME (reads the handoff file, calls the engine on
//! loopback) and CLOUD (polls pool-managerd, calls the engine through its authenticated proxy).
//! Same prompt and length, runs interleaved; first token and tokens/s, and the ratio.

use std::path::PathBuf;
use std::process::Stdio;

use clap::Parser;
use llorch_bench::{listening_base, summary, via_orchestratord, wait_ok, TOKEN};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    stack: llorch_bench::StackBinaries,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value_t = 1024)]
    tokens: u32,
}

/// An orchestratord on port 0 with its data under `name`; its base URL once it listens.
async fn orchestratord(
    bin: &PathBuf,
    name: &str,
    env: &[(&str, String)],
) -> anyhow::Result<(tokio::process::Child, String)> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("ORCHD_BIND_ADDR", "127.0.0.1:0")
        .env(
            "ORCHD_DATA_DIR",
            std::env::temp_dir().join(format!("llorch-bench-{}-{name}", std::process::id())),
        )
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn()?;
    let base = listening_base(&child).await?;
    Ok((child, base))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-cloud-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    std::fs::write(
        dir.join("pools.toml"),
        format!(
            "[[pools]]\nid = \"bench\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = 1\nctx = 4096\nargs = [\"--threads\", \"1\"]\n",
            a.stack.model.display()
        ),
    )?;
    let http = reqwest::Client::new();
    let pm = tokio::process::Command::new(&a.stack.pool_managerd)
        .env("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0")
        .env("POOL_MANAGERD_CONFIG", dir.join("pools.toml"))
        .env("POOL_MANAGERD_RUNTIME_DIR", &runtime)
        .env("POOL_MANAGERD_ENGINE_BINARY", &a.stack.engine)
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pm_base = listening_base(&pm).await?;
    let (_home, home) = orchestratord(
        &a.stack.orchestratord,
        "home",
        &[("ORCHD_RUNTIME_DIR", runtime.display().to_string())],
    )
    .await?;
    let (_cloud, cloud) = orchestratord(
        &a.stack.orchestratord,
        "cloud",
        &[
            ("ORCHD_PROFILE", "cloud".into()),
            ("ORCHD_POOL_MANAGERS", pm_base),
            ("ORCHD_POOL_POLL_INTERVAL_MS", "1000".into()),
        ],
    )
    .await?;
    wait_ok(&http, &format!("{home}/ready")).await?;
    wait_ok(&http, &format!("{cloud}/ready")).await?;

    let (mut h, mut c) = (Vec::new(), Vec::new());
    for run in 0..a.runs + 2 {
        let body = serde_json::json!({"model_ref": "tiny", "prompt": "the river and the stone", "max_tokens": a.tokens, "seed": run});
        let hs = via_orchestratord(&http, &home, TOKEN, &body).await?;
        let cs = via_orchestratord(&http, &cloud, TOKEN, &body).await?;
        if run >= 2 {
            h.push(hs);
            c.push(cs);
        }
    }
    println!(
        "{} runs of {} tokens each, interleaved, one engine:",
        a.runs, a.tokens
    );
    let (hft, htps) = summary("HOME", &h);
    let (cft, ctps) = summary("CLOUD (proxy)", &c);
    println!(
        "CLOUD first-token overhead {:.2} ms ({:.2}x); tokens/s ratio {:.1}%",
        cft - hft,
        cft / hft,
        ctps / htps * 100.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
