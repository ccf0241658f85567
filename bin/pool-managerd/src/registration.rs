//! CLOUD: registers this node with orchestratord (`POST /v2/nodes/register`, with its advertised
//! address, GPUs and pools), heartbeats, registers again when orchestratord forgot it (404,
//! after a restart), retries with backoff while orchestratord is down, and deregisters on
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::nodes::{NodeHeartbeat, NodeRegistration};
use llorch_core::Backoff;
use tokio_util::sync::CancellationToken;

use crate::config::Registration;
use crate::state::Shared;

pub async fn run(shared: Arc<Shared>, reg: Registration, cancel: CancellationToken) {
    let Some(token) = shared.config.token.clone() else {
        return; // config validation guarantees a token; nothing to do without one
    };
    let http = shared.probe_http.clone();
    let node_id = shared.config.node_id.clone();
    let base = reg.orchestratord_url.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut registered = false;
    loop {
        let wait = if registered {
            let body = NodeHeartbeat {
                pools: shared.pools(),
            };
            let r = http
                .post(format!("{base}/v2/nodes/{node_id}/heartbeat"))
                .bearer_auth(token.expose())
                .timeout(Duration::from_secs(5))
                .json(&body)
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => reg.heartbeat_interval,
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    tracing::warn!(orchestratord = %base, "orchestratord forgot this node; registering again");
                    registered = false;
                    Duration::ZERO
                }
                Ok(r) => {
                    tracing::warn!(orchestratord = %base, status = %r.status(), "heartbeat refused");
                    reg.heartbeat_interval
                }
                Err(e) => {
                    tracing::warn!(orchestratord = %base, error = %llamacpp_client::error_chain(&e), "heartbeat failed");
                    reg.heartbeat_interval
                }
            }
        } else {
            let gpus = shared.gpus.read().gpus.clone();
            let body = NodeRegistration {
                node_id: node_id.clone(),
                address: reg.advertise_url.clone(),
                gpus,
                pools: shared.pools(),
            };
            let r = http
                .post(format!("{base}/v2/nodes/register"))
                .bearer_auth(token.expose())
                .timeout(Duration::from_secs(5))
                .json(&body)
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(orchestratord = %base, advertise = %reg.advertise_url, "registered with orchestratord");
                    registered = true;
                    backoff.reset();
                    reg.heartbeat_interval
                }
                Ok(r) => {
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(orchestratord = %base, status = %r.status(), retry_ms = delay.as_millis() as u64, "registration refused");
                    delay
                }
                Err(e) => {
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(orchestratord = %base, error = %llamacpp_client::error_chain(&e), retry_ms = delay.as_millis() as u64, "orchestratord unreachable; will retry registration");
                    delay
                }
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if registered {
        let r = http
            .delete(format!("{base}/v2/nodes/{node_id}"))
            .bearer_auth(token.expose())
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() => {
                tracing::info!(orchestratord = %base, "deregistered from orchestratord")
            }
            Ok(r) => tracing::warn!(status = %r.status(), "deregistration refused"),
            Err(e) => {
                tracing::warn!(error = %llamacpp_client::error_chain(&e), "deregistration failed")
            }
        }
    }
}
