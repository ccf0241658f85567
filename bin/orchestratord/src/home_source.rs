//! HOME profile pool source: the handoff directory (`ORCHD_RUNTIME_DIR`). A handoff file binds
//! its pool to the engine URL it names; the engine's `/health` is probed at once and then
//! periodically; an unhealthy engine makes the pool unready, a deleted file unbinds it. At each
//! probe round the local pool-managerd's pool list (`ORCHD_POOL_MANAGER_URL`) adds what a
//! handoff file cannot carry: the pools' free GPU memory, for placement's tie-break.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use llamacpp_client::Health;
use llorch_contracts::HandoffFile;
use llorch_handoff::HandoffEvent;
use tokio_util::sync::CancellationToken;

use crate::cloud_source::NodeApi;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::pools::{PoolEntry, PoolPhase, PoolTable};

pub(crate) struct HomeSource {
    pub pools: Arc<PoolTable>,
    pub metrics: Arc<Metrics>,
    pub engine: Arc<dyn Engine>,
    pub dir: std::path::PathBuf,
    pub rescan: Duration,
    /// Kernel file events besides the rescan (ORCHD_HANDOFF_NOTIFY).
    pub notify: bool,
    pub probe_interval: Duration,
    /// The local pool-managerd, read for GPU memory figures (none: no figures).
    pub manager: Option<Manager>,
}

pub(crate) struct Manager {
    pub url: String,
    pub api: Arc<dyn NodeApi>,
    /// What it is presented (the node token).
    pub credential: Option<auth_min::Token>,
}

impl HomeSource {
    pub async fn run(self, cancel: CancellationToken) {
        let (mut events, watcher) = llorch_handoff::watch_dir_with(
            self.dir.clone(),
            self.rescan,
            self.notify,
            cancel.child_token(),
        );
        let mut probe = tokio::time::interval(self.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = events.recv() => match event {
                    Some(HandoffEvent::Upserted { file, .. }) => self.bind(file).await,
                    Some(HandoffEvent::Invalid { path, error, .. }) => {
                        tracing::warn!(path = %path.display(), %error, "ignoring invalid handoff file");
                    }
                    Some(HandoffEvent::Removed { path, .. }) => {
                        let pool_id = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                        if self.pools.remove(&pool_id).is_some() {
                            tracing::info!(%pool_id, "handoff file deleted; pool unbound");
                        }
                    }
                    None => break,
                },
                _ = probe.tick() => {
                    self.probe_all().await;
                    self.read_vram().await;
                }
            }
        }
        let _ = watcher.await;
    }

    /// The API key pool-managerd wrote for the pool's engine (none for an external engine, or
    /// a key file that fails its checks: logged, and the engine will refuse us).
    fn engine_key(&self, pool_id: &str) -> Option<auth_min::Token> {
        match llorch_handoff::read_key(&self.dir, pool_id) {
            Ok(key) => key.and_then(|k| auth_min::Token::new(&k).ok()),
            Err(error) => {
                tracing::warn!(%pool_id, %error, "engine key file refused; requests go without a key");
                None
            }
        }
    }

    async fn bind(&self, file: HandoffFile) {
        let phase = PoolPhase::of(file.state);
        let entry = PoolEntry {
            pool_id: file.pool_id.clone(),
            model_id: file.model.id.clone(),
            url: file.url.trim_end_matches('/').to_string(),
            slots_total: file.slots_total,
            ctx_max: file.ctx_max,
            engine: file.engine.clone(),
            engine_version: file.engine_version.clone(),
            node_id: None,
            device_mask: file.device_mask.clone(),
            healthy: false,
            draining: false,
            last_error: None,
            in_flight: 0,
            manager: None,
            credential: self.engine_key(&file.pool_id),
            lost: Default::default(),
            phase,
            restarting_since: None,
            // Figures come from pool-managerd, not the file: keep the last ones.
            vram_free_bytes: self
                .pools
                .get(&file.pool_id)
                .and_then(|p| p.vram_free_bytes),
            embeddings: file.embeddings,
            ejection: Default::default(),
        };
        if phase != PoolPhase::Serving {
            // Its engine is gone: nothing to probe until the file says it serves again.
            let error = format!("engine {}", phase.as_str());
            self.pools.upsert(PoolEntry {
                last_error: Some(error),
                ..entry
            });
            tracing::info!(pool_id = %file.pool_id, phase = phase.as_str(), "pool not serving (handoff file)");
            return;
        }
        let (healthy, error) = self.probe_one(&entry.pool_id, &entry.url).await;
        self.pools.upsert(PoolEntry {
            healthy,
            last_error: error,
            ..entry
        });
        tracing::info!(pool_id = %file.pool_id, url = %file.url, healthy, "pool bound from handoff file");
    }

    async fn probe_one(&self, pool_id: &str, url: &str) -> (bool, Option<String>) {
        let span = tracing::info_span!("pool_health_check", pool_id);
        tracing::Instrument::instrument(self.probe_engine(pool_id, url), span).await
    }

    async fn probe_engine(&self, pool_id: &str, url: &str) -> (bool, Option<String>) {
        let started = std::time::Instant::now();
        let result = self
            .engine
            .health(url, self.probe_interval.min(Duration::from_secs(2)))
            .await;
        self.metrics
            .pool_health_check_ms
            .with_label_values(&[pool_id])
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        let outcome = if matches!(result, Ok(Health::Ok)) {
            "ok"
        } else {
            "fail"
        };
        self.metrics
            .pool_health_checks
            .with_label_values(&[pool_id, outcome])
            .inc();
        match result {
            Ok(Health::Ok) => (true, None),
            Ok(Health::Loading) => (false, Some("engine is loading".into())),
            Err(e) => (false, Some(e.to_string())),
        }
    }

    /// Free GPU memory of each pool as the local pool-managerd reports it. Best effort: an
    /// unreachable pool-managerd (or one on a CPU-only node) leaves the figures as they are.
    async fn read_vram(&self) {
        let Some(manager) = &self.manager else { return };
        let timeout = self.probe_interval.min(Duration::from_secs(2));
        let read = tokio::time::timeout(
            timeout,
            manager.api.pools(
                &manager.url,
                manager.credential.as_ref().map(auth_min::Token::expose),
                reqwest::header::HeaderMap::new(),
            ),
        )
        .await;
        match read {
            Ok(Ok(resp)) => {
                self.pools.reports.replace(&manager.url, &resp.pools);
                for p in resp.pools {
                    self.pools.set_vram_free(&p.pool_id, p.vram_free_bytes);
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "pool-managerd's pool list unavailable; GPU memory figures unchanged")
            }
            Err(_) => tracing::debug!(
                "pool-managerd's pool list not read in time; GPU memory figures unchanged"
            ),
        }
    }

    async fn probe_all(&self) {
        let pools: Vec<PoolEntry> = self
            .pools
            .list()
            .into_iter()
            .filter(|p| p.phase == PoolPhase::Serving)
            .collect();
        let results = join_all(pools.iter().map(|p| self.probe_one(&p.pool_id, &p.url))).await;
        for (p, (healthy, error)) in pools.iter().zip(results) {
            if p.healthy && !healthy {
                tracing::warn!(pool_id = %p.pool_id, error = error.as_deref().unwrap_or(""), "pool engine unhealthy; not placing work on it");
            }
            self.pools.set_health(&p.pool_id, healthy, error);
        }
    }
}
