//! The TOML pools file (`POOL_MANAGERD_CONFIG`): an optional `[engine]` section and one
//! `[[pools]]` entry per managed pool, validated into `PoolSpec`s with messages that name the
//! file, the pool and the fix.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use llorch_contracts::handoff::{is_valid_pool_id, SLOTS_MAX};
use serde::Deserialize;

/// The pools file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsFile {
    #[serde(default)]
    pub engine: EngineSection,
    #[serde(default)]
    pub pools: Vec<PoolSection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Path to llama-server.
    pub binary: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub id: String,
    /// Path to the GGUF file.
    pub model: PathBuf,
    /// Model id clients ask for (default: the file name without `.gguf`).
    pub model_id: Option<String>,
    /// `CUDA_VISIBLE_DEVICES` for the engine, e.g. "0" or "0,1".
    pub device_mask: Option<String>,
    /// llama-server `--parallel`.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// llama-server `--ctx-size` (shared by all slots).
    #[serde(default = "default_ctx")]
    pub ctx: u32,
    /// llama-server `--n-gpu-layers`.
    #[serde(default)]
    pub gpu_layers: u32,
    /// Fixed loopback port for the engine (default: a free port).
    pub port: Option<u16>,
    /// Extra llama-server arguments, e.g. ["--threads", "1"].
    #[serde(default)]
    pub args: Vec<String>,
    /// Serve `/v1/embeddings` (llama-server `--embeddings`; a model without pooling metadata
    /// also needs `--pooling` in `args`).
    #[serde(default)]
    pub embeddings: bool,
}

fn default_slots() -> u32 {
    1
}

fn default_ctx() -> u32 {
    2048
}

/// One managed pool, validated.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub id: String,
    pub model_path: PathBuf,
    pub model_id: String,
    pub device_mask: Option<String>,
    pub slots: u32,
    pub ctx: u32,
    pub gpu_layers: u32,
    pub port: Option<u16>,
    pub extra_args: Vec<String>,
    pub embeddings: bool,
}

/// What is wrong with a pools file.
#[derive(Debug, thiserror::Error)]
pub enum PoolsFileError {
    #[error("cannot read pools file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("pools file {path} is not valid: {reason}")]
    Parse { path: String, reason: String },
    #[error("pool {pool_id:?}: {reason}")]
    Pool { pool_id: String, reason: String },
    #[error("pool id {0:?} is used twice in the pools file")]
    DuplicatePool(String),
    #[error("engine port {port} of pool {pool_id:?} is already in use on 127.0.0.1")]
    PortInUse { pool_id: String, port: u16 },
}

pub(crate) fn read_pools_file(path: &Path) -> Result<PoolsFile, PoolsFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PoolsFileError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| PoolsFileError::Parse {
        path: shown,
        reason: e.to_string(),
    })
}

pub(crate) fn validate_pools(sections: Vec<PoolSection>) -> Result<Vec<PoolSpec>, PoolsFileError> {
    let mut seen = HashSet::new();
    let mut ports = HashSet::new();
    let mut specs = Vec::with_capacity(sections.len());
    for p in sections {
        let fail = |reason: String| PoolsFileError::Pool {
            pool_id: p.id.clone(),
            reason,
        };
        if !is_valid_pool_id(&p.id) {
            return Err(fail(
                "id must be 1-64 characters of A-Z a-z 0-9 . _ - (it names the handoff file)"
                    .into(),
            ));
        }
        if !seen.insert(p.id.clone()) {
            return Err(PoolsFileError::DuplicatePool(p.id));
        }
        if !p.model.is_file() {
            return Err(fail(format!(
                "model file {} does not exist (set `model` to the path of a GGUF file)",
                p.model.display()
            )));
        }
        if p.slots == 0 || p.slots > SLOTS_MAX {
            return Err(fail(format!("slots must be between 1 and {SLOTS_MAX}")));
        }
        if p.ctx < 64 {
            return Err(fail("ctx must be at least 64 tokens".into()));
        }
        if p.ctx / p.slots < 16 {
            return Err(fail(format!(
                "ctx {} shared by {} slots leaves under 16 tokens per slot",
                p.ctx, p.slots
            )));
        }
        if let Some(mask) = &p.device_mask {
            let ok = !mask.is_empty()
                && mask.split(',').all(|d| {
                    !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !ok {
                return Err(fail(format!(
                    "device_mask {mask:?} must be a comma-separated list of GPU indices or UUIDs"
                )));
            }
        }
        if let Some(port) = p.port {
            if port == 0 || !ports.insert(port) {
                return Err(fail(format!("port {port} is zero or used by another pool")));
            }
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                return Err(PoolsFileError::PortInUse {
                    pool_id: p.id,
                    port,
                });
            }
        }
        let model_id = match p.model_id {
            Some(id) if !id.trim().is_empty() => id,
            Some(_) => return Err(fail("model_id must not be empty".into())),
            None => p
                .model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.id.clone()),
        };
        specs.push(PoolSpec {
            id: p.id,
            model_path: p.model,
            model_id,
            device_mask: p.device_mask,
            slots: p.slots,
            ctx: p.ctx,
            gpu_layers: p.gpu_layers,
            port: p.port,
            extra_args: p.args,
            embeddings: p.embeddings,
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Vec<PoolSpec>, PoolsFileError> {
        let file: PoolsFile = toml::from_str(toml_text).map_err(|e| PoolsFileError::Parse {
            path: "-".into(),
            reason: e.to_string(),
        })?;
        validate_pools(file.pools)
    }

    // covers: POOL-3101
    #[test]
    fn unknown_model_path_names_the_file() {
        let err = parse("[[pools]]\nid='a'\nmodel='/nonexistent/m.gguf'\n").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/m.gguf"), "{err}");
    }

    // covers: POOL-3101
    #[test]
    fn duplicate_pool_id_is_refused() {
        let model = tempfile::NamedTempFile::new().unwrap();
        let p = model.path().display();
        let err = parse(&format!(
            "[[pools]]\nid='a'\nmodel='{p}'\n[[pools]]\nid='a'\nmodel='{p}'\n"
        ))
        .unwrap_err();
        assert!(
            matches!(err, PoolsFileError::DuplicatePool(ref id) if id == "a"),
            "{err}"
        );
    }

    // covers: POOL-3101
    #[test]
    fn port_in_use_is_refused() {
        let model = tempfile::NamedTempFile::new().unwrap();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = parse(&format!(
            "[[pools]]\nid='a'\nmodel='{}'\nport={port}\n",
            model.path().display()
        ))
        .unwrap_err();
        assert!(matches!(err, PoolsFileError::PortInUse { .. }), "{err}");
    }

    // covers: POOL-3101
    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let model = tempfile::NamedTempFile::new().unwrap();
        let p = model.path().display();
        assert!(parse(&format!("[[pools]]\nid='a'\nmodel='{p}'\nslotz=2\n")).is_err());
        assert!(parse(&format!("[[pools]]\nid='a'\nmodel='{p}'\nslots=0\n")).is_err());
        assert!(parse(&format!("[[pools]]\nid='../x'\nmodel='{p}'\n")).is_err());
        assert!(parse(&format!(
            "[[pools]]\nid='a'\nmodel='{p}'\ndevice_mask='0;rm'\n"
        ))
        .is_err());
        let ok = parse(&format!(
            "[[pools]]\nid='a'\nmodel='{p}'\nslots=2\nctx=512\ndevice_mask='0,1'\n"
        ))
        .unwrap();
        assert_eq!(ok[0].slots, 2);
        assert_eq!(ok[0].device_mask.as_deref(), Some("0,1"));
    }
}
