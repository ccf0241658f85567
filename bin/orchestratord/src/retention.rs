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

/// How often the journal forgets what is past its window or its bound.
pub(crate) const COMPACT_INTERVAL: Duration = Duration::from_secs(60);

pub(crate) async fn run(orch: Arc<Orchestrator>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(PURGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compact = tokio::time::interval(COMPACT_INTERVAL);
    compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                purge_finished(&orch);
                orch.sessions.lock().purge(Instant::now().into_std());
            }
            _ = compact.tick(), if orch.journal.durable() => compact_journal(&orch).await,
        }
    }
}

/// Forgets finished tasks past the idempotency window (`ORCHD_JOURNAL_DEDUPE_MS`), and the
/// oldest finished ones while the journal is over `ORCHD_JOURNAL_MAX_BYTES`.
async fn compact_journal(orch: &Arc<Orchestrator>) {
    let before =
        crate::tasks::now_ms().saturating_sub(orch.config.journal_dedupe.as_millis() as u64);
    // On the journal's writer thread, between write batches.
    match orch
        .journal
        .compact(before, orch.config.journal_max_bytes)
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(forgotten = n, "journal compacted"),
        Err(error) => tracing::warn!(%error, "journal compaction failed"),
    }
}

/// Forgets finished tasks past the retention period, then the oldest beyond the retention
/// count, then the oldest until the rest fit in the retention bytes.
pub(crate) fn purge_finished(orch: &Orchestrator) {
    let config = &orch.config;
    let now = Instant::now();
    let doomed = orch.retired.lock().pop_due(
        now,
        config.task_retention,
        config.task_retention_max,
        config.task_retention_bytes,
    );
    for task in &doomed {
        // Only the very task retired (a task read back from the journal later is another).
        orch.tasks.remove_same(task);
    }
}
