//! Bounded admission queue: interactive before batch; within a class, a fair share between
//! flows (round robin, one entry each in turn; orchestratord's flows are client keys) and
//! FIFO within a flow (DESIGN §3; with one flow, FIFO within the class).

use std::collections::{HashMap, VecDeque};

use llorch_contracts::tasks::Priority;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionPolicy {
    /// A full queue answers 429.
    Reject,
    /// A full queue drops its oldest queued batch task to admit the new one.
    DropLru,
}

impl AdmissionPolicy {
    pub fn label(self) -> &'static str {
        match self {
            AdmissionPolicy::Reject => "reject",
            AdmissionPolicy::DropLru => "drop-lru",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    pub capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted<T> {
    /// 0-based position in dispatch order.
    pub position: usize,
    /// The weight queued ahead of it.
    pub weight_ahead: u64,
    /// Where the entry sits: finds it again in O(log n) (`rank`, `remove_key`).
    pub key: QueueKey,
    /// The entry dropped to make room (drop-lru).
    pub dropped: Option<T>,
}

/// An entry's place in the queue, given when it is queued. Keys are never reused: one that
/// left the queue (or was requeued under a new key) finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueueKey {
    priority: Priority,
    order: Order,
}

/// Dispatch order within a class: `(turn, seq)`. A flow's entries take turns one after the
/// other from the class's current turn on, so backlogged flows alternate; `seq` (arrival)
/// orders one turn. Retries put in front take negative turns.
type Order = (i64, i64);

/// Entries a block holds at most: finding an entry's position adds up one count per block
/// ahead of it, and removing one shifts at most a block.
const BLOCK: usize = 256;

/// A run of entries in dispatch order, with their count and weight summed.
#[derive(Debug, Clone)]
struct Block<T> {
    /// `(order, item, weight)`, order ascending.
    entries: Vec<(Order, T, u64)>,
    weight: u64,
}

impl<T> Block<T> {
    fn new() -> Self {
        Self {
            entries: Vec::new(),
            weight: 0,
        }
    }

    fn first_order(&self) -> Order {
        self.entries.first().map_or((i64::MAX, i64::MAX), |e| e.0)
    }
}

/// Flows remembered at most before those whose turns have passed are forgotten.
const FLOWS_KEPT: usize = 1024;

/// Flow ids are hashes already (orchestratord's: of the key's name): taken as they are.
#[derive(Debug, Clone, Copy, Default)]
struct FlowHasher(u64);

impl std::hash::Hasher for FlowHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Flows = HashMap<u64, i64, std::hash::BuildHasherDefault<FlowHasher>>;

/// One priority class, in [`Order`], with O(log n) lookup by key. Arrivals take increasing
/// sequence numbers and their flow's next turn; front insertions (retries) take decreasing
/// negative turns, so order is dispatch order.
#[derive(Debug, Clone)]
struct Class<T> {
    blocks: VecDeque<Block<T>>,
    len: usize,
    weight: u64,
    next_back: i64,
    next_front: i64,
    /// The latest turn dispatched: a flow with nothing queued starts at the next one (no
    /// credit for idle time).
    turn: i64,
    /// Each flow's last turn taken, while it may be ahead of `turn`.
    flows: Flows,
    /// `flows` is pruned when it holds this many.
    prune_at: usize,
    /// Entries per block at most (`BLOCK`; smaller in tests), twice that after an insertion
    /// in the middle (the block is then split).
    block: usize,
}

impl<T> Class<T> {
    fn new(block: usize) -> Self {
        Self {
            block: block.max(1),
            blocks: VecDeque::new(),
            len: 0,
            weight: 0,
            next_back: 0,
            next_front: -1,
            turn: 0,
            flows: Flows::default(),
            prune_at: FLOWS_KEPT,
        }
    }

    /// Queues `item` of `flow` at its flow's next turn; whether it went to the very back
    /// (nobody moved).
    fn push(&mut self, item: T, weight: u64, flow: u64) -> (Order, bool) {
        let seq = self.next_back;
        self.next_back += 1;
        if self.flows.len() >= self.prune_at {
            let turn = self.turn;
            self.flows.retain(|_, last| *last > turn);
            // Twice what is left before the next walk: pruning costs O(1) per arrival however
            // many flows stay ahead of the turn.
            self.prune_at = FLOWS_KEPT.max(2 * self.flows.len());
        }
        let last = self.flows.entry(flow).or_insert(self.turn);
        *last = (*last).max(self.turn) + 1;
        let order = (*last, seq);
        let at_back = self
            .blocks
            .back()
            .and_then(|b| b.entries.last())
            .is_none_or(|e| e.0 < order);
        if at_back {
            if self
                .blocks
                .back()
                .is_none_or(|b| b.entries.len() >= self.block)
            {
                self.blocks.push_back(Block::new());
            }
            if let Some(b) = self.blocks.back_mut() {
                b.entries.push((order, item, weight));
                b.weight += weight;
            }
        } else {
            // Into the block holding the first later entry (the last block whose first entry
            // is not later, or the first block).
            let b = self
                .blocks
                .partition_point(|b| b.first_order() <= order)
                .saturating_sub(1);
            if let Some(block) = self.blocks.get_mut(b) {
                let i = block.entries.partition_point(|e| e.0 < order);
                block.entries.insert(i, (order, item, weight));
                block.weight += weight;
                if block.entries.len() >= 2 * self.block {
                    let tail: Vec<_> = block.entries.split_off(self.block);
                    let moved: u64 = tail.iter().map(|e| e.2).sum();
                    block.weight -= moved;
                    self.blocks.insert(
                        b + 1,
                        Block {
                            entries: tail,
                            weight: moved,
                        },
                    );
                }
            }
        }
        self.len += 1;
        self.weight += weight;
        (order, at_back)
    }

    fn push_front(&mut self, item: T, weight: u64) -> Order {
        let order = (self.next_front, 0);
        self.next_front -= 1;
        if self
            .blocks
            .front()
            .is_none_or(|b| b.entries.len() >= self.block)
        {
            self.blocks.push_front(Block::new());
        }
        if let Some(b) = self.blocks.front_mut() {
            b.entries.insert(0, (order, item, weight));
            b.weight += weight;
        }
        self.len += 1;
        self.weight += weight;
        order
    }

    /// `(block, index)` of the entry at `order`.
    fn find(&self, order: Order) -> Option<(usize, usize)> {
        let b = self
            .blocks
            .partition_point(|b| b.first_order() <= order)
            .checked_sub(1)?;
        let i = self.blocks[b]
            .entries
            .binary_search_by_key(&order, |e| e.0)
            .ok()?;
        Some((b, i))
    }

    fn remove_at(&mut self, b: usize, i: usize) -> Option<(T, u64)> {
        let block = self.blocks.get_mut(b)?;
        if i >= block.entries.len() {
            return None;
        }
        let (_, item, weight) = block.entries.remove(i);
        block.weight -= weight;
        if block.entries.is_empty() {
            self.blocks.remove(b);
        }
        self.len -= 1;
        self.weight -= weight;
        if self.len == 0 {
            // Nothing queued: every flow starts level again.
            self.flows.clear();
        }
        Some((item, weight))
    }

    /// Entries ahead of `order` and their summed weight.
    fn rank(&self, order: Order) -> Option<(usize, u64)> {
        let (b, i) = self.find(order)?;
        let (mut count, mut weight) = (0, 0);
        for block in self.blocks.range(..b) {
            count += block.entries.len();
            weight += block.weight;
        }
        for e in &self.blocks[b].entries[..i] {
            weight += e.2;
        }
        Some((count + i, weight))
    }

    /// First entry (in order) for which `pick` decides, removed. With `dispatched`, its
    /// turn has come: flows with nothing queued start after it.
    fn take_first<D>(
        &mut self,
        dispatched: bool,
        mut pick: impl FnMut(&T) -> Option<D>,
    ) -> Option<(T, u64, D)> {
        let mut found = None;
        'walk: for (b, block) in self.blocks.iter().enumerate() {
            for (i, e) in block.entries.iter().enumerate() {
                if let Some(d) = pick(&e.1) {
                    found = Some((b, i, e.0 .0, d));
                    break 'walk;
                }
            }
        }
        let (b, i, turn, d) = found?;
        if dispatched {
            self.turn = self.turn.max(turn);
        }
        let (item, weight) = self.remove_at(b, i)?;
        Some((item, weight, d))
    }

    fn iter(&self) -> impl Iterator<Item = (&T, u64)> {
        self.blocks
            .iter()
            .flat_map(|b| b.entries.iter().map(|e| (&e.1, e.2)))
    }
}

/// Entries are dispatched interactive-first; within a class flows take turns, FIFO within a
/// flow (one flow: FIFO within the class). `T` carries the caller's
/// data; each entry also has a weight (its `max_tokens`, say) whose per-class sums are kept, so
/// "how much work is ahead" is O(1) at admission. Each entry gets a key when queued: its
/// position (and the weight ahead of it) and its removal take O(log n + n/256), not a walk of
/// the queue.
#[derive(Debug, Clone)]
pub struct AdmissionQueue<T> {
    capacity: usize,
    interactive: Class<T>,
    batch: Class<T>,
    /// Bumped whenever an entry's position may have changed (not on a plain append at the
    /// back), so position updates are sent only when there is something to tell.
    reorders: u64,
}

impl<T> AdmissionQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self::with_block(capacity, BLOCK)
    }

    fn with_block(capacity: usize, block: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            interactive: Class::new(block),
            batch: Class::new(block),
            reorders: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.interactive.len + self.batch.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn depth(&self, p: Priority) -> usize {
        self.class_ref(p).len
    }

    /// Changes whenever some entry's position may have moved.
    pub fn reorders(&self) -> u64 {
        self.reorders
    }

    /// Sum of the weights queued in a class.
    pub fn class_weight(&self, p: Priority) -> u64 {
        self.class_ref(p).weight
    }

    fn class_ref(&self, p: Priority) -> &Class<T> {
        match p {
            Priority::Interactive => &self.interactive,
            Priority::Batch => &self.batch,
        }
    }

    fn class(&mut self, p: Priority) -> &mut Class<T> {
        match p {
            Priority::Interactive => &mut self.interactive,
            Priority::Batch => &mut self.batch,
        }
    }

    /// Admits `item` (of `weight`) at the back of its class (all in one flow).
    pub fn admit(
        &mut self,
        item: T,
        priority: Priority,
        weight: u64,
        policy: AdmissionPolicy,
    ) -> Result<Admitted<T>, QueueFull> {
        self.admit_dropping_own(item, priority, weight, policy, 0, |_| false)
    }

    /// [`AdmissionQueue::admit`] for `flow` (at its next turn in the class); when the queue is
    /// full under drop-lru, the first queued batch entry for which `own` holds (the
    /// submitter's own) goes first, and only when there is none the first of all: one
    /// submitter's burst ends its own backlog, not another's.
    pub fn admit_dropping_own(
        &mut self,
        item: T,
        priority: Priority,
        weight: u64,
        policy: AdmissionPolicy,
        flow: u64,
        mut own: impl FnMut(&T) -> bool,
    ) -> Result<Admitted<T>, QueueFull> {
        let mut dropped = None;
        if self.len() >= self.capacity {
            match policy {
                AdmissionPolicy::Reject => {
                    return Err(QueueFull {
                        capacity: self.capacity,
                    })
                }
                AdmissionPolicy::DropLru => match self
                    .batch
                    .take_first(false, |t| own(t).then_some(()))
                    .or_else(|| self.batch.take_first(false, |_| Some(())))
                {
                    Some((oldest, _, ())) => {
                        self.reorders += 1;
                        dropped = Some(oldest);
                    }
                    None => {
                        return Err(QueueFull {
                            capacity: self.capacity,
                        })
                    }
                },
            }
        }
        let (key, at_back) = self.push(item, priority, weight, flow);
        // At the back of its class (always so with one flow): what is ahead is known without a
        // walk.
        let (position, weight_ahead) = match (at_back, priority) {
            (true, Priority::Interactive) => {
                (self.interactive.len - 1, self.interactive.weight - weight)
            }
            (true, Priority::Batch) => (
                self.len() - 1,
                self.interactive.weight + self.batch.weight - weight,
            ),
            (false, _) => self.rank(key).unwrap_or((0, 0)),
        };
        Ok(Admitted {
            position,
            weight_ahead,
            key,
            dropped,
        })
    }

    /// Admits `item` at `flow`'s next turn in its class even past capacity: a task admitted
    /// before a restart, read back from the journal, must not be lost.
    pub fn admit_forced(
        &mut self,
        item: T,
        priority: Priority,
        weight: u64,
        flow: u64,
    ) -> QueueKey {
        self.push(item, priority, weight, flow).0
    }

    fn push(&mut self, item: T, priority: Priority, weight: u64, flow: u64) -> (QueueKey, bool) {
        if priority == Priority::Interactive && self.batch.len > 0 {
            self.reorders += 1; // every queued batch entry moves back one place
        }
        let (order, at_back) = self.class(priority).push(item, weight, flow);
        if !at_back {
            self.reorders += 1; // entries of other flows behind it moved back
        }
        (QueueKey { priority, order }, at_back)
    }

    /// Puts an entry back at the front of its class (a retry), even past capacity: it was
    /// admitted before and must not be lost.
    pub fn requeue_front(&mut self, item: T, priority: Priority, weight: u64) -> QueueKey {
        self.reorders += 1;
        let order = self.class(priority).push_front(item, weight);
        QueueKey { priority, order }
    }

    /// The entry's position in dispatch order and the weight queued ahead of it; `None` once
    /// it left the queue.
    pub fn rank(&self, key: QueueKey) -> Option<(usize, u64)> {
        let (pos, weight) = self.class_ref(key.priority).rank(key.order)?;
        Some(match key.priority {
            Priority::Interactive => (pos, weight),
            Priority::Batch => (pos + self.interactive.len, weight + self.interactive.weight),
        })
    }

    /// Removes the entry queued under `key`, if it is still there.
    pub fn remove_key(&mut self, key: QueueKey) -> Option<T> {
        let class = self.class(key.priority);
        let (b, i) = class.find(key.order)?;
        let (item, _) = class.remove_at(b, i)?;
        self.reorders += 1;
        Some(item)
    }

    /// Removes the first entry matching `pred` (a walk: prefer `remove_key`); not a dispatch.
    pub fn remove(&mut self, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        self.take(false, |t| pred(t).then_some(())).map(|(t, ())| t)
    }

    /// Removes and returns the first entry, in dispatch order, for which `pick` returns
    /// `Some(decision)`: its dispatch (its flow's turn has come).
    pub fn take_first<D>(&mut self, pick: impl FnMut(&T) -> Option<D>) -> Option<(T, D)> {
        self.take(true, pick)
    }

    fn take<D>(
        &mut self,
        dispatched: bool,
        mut pick: impl FnMut(&T) -> Option<D>,
    ) -> Option<(T, D)> {
        for p in [Priority::Interactive, Priority::Batch] {
            if let Some((item, _, d)) = self.class(p).take_first(dispatched, &mut pick) {
                self.reorders += 1;
                return Some((item, d));
            }
        }
        None
    }

    /// Entries in dispatch order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.iter_weighted().map(|(t, _)| t)
    }

    /// Entries with their weights, in dispatch order.
    pub fn iter_weighted(&self) -> impl Iterator<Item = (&T, u64)> {
        self.interactive.iter().chain(self.batch.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Priority::*;

    // covers: ORCH-2107
    #[test]
    fn interactive_is_dispatched_before_batch_and_fifo_within_class() {
        let mut q = AdmissionQueue::new(10);
        for (id, p) in [(1, Batch), (2, Interactive), (3, Batch), (4, Interactive)] {
            q.admit(id, p, 1, AdmissionPolicy::Reject).unwrap();
        }
        let order: Vec<_> =
            std::iter::from_fn(|| q.take_first(|_| Some(())).map(|(i, _)| i)).collect();
        assert_eq!(order, vec![2, 4, 1, 3]);
    }

    #[test]
    fn reorders_change_only_when_a_position_may_move() {
        let mut q = AdmissionQueue::new(10);
        q.admit(1, Batch, 1, AdmissionPolicy::Reject).unwrap();
        q.admit(2, Batch, 1, AdmissionPolicy::Reject).unwrap();
        let r = q.reorders();
        assert_eq!(r, 0, "appends move nobody");
        q.admit(3, Interactive, 1, AdmissionPolicy::Reject).unwrap();
        assert!(
            q.reorders() > r,
            "an interactive entry moves the batch ones back"
        );
        let r = q.reorders();
        q.remove(|x| *x == 1);
        assert!(q.reorders() > r);
        let r = q.reorders();
        q.take_first(|_| Some(()));
        assert!(q.reorders() > r);
        let r = q.reorders();
        q.requeue_front(9, Batch, 1);
        assert!(q.reorders() > r);
    }

    // covers: ORCH-2105
    #[test]
    fn reject_policy_refuses_when_full() {
        let mut q = AdmissionQueue::new(2);
        q.admit(1, Batch, 1, AdmissionPolicy::Reject).unwrap();
        q.admit(2, Batch, 1, AdmissionPolicy::Reject).unwrap();
        assert_eq!(
            q.admit(3, Interactive, 1, AdmissionPolicy::Reject),
            Err(QueueFull { capacity: 2 })
        );
        assert_eq!(q.len(), 2);
    }

    // covers: ORCH-2106
    #[test]
    fn drop_lru_drops_the_oldest_batch_entry() {
        let mut q = AdmissionQueue::new(3);
        q.admit(1, Interactive, 1, AdmissionPolicy::DropLru)
            .unwrap();
        q.admit(2, Batch, 1, AdmissionPolicy::DropLru).unwrap();
        q.admit(3, Batch, 1, AdmissionPolicy::DropLru).unwrap();
        let a = q.admit(4, Batch, 1, AdmissionPolicy::DropLru).unwrap();
        assert_eq!(a.dropped, Some(2));
        assert_eq!(a.position, 2);
        let order: Vec<_> = q.iter().copied().collect();
        assert_eq!(order, vec![1, 3, 4]);
    }

    // covers: ORCH-2119
    #[test]
    fn drop_lru_drops_the_submitters_own_oldest_batch_entry_before_anyone_elses() {
        // (owner, n): owner 'a' queued first, then 'b'.
        let mut q = AdmissionQueue::new(4);
        for e in [('a', 1), ('a', 2), ('b', 3), ('b', 4)] {
            q.admit(e, Batch, 1, AdmissionPolicy::DropLru).unwrap();
        }
        // b's burst ends b's own oldest, not a's older one.
        let b = q
            .admit_dropping_own(('b', 5), Batch, 1, AdmissionPolicy::DropLru, 0, |e| {
                e.0 == 'b'
            })
            .unwrap();
        assert_eq!(b.dropped, Some(('b', 3)));
        // A submitter with nothing queued ends the oldest of all.
        let c = q
            .admit_dropping_own(('c', 6), Batch, 1, AdmissionPolicy::DropLru, 0, |e| {
                e.0 == 'c'
            })
            .unwrap();
        assert_eq!(c.dropped, Some(('a', 1)));
        let order: Vec<_> = q.iter().map(|e| e.1).collect();
        assert_eq!(order, vec![2, 4, 5, 6]);
    }

    // covers: ORCH-2106
    #[test]
    fn drop_lru_with_only_interactive_queued_rejects() {
        let mut q = AdmissionQueue::new(1);
        q.admit(1, Interactive, 1, AdmissionPolicy::DropLru)
            .unwrap();
        assert!(q.admit(2, Batch, 1, AdmissionPolicy::DropLru).is_err());
    }

    /// Takes every entry, in dispatch order.
    fn drain<T>(q: &mut AdmissionQueue<T>) -> Vec<T> {
        std::iter::from_fn(|| q.take_first(|_| Some(())).map(|(t, ())| t)).collect()
    }

    fn admit_in(q: &mut AdmissionQueue<u32>, item: u32, p: Priority, flow: u64) -> Admitted<u32> {
        q.admit_dropping_own(item, p, 1, AdmissionPolicy::Reject, flow, |_| false)
            .unwrap()
    }

    // covers: ORCH-2120
    #[test]
    fn flows_take_turns_within_a_class_and_keep_their_own_order() {
        let mut q = AdmissionQueue::new(100);
        // Flow 1 queues a burst, then flow 2 two tasks: flow 2 is not behind the whole burst.
        for i in 1..=4 {
            admit_in(&mut q, i, Batch, 1);
        }
        let a = admit_in(&mut q, 5, Batch, 2);
        assert_eq!(a.position, 1, "second in line, after the burst's first");
        admit_in(&mut q, 6, Batch, 2);
        // Interactive still goes first, and takes turns there too.
        admit_in(&mut q, 7, Interactive, 1);
        admit_in(&mut q, 8, Interactive, 1);
        admit_in(&mut q, 9, Interactive, 3);
        assert_eq!(drain(&mut q), vec![7, 9, 8, 1, 5, 2, 6, 3, 4]);
    }

    // covers: ORCH-2120
    #[test]
    fn a_flow_idle_while_others_ran_gets_no_credit_for_it() {
        let mut q = AdmissionQueue::new(100);
        for i in 1..=4 {
            admit_in(&mut q, i, Batch, 1);
        }
        // Two of flow 1's run; flow 2 arrives: it takes the next turn, not two turns at once.
        assert_eq!(q.take_first(|_| Some(())).map(|e| e.0), Some(1));
        assert_eq!(q.take_first(|_| Some(())).map(|e| e.0), Some(2));
        admit_in(&mut q, 5, Batch, 2);
        admit_in(&mut q, 6, Batch, 2);
        assert_eq!(drain(&mut q), vec![3, 5, 4, 6]);
        // An empty class starts every flow level: flow 1's past burst costs it nothing now.
        admit_in(&mut q, 7, Batch, 1);
        admit_in(&mut q, 8, Batch, 2);
        assert_eq!(drain(&mut q), vec![7, 8]);
    }

    // covers: ORCH-2120
    #[test]
    fn removals_that_are_not_dispatches_leave_the_turn_where_it_was() {
        let mut q = AdmissionQueue::new(100);
        for i in 1..=3 {
            admit_in(&mut q, i, Batch, 1);
        }
        admit_in(&mut q, 9, Batch, 3);
        // Flow 1's queued tasks are cancelled (removed, never dispatched); a new flow comes.
        for i in 1..=3 {
            assert_eq!(q.remove(|x| *x == i), Some(i));
        }
        // Flow 3 queues another, then a new flow 2 arrives: both at the turns they would have
        // had without flow 1's cancelled burst (flow 2's first turn comes before flow 3's
        // second).
        admit_in(&mut q, 10, Batch, 3);
        admit_in(&mut q, 4, Batch, 2);
        assert_eq!(drain(&mut q), vec![9, 4, 10]);
    }

    #[test]
    fn take_first_skips_entries_that_cannot_be_placed() {
        let mut q = AdmissionQueue::new(5);
        q.admit(("a", 1), Interactive, 1, AdmissionPolicy::Reject)
            .unwrap();
        q.admit(("b", 2), Interactive, 1, AdmissionPolicy::Reject)
            .unwrap();
        let got = q.take_first(|(model, _)| (*model == "b").then_some("pool-b"));
        assert_eq!(got, Some((("b", 2), "pool-b")));
        assert_eq!(q.len(), 1);
    }

    /// Position and weight ahead by walking the queue: what `rank` must agree with.
    fn walked_rank(q: &AdmissionQueue<u32>, x: u32) -> Option<(usize, u64)> {
        let mut ahead = 0;
        for (pos, (y, w)) in q.iter_weighted().enumerate() {
            if *y == x {
                return Some((pos, ahead));
            }
            ahead += w;
        }
        None
    }

    #[test]
    fn keys_find_entries_across_many_blocks() {
        let mut q = AdmissionQueue::new(100_000);
        let keys: Vec<_> = (0..10_000u32)
            .map(|i| {
                let p = if i % 3 == 0 { Interactive } else { Batch };
                (
                    i,
                    q.admit(i, p, u64::from(i % 5), AdmissionPolicy::Reject)
                        .unwrap()
                        .key,
                )
            })
            .collect();
        for &(i, key) in keys.iter().step_by(97) {
            assert_eq!(q.rank(key), walked_rank(&q, i));
        }
        let (gone, key) = keys[4242];
        assert_eq!(q.remove_key(key), Some(gone));
        assert_eq!(q.rank(key), None);
        assert_eq!(
            q.remove_key(key),
            None,
            "a key finds nothing once its entry left"
        );
        let back = q.requeue_front(gone, Batch, 1);
        assert_eq!(
            q.rank(back),
            Some((q.depth(Interactive), q.class_weight(Interactive)))
        );
    }

    proptest! {
        /// Keys: `rank` agrees with the queue's order and weights, `remove_key` removes exactly
        /// its entry, stale keys find nothing; blocks of 3 so entries span many blocks.
        #[test]
        fn keyed_lookups_agree_with_a_walk(ops in proptest::collection::vec((0u8..6, any::<bool>(), 0usize..64), 1..250)) {
            let mut q = AdmissionQueue::with_block(1000, 3);
            let mut keys: Vec<(u32, QueueKey)> = Vec::new();
            let mut next = 0u32;
            for (op, interactive, pick) in ops {
                let p = if interactive { Interactive } else { Batch };
                match op {
                    0 | 1 => {
                        next += 1;
                        // Three flows: most arrivals go between queued entries.
                        let flow = u64::from(next % 3);
                        let a = q.admit_dropping_own(next, p, u64::from(next % 7), AdmissionPolicy::Reject, flow, |_| false).unwrap();
                        prop_assert_eq!(Some((a.position, a.weight_ahead)), walked_rank(&q, next));
                        keys.push((next, a.key));
                    }
                    2 => {
                        next += 1;
                        keys.push((next, q.requeue_front(next, p, u64::from(next % 5))));
                        prop_assert_eq!(walked_rank(&q, next).map(|r| r.0), Some(if interactive { 0 } else { q.depth(Interactive) }));
                    }
                    3 => { q.take_first(|x| (x % 4 == 0).then_some(())); }
                    _ => {
                        if let Some(&(x, key)) = keys.get(pick % keys.len().max(1)) {
                            let present = walked_rank(&q, x).is_some();
                            prop_assert_eq!(q.remove_key(key), present.then_some(x));
                        }
                    }
                }
                for &(x, key) in &keys {
                    prop_assert_eq!(q.rank(key), walked_rank(&q, x));
                }
                let weights: u64 = q.iter_weighted().map(|(_, w)| w).sum();
                prop_assert_eq!(weights, q.class_weight(Interactive) + q.class_weight(Batch));
                prop_assert_eq!(q.iter().count(), q.len());
            }
        }

        /// Never above capacity; positions match dispatch order; nothing lost or duplicated.
        #[test]
        fn queue_conserves_entries(ops in proptest::collection::vec((0u8..4, any::<bool>()), 1..300), cap in 1usize..20, drop_lru in any::<bool>()) {
            let policy = if drop_lru { AdmissionPolicy::DropLru } else { AdmissionPolicy::Reject };
            let mut q = AdmissionQueue::new(cap);
            let mut live = std::collections::BTreeSet::new();
            let mut next = 0u32;
            for (op, interactive) in ops {
                let p = if interactive { Interactive } else { Batch };
                match op {
                    0 | 1 => {
                        next += 1;
                        match q.admit(next, p, u64::from(next % 7), policy) {
                            Ok(a) => {
                                live.insert(next);
                                if let Some(d) = a.dropped { prop_assert!(live.remove(&d)); }
                                prop_assert_eq!(walked_rank(&q, next).map(|r| r.0), Some(a.position));
                            }
                            Err(_) => prop_assert_eq!(q.len(), cap),
                        }
                    }
                    2 => { if let Some((x, ())) = q.take_first(|_| Some(())) { prop_assert!(live.remove(&x)); } }
                    _ => { if let Some(&x) = live.iter().next() { prop_assert_eq!(q.remove(|y| *y == x), Some(x)); live.remove(&x); } }
                }
                prop_assert!(q.len() <= cap);
                prop_assert_eq!(q.len(), live.len());
                let seen: std::collections::BTreeSet<u32> = q.iter().copied().collect();
                prop_assert_eq!(&seen, &live);
                let weights: u64 = q.iter_weighted().map(|(_, w)| w).sum();
                prop_assert_eq!(weights, q.class_weight(Interactive) + q.class_weight(Batch));
            }
        }
    }
}
