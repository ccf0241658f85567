//! Scripted engines for the supervisor: each spawn takes the next script, and the probe
//! answers from the script and the virtual clock. Fault-timing doubles only.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use llamacpp_client::{EngineError, Health, Slot};
use llorch_contracts::PoolStatus;
use llorch_core::Registry;
use parking_lot::{Mutex, RwLock};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Args, Config};
use crate::engine_process::SpawnRequest;
use crate::launcher::{EngineInfo, Launcher, Probe, RunningEngine};
use crate::state::Command;
use crate::state::Shared;
use crate::supervisor::Supervisor;

/// How one scripted engine behaves, in virtual time from its spawn.
#[derive(Debug, Clone, Default)]
pub struct EngineScript {
    /// `/health` says loading until then, ok after (`None`: never healthy).
    pub healthy_after: Option<Duration>,
    /// The process exits on its own then.
    pub exits_after: Option<Duration>,
    /// From then on `/health` hangs until the caller's timeout.
    pub hangs_after: Option<Duration>,
    /// A slot is busy until then (`/slots`).
    pub busy_until: Option<Duration>,
    /// SIGTERM is ignored: a stop takes the whole grace, then SIGKILL.
    pub ignores_sigterm: bool,
}

/// Healthy 100 ms after spawn, then runs until stopped.
pub fn healthy() -> EngineScript {
    EngineScript {
        healthy_after: Some(Duration::from_millis(100)),
        ..Default::default()
    }
}

#[derive(Debug, Clone)]
pub struct Spawned {
    pub script: EngineScript,
    pub at: Instant,
    pub url: String,
    /// When a stop began, and when the engine was gone.
    pub stop_began: Option<Instant>,
    pub gone_at: Option<Instant>,
}

#[derive(Default)]
pub struct Engines {
    scripts: Mutex<VecDeque<EngineScript>>,
    fallback: Mutex<Option<EngineScript>>,
    spawned: Mutex<Vec<Spawned>>,
}

impl Engines {
    pub fn push(&self, s: EngineScript) {
        self.scripts.lock().push_back(s);
    }

    pub fn always(&self, s: EngineScript) {
        *self.fallback.lock() = Some(s);
    }

    pub fn spawned(&self) -> Vec<Spawned> {
        self.spawned.lock().clone()
    }

    /// An engine this daemon did not start (an external provisioner's), at `url`, behaving
    /// as `script` from now.
    pub fn external(&self, url: &str, script: EngineScript) {
        self.spawned.lock().push(Spawned {
            script,
            at: Instant::now(),
            url: url.to_string(),
            stop_began: None,
            gone_at: None,
        });
    }

    fn find(&self, url: &str) -> Option<Spawned> {
        self.spawned.lock().iter().find(|s| s.url == url).cloned()
    }
}

/// The launcher and the probe over one set of scripted engines.
#[derive(Clone, Default)]
pub struct Scripted(pub Arc<Engines>);

impl Launcher for Scripted {
    fn spawn(&self, req: SpawnRequest<'_>) -> std::io::Result<Box<dyn RunningEngine>> {
        let engines = &self.0;
        let script = engines
            .scripts
            .lock()
            .pop_front()
            .or_else(|| engines.fallback.lock().clone())
            .unwrap_or_else(healthy);
        let mut spawned = engines.spawned.lock();
        let n = spawned.len();
        let info = EngineInfo {
            pid: 10_000 + n as u32,
            port: 20_000 + n as u16,
            url: format!("http://engine-{n}"),
            model_path: req.model_path.to_path_buf(),
            model_id: req.model_id.to_string(),
            api_key: None,
        };
        spawned.push(Spawned {
            script,
            at: Instant::now(),
            url: info.url.clone(),
            stop_began: None,
            gone_at: None,
        });
        Ok(Box::new(ScriptedEngine {
            n,
            info,
            engines: engines.clone(),
        }))
    }
}

struct ScriptedEngine {
    n: usize,
    info: EngineInfo,
    engines: Arc<Engines>,
}

impl RunningEngine for ScriptedEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn exited(&mut self) -> BoxFuture<'_, String> {
        let s = self.engines.spawned.lock()[self.n].clone();
        async move {
            match s.script.exits_after {
                Some(after) => {
                    tokio::time::sleep_until(s.at + after).await;
                    self.engines.spawned.lock()[self.n].gone_at = Some(Instant::now());
                    "engine exited with status 1".to_string()
                }
                None => std::future::pending().await,
            }
        }
        .boxed()
    }

    fn stop(self: Box<Self>, grace: Duration) -> BoxFuture<'static, ()> {
        async move {
            let ignores = {
                let mut spawned = self.engines.spawned.lock();
                let s = &mut spawned[self.n];
                if s.gone_at.is_some() {
                    return;
                }
                s.stop_began = Some(Instant::now());
                s.script.ignores_sigterm
            };
            if ignores {
                tokio::time::sleep(grace).await;
            }
            self.engines.spawned.lock()[self.n].gone_at = Some(Instant::now());
        }
        .boxed()
    }
}

impl Probe for Scripted {
    fn health<'a>(
        &'a self,
        url: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>> {
        async move {
            let s = self
                .0
                .find(url)
                .ok_or_else(|| EngineError::Unreachable("no such engine".into()))?;
            let now = Instant::now();
            if s.gone_at.is_some() {
                return Err(EngineError::Unreachable("connection refused".into()));
            }
            if s.script.hangs_after.is_some_and(|h| now >= s.at + h) {
                tokio::time::sleep(timeout).await;
                return Err(EngineError::Timeout(timeout));
            }
            match s.script.healthy_after {
                Some(h) if now >= s.at + h => Ok(Health::Ok),
                _ => Ok(Health::Loading),
            }
        }
        .boxed()
    }

    fn slots<'a>(
        &'a self,
        url: &'a str,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<Slot>, EngineError>> {
        async move {
            let s = self
                .0
                .find(url)
                .ok_or_else(|| EngineError::Unreachable("no such engine".into()))?;
            let busy = s
                .script
                .busy_until
                .is_some_and(|b| Instant::now() < s.at + b);
            Ok(vec![
                Slot {
                    id: 0,
                    is_processing: busy,
                },
                Slot {
                    id: 1,
                    is_processing: false,
                },
            ])
        }
        .boxed()
    }

    fn metrics<'a>(
        &'a self,
        _url: &'a str,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Vec<(String, f64)>, EngineError>> {
        async { Ok(Vec::new()) }.boxed()
    }
}

/// One supervised pool `p` (2 slots) on scripted engines, jitter fixed at 0 (each restart
/// waits exactly half its backoff ceiling).
pub struct Supervised {
    pub shared: Arc<Shared>,
    pub engines: Arc<Engines>,
    pub commands: mpsc::Sender<Command>,
    pub cancel: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
    pub runtime_dir: PathBuf,
    _dir: tempfile::TempDir,
}

/// The daemon's shared state for one pool `p` (2 slots) on scripted engines, jitter fixed at
/// 0, in a temporary home; `flags` are pool-managerd's flags.
pub struct Built {
    pub shared: Arc<Shared>,
    pub engines: Arc<Engines>,
    pub commands: (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    pub runtime_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

pub fn build(flags: &[&str]) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.gguf");
    std::fs::write(&model, b"GGUF").unwrap();
    let pools = dir.path().join("pools.toml");
    std::fs::write(
        &pools,
        format!(
            "[[pools]]\nid = \"p\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = 2\nctx = 1024\n",
            model.display()
        ),
    )
    .unwrap();
    let runtime_dir = dir.path().join("run");
    std::fs::create_dir_all(&runtime_dir).unwrap();
    let config_flag = format!("--config={}", pools.display());
    let runtime_flag = format!("--runtime-dir={}", runtime_dir.display());
    let mut argv = vec![
        "pool-managerd",
        "--node-id=test-node",
        config_flag.as_str(),
        runtime_flag.as_str(),
    ];
    if !flags.iter().any(|f| f.starts_with("--api-token")) {
        argv.push("--allow-unauthenticated-loopback");
    }
    argv.extend_from_slice(flags);
    let config = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    let engines = Arc::new(Engines::default());
    let scripted = Scripted(engines.clone());
    let (tx, rx) = mpsc::channel(8);
    let shared = Arc::new(Shared {
        engine_binary: Some(PathBuf::from("scripted-llama-server")),
        engine_version: "scripted".into(),
        registry: RwLock::new(Registry::new()),
        metrics: crate::metrics::Metrics::new().unwrap(),
        launcher: Arc::new(scripted.clone()),
        probe: Arc::new(scripted),
        jitter: || 0.0,
        engine_keys: Default::default(),
        proxy_http: reqwest::Client::new(),
        proxy_fresh: reqwest::Client::new(),
        gpus: RwLock::new(crate::gpu::Discovery {
            mode: "cpu-only",
            gpus: Vec::new(),
            reason: Some("scripted".into()),
        }),
        supervisors: [("p".to_string(), tx.clone())].into_iter().collect(),
        config,
    });
    Built {
        shared,
        engines,
        commands: (tx, rx),
        runtime_dir,
        dir,
    }
}

impl Supervised {
    /// Pool `p` supervised on scripted engines: `scripts` are the engines of the first spawns,
    /// in order (later ones are healthy).
    pub fn start(flags: &[&str], scripts: Vec<EngineScript>) -> Supervised {
        let b = build(flags);
        for s in scripts {
            b.engines.push(s);
        }
        let spec = b.shared.config.pools[0].clone();
        let (tx, rx) = b.commands;
        let cancel = CancellationToken::new();
        let done = tokio::spawn(Supervisor::new(b.shared.clone(), spec, rx, cancel.clone()).run());
        Supervised {
            shared: b.shared,
            engines: b.engines,
            commands: tx,
            cancel,
            done,
            runtime_dir: b.runtime_dir,
            _dir: b.dir,
        }
    }

    pub fn status(&self) -> PoolStatus {
        self.shared.pool("p").unwrap()
    }

    /// Polls the registry every virtual millisecond until `pred` holds; returns when.
    pub async fn until(&self, what: &str, pred: impl Fn(&PoolStatus) -> bool) -> Instant {
        for _ in 0..3_600_000 {
            if self.shared.pool("p").is_some_and(|p| pred(&p)) {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!(
            "{what}: not within an hour of virtual time; last {:?}",
            self.shared.pool("p")
        );
    }
}
