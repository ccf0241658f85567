//! `llorch`: a small client of orchestratord. `llorch submit` prints tokens as they stream and
//! a one-line summary on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use llamacpp_client::sse::SseParser;

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

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    async fn json(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let resp = rb.send().await.context("orchestratord unreachable")?;
        let status = resp.status();
        let body: serde_json::Value = if status == reqwest::StatusCode::NO_CONTENT {
            serde_json::json!({"status": "ok"})
        } else {
            resp.json().await.unwrap_or(serde_json::Value::Null)
        };
        if !status.is_success() {
            bail!("{status}: {}", body);
        }
        Ok(body)
    }
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
    let c = Client {
        http: reqwest::Client::new(),
        base: cli.url.trim_end_matches('/').to_string(),
        token,
    };
    use reqwest::Method;
    let print =
        |v: serde_json::Value| println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
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
            let body = serde_json::json!({
                "model_ref": model, "prompt": prompt, "max_tokens": max_tokens, "priority": priority,
                "session_id": session, "seed": seed, "temperature": temperature,
            });
            submit(&c, body).await?;
        }
        Cmd::Pools => print(c.json(c.req(Method::GET, "/v2/pools")).await?),
        Cmd::Task { id } => print(
            c.json(c.req(Method::GET, &format!("/v2/tasks/{id}")))
                .await?,
        ),
        Cmd::Cancel { id } => print(
            c.json(c.req(Method::POST, &format!("/v2/tasks/{id}/cancel")))
                .await?,
        ),
        Cmd::Capabilities => print(c.json(c.req(Method::GET, "/v2/meta/capabilities")).await?),
        Cmd::Drain { pool, deadline_ms } => print(
            c.json(
                c.req(Method::POST, &format!("/v2/pools/{pool}/drain"))
                    .json(&serde_json::json!({"deadline_ms": deadline_ms})),
            )
            .await?,
        ),
        Cmd::Reload { pool, model } => print(
            c.json(
                c.req(Method::POST, &format!("/v2/pools/{pool}/reload"))
                    .json(&serde_json::json!({"new_model_ref": model})),
            )
            .await?,
        ),
    }
    Ok(())
}

async fn submit(c: &Client, body: serde_json::Value) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let admitted = c
        .json(c.req(reqwest::Method::POST, "/v2/tasks").json(&body))
        .await?;
    let id = admitted["task_id"]
        .as_str()
        .context("no task_id in answer")?
        .to_string();
    let sse = admitted["streams"]["sse"]
        .as_str()
        .context("no stream URL in answer")?;
    let mut resp = c
        .req(reqwest::Method::GET, sse)
        .send()
        .await
        .context("open event stream")?;
    if !resp.status().is_success() {
        bail!("event stream: {}", resp.status());
    }
    let mut parser = SseParser::new();
    let mut stdout = std::io::stdout();
    let mut first_token: Option<f64> = None;
    let mut queue_ms = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        for f in parser.push(&chunk) {
            let data: serde_json::Value = serde_json::from_str(&f.data).unwrap_or_default();
            match f.event.as_deref() {
                Some("started") => queue_ms = data["queue_time_ms"].as_u64().unwrap_or(0),
                Some("token") => {
                    first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64() * 1000.0);
                    write!(stdout, "{}", data["t"].as_str().unwrap_or(""))?;
                    stdout.flush()?;
                }
                Some("end") => {
                    let n = data["tokens_out"].as_u64().unwrap_or(0);
                    let decode = data["decode_time_ms"].as_u64().unwrap_or(0);
                    let tps = if decode > 0 {
                        n as f64 * 1000.0 / decode as f64
                    } else {
                        0.0
                    };
                    writeln!(stdout)?;
                    eprintln!(
                        "task {id}: queue {queue_ms} ms · first token {:.1} ms · {n} tokens in {decode} ms · {tps:.0} tokens/s · finish {}",
                        first_token.unwrap_or(0.0),
                        data["finish_reason"].as_str().unwrap_or("?")
                    );
                    return Ok(());
                }
                Some("error") => {
                    writeln!(stdout)?;
                    bail!("task {id} failed: {} {}", data["code"], data["message"]);
                }
                _ => {}
            }
        }
    }
    bail!("task {id}: stream ended without a terminal event")
}
