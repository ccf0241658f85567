//! Which engine slot of a pool holds which prompt: llama-server keeps each slot's last prompt in
//! its KV cache and reuses the longest common prefix when the next request lands in the same
//! slot. Cache-aware placement pins a task (`id_slot`) to the free slot whose last prompt
//! shares the most leading blocks with the task's (`prefix_chain`), the least recently used free
//! slot when none shares any. Slots are busy from `pick` to `release`: a pinned request never
//! waits in the engine behind another of this orchestrator's requests.

/// One pick: the slot, and how many leading blocks its cache shares with the prompt. (A
/// prompt the slot held before is not forgotten by the pool: llama-server keeps idle slots'
/// prompts in host memory, `--cache-ram`, and restores them into any slot.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPick {
    pub slot: u32,
    pub matched: usize,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    busy: bool,
    /// Block names of the last prompt it was given.
    chain: Vec<u64>,
    /// Pick clock when it was last picked (0: never).
    used: u64,
}

/// The slots of one pool.
#[derive(Debug, Clone)]
pub struct SlotMap {
    slots: Vec<Slot>,
    clock: u64,
}

fn common_prefix(a: &[u64], b: &[u64]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl SlotMap {
    pub fn new(slots: u32) -> Self {
        Self {
            slots: vec![Slot::default(); slots as usize],
            clock: 0,
        }
    }

    pub fn len(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn busy(&self) -> u32 {
        self.slots.iter().filter(|s| s.busy).count() as u32
    }

    /// Leading blocks of `chain` the best slot holds (busy or not).
    pub fn matched(&self, chain: &[u64]) -> usize {
        self.slots
            .iter()
            .map(|s| common_prefix(&s.chain, chain))
            .max()
            .unwrap_or(0)
    }

    /// Takes the free slot sharing the longest prefix with `chain` (the least recently used
    /// one among equals), marks it busy and records `chain` as its prompt. `None` when every
    /// slot is busy.
    pub fn pick(&mut self, chain: &[u64]) -> Option<SlotPick> {
        let (index, matched) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.busy)
            .map(|(i, s)| (i, common_prefix(&s.chain, chain)))
            // Longest match first, then least recently used, then lowest index.
            .min_by_key(|&(i, m)| (std::cmp::Reverse(m), self.slots[i].used, i))?;
        self.clock += 1;
        let slot = &mut self.slots[index];
        slot.chain = chain.to_vec();
        slot.busy = true;
        slot.used = self.clock;
        Some(SlotPick {
            slot: index as u32,
            matched,
        })
    }

    /// The slot's request ended.
    pub fn release(&mut self, slot: u32) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.busy = false;
        }
    }

    /// The engine's caches are gone (it restarted, or said it held nothing): every slot's
    /// prompt is forgotten except `keep`'s; busy slots stay busy.
    pub fn forget(&mut self, keep: Option<u32>) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            if Some(i as u32) != keep {
                s.chain.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // covers: ORCH-2216
    #[test]
    fn a_prompt_goes_back_to_the_slot_that_holds_its_start() {
        let mut m = SlotMap::new(3);
        let a = m.pick(&[1, 2, 3]).unwrap();
        let b = m.pick(&[7, 8]).unwrap();
        m.release(a.slot);
        m.release(b.slot);
        let again = m.pick(&[1, 2, 3, 4]).unwrap();
        assert_eq!((again.slot, again.matched), (a.slot, 3));
        // No shared start: the least recently used free slot, never picked so far.
        let fresh = m.pick(&[9]).unwrap();
        assert_eq!((fresh.slot, fresh.matched), (2, 0));
    }

    #[test]
    fn a_slot_taken_over_holds_the_new_prompt() {
        let mut m = SlotMap::new(1);
        let first = m.pick(&[1, 2, 3]).unwrap();
        m.release(first.slot);
        let second = m.pick(&[1, 5]).unwrap();
        assert_eq!(second.matched, 1);
        assert!(m.pick(&[1]).is_none(), "its only slot is busy");
        m.release(second.slot);
        assert_eq!(m.matched(&[1, 2, 3]), 1);
        assert_eq!(m.matched(&[1, 5, 6]), 2);
    }

    #[test]
    fn forgetting_keeps_busy_slots_busy_and_one_prompt_if_asked() {
        let mut m = SlotMap::new(2);
        let a = m.pick(&[1, 2]).unwrap();
        let b = m.pick(&[3, 4]).unwrap();
        m.forget(Some(b.slot));
        assert_eq!(m.busy(), 2);
        assert_eq!(m.matched(&[1, 2]), 0);
        assert_eq!(m.matched(&[3, 4]), 2);
        m.release(a.slot);
        assert_eq!(m.pick(&[1, 2]).unwrap().matched, 0);
    }

    proptest! {
        /// Never a busy slot, never beyond the slots, `None` only when all are busy; the pick
        /// has the longest match among free slots.
        #[test]
        fn picks_respect_busy_slots_and_prefer_the_longest_match(
            slots in 1u32..6,
            ops in proptest::collection::vec((any::<bool>(), proptest::collection::vec(0u64..4, 0..5), 0u32..6), 1..80),
        ) {
            let mut m = SlotMap::new(slots);
            let mut busy = std::collections::BTreeSet::new();
            for (take, chain, which) in ops {
                if take {
                    let before = m.clone();
                    match m.pick(&chain) {
                        Some(p) => {
                            prop_assert!(p.slot < slots);
                            prop_assert!(busy.insert(p.slot), "picked a busy slot");
                            let best = before.slots.iter().filter(|s| !s.busy).map(|s| common_prefix(&s.chain, &chain)).max().unwrap_or(0);
                            prop_assert_eq!(p.matched, best);
                        }
                        None => prop_assert_eq!(busy.len() as u32, slots),
                    }
                } else if busy.remove(&(which % slots)) {
                    m.release(which % slots);
                }
                prop_assert_eq!(m.busy(), busy.len() as u32);
            }
        }
    }
}
