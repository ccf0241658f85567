//! `llorch`: a small client of orchestratord. `llorch submit` prints tokens as they stream and
//! a one-line summary on stderr; `llorch chat` is a streaming chat console over the
//! OpenAI-compatible route (one line of stdin is one user turn; history is kept); `llorch
//! status` is an overview of the service. A failure is one line on stderr and an exit status
//! by kind (`failure.rs`).

mod exposition;
mod failure;
mod status;
mod table;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use llorch_client::{ClientError, OrchClient};
use llorch_contracts::openai::{ChatRequest, Sampling};
use llorch_contracts::tasks::{Priority, TaskEvent, TaskRequest};
use llorch_contracts::{DrainRequest, ReloadRequest};

use crate::failure::{Failure, Kind, Target};

#[derive(Parser)]
#[command(
    name = "llorch",
    version,
    about = "llama-orch client",
    after_help = failure::EXIT_STATUS_HELP
)]
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
    /// Overview: readiness, pools (state, busy slots, model, tokens/s), nodes, queue depth by
    /// priority and recent rates (two scrapes of /metrics, --window-ms apart).
    Status {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Time between the two scrapes the rates come from (0: no rates).
        #[arg(long, default_value_t = 1000)]
        window_ms: u64,
    },
    /// Models served now (`/v1/models`).
    Models {
        /// Print orchestratord's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Nodes (CLOUD: pool-managerds) and their availability; needs the admin token.
    Nodes {
        /// Print orchestratord's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pools as orchestratord sees them.
    Pools {
        /// Print orchestratord's answer as JSON.
        #[arg(long)]
        json: bool,
    },
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
fn print<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Failure::new(Kind::Failed, format!("cannot print the answer: {e}")))?;
    writeln!(std::io::stdout(), "{text}")?;
    Ok(())
}

/// Prints a table, or `empty` when it has no row.
fn print_table(t: &table::Table, empty: &str) -> Result<(), Failure> {
    let text = if t.is_empty() {
        empty.to_string()
    } else {
        t.render()
    };
    writeln!(std::io::stdout(), "{text}")?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = e.print();
                    ExitCode::SUCCESS
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = e.print();
                    ExitCode::from(Kind::Usage as u8)
                }
                _ => Failure::new(Kind::Usage, failure::usage_line(&e.to_string())).report(),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return Failure::new(Kind::Failed, format!("cannot start the async runtime: {e}"))
                .report()
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// The client of `cli`'s URL, token and CA.
fn client(cli: &Cli) -> Result<(OrchClient, Target), Failure> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    Failure::new(
                        Kind::Usage,
                        format!(
                            "cannot read the token file {}: {e} (LLORCH_API_TOKEN_FILE or --token-file)",
                            f.display()
                        ),
                    )
                })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let mut http = reqwest::Client::builder();
    if let Some(path) = &cli.ca_file {
        let usage = |why: String| Failure::new(Kind::Usage, why);
        let pem = std::fs::read(path)
            .map_err(|e| usage(format!("cannot read the CA file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            usage(format!(
                "the CA file {} is not PEM certificates: {e}",
                path.display()
            ))
        })?;
        if certs.is_empty() {
            return Err(usage(format!(
                "the CA file {} holds no certificate",
                path.display()
            )));
        }
        http = http.tls_certs_only(certs);
    }
    let http = http
        .build()
        .map_err(|e| Failure::new(Kind::Failed, format!("cannot build the HTTP client: {e}")))?;
    let target = Target {
        url: cli.url.trim_end_matches('/').to_string(),
        token_given: token.is_some(),
    };
    Ok((
        OrchClient::with_http(&cli.url, token.as_deref(), http),
        target,
    ))
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let (c, target) = client(&cli)?;
    let api = |e: ClientError| target.failure(e);
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
                other => {
                    return Err(Failure::new(
                        Kind::Usage,
                        format!("--priority {other:?} is not one of: interactive, batch"),
                    ))
                }
            };
            let req = TaskRequest {
                priority,
                session_id: session,
                seed,
                temperature,
                // Its own id: a submission whose answer was lost is sent again as the same
                // task, never a second one.
                task_id: Some(uuid::Uuid::new_v4().to_string()),
                ..TaskRequest::new(model, prompt, max_tokens)
            };
            submit(&c, &target, &req).await?;
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
            chat(&c, &target, &settings, &session, system).await?;
        }
        Cmd::Status { json, window_ms } => {
            let report = status::gather(&c, Duration::from_millis(window_ms))
                .await
                .map_err(api)?;
            if json {
                print(&report)?;
            } else {
                write!(std::io::stdout(), "{}", status::render(&report))?;
            }
        }
        Cmd::Models { json } => {
            let models = c.models().await.map_err(api)?;
            if json {
                print(&models)?;
            } else {
                let mut t = table::Table::new(&["MODEL", "OWNED BY"]);
                for m in &models.data {
                    t.row(vec![m.id.clone(), m.owned_by.clone()]);
                }
                print_table(&t, "no model is served now")?;
            }
        }
        Cmd::Nodes { json } => {
            let nodes = c.nodes().await.map_err(api)?;
            if json {
                print(&nodes)?;
            } else {
                print_table(
                    &status::nodes_table(&nodes.nodes),
                    "no node (HOME: pools come from the handoff directory; CLOUD: none configured or registered)",
                )?;
            }
        }
        Cmd::Pools { json } => {
            let pools = c.pools().await.map_err(api)?;
            if json {
                print(&pools)?;
            } else {
                let rows: Vec<status::PoolRow> = pools
                    .pools
                    .into_iter()
                    .map(|pool| status::PoolRow {
                        state: status::pool_state(&pool),
                        tokens_per_s: None,
                        pool,
                    })
                    .collect();
                print_table(&status::pools_table(&rows), "no pool is known")?;
            }
        }
        Cmd::Task { id } => print(&c.task(&id).await.map_err(api)?)?,
        Cmd::Cancel { id } => {
            c.cancel(&id).await.map_err(api)?;
            eprintln!("task {id}: cancel requested");
        }
        Cmd::Capabilities => print(&c.capabilities().await.map_err(api)?)?,
        Cmd::Drain { pool, deadline_ms } => print(
            &c.drain(&pool, &DrainRequest { deadline_ms })
                .await
                .map_err(api)?,
        )?,
        Cmd::Reload { pool, model } => print(
            &c.reload(
                &pool,
                &ReloadRequest {
                    new_model_ref: model,
                },
            )
            .await
            .map_err(api)?,
        )?,
    }
    Ok(())
}

/// Submits `req`; a submission that got no answer, or a retriable 503 (the journal or every
/// pool briefly unavailable), is sent again with the same `task_id` — at most three times,
/// half a second apart — so it is admitted once whatever happened to an answer.
async fn submit_once(
    c: &OrchClient,
    req: &TaskRequest,
) -> Result<llorch_contracts::tasks::AdmissionResponse, llorch_client::ClientError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match c.submit(req).await {
            Ok(a) => return Ok(a),
            Err(e) if tries < 3 && worth_another_try(&e) => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// No answer came, or a retriable 503.
fn worth_another_try(e: &llorch_client::ClientError) -> bool {
    match e {
        llorch_client::ClientError::Unreachable(_) => true,
        llorch_client::ClientError::Api { status, error } => *status == 503 && error.retriable,
        _ => false,
    }
}

async fn submit(c: &OrchClient, target: &Target, req: &TaskRequest) -> Result<(), Failure> {
    let t0 = Instant::now();
    let admitted = submit_once(c, req).await.map_err(|e| target.failure(e))?;
    let id = admitted.task_id;
    let mut events = c.events(&id, None).await.map_err(|e| target.failure(e))?;
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
                return Err(Failure::new(
                    Kind::Failed,
                    format!("task {id} failed: {} {}", e.code, e.message),
                ));
            }
            TaskEvent::Queued { .. } | TaskEvent::Metrics(_) => {}
        }
    }
    Err(Failure::new(
        Kind::Unavailable,
        format!("the event stream of task {id} broke before its end (`llorch task {id}` says how it ended)"),
    ))
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
    target: &Target,
    settings: &ChatSettings,
    session: &str,
    system: Option<String>,
) -> Result<(), Failure> {
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
        let Some(line) = lines
            .next_line()
            .await
            .map_err(|e| Failure::new(Kind::Failed, format!("cannot read stdin: {e}")))?
        else {
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
            Err(TurnFailure::Output(e)) => return Err(e.into()),
            // No later turn could do better: stop with this failure's own status.
            Err(TurnFailure::Api(e @ ClientError::Unreachable(_))) => return Err(target.failure(e)),
            Err(TurnFailure::Api(e)) => {
                let f = target.failure(e);
                if f.kind == Kind::Auth {
                    return Err(f);
                }
                eprintln!("turn {turn} failed: {}", f.line());
                messages.pop();
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Failure::new(
            Kind::Failed,
            format!("{failed} of {turn} turns failed"),
        ));
    }
    Ok(())
}

/// Why a chat turn failed: orchestratord's answer, or writing the reply.
enum TurnFailure {
    Api(ClientError),
    Output(std::io::Error),
}

impl From<ClientError> for TurnFailure {
    fn from(e: ClientError) -> Self {
        TurnFailure::Api(e)
    }
}

impl From<std::io::Error> for TurnFailure {
    fn from(e: std::io::Error) -> Self {
        TurnFailure::Output(e)
    }
}

/// One turn: streams the answer to stdout; returns it and a one-line summary.
async fn chat_turn(
    c: &OrchClient,
    settings: &ChatSettings,
    session: &str,
    messages: &[serde_json::Value],
) -> Result<(String, String), TurnFailure> {
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
