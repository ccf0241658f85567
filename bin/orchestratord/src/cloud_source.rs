//! CLOUD profile pool source: polls `GET /v2/pools` of every pool-managerd (configured in
//! `ORCHD_POOL_MANAGERS`, or registered through `/v2/nodes/register`) with the token, a
//! timeout and pooled connections. A manager that fails one poll (error, timeout, 401) is
//! unavailable at once — within two intervals of going away — and its pools are lost
//! (running tasks there end now); it is used again only after `ORCHD_POOL_POLL_RECOVERY`
//! consecutive good polls. A registered node that misses heartbeats is offline.
//! Never touches any file: pool-managerd is reached over HTTP only.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join_all, BoxFuture};
use futures_util::FutureExt;
use llorch_contracts::meta::Availability;
use llorch_contracts::{GpuInfo, PoolsResponse};
use parking_lot::RwLock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pools::{PoolEntry, PoolPhase, PoolTable};

#[derive(Debug, Clone)]
pub struct Manager {
    pub url: String,
    pub node_id: Option<String>,
    /// Came through `/v2/nodes/register` (and is expected to heartbeat).
    pub registered: bool,
    /// Its id was given by the operator (`ORCHD_POOL_MANAGERS=id=url`) or by an authenticated
    /// registration, not learned from its own polls: only such an id picks a credential.
    fixed_id: bool,
    /// What orchestratord presents to it (polls, the engine proxy, drain, reload): the node's
    /// own token (ORCHD_NODE_TOKENS_FILE) when its id has one, else the shared node token.
    pub credential: Option<auth_min::Token>,
    pub availability: Availability,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub last_error: Option<String>,
    pub last_heartbeat: Option<Instant>,
    pub gpus: Vec<GpuInfo>,
    /// Pools this manager reported at its last good poll.
    pub pools: BTreeSet<String>,
    /// Pool ids it reports that another manager already serves (logged once, when they
    /// start to conflict).
    conflicting: BTreeSet<String>,
    /// Pools it reports that fail validation (ignored; logged once, when they appear).
    invalid: BTreeSet<String>,
}

impl Manager {
    fn new(
        url: String,
        registered: bool,
        node_id: Option<String>,
        credential: Option<auth_min::Token>,
    ) -> Self {
        Self {
            url,
            fixed_id: node_id.is_some(),
            node_id,
            credential,
            registered,
            availability: Availability::Unknown,
            invalid: BTreeSet::new(),
            consecutive_ok: 0,
            consecutive_fail: 0,
            last_error: None,
            last_heartbeat: None,
            gpus: Vec::new(),
            pools: BTreeSet::new(),
            conflicting: BTreeSet::new(),
        }
    }
}

/// Why a registration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterRefused {
    #[error("this address belongs to {holder}; it is free again once that holder deregisters or is lost")]
    AddressHeld { holder: String },
    #[error("{max} nodes are registered already (ORCHD_MAX_NODES)")]
    Full { max: usize },
}

/// The credentials orchestratord presents to nodes: each node's own token by its id, else the
/// one shared node token.
#[derive(Debug, Clone, Default)]
pub struct NodeCredentials {
    pub per_node: BTreeMap<String, auth_min::Token>,
    pub shared: Option<auth_min::Token>,
}

impl NodeCredentials {
    /// What to present to the node `node_id` (an id the operator gave or a registration
    /// proved; `None`: a manager known by its address only).
    pub fn for_node(&self, node_id: Option<&str>) -> Option<auth_min::Token> {
        node_id
            .and_then(|id| self.per_node.get(id))
            .or(self.shared.as_ref())
            .cloned()
    }
}

/// The poll set, shared with the node-registration endpoints.
pub struct Managers {
    inner: RwLock<BTreeMap<String, Manager>>,
    credentials: NodeCredentials,
    /// Wakes the poller at once (a node registered).
    pub poll_now: tokio::sync::Notify,
}

impl Managers {
    /// Every node as `GET /v2/nodes` shows it.
    pub(crate) fn views(&self) -> Vec<llorch_contracts::meta::NodeView> {
        self.list()
            .into_iter()
            .map(|m| llorch_contracts::meta::NodeView {
                online: m.availability == Availability::Available,
                last_heartbeat_ms_ago: m.last_heartbeat.map(|h| h.elapsed().as_millis() as u64),
                node_id: m.node_id,
                address: m.url,
                registered: m.registered,
                availability: m.availability,
                pools: m.pools.into_iter().collect(),
                gpus: m.gpus,
                last_error: m.last_error,
            })
            .collect()
    }

    /// The configured managers (`(id, url)`: an id when the operator gave one).
    pub fn new(configured: &[(Option<String>, String)], credentials: NodeCredentials) -> Self {
        let inner = configured
            .iter()
            .map(|(id, url)| {
                let credential = credentials.for_node(id.as_deref());
                (
                    url.clone(),
                    Manager::new(url.clone(), false, id.clone(), credential),
                )
            })
            .collect();
        Self {
            inner: RwLock::new(inner),
            credentials,
            poll_now: tokio::sync::Notify::new(),
        }
    }

    pub fn list(&self) -> Vec<Manager> {
        self.inner.read().values().cloned().collect()
    }

    /// Registers (or refreshes) node `node_id` at `url` (a canonical base URL). An address
    /// belongs to one node id at a time: one a static manager (ORCHD_POOL_MANAGERS) or another
    /// registered id holds is refused until that holder deregisters or is lost, so no node can
    /// relabel or retire another. A new id beyond `max_nodes` registered nodes is refused.
    /// Returns the pools of the node's entry at another address when it comes back from there
    /// (they must leave the pool table, or they would stay bound to the dead address and its
    /// new ones be ignored as taken).
    pub fn register(
        &self,
        node_id: &str,
        url: &str,
        gpus: Vec<GpuInfo>,
        max_nodes: usize,
    ) -> Result<BTreeSet<String>, RegisterRefused> {
        let mut m = self.inner.write();
        if let Some(holder) = m.get(url) {
            let own = holder.registered && holder.node_id.as_deref() == Some(node_id);
            // A lost holder (unavailable, or its heartbeats missed) gives its address up.
            let lost = holder.registered && holder.availability == Availability::Unavailable;
            if !own && !lost {
                return Err(RegisterRefused::AddressHeld {
                    holder: match (&holder.node_id, holder.registered) {
                        (Some(id), true) => format!("node {id:?}"),
                        _ => "a configured pool-managerd (ORCHD_POOL_MANAGERS)".into(),
                    },
                });
            }
        }
        let known = m
            .values()
            .any(|x| x.registered && x.node_id.as_deref() == Some(node_id));
        let registered = m.values().filter(|x| x.registered).count();
        if !known && registered >= max_nodes {
            return Err(RegisterRefused::Full { max: max_nodes });
        }
        let stale: Vec<String> = m
            .values()
            .filter(|x| x.registered && x.url != url && x.node_id.as_deref() == Some(node_id))
            .map(|x| x.url.clone())
            .collect();
        let mut retired = BTreeSet::new();
        for s in stale {
            if let Some(old) = m.remove(&s) {
                retired.extend(old.pools);
            }
        }
        // A lost holder of this address under another id is replaced (its pools retire too).
        if m.get(url)
            .is_some_and(|x| x.node_id.as_deref() != Some(node_id))
        {
            retired.extend(m.remove(url).map(|old| old.pools).unwrap_or_default());
        }
        let credential = self.credentials.for_node(Some(node_id));
        let e = m
            .entry(url.to_string())
            .or_insert_with(|| Manager::new(url.to_string(), true, None, None));
        e.node_id = Some(node_id.to_string());
        e.fixed_id = true;
        e.credential = credential;
        e.gpus = gpus;
        e.last_heartbeat = Some(Instant::now());
        drop(m);
        self.poll_now.notify_one();
        Ok(retired)
    }

    /// Returns false for an unknown node (it should register again).
    pub fn heartbeat(&self, node_id: &str) -> bool {
        let mut m = self.inner.write();
        // Registered nodes only: a configured manager of the same name does not heartbeat.
        match m
            .values_mut()
            .find(|x| x.registered && x.node_id.as_deref() == Some(node_id))
        {
            Some(e) => {
                e.last_heartbeat = Some(Instant::now());
                true
            }
            None => false,
        }
    }

    /// Removes a registered node; returns its pools.
    pub fn deregister(&self, node_id: &str) -> Option<BTreeSet<String>> {
        let mut m = self.inner.write();
        let url = m
            .values()
            .find(|x| x.node_id.as_deref() == Some(node_id))?
            .url
            .clone();
        m.remove(&url).map(|x| x.pools)
    }

    /// The manager that owns `pool_id`, if any: its URL and what to present to it.
    pub fn owner_of(&self, pool_id: &str) -> Option<(String, Option<auth_min::Token>)> {
        self.inner
            .read()
            .values()
            .find(|m| m.pools.contains(pool_id))
            .map(|m| (m.url.clone(), m.credential.clone()))
    }
}

/// Why a poll of a node got no pool list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PollError {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("pool-managerd refused our token (401): tokens differ")]
    TokenRefused,
    #[error("pool-managerd answered {0}")]
    Status(u16),
    #[error(transparent)]
    Body(#[from] crate::engine::EngineError),
    #[error("unreadable pool list: {0}")]
    Unreadable(String),
}

/// How orchestratord asks a pool-managerd for its pools: the IO seam of the CLOUD poller
/// (HTTP here; a scripted node in the in-process tests). The caller bounds the time.
pub(crate) trait NodeApi: Send + Sync + 'static {
    fn pools<'a>(
        &'a self,
        base_url: &'a str,
        credential: Option<&'a str>,
        headers: reqwest::header::HeaderMap,
    ) -> BoxFuture<'a, Result<PoolsResponse, PollError>>;
}

/// The largest pool list a node may answer with (a few hundred pools fit in well under 1 MiB).
const POLL_BODY_MAX: usize = 4 * 1024 * 1024;

/// `GET {manager}/v2/pools` with the node's credential (HOME may run without one, on loopback).
pub(crate) struct HttpNodes {
    pub http: reqwest::Client,
}

impl NodeApi for HttpNodes {
    fn pools<'a>(
        &'a self,
        base_url: &'a str,
        credential: Option<&'a str>,
        headers: reqwest::header::HeaderMap,
    ) -> BoxFuture<'a, Result<PoolsResponse, PollError>> {
        async move {
            let mut req = self
                .http
                .get(format!("{base_url}/v2/pools"))
                .headers(headers);
            if let Some(token) = credential {
                req = req.bearer_auth(token);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| PollError::Unreachable(llamacpp_client::error_chain(&e)))?;
            match resp.status() {
                reqwest::StatusCode::UNAUTHORIZED => Err(PollError::TokenRefused),
                s if !s.is_success() => Err(PollError::Status(s.as_u16())),
                _ => {
                    let body = crate::engine::read_capped(resp, POLL_BODY_MAX, "pool list").await?;
                    serde_json::from_slice::<PoolsResponse>(&body)
                        .map_err(|e| PollError::Unreadable(e.to_string()))
                }
            }
        }
        .boxed()
    }
}

pub(crate) struct CloudSource {
    pub metrics: Arc<crate::metrics::Metrics>,
    pub managers: Arc<Managers>,
    pub pools: Arc<PoolTable>,
    pub nodes: Arc<dyn NodeApi>,
    pub interval: Duration,
    pub recovery: u32,
    pub heartbeat_timeout: Duration,
    /// When orchestratord's node listener was last full.
    pub node_door: Arc<llorch_http::Saturation>,
}

enum PollResult {
    Ok(PoolsResponse),
    Failed(String),
}

impl CloudSource {
    /// A poll of a node checks every pool it serves.
    fn count_check(&self, pool_id: &str, outcome: &str, ms: f64) {
        self.metrics
            .pool_health_checks
            .with_label_values(&[pool_id, outcome])
            .inc();
        self.metrics
            .pool_health_check_ms
            .with_label_values(&[pool_id])
            .observe(ms);
    }

    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
                _ = self.managers.poll_now.notified() => {}
            }
            self.poll_all().await;
        }
    }

    async fn poll_all(&self) {
        let managers: Vec<(String, Option<auth_min::Token>)> = self
            .managers
            .list()
            .into_iter()
            .map(|m| (m.url, m.credential))
            .collect();
        let results = join_all(managers.iter().map(|(u, credential)| async move {
            // Sent with the poll, so pool-managerd's log line of it carries the same id.
            let correlation_id = format!("poll-{}", uuid::Uuid::new_v4().simple());
            let started = std::time::Instant::now();
            let r = self.poll(u, credential.as_ref(), &correlation_id).await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            match &r {
                PollResult::Ok(resp) => tracing::debug!(node = %u, pools = resp.pools.len(), latency_ms = ms, outcome = "ok", %correlation_id, "pool health check completed"),
                PollResult::Failed(error) => tracing::warn!(node = %u, latency_ms = ms, outcome = "fail", %error, %correlation_id, "pool health check completed"),
            }
            (r, ms)
        }))
        .await;
        for ((url, _), (result, ms)) in managers.iter().zip(results) {
            self.apply(url, result, ms);
        }
    }

    async fn poll(
        &self,
        url: &str,
        credential: Option<&auth_min::Token>,
        correlation_id: &str,
    ) -> PollResult {
        let span = tracing::info_span!("pool_health_check", manager = %url);
        tracing::Instrument::instrument(
            self.poll_manager(url, credential, correlation_id, &span),
            span.clone(),
        )
        .await
    }

    async fn poll_manager(
        &self,
        url: &str,
        credential: Option<&auth_min::Token>,
        correlation_id: &str,
        span: &tracing::Span,
    ) -> PollResult {
        let mut headers = reqwest::header::HeaderMap::new();
        llorch_observability::inject(span, &mut headers);
        if let Ok(id) = reqwest::header::HeaderValue::from_str(correlation_id) {
            headers.insert(llorch_http::CORRELATION_HEADER, id);
        }
        // The timeout stays inside the interval, so a silent manager is judged by the next tick.
        let timeout = self.interval.mul_f64(0.8);
        let credential = credential.map(auth_min::Token::expose);
        match tokio::time::timeout(timeout, self.nodes.pools(url, credential, headers)).await {
            Ok(Ok(p)) => PollResult::Ok(p),
            Ok(Err(error)) => PollResult::Failed(error.to_string()),
            Err(_) => PollResult::Failed(format!("no answer within {} ms", timeout.as_millis())),
        }
    }

    fn apply(&self, url: &str, result: PollResult, poll_ms: f64) {
        let mut managers = self.managers.inner.write();
        // The other managers, and whether each is unavailable (its pool ids may move here).
        let others: BTreeMap<String, bool> = managers
            .iter()
            .filter(|(u, _)| *u != url)
            .map(|(u, x)| (u.clone(), x.availability == Availability::Unavailable))
            .collect();
        let mut taken_from: Vec<(String, String)> = Vec::new();
        let Some(m) = managers.get_mut(url) else {
            return;
        };
        // Heartbeats that could not get in (orchestratord's node listener was full within the
        // timeout) are not held against a node that answers its polls.
        let heartbeat_missed = m.registered
            && m.last_heartbeat
                .is_none_or(|h| h.elapsed() > self.heartbeat_timeout)
            && !self.node_door.within(self.heartbeat_timeout);
        let result = match result {
            PollResult::Ok(_) if heartbeat_missed => {
                PollResult::Failed("node missed its heartbeats".into())
            }
            other => other,
        };
        match result {
            PollResult::Ok(resp) => {
                m.consecutive_ok += 1;
                m.consecutive_fail = 0;
                m.last_error = None;
                if !m.fixed_id {
                    // An id given by the operator or a registration stays: a poll does not
                    // rename it (nor choose what it is presented).
                    m.node_id = Some(resp.node_id.clone());
                }
                let usable = match m.availability {
                    Availability::Available | Availability::Unknown => true,
                    Availability::Unavailable => m.consecutive_ok >= self.recovery,
                };
                if usable && m.availability != Availability::Available {
                    tracing::info!(manager = %url, node_id = %resp.node_id, "pool-managerd available");
                    m.availability = Availability::Available;
                }
                let mut invalid = BTreeSet::new();
                let pools: Vec<_> = resp
                    .pools
                    .into_iter()
                    .filter(|p| match p.validate() {
                        Ok(()) => true,
                        Err(reason) => {
                            // Shown as sent, escaped and cut: it came from the network.
                            let shown: String = format!("{:?}", p.pool_id).chars().take(80).collect();
                            if !m.invalid.contains(&p.pool_id) {
                                tracing::warn!(pool_id = %shown, manager = %url, %reason, "node reported an invalid pool; ignoring it");
                            }
                            invalid.insert(p.pool_id.clone());
                            false
                        }
                    })
                    .collect();
                m.invalid = invalid;
                self.pools.reports.replace(url, &pools);
                let listed: BTreeSet<String> = pools.iter().map(|p| p.pool_id.clone()).collect();
                for gone in m.pools.difference(&listed) {
                    self.pools.remove(gone);
                }
                let mut owned = BTreeSet::new();
                let mut conflicting = BTreeSet::new();
                for p in pools {
                    if let Some(existing) = self.pools.get(&p.pool_id) {
                        let holder = existing.manager.clone().unwrap_or_default();
                        if holder != url && others.get(&holder).is_none_or(|down| *down) {
                            // Its node is unavailable (or gone): the pool id moves here.
                            tracing::warn!(pool_id = %p.pool_id, from = %holder, to = %url, "pool id moves to another pool-managerd: its holder is unavailable");
                            self.pools.remove(&p.pool_id);
                            taken_from.push((holder, p.pool_id.clone()));
                        } else if holder != url {
                            if !m.conflicting.contains(&p.pool_id) {
                                tracing::warn!(pool_id = %p.pool_id, manager = %url, "pool id already served by another pool-managerd; ignoring this one");
                            }
                            conflicting.insert(p.pool_id);
                            continue;
                        }
                    }
                    owned.insert(p.pool_id.clone());
                    self.pools.upsert(PoolEntry {
                        phase: PoolPhase::of(Some(p.state)),
                        restarting_since: None,
                        vram_free_bytes: p.vram_free_bytes,
                        embeddings: p.embeddings,
                        ejection: Default::default(),
                        url: format!("{url}/v2/pools/{}/engine", p.pool_id),
                        manager: Some(url.to_string()),
                        credential: m.credential.clone(),
                        healthy: usable && p.ready,
                        draining: p.draining,
                        last_error: p.last_error.clone(),
                        model_id: p.model_id,
                        slots_total: p.slots_total,
                        ctx_max: p.ctx_max,
                        engine: p.engine,
                        engine_version: p.engine_version,
                        node_id: Some(p.node_id),
                        device_mask: p.device_mask,
                        in_flight: 0,
                        lost: Default::default(),
                        pool_id: p.pool_id,
                    });
                }
                for pool in &owned {
                    self.count_check(pool, "ok", poll_ms);
                }
                m.pools = owned;
                m.conflicting = conflicting;
                match llorch_contracts::GpuInfo::validate_all(&resp.gpus) {
                    Ok(()) => m.gpus = resp.gpus,
                    Err(reason) => {
                        if m.last_error.is_none() {
                            tracing::warn!(manager = %url, %reason, "node reported invalid GPUs; ignoring them");
                        }
                        m.gpus.clear();
                    }
                }
            }
            PollResult::Failed(error) => {
                m.consecutive_ok = 0;
                m.consecutive_fail += 1;
                if m.availability != Availability::Unavailable {
                    tracing::warn!(manager = %url, %error, "pool-managerd unavailable; its pools are not used");
                }
                m.availability = Availability::Unavailable;
                for pool in &m.pools {
                    // Counted, so an alert on failed checks sees a node that stopped answering.
                    self.count_check(pool, "fail", poll_ms);
                    self.pools
                        .mark_lost(pool, format!("pool-managerd {url}: {error}"));
                }
                m.last_error = Some(error);
            }
        }
        for (holder, pool) in taken_from {
            if let Some(x) = managers.get_mut(&holder) {
                x.pools.remove(&pool);
            }
        }
    }
}
