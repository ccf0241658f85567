//! Bounded admission queue: interactive before batch, FIFO within a class (DESIGN §3).

use std::collections::VecDeque;

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
    /// The entry dropped to make room (drop-lru).
    pub dropped: Option<T>,
}

/// Entries are dispatched interactive-first, FIFO within a class. `T` carries the caller's
/// data; each entry also has a weight (its `max_tokens`, say) whose per-class sums are kept, so
/// "how much work is ahead" is O(1) at admission.
#[derive(Debug, Clone)]
pub struct AdmissionQueue<T> {
    capacity: usize,
    interactive: VecDeque<(T, u64)>,
    batch: VecDeque<(T, u64)>,
    weights: [u64; 2],
    /// Bumped whenever an entry's position may have changed (not on a plain append at the
    /// back), so position updates are sent only when there is something to tell.
    reorders: u64,
}

fn idx(p: Priority) -> usize {
    match p {
        Priority::Interactive => 0,
        Priority::Batch => 1,
    }
}

impl<T> AdmissionQueue<T> {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            interactive: VecDeque::new(),
            batch: VecDeque::new(),
            weights: [0, 0],
            reorders: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.interactive.len() + self.batch.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn depth(&self, p: Priority) -> usize {
        match p {
            Priority::Interactive => self.interactive.len(),
            Priority::Batch => self.batch.len(),
        }
    }

    /// Changes whenever some entry's position may have moved.
    pub fn reorders(&self) -> u64 {
        self.reorders
    }

    /// Sum of the weights queued in a class.
    pub fn class_weight(&self, p: Priority) -> u64 {
        self.weights[idx(p)]
    }

    fn class(&mut self, p: Priority) -> &mut VecDeque<(T, u64)> {
        match p {
            Priority::Interactive => &mut self.interactive,
            Priority::Batch => &mut self.batch,
        }
    }

    fn taken(&mut self, p: Priority, (item, weight): (T, u64)) -> T {
        self.weights[idx(p)] -= weight;
        self.reorders += 1;
        item
    }

    /// Admits `item` (of `weight`) at the back of its class.
    pub fn admit(
        &mut self,
        item: T,
        priority: Priority,
        weight: u64,
        policy: AdmissionPolicy,
    ) -> Result<Admitted<T>, QueueFull> {
        let mut dropped = None;
        if self.len() >= self.capacity {
            match policy {
                AdmissionPolicy::Reject => {
                    return Err(QueueFull {
                        capacity: self.capacity,
                    })
                }
                AdmissionPolicy::DropLru => match self.batch.pop_front() {
                    Some(oldest) => dropped = Some(self.taken(Priority::Batch, oldest)),
                    None => {
                        return Err(QueueFull {
                            capacity: self.capacity,
                        })
                    }
                },
            }
        }
        if priority == Priority::Interactive && !self.batch.is_empty() {
            self.reorders += 1; // every queued batch entry moves back one place
        }
        self.class(priority).push_back((item, weight));
        self.weights[idx(priority)] += weight;
        let position = match priority {
            Priority::Interactive => self.interactive.len() - 1,
            Priority::Batch => self.interactive.len() + self.batch.len() - 1,
        };
        Ok(Admitted { position, dropped })
    }

    /// Admits `item` at the back of its class even past capacity: a task admitted before a
    /// restart, read back from the journal, must not be lost.
    pub fn admit_forced(&mut self, item: T, priority: Priority, weight: u64) {
        if priority == Priority::Interactive && !self.batch.is_empty() {
            self.reorders += 1;
        }
        self.class(priority).push_back((item, weight));
        self.weights[idx(priority)] += weight;
    }

    /// Puts an entry back at the front of its class (a retry), even past capacity: it was
    /// admitted before and must not be lost.
    pub fn requeue_front(&mut self, item: T, priority: Priority, weight: u64) {
        self.class(priority).push_front((item, weight));
        self.weights[idx(priority)] += weight;
        self.reorders += 1;
    }

    /// Removes the first entry matching `pred`.
    pub fn remove(&mut self, mut pred: impl FnMut(&T) -> bool) -> Option<T> {
        for p in [Priority::Interactive, Priority::Batch] {
            let q = self.class(p);
            if let Some(i) = q.iter().position(|(t, _)| pred(t)) {
                let entry = q.remove(i)?;
                return Some(self.taken(p, entry));
            }
        }
        None
    }

    /// Removes and returns the first entry, in dispatch order, for which `pick` returns
    /// `Some(decision)`.
    pub fn take_first<D>(&mut self, mut pick: impl FnMut(&T) -> Option<D>) -> Option<(T, D)> {
        for p in [Priority::Interactive, Priority::Batch] {
            let q = self.class(p);
            let mut found = None;
            for (i, (item, _)) in q.iter().enumerate() {
                if let Some(d) = pick(item) {
                    found = Some((i, d));
                    break;
                }
            }
            if let Some((i, d)) = found {
                let entry = q.remove(i)?;
                return Some((self.taken(p, entry), d));
            }
        }
        None
    }

    /// Entries in dispatch order.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.interactive
            .iter()
            .chain(self.batch.iter())
            .map(|(t, _)| t)
    }

    /// Entries with their weights, in dispatch order.
    pub fn iter_weighted(&self) -> impl Iterator<Item = (&T, u64)> {
        self.interactive
            .iter()
            .chain(self.batch.iter())
            .map(|(t, w)| (t, *w))
    }

    pub fn position(&self, mut pred: impl FnMut(&T) -> bool) -> Option<usize> {
        self.iter().position(&mut pred)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use Priority::*;

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

    #[test]
    fn drop_lru_with_only_interactive_queued_rejects() {
        let mut q = AdmissionQueue::new(1);
        q.admit(1, Interactive, 1, AdmissionPolicy::DropLru)
            .unwrap();
        assert!(q.admit(2, Batch, 1, AdmissionPolicy::DropLru).is_err());
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

    proptest! {
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
                                prop_assert_eq!(q.position(|x| *x == next), Some(a.position));
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
