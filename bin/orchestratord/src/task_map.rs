//! The task table: every task by its key (owner and id, `tasks::scoped`), in 64 shards. A lookup or an admission locks one shard;
//! a shard grows by rehashing a sixty-fourth of the table, so a deep queue never stalls every
//! admission behind one big rehash; a walk (the console's recent tasks, shutdown) locks one
//! shard at a time.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::{RwLock, RwLockWriteGuard};

use tokio::time::Instant;

use crate::tasks::Task;

const SHARDS: usize = 64;

type Shard = RwLock<HashMap<String, Arc<Task>>>;

pub struct TaskMap {
    shards: Box<[Shard]>,
    hasher: RandomState,
}

impl Default for TaskMap {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl TaskMap {
    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    pub fn get(&self, key: &str) -> Option<Arc<Task>> {
        self.shard(key).read().get(key).cloned()
    }

    /// The shard holding `key`, locked for writing: a check and an insert under one lock.
    pub fn shard_for(&self, key: &str) -> RwLockWriteGuard<'_, HashMap<String, Arc<Task>>> {
        self.shard(key).write()
    }

    pub fn insert(&self, task: Arc<Task>) {
        self.shard(&task.key).write().insert(task.key.clone(), task);
    }

    /// Removes `task` if the table holds this very task under its id (not another task read
    /// back later under the same id).
    pub fn remove_same(&self, task: &Arc<Task>) -> bool {
        let mut shard = self.shard(&task.key).write();
        if shard.get(&task.key).is_some_and(|t| Arc::ptr_eq(t, task)) {
            shard.remove(&task.key);
            return true;
        }
        false
    }

    /// Every task, one shard locked at a time.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Task>)) {
        for shard in self.shards.iter() {
            for task in shard.read().values() {
                f(task);
            }
        }
    }

    /// Tasks for which `keep` holds, one shard locked at a time.
    pub fn filtered(&self, mut keep: impl FnMut(&Task) -> bool) -> Vec<Arc<Task>> {
        let mut out = Vec::new();
        self.for_each(|t| {
            if keep(t) {
                out.push(t.clone());
            }
        });
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

/// Finished tasks in the order they finished, with the bytes each keeps: retention takes
/// from the front what is past the period or beyond the count or the bytes, so a purge costs
/// what it forgets, never a walk of every task (the task table is locked for admissions); `retention` purges through it.
#[derive(Default)]
pub(crate) struct Retired {
    order: VecDeque<(Instant, Arc<Task>, usize)>,
    bytes: usize,
}

impl Retired {
    /// `task` just finished (or was read back finished from the journal).
    pub fn push(&mut self, task: &Arc<Task>) {
        let at = task.finished_at().unwrap_or_else(Instant::now);
        let bytes = task.retained_bytes();
        self.bytes += bytes;
        self.order.push_back((at, task.clone(), bytes));
    }

    /// Takes from the front what is past `period`, beyond `most` tasks or beyond `most_bytes`.
    pub fn pop_due(
        &mut self,
        now: Instant,
        period: std::time::Duration,
        most: usize,
        most_bytes: usize,
    ) -> Vec<Arc<Task>> {
        let mut due = Vec::new();
        while let Some((at, _, bytes)) = self.order.front() {
            let over = now.saturating_duration_since(*at) >= period
                || self.order.len() > most
                || self.bytes > most_bytes;
            if !over {
                break;
            }
            self.bytes -= *bytes;
            if let Some((_, task, _)) = self.order.pop_front() {
                due.push(task);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str) -> Arc<Task> {
        let req: llorch_contracts::tasks::TaskRequest = serde_json::from_value(
            serde_json::json!({"model_ref": "m", "prompt": "p", "max_tokens": 3}),
        )
        .unwrap();
        Arc::new(Task::new(
            id.into(),
            req,
            tokio::time::Instant::now(),
            Default::default(),
            id.into(),
            None,
            usize::MAX,
        ))
    }

    #[test]
    fn tasks_are_found_by_id_and_removed_only_as_the_very_task() {
        let map = TaskMap::default();
        let tasks: Vec<_> = (0..500).map(|i| task(&format!("t{i}"))).collect();
        for t in &tasks {
            map.insert(t.clone());
        }
        assert_eq!(map.len(), 500);
        let key = |id: &str| crate::tasks::scoped(crate::tasks::ANONYMOUS, id);
        assert!(Arc::ptr_eq(&map.get(&key("t42")).unwrap(), &tasks[42]));
        assert!(map.get(&key("t500")).is_none());
        // Another task under the same id (read back from the journal later) is not removed
        // by the first one's retirement.
        let again = task("t7");
        map.insert(again.clone());
        assert!(!map.remove_same(&tasks[7]));
        assert!(map.remove_same(&again));
        assert!(map.get(&key("t7")).is_none());
        let mut seen = 0;
        map.for_each(|_| seen += 1);
        assert_eq!(seen, 499);
        assert_eq!(map.filtered(|t| t.id.ends_with('9')).len(), 50);
    }

    #[test]
    fn two_owners_hold_one_id_apart() {
        let map = TaskMap::default();
        let alice = Arc::new(
            Arc::into_inner(task("same"))
                .unwrap()
                .with_owner("alice".into()),
        );
        let bob = Arc::new(
            Arc::into_inner(task("same"))
                .unwrap()
                .with_owner("bob".into()),
        );
        map.insert(alice.clone());
        map.insert(bob.clone());
        let get = |owner: &str| map.get(&crate::tasks::scoped(owner, "same")).unwrap();
        assert!(Arc::ptr_eq(&get("alice"), &alice));
        assert!(Arc::ptr_eq(&get("bob"), &bob));
        assert!(map.remove_same(&bob));
        assert!(Arc::ptr_eq(&get("alice"), &alice));
    }
}
