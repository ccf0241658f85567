//! The two IO seams of supervision: how an engine is launched (spawn, exit, stop) and
//! how a running engine is probed (health, slots, metrics). The daemon uses child processes
//! and HTTP (`ProcessLauncher`, `HttpProbe`); the in-process tests put scripted engines here
//! and drive the supervisor on tokio's paused clock.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use llamacpp_client::{EngineClient, Health, Slot};

use crate::engine_process::{self, EngineProcess, SpawnRequest};

/// What the supervisor knows of a started engine.
#[derive(Debug, Clone)]
pub(crate) struct EngineInfo {
    pub pid: u32,
    pub port: u16,
    pub url: String,
    pub model_path: PathBuf,
    pub model_id: String,
}

pub(crate) trait Launcher: Send + Sync + 'static {
    fn spawn(&self, req: SpawnRequest<'_>) -> std::io::Result<Box<dyn RunningEngine>>;
}

pub(crate) trait RunningEngine: Send {
    fn info(&self) -> &EngineInfo;
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
    ) -> BoxFuture<'a, Result<Health, String>>;
    fn slots<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Slot>, String>>;
    /// The engine's own Prometheus samples.
    fn metrics<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<(String, f64)>, String>>;
}

/// Engines as child processes (`engine_process`).
pub(crate) struct ProcessLauncher;

impl Launcher for ProcessLauncher {
    fn spawn(&self, req: SpawnRequest<'_>) -> std::io::Result<Box<dyn RunningEngine>> {
        let process = engine_process::spawn(req)?;
        let info = EngineInfo {
            pid: process.pid,
            port: process.port,
            url: process.url.clone(),
            model_path: process.model_path.clone(),
            model_id: process.model_id.clone(),
        };
        Ok(Box::new(ChildEngine { process, info }))
    }
}

struct ChildEngine {
    process: EngineProcess,
    info: EngineInfo,
}

impl RunningEngine for ChildEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        self.process.wait_exit().boxed()
    }

    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        self.process.stop(grace).boxed()
    }
}

/// Probes over HTTP with the daemon's short-timeout client.
pub(crate) struct HttpProbe {
    pub http: reqwest::Client,
}

impl HttpProbe {
    fn client(&self, url: &str, timeout: Duration) -> EngineClient {
        EngineClient::new(self.http.clone(), url, timeout)
    }
}

impl Probe for HttpProbe {
    fn health<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, String>> {
        async move {
            self.client(url, timeout)
                .health()
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn slots<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Slot>, String>> {
        async move {
            self.client(url, timeout)
                .slots()
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }

    fn metrics<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<(String, f64)>, String>> {
        async move {
            self.client(url, timeout)
                .metrics()
                .await
                .map_err(|e| e.to_string())
        }
        .boxed()
    }
}
