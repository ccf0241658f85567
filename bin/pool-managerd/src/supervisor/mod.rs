//! One supervisor task per managed pool: spawn the engine, wait for health, write the handoff
//! file, probe periodically, restart on crash or hang with backoff, open the circuit to
//! `failed`, drain and reload on command, and stop the engine when the daemon stops.
//! Decisions come from `llorch_core::Supervision`; this module only does the IO.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use llamacpp_client::Health;
use llorch_contracts::{
    HandoffFile, HandoffModel, PoolState, PoolStatus, ProvisioningMode, HANDOFF_VERSION,
};
use llorch_core::{FailureAction, Supervision, SupervisionPolicy};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::PoolSpec;
use crate::engine_process::{self, SpawnRequest};
use crate::launcher::{EngineInfo, RunningEngine};
use crate::state::Command;
use crate::state::Shared;

mod commands;

use commands::next_command;

enum Next {
    Start,
    Watch(Box<dyn RunningEngine>),
    Failure(String),
    Idle,
    Exit,
}

enum StartError {
    Cancelled,
    Failed(String),
}

pub struct Supervisor {
    shared: Arc<Shared>,
    spec: PoolSpec,
    sup: Supervision,
    commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    url: Option<String>,
    /// The handoff file this pool last published (none once retired).
    handoff: Option<HandoffFile>,
    /// The API key of the engine that file names (written beside it, `keys/{pool}.key`).
    engine_key: Option<Arc<str>>,
    /// Writing the missing handoff file again failed (logged once until it succeeds).
    restore_failing: bool,
    slots_free: u32,
    instance: u64,
}

impl Supervisor {
    pub fn new(
        shared: Arc<Shared>,
        spec: PoolSpec,
        commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
    ) -> Self {
        let c = &shared.config;
        let policy = SupervisionPolicy {
            backoff_base: c.restart_backoff,
            backoff_max: c.restart_backoff_max,
            max_probe_failures: c.max_probe_failures,
            breaker_open_for: c.breaker_open,
            breaker_open_max: c.breaker_open.max(Duration::from_secs(3600)),
            ..SupervisionPolicy::default()
        };
        Self {
            sup: Supervision::new(policy),
            shared,
            spec,
            commands,
            cancel,
            url: None,
            slots_free: 0,
            instance: 0,
            handoff: None,
            engine_key: None,
            restore_failing: false,
        }
    }

    pub async fn run(mut self) {
        self.publish();
        let mut next = Next::Start;
        loop {
            next = match next {
                Next::Start => {
                    self.sup.on_spawned();
                    self.publish();
                    let (path, id) = (self.spec.model_path.clone(), self.spec.model_id.clone());
                    match self.start(&path, &id).await {
                        Ok(engine) => {
                            self.became_ready(engine.info());
                            Next::Watch(engine)
                        }
                        Err(StartError::Cancelled) => Next::Exit,
                        Err(StartError::Failed(e)) => Next::Failure(e),
                    }
                }
                Next::Watch(engine) => self.watch(engine).await,
                Next::Failure(error) => self.failure(error).await,
                Next::Idle => self.idle().await,
                Next::Exit => break,
            };
        }
        self.retire_handoff();
        self.sup.on_stopped();
        self.url = None;
        self.publish();
        tracing::info!(pool_id = %self.spec.id, "pool supervisor stopped");
    }

    /// Spawns an engine for `model_path` and waits until it answers `/health`.
    async fn start(
        &mut self,
        model_path: &Path,
        model_id: &str,
    ) -> Result<Box<dyn RunningEngine>, StartError> {
        let shared = self.shared.clone();
        let Some(binary) = shared.engine_binary.as_deref() else {
            return Err(StartError::Failed("no engine binary configured".into()));
        };
        self.instance += 1;
        let instance = if self.instance.is_multiple_of(2) {
            ".b"
        } else {
            ".a"
        };
        let mut engine = shared
            .launcher
            .spawn(SpawnRequest {
                binary,
                runtime_dir: &shared.config.runtime_dir,
                spec: &self.spec,
                model_path,
                model_id,
                instance,
                user: shared.config.engine_user,
            })
            .map_err(|e| StartError::Failed(format!("cannot spawn {}: {e}", binary.display())))?;
        let pid = engine.info().pid;
        tracing::info!(pool_id = %self.spec.id, pid, model_id, "engine spawned");
        let mut url: Option<String> = None;
        let deadline = Instant::now() + shared.config.engine_start_timeout;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    engine.stop(shared.config.shutdown_grace).await;
                    return Err(StartError::Cancelled);
                }
                how = engine.exited() => {
                    let detail = self.log_tail();
                    engine.stop(Duration::ZERO).await;
                    return Err(StartError::Failed(format!("{how} before becoming healthy{detail}")));
                }
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
            if url.is_none() {
                url = engine.locate().map(|info| {
                    tracing::info!(pool_id = %self.spec.id, pid, port = info.port, "engine listening");
                    info.url.clone()
                });
            }
            if let Some(url) = &url {
                if let Ok(Health::Ok) = shared.probe.health(url, Duration::from_secs(2)).await {
                    return Ok(engine);
                }
            }
            if Instant::now() >= deadline {
                engine.stop(Duration::ZERO).await;
                let what = match url {
                    Some(_) => "become healthy",
                    None => {
                        "say which port it listens on (no \"listening on http://\" line in its log)"
                    }
                };
                return Err(StartError::Failed(format!(
                    "engine did not {what} within {} ms",
                    shared.config.engine_start_timeout.as_millis()
                )));
            }
        }
    }

    fn became_ready(&mut self, engine: &EngineInfo) {
        self.sup.on_ready(Instant::now().into_std());
        self.url = Some(engine.url.clone());
        self.slots_free = self.spec.slots;
        let file = HandoffFile {
            version: HANDOFF_VERSION,
            engine: "llamacpp".into(),
            engine_version: Some(self.shared.engine_version.clone()),
            provisioning_mode: ProvisioningMode::Managed,
            url: engine.url.clone(),
            pool_id: self.spec.id.clone(),
            replica_id: Some(format!("{}/{}", self.shared.config.node_id, self.spec.id)),
            model: HandoffModel {
                id: engine.model_id.clone(),
                path: Some(engine.model_path.display().to_string()),
            },
            slots_total: self.spec.slots,
            ctx_max: Some(self.spec.ctx / self.spec.slots),
            device_mask: self.spec.device_mask.clone(),
            pid: Some(engine.pid),
            started_at_ms: Some(llorch_handoff::now_ms()),
            state: None,
            embeddings: self.spec.embeddings,
        };
        // The engine's key before the file naming it: a HOME orchestratord that reads the
        // new handoff finds the new key.
        self.engine_key = engine.api_key.clone();
        if let Err(error) = self.write_engine_key() {
            tracing::error!(pool_id = %self.spec.id, %error, "cannot write the engine's key file; a HOME orchestratord cannot reach this engine");
        }
        self.publish_handoff(file);
        self.publish();
        tracing::info!(pool_id = %self.spec.id, url = %engine.url, restart_count = self.sup.restart_count(), "pool ready");
    }

    async fn watch(&mut self, mut engine: Box<dyn RunningEngine>) -> Next {
        let grace = self.shared.config.shutdown_grace;
        let mut probe = tokio::time::interval(self.shared.config.health_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.tick().await;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => {
                    self.sup.on_drain();
                    self.publish();
                    engine.stop(grace).await;
                    return Next::Exit;
                }
                how = engine.exited() => {
                    engine.stop(Duration::ZERO).await;
                    return Next::Failure(how);
                }
                _ = probe.tick() => {
                    self.restore_handoff();
                    let url = engine.info().url.clone();
                    if let Err(error) = self.probe(&url).await {
                        if self.sup.on_probe_failed() {
                            tracing::warn!(pool_id = %self.spec.id, %error, "engine hung; killing it");
                            engine.stop(Duration::ZERO).await;
                            return Next::Failure(format!("engine hung: health probes failing ({error})"));
                        }
                    }
                }
                cmd = next_command(&mut self.commands) => match cmd {
                    Command::Drain { deadline, reply } => {
                        self.sup.on_drain();
                        self.retire_handoff();
                        self.publish();
                        let _ = reply.send(Ok(()));
                        return self.drain(engine, deadline).await;
                    }
                    Command::Reload { model_path, reply } => {
                        engine = self.reload(engine, model_path, reply).await;
                    }
                }
            }
        }
    }

    /// Health + slots probe of a running engine.
    async fn probe(&mut self, url: &str) -> Result<(), String> {
        let span = tracing::info_span!("health_check", pool_id = %self.spec.id);
        tracing::Instrument::instrument(self.probe_engine(url), span).await
    }

    async fn probe_engine(&mut self, url: &str) -> Result<(), String> {
        let timeout = self
            .shared
            .config
            .health_interval
            .min(Duration::from_secs(2));
        let probe = &self.shared.probe;
        let m = &self.shared.metrics.health_checks;
        match probe.health(url, timeout).await {
            Ok(Health::Ok) => {
                m.with_label_values(&[&self.spec.id, "ok"]).inc();
                self.sup.on_probe_ok(Instant::now().into_std());
                if let Ok(slots) = probe.slots(url, timeout).await {
                    self.slots_free = slots.iter().filter(|s| !s.is_processing).count() as u32;
                }
                if let Ok(samples) = probe.metrics(url, timeout).await {
                    self.shared.metrics.record_engine(&self.spec.id, &samples);
                }
                self.publish();
                Ok(())
            }
            Ok(Health::Loading) => {
                m.with_label_values(&[&self.spec.id, "fail"]).inc();
                Err("engine reports it is loading".into())
            }
            Err(e) => {
                m.with_label_values(&[&self.spec.id, "fail"]).inc();
                Err(e.to_string())
            }
        }
    }

    async fn failure(&mut self, error: String) -> Next {
        self.url = None;
        let jitter = (self.shared.jitter)();
        let action = self
            .sup
            .on_failure(Instant::now().into_std(), error.clone(), jitter);
        // Consumers of the handoff file learn whether the pool comes back.
        match action {
            FailureAction::RestartAfter(_) => self.mark_handoff(PoolState::Restarting),
            FailureAction::GiveUp { .. } => self.mark_handoff(PoolState::Failed),
            FailureAction::Stop => self.retire_handoff(),
        }
        self.publish();
        match action {
            FailureAction::RestartAfter(delay) => {
                self.shared
                    .metrics
                    .engine_restarts
                    .with_label_values(&[&self.spec.id])
                    .inc();
                tracing::warn!(pool_id = %self.spec.id, %error, restart_count = self.sup.restart_count(), delay_ms = delay.as_millis() as u64, "engine failed; restarting");
                // Open for the backoff wait: its duration is the restart delay actually served.
                let _restart = tracing::info_span!(
                    "engine_restart",
                    pool_id = %self.spec.id,
                    restart_count = self.sup.restart_count(),
                    delay_ms = delay.as_millis() as u64
                );
                match self.pause(delay).await {
                    Ok(()) => Next::Start,
                    Err(next) => next,
                }
            }
            FailureAction::GiveUp { trial_after } => {
                tracing::error!(pool_id = %self.spec.id, %error, trial_in_ms = trial_after.as_millis() as u64, "engine keeps failing; circuit open, pool failed until a trial start (or a reload)");
                match self.pause(trial_after).await {
                    Ok(()) => {
                        tracing::info!(pool_id = %self.spec.id, "circuit half-open: one trial start");
                        self.sup.on_trial();
                        Next::Start
                    }
                    Err(next) => next,
                }
            }
            FailureAction::Stop => Next::Idle,
        }
    }

    /// Waits `delay` (a restart backoff, an open circuit); `Err` with what comes next when a
    /// command (reload, drain) or shutdown ends the wait first.
    async fn pause(&mut self, delay: Duration) -> Result<(), Next> {
        tokio::select! {
            _ = self.cancel.cancelled() => Err(Next::Exit),
            _ = tokio::time::sleep(delay) => Ok(()),
            cmd = next_command(&mut self.commands) => Err(match cmd {
                Command::Reload { model_path, reply } => self.reload_from_idle(model_path, reply).await,
                Command::Drain { reply, .. } => {
                    self.sup.on_stopped();
                    self.publish();
                    let _ = reply.send(Ok(()));
                    Next::Idle
                }
            }),
        }
    }

    /// `failed` or `stopped`: wait for an operator's reload (or shutdown).
    async fn idle(&mut self) -> Next {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Next::Exit,
                cmd = next_command(&mut self.commands) => match cmd {
                    Command::Reload { model_path, reply } => {
                        let next = self.reload_from_idle(model_path, reply).await;
                        if !matches!(next, Next::Idle) {
                            return next;
                        }
                    }
                    Command::Drain { reply, .. } => {
                        let _ = reply.send(Ok(()));
                    }
                }
            }
        }
    }

    fn log_tail(&self) -> String {
        let path = engine_process::logs_dir(&self.shared.config.runtime_dir)
            .join(format!("{}.log", self.spec.id));
        let text = std::fs::read(&path).unwrap_or_default();
        let start = text.len().saturating_sub(4096);
        let tail = String::from_utf8_lossy(&text[start..]);
        let last = tail
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("");
        if last.is_empty() {
            String::new()
        } else {
            let short: String = last.chars().take(240).collect();
            format!(" (last log line: {short}; log {})", path.display())
        }
    }

    fn status(&self) -> PoolStatus {
        let gpus = self.shared.gpus.read();
        let vram = crate::gpu::vram_for_mask(&gpus.gpus, self.spec.device_mask.as_deref());
        let state = self.sup.state();
        PoolStatus {
            pool_id: self.spec.id.clone(),
            node_id: self.shared.config.node_id.clone(),
            state,
            live: self.url.is_some(),
            ready: false,
            draining: false,
            slots_total: self.spec.slots,
            slots_free: self.slots_free,
            engine: "llamacpp".into(),
            engine_version: Some(self.shared.engine_version.clone()),
            model_id: self.spec.model_id.clone(),
            device_mask: self.spec.device_mask.clone(),
            ctx_max: Some(self.spec.ctx / self.spec.slots),
            vram_total_bytes: vram.map(|v| v.0),
            vram_free_bytes: vram.map(|v| v.1),
            restart_count: self.sup.restart_count(),
            last_error: self.sup.last_error().map(str::to_string),
            provisioning_mode: ProvisioningMode::Managed,
            url: self.url.clone(),
            embeddings: self.spec.embeddings,
        }
    }

    fn publish_handoff(&mut self, file: HandoffFile) {
        if let Err(error) = llorch_handoff::write_atomic(&self.shared.config.runtime_dir, &file) {
            tracing::error!(pool_id = %self.spec.id, %error, "cannot write handoff file");
        }
        self.handoff = Some(file);
    }

    /// Writes the published handoff file again when it is gone from a runtime dir that exists
    /// (removed by hand, or the dir removed and created again): a managed pool leaves through
    /// drain or shutdown, never by losing its file. A missing dir is not created here.
    fn restore_handoff(&mut self) {
        let dir = &self.shared.config.runtime_dir;
        let Some(file) = &self.handoff else { return };
        if !dir.is_dir() || llorch_handoff::path_for(dir, &self.spec.id).exists() {
            return;
        }
        match self
            .write_engine_key()
            .and_then(|()| llorch_handoff::write_atomic(dir, file))
        {
            Ok(_) => {
                tracing::warn!(pool_id = %self.spec.id, "handoff file of a serving pool is gone; writing it again");
                self.restore_failing = false;
            }
            Err(error) if !self.restore_failing => {
                tracing::error!(pool_id = %self.spec.id, %error, "handoff file of a serving pool is gone and cannot be written again; retrying at each health probe");
                self.restore_failing = true;
            }
            Err(_) => {}
        }
    }

    /// Writes the serving engine's key file (an engine without a key, none).
    fn write_engine_key(&self) -> std::io::Result<()> {
        match &self.engine_key {
            Some(key) => {
                llorch_handoff::write_key(&self.shared.config.runtime_dir, &self.spec.id, key)
            }
            None => Ok(()),
        }
    }

    /// Rewrites the published handoff file with `state` (a pool that never served has none:
    /// nothing to tell).
    fn mark_handoff(&mut self, state: PoolState) {
        if let Some(mut file) = self.handoff.take() {
            file.state = Some(state);
            self.publish_handoff(file);
        }
    }

    /// The pool is retired (drain, shutdown): its handoff file goes.
    fn retire_handoff(&mut self) {
        self.handoff = None;
        self.engine_key = None;
        llorch_handoff::remove(&self.shared.config.runtime_dir, &self.spec.id);
        llorch_handoff::remove_key(&self.shared.config.runtime_dir, &self.spec.id);
    }

    fn publish(&self) {
        self.shared.registry.write().upsert(self.status());
    }
}
