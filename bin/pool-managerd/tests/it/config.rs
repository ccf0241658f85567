use std::process::Stdio;

use crate::harness::*;

/// Runs the binary with env and returns (exit code, stderr).
fn run_with(env: &[(&str, String)]) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pool-managerd"));
    cmd.env_clear()
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// covers: AUTH-5109
#[test]
fn refuses_to_start_on_a_non_loopback_address_without_a_token() {
    let (code, err) = run_with(&[("POOL_MANAGERD_BIND_ADDR", "0.0.0.0:0".to_string())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to bind 0.0.0.0"), "{err}");
    assert!(err.contains("LLORCH_API_TOKEN"), "{err}");
}

// covers: AUTH-5108
#[test]
fn refuses_a_group_readable_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, TOKEN).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (code, err) = run_with(&[("LLORCH_API_TOKEN_FILE", file.display().to_string())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(TOKEN));
}

// covers: POOL-3101
#[test]
fn unknown_model_and_duplicate_pool_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pools.toml");
    std::fs::write(
        &cfg,
        pool_toml("a", std::path::Path::new("/nonexistent/model.gguf"), 1, 512),
    )
    .unwrap();
    let base = [
        ("LLORCH_API_TOKEN", TOKEN.to_string()),
        ("POOL_MANAGERD_CONFIG", cfg.display().to_string()),
    ];
    let (code, err) = run_with(&base);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let model = tiny_model();
    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            pool_toml("a", &model, 1, 512),
            pool_toml("a", &model, 1, 512)
        ),
    )
    .unwrap();
    let (code, err) = run_with(&base);
    assert_eq!(code, 2);
    assert!(err.contains("\"a\" is used twice"), "{err}");
}

// covers: POOL-3102
#[test]
fn missing_engine_binary_says_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("pools.toml");
    std::fs::write(&cfg, pool_toml("a", &tiny_model(), 1, 512)).unwrap();
    let (code, err) = run_with(&[
        ("LLORCH_API_TOKEN", TOKEN.to_string()),
        ("POOL_MANAGERD_CONFIG", cfg.display().to_string()),
        (
            "POOL_MANAGERD_RUNTIME_DIR",
            dir.path().join("run").display().to_string(),
        ),
        ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".to_string()),
        (
            "LLORCH_CACHE_DIR",
            dir.path().join("empty-cache").display().to_string(),
        ),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no llama-server found"), "{err}");
    assert!(err.contains("make engine"), "{err}");
}

// covers: POOL-3101
#[test]
fn port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = run_with(&[
        ("LLORCH_API_TOKEN", TOKEN.to_string()),
        (
            "POOL_MANAGERD_RUNTIME_DIR",
            dir.path().join("run").display().to_string(),
        ),
        ("POOL_MANAGERD_BIND_ADDR", format!("127.0.0.1:{port}")),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot bind 127.0.0.1:{port}")),
        "{err}"
    );
}
