//! Retention: finished tasks are forgotten after the retention period, and the oldest beyond
//! the retention count, so memory follows the configuration, not the traffic; expired sessions
//! go too.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::Orchestrator;

/// How often retention runs.
pub(crate) const PURGE_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) async fn run(orch: Arc<Orchestrator>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                purge_finished(&orch);
                orch.sessions.lock().purge(Instant::now().into_std());
            }
        }
    }
}

pub(crate) fn purge_finished(orch: &Orchestrator) {
    let retention = orch.config.task_retention;
    let mut tasks = orch.tasks.write();
    tasks.retain(|_, t| t.finished_at().is_none_or(|f| f.elapsed() < retention));
    let mut finished: Vec<(Instant, String)> = tasks
        .values()
        .filter_map(|t| t.finished_at().map(|f| (f, t.id.clone())))
        .collect();
    let excess = finished
        .len()
        .saturating_sub(orch.config.task_retention_max);
    if excess > 0 {
        finished.sort_unstable();
        for (_, id) in finished.into_iter().take(excess) {
            tasks.remove(&id);
        }
    }
}
