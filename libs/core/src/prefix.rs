//! An approximate prefix index per pool, for cache-aware placement: llama-server keeps each
//! slot's prompt in its KV cache and reuses the longest common prefix, so a task whose prompt
//! starts like one a pool served recently computes less there.
//!
//! A prompt is cut into blocks of [`BLOCK`] bytes; block k is named by a hash chained over
//! blocks 1..=k (`prefix_chain`), so a name stands for the whole prefix up to it — a radix
//! tree at block granularity, kept as a set of names. The longest match of a prompt on a pool
//! is the longest run of its chain the pool's set holds. Each pool keeps at most `capacity`
//! names; beyond it the least recently used half goes (amortised O(1) per insert).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Bytes per block: a prefix shorter than one block never counts.
pub const BLOCK: usize = 64;

/// The chained block names of `text`'s first `max_blocks` whole blocks (in the global scope).
pub fn prefix_chain(text: &str, max_blocks: usize) -> Vec<u64> {
    scoped_prefix_chain(0, text, max_blocks)
}

/// The scope of prefixes named by `name` (a client key): one key's blocks never match
/// another's, so placement tells no key what another key's prompts began with.
pub fn prefix_scope(name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    // Never the global scope's 0.
    h.finish() | 1
}

/// [`prefix_chain`] within `scope` (0: global; else [`prefix_scope`]).
pub fn scoped_prefix_chain(scope: u64, text: &str, max_blocks: usize) -> Vec<u64> {
    let bytes = text.as_bytes();
    let mut chain = Vec::with_capacity((bytes.len() / BLOCK).min(max_blocks));
    let mut previous = scope;
    for block in bytes.chunks_exact(BLOCK).take(max_blocks) {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        previous.hash(&mut h);
        block.hash(&mut h);
        previous = h.finish();
        chain.push(previous);
    }
    chain
}

#[derive(Debug, Default)]
struct PoolPrefixes {
    /// Block name → when it was last inserted or matched.
    names: HashMap<u64, u64>,
}

/// The prefix names each pool has served, bounded per pool.
#[derive(Debug)]
pub struct PrefixIndex {
    pools: HashMap<String, PoolPrefixes>,
    capacity: usize,
    clock: u64,
}

impl PrefixIndex {
    /// At most `capacity` block names per pool (at least 2).
    pub fn new(capacity: usize) -> Self {
        Self {
            pools: HashMap::new(),
            capacity: capacity.max(2),
            clock: 0,
        }
    }

    /// How many leading blocks of `chain` the pool has served (0 when none, or unknown pool).
    pub fn matched(&self, pool: &str, chain: &[u64]) -> u32 {
        let Some(p) = self.pools.get(pool) else {
            return 0;
        };
        chain
            .iter()
            .take_while(|name| p.names.contains_key(name))
            .count() as u32
    }

    /// Records that `pool` now holds `chain` (a task with that prompt was placed there).
    pub fn insert(&mut self, pool: &str, chain: &[u64]) {
        if chain.is_empty() {
            return;
        }
        self.clock += 1;
        let now = self.clock;
        let capacity = self.capacity;
        if !self.pools.contains_key(pool) {
            self.pools.insert(pool.to_string(), PoolPrefixes::default());
        }
        let Some(p) = self.pools.get_mut(pool) else {
            return;
        };
        for name in chain {
            p.names.insert(*name, now);
        }
        if p.names.len() > capacity {
            // Keep the most recently used half.
            let mut ages: Vec<u64> = p.names.values().copied().collect();
            let keep = capacity / 2;
            let cut_index = ages.len() - keep;
            let (_, cut, _) = ages.select_nth_unstable(cut_index);
            let cut = *cut;
            p.names.retain(|_, used| *used >= cut);
            // Equal ages at the cut can leave more than `keep`; never more than the capacity.
            if p.names.len() > capacity {
                let excess = p.names.len() - capacity;
                let drop: Vec<u64> = p
                    .names
                    .iter()
                    .filter(|(_, used)| **used == cut)
                    .map(|(name, _)| *name)
                    .take(excess)
                    .collect();
                for name in drop {
                    p.names.remove(&name);
                }
            }
        }
    }

    /// `pool`'s engine holds none of what it was given (it lost its caches).
    pub fn forget_pool(&mut self, pool: &str) {
        self.pools.remove(pool);
    }

    /// Keeps only the pools `keep` names (pools that went away take their names with them).
    pub fn retain_pools(&mut self, keep: impl Fn(&str) -> bool) {
        self.pools.retain(|pool, _| keep(pool));
    }

    /// Block names kept for `pool`.
    #[cfg(test)]
    fn len(&self, pool: &str) -> usize {
        self.pools.get(pool).map_or(0, |p| p.names.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // covers: ORCH-2209
    #[test]
    fn shared_prefixes_share_names_and_a_difference_ends_the_match() {
        let system = "s".repeat(BLOCK * 3);
        let a = prefix_chain(&format!("{system}{}", "a".repeat(BLOCK * 2)), 64);
        let b = prefix_chain(&format!("{system}{}", "b".repeat(BLOCK * 2)), 64);
        assert_eq!(a.len(), 5);
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3], b[3]);
        let mut index = PrefixIndex::new(1024);
        index.insert("p1", &a);
        assert_eq!(index.matched("p1", &a), 5);
        assert_eq!(index.matched("p1", &b), 3);
        assert_eq!(index.matched("p2", &a), 0);
        // A prompt shorter than a block names nothing.
        assert!(prefix_chain("short", 64).is_empty());
        // One text in two keys' scopes shares no block name, nor with the global scope.
        let text = "s".repeat(BLOCK * 3);
        let (alice, bob) = (prefix_scope("alice"), prefix_scope("bob"));
        let a = scoped_prefix_chain(alice, &text, 64);
        let b = scoped_prefix_chain(bob, &text, 64);
        assert_eq!(a, scoped_prefix_chain(alice, &text, 64));
        assert!(a
            .iter()
            .all(|n| !b.contains(n) && !prefix_chain(&text, 64).contains(n)));
        // The chain is cut at max_blocks.
        assert_eq!(prefix_chain(&"x".repeat(BLOCK * 10), 4).len(), 4);
        index.retain_pools(|p| p != "p1");
        assert_eq!(index.matched("p1", &a), 0);
    }

    // covers: ORCH-2210
    #[test]
    fn the_least_recently_used_names_go_first_when_a_pool_is_full() {
        let mut index = PrefixIndex::new(8);
        let old = prefix_chain(&"o".repeat(BLOCK * 4), 64);
        let new = prefix_chain(&"n".repeat(BLOCK * 4), 64);
        index.insert("p", &old);
        index.insert("p", &new);
        assert_eq!(index.len("p"), 8);
        let newer = prefix_chain(&"w".repeat(BLOCK * 2), 64);
        index.insert("p", &newer);
        assert!(index.len("p") <= 8);
        assert_eq!(index.matched("p", &newer), 2);
        assert_eq!(index.matched("p", &old), 0, "the oldest went first");
    }

    proptest! {
        // covers: ORCH-2210
        #[test]
        fn a_pool_never_keeps_more_than_its_capacity_and_a_match_never_exceeds_the_chain(
            capacity in 2usize..64,
            prompts in proptest::collection::vec((0usize..3, 0usize..12, 0u8..4), 1..60),
        ) {
            let mut index = PrefixIndex::new(capacity);
            for (pool, blocks, fill) in prompts {
                let text: String = std::iter::repeat_n(char::from(b'a' + fill), blocks * BLOCK).collect();
                let chain = prefix_chain(&text, 64);
                let name = format!("p{pool}");
                index.insert(&name, &chain);
                prop_assert!(index.len(&name) <= capacity);
                // A chain just inserted, short enough to survive an eviction, matches whole.
                if chain.len() <= capacity / 2 {
                    prop_assert_eq!(index.matched(&name, &chain) as usize, chain.len());
                }
                prop_assert!(index.matched(&name, &chain) as usize <= chain.len());
            }
        }
    }
}
