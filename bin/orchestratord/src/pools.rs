//! The pool table: every pool this orchestrator may place work on, whatever source feeds it
//! (HOME: the handoff directory; CLOUD: pool-managerd polls). Sources call `upsert`,
//! `set_health` and `remove`; the dispatcher reads `views` and takes `SlotLease`s, which give
//! the slot back when dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::meta::{OrchPool, PoolHealth};
use llorch_contracts::PoolState;
use llorch_core::PoolView;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct PoolEntry {
    pub pool_id: String,
    pub model_id: String,
    /// Base URL of the engine API: HOME, the loopback llama-server; CLOUD, the
    /// pool-managerd proxy `{manager}/v2/pools/{id}/engine`.
    pub url: String,
    /// CLOUD: the pool-managerd that owns the pool (requests to it carry the token).
    pub manager: Option<String>,
    /// What every request to `url` presents: HOME, the engine's API key (from
    /// `{runtime_dir}/keys/{pool_id}.key`; none for an external engine); CLOUD, the node's
    /// credential (its own token, else the shared node token).
    pub credential: Option<auth_min::Token>,
    pub slots_total: u32,
    pub ctx_max: Option<u32>,
    pub engine: String,
    pub engine_version: Option<String>,
    pub node_id: Option<String>,
    pub device_mask: Option<String>,
    /// The last health probe succeeded.
    pub healthy: bool,
    pub draining: bool,
    pub last_error: Option<String>,
    /// Requests this orchestrator has in flight on the pool.
    pub in_flight: u32,
    /// Cancelled when the pool's node is lost: in-flight tasks there end at once.
    pub lost: CancellationToken,
    pub phase: PoolPhase,
    /// Since when it has been restarting (kept across updates of a restarting pool).
    pub restarting_since: Option<Instant>,
    /// Free memory of the pool's GPUs as its node last reported it (CLOUD polls; HOME has no
    /// report yet). Placement breaks ties between equally free pools by it.
    pub vram_free_bytes: Option<u64>,
    /// The engine serves `/v1/embeddings`.
    pub embeddings: bool,
    /// Dispatch failures in a row and the cool-down they earned (kept across updates).
    pub ejection: Ejection,
}

/// Failed dispatches in a row after which a pool is ejected from placement.
pub const EJECT_AFTER: u32 = 3;
/// The first cool-down; each ejection in a row doubles it, up to `EJECT_MAX`.
pub const EJECT_BASE: Duration = Duration::from_secs(1);
pub const EJECT_MAX: Duration = Duration::from_secs(60);

/// Outlier ejection of a pool whose engine answers its health probe yet fails the work it is
/// given (a pool that fails fast would otherwise attract every task, having free slots).
#[derive(Debug, Clone)]
pub struct Ejection {
    failures_in_row: u32,
    /// Cool-downs since the last successful dispatch (no jitter: one orchestrator decides).
    cooldown: llorch_core::Backoff,
    until: Option<Instant>,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            failures_in_row: 0,
            cooldown: llorch_core::Backoff::new(EJECT_BASE, EJECT_MAX),
            until: None,
        }
    }
}

impl Ejection {
    pub fn active(&self, now: Instant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Time left of the current cool-down.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until
            .filter(|u| now < *u)
            .map(|u| u.saturating_duration_since(now))
    }
}

impl PoolEntry {
    pub fn ready(&self) -> bool {
        self.healthy && !self.draining && !self.ejection.active(Instant::now())
    }

    /// What `GET /v2/pools` shows of it.
    pub fn wire(&self) -> OrchPool {
        OrchPool {
            pool_id: self.pool_id.clone(),
            model_id: self.model_id.clone(),
            url: self.url.clone(),
            manager: self.manager.clone(),
            slots_total: self.slots_total,
            ctx_max: self.ctx_max,
            engine: self.engine.clone(),
            engine_version: self.engine_version.clone(),
            node_id: self.node_id.clone(),
            device_mask: self.device_mask.clone(),
            healthy: self.healthy,
            draining: self.draining,
            last_error: self.last_error.clone(),
            in_flight: self.in_flight,
            phase: self.phase.as_str().into(),
            vram_free_bytes: self.vram_free_bytes,
            ejected_for_ms: self
                .ejection
                .remaining(Instant::now())
                .map(|d| d.as_millis() as u64),
        }
    }

    /// What `GET /v2/pools/{id}/health` shows of it.
    pub fn health(&self) -> PoolHealth {
        PoolHealth {
            pool_id: self.pool_id.clone(),
            live: self.healthy,
            ready: self.ready(),
            draining: self.draining,
            slots_total: self.slots_total,
            slots_free: self.slots_total.saturating_sub(self.in_flight),
            in_flight: self.in_flight,
            model_id: self.model_id.clone(),
            last_error: self.last_error.clone(),
        }
    }
}

/// Where a pool is in its life, as its source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolPhase {
    /// The engine serves (whether it is healthy right now is `PoolEntry::healthy`).
    Serving,
    /// The engine is being restarted (or started): the pool comes back, its work queues.
    Restarting,
    /// The circuit opened (or the pool stopped for good): its work is refused.
    Failed,
}

impl PoolPhase {
    /// The phase a reported pool state means (a handoff file without a state serves).
    pub fn of(state: Option<PoolState>) -> Self {
        match state {
            None | Some(PoolState::Ready | PoolState::Draining) => PoolPhase::Serving,
            Some(PoolState::Starting | PoolState::Restarting) => PoolPhase::Restarting,
            Some(PoolState::Failed | PoolState::Stopped) => PoolPhase::Failed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PoolPhase::Serving => "serving",
            PoolPhase::Restarting => "restarting",
            PoolPhase::Failed => "failed",
        }
    }
}

/// What a prompt's length is judged against: the per-slot contexts of a model's pools and one
/// engine that can count its tokens.
pub struct CtxFit {
    pub smallest: u32,
    pub largest: u32,
    pub tokenizer_url: String,
    /// What the tokenizer's URL wants presented (the pool's credential).
    pub credential: Option<auth_min::Token>,
}

pub struct PoolTable {
    pools: RwLock<BTreeMap<String, PoolEntry>>,
    /// When the last pool serving a model went away, per model (for the memory window).
    gone: RwLock<HashMap<String, Instant>>,
    /// Bumped whenever what `admissible` answers may change: a pool appears, goes, or changes
    /// phase or model (not on health, nor on a poll that changes nothing of that).
    generation: AtomicU64,
    /// How long the last restarts took, smoothed (ms); `None` until one was seen end.
    restart_ms: RwLock<Option<f64>>,
    /// Woken whenever capacity may have appeared (new pool, health back, slot released).
    pub changed: Arc<Notify>,
    /// What the nodes last said of their pools, for the console (stopped ones included).
    pub reports: NodeReports,
    /// Cache-aware placement: which engine slot holds which prompt, per pool.
    slot_maps: Mutex<HashMap<String, llorch_core::SlotMap>>,
}

impl PoolTable {
    pub fn new(changed: Arc<Notify>) -> Self {
        Self {
            pools: RwLock::new(BTreeMap::new()),
            gone: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            restart_ms: RwLock::new(None),
            slot_maps: Mutex::new(HashMap::new()),
            changed,
            reports: Default::default(),
        }
    }

    /// Changes whenever what `admissible` answers may have changed.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Admissibility may have changed: the dispatcher wakes to end queued tasks of a model
    /// that became inadmissible.
    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// The largest per-slot context among the model's pools that are not failed; `None` when
    /// some such pool does not report its context (then no request can be judged too large),
    /// or the model has no such pool.
    pub fn largest_ctx(&self, model: &str) -> Option<u32> {
        let pools = self.pools.read();
        let mut largest = None;
        for p in pools
            .values()
            .filter(|p| p.model_id == model && p.phase != PoolPhase::Failed)
        {
            largest = Some(largest.unwrap_or(0).max(p.ctx_max?));
        }
        largest
    }

    /// The per-slot contexts of `model`'s generation pools (not failed), and where a prompt can
    /// be counted (a ready one); `None` when some pool's context is unknown (no bound to keep)
    /// or none is ready to count.
    pub fn ctx_fit(&self, model: &str) -> Option<CtxFit> {
        let pools = self.pools.read();
        let (mut smallest, mut largest, mut tokenizer) = (u32::MAX, 0, None);
        for p in pools
            .values()
            .filter(|p| p.model_id == model && p.phase != PoolPhase::Failed && !p.embeddings)
        {
            let ctx = p.ctx_max?;
            smallest = smallest.min(ctx);
            largest = largest.max(ctx);
            if p.healthy && tokenizer.is_none() {
                tokenizer = Some((p.url.clone(), p.credential.clone()));
            }
        }
        let (tokenizer_url, credential) = tokenizer?;
        Some(CtxFit {
            smallest,
            largest,
            tokenizer_url,
            credential,
        })
    }

    /// Whether some pool (not failed) of `model` takes this kind of work (`embeddings` or
    /// generation); `None` when no such pool serves the model at all.
    pub fn serves_kind(&self, model: &str, embeddings: bool) -> Option<bool> {
        let pools = self.pools.read();
        let mut serving = pools
            .values()
            .filter(|p| p.model_id == model && p.phase != PoolPhase::Failed)
            .peekable();
        serving.peek()?;
        Some(serving.any(|p| p.embeddings == embeddings))
    }

    /// Whether a strict task of `model` can run: on its single-slot pools (not failed), which
    /// must all run one engine build (llama.cpp reproduces output only within one build).
    /// `Err`: why not.
    pub fn strict_ready(&self, model: &str) -> Result<(), String> {
        let pools = self.pools.read();
        let mut builds: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for p in pools
            .values()
            .filter(|p| p.model_id == model && p.slots_total == 1 && p.phase != PoolPhase::Failed)
        {
            let build = p.engine_version.as_deref().unwrap_or("unknown");
            builds.entry(build).or_default().push(&p.pool_id);
        }
        match builds.len() {
            0 => Err(format!(
                "determinism strict needs a single-slot pool (slots = 1) serving model {model:?}; none does"
            )),
            1 => Ok(()),
            _ => {
                let shown: Vec<String> = builds
                    .iter()
                    .map(|(build, ids)| format!("{} on {build}", ids.join(", ")))
                    .collect();
                Err(format!(
                    "determinism strict needs the single-slot pools of model {model:?} to run one engine build, and they differ ({}): the same seed would not give the same tokens on all of them",
                    shown.join("; ")
                ))
            }
        }
    }

    /// How much longer `model` waits for a restart before any pool can take its work: 0 when a
    /// pool serving it is ready, or none restarts, or no restart was measured yet; otherwise
    /// the measured restart time left for the pool that started restarting first.
    pub fn restart_wait_ms(&self, model: &str, now: Instant) -> u64 {
        let Some(typical) = *self.restart_ms.read() else {
            return 0;
        };
        let pools = self.pools.read();
        let serving = pools.values().filter(|p| p.model_id == model);
        if serving.clone().any(PoolEntry::ready) {
            return 0;
        }
        serving
            .filter_map(|p| p.restarting_since)
            .map(|since| {
                let elapsed = now.saturating_duration_since(since).as_secs_f64() * 1000.0;
                (typical - elapsed).max(0.0).round() as u64
            })
            .min()
            .unwrap_or(0)
    }

    /// Whether tasks for `model` may queue: some pool serves it or will again (restarting),
    /// or its last pool went away less than `memory` ago. A model whose every pool failed, or
    /// that no pool served within `memory`, is not admissible.
    pub fn admissible(&self, model: &str, now: Instant, memory: Duration) -> bool {
        let pools = self.pools.read();
        let mut known = false;
        for p in pools.values().filter(|p| p.model_id == model) {
            if p.phase != PoolPhase::Failed {
                return true;
            }
            known = true;
        }
        !known
            && self
                .gone
                .read()
                .get(model)
                .is_some_and(|at| now.saturating_duration_since(*at) < memory)
    }

    /// Inserts or replaces a pool's description; keeps its in-flight count and, unless the
    /// pool was lost since, the token its running tasks watch.
    pub fn upsert(&self, mut entry: PoolEntry) {
        let mut pools = self.pools.write();
        let old = pools.get(&entry.pool_id);
        let was_restarting = old.and_then(|o| o.restarting_since);
        let admissibility_may_change =
            old.is_none_or(|o| o.phase != entry.phase || o.model_id != entry.model_id);
        if let Some(old) = old {
            entry.in_flight = old.in_flight;
            entry.ejection = old.ejection.clone();
            if !old.lost.is_cancelled() {
                entry.lost = old.lost.clone();
            }
        }
        let now = Instant::now();
        entry.restarting_since = match entry.phase {
            PoolPhase::Restarting => Some(was_restarting.unwrap_or(now)),
            _ => None,
        };
        if let (Some(since), PoolPhase::Serving) = (was_restarting, entry.phase) {
            // A restart ended: learn how long restarts take.
            let took = now.saturating_duration_since(since).as_secs_f64() * 1000.0;
            let mut r = self.restart_ms.write();
            *r = Some(r.map_or(took, |prev| 0.7 * prev + 0.3 * took));
        }
        pools.insert(entry.pool_id.clone(), entry);
        drop(pools);
        if admissibility_may_change {
            self.bump();
        }
        self.changed.notify_one();
    }

    /// Free GPU memory of a pool as its pool-managerd last reported it.
    pub fn set_vram_free(&self, pool_id: &str, bytes: Option<u64>) {
        if let Some(p) = self.pools.write().get_mut(pool_id) {
            p.vram_free_bytes = bytes;
        }
    }

    pub fn set_health(&self, pool_id: &str, healthy: bool, error: Option<String>) {
        let mut pools = self.pools.write();
        if let Some(p) = pools.get_mut(pool_id) {
            let was = p.healthy;
            p.healthy = healthy;
            p.last_error = error;
            if healthy && !was {
                drop(pools);
                self.changed.notify_one();
            }
        }
    }

    /// The pool's node is gone: not ready, and tasks running there are ended now rather than
    /// when their streams time out.
    pub fn mark_lost(&self, pool_id: &str, error: String) {
        let mut pools = self.pools.write();
        if let Some(p) = pools.get_mut(pool_id) {
            p.healthy = false;
            p.last_error = Some(error);
            p.lost.cancel();
            p.lost = CancellationToken::new();
        }
    }

    pub fn remove(&self, pool_id: &str) -> Option<PoolEntry> {
        let mut pools = self.pools.write();
        let removed = pools.remove(pool_id)?;
        if !pools.values().any(|p| p.model_id == removed.model_id) {
            self.gone
                .write()
                .insert(removed.model_id.clone(), Instant::now());
        }
        drop(pools);
        // A pool that comes back under this id comes with a fresh engine.
        self.slot_maps.lock().remove(pool_id);
        self.bump();
        Some(removed)
    }

    pub fn get(&self, pool_id: &str) -> Option<PoolEntry> {
        self.pools.read().get(pool_id).cloned()
    }

    pub fn list(&self) -> Vec<PoolEntry> {
        self.pools.read().values().cloned().collect()
    }

    /// How a dispatch to `pool_id` ended: `ok` (the engine served or answered) or a failure.
    /// Returns the cool-down when this failure ejected the pool.
    pub fn record_dispatch(&self, pool_id: &str, ok: bool) -> Option<Duration> {
        let mut pools = self.pools.write();
        let e = &mut pools.get_mut(pool_id)?.ejection;
        if ok {
            *e = Ejection::default();
            return None;
        }
        e.failures_in_row += 1;
        if e.failures_in_row < EJECT_AFTER {
            return None;
        }
        e.failures_in_row = 0;
        // Jitter 1: the whole ceiling, 1 s doubling to 60 s.
        let cooldown = e.cooldown.next_delay(1.0);
        e.until = Some(Instant::now() + cooldown);
        Some(cooldown)
    }

    /// When the earliest current ejection ends (the dispatcher wakes then).
    pub fn next_ejection_end(&self) -> Option<Instant> {
        let now = Instant::now();
        self.pools
            .read()
            .values()
            .filter_map(|p| p.ejection.until.filter(|u| *u > now))
            .min()
    }

    pub fn views(&self) -> Vec<PoolView> {
        let now = Instant::now();
        self.pools
            .read()
            .values()
            .map(|p| PoolView {
                pool_id: p.pool_id.clone(),
                model_id: p.model_id.clone(),
                ready: p.healthy && !p.ejection.active(now),
                draining: p.draining,
                slots_total: p.slots_total,
                in_flight: p.in_flight,
                vram_free_bytes: p.vram_free_bytes,
                ctx_max: p.ctx_max,
                embeddings: p.embeddings,
                prefix_blocks: 0,
            })
            .collect()
    }

    /// Free and total slots over ready pools (no copies: this is on the admission path).
    pub fn slot_totals(&self) -> (u32, u32) {
        self.pools
            .read()
            .values()
            .filter(|p| p.ready())
            .fold((0, 0), |(f, t), p| {
                (
                    f.saturating_add(p.slots_total.saturating_sub(p.in_flight)),
                    t.saturating_add(p.slots_total),
                )
            })
    }

    /// Takes a slot on `pool_id` if it is ready and has one free; returns the pool as it is
    /// then, with the lease.
    pub fn lease(self: &Arc<Self>, pool_id: &str) -> Option<(PoolEntry, SlotLease)> {
        let mut pools = self.pools.write();
        let p = pools.get_mut(pool_id)?;
        if !p.ready() || p.in_flight >= p.slots_total {
            return None;
        }
        p.in_flight += 1;
        Some((
            p.clone(),
            SlotLease {
                table: self.clone(),
                pool_id: pool_id.to_string(),
                slot: None,
            },
        ))
    }

    /// Cache-aware placement: pins `lease` to the free engine slot of its pool whose cache
    /// shares the most leading blocks with `chain` (`None`: the pool's slot count changed
    /// under running requests; the engine then picks).
    pub fn pin_slot(
        &self,
        lease: &mut SlotLease,
        slots_total: u32,
        chain: &[u64],
    ) -> Option<llorch_core::SlotPick> {
        let mut maps = self.slot_maps.lock();
        let map = maps
            .entry(lease.pool_id.clone())
            .or_insert_with(|| llorch_core::SlotMap::new(slots_total));
        if map.len() != slots_total {
            if map.busy() > 0 {
                return None;
            }
            *map = llorch_core::SlotMap::new(slots_total);
        }
        let pick = map.pick(chain)?;
        lease.slot = Some(pick.slot);
        Some(pick)
    }

    /// The pool's engine holds none of the prompts it was given (it restarted, or said so),
    /// but `keep`'s.
    pub fn forget_slots(&self, pool_id: &str, keep: Option<u32>) {
        if let Some(map) = self.slot_maps.lock().get_mut(pool_id) {
            map.forget(keep);
        }
    }

    /// Leading blocks of `chain` the pool's best slot holds (0 when unknown).
    #[cfg(test)]
    pub fn slot_matched(&self, pool_id: &str, chain: &[u64]) -> usize {
        self.slot_maps
            .lock()
            .get(pool_id)
            .map_or(0, |m| m.matched(chain))
    }
}

/// One slot of one pool, held while a task runs there. Dropping it frees the slot and wakes
/// the dispatcher.
pub struct SlotLease {
    table: Arc<PoolTable>,
    pool_id: String,
    /// The engine slot it is pinned to (cache-aware placement).
    slot: Option<u32>,
}

impl SlotLease {
    pub fn slot(&self) -> Option<u32> {
        self.slot
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if let Some(map) = self.table.slot_maps.lock().get_mut(&self.pool_id) {
                map.release(slot);
            }
        }
        if let Some(p) = self.table.pools.write().get_mut(&self.pool_id) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        self.table.changed.notify_one();
    }
}

/// What nodes last reported of their pools, drained and stopped ones included (orchestratord
/// unbinds those, yet the operator wants to see and reload them). HOME: the local
/// pool-managerd, read at each probe round; CLOUD: each good poll.
#[derive(Default)]
pub(crate) struct NodeReports {
    inner: RwLock<BTreeMap<String, Report>>,
}

#[derive(Clone)]
pub(crate) struct Report {
    /// The pool-managerd that reported it.
    pub manager: String,
    pub status: llorch_contracts::PoolStatus,
    pub at: Instant,
}

/// Reports kept at most (the latest of each pool id).
const REPORTS_MAX: usize = 4096;
/// A node's reports not renewed for this long are forgotten (its node went away).
const REPORTS_FORGET: Duration = Duration::from_secs(600);

impl NodeReports {
    /// `manager` reported `pools` just now: they replace whatever it reported before.
    pub fn replace(&self, manager: &str, pools: &[llorch_contracts::PoolStatus]) {
        let now = Instant::now();
        let mut inner = self.inner.write();
        inner.retain(|_, r| {
            r.manager != manager && now.saturating_duration_since(r.at) < REPORTS_FORGET
        });
        for p in pools.iter().filter(|p| p.validate().is_ok()) {
            if inner.len() >= REPORTS_MAX && !inner.contains_key(&p.pool_id) {
                break;
            }
            inner.insert(
                p.pool_id.clone(),
                Report {
                    manager: manager.to_string(),
                    status: p.clone(),
                    at: now,
                },
            );
        }
    }

    /// Reports younger than `max_age`, by pool id.
    pub(crate) fn fresh(&self, now: Instant, max_age: Duration) -> BTreeMap<String, Report> {
        self.inner
            .read()
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.at) <= max_age)
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, slots: u32) -> PoolEntry {
        crate::tests::kit::pool(id, slots)
    }

    // covers: ORCH-2205
    #[test]
    fn leases_never_exceed_slots_and_release_on_drop() {
        let t = Arc::new(PoolTable::new(Arc::new(Notify::new())));
        t.upsert(entry("a", 2));
        let l1 = t.lease("a").unwrap();
        let l2 = t.lease("a").unwrap();
        assert!(t.lease("a").is_none());
        drop(l1);
        assert_eq!(t.get("a").unwrap().in_flight, 1);
        // A re-upsert (handoff file rewritten) keeps the count.
        t.upsert(entry("a", 2));
        assert_eq!(t.get("a").unwrap().in_flight, 1);
        drop(l2);
        assert_eq!(t.get("a").unwrap().in_flight, 0);
        t.set_health("a", false, Some("down".into()));
        assert!(t.lease("a").is_none());
    }

    #[test]
    fn losing_a_pool_fires_its_token_once_and_arms_a_new_one() {
        let t = Arc::new(PoolTable::new(Arc::new(Notify::new())));
        t.upsert(entry("a", 1));
        let watched = t.get("a").unwrap().lost;
        t.upsert(entry("a", 1));
        assert!(!watched.is_cancelled());
        t.mark_lost("a", "node gone".into());
        assert!(watched.is_cancelled());
        let p = t.get("a").unwrap();
        assert!(!p.healthy && !p.lost.is_cancelled());
        assert_eq!(p.last_error.as_deref(), Some("node gone"));
    }
}
