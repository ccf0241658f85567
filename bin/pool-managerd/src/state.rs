//! Shared state of the daemon: named fields, one `Arc`, handed to every task and handler.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use llorch_contracts::PoolStatus;
use llorch_core::Registry;
use parking_lot::RwLock;
use tokio::sync::mpsc;

/// The daemon's shared state, as the HTTP handlers hold it.
pub type AppState = Arc<Shared>;

/// What a pool's supervisor is asked by the API (each with the channel of its answer).
pub enum Command {
    Drain {
        deadline: std::time::Duration,
        reply: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    Reload {
        model_path: PathBuf,
        reply: tokio::sync::oneshot::Sender<Result<PoolStatus, String>>,
    },
}

use crate::config::Config;
use crate::gpu::Discovery;
use crate::launcher::{Launcher, Probe};
use crate::metrics::Metrics;

pub struct Shared {
    pub config: Config,
    /// `None` when no pool is managed here (a node that only watches external engines).
    pub engine_binary: Option<PathBuf>,
    pub engine_version: String,
    pub registry: RwLock<Registry>,
    pub metrics: Metrics,
    /// How engines are started and stopped (child processes; scripted in tests).
    pub launcher: Arc<dyn Launcher>,
    /// How engines are probed (HTTP; scripted in tests).
    pub probe: Arc<dyn Probe>,
    /// Jitter in `[0, 1)` for restart backoff (random; fixed in tests).
    pub jitter: fn() -> f64,
    /// The API keys of the engines this daemon started (the proxy presents them).
    pub engine_keys: Arc<crate::launcher::EngineKeys>,
    /// Client for the streaming engine proxy: no overall timeout, connect timeout only.
    pub proxy_http: reqwest::Client,
    /// The proxy's one retry, on a new connection (it keeps none idle).
    pub proxy_fresh: reqwest::Client,
    pub gpus: RwLock<Discovery>,
    /// Command channel of each managed pool's supervisor.
    pub supervisors: HashMap<String, mpsc::Sender<Command>>,
}

impl Shared {
    pub fn pools(&self) -> Vec<PoolStatus> {
        self.registry.read().list()
    }

    pub fn pool(&self, pool_id: &str) -> Option<PoolStatus> {
        self.registry.read().get(pool_id).cloned()
    }

    pub fn is_managed(&self, pool_id: &str) -> bool {
        self.supervisors.contains_key(pool_id)
    }
}
