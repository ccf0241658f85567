//! The handoff file `{runtime_dir}/{pool_id}.json` (DESIGN §4): written atomically by
//! pool-managerd (or an external provisioner) once an engine is healthy.

use serde::{Deserialize, Serialize};

pub const HANDOFF_VERSION: u32 = 1;

/// Most slots one pool may have (llama-server `--parallel`): pools file, handoff files and
/// node reports are held to it.
pub const SLOTS_MAX: u32 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisioningMode {
    /// Spawned and supervised by pool-managerd.
    Managed,
    /// Started by something else; pool-managerd only watches it.
    External,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoffModel {
    pub id: String,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoffFile {
    pub version: u32,
    pub engine: String,
    #[serde(default)]
    pub engine_version: Option<String>,
    pub provisioning_mode: ProvisioningMode,
    /// Base URL of the engine, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    pub pool_id: String,
    #[serde(default)]
    pub replica_id: Option<String>,
    pub model: HandoffModel,
    pub slots_total: u32,
    #[serde(default)]
    pub ctx_max: Option<u32>,
    #[serde(default)]
    pub device_mask: Option<String>,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// Absent while the engine serves. pool-managerd rewrites its file with `restarting` while
    /// it restarts a crashed engine (the pool comes back: queue its work) and `failed` when the
    /// circuit opened (it will not: refuse its work); it deletes the file when the pool is
    /// retired (drain, shutdown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<crate::PoolState>,
    /// The engine serves `/v1/embeddings` (llama-server `--embeddings`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embeddings: bool,
}

/// Why a handoff file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffError {
    Parse(String),
    Invalid(String),
}

impl std::fmt::Display for HandoffError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffError::Parse(m) => write!(f, "not a handoff file: {m}"),
            HandoffError::Invalid(m) => write!(f, "invalid handoff file: {m}"),
        }
    }
}

impl std::error::Error for HandoffError {}

/// A pool id: 1..=64 chars of `[A-Za-z0-9._-]`, not starting with a dot (it names a file).
pub fn is_valid_pool_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl HandoffFile {
    /// The minimal file an external provisioner writes for an engine it started itself.
    pub fn external(pool_id: &str, url: &str, model_id: &str, slots_total: u32) -> Self {
        Self {
            version: HANDOFF_VERSION,
            engine: "llamacpp".into(),
            engine_version: None,
            provisioning_mode: ProvisioningMode::External,
            url: url.into(),
            pool_id: pool_id.into(),
            replica_id: None,
            model: HandoffModel {
                id: model_id.into(),
                path: None,
            },
            slots_total,
            ctx_max: None,
            device_mask: None,
            pid: None,
            started_at_ms: None,
            state: None,
            embeddings: false,
        }
    }

    /// Parses and validates a handoff file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, HandoffError> {
        let file: HandoffFile =
            serde_json::from_slice(bytes).map_err(|e| HandoffError::Parse(e.to_string()))?;
        file.validate()?;
        Ok(file)
    }

    pub fn validate(&self) -> Result<(), HandoffError> {
        if self.version != HANDOFF_VERSION {
            return Err(HandoffError::Invalid(format!(
                "version {} is not supported (expected {HANDOFF_VERSION})",
                self.version
            )));
        }
        if !is_valid_pool_id(&self.pool_id) {
            return Err(HandoffError::Invalid(format!(
                "pool_id {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                self.pool_id
            )));
        }
        // Engines are reached over plain HTTP on their node; the url gets requests, so it is
        // a plain base URL (no user info, query or fragment).
        if let Err(reason) = crate::address::base_url(&self.url, crate::address::Schemes::HttpOnly)
        {
            return Err(HandoffError::Invalid(format!(
                "url {:?} must be a plain http:// base URL: {reason}",
                self.url
            )));
        }
        if self.slots_total == 0 || self.slots_total > SLOTS_MAX {
            return Err(HandoffError::Invalid(format!(
                "slots_total must be between 1 and {SLOTS_MAX}"
            )));
        }
        if self.model.id.is_empty() {
            return Err(HandoffError::Invalid("model.id must not be empty".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HandoffFile {
        HandoffFile {
            version: HANDOFF_VERSION,
            engine: "llamacpp".into(),
            engine_version: Some("b1".into()),
            provisioning_mode: ProvisioningMode::External,
            url: "http://127.0.0.1:8081".into(),
            pool_id: "pool-a".into(),
            replica_id: None,
            model: HandoffModel {
                id: "tiny".into(),
                path: None,
            },
            slots_total: 2,
            ctx_max: Some(512),
            device_mask: None,
            pid: None,
            started_at_ms: None,
            state: None,
            embeddings: false,
        }
    }

    // covers: POOL-3201
    #[test]
    fn round_trips_through_json() {
        let bytes = serde_json::to_vec(&sample()).unwrap();
        assert_eq!(HandoffFile::parse(&bytes).unwrap(), sample());
    }

    // covers: POOL-3204
    #[test]
    fn rejects_bad_pool_id_url_and_slots() {
        let mut f = sample();
        f.pool_id = "../etc".into();
        assert!(f.validate().is_err());
        let mut f = sample();
        f.url = "ftp://x".into();
        assert!(f.validate().is_err());
        // A url that would carry anything beside the engine's address is refused too.
        for url in [
            "http://user:pw@127.0.0.1:8081",
            "http://127.0.0.1:8081/?x=1",
            "http://127.0.0.1:8081/#x",
        ] {
            f.url = url.into();
            assert!(f.validate().is_err(), "{url}");
        }
        let mut f = sample();
        f.slots_total = 0;
        assert!(f.validate().is_err());
        f.slots_total = SLOTS_MAX + 1;
        assert!(f.validate().is_err());
        f.slots_total = SLOTS_MAX;
        assert!(f.validate().is_ok());
    }

    // covers: POOL-3204
    #[test]
    fn rejects_garbage_and_unknown_fields() {
        assert!(matches!(
            HandoffFile::parse(b"{not json"),
            Err(HandoffError::Parse(_))
        ));
        let mut v = serde_json::to_value(sample()).unwrap();
        v["surprise"] = serde_json::json!(1);
        assert!(HandoffFile::parse(&serde_json::to_vec(&v).unwrap()).is_err());
    }
}
