//! Placement (DESIGN §3): only ready, non-draining pools serving the model with a free slot;
//! session affinity first, then the pool holding the longest prefix of the prompt in its
//! cache (unless it is busier than the least busy one by more than `cache_balance` requests),
//! then most free slots, then most free VRAM, then pool id.
//! `pin` never falls back unless the request allows it explicitly.

use llorch_contracts::tasks::{Placement, PlacementMode};

/// What placement needs to know of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub pool_id: String,
    pub model_id: String,
    pub ready: bool,
    pub draining: bool,
    pub slots_total: u32,
    /// Requests this orchestrator has in flight on the pool.
    pub in_flight: u32,
    pub vram_free_bytes: Option<u64>,
    /// Per-slot context (tokens), when known.
    pub ctx_max: Option<u32>,
    /// The engine serves embeddings.
    pub embeddings: bool,
    /// Leading blocks of this task's prompt the pool has recently served (its prompt cache
    /// likely holds them); 0 when none or unknown.
    pub prefix_blocks: u32,
}

impl PoolView {
    pub fn free_slots(&self) -> u32 {
        self.slots_total.saturating_sub(self.in_flight)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PlacementRequest<'a> {
    pub model: &'a str,
    pub placement: Option<&'a Placement>,
    /// The pool that served the session's last turn (KV affinity).
    pub session_pool: Option<&'a str>,
    /// A pool to stay away from when any other is free (it just failed this task).
    pub retry_avoid: Option<&'a str>,
    /// The context the task needs (`ctx`): only pools whose per-slot context holds it (or is
    /// unknown) qualify.
    pub min_ctx: Option<u32>,
    /// `determinism: strict`: only single-slot pools qualify (no batching with other requests,
    /// whose presence changes llama.cpp's numerics).
    pub single_slot: bool,
    /// An embeddings request: only pools that serve embeddings qualify (and those take no
    /// generation: llama-server started for embeddings may refuse completions).
    pub embeddings: bool,
    /// Cache-aware placement: the pool with the longest cached prefix is taken while it has at
    /// most this many more requests in flight than the least busy candidate. `None`: off.
    pub cache_balance: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Place(String),
    /// Some pool could serve it later; keep it queued.
    Wait,
}

/// Whether the pool's per-slot context holds `ctx` (an unknown context is given the benefit).
pub fn fits(v: &PoolView, ctx: Option<u32>) -> bool {
    match (ctx, v.ctx_max) {
        (Some(need), Some(have)) => have >= need,
        _ => true,
    }
}

pub fn place(pools: &[PoolView], req: &PlacementRequest<'_>) -> Decision {
    let default = Placement::default();
    let p = req.placement.unwrap_or(&default);
    let usable = |v: &&PoolView| {
        v.model_id == req.model
            && v.ready
            && !v.draining
            && !p.avoid_pools.contains(&v.pool_id)
            && fits(v, req.min_ctx)
            && (!req.single_slot || v.slots_total == 1)
            && v.embeddings == req.embeddings
    };
    let mut candidates: Vec<&PoolView> = pools.iter().filter(usable).collect();
    if p.mode == PlacementMode::Pin {
        let pinned: Vec<&PoolView> = candidates
            .iter()
            .copied()
            .filter(|v| Some(&v.pool_id) == p.pin_pool_id.as_ref())
            .collect();
        let pinned_free = pinned.iter().any(|v| v.free_slots() > 0);
        if pinned_free || !p.allow_fallback {
            candidates = pinned;
        }
    }
    let mut free: Vec<&PoolView> = candidates
        .into_iter()
        .filter(|v| v.free_slots() > 0)
        .collect();
    if free.is_empty() {
        return Decision::Wait;
    }
    if p.mode == PlacementMode::Prefer {
        let preferred: Vec<&PoolView> = free
            .iter()
            .copied()
            .filter(|v| p.prefer_pools.contains(&v.pool_id))
            .collect();
        if !preferred.is_empty() {
            free = preferred;
        }
    }
    if let Some(avoid) = req.retry_avoid {
        if free.iter().any(|v| v.pool_id != avoid) {
            free.retain(|v| v.pool_id != avoid);
        }
    }
    if let Some(session) = req.session_pool {
        if let Some(v) = free.iter().find(|v| v.pool_id == session) {
            return Decision::Place(v.pool_id.clone());
        }
    }
    if let Some(balance) = req.cache_balance {
        let cached = free.iter().filter(|v| v.prefix_blocks > 0).max_by(|a, b| {
            a.prefix_blocks
                .cmp(&b.prefix_blocks)
                .then(b.in_flight.cmp(&a.in_flight))
                .then(b.pool_id.cmp(&a.pool_id))
        });
        let least_busy = free.iter().map(|v| v.in_flight).min().unwrap_or(0);
        if let Some(v) = cached {
            if v.in_flight <= least_busy.saturating_add(balance) {
                return Decision::Place(v.pool_id.clone());
            }
        }
    }
    free.sort_by(|a, b| {
        b.free_slots()
            .cmp(&a.free_slots())
            .then(b.vram_free_bytes.cmp(&a.vram_free_bytes))
            .then(a.pool_id.cmp(&b.pool_id))
    });
    Decision::Place(free[0].pool_id.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(id: &str, model: &str, total: u32, busy: u32) -> PoolView {
        PoolView {
            pool_id: id.into(),
            model_id: model.into(),
            ready: true,
            draining: false,
            slots_total: total,
            in_flight: busy,
            vram_free_bytes: None,
            ctx_max: None,
            embeddings: false,
            prefix_blocks: 0,
        }
    }

    // covers: ORCH-2201, OAI-7106
    #[test]
    fn embeddings_and_generation_go_only_to_their_own_pools() {
        let plain = pool("plain", "m", 2, 0);
        let embed = PoolView {
            embeddings: true,
            ..pool("embed", "m", 1, 0)
        };
        let wants = PlacementRequest {
            embeddings: true,
            ..req("m")
        };
        assert_eq!(place(std::slice::from_ref(&plain), &wants), Decision::Wait);
        assert_eq!(
            place(&[plain.clone(), embed.clone()], &wants),
            Decision::Place("embed".into())
        );
        // A generation never goes to an embeddings pool.
        assert_eq!(
            place(&[embed.clone(), plain.clone()], &req("m")),
            Decision::Place("plain".into())
        );
        assert_eq!(
            place(std::slice::from_ref(&embed), &req("m")),
            Decision::Wait
        );
    }

    fn req(model: &str) -> PlacementRequest<'_> {
        PlacementRequest {
            model,
            ..Default::default()
        }
    }

    // covers: ORCH-2201
    #[test]
    fn a_task_needing_more_context_than_a_pool_has_goes_elsewhere_or_waits() {
        let small = PoolView {
            ctx_max: Some(512),
            ..pool("a", "m", 4, 0)
        };
        let large = PoolView {
            ctx_max: Some(4096),
            ..pool("b", "m", 1, 0)
        };
        let need = |c| PlacementRequest {
            min_ctx: Some(c),
            ..req("m")
        };
        assert_eq!(
            place(&[small.clone(), large.clone()], &need(1024)),
            Decision::Place("b".into())
        );
        assert_eq!(
            place(&[small.clone(), large], &need(512)),
            Decision::Place("a".into())
        );
        assert_eq!(place(&[small], &need(1024)), Decision::Wait);
    }

    // covers: ORCH-2211
    #[test]
    fn a_strict_task_goes_only_to_a_single_slot_pool() {
        let wide = pool("a", "m", 4, 0);
        let single = pool("b", "m", 1, 0);
        let strict = PlacementRequest {
            single_slot: true,
            ..req("m")
        };
        assert_eq!(
            place(&[wide.clone(), single], &strict),
            Decision::Place("b".into())
        );
        assert_eq!(place(&[wide], &strict), Decision::Wait);
    }

    // covers: ORCH-2202
    #[test]
    fn most_free_slots_then_pool_id() {
        let pools = vec![
            pool("b", "m", 4, 1),
            pool("a", "m", 4, 1),
            pool("c", "m", 4, 3),
        ];
        assert_eq!(place(&pools, &req("m")), Decision::Place("a".into()));
    }

    // covers: ORCH-2202
    #[test]
    fn vram_breaks_ties_before_pool_id() {
        let mut a = pool("a", "m", 2, 0);
        let mut b = pool("b", "m", 2, 0);
        a.vram_free_bytes = Some(1);
        b.vram_free_bytes = Some(2);
        assert_eq!(place(&[a, b], &req("m")), Decision::Place("b".into()));
    }

    // covers: ORCH-2201
    #[test]
    fn unready_draining_other_model_and_full_pools_are_skipped() {
        let mut unready = pool("a", "m", 2, 0);
        unready.ready = false;
        let mut draining = pool("b", "m", 2, 0);
        draining.draining = true;
        let pools = vec![
            unready,
            draining,
            pool("c", "other", 2, 0),
            pool("d", "m", 1, 1),
        ];
        assert_eq!(place(&pools, &req("m")), Decision::Wait);
    }

    // covers: ORCH-2207
    #[test]
    fn session_affinity_wins_while_its_pool_has_a_slot() {
        let pools = vec![pool("a", "m", 4, 0), pool("b", "m", 4, 3)];
        let r = PlacementRequest {
            session_pool: Some("b"),
            ..req("m")
        };
        assert_eq!(place(&pools, &r), Decision::Place("b".into()));
        let full = vec![pool("a", "m", 4, 0), pool("b", "m", 4, 4)];
        assert_eq!(place(&full, &r), Decision::Place("a".into()));
    }

    // covers: ORCH-2204
    #[test]
    fn pin_never_falls_back_silently() {
        let pools = vec![pool("a", "m", 4, 0), pool("b", "m", 1, 1)];
        let pin = Placement {
            mode: PlacementMode::Pin,
            pin_pool_id: Some("b".into()),
            ..Default::default()
        };
        let r = PlacementRequest {
            placement: Some(&pin),
            ..req("m")
        };
        assert_eq!(place(&pools, &r), Decision::Wait);
        let fallback = Placement {
            allow_fallback: true,
            ..pin
        };
        let r = PlacementRequest {
            placement: Some(&fallback),
            ..req("m")
        };
        assert_eq!(place(&pools, &r), Decision::Place("a".into()));
    }

    // covers: ORCH-2204
    #[test]
    fn prefer_and_avoid() {
        let pools = vec![pool("a", "m", 4, 0), pool("b", "m", 4, 3)];
        let prefer = Placement {
            mode: PlacementMode::Prefer,
            prefer_pools: vec!["b".into()],
            ..Default::default()
        };
        assert_eq!(
            place(
                &pools,
                &PlacementRequest {
                    placement: Some(&prefer),
                    ..req("m")
                }
            ),
            Decision::Place("b".into())
        );
        let avoid = Placement {
            avoid_pools: vec!["a".into()],
            ..Default::default()
        };
        assert_eq!(
            place(
                &pools,
                &PlacementRequest {
                    placement: Some(&avoid),
                    ..req("m")
                }
            ),
            Decision::Place("b".into())
        );
    }

    // covers: ORCH-2212
    #[test]
    fn retry_avoids_the_failed_pool_only_when_another_is_free() {
        let pools = vec![pool("a", "m", 4, 0), pool("b", "m", 4, 0)];
        let r = PlacementRequest {
            retry_avoid: Some("a"),
            ..req("m")
        };
        assert_eq!(place(&pools, &r), Decision::Place("b".into()));
        let single = vec![pool("a", "m", 4, 0)];
        assert_eq!(place(&single, &r), Decision::Place("a".into()));
    }

    // covers: ORCH-2209
    #[test]
    fn the_longest_cached_prefix_wins_unless_its_pool_is_busier_than_the_balance_allows() {
        let cached = |id: &str, busy: u32, blocks: u32| PoolView {
            prefix_blocks: blocks,
            ..pool(id, "m", 4, busy)
        };
        let aware = |balance| PlacementRequest {
            cache_balance: Some(balance),
            ..req("m")
        };
        // Least busy would be "a"; "z" holds the prompt's prefix.
        let pools = [cached("a", 0, 0), cached("z", 1, 5)];
        assert_eq!(place(&pools, &aware(2)), Decision::Place("z".into()));
        assert_eq!(
            place(&pools, &req("m")),
            Decision::Place("a".into()),
            "off: least busy"
        );
        // Beyond the balance the least busy pool takes it.
        let busy = [cached("a", 0, 0), cached("z", 3, 5)];
        assert_eq!(place(&busy, &aware(2)), Decision::Place("a".into()));
        // The longer match wins; session affinity stays the strongest hint.
        let both = [cached("a", 0, 2), cached("z", 0, 5)];
        assert_eq!(place(&both, &aware(2)), Decision::Place("z".into()));
        let session = PlacementRequest {
            session_pool: Some("a"),
            ..aware(2)
        };
        assert_eq!(place(&both, &session), Decision::Place("a".into()));
        // A full pool is never chosen for its cache.
        let full = [cached("a", 0, 0), cached("z", 4, 9)];
        assert_eq!(place(&full, &aware(8)), Decision::Place("a".into()));
    }

    proptest! {
        /// A placed pool always serves the model, is ready, not draining, has a free slot and
        /// holds the requested context — whatever the prefix index says.
        // covers: ORCH-2201
        #[test]
        fn placement_respects_hard_constraints(spec in proptest::collection::vec((0u8..3, any::<bool>(), any::<bool>(), 1u32..4, 0u32..5, 0u32..6), 0..8), balance in proptest::option::of(0u32..4)) {
            let pools: Vec<PoolView> = spec.iter().enumerate().map(|(i, (m, ready, draining, total, busy, blocks))| PoolView {
                pool_id: format!("p{i}"),
                model_id: format!("m{m}"),
                ready: *ready,
                draining: *draining,
                slots_total: *total,
                in_flight: *busy,
                vram_free_bytes: None,
                ctx_max: Some(512 * (1 + i as u32 % 3)),
                embeddings: i % 2 == 0,
                prefix_blocks: *blocks,
            }).collect();
            let request = PlacementRequest { min_ctx: Some(1024), embeddings: true, cache_balance: balance, ..req("m0") };
            let ok = |v: &PoolView| v.model_id == "m0" && v.ready && !v.draining && v.free_slots() > 0 && v.ctx_max >= Some(1024) && v.embeddings;
            match place(&pools, &request) {
                Decision::Place(id) => {
                    let v = pools.iter().find(|p| p.pool_id == id).unwrap();
                    prop_assert!(ok(v));
                }
                Decision::Wait => prop_assert!(!pools.iter().any(ok)),
            }
        }
    }
}
