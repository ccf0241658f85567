//! An engine's API key beside its handoff file: `{runtime_dir}/keys/{pool_id}.key`, in a
//! directory only the daemon's user may enter, the file readable by that user alone. The key
//! (fresh for each engine start) is what `llama-server --api-key` wants on every request but
//! `/health`; pool-managerd writes it before the handoff file that names the engine, and a HOME
//! orchestratord reads it when it binds the pool. The handoff file itself stays free of secrets
//! (external provisioners write it, and it is 0644).

use std::path::{Path, PathBuf};

fn keys_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("keys")
}

pub fn key_path(runtime_dir: &Path, pool_id: &str) -> PathBuf {
    keys_dir(runtime_dir).join(format!("{pool_id}.key"))
}

/// Writes `key` for `pool_id` atomically (a fresh 0600 file, fsync, rename), in a 0700
/// directory made if missing.
pub fn write_key(runtime_dir: &Path, pool_id: &str, key: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = keys_dir(runtime_dir);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let tmp = dir.join(format!(".{pool_id}.key.tmp-{}", std::process::id()));
    crate::file::replace_with(&tmp, &key_path(runtime_dir, pool_id), key.as_bytes(), 0o600)
}

/// The key of `pool_id`'s engine, when pool-managerd wrote one (an external engine has none).
/// Refused (an error) unless it is a regular file, not a link, owned by this daemon's user or
/// root and readable by no one else.
pub fn read_key(runtime_dir: &Path, pool_id: &str) -> std::io::Result<Option<String>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = key_path(runtime_dir, pool_id);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let refused = |why: &str| std::io::Error::other(format!("{}: {why}", path.display()));
    if !meta.file_type().is_file() {
        return Err(refused("not a regular file"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(refused("readable or writable by others than its owner"));
    }
    if meta.uid() != 0 && meta.uid() != crate::watch::effective_uid() {
        return Err(refused("owned by another user"));
    }
    let mut key = String::new();
    file.take(1024).read_to_string(&mut key)?;
    let key = key.trim().to_string();
    Ok((!key.is_empty()).then_some(key))
}

/// Removes `pool_id`'s key (its engine stopped).
pub fn remove_key(runtime_dir: &Path, pool_id: &str) {
    match std::fs::remove_file(key_path(runtime_dir, pool_id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(pool_id, error = %e, "cannot remove the engine's key file")
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_written_for_its_user_alone_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_key(dir.path(), "p").unwrap(), None);
        write_key(dir.path(), "p", "k-123").unwrap();
        write_key(dir.path(), "p", "k-456").unwrap();
        assert_eq!(read_key(dir.path(), "p").unwrap().as_deref(), Some("k-456"));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key_path(dir.path(), "p")), 0o600);
        assert_eq!(mode(&dir.path().join("keys")), 0o700);
        // A key others may read is refused, not used.
        std::fs::set_permissions(
            key_path(dir.path(), "p"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(read_key(dir.path(), "p").is_err());
        remove_key(dir.path(), "p");
        assert_eq!(read_key(dir.path(), "p").unwrap(), None);
    }
}
