//! CLOUD: registers this node with orchestratord (`POST /v2/nodes/register`, with its advertised
//! address, GPUs and pools), heartbeats, registers again when orchestratord forgot it (404,
//! after a restart), retries with backoff while orchestratord is down, and deregisters on
//! shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use llorch_contracts::nodes::{NodeHeartbeat, NodeRegistration};
use llorch_core::Backoff;
use tokio_util::sync::CancellationToken;

use crate::config::Registration;
use crate::state::Shared;

/// No answer came from orchestratord (connection refused, reset, timed out, TLS refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("orchestratord unreachable: {0}")]
pub(crate) struct Unreachable(pub String);

/// How this node speaks to orchestratord's node endpoints: the IO seam of registration (HTTP
/// with the token here; scripted in the in-process tests). Each answers the HTTP status, or
/// why there was none.
pub(crate) trait ControlPlane: Send + Sync + 'static {
    fn register<'a>(
        &'a self,
        body: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<u16, Unreachable>>;
    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        body: &'a NodeHeartbeat,
    ) -> BoxFuture<'a, Result<u16, Unreachable>>;
    fn deregister<'a>(&'a self, node_id: &'a str) -> BoxFuture<'a, Result<u16, Unreachable>>;
}

pub(crate) struct HttpControlPlane {
    pub http: reqwest::Client,
    pub base: String,
    pub token: auth_min::Token,
}

impl HttpControlPlane {
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<u16, Unreachable> {
        rb.bearer_auth(self.token.expose())
            .timeout(timeout)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| Unreachable(llamacpp_client::error_chain(&e)))
    }
}

impl ControlPlane for HttpControlPlane {
    fn register<'a>(
        &'a self,
        body: &'a NodeRegistration,
    ) -> BoxFuture<'a, Result<u16, Unreachable>> {
        let rb = self
            .http
            .post(format!("{}/v2/nodes/register", self.base))
            .json(body);
        self.send(rb, Duration::from_secs(5)).boxed()
    }

    fn heartbeat<'a>(
        &'a self,
        node_id: &'a str,
        body: &'a NodeHeartbeat,
    ) -> BoxFuture<'a, Result<u16, Unreachable>> {
        let rb = self
            .http
            .post(format!("{}/v2/nodes/{node_id}/heartbeat", self.base))
            .json(body);
        self.send(rb, Duration::from_secs(5)).boxed()
    }

    fn deregister<'a>(&'a self, node_id: &'a str) -> BoxFuture<'a, Result<u16, Unreachable>> {
        let rb = self
            .http
            .delete(format!("{}/v2/nodes/{node_id}", self.base));
        self.send(rb, Duration::from_secs(2)).boxed()
    }
}

/// Registers, heartbeats every interval, registers again at once after a 404, retries with
/// backoff while orchestratord is down, deregisters when `cancel` fires.
pub(crate) async fn run(
    shared: Arc<Shared>,
    reg: Registration,
    // The URL orchestratord reaches this node at.
    advertise: String,
    plane: Arc<dyn ControlPlane>,
    cancel: CancellationToken,
) {
    let node_id = shared.config.node_id.clone();
    let base = reg.orchestratord_url.clone();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut registered = false;
    loop {
        let wait = if registered {
            let body = NodeHeartbeat {
                pools: shared.pools(),
            };
            match plane.heartbeat(&node_id, &body).await {
                Ok(s) if (200..300).contains(&s) => reg.heartbeat_interval,
                Ok(404) => {
                    tracing::warn!(orchestratord = %base, "orchestratord forgot this node; registering again");
                    registered = false;
                    Duration::ZERO
                }
                Ok(status) => {
                    tracing::warn!(orchestratord = %base, status, "heartbeat refused");
                    reg.heartbeat_interval
                }
                Err(error) => {
                    tracing::warn!(orchestratord = %base, %error, "heartbeat failed");
                    reg.heartbeat_interval
                }
            }
        } else {
            let body = NodeRegistration {
                node_id: node_id.clone(),
                address: advertise.clone(),
                gpus: shared.gpus.read().gpus.clone(),
                pools: shared.pools(),
            };
            match plane.register(&body).await {
                Ok(s) if (200..300).contains(&s) => {
                    tracing::info!(orchestratord = %base, %advertise, "registered with orchestratord");
                    registered = true;
                    backoff.reset();
                    reg.heartbeat_interval
                }
                Ok(status) => {
                    let delay = backoff.next_delay((shared.jitter)());
                    tracing::warn!(orchestratord = %base, status, retry_ms = delay.as_millis() as u64, "registration refused");
                    delay
                }
                Err(error) => {
                    let delay = backoff.next_delay((shared.jitter)());
                    tracing::warn!(orchestratord = %base, %error, retry_ms = delay.as_millis() as u64, "orchestratord unreachable; will retry registration");
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
        match plane.deregister(&node_id).await {
            Ok(s) if (200..300).contains(&s) => {
                tracing::info!(orchestratord = %base, "deregistered from orchestratord")
            }
            Ok(status) => tracing::warn!(status, "deregistration refused"),
            Err(error) => tracing::warn!(%error, "deregistration failed"),
        }
    }
}
