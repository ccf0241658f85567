//! Ingests handoff files of the runtime directory (events from `llorch_handoff::watch_dir`):
//!
//! - a valid file for a pool this daemon manages is its own, counted as `managed`;
//! - a valid file for any other pool (an external provisioner) registers that pool and starts a
//!   health probe of its engine; a changed file updates it; deleting the file retires it;
//! - an invalid file is logged and counted as `invalid` and changes nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llamacpp_client::Health;
use llorch_contracts::{HandoffFile, PoolState, PoolStatus, ProvisioningMode};
use llorch_handoff::HandoffEvent;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::Shared;

pub struct HandoffWatcher {
    shared: Arc<Shared>,
    /// Pool registered by each handoff file path (external pools only).
    registered_by: HashMap<PathBuf, String>,
    /// Paths we deleted ourselves after ingesting (auto-delete): their removal retires nothing.
    auto_deleted: HashSet<PathBuf>,
    /// Probe task of each external pool, by pool id.
    external: HashMap<String, CancellationToken>,
    probes: TaskTracker,
    cancel: CancellationToken,
}

impl HandoffWatcher {
    pub fn new(shared: Arc<Shared>, cancel: CancellationToken) -> Self {
        Self {
            shared,
            registered_by: HashMap::new(),
            auto_deleted: HashSet::new(),
            external: HashMap::new(),
            probes: TaskTracker::new(),
            cancel,
        }
    }

    pub async fn run(mut self) {
        let (mut events, watcher) = llorch_handoff::watch_dir_with(
            self.shared.config.runtime_dir.clone(),
            self.shared.config.handoff_rescan,
            self.shared.config.handoff_notify,
            self.cancel.child_token(),
        );
        while let Some(event) = events.recv().await {
            match event {
                HandoffEvent::Upserted {
                    path,
                    file,
                    seen_at,
                } => {
                    let span = tracing::info_span!("handoff_processing", pool_id = %file.pool_id);
                    tracing::Instrument::instrument(self.upserted(&path, file, seen_at), span).await
                }
                HandoffEvent::Invalid { path, label, error } => {
                    tracing::warn!(path = %path.display(), %error, "ignoring invalid handoff file");
                    self.count(&label, "invalid");
                }
                HandoffEvent::Removed { path, .. } => self.removed(&path),
            }
        }
        let _ = watcher.await;
        for (_, pool) in self.external.drain() {
            pool.cancel();
        }
        self.probes.close();
        self.probes.wait().await;
    }

    async fn upserted(&mut self, path: &Path, file: HandoffFile, seen_at: Instant) {
        self.auto_deleted.remove(path);
        if self.shared.is_managed(&file.pool_id) {
            self.count(&file.pool_id, "managed");
            return;
        }
        let outcome = if self.external.contains_key(&file.pool_id) {
            "updated"
        } else {
            "registered"
        };
        self.register_external(&file).await;
        self.count(&file.pool_id, outcome);
        self.shared
            .metrics
            .handoff_duration_ms
            .with_label_values(&[&file.pool_id])
            .observe(seen_at.elapsed().as_secs_f64() * 1000.0);
        tracing::info!(pool_id = %file.pool_id, url = %file.url, outcome, "handoff file ingested");
        self.registered_by
            .insert(path.to_path_buf(), file.pool_id.clone());
        if self.shared.config.auto_delete_handoff {
            match std::fs::remove_file(path) {
                Ok(()) => {
                    self.auto_deleted.insert(path.to_path_buf());
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot auto-delete handoff file")
                }
            }
        }
    }

    fn removed(&mut self, path: &Path) {
        if self.auto_deleted.contains(path) {
            return;
        }
        let Some(pool_id) = self.registered_by.remove(path) else {
            return;
        };
        if let Some(pool) = self.external.remove(&pool_id) {
            pool.cancel();
        }
        self.shared.registry.write().remove(&pool_id);
        self.count(&pool_id, "retired");
        tracing::info!(%pool_id, "handoff file deleted; pool retired");
    }

    async fn register_external(&mut self, file: &HandoffFile) {
        if let Some(old) = self.external.remove(&file.pool_id) {
            old.cancel();
        }
        let mut status = PoolStatus {
            pool_id: file.pool_id.clone(),
            node_id: self.shared.config.node_id.clone(),
            state: PoolState::Starting,
            live: false,
            ready: false,
            draining: false,
            slots_total: file.slots_total,
            slots_free: 0,
            engine: file.engine.clone(),
            engine_version: file.engine_version.clone(),
            model_id: file.model.id.clone(),
            device_mask: file.device_mask.clone(),
            ctx_max: file.ctx_max,
            vram_total_bytes: None,
            vram_free_bytes: None,
            restart_count: 0,
            last_error: None,
            provisioning_mode: ProvisioningMode::External,
            url: Some(file.url.clone()),
            embeddings: file.embeddings,
        };
        probe_external(&self.shared, &mut status).await;
        self.shared.registry.write().upsert(status.clone());
        let cancel = self.cancel.child_token();
        self.external.insert(file.pool_id.clone(), cancel.clone());
        let shared = self.shared.clone();
        self.probes.spawn(async move {
            let mut tick = tokio::time::interval(shared.config.health_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        probe_external(&shared, &mut status).await;
                        if cancel.is_cancelled() {
                            break;
                        }
                        let pool_id = status.pool_id.clone();
                        let snapshot = status.clone();
                        shared.registry.write().update(&pool_id, |p| *p = snapshot);
                    }
                }
            }
        });
    }

    fn count(&self, pool_id: &str, outcome: &str) {
        self.shared
            .metrics
            .handoff_processed
            .with_label_values(&[pool_id, outcome])
            .inc();
    }
}

/// One health (+ slots) probe of an external engine, applied to its status.
async fn probe_external(shared: &Shared, status: &mut PoolStatus) {
    let m = &shared.metrics.health_checks;
    let Some(url) = status.url.clone() else {
        return;
    };
    let timeout = Duration::from_secs(1);
    match shared.probe.health(&url, timeout).await {
        Ok(Health::Ok) => {
            m.with_label_values(&[&status.pool_id, "ok"]).inc();
            status.state = PoolState::Ready;
            status.live = true;
            status.last_error = None;
            status.slots_free = match shared.probe.slots(&url, timeout).await {
                Ok(slots) => slots.iter().filter(|s| !s.is_processing).count() as u32,
                Err(_) => status.slots_total,
            };
        }
        Ok(Health::Loading) => {
            m.with_label_values(&[&status.pool_id, "fail"]).inc();
            status.state = PoolState::Starting;
            status.last_error = Some("engine is loading".into());
        }
        Err(e) => {
            m.with_label_values(&[&status.pool_id, "fail"]).inc();
            status.state = PoolState::Failed;
            status.last_error = Some(format!("health probe failed: {e}"));
        }
    }
}
