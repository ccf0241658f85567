//! Cache-aware placement against least-busy placement, same run: one pool-managerd with two
//! pools (`--slots` each) on a model whose prompt processing is slow enough to matter
//! (`llorch-tiny-model --size prefill`), and a HOME orchestratord started for each round with
//! `ORCHD_CACHE_AWARE` on or off, rounds alternating. A round runs `chats` conversations at once,
//! `turns` turns each; the chats share `system_prompts` system prompts, and every turn's prompt
//! is the system prompt, the conversation so far and the new question, so each later turn
//! starts with the previous turn's whole prompt. Every round uses new system prompts (a fresh
//! nonce first), so no round inherits another's cache. First token is measured from the submit
//! to the first `token` event; it is reported for the later turns (where a cache can help) and
//! for the first turns (where it cannot: a check that nothing is lost without sharing).

use std::time::{Duration, Instant};

use clap::Parser;
use llorch_bench::{listening_base, percentile, pool_managerd, spawn, via_orchestratord, TOKEN};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    stack: llorch_bench::StackBinaries,
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Slots of each of the two pools.
    #[arg(long, default_value_t = 4)]
    slots: u32,
    #[arg(long, default_value_t = 6)]
    chats: usize,
    #[arg(long, default_value_t = 4)]
    turns: usize,
    #[arg(long, default_value_t = 2)]
    system_prompts: usize,
    /// Bytes of each system prompt.
    #[arg(long, default_value_t = 2000)]
    system_bytes: usize,
    /// A user's think time before each later turn: up to this many ms (varied per chat and
    /// turn), so chats fall out of step and pools are unevenly busy, as with real users.
    #[arg(long, default_value_t = 800)]
    think_ms: u64,
    /// More llama-server arguments for both engines (repeat it), e.g. `--engine-arg=--cache-ram
    /// --engine-arg=0` for engines that keep no prompts beyond their slots.
    #[arg(long = "engine-arg", allow_hyphen_values = true)]
    engine_args: Vec<String>,
}

/// Words in a fixed order from a seed: text that tokenizes like prose.
fn prose(seed: usize, bytes: usize) -> String {
    const WORDS: &[&str] = &[
        "river", "stone", "light", "garden", "window", "morning", "quiet", "market", "letter",
        "bridge", "forest", "candle", "harbor", "winter", "mirror", "orchard", "valley", "thread",
    ];
    let mut out = String::with_capacity(bytes + 16);
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(WORDS[x % WORDS.len()]);
        out.push(' ');
    }
    out
}

/// One round: every chat's turns in order, chats at once; first-token times of (first turns,
/// later turns).
async fn round(
    http: &reqwest::Client,
    base: &str,
    a: &Args,
    nonce: u64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let systems: Vec<String> = (0..a.system_prompts)
        .map(|s| format!("[{nonce}-{s}] {}", prose(s + 1, a.system_bytes)))
        .collect();
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..a.chats {
        let (http, base) = (http.clone(), base.to_string());
        let system = systems[c % systems.len()].clone();
        let (turns, think) = (a.turns, a.think_ms);
        set.spawn(async move {
            let mut history = String::new();
            let mut times = Vec::new();
            for t in 0..turns {
                if t > 0 && think > 0 {
                    let jitter = (c as u64 * 7919 + t as u64 * 104_729 + nonce) % think;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                let question = format!(
                    "\nUser: question {c}.{t}: {}\nAssistant:",
                    prose(100 + c * 10 + t, 200)
                );
                let prompt = format!("{system}{history}{question}");
                let body = serde_json::json!({
                    "model_ref": "m", "prompt": prompt, "max_tokens": 8, "seed": 1
                });
                let s = via_orchestratord(&http, &base, TOKEN, &body).await?;
                times.push((t, s.first_token_ms));
                history.push_str(&question);
                history.push_str(&format!(
                    " answer {c}.{t}: {}",
                    prose(500 + c * 10 + t, 120)
                ));
            }
            Ok::<_, anyhow::Error>(times)
        });
    }
    let (mut first, mut later) = (Vec::new(), Vec::new());
    while let Some(r) = set.join_next().await {
        for (t, ms) in r?? {
            if t == 0 {
                first.push(ms)
            } else {
                later.push(ms)
            }
        }
    }
    Ok((first, later, started.elapsed().as_secs_f64()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = std::env::temp_dir().join(format!("llorch-cache-bench-{}", std::process::id()));
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime)?;
    let mut pools = String::new();
    let mut args = vec!["--threads".to_string(), "1".to_string()];
    args.extend(a.engine_args.iter().cloned());
    for p in ["p0", "p1"] {
        pools.push_str(&format!(
            "[[pools]]\nid = \"{p}\"\nmodel = \"{}\"\nmodel_id = \"m\"\nslots = {}\nctx = {}\nargs = {}\n",
            a.stack.model.display(),
            a.slots,
            a.slots * 8192,
            serde_json::to_string(&args)?
        ));
    }
    std::fs::write(dir.join("pools.toml"), pools)?;
    let pm = pool_managerd(&a.stack, &dir, &runtime)?;
    let pm_base = listening_base(&pm).await?;
    let http = reqwest::Client::builder().build()?;
    let mut results: Vec<(bool, Vec<f64>, Vec<f64>, f64)> = Vec::new();
    let nonce0: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    for r in 0..a.rounds * 2 {
        let aware = r % 2 == 0;
        let mut orch = spawn(
            &a.stack.orchestratord,
            &[
                ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
                ("ORCHD_RUNTIME_DIR", runtime.display().to_string()),
                ("ORCHD_POOL_MANAGER_URL", pm_base.clone()),
                ("ORCHD_JOURNAL", "none".into()),
                ("ORCHD_CACHE_AWARE", aware.to_string()),
            ],
        )?;
        let base = listening_base(&orch).await?;
        llorch_bench::wait_pools(
            &http,
            &base,
            Duration::from_secs(120),
            "the two pools ready",
            |p| llorch_bench::healthy(p) == 2,
        )
        .await?;
        let (first, later, wall) = round(&http, &base, &a, nonce0 + r as u64).await?;
        println!(
            "round {r} ({}): {} tasks in {wall:.2} s",
            if aware { "cache-aware" } else { "least-busy" },
            first.len() + later.len()
        );
        results.push((aware, first, later, wall));
        let _ = orch.kill().await;
        let _ = orch.wait().await;
    }
    let summary = |aware: bool| {
        let mut first: Vec<f64> = Vec::new();
        let mut later: Vec<f64> = Vec::new();
        let (mut tasks, mut wall) = (0usize, 0.0);
        for (w, f, l, s) in results.iter().filter(|x| x.0 == aware) {
            let _ = w;
            first.extend(f);
            later.extend(l);
            tasks += f.len() + l.len();
            wall += s;
        }
        first.sort_by(|x, y| x.total_cmp(y));
        later.sort_by(|x, y| x.total_cmp(y));
        (first, later, tasks as f64 / wall)
    };
    let (af, al, at) = summary(true);
    let (lf, ll, lt) = summary(false);
    println!(
        "{} rounds each, {} chats x {} turns, {} system prompts of {} bytes",
        a.rounds, a.chats, a.turns, a.system_prompts, a.system_bytes
    );
    println!("placement | later turns first token p50 / p99 | first turns p50 / p99 | tasks/s");
    for (name, f, l, t) in [("cache-aware", &af, &al, at), ("least-busy", &lf, &ll, lt)] {
        println!(
            "{name} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {t:.2}",
            percentile(l, 0.5),
            percentile(l, 0.99),
            percentile(f, 0.5),
            percentile(f, 0.99)
        );
    }
    println!(
        "later turns: first token p50 {:.2}x lower with cache-aware placement; throughput {:.2}x",
        percentile(&ll, 0.5) / percentile(&al, 0.5),
        at / lt
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
