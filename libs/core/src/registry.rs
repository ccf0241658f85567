//! The node's pool registry: one [`PoolStatus`] per pool id, ordered by id.

use std::collections::BTreeMap;

use llorch_contracts::{PoolState, PoolStatus};

#[derive(Debug, Default, Clone)]
pub struct Registry {
    pools: BTreeMap<String, PoolStatus>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a pool; `ready`/`live`/`draining` are derived from `state` here so
    /// they can never disagree with it.
    pub fn upsert(&mut self, mut status: PoolStatus) {
        normalise(&mut status);
        self.pools.insert(status.pool_id.clone(), status);
    }

    /// Applies `f` to a pool and re-derives its flags. Returns false when the pool is unknown.
    pub fn update(&mut self, pool_id: &str, f: impl FnOnce(&mut PoolStatus)) -> bool {
        match self.pools.get_mut(pool_id) {
            Some(p) => {
                f(p);
                normalise(p);
                true
            }
            None => false,
        }
    }

    pub fn remove(&mut self, pool_id: &str) -> Option<PoolStatus> {
        self.pools.remove(pool_id)
    }

    pub fn get(&self, pool_id: &str) -> Option<&PoolStatus> {
        self.pools.get(pool_id)
    }

    pub fn contains(&self, pool_id: &str) -> bool {
        self.pools.contains_key(pool_id)
    }

    pub fn list(&self) -> Vec<PoolStatus> {
        self.pools.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.pools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }
}

fn normalise(p: &mut PoolStatus) {
    p.ready = p.state == PoolState::Ready && p.live;
    p.draining = p.state == PoolState::Draining;
    if !matches!(p.state, PoolState::Ready | PoolState::Draining) {
        p.live = false;
    }
    p.slots_free = p.slots_free.min(p.slots_total);
    if !p.ready {
        p.slots_free = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_contracts::ProvisioningMode;

    fn status(id: &str, state: PoolState) -> PoolStatus {
        PoolStatus {
            pool_id: id.into(),
            node_id: "n1".into(),
            state,
            live: true,
            ready: false,
            draining: false,
            slots_total: 4,
            slots_free: 9,
            engine: "llamacpp".into(),
            engine_version: None,
            model_id: "tiny".into(),
            device_mask: None,
            ctx_max: None,
            vram_total_bytes: None,
            vram_free_bytes: None,
            restart_count: 0,
            last_error: None,
            provisioning_mode: ProvisioningMode::Managed,
            url: None,
            embeddings: false,
        }
    }

    // covers: POOL-3115
    #[test]
    fn flags_follow_state() {
        let mut r = Registry::new();
        r.upsert(status("a", PoolState::Ready));
        let a = r.get("a").unwrap();
        assert!(a.ready && a.live && !a.draining);
        assert_eq!(a.slots_free, 4, "slots_free is capped by slots_total");
        r.update("a", |p| p.state = PoolState::Restarting);
        let a = r.get("a").unwrap();
        assert!(!a.ready && !a.live);
        assert_eq!(a.slots_free, 0);
        assert!(!r.update("missing", |_| {}));
    }

    // covers: POOL-3115
    #[test]
    fn list_is_ordered_by_pool_id() {
        let mut r = Registry::new();
        r.upsert(status("b", PoolState::Ready));
        r.upsert(status("a", PoolState::Starting));
        let ids: Vec<_> = r.list().into_iter().map(|p| p.pool_id).collect();
        assert_eq!(ids, vec!["a", "b"]);
    }
}
