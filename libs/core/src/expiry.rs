//! When queued entries expire (a deadline, or the longest queue wait), earliest first. The
//! heap holds `(at, key)`; entries whose owner left the queue early stay until their time or
//! until `compact` rebuilds the heap from the entries still queued, so memory follows the
//! queue, not the traffic.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct ExpiryHeap<K> {
    heap: BinaryHeap<Reverse<Entry<K>>>,
    /// Sequence number of the next push.
    seq: u64,
}

#[derive(Debug, Clone)]
struct Entry<K> {
    at: Instant,
    /// Insertion order: equal instants pop in the order they were pushed.
    seq: u64,
    key: K,
}

impl<K> PartialEq for Entry<K> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl<K> Eq for Entry<K> {}

impl<K> PartialOrd for Entry<K> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<K> Ord for Entry<K> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<K> Default for ExpiryHeap<K> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<K> ExpiryHeap<K> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    pub fn push(&mut self, at: Instant, key: K) {
        let seq = self.seq;
        self.seq += 1;
        self.heap.push(Reverse(Entry { at, seq, key }));
    }

    /// The earliest expiry, if any.
    pub fn next_at(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// Removes and returns every entry due at `now` (`at <= now`), earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while self.heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
            if let Some(Reverse(e)) = self.heap.pop() {
                due.push(e.key);
            }
        }
        due
    }

    /// Rebuilds the heap from `live` entries when it holds more than `2 × live + slack`, so
    /// entries of keys that left early do not pile up. Returns whether it rebuilt.
    pub fn compact_if_bloated<I>(&mut self, live_len: usize, slack: usize, live: I) -> bool
    where
        I: IntoIterator<Item = (Instant, K)>,
    {
        if self.heap.len() <= 2 * live_len + slack {
            return false;
        }
        // A stable sort: equal instants keep the order `live` gives them.
        let mut entries: Vec<(Instant, K)> = live.into_iter().collect();
        entries.sort_by_key(|(at, _)| *at);
        self.seq = entries.len() as u64;
        self.heap = entries
            .into_iter()
            .enumerate()
            .map(|(seq, (at, key))| {
                Reverse(Entry {
                    at,
                    seq: seq as u64,
                    key,
                })
            })
            .collect();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    #[test]
    fn pops_only_what_is_due_earliest_first_and_equal_instants_in_push_order() {
        let t0 = Instant::now();
        let mut h = ExpiryHeap::new();
        h.push(ms(t0, 30), "c");
        h.push(ms(t0, 10), "a");
        h.push(ms(t0, 10), "b");
        h.push(ms(t0, 50), "d");
        assert_eq!(h.next_at(), Some(ms(t0, 10)));
        assert!(h.pop_due(ms(t0, 9)).is_empty());
        assert_eq!(h.pop_due(ms(t0, 30)), vec!["a", "b", "c"]);
        assert_eq!(h.next_at(), Some(ms(t0, 50)));
        assert_eq!(h.pop_due(ms(t0, 1000)), vec!["d"]);
        assert_eq!(h.next_at(), None);
    }

    #[test]
    fn compaction_keeps_only_live_entries_and_only_when_bloated() {
        let t0 = Instant::now();
        let mut h = ExpiryHeap::new();
        for k in 0..100u64 {
            h.push(ms(t0, k), k);
        }
        assert!(
            !h.compact_if_bloated(50, 0, std::iter::empty()),
            "not bloated yet"
        );
        let live = [(ms(t0, 7), 7u64), (ms(t0, 3), 3)];
        assert!(h.compact_if_bloated(2, 10, live));
        assert_eq!(h.len(), 2);
        assert_eq!(h.pop_due(ms(t0, 100)), vec![3, 7]);
    }

    proptest! {
        /// Whatever the pushes and the clock steps: every pop returns exactly the entries due,
        /// in (instant, push) order, none twice, none lost; what stays is not due.
        #[test]
        fn pop_due_matches_a_sorted_model(
            pushes in prop::collection::vec(0u64..500, 0..60),
            steps in prop::collection::vec(0u64..200, 1..10),
        ) {
            let t0 = Instant::now();
            let mut h = ExpiryHeap::new();
            let mut model: Vec<(u64, usize)> = Vec::new();
            for (i, at) in pushes.iter().enumerate() {
                h.push(ms(t0, *at), i);
                model.push((*at, i));
            }
            model.sort();
            let mut now = 0;
            let mut popped = Vec::new();
            for step in steps {
                now += step;
                let due = h.pop_due(ms(t0, now));
                let want: Vec<usize> = model.iter().filter(|(at, _)| *at <= now).map(|(_, i)| *i)
                    .filter(|i| !popped.contains(i)).collect();
                prop_assert_eq!(&due, &want);
                popped.extend(due);
                if let Some(next) = h.next_at() {
                    prop_assert!(next > ms(t0, now));
                }
            }
            prop_assert_eq!(popped.len() + h.len(), pushes.len());
        }
    }
}
