//! The two IO seams of supervision: how an engine is launched (spawn, exit, stop) and
//! how a running engine is probed (health, slots, metrics). The daemon uses child processes
//! and HTTP (`ProcessLauncher`, `HttpProbe`); the in-process tests put scripted engines here
//! and drive the supervisor on tokio's paused clock.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use llamacpp_client::{EngineClient, EngineError, Health, Slot};
use parking_lot::RwLock;

use crate::engine_process::{self, EngineProcess, SpawnRequest};

/// What the supervisor knows of a started engine.
#[derive(Clone)]
pub(crate) struct EngineInfo {
    pub pid: u32,
    pub port: u16,
    pub url: String,
    pub model_path: PathBuf,
    pub model_id: String,
    /// Its API key (fresh for each start; scripted engines have none). Never printed.
    pub api_key: Option<Arc<str>>,
}

impl std::fmt::Debug for EngineInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineInfo")
            .field("pid", &self.pid)
            .field("url", &self.url)
            .field("model_id", &self.model_id)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// The API key of each engine this daemon started, by its base URL: the probes and the engine
/// proxy present it. An engine it did not start (an external handoff file) has none here.
#[derive(Default)]
pub struct EngineKeys(RwLock<HashMap<String, Arc<str>>>);

impl EngineKeys {
    pub fn get(&self, url: &str) -> Option<Arc<str>> {
        self.0.read().get(url).cloned()
    }
}

/// An engine's key in [`EngineKeys`] while the engine is held: dropped with it (only that
/// key: an engine started since at the same URL keeps its own).
struct KeyLease {
    keys: Arc<EngineKeys>,
    url: String,
    key: Arc<str>,
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        let mut keys = self.keys.0.write();
        if keys
            .get(&self.url)
            .is_some_and(|k| Arc::ptr_eq(k, &self.key))
        {
            keys.remove(&self.url);
        }
    }
}

pub(crate) trait Launcher: Send + Sync + 'static {
    fn spawn(&self, req: SpawnRequest<'_>) -> std::io::Result<Box<dyn RunningEngine>>;
}

pub(crate) trait RunningEngine: Send {
    /// What is known of it; its `url` and `port` only once [`RunningEngine::locate`] found them.
    fn info(&self) -> &EngineInfo;
    /// Its address, once known (an engine on a port of the kernel's choosing says which only
    /// after it bound it); `None` until then.
    fn locate(&mut self) -> Option<&EngineInfo> {
        Some(self.info())
    }
    /// Resolves when the engine exits on its own, describing how.
    fn exited(&mut self) -> BoxFuture<'_, String>;
    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()>;
}

pub(crate) trait Probe: Send + Sync + 'static {
    fn health<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>>;
    fn slots<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Slot>, EngineError>>;
    /// The engine's own Prometheus samples.
    fn metrics<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<(String, f64)>, EngineError>>;
}

/// Engines as child processes (`engine_process`), each with a fresh API key.
pub(crate) struct ProcessLauncher {
    pub keys: Arc<EngineKeys>,
}

impl Launcher for ProcessLauncher {
    fn spawn(&self, req: SpawnRequest<'_>) -> std::io::Result<Box<dyn RunningEngine>> {
        let process = engine_process::spawn(req)?;
        let info = EngineInfo {
            pid: process.pid,
            port: 0,
            url: String::new(),
            model_path: process.model_path.clone(),
            model_id: process.model_id.clone(),
            api_key: Some(Arc::from(process.api_key.as_str())),
        };
        Ok(Box::new(ChildEngine {
            process,
            info,
            keys: self.keys.clone(),
            lease: None,
        }))
    }
}

struct ChildEngine {
    process: EngineProcess,
    info: EngineInfo,
    keys: Arc<EngineKeys>,
    /// Its key under its URL, from when the URL is known.
    lease: Option<KeyLease>,
}

impl RunningEngine for ChildEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn locate(&mut self) -> Option<&EngineInfo> {
        if self.lease.is_none() {
            let port = self.process.locate()?;
            let key = self.info.api_key.clone()?;
            self.info.port = port;
            self.info.url = format!("http://127.0.0.1:{port}");
            self.keys
                .0
                .write()
                .insert(self.info.url.clone(), key.clone());
            self.lease = Some(KeyLease {
                keys: self.keys.clone(),
                url: self.info.url.clone(),
                key,
            });
        }
        Some(&self.info)
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        self.process.wait_exit().boxed()
    }

    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        self.process.stop(grace).boxed()
    }
}

/// Probes over HTTP with the daemon's short-timeout client (and the engine's key, when this
/// daemon started it).
pub(crate) struct HttpProbe {
    pub http: reqwest::Client,
    pub keys: Arc<EngineKeys>,
}

impl HttpProbe {
    fn client(&self, url: &str, timeout: Duration) -> EngineClient {
        EngineClient::new(self.http.clone(), url, timeout).with_api_key(self.keys.get(url))
    }
}

impl Probe for HttpProbe {
    fn health<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>> {
        async move { self.client(url, timeout).health().await }.boxed()
    }

    fn slots<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Slot>, EngineError>> {
        async move { self.client(url, timeout).slots().await }.boxed()
    }

    fn metrics<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<(String, f64)>, EngineError>> {
        async move { self.client(url, timeout).metrics().await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_gone_takes_its_own_key_only_and_not_a_newer_engines_at_its_url() {
        let keys = Arc::new(EngineKeys::default());
        let lease = |key: &str| {
            let key: Arc<str> = Arc::from(key);
            keys.0.write().insert("http://e".into(), key.clone());
            KeyLease {
                keys: keys.clone(),
                url: "http://e".into(),
                key,
            }
        };
        let old = lease("old");
        let new = lease("new");
        drop(old);
        assert_eq!(keys.get("http://e").as_deref(), Some("new"));
        drop(new);
        assert_eq!(keys.get("http://e"), None);
    }
}
