//! orchestratord (DESIGN §1, §3): admits tasks, queues them by priority, places them on ready
//! pools and streams tokens over SSE. `run` wires config → state → tasks → HTTP and owns every
//! task it starts.

mod activity;
mod admission;
mod api;
mod cloud_source;
pub mod config;
mod dispatcher;
mod engine;
mod home_source;
mod job;
pub mod journal;
mod limits;
mod metrics;
mod openai;
mod overview;
mod pools;
mod recovery;
mod retention;
mod runner;
mod sse;
mod state;
mod task_map;
mod tasks;
#[cfg(test)]
mod tests;
mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::state::Orchestrator;

/// Runs until `shutdown` resolves; then stops admitting, lets running tasks finish within the
/// grace period, ends the rest with an error event, and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.bind_addr)
        .await
        .with_context(|| {
            format!(
                "cannot bind {} (is another orchestratord running?)",
                config.bind_addr
            )
        })?;
    // ORCHD_NODE_BIND_ADDR: the node routes on a listener of their own.
    let node_listener = match config.node_bind_addr {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind ORCHD_NODE_BIND_ADDR {addr}"))?,
        ),
        None => None,
    };
    // ORCHD_METRICS_PORT: /metrics alone on a second port.
    let metrics_listener = llorch_http::metrics_port::bind(config.metrics_addr).await?;
    let metrics = Arc::new(metrics::Metrics::new()?);
    let engine = Arc::new(engine::HttpEngine::new(&config.client_tls)?);
    let orch = Arc::new(Orchestrator::new(config, metrics.clone(), engine)?);
    let root = CancellationToken::new();
    let background = TaskTracker::new();
    // Before anything is placed or served: every task a crash interrupted is known again.
    let recovered = recovery::recover(&orch, &root).map_err(anyhow::Error::msg)?;
    if orch.journal.durable() {
        tracing::info!(
            requeued = recovered.requeued,
            reset = recovered.reset,
            restored = recovered.restored,
            expired = recovered.expired,
            unreadable = recovered.unreadable,
            "journal replayed"
        );
    }

    match (orch.config.profile, orch.config.token.clone()) {
        (config::Profile::Home, _) => {
            let source = home_source::HomeSource {
                pools: orch.pools.clone(),
                metrics,
                engine: orch.engine.clone(),
                dir: orch.config.runtime_dir.clone(),
                rescan: orch.config.handoff_rescan,
                notify: orch.config.handoff_notify,
                probe_interval: orch.config.pool_health_interval,
                manager: Some(home_source::Manager {
                    url: orch.config.pool_manager_url.clone(),
                    api: Arc::new(cloud_source::HttpNodes {
                        http: orch
                            .config
                            .client_tls
                            .builder()
                            .connect_timeout(Duration::from_secs(1))
                            .build()?,
                    }),
                    credential: orch.config.token.clone(),
                }),
            };
            background.spawn(source.run(root.child_token()));
        }
        (config::Profile::Cloud, Some(_)) => {
            if orch.config.node_credentials.per_node.is_empty() {
                tracing::warn!("every node is reached with the one shared node token: a node holding it can drain, reload and use any other node's engines; give each node its own (ORCHD_NODE_TOKENS_FILE here, POOL_MANAGERD_REGISTRATION_TOKEN there; docs/SECURITY.md)");
            }
            // No handoff watcher: in the cloud profile this process opens no pool-managerd path.
            let source = cloud_source::CloudSource {
                metrics,
                managers: orch.managers.clone(),
                pools: orch.pools.clone(),
                nodes: Arc::new(cloud_source::HttpNodes {
                    http: orch
                        .config
                        .client_tls
                        .builder()
                        .connect_timeout(Duration::from_secs(1))
                        .pool_idle_timeout(Duration::from_secs(5))
                        .build()?,
                }),
                interval: orch.config.pool_poll_interval,
                recovery: orch.config.pool_poll_recovery,
                heartbeat_timeout: orch.config.node_heartbeat_timeout,
                node_door: orch.node_door.clone(),
            };
            background.spawn(source.run(root.child_token()));
        }
        (config::Profile::Cloud, None) => anyhow::bail!("the cloud profile needs a token"),
    }
    background.spawn(dispatcher::run(orch.clone(), root.child_token()));
    background.spawn(retention::run(orch.clone(), root.child_token()));

    let token_fp = orch
        .config
        .token
        .as_ref()
        .map(|t| t.fingerprint().to_string());
    // The bound address (the port the kernel chose, when configured as 0).
    let local = listener.local_addr().unwrap_or(orch.config.bind_addr);
    tracing::info!(
        addr = %local,
        profile = orch.config.profile.as_str(),
        policy = orch.config.admission_policy.label(),
        capacity = orch.config.admission_capacity,
        auth = token_fp.as_deref().unwrap_or("none (loopback only)"),
        tls = match &orch.config.tls {
            None => "off",
            Some(t) if t.mutual() => "on, node certificates required",
            Some(_) => "on",
        },
        "orchestratord listening"
    );
    let keys = orch.config.keys.as_ref().map_or(0, |k| {
        k.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    });
    tracing::info!(keys, "keys loaded (names only are ever logged)");
    if orch.config.tls.is_none()
        && orch.config.profile == config::Profile::Cloud
        && !local.ip().is_loopback()
    {
        tracing::warn!("serving plain HTTP on a network address: tokens and prompts cross the network in clear text; set ORCHD_TLS_CERT_FILE and ORCHD_TLS_KEY_FILE (docs/SECURITY.md)");
    }
    if orch.config.one_token_for_all && orch.config.profile == config::Profile::Cloud {
        tracing::warn!("LLORCH_API_TOKEN is client, admin and node credential at once: any client could register a node or drain a pool; set ORCHD_API_KEYS_FILE, LLORCH_ADMIN_TOKEN and LLORCH_NODE_TOKEN to separate them");
    }
    let mut reloads: Vec<(&'static str, llorch_http::Reload)> = Vec::new();
    if let Some(path) = orch.config.api_keys_file.clone() {
        let keys = orch.config.keys.clone();
        reloads.push((
            "client keys",
            Box::new(move || {
                config::reload_client_keys(&keys, &path)
                    .map(|n| format!("{n} client keys reloaded from {}", path.display()))
                    .map_err(|e| e.to_string())
            }),
        ));
    }
    if let Some(tls) = orch.config.tls.clone() {
        reloads.push(("TLS", llorch_http::tls_reload(tls)));
    }
    background.spawn(llorch_http::reload_on_sighup(reloads, root.child_token()));
    let app = api::router(orch.clone());
    if let Some(listener) = metrics_listener {
        background.spawn(llorch_http::metrics_port::serve(
            listener,
            app.clone(),
            orch.config.conn_limits,
            orch.config.tls.clone(),
            root.child_token().cancelled_owned(),
        ));
    }
    if let Some(listener) = node_listener {
        tracing::info!(addr = %listener.local_addr().unwrap_or(local), "node routes listening");
        background.spawn(llorch_http::serve_watched(
            listener,
            api::node_router(orch.clone()),
            orch.config.conn_limits,
            orch.config.tls.clone(),
            root.child_token().cancelled_owned(),
            orch.node_door.clone(),
        ));
    }
    let server_stop = CancellationToken::new();
    let server = tokio::spawn({
        let stop = server_stop.clone();
        let limits = orch.config.conn_limits;
        let tls = orch.config.tls.clone();
        // Heartbeats come in here unless the node routes have a listener of their own.
        let door = match orch.config.node_bind_addr {
            Some(_) => Arc::default(),
            None => orch.node_door.clone(),
        };
        async move {
            llorch_http::serve_watched(listener, app, limits, tls, stop.cancelled_owned(), door)
                .await
        }
    });

    shutdown.await;
    tracing::info!("shutting down: no new tasks; letting running tasks finish");
    orch.stop_admitting();
    orch.runners.close();
    if tokio::time::timeout(orch.config.shutdown_grace, orch.runners.wait())
        .await
        .is_err()
    {
        tracing::warn!("running tasks did not finish within the grace period; ending them");
        orch.cancel_running();
        let _ = tokio::time::timeout(Duration::from_secs(5), orch.runners.wait()).await;
    }
    root.cancel();
    background.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), background.wait()).await;
    // Endings still being journaled reach the journal (and their frames) before the end.
    orch.finishing.close();
    let _ = tokio::time::timeout(orch.config.journal_timeout, orch.finishing.wait()).await;
    // Every stream has its terminal event now; open SSE connections end on their own.
    server_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(error)) => tracing::error!(%error, "HTTP server task failed"),
    }
    tracing::info!("orchestratord stopped");
    Ok(())
}
