//! Watches the runtime directory for handoff files: `notify` for immediate reaction, a periodic
//! rescan as a safety net (missed events, filesystems without inotify).
//!
//! - a valid file for a pool this daemon manages is its own, counted as `managed`;
//! - a valid file for any other pool (an external provisioner) registers that pool and starts a
//!   health probe of its engine; a changed file updates it; deleting the file retires it;
//! - an invalid file is logged and counted as `invalid` and changes nothing.
//!
//! Each file is processed once per distinct content (a digest), so rescans never double count.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use llamacpp_client::{EngineClient, Health};
use llorch_contracts::handoff::is_valid_pool_id;
use llorch_contracts::{HandoffFile, PoolState, PoolStatus, ProvisioningMode};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::handoff::is_handoff_path;
use crate::state::Shared;

struct Known {
    digest: u64,
    /// The pool this file registered (external pools only).
    external: Option<String>,
    /// We deleted the file ourselves after ingesting it; its absence retires nothing.
    auto_deleted: bool,
}

struct ExternalPool {
    cancel: CancellationToken,
}

pub struct HandoffWatcher {
    shared: Arc<Shared>,
    dir: PathBuf,
    known: HashMap<PathBuf, Known>,
    external: HashMap<String, ExternalPool>,
    probes: TaskTracker,
    cancel: CancellationToken,
}

impl HandoffWatcher {
    pub fn new(shared: Arc<Shared>, cancel: CancellationToken) -> Self {
        Self {
            dir: shared.config.runtime_dir.clone(),
            shared,
            known: HashMap::new(),
            external: HashMap::new(),
            probes: TaskTracker::new(),
            cancel,
        }
    }

    pub async fn run(mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                for path in event.paths {
                    let _ = tx.send(path);
                }
            }
        });
        // Keep the watcher alive for the whole loop; without it, the rescan still works.
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&self.dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(error) => {
                    tracing::warn!(%error, dir = %self.dir.display(), "cannot watch handoff directory; relying on periodic rescan");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "file watcher unavailable; relying on periodic rescan");
                None
            }
        };
        let mut rescan = tokio::time::interval(self.shared.config.handoff_rescan);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                Some(path) = rx.recv() => {
                    if is_handoff_path(&path) && path.parent() == Some(self.dir.as_path()) {
                        self.process(&path, Instant::now()).await;
                    }
                }
                _ = rescan.tick() => self.rescan().await,
            }
        }
        for (_, pool) in self.external.drain() {
            pool.cancel.cancel();
        }
        self.probes.close();
        self.probes.wait().await;
    }

    async fn rescan(&mut self) {
        let mut present = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if is_handoff_path(&path) && entry.file_type().map(|t| t.is_file()).unwrap_or(false)
                {
                    present.push(path);
                }
            }
        }
        let gone: Vec<PathBuf> = self
            .known
            .iter()
            .filter(|(p, k)| !k.auto_deleted && !present.contains(p))
            .map(|(p, _)| p.clone())
            .collect();
        for path in present.iter().chain(gone.iter()) {
            self.process(path, Instant::now()).await;
        }
    }

    async fn process(&mut self, path: &Path, seen_at: Instant) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.file_gone(path);
                return;
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read handoff file");
                return;
            }
        };
        let digest = digest(&bytes);
        if self.known.get(path).map(|k| k.digest) == Some(digest) {
            return;
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let label = if is_valid_pool_id(&stem) {
            stem.clone()
        } else {
            "_invalid".into()
        };
        let parsed = HandoffFile::parse(&bytes).and_then(|f| {
            if f.pool_id == stem {
                Ok(f)
            } else {
                Err(llorch_contracts::handoff::HandoffError::Invalid(format!(
                    "file name must be {}.json for pool_id {:?}",
                    f.pool_id, f.pool_id
                )))
            }
        });
        let file = match parsed {
            Ok(f) => f,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "ignoring invalid handoff file");
                self.count(&label, "invalid");
                // Remember the bad content so rescans do not count it again; keep whatever
                // pool an earlier valid version registered.
                let external = self.known.get(path).and_then(|k| k.external.clone());
                self.known.insert(
                    path.to_path_buf(),
                    Known {
                        digest,
                        external,
                        auto_deleted: false,
                    },
                );
                return;
            }
        };
        if self.shared.is_managed(&file.pool_id) {
            self.count(&file.pool_id, "managed");
            self.known.insert(
                path.to_path_buf(),
                Known {
                    digest,
                    external: None,
                    auto_deleted: false,
                },
            );
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
        let mut auto_deleted = false;
        if self.shared.config.auto_delete_handoff {
            match std::fs::remove_file(path) {
                Ok(()) => auto_deleted = true,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot auto-delete handoff file")
                }
            }
        }
        self.known.insert(
            path.to_path_buf(),
            Known {
                digest,
                external: Some(file.pool_id.clone()),
                auto_deleted,
            },
        );
    }

    fn file_gone(&mut self, path: &Path) {
        let Some(known) = self.known.remove(path) else {
            return;
        };
        if known.auto_deleted {
            self.known.insert(path.to_path_buf(), known);
            return;
        }
        if let Some(pool_id) = known.external {
            if let Some(pool) = self.external.remove(&pool_id) {
                pool.cancel.cancel();
            }
            self.shared.registry.write().remove(&pool_id);
            self.count(&pool_id, "retired");
            tracing::info!(%pool_id, "handoff file deleted; pool retired");
        }
    }

    async fn register_external(&mut self, file: &HandoffFile) {
        if let Some(old) = self.external.remove(&file.pool_id) {
            old.cancel.cancel();
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
        };
        let client = EngineClient::new(
            self.shared.probe_http.clone(),
            file.url.clone(),
            Duration::from_secs(1),
        );
        probe_external(&self.shared, &client, &mut status).await;
        self.shared.registry.write().upsert(status.clone());
        let cancel = self.cancel.child_token();
        self.external.insert(
            file.pool_id.clone(),
            ExternalPool {
                cancel: cancel.clone(),
            },
        );
        let shared = self.shared.clone();
        self.probes.spawn(async move {
            let mut tick = tokio::time::interval(shared.config.health_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {
                        probe_external(&shared, &client, &mut status).await;
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
async fn probe_external(shared: &Shared, client: &EngineClient, status: &mut PoolStatus) {
    let m = &shared.metrics.health_checks;
    match client.health().await {
        Ok(Health::Ok) => {
            m.with_label_values(&[&status.pool_id, "ok"]).inc();
            status.state = PoolState::Ready;
            status.live = true;
            status.last_error = None;
            status.slots_free = match client.slots().await {
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

fn digest(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
