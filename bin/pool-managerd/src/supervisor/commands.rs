//! The operator's commands to a supervised pool: drain (stop taking work, wait for busy slots
//! up to the deadline, stop the engine) and reload (start the new model beside the old one,
//! switch only when it is healthy, otherwise keep the old: rollback).

use std::path::{Path, PathBuf};
use std::time::Duration;

use llorch_contracts::PoolStatus;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Next, StartError, Supervisor};
use crate::launcher::RunningEngine;
use crate::state::Command;

impl Supervisor {
    pub(super) async fn drain(
        &mut self,
        engine: Box<dyn RunningEngine>,
        deadline: Duration,
    ) -> Next {
        let url = engine.info().url.clone();
        let until = Instant::now() + deadline;
        tracing::info!(pool_id = %self.spec.id, deadline_ms = deadline.as_millis() as u64, "draining pool");
        loop {
            let busy = match self.shared.probe.slots(&url, Duration::from_secs(1)).await {
                Ok(slots) => slots.iter().filter(|s| s.is_processing).count(),
                Err(_) => 0,
            };
            if busy == 0 || Instant::now() >= until {
                if busy > 0 {
                    tracing::warn!(pool_id = %self.spec.id, busy, "drain deadline reached with requests in flight");
                }
                break;
            }
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        engine.stop(self.shared.config.shutdown_grace).await;
        self.sup.on_stopped();
        self.url = None;
        self.publish();
        if self.cancel.is_cancelled() {
            Next::Exit
        } else {
            Next::Idle
        }
    }

    /// Starts the new model beside the old one; switches only when it is healthy, otherwise
    /// keeps the old engine (rollback).
    pub(super) async fn reload(
        &mut self,
        old: Box<dyn RunningEngine>,
        model_path: PathBuf,
        reply: oneshot::Sender<Result<PoolStatus, String>>,
    ) -> Box<dyn RunningEngine> {
        let model_id = model_id_of(&model_path, &self.spec.model_id);
        tracing::info!(pool_id = %self.spec.id, model = %model_path.display(), "reloading pool");
        match self.start(&model_path, &model_id).await {
            Ok(new) => {
                self.spec.model_path = model_path;
                self.spec.model_id = model_id;
                self.became_ready(new.info());
                old.stop(self.shared.config.shutdown_grace).await;
                let _ = reply.send(Ok(self.status()));
                new
            }
            Err(StartError::Cancelled) => {
                let _ = reply.send(Err("daemon is shutting down".into()));
                old
            }
            Err(StartError::Failed(error)) => {
                tracing::warn!(pool_id = %self.spec.id, %error, "reload failed; kept the previous model");
                self.sup
                    .note_error(format!("reload failed, rolled back: {error}"));
                self.publish();
                let _ = reply.send(Err(error));
                old
            }
        }
    }

    pub(super) async fn reload_from_idle(
        &mut self,
        model_path: PathBuf,
        reply: oneshot::Sender<Result<PoolStatus, String>>,
    ) -> Next {
        let model_id = model_id_of(&model_path, &self.spec.model_id);
        self.sup.on_reload();
        self.publish();
        match self.start(&model_path, &model_id).await {
            Ok(engine) => {
                self.spec.model_path = model_path;
                self.spec.model_id = model_id;
                self.became_ready(engine.info());
                let _ = reply.send(Ok(self.status()));
                Next::Watch(engine)
            }
            Err(StartError::Cancelled) => {
                let _ = reply.send(Err("daemon is shutting down".into()));
                Next::Exit
            }
            Err(StartError::Failed(error)) => {
                let _ = reply.send(Err(error.clone()));
                Next::Failure(error)
            }
        }
    }
}

/// The next operator command. Once every sender is gone this never resolves, so a closed
/// channel cannot turn a `select!` over it into a busy loop.
pub(super) async fn next_command(commands: &mut mpsc::Receiver<Command>) -> Command {
    match commands.recv().await {
        Some(command) => command,
        None => std::future::pending().await,
    }
}

fn model_id_of(path: &Path, fallback: &str) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| fallback.to_string())
}
