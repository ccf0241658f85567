//! `llorch`: a small client of orchestratord. `llorch submit` prints tokens as they stream and
//! a one-line summary on stderr; `llorch chat` is a streaming chat console over the
//! OpenAI-compatible route (one line of stdin is one user turn; history is kept).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llorch_client::OrchClient;
use llorch_contracts::openai::{ChatRequest, Sampling};
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
    /// For an https:// URL: the CA orchestratord's certificate is verified against (PEM); the
    /// system's roots when unset.
    #[arg(long, env = "LLORCH_TLS_CA_FILE")]
    ca_file: Option<PathBuf>,
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
    /// Chat with a model: each line of stdin is a turn, answers stream to stdout. `/exit` or
    /// end of input quits.
    Chat {
        #[arg(long)]
        model: String,
        /// Session id (KV-cache affinity across turns); a new one by default.
        #[arg(long)]
        session: Option<String>,
        /// A system message opening the conversation.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        #[arg(long)]
        temperature: Option<f32>,
    },
    /// Models served now (`/v1/models`).
    Models,
    /// Nodes (CLOUD: pool-managerds) and their availability.
    Nodes,
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
    let mut http = reqwest::Client::builder();
    if let Some(path) = &cli.ca_file {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read the CA file {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("the CA file {} is not PEM certificates", path.display()))?;
        if certs.is_empty() {
            bail!("the CA file {} holds no certificate", path.display());
        }
        http = http.tls_certs_only(certs);
    }
    let c = OrchClient::with_http(&cli.url, token.as_deref(), http.build()?);
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
        Cmd::Chat {
            model,
            session,
            system,
            max_tokens,
            temperature,
        } => {
            let session = session.unwrap_or_else(new_session_id);
            let settings = ChatSettings {
                model,
                max_tokens,
                temperature,
            };
            chat(&c, &settings, &session, system).await?;
        }
        Cmd::Models => print(&c.models().await?),
        Cmd::Nodes => print(&c.nodes().await?),
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

/// A session id of this process: time and pid, enough to be unique on one client.
fn new_session_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("chat-{nanos:x}-{:x}", std::process::id())
}

struct ChatSettings {
    model: String,
    max_tokens: u32,
    temperature: Option<f32>,
}

/// The chat console: reads turns from stdin until `/exit` or end of input; a failed turn is
/// reported and left out of the history, and makes the exit status non-zero.
async fn chat(
    c: &OrchClient,
    settings: &ChatSettings,
    session: &str,
    system: Option<String>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tokio::io::AsyncBufReadExt;
    let interactive = std::io::stdin().is_terminal();
    eprintln!("session {session} · model {}", settings.model);
    let mut messages: Vec<serde_json::Value> = system
        .map(|s| serde_json::json!({"role": "system", "content": s}))
        .into_iter()
        .collect();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut failed = 0;
    let mut turn = 0;
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next_line().await.context("read stdin")? else {
            break;
        };
        let line = line.trim();
        if line == "/exit" || line == "/quit" {
            break;
        }
        if line.is_empty() {
            continue;
        }
        turn += 1;
        messages.push(serde_json::json!({"role": "user", "content": line}));
        match chat_turn(c, settings, session, &messages).await {
            Ok((reply, summary)) => {
                eprintln!("turn {turn} · {summary}");
                messages.push(serde_json::json!({"role": "assistant", "content": reply}));
            }
            Err(e) => {
                eprintln!("turn {turn} failed: {e:#}");
                messages.pop();
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {turn} turns failed");
    }
    Ok(())
}

/// One turn: streams the answer to stdout; returns it and a one-line summary.
async fn chat_turn(
    c: &OrchClient,
    settings: &ChatSettings,
    session: &str,
    messages: &[serde_json::Value],
) -> anyhow::Result<(String, String)> {
    let req = ChatRequest {
        model: settings.model.clone(),
        messages: messages.to_vec(),
        sampling: Sampling {
            max_tokens: Some(settings.max_tokens),
            temperature: settings.temperature,
            ..Default::default()
        },
        response_format: None,
        tools: None,
        tool_choice: None,
    };
    let t0 = Instant::now();
    let mut stream = c.chat_stream(&req, Some(session)).await?;
    let mut stdout = std::io::stdout();
    let mut reply = String::new();
    let mut first_token: Option<f64> = None;
    let mut finish = String::from("none");
    let mut usage = None;
    while let Some(piece) = stream.next().await? {
        if let Some(t) = piece.content.filter(|t| !t.is_empty()) {
            first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1000.0);
            write!(stdout, "{t}")?;
            stdout.flush()?;
            reply.push_str(&t);
        }
        if let Some(f) = piece.finish_reason {
            finish = f;
        }
        if piece.usage.is_some() {
            usage = piece.usage;
        }
    }
    writeln!(stdout)?;
    let tokens = usage
        .map(|u| {
            format!(
                "{} prompt + {} completion tokens",
                u.prompt_tokens, u.completion_tokens
            )
        })
        .unwrap_or_else(|| "usage unknown".into());
    let summary = format!(
        "task {} · first token {:.1} ms · {tokens} · finish {finish}",
        stream.task_id.as_deref().unwrap_or("?"),
        first_token.unwrap_or(0.0)
    );
    Ok((reply, summary))
}
