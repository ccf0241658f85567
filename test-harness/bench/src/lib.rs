//! Helpers shared by the benchmark binaries.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use llorch_client::{SseFrame, SseParser};

/// The token every benchmark's daemons are started with.
pub const TOKEN: &str = "bench-token-0123456789abcdef";

/// The binaries and the model a benchmark of the whole stack starts.
#[derive(clap::Args, Clone)]
pub struct StackBinaries {
    #[arg(long)]
    pub orchestratord: std::path::PathBuf,
    #[arg(long)]
    pub pool_managerd: std::path::PathBuf,
    /// llama-server.
    #[arg(long)]
    pub engine: std::path::PathBuf,
    /// The GGUF model the pools serve (`cache-placement`: a `--size prefill` one).
    #[arg(long)]
    pub model: std::path::PathBuf,
}

/// Starts a daemon with the bench token, error-level logs and `env`; killed when dropped.
pub fn spawn(
    bin: &std::path::Path,
    env: &[(&str, String)],
) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

/// Waits (30 s at most) until `child` listens, and answers its `http://` base URL.
pub async fn listening_base(child: &tokio::process::Child) -> anyhow::Result<String> {
    let pid = child.id().context("the child already exited")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(addr) = llamacpp_client::listening_addrs(pid).first() {
            return Ok(format!("http://{addr}"));
        }
        if Instant::now() >= deadline {
            bail!("process {pid} listens on nothing within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port this process holds without listening: a connection to it is refused, and no other
/// process can take it while the socket lives.
pub fn refusing_port() -> anyhow::Result<(tokio::net::TcpSocket, u16)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    let port = socket.local_addr()?.port();
    Ok((socket, port))
}

/// Polls `url` until it answers 200, for at most 30 s.
pub async fn wait_ok(http: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http
            .get(url)
            .send()
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{url} not ready within 30 s")
}

/// A HOME orchestratord in front of one external engine: writes the engine's handoff file
/// (pool `bench`, model `tiny`) into `runtime` and starts `binary` on port 0 with `token`;
/// returns the child and its base URL once it is ready.
pub async fn home_orchestratord(
    http: &reqwest::Client,
    binary: &std::path::Path,
    runtime: &std::path::Path,
    engine_url: &str,
    slots: u32,
    token: &str,
) -> anyhow::Result<(tokio::process::Child, String)> {
    let file = llorch_contracts::HandoffFile::external("bench", engine_url, "tiny", slots);
    std::fs::write(runtime.join("bench.json"), serde_json::to_vec(&file)?)?;
    let child = tokio::process::Command::new(binary)
        .env("ORCHD_BIND_ADDR", "127.0.0.1:0")
        .env("ORCHD_RUNTIME_DIR", runtime)
        .env("ORCHD_DATA_DIR", runtime.join("orchestratord-data"))
        .env("LLORCH_API_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let base = listening_base(&child).await?;
    wait_ok(http, &format!("{base}/ready")).await?;
    Ok((child, base))
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub struct Sample {
    pub first_token_ms: f64,
    pub tokens: u32,
    pub decode_s: f64,
}

/// Reads an SSE response; `token_of` says how many tokens a frame carries.
pub async fn read_stream(
    mut resp: reqwest::Response,
    t0: Instant,
    token_of: impl Fn(&SseFrame) -> (u32, bool),
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

pub fn summary(name: &str, s: &[Sample]) -> (f64, f64) {
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

/// Submits a task to orchestratord and reads its event stream to the end, both through `http`
/// (its pooled connections: a sample pays no TCP connect the direct path does not).
pub async fn via_orchestratord(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let answer = http
        .post(format!("{base}/v2/tasks"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    if answer.status() != 202 {
        bail!(
            "submit answered {}: {}",
            answer.status(),
            answer.text().await?
        );
    }
    let admitted: llorch_contracts::tasks::AdmissionResponse = answer.json().await?;
    let resp = http
        .get(format!("{base}{}", admitted.streams.sse))
        .bearer_auth(token)
        .send()
        .await?;
    read_stream(resp, t0, |f| match f.event.as_deref() {
        Some("token") => (1, false),
        Some("end") | Some("error") => (0, true),
        _ => (0, false),
    })
    .await
}

/// orchestratord for admission benchmarks, queue only: it knows one pool serving model `tiny`
/// whose engine never becomes healthy (nothing listens on its port), so every task stays
/// queued. Runtime and data directories under `dir`; `env` adds to (or overrides) the
/// defaults. Returns the child and its base URL once the pool is bound.
pub async fn queue_only_orchestratord(
    http: &reqwest::Client,
    binary: &std::path::Path,
    dir: &std::path::Path,
    env: &[(&str, String)],
) -> anyhow::Result<(tokio::process::Child, String)> {
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    // Held, not listening, for the rest of the run: connections to it are refused.
    let (held, unreachable_engine) = refusing_port()?;
    std::mem::forget(held);
    let file = llorch_contracts::HandoffFile::external(
        "bench",
        &format!("http://127.0.0.1:{unreachable_engine}"),
        "tiny",
        1,
    );
    std::fs::write(runtime.join("bench.json"), serde_json::to_vec(&file)?)?;
    let mut cmd = tokio::process::Command::new(binary);
    cmd.env("ORCHD_BIND_ADDR", "127.0.0.1:0")
        .env("ORCHD_DATA_DIR", dir.join("data"))
        .env("ORCHD_RUNTIME_DIR", &runtime)
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().context("start orchestratord")?;
    let base = listening_base(&child).await?;
    wait_pools(
        http,
        &base,
        Duration::from_secs(30),
        "the bench pool bound",
        |p| !p.is_empty(),
    )
    .await?;
    Ok((child, base))
}

/// How many of `pools` (`GET /v2/pools`'s list) are healthy.
pub fn healthy(pools: &[serde_json::Value]) -> usize {
    pools.iter().filter(|p| p["healthy"] == true).count()
}

/// Waits until orchestratord at `base` answers `/health` and its pool list satisfies `done`,
/// polling every 100 ms for at most `timeout`; `what` names the condition in the error.
pub async fn wait_pools(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> anyhow::Result<()> {
    wait_ok(http, &format!("{base}/health")).await?;
    let deadline = Instant::now() + timeout;
    loop {
        let answer = http
            .get(format!("{base}/v2/pools"))
            .bearer_auth(TOKEN)
            .send()
            .await;
        let pools = match answer {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        };
        if pools
            .as_ref()
            .and_then(|v| v["pools"].as_array())
            .is_some_and(|p| done(p))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("not {what} within {} s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `stack`'s pool-managerd on loopback port 0 (its address: [`listening_base`]) with the pools file `{dir}/pools.toml`, its
/// runtime directory `runtime` and `stack`'s engine as its llama-server; killed when dropped.
pub fn pool_managerd(
    stack: &StackBinaries,
    dir: &std::path::Path,
    runtime: &std::path::Path,
) -> anyhow::Result<tokio::process::Child> {
    spawn(
        &stack.pool_managerd,
        &[
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            (
                "POOL_MANAGERD_CONFIG",
                dir.join("pools.toml").display().to_string(),
            ),
            ("POOL_MANAGERD_RUNTIME_DIR", runtime.display().to_string()),
            (
                "POOL_MANAGERD_ENGINE_BINARY",
                stack.engine.display().to_string(),
            ),
        ],
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_listener_of_this_process_is_found_on_the_port_the_kernel_gave_it() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = std::net::TcpListener::bind("[::1]:0").ok();
        let found = llamacpp_client::listening_addrs(std::process::id());
        assert!(found.contains(&v4.local_addr().unwrap()), "{found:?}");
        if let Some(v6) = v6 {
            assert!(found.contains(&v6.local_addr().unwrap()), "{found:?}");
        }
        // A bound socket that does not listen is no listener.
        let (held, port) = refusing_port().unwrap();
        assert!(!llamacpp_client::listening_addrs(std::process::id())
            .iter()
            .any(|a| a.port() == port));
        drop(held);
    }
}
