//! Writing handoff files (`{runtime_dir}/{pool_id}.json`). Writes are atomic:
//! a hidden temporary file in the same directory, fsync, then rename.

use std::io::Write;
use std::path::{Path, PathBuf};

use llorch_contracts::HandoffFile;

pub fn path_for(runtime_dir: &Path, pool_id: &str) -> PathBuf {
    runtime_dir.join(format!("{pool_id}.json"))
}

/// True for the files the watcher considers: `*.json`, not hidden (temporaries start with '.').
pub fn is_handoff_path(path: &Path) -> bool {
    let name = match path.file_name().and_then(|n| n.to_str()) {
        Some(n) => n,
        None => return false,
    };
    !name.starts_with('.') && name.ends_with(".json") && name.len() > ".json".len()
}

pub fn write_atomic(runtime_dir: &Path, file: &HandoffFile) -> std::io::Result<PathBuf> {
    let target = path_for(runtime_dir, &file.pool_id);
    let tmp = runtime_dir.join(format!(".{}.json.tmp-{}", file.pool_id, std::process::id()));
    let bytes = serde_json::to_vec_pretty(file).map_err(std::io::Error::other)?;
    // 0644 whatever the umask: readers refuse a file anyone may write.
    replace_with(&tmp, &target, &bytes, 0o644)?;
    Ok(target)
}

/// `target` replaced atomically by `bytes` with `mode`: written to `tmp` — a fresh file, never
/// through a name planted in the directory (a symlink would make the write land elsewhere) —,
/// synced, then renamed over `target`.
pub(crate) fn replace_with(
    tmp: &Path,
    target: &Path,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(tmp)?;
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(tmp, target)
}

pub fn remove(runtime_dir: &Path, pool_id: &str) {
    let path = path_for(runtime_dir, pool_id);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(pool_id, %error, path = %path.display(), "cannot remove handoff file")
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: POOL-3205
    #[test]
    fn only_visible_json_files_are_handoff_paths() {
        assert!(is_handoff_path(Path::new("/r/pool-a.json")));
        assert!(!is_handoff_path(Path::new("/r/.pool-a.json.tmp-1")));
        assert!(!is_handoff_path(Path::new("/r/pool-a.txt")));
        assert!(!is_handoff_path(Path::new("/r/.json")));
    }
}
