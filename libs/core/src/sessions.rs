//! Sessions: KV affinity (same session → same pool while it is ready) with a TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub turns: u32,
    pub last_pool_id: Option<String>,
    expires_at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub ttl_remaining: Duration,
    pub turns: u32,
    pub last_pool_id: Option<String>,
}

#[derive(Debug)]
pub struct SessionTable {
    ttl: Duration,
    sessions: HashMap<String, Session>,
}

impl SessionTable {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            sessions: HashMap::new(),
        }
    }

    /// Records a turn of `id` placed on `pool_id`, refreshing the TTL.
    pub fn record_turn(&mut self, id: &str, pool_id: &str, now: Instant) {
        let s = self.sessions.entry(id.to_string()).or_insert(Session {
            turns: 0,
            last_pool_id: None,
            expires_at: now,
        });
        s.turns = s.turns.saturating_add(1);
        s.last_pool_id = Some(pool_id.to_string());
        s.expires_at = now + self.ttl;
    }

    /// The pool of the session's last turn, if the session is alive.
    pub fn affinity(&self, id: &str, now: Instant) -> Option<&str> {
        self.sessions
            .get(id)
            .filter(|s| s.expires_at > now)
            .and_then(|s| s.last_pool_id.as_deref())
    }

    pub fn get(&self, id: &str, now: Instant) -> Option<SessionInfo> {
        self.sessions
            .get(id)
            .filter(|s| s.expires_at > now)
            .map(|s| SessionInfo {
                ttl_remaining: s.expires_at.saturating_duration_since(now),
                turns: s.turns,
                last_pool_id: s.last_pool_id.clone(),
            })
    }

    pub fn remove(&mut self, id: &str) -> bool {
        self.sessions.remove(id).is_some()
    }

    /// Forgets expired sessions; returns how many.
    pub fn purge(&mut self, now: Instant) -> usize {
        let before = self.sessions.len();
        self.sessions.retain(|_, s| s.expires_at > now);
        before - self.sessions.len()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: ORCH-2207
    #[test]
    fn affinity_lasts_for_the_ttl_and_refreshes_on_use() {
        let t0 = Instant::now();
        let mut s = SessionTable::new(Duration::from_secs(10));
        s.record_turn("s1", "pool-a", t0);
        assert_eq!(
            s.affinity("s1", t0 + Duration::from_secs(9)),
            Some("pool-a")
        );
        s.record_turn("s1", "pool-b", t0 + Duration::from_secs(9));
        let info = s.get("s1", t0 + Duration::from_secs(15)).unwrap();
        assert_eq!(info.turns, 2);
        assert_eq!(info.last_pool_id.as_deref(), Some("pool-b"));
        assert_eq!(info.ttl_remaining, Duration::from_secs(4));
        assert_eq!(s.affinity("s1", t0 + Duration::from_secs(20)), None);
        assert_eq!(s.purge(t0 + Duration::from_secs(20)), 1);
        assert!(s.is_empty());
    }
}
