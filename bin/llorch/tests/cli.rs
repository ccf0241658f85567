//! The `llorch` CLI against a live stack: a real llama-server (the tiny model, started as an
//! external engine with its handoff file) behind a real orchestratord, over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use llorch_contracts::HandoffFile;
use llorch_test_support::*;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

const TOKEN: &str = "cli-test-token-5b1e0c9d27aa";

struct Live {
    _engine: ExternalEngine,
    _orch: Child,
    base: String,
    _dir: tempfile::TempDir,
}

async fn live() -> Live {
    let dir = tempfile::tempdir().unwrap();
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let runtime = dir.path().join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    llorch_handoff::write_atomic(
        &runtime,
        &HandoffFile::external("p0", &engine.url, "tiny", 1),
    )
    .unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("orchestratord.log")).unwrap();
    let orch = Command::new(workspace_binary("orchestratord"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("ORCHD_BIND_ADDR", format!("127.0.0.1:{port}"))
        .env("ORCHD_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_http_ok(
        "orchestratord ready",
        &format!("{base}/ready"),
        Duration::from_secs(30),
    )
    .await;
    Live {
        _engine: engine,
        _orch: orch,
        base,
        _dir: dir,
    }
}

/// Runs `llorch args...` with `stdin`; returns (success, stdout, stderr).
async fn llorch(base: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .env_clear()
        .env("LLORCH_URL", base)
        .env("LLORCH_API_TOKEN", TOKEN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("llorch did not finish")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `prompt_tokens` of a `turn N · ... · P prompt + C completion tokens` summary line.
fn prompt_tokens(stderr: &str, turn: u32) -> u32 {
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("turn {turn} ·")))
        .unwrap_or_else(|| panic!("no summary of turn {turn}: {stderr}"));
    let before = line.split(" prompt + ").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_each_turn_keeps_history_and_uses_one_session() {
    let s = live().await;
    let (ok, stdout, stderr) = llorch(
        &s.base,
        &[
            "chat",
            "--model",
            "tiny",
            "--session",
            "cli-chat-1",
            "--max-tokens",
            "6",
        ],
        "Hello there\n\nTell me more\n/exit\nnever sent\n",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("session cli-chat-1"), "{stderr}");
    let replies: Vec<&str> = stdout.lines().collect();
    assert_eq!(replies.len(), 2, "two turns answered: {stdout:?}");
    assert!(replies.iter().all(|r| !r.is_empty()));
    // The second turn carries the first turn and its answer: a longer prompt.
    assert!(
        prompt_tokens(&stderr, 2) > prompt_tokens(&stderr, 1),
        "{stderr}"
    );
    assert!(
        !stderr.contains("turn 3"),
        "input after /exit was sent: {stderr}"
    );
    let session: serde_json::Value = authed_client(TOKEN)
        .get(format!("{}/v2/sessions/cli-chat-1", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["turns"], 2, "{session}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_nodes_print_what_orchestratord_serves() {
    let s = live().await;
    let (ok, stdout, stderr) = llorch(&s.base, &["models"], "").await;
    assert!(ok, "{stderr}");
    let models: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let (ok, stdout, stderr) = llorch(&s.base, &["nodes"], "").await;
    assert!(ok, "{stderr}");
    let nodes: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(nodes["nodes"].is_array(), "{nodes}");
    // A failing turn says why and makes the exit status non-zero.
    let (ok, _, stderr) = llorch(&s.base, &["chat", "--model", "no-such-model"], "hi\n").await;
    assert!(!ok);
    assert!(
        stderr.contains("model_not_found") || stderr.contains("does not exist"),
        "{stderr}"
    );
}
