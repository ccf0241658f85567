//! What the operator console shows (`GET /v2/overview`, admin only): pools joined with what
//! their nodes last reported (a drained, stopped pool stays visible, so it can be reloaded),
//! nodes, queue depth, the most recent tasks (never their input) and a short history of rates.
//!
//! The rate history is `activity::Rates`; what nodes reported is `pools::NodeReports`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llorch_contracts::overview::{Overview, OverviewPool, QueueDepth, TaskSummary};
use llorch_contracts::tasks::Priority;
use llorch_contracts::ErrorCode;
use llorch_http::ApiError;
use tokio::time::Instant;

use crate::config::Profile;
use crate::pools::{PoolEntry, PoolPhase, Report};
use crate::state::Orchestrator;

/// Recent tasks shown when the query does not say.
const RECENT_DEFAULT: usize = 50;
/// The most recent tasks one answer may list.
pub(crate) const RECENT_MAX: usize = 500;

/// `GET /v2/overview[?tasks=N]`.
pub(crate) async fn overview(
    State(orch): State<crate::state::AppState>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let recent = recent_limit(query.as_deref())?;
    let body = snapshot(&orch, recent);
    // It lists tasks and key names: no cache keeps it.
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// The `tasks=N` parameter (0 to `RECENT_MAX`); any other parameter is refused.
fn recent_limit(query: Option<&str>) -> Result<usize, ApiError> {
    let mut limit = RECENT_DEFAULT;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("tasks", n)) => {
                limit = n.parse().ok().filter(|n| *n <= RECENT_MAX).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidParams,
                        format!("tasks must be a whole number from 0 to {RECENT_MAX}"),
                    )
                })?;
            }
            _ => {
                return Err(ApiError::new(
                    ErrorCode::InvalidParams,
                    "unknown query parameter: the one parameter is tasks=N",
                ))
            }
        }
    }
    Ok(limit)
}

pub(crate) fn snapshot(orch: &Orchestrator, recent: usize) -> Overview {
    let now = Instant::now();
    let now_ms = crate::tasks::now_ms();
    let queue = {
        let q = orch.queue.lock();
        QueueDepth {
            interactive: q.tasks.depth(Priority::Interactive) as u64,
            batch: q.tasks.depth(Priority::Batch) as u64,
            capacity: orch.config.admission_capacity,
        }
    };
    Overview {
        at_ms: now_ms,
        profile: orch.config.profile.as_str().into(),
        pools: pools(orch, now),
        nodes: orch.managers.views(),
        queue,
        tasks: recent_tasks(orch, recent),
        rates: orch.metrics.rates.history(now, now_ms),
    }
}

/// Every pool orchestratord holds, joined with its node's report, then the pools only a node
/// reports; by pool id.
fn pools(orch: &Orchestrator, now: Instant) -> Vec<OverviewPool> {
    let config = &orch.config;
    // A report is recent while it is younger than a few probe rounds (or polls).
    let interval = match config.profile {
        Profile::Home => config.pool_health_interval,
        Profile::Cloud => config.pool_poll_interval,
    };
    let max_age = (interval * 3).max(Duration::from_secs(5));
    let managers: Vec<String> = match config.profile {
        Profile::Home => vec![config.pool_manager_url.clone()],
        Profile::Cloud => orch.managers.list().into_iter().map(|m| m.url).collect(),
    };
    let mut reports = orch.pools.reports.fresh(now, max_age);
    reports.retain(|_, r| managers.contains(&r.manager));
    let mut out: Vec<OverviewPool> = Vec::new();
    for entry in orch.pools.list() {
        // CLOUD: only the report of the node that holds the pool (another node reporting the
        // same id is ignored, as the poller ignores it).
        let report = reports.remove(&entry.pool_id).filter(|r| {
            config.profile == Profile::Home || entry.manager.as_deref() == Some(&*r.manager)
        });
        out.push(held(&entry, report.as_ref(), now));
    }
    let held_ids: std::collections::BTreeSet<String> =
        out.iter().map(|p| p.pool_id.clone()).collect();
    out.extend(
        reports
            .values()
            .filter(|r| !held_ids.contains(&r.status.pool_id))
            .map(|r| reported_only(r, now)),
    );
    out.sort_by(|a, b| a.pool_id.cmp(&b.pool_id));
    out
}

fn held(e: &PoolEntry, r: Option<&Report>, now: Instant) -> OverviewPool {
    let node = r.map(|r| &r.status);
    let state = if e.ejection.active(now) {
        "ejected"
    } else if let Some(s) = node {
        s.state.as_str()
    } else if e.draining {
        "draining"
    } else {
        match e.phase {
            PoolPhase::Restarting => "restarting",
            PoolPhase::Failed => "failed",
            PoolPhase::Serving if e.healthy => "ready",
            PoolPhase::Serving => "unhealthy",
        }
    };
    OverviewPool {
        pool_id: e.pool_id.clone(),
        node_id: e
            .node_id
            .clone()
            .or_else(|| node.map(|s| s.node_id.clone())),
        model_id: e.model_id.clone(),
        state: state.into(),
        placeable: e.ready(),
        slots_total: e.slots_total,
        slots_used: e.in_flight,
        vram_total_bytes: node.and_then(|s| s.vram_total_bytes),
        vram_free_bytes: e.vram_free_bytes.or(node.and_then(|s| s.vram_free_bytes)),
        restart_count: node.map(|s| s.restart_count),
        last_error: e
            .last_error
            .clone()
            .or_else(|| node.and_then(|s| s.last_error.clone())),
        reported_ms_ago: r.map(|r| age_ms(r, now)),
        listed: Some(e.wire()),
    }
}

fn reported_only(r: &Report, now: Instant) -> OverviewPool {
    let s = &r.status;
    OverviewPool {
        pool_id: s.pool_id.clone(),
        node_id: Some(s.node_id.clone()),
        model_id: s.model_id.clone(),
        state: s.state.as_str().into(),
        placeable: false,
        slots_total: s.slots_total,
        // orchestratord runs nothing on a pool it does not hold.
        slots_used: 0,
        vram_total_bytes: s.vram_total_bytes,
        vram_free_bytes: s.vram_free_bytes,
        restart_count: Some(s.restart_count),
        last_error: s.last_error.clone(),
        reported_ms_ago: Some(age_ms(r, now)),
        listed: None,
    }
}

fn age_ms(r: &Report, now: Instant) -> u64 {
    now.saturating_duration_since(r.at).as_millis() as u64
}

/// The `limit` most recently submitted tasks, newest first: one pass over the task map
/// keeping the newest `limit` in a heap (the map holds at most the retained tasks).
fn recent_tasks(orch: &Orchestrator, limit: usize) -> Vec<TaskSummary> {
    if limit == 0 {
        return Vec::new();
    }
    let mut picked: Vec<Arc<crate::tasks::Task>> = {
        let mut newest: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
        orch.tasks.for_each(|t| {
            // Only a task newer than the oldest kept costs a copy of its key.
            if newest.len() < limit
                || newest
                    .peek()
                    .is_some_and(|Reverse((at, key))| (t.submitted_at, t.key.as_str()) > (*at, key))
            {
                newest.push(Reverse((t.submitted_at, t.key.clone())));
                if newest.len() > limit {
                    newest.pop();
                }
            }
        });
        newest
            .into_iter()
            .filter_map(|Reverse((_, key))| orch.tasks.get(&key))
            .collect()
    };
    picked.sort_by(|a, b| (b.submitted_at, &b.key).cmp(&(a.submitted_at, &a.key)));
    picked
        .iter()
        .map(|t| {
            let s = t.status(None);
            TaskSummary {
                task_id: s.task_id,
                state: s.state,
                priority: s.priority,
                pool_id: s.pool_id,
                model: s.model_ref,
                owner: t.owner.to_string(),
                api: t.api().into(),
                submitted_at_ms: s.submitted_at_ms,
                finished_at_ms: s.finished_at_ms,
                tokens_out: s.tokens_out,
                error_code: s.error.map(|e| e.code),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use llorch_contracts::PoolStatus;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn reported(id: &str, state: &str) -> PoolStatus {
        serde_json::from_value(serde_json::json!({
            "pool_id": id, "node_id": "node-1", "state": state, "live": true,
            "ready": state == "ready", "draining": false, "slots_total": 2, "slots_free": 2,
            "engine": "llamacpp", "model_id": "tiny", "vram_total_bytes": 8_000,
            "vram_free_bytes": 6_000, "restart_count": 1, "provisioning_mode": "managed",
        }))
        .unwrap()
    }

    // covers: OBS-6112
    #[tokio::test(start_paused = true)]
    async fn the_overview_shows_tasks_without_their_input_and_pools_with_their_node_reports() {
        use crate::tests::kit::{outcome, settle, tokens, Harness, Script};
        let h = Harness::start(&[]);
        h.add_pool("p", 2);
        h.engine.push(tokens(3, MS));
        let done = h.submit(serde_json::json!({
            "task_id": "t-done", "model_ref": "tiny", "prompt": "a secret prompt", "max_tokens": 3
        }));
        assert_eq!(outcome(&done).await.0, "end");
        // Two tasks hold both slots, two more wait: one of each priority.
        h.engine.always(Script::NoAnswer);
        for (id, priority) in [
            ("r1", "interactive"),
            ("r2", "interactive"),
            ("q1", "interactive"),
            ("q2", "batch"),
        ] {
            tokio::time::advance(MS).await;
            h.submit(serde_json::json!({
                "task_id": id, "model_ref": "tiny", "prompt": "p", "max_tokens": 3, "priority": priority
            }));
            settle().await;
        }
        let manager = h.orch.config.pool_manager_url.clone();
        h.orch.pools.reports.replace(
            &manager,
            &[reported("p", "ready"), reported("q", "stopped")],
        );
        let o = snapshot(&h.orch, 3);
        // Newest first, at most the number asked for; the finished one with its counts.
        let ids: Vec<&str> = o.tasks.iter().map(|t| t.task_id.as_str()).collect();
        assert_eq!(ids, vec!["q2", "q1", "r2"]);
        let all = snapshot(&h.orch, RECENT_MAX);
        let t = all.tasks.iter().find(|t| t.task_id == "t-done").unwrap();
        assert_eq!(t.state, llorch_contracts::tasks::TaskState::Completed);
        assert_eq!((t.tokens_out, t.pool_id.as_deref()), (3, Some("p")));
        assert_eq!((t.owner.as_str(), t.api.as_str()), ("test", "v2"));
        assert!(t.finished_at_ms.is_some() && t.error_code.is_none());
        assert!(!serde_json::to_string(&all).unwrap().contains("secret"));
        assert_eq!((o.queue.interactive, o.queue.batch), (1, 1));
        // The held pool joined with its report; the stopped one only its node reports.
        let p = &o.pools[0];
        assert_eq!((p.pool_id.as_str(), p.state.as_str()), ("p", "ready"));
        assert!(p.placeable && p.listed.is_some());
        assert_eq!((p.slots_used, p.slots_total), (2, 2));
        assert_eq!(
            (p.vram_total_bytes, p.restart_count),
            (Some(8_000), Some(1))
        );
        assert_eq!(p.node_id.as_deref(), Some("node-1"));
        let q = &o.pools[1];
        assert_eq!((q.pool_id.as_str(), q.state.as_str()), ("q", "stopped"));
        assert!(!q.placeable && q.listed.is_none());
        assert_eq!(q.slots_used, 0);
        // The finished task's three tokens and its first token, 1 ms after dispatch.
        let b = o.rates.buckets.last().unwrap();
        assert_eq!((b.tokens, b.first_tokens), (3, 1));
        assert_eq!(b.first_token_p50_ms, Some(1.0));
        // A report goes stale after a few probe rounds (5 s at least): the table's view stays.
        tokio::time::advance(5 * S + MS).await;
        let o = snapshot(&h.orch, 0);
        assert_eq!(o.pools.len(), 1);
        assert_eq!(
            (o.pools[0].state.as_str(), o.pools[0].reported_ms_ago),
            ("ready", None)
        );
        assert!(o.tasks.is_empty());
    }

    // covers: OBS-6112
    #[test]
    fn the_recent_count_is_bounded_and_unknown_parameters_are_refused() {
        assert_eq!(recent_limit(None).unwrap(), RECENT_DEFAULT);
        assert_eq!(recent_limit(Some("tasks=0")).unwrap(), 0);
        assert_eq!(recent_limit(Some("tasks=500")).unwrap(), 500);
        for bad in [
            "tasks=501",
            "tasks=-1",
            "tasks=x",
            "tasks",
            "prompt=1",
            "tasks=1&x=2",
        ] {
            let e = recent_limit(Some(bad)).unwrap_err();
            assert_eq!(e.0.code, ErrorCode::InvalidParams, "{bad}");
        }
    }
}
