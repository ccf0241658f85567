//! pool-managerd: the GPU-node daemon (DESIGN §4). `run` wires config → state → tasks → HTTP,
//! and owns every task it starts: one root cancellation token, one tracker, drain with a
//! deadline.

mod api;
pub mod config;
mod engine_binary;
mod engine_process;
#[allow(dead_code)] // models on demand (issue 27): not wired into the supervisor yet
mod footprint;
mod gpu;
mod handoff_watcher;
mod launcher;
mod metrics;
mod pools_file;
mod proxy;
mod registration;
mod state;
mod supervisor;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use llorch_core::Registry;
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::state::Shared;

/// Runs the daemon until `shutdown` resolves, then stops every engine and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let engine_binary = if config.pools.is_empty() {
        engine_binary::find(config.engine_binary.as_deref()).ok()
    } else {
        Some(engine_binary::find(config.engine_binary.as_deref())?)
    };
    let engine_version = match &engine_binary {
        Some(b) => engine_binary::version(b).await,
        None => "unknown".into(),
    };
    std::fs::create_dir_all(&config.runtime_dir)
        .with_context(|| format!("cannot create runtime dir {}", config.runtime_dir.display()))?;

    let killed = engine_process::kill_orphans(&config.runtime_dir, config.shutdown_grace).await;
    if !killed.is_empty() {
        tracing::warn!(
            count = killed.len(),
            "killed engines left behind by a previous run"
        );
    }
    // Handoff files of our pools point at engines that no longer exist.
    for pool in &config.pools {
        llorch_handoff::remove(&config.runtime_dir, &pool.id);
    }

    let listener = tokio::net::TcpListener::bind(config.bind_addr)
        .await
        .with_context(|| {
            format!(
                "cannot bind {} (is another pool-managerd running?)",
                config.bind_addr
            )
        })?;
    let metrics_listener = llorch_http::metrics_port::bind(config.metrics_addr).await?;

    let discovery = tokio::task::spawn_blocking(gpu::discover).await?;
    match &discovery.reason {
        None => tracing::info!(gpus = discovery.gpus.len(), "GPUs discovered through NVML"),
        Some(reason) => tracing::info!(%reason, "no GPU discovered; this is a CPU-only node"),
    }

    let mut supervisors = HashMap::new();
    let mut receivers = Vec::new();
    for pool in &config.pools {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        supervisors.insert(pool.id.clone(), tx);
        receivers.push((pool.clone(), rx));
    }
    let probe_http = llorch_http::tls::outbound()
        .connect_timeout(Duration::from_secs(1))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()?;
    let proxy_http = llorch_http::tls::outbound()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(2))
        .build()?;
    let engine_keys = Arc::new(launcher::EngineKeys::default());
    let shared = Arc::new(Shared {
        engine_binary,
        engine_version,
        registry: RwLock::new(Registry::new()),
        metrics: metrics::Metrics::new()?,
        launcher: Arc::new(launcher::ProcessLauncher {
            keys: engine_keys.clone(),
        }),
        probe: Arc::new(launcher::HttpProbe {
            http: probe_http,
            keys: engine_keys.clone(),
        }),
        engine_keys,
        jitter: rand::random,
        proxy_http,
        proxy_fresh: llamacpp_client::fresh_connection_client()?,
        gpus: RwLock::new(discovery),
        supervisors,
        config,
    });

    for pool in &shared.config.pools {
        shared.metrics.init_pool(&pool.id);
    }
    let root = CancellationToken::new();
    let tasks = TaskTracker::new();
    for (spec, rx) in receivers {
        let sup = supervisor::Supervisor::new(shared.clone(), spec, rx, root.child_token());
        tasks.spawn(sup.run());
    }
    tasks.spawn(handoff_watcher::HandoffWatcher::new(shared.clone(), root.child_token()).run());
    // The bound address (the port the kernel chose, when configured as 0).
    let local = listener.local_addr().unwrap_or(shared.config.bind_addr);
    if let Some(reg) = shared.config.registration.clone() {
        let scheme = if shared.config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let advertise = reg
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{local}"));
        let plane = Arc::new(registration::HttpControlPlane {
            http: shared
                .config
                .client_tls
                .builder()
                .connect_timeout(Duration::from_secs(1))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
            base: reg.orchestratord_url.clone(),
            token: reg.token.clone(),
        });
        tasks.spawn(registration::run(
            shared.clone(),
            reg,
            advertise,
            plane,
            root.child_token(),
        ));
    }
    if !shared.config.gpu_discovery_interval.is_zero() && shared.gpus.read().mode == "nvml" {
        tasks.spawn(refresh_gpus(shared.clone(), root.child_token()));
    }

    let token_fp = shared
        .config
        .token
        .as_ref()
        .map(|t| t.fingerprint().to_string());
    tracing::info!(
        addr = %local,
        node_id = %shared.config.node_id,
        pools = shared.config.pools.len(),
        auth = token_fp.as_deref().unwrap_or("none (loopback only)"),
        tls = if shared.config.tls.is_some() { "on" } else { "off" },
        "pool-managerd listening"
    );
    if shared.config.token.is_some() && !shared.config.own_token && !local.ip().is_loopback() {
        tracing::warn!("this node takes the node token every node holds: any of them can drain, reload and use this node's engines; give it its own (POOL_MANAGERD_REGISTRATION_TOKEN, and its line in orchestratord's ORCHD_NODE_TOKENS_FILE; docs/SECURITY.md)");
    }
    let app = api::router(shared.clone());
    let server_cancel = root.child_token();
    let limits = shared.config.conn_limits;
    let tls = shared.config.tls.clone();
    if let Some(tls) = tls.clone() {
        tasks.spawn(llorch_http::reload_on_sighup(
            vec![("TLS", llorch_http::tls_reload(tls))],
            root.child_token(),
        ));
    }
    if let Some(listener) = metrics_listener {
        tasks.spawn(llorch_http::metrics_port::serve(
            listener,
            app.clone(),
            limits,
            tls.clone(),
            root.child_token().cancelled_owned(),
        ));
    }
    let server = tokio::spawn(async move {
        llorch_http::serve(listener, app, limits, tls, server_cancel.cancelled_owned()).await
    });

    shutdown.await;
    tracing::info!("shutting down: stopping engines");
    root.cancel();
    tasks.close();
    let grace = shared.config.shutdown_grace + Duration::from_secs(2);
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        tracing::error!("engines did not stop within the grace period");
    }
    // Open proxy streams end when their engines are gone; do not wait on them forever.
    match tokio::time::timeout(Duration::from_secs(2), server).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(error)) => tracing::error!(%error, "HTTP server task failed"),
    }
    tracing::info!("pool-managerd stopped");
    Ok(())
}

async fn refresh_gpus(shared: Arc<Shared>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(shared.config.gpu_discovery_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                if let Ok(d) = tokio::task::spawn_blocking(gpu::discover).await {
                    *shared.gpus.write() = d;
                }
            }
        }
    }
}
