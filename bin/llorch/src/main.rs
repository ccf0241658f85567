//! `llorch`: a small client of orchestratord. `llorch submit` prints tokens as they stream and
//! a one-line summary on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llorch_client::OrchClient;
use llorch_contracts::tasks::{Priority, TaskEvent, TaskRequest};
use llorch_contracts::{DrainRequest, ReloadRequest};

#[derive(Parser)]
#[command(name = "llorch", version, about = "llama-orch client")]
struct Cli {
    /// orchestratord base URL.
    #[arg(long, env = "LLORCH_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// API token.
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token.
    #[arg(long, env = "LLORCH_API_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a task and stream its tokens to stdout.
    Submit {
        #[arg(long)]
        model: String,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: u32,
        #[arg(long, default_value = "interactive")]
        priority: String,
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        temperature: Option<f32>,
    },
    /// Pools as orchestratord sees them.
    Pools,
    /// One task's status.
    Task { id: String },
    /// Cancel a task.
    Cancel { id: String },
    /// Models served now and limits.
    Capabilities,
    /// Drain a pool (forwarded to its pool-managerd).
    Drain {
        pool: String,
        #[arg(long, default_value_t = 30000)]
        deadline_ms: u64,
    },
    /// Reload a pool with another model file (forwarded to its pool-managerd).
    Reload {
        pool: String,
        #[arg(long)]
        model: String,
    },
}

/// Prints any answer as pretty JSON.
fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .context("read token file")?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let c = OrchClient::new(&cli.url, token.as_deref());
    match cli.cmd {
        Cmd::Submit {
            model,
            prompt,
            max_tokens,
            priority,
            session,
            seed,
            temperature,
        } => {
            let priority = match priority.as_str() {
                "interactive" => Priority::Interactive,
                "batch" => Priority::Batch,
                other => bail!("--priority {other:?} is not one of: interactive, batch"),
            };
            let req = TaskRequest {
                priority,
                session_id: session,
                seed,
                temperature,
                ..TaskRequest::new(model, prompt, max_tokens)
            };
            submit(&c, &req).await?;
        }
        Cmd::Pools => print(&c.pools().await?),
        Cmd::Task { id } => print(&c.task(&id).await?),
        Cmd::Cancel { id } => {
            c.cancel(&id).await?;
            eprintln!("task {id}: cancel requested");
        }
        Cmd::Capabilities => print(&c.capabilities().await?),
        Cmd::Drain { pool, deadline_ms } => {
            print(&c.drain(&pool, &DrainRequest { deadline_ms }).await?)
        }
        Cmd::Reload { pool, model } => print(
            &c.reload(
                &pool,
                &ReloadRequest {
                    new_model_ref: model,
                },
            )
            .await?,
        ),
    }
    Ok(())
}

async fn submit(c: &OrchClient, req: &TaskRequest) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let admitted = c.submit(req).await?;
    let id = admitted.task_id;
    let mut events = c.events(&id, None).await.context("open event stream")?;
    let mut stdout = std::io::stdout();
    let mut first_token: Option<f64> = None;
    let mut queue_ms = 0u64;
    while let Some((_, event)) = events.next().await {
        match event {
            TaskEvent::Started { queue_time_ms, .. } => queue_ms = queue_time_ms,
            TaskEvent::Token { t, .. } => {
                first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1000.0);
                write!(stdout, "{t}")?;
                stdout.flush()?;
            }
            TaskEvent::End {
                tokens_out,
                decode_time_ms,
                finish_reason,
                ..
            } => {
                let tps = if decode_time_ms > 0 {
                    f64::from(tokens_out) * 1000.0 / decode_time_ms as f64
                } else {
                    0.0
                };
                writeln!(stdout)?;
                eprintln!(
                    "task {id}: queue {queue_ms} ms · first token {:.1} ms · {tokens_out} tokens in {decode_time_ms} ms · {tps:.0} tokens/s · finish {finish_reason}",
                    first_token.unwrap_or(0.0),
                );
                return Ok(());
            }
            TaskEvent::Error(e) => {
                writeln!(stdout)?;
                bail!("task {id} failed: {} {}", e.code, e.message);
            }
            TaskEvent::Queued { .. } | TaskEvent::Metrics(_) => {}
        }
    }
    bail!("task {id}: stream ended without a terminal event")
}
