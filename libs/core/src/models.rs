//! Models on demand, the policy: which node loads a cold model, which resident models make
//! room for it, which idle ones unload, and when a node may swap models while tasks of others
//! wait. Pure functions of the fleet's state as the caller saw it at `now`; they decide, the
//! daemons act (load, unload) and report back.
//!
//! The rules: a node only loads a model its catalog has; a load never takes a node over its
//! memory budget; only an *idle* model is ever evicted or unloaded — loaded (not loading), no
//! task running or placed on it, not pinned, resident at least its `min_resident`; among idle
//! models the least recently used go first. A model that fits no node of its catalog even with
//! that node empty can never be served, and says so.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A model a node may load: its footprint and how it may be evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogModel {
    pub id: String,
    /// Memory it takes once loaded (estimated before its first load, then measured).
    pub bytes: u64,
    /// Never evicted nor unloaded when idle.
    pub pinned: bool,
    /// Not evicted sooner than this after its load.
    pub min_resident: Duration,
    /// Unloaded after this long without a task (`None`: never).
    pub idle_unload: Option<Duration>,
}

/// A model loaded (or loading) on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub id: String,
    pub bytes: u64,
    pub pinned: bool,
    pub min_resident: Duration,
    pub idle_unload: Option<Duration>,
    /// Still loading: counted against the budget, never evicted.
    pub loading: bool,
    pub loaded_at: Instant,
    /// When a task last ran (or was placed) on it; its load when none has.
    pub last_used: Instant,
    /// Tasks running or placed on it now.
    pub busy: u32,
}

impl Resident {
    /// Whether it may be evicted or unloaded at `now`.
    pub fn idle(&self, now: Instant) -> bool {
        !self.loading
            && self.busy == 0
            && !self.pinned
            && now.saturating_duration_since(self.loaded_at) >= self.min_resident
    }
}

/// One node as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeModels {
    pub node_id: String,
    /// Memory the node's models may take in all.
    pub budget: u64,
    /// What it may load, by model id.
    pub catalog: BTreeMap<String, CatalogModel>,
    pub resident: Vec<Resident>,
}

impl NodeModels {
    /// Memory its resident (and loading) models take.
    pub fn used(&self) -> u64 {
        self.resident.iter().map(|r| r.bytes).sum()
    }

    /// Memory left in its budget.
    pub fn free(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }

    pub fn holds(&self, model: &str) -> bool {
        self.resident.iter().any(|r| r.id == model)
    }

    /// The idle models to unload, least recently used first, so that `need` bytes are free;
    /// `None` when even every idle model would not make room.
    pub fn eviction_for(&self, need: u64, now: Instant) -> Option<Vec<String>> {
        // Signed: a node may be over its budget (a budget lowered under loaded models).
        let mut room = i128::from(self.budget) - i128::from(self.used());
        let need = i128::from(need);
        if room >= need {
            return Some(Vec::new());
        }
        let mut idle: Vec<&Resident> = self.resident.iter().filter(|r| r.idle(now)).collect();
        idle.sort_by(|a, b| (a.last_used, &a.id).cmp(&(b.last_used, &b.id)));
        let mut evict = Vec::new();
        for r in idle {
            evict.push(r.id.clone());
            room += i128::from(r.bytes);
            if room >= need {
                return Some(evict);
            }
        }
        None
    }

    /// Idle models past their `idle_unload` at `now`.
    pub fn idle_unloads(&self, now: Instant) -> Vec<String> {
        self.resident
            .iter()
            .filter(|r| r.idle(now))
            .filter(|r| {
                r.idle_unload
                    .is_some_and(|after| now.saturating_duration_since(r.last_used) >= after)
            })
            .map(|r| r.id.clone())
            .collect()
    }
}

/// Where a cold model is to be loaded, and what makes room for it there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    pub node_id: String,
    /// Idle models to unload first (empty: the budget has room).
    pub evict: Vec<String>,
}

/// Why no node loads the model now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoLoad {
    /// No node's catalog has it.
    Unknown,
    /// It is larger than the budget of every node whose catalog has it: it can never load.
    NeverFits { bytes: u64, largest_budget: u64 },
    /// It fits somewhere, but not now: the models in the way are busy, loading, pinned or
    /// too recently loaded. The task waits.
    NoRoomNow,
}

/// Which node loads `model` (not resident anywhere), and what it evicts: first a node with room
/// in its budget (the most room), then the node where unloading idle models makes room at the
/// least cost (fewest bytes evicted, then the least recently used), ties by node id.
pub fn plan_load(model: &str, nodes: &[NodeModels], now: Instant) -> Result<LoadPlan, NoLoad> {
    let candidates: Vec<(&NodeModels, &CatalogModel)> = nodes
        .iter()
        .filter_map(|n| n.catalog.get(model).map(|m| (n, m)))
        .collect();
    if candidates.is_empty() {
        return Err(NoLoad::Unknown);
    }
    let largest_budget = candidates.iter().map(|(n, _)| n.budget).max().unwrap_or(0);
    let bytes = candidates.iter().map(|(_, m)| m.bytes).min().unwrap_or(0);
    if candidates.iter().all(|(n, m)| m.bytes > n.budget) {
        return Err(NoLoad::NeverFits {
            bytes,
            largest_budget,
        });
    }
    // With room: the most free memory after the load.
    if let Some((node, _)) = candidates
        .iter()
        .filter(|(n, m)| n.free() >= m.bytes)
        .max_by(|(a, am), (b, bm)| {
            (a.free() - am.bytes, std::cmp::Reverse(&a.node_id))
                .cmp(&(b.free() - bm.bytes, std::cmp::Reverse(&b.node_id)))
        })
    {
        return Ok(LoadPlan {
            node_id: node.node_id.clone(),
            evict: Vec::new(),
        });
    }
    // Making room: the cheapest eviction.
    let mut best: Option<((u64, Instant, String), LoadPlan)> = None;
    for (node, m) in &candidates {
        let Some(evict) = node.eviction_for(m.bytes, now) else {
            continue;
        };
        let gone: Vec<&Resident> = node
            .resident
            .iter()
            .filter(|r| evict.contains(&r.id))
            .collect();
        let cost = (
            gone.iter().map(|r| r.bytes).sum::<u64>(),
            gone.iter().map(|r| r.last_used).max().unwrap_or(now),
            node.node_id.clone(),
        );
        if best.as_ref().is_none_or(|(c, _)| cost < *c) {
            best = Some((
                cost,
                LoadPlan {
                    node_id: node.node_id.clone(),
                    evict,
                },
            ));
        }
    }
    best.map(|(_, plan)| plan).ok_or(NoLoad::NoRoomNow)
}

/// Whether a node that swapped models at `last_swap` may swap again at `now` while tasks of
/// its resident models still wait: at most one swap per `quantum`, so competing cold models
/// are served in batches instead of one swap per request. A node with nothing waiting on its
/// residents may swap at once.
pub fn may_swap(
    last_swap: Option<Instant>,
    residents_have_waiting: bool,
    quantum: Duration,
    now: Instant,
) -> bool {
    !residents_have_waiting
        || last_swap.is_none_or(|at| now.saturating_duration_since(at) >= quantum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: Duration = Duration::from_secs(1);

    fn catalog(models: &[(&str, u64)]) -> BTreeMap<String, CatalogModel> {
        models
            .iter()
            .map(|(id, bytes)| {
                (
                    id.to_string(),
                    CatalogModel {
                        id: id.to_string(),
                        bytes: *bytes,
                        pinned: false,
                        min_resident: 10 * S,
                        idle_unload: Some(300 * S),
                    },
                )
            })
            .collect()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn resident(id: &str, bytes: u64, t0: Instant, loaded: u64, used: u64, busy: u32) -> Resident {
        Resident {
            id: id.into(),
            bytes,
            pinned: false,
            min_resident: 10 * S,
            idle_unload: Some(300 * S),
            loading: false,
            loaded_at: t0 + secs(loaded),
            last_used: t0 + secs(used),
            busy,
        }
    }

    fn node(id: &str, budget: u64, models: &[(&str, u64)], resident: Vec<Resident>) -> NodeModels {
        NodeModels {
            node_id: id.into(),
            budget,
            catalog: catalog(models),
            resident,
        }
    }

    #[test]
    fn a_node_with_room_loads_without_evicting_and_the_roomiest_wins() {
        let t0 = Instant::now();
        let now = t0 + 100 * S;
        let nodes = [
            node("a", 10, &[("m", 4)], vec![resident("x", 5, t0, 0, 0, 0)]),
            node("b", 10, &[("m", 4)], vec![]),
            node("c", 100, &[("other", 4)], vec![]),
        ];
        assert_eq!(
            plan_load("m", &nodes, now),
            Ok(LoadPlan {
                node_id: "b".into(),
                evict: vec![]
            })
        );
        assert_eq!(plan_load("nowhere", &nodes, now), Err(NoLoad::Unknown));
    }

    #[test]
    fn room_is_made_from_the_least_recently_used_idle_models_only() {
        let t0 = Instant::now();
        let now = t0 + 100 * S;
        let a = node(
            "a",
            10,
            &[("m", 6)],
            vec![
                resident("busy", 3, t0, 0, 0, 1),
                resident("old", 3, t0, 0, 10, 0),
                resident("recent", 3, t0, 0, 90, 0),
            ],
        );
        // 1 free; 6 needed: "old" (LRU) then "recent"; the busy one never.
        assert_eq!(
            a.eviction_for(6, now),
            Some(vec!["old".to_string(), "recent".to_string()])
        );
        assert_eq!(a.eviction_for(4, now), Some(vec!["old".to_string()]));
        assert_eq!(
            a.eviction_for(8, now),
            None,
            "only a busy model would make room"
        );
        // Loaded 5 s ago (under min_resident): not evicted.
        let young = node("y", 4, &[("m", 4)], vec![resident("new", 4, t0, 95, 95, 0)]);
        assert_eq!(plan_load("m", &[young], now), Err(NoLoad::NoRoomNow));
    }

    #[test]
    fn a_model_larger_than_every_budget_of_its_catalog_can_never_load() {
        let nodes = [
            node("a", 10, &[("huge", 12)], vec![]),
            node("b", 11, &[("huge", 12)], vec![]),
        ];
        assert_eq!(
            plan_load("huge", &nodes, Instant::now()),
            Err(NoLoad::NeverFits {
                bytes: 12,
                largest_budget: 11
            })
        );
    }

    #[test]
    fn idle_models_unload_after_their_idle_time_and_pinned_or_busy_ones_never() {
        let t0 = Instant::now();
        let mut pinned = resident("pinned", 1, t0, 0, 0, 0);
        pinned.pinned = true;
        let n = node(
            "a",
            10,
            &[],
            vec![
                resident("idle", 1, t0, 0, 0, 0),
                resident("busy", 1, t0, 0, 0, 2),
                resident("used", 1, t0, 0, 250, 0),
                pinned,
            ],
        );
        assert!(n.idle_unloads(t0 + 299 * S).is_empty());
        assert_eq!(n.idle_unloads(t0 + 300 * S), vec!["idle".to_string()]);
        assert_eq!(
            n.idle_unloads(t0 + 550 * S),
            vec!["idle".to_string(), "used".to_string()]
        );
    }

    #[test]
    fn swaps_come_at_most_once_a_quantum_while_residents_have_waiting_tasks() {
        let t0 = Instant::now();
        let q = 30 * S;
        assert!(may_swap(None, true, q, t0));
        assert!(!may_swap(Some(t0), true, q, t0 + 29 * S));
        assert!(may_swap(Some(t0), true, q, t0 + 30 * S));
        assert!(
            may_swap(Some(t0), false, q, t0 + S),
            "nothing waits: swap at once"
        );
    }

    /// A resident as generated: bytes, pinned, loading, loaded at (s), used at (s), busy.
    type ArbResident = (u64, bool, bool, u64, u64, u32);

    /// A node as generated: its budget and its residents.
    fn arb_node() -> impl Strategy<Value = (u64, Vec<ArbResident>)> {
        (
            1u64..40,
            proptest::collection::vec(
                (
                    1u64..12,
                    any::<bool>(),
                    any::<bool>(),
                    0u64..100,
                    0u64..100,
                    0u32..2,
                ),
                0..5,
            ),
        )
    }

    proptest! {
        #[test]
        fn a_plan_never_exceeds_a_budget_nor_evicts_a_busy_pinned_young_or_loading_model(
            specs in proptest::collection::vec(arb_node(), 1..4),
            need in 1u64..30,
        ) {
            let t0 = Instant::now();
            let now = t0 + 100 * S;
            let nodes: Vec<NodeModels> = specs
                .iter()
                .enumerate()
                .map(|(i, (budget, rs))| {
                    let resident = rs
                        .iter()
                        .enumerate()
                        .map(|(k, (bytes, pinned, loading, loaded, used, busy))| Resident {
                            id: format!("r{k}"),
                            bytes: *bytes,
                            pinned: *pinned,
                            min_resident: 10 * S,
                            idle_unload: None,
                            loading: *loading,
                            loaded_at: t0 + secs(*loaded),
                            last_used: t0 + secs((*loaded).max(*used)),
                            busy: *busy,
                        })
                        .collect();
                    NodeModels {
                        node_id: format!("n{i}"),
                        budget: *budget,
                        catalog: catalog(&[("m", need)]),
                        resident,
                    }
                })
                .collect();
            match plan_load("m", &nodes, now) {
                Ok(plan) => {
                    let n = nodes.iter().find(|n| n.node_id == plan.node_id).unwrap();
                    let freed: u64 = n
                        .resident
                        .iter()
                        .filter(|r| plan.evict.contains(&r.id))
                        .inspect(|r| assert!(r.idle(now), "evicted {r:?}"))
                        .map(|r| r.bytes)
                        .sum();
                    prop_assert!(n.used() - freed + need <= n.budget, "{n:?} {plan:?}");
                }
                Err(NoLoad::NeverFits { .. }) => {
                    prop_assert!(nodes.iter().all(|n| need > n.budget));
                }
                Err(NoLoad::NoRoomNow) => {
                    // No node could make room from its idle models.
                    for n in &nodes {
                        let idle: u64 = n.resident.iter().filter(|r| r.idle(now)).map(|r| r.bytes).sum();
                        let room = i128::from(n.budget) - i128::from(n.used()) + i128::from(idle);
                        prop_assert!(room < i128::from(need), "{n:?} could have made room");
                    }
                }
                Err(NoLoad::Unknown) => prop_assert!(false, "every node has the model"),
            }
        }
    }
}
