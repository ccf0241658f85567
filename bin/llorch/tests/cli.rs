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
/// A client key (no admin role) of the live stack's keys file.
const CLIENT_KEY: &str = "cli-client-key-0d3f9a61c2b7";

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
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("cli:{CLIENT_KEY}\n")).unwrap();
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let log_path = dir.path().join("orchestratord.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut orch = Command::new(workspace_binary("orchestratord"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LLORCH_API_TOKEN", TOKEN)
        .env("ORCHD_API_KEYS_FILE", &keys)
        // Anything orchestratord keeps for itself goes in the test's directory.
        .env("HOME", dir.path())
        .env("ORCHD_BIND_ADDR", "127.0.0.1:0")
        .env("ORCHD_RUNTIME_DIR", &runtime)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = logged_addr(
        &mut orch,
        &log_path,
        "orchestratord listening",
        Duration::from_secs(30),
    )
    .await;
    let base = format!("http://{addr}");
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
    let (code, stdout, stderr) = llorch_as(base, TOKEN, &[], args, stdin).await;
    (code == 0, stdout, stderr)
}

/// Runs `llorch args...` against `base` with `token` and `env`; returns (exit status, stdout,
/// stderr).
async fn llorch_as(
    base: &str,
    token: &str,
    env: &[(&str, &str)],
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .env_clear()
        .env("LLORCH_URL", base)
        .env("LLORCH_API_TOKEN", token)
        .envs(env.iter().copied())
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
        out.status.code().unwrap_or(-1),
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

// covers: OAI-7113
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
    let (ok, stdout, stderr) = llorch(&s.base, &["models", "--json"], "").await;
    assert!(ok, "{stderr}");
    let models: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    let (ok, stdout, stderr) = llorch(&s.base, &["models"], "").await;
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("MODEL"), "a table: {stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("tiny ")), "{stdout}");
    let (ok, stdout, stderr) = llorch(&s.base, &["nodes", "--json"], "").await;
    assert!(ok, "{stderr}");
    let nodes: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(nodes["nodes"].is_array(), "{nodes}");
    let (ok, stdout, stderr) = llorch(&s.base, &["pools", "--json"], "").await;
    assert!(ok, "{stderr}");
    let pools: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(pools["pools"][0]["pool_id"], "p0", "{pools}");
    let (ok, stdout, stderr) = llorch(&s.base, &["pools"], "").await;
    assert!(ok, "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("p0 ")), "{stdout}");
    // A failing turn says why and makes the exit status non-zero.
    let (ok, _, stderr) = llorch(&s.base, &["chat", "--model", "no-such-model"], "hi\n").await;
    assert!(!ok);
    assert!(
        stderr.contains("model_not_found") || stderr.contains("does not exist"),
        "{stderr}"
    );
}

// covers: OBS-6115
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_pool_queue_and_rates_and_its_json_parses() {
    let s = live().await;
    // Some work first, so the counters have moved.
    let (ok, _, stderr) = llorch(
        &s.base,
        &[
            "submit",
            "--model",
            "tiny",
            "--prompt",
            "hi",
            "--max-tokens",
            "8",
        ],
        "",
    )
    .await;
    assert!(ok, "{stderr}");

    let (code, stdout, stderr) =
        llorch_as(&s.base, TOKEN, &[], &["status", "--window-ms", "300"], "").await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with(&format!("orchestratord {}", s.base)),
        "{stdout}"
    );
    assert!(stdout.contains("profile home"), "{stdout}");
    assert!(stdout.contains("· ready"), "{stdout}");
    let pool = stdout
        .lines()
        .find(|l| l.starts_with("p0 "))
        .unwrap_or_else(|| panic!("no pool row: {stdout}"));
    for cell in ["tiny", "ready", "0/1"] {
        assert!(pool.contains(cell), "{cell} missing from {pool:?}");
    }
    assert!(
        stdout.contains("QUEUE  interactive 0 · batch 0"),
        "{stdout}"
    );
    assert!(stdout.contains("RATES  over 0.3 s:"), "{stdout}");
    assert!(stdout.contains("NODES  none"), "{stdout}");

    let (code, stdout, stderr) = llorch_as(
        &s.base,
        TOKEN,
        &[],
        &["status", "--json", "--window-ms", "100"],
        "",
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ready"], true, "{report}");
    assert_eq!(report["profile"], "home", "{report}");
    assert_eq!(report["pools"][0]["pool_id"], "p0", "{report}");
    assert_eq!(report["pools"][0]["state"], "ready", "{report}");
    assert_eq!(report["pools"][0]["slots_total"], 1, "{report}");
    assert_eq!(report["queue"]["interactive"], 0, "{report}");
    assert_eq!(report["nodes"]["listed"], true, "{report}");
    assert!(report["rates"]["tokens_per_s"].is_number(), "{report}");

    // A client key may read pools but not nodes: status says so instead of failing.
    let (code, stdout, stderr) = llorch_as(
        &s.base,
        CLIENT_KEY,
        &[],
        &["status", "--window-ms", "0"],
        "",
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("NODES  not listed: this token may not list nodes"),
        "{stdout}"
    );
    assert!(stdout.contains("RATES  not measured"), "{stdout}");
    let (code, _, stderr) = llorch_as(&s.base, CLIENT_KEY, &[], &["nodes"], "").await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("need the admin token"), "{stderr}");
}

/// stderr is exactly one `llorch: ...` line: no anyhow chain, no backtrace.
fn assert_one_line(stderr: &str) {
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("llorch: "), "{stderr:?}");
    for noise in ["Caused by", "backtrace", "Backtrace", "panicked", "Error: "] {
        assert!(!stderr.contains(noise), "{noise} in {stderr:?}");
    }
}

// covers: OBS-6115
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_exits_3_with_one_line_even_with_rust_backtrace() {
    let s = live().await;
    let backtrace = [("RUST_BACKTRACE", "1"), ("RUST_LIB_BACKTRACE", "1")];
    for args in [
        &["pools"][..],
        &["status"],
        &["submit", "--model", "tiny", "--prompt", "x"],
    ] {
        let (code, stdout, stderr) =
            llorch_as(&s.base, "not-the-token-0000000000", &backtrace, args, "").await;
        assert_eq!(code, 3, "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_one_line(&stderr);
        assert!(
            stderr.contains("orchestratord refused the token (401): set LLORCH_API_TOKEN"),
            "{stderr}"
        );
    }
    // No token at all says that instead.
    let (code, _, stderr) = llorch_as(&s.base, "", &backtrace, &["pools"], "").await;
    assert_eq!(code, 3, "{stderr}");
    assert_one_line(&stderr);
}

// covers: OBS-6115
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_orchestratord_exits_4_and_bad_usage_exits_2_each_in_one_line() {
    // A port this test holds without listening: connections to it are refused, and no other
    // process can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}", held.local_addr().unwrap());
    let backtrace = [("RUST_BACKTRACE", "1")];
    let unreachable = format!("llorch: cannot reach orchestratord at {url}: ");
    for args in [&["status"][..], &["pools", "--json"]] {
        let (code, _, stderr) = llorch_as(&url, TOKEN, &backtrace, args, "").await;
        assert_eq!(code, 4, "{args:?}: {stderr}");
        assert_one_line(&stderr);
        assert!(stderr.starts_with(&unreachable), "{stderr}");
        assert!(
            stderr.ends_with("(is it running? set LLORCH_URL or --url)\n"),
            "{stderr}"
        );
    }
    // The chat console names its session first, then fails the same way at its first turn.
    let (code, _, stderr) = llorch_as(
        &url,
        TOKEN,
        &backtrace,
        &["chat", "--model", "tiny"],
        "hi\n",
    )
    .await;
    assert_eq!(code, 4, "{stderr}");
    assert_eq!(stderr.lines().count(), 2, "{stderr}");
    assert!(
        stderr.lines().nth(1).unwrap().starts_with(&unreachable),
        "{stderr}"
    );
    let (code, _, stderr) = llorch_as(&url, TOKEN, &[], &["submit", "--prompt", "x"], "").await;
    assert_eq!(code, 2, "{stderr}");
    assert_one_line(&stderr);
    assert!(stderr.contains("--model"), "{stderr}");
    // The exit statuses are documented where the user looks.
    let (code, stdout, _) = llorch_as(&url, TOKEN, &[], &["--help"], "").await;
    assert_eq!(code, 0);
    for line in [
        "Exit status:",
        "2  usage",
        "3  authentication",
        "4  unavailable",
    ] {
        assert!(
            stdout.contains(line),
            "{line} missing from --help: {stdout}"
        );
    }
}
