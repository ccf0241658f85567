//! Bounds of queued tasks and of what outlives them: deadlines, the longest queue wait,
//! position updates, drop-lru, retention, sessions, and the shutdown race.

use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::{ErrorCode, ErrorEnvelope};
use tokio::time::Instant;

use super::kit::*;
use crate::dispatcher::POSITION_INTERVAL;
use crate::retention::PURGE_INTERVAL;
use crate::sse::SubscriberGuard;

const MS: Duration = Duration::from_millis(1);

/// A harness whose only slot is taken by a task that runs for `busy`.
async fn busy_harness(flags: &[&str], busy: Duration) -> Harness {
    let h = Harness::start(flags);
    h.add_pool("a", 1);
    h.engine.push(Script::Stream(vec![
        Step::Token(MS, "x"),
        Step::Stop(busy, "limit"),
    ]));
    h.submit(task(1));
    settle().await;
    assert_eq!(h.engine.calls().len(), 1, "the busy task did not start");
    h
}

// covers: ORCH-2108
#[tokio::test(start_paused = true)]
async fn a_short_deadline_queued_behind_later_expiries_still_ends_exactly_at_its_deadline() {
    // The dispatcher sleeps until the earliest expiry it knows (the first task's longest
    // queue wait); a newcomer that expires sooner must wake it.
    let h = busy_harness(&[], Duration::from_secs(60)).await;
    let _waiting = h.submit(task(5));
    settle().await;
    let t0 = Instant::now();
    let task = h.submit(serde_json::json!({
        "model_ref": "tiny", "prompt": "p", "max_tokens": 5, "deadline_ms": 700
    }));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "DEADLINE_UNMET");
    assert_eq!(at - t0, 700 * MS);
}

// covers: ORCH-2108
#[tokio::test(start_paused = true)]
async fn a_queued_task_past_its_deadline_ends_with_deadline_unmet_exactly_at_the_deadline() {
    let h = busy_harness(&[], Duration::from_secs(60)).await;
    let t0 = Instant::now();
    let task = h.submit(serde_json::json!({
        "model_ref": "tiny", "prompt": "p", "max_tokens": 5, "deadline_ms": 500
    }));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "DEADLINE_UNMET");
    assert_eq!(at - t0, 500 * MS);
    assert_eq!(
        h.engine.calls().len(),
        1,
        "the expired task reached an engine"
    );
}

// covers: ORCH-2110
#[tokio::test(start_paused = true)]
async fn a_task_queued_longer_than_the_longest_queue_wait_ends_with_pool_unavailable_exactly_then()
{
    let h = busy_harness(&["--max-queue-wait-ms=2000"], Duration::from_secs(60)).await;
    let t0 = Instant::now();
    let task = h.submit(task(5));
    let (name, data, at) = terminal(&task).await;
    assert_eq!(
        (name, data["code"].as_str()),
        ("error", Some("POOL_UNAVAILABLE"))
    );
    assert_eq!(data["retriable"], true);
    assert_eq!(at - t0, 2000 * MS);
}

// covers: ORCH-2109
#[tokio::test(start_paused = true)]
async fn a_deadline_passing_while_the_task_runs_does_not_end_it() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(tokens(10, 100 * MS));
    let task = h.submit(serde_json::json!({
        "model_ref": "tiny", "prompt": "p", "max_tokens": 10, "deadline_ms": 50
    }));
    let (name, _, _) = terminal(&task).await;
    assert_eq!(name, "end", "a started task was expired");
}

// covers: ORCH-2206
#[tokio::test(start_paused = true)]
async fn a_queued_task_starts_the_instant_the_slot_ahead_of_it_frees() {
    let h = busy_harness(&[], 300 * MS).await;
    let t0 = Instant::now();
    h.engine.push(tokens(1, MS));
    let task = h.submit(task(1));
    let (name, _, at) = terminal(&task).await;
    assert_eq!(name, "end");
    // The first task ends at 301 ms; this one then needs its 1 ms token and 1 ms final chunk.
    assert_eq!(at - t0, 303 * MS);
    assert_eq!(task.status(None).queue_time_ms, Some(301));
}

// covers: ORCH-2307
#[tokio::test(start_paused = true)]
async fn a_cancelled_queued_task_ends_at_once_and_never_reaches_an_engine() {
    let h = busy_harness(&[], Duration::from_secs(60)).await;
    let task = h.submit(task(5));
    tokio::time::sleep(10 * MS).await;
    let at_cancel = Instant::now();
    h.orch.cancel(
        &task,
        ErrorEnvelope::new(ErrorCode::Cancelled, "cancelled by the client"),
    );
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at, at_cancel);
    assert_eq!(h.engine.calls().len(), 1);
    assert_eq!(h.orch.queue_position(&task), None);
}

// covers: ORCH-2311
#[tokio::test(start_paused = true)]
async fn position_updates_come_at_once_then_at_most_one_per_interval() {
    let h = busy_harness(&[], Duration::from_secs(60)).await;
    let queued: Vec<_> = (0..4).map(|_| h.submit(task(5))).collect();
    let last = queued.last().unwrap().clone();
    let _follower = SubscriberGuard::new(h.orch.clone(), last.clone());
    let updates = told_positions;
    assert_eq!(updates(&last), [3]);
    let cancel = |t: &Arc<crate::tasks::Task>| {
        h.orch
            .cancel(t, ErrorEnvelope::new(ErrorCode::Cancelled, "client"))
    };
    // The first change after a quiet interval is told at once.
    tokio::time::sleep(POSITION_INTERVAL).await;
    cancel(&queued[0]);
    settle().await;
    assert_eq!(updates(&last), [3, 2]);
    // A second change right after waits for the interval, to the millisecond.
    let second = Instant::now();
    cancel(&queued[1]);
    tokio::time::sleep(POSITION_INTERVAL - MS).await;
    assert_eq!(updates(&last), [3, 2], "updated before the interval");
    tokio::time::sleep(MS).await;
    settle().await;
    assert_eq!(updates(&last), [3, 2, 1]);
    assert_eq!(Instant::now() - second, POSITION_INTERVAL);
}

/// Positions of the `queued` events in a task's log.
fn told_positions(t: &crate::tasks::Task) -> Vec<u64> {
    t.frames_from(0)
        .unwrap()
        .0
        .iter()
        .filter(|f| f.event == "queued")
        .map(|f| {
            serde_json::from_str::<serde_json::Value>(&f.data).unwrap()["queue_position"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

// covers: ORCH-2311
#[tokio::test(start_paused = true)]
async fn a_task_nobody_follows_is_told_its_position_when_a_subscriber_comes() {
    let h = busy_harness(&[], Duration::from_secs(60)).await;
    let queued: Vec<_> = (0..4).map(|_| h.submit(task(5))).collect();
    let last = queued[3].clone();
    for t in &queued[..2] {
        h.orch
            .cancel(t, ErrorEnvelope::new(ErrorCode::Cancelled, "client"));
    }
    tokio::time::sleep(2 * POSITION_INTERVAL).await;
    settle().await;
    assert_eq!(told_positions(&last), [3], "updated while nobody followed");
    let _follower = SubscriberGuard::new(h.orch.clone(), last.clone());
    assert_eq!(
        told_positions(&last),
        [3, 1],
        "not told at once on subscribing"
    );
    assert_eq!(h.orch.queue_position(&last), Some(1));
    h.orch.cancel(
        &queued[2],
        ErrorEnvelope::new(ErrorCode::Cancelled, "client"),
    );
    tokio::time::sleep(POSITION_INTERVAL).await;
    settle().await;
    assert_eq!(told_positions(&last), [3, 1, 0]);
}

// covers: ORCH-2106
#[tokio::test(start_paused = true)]
async fn a_full_drop_lru_queue_ends_its_oldest_batch_task_at_once_for_a_newcomer() {
    let h = busy_harness(
        &["--admission-capacity=2", "--admission-policy=drop-lru"],
        Duration::from_secs(60),
    )
    .await;
    let batch = |n: u32| serde_json::json!({"model_ref": "tiny", "prompt": "p", "max_tokens": n, "priority": "batch"});
    let oldest = h.submit(batch(5));
    let _second = h.submit(batch(6));
    let t0 = Instant::now();
    let _newcomer = h.submit(task(7));
    let (code, at) = outcome(&oldest).await;
    assert_eq!(code, "QUEUE_FULL_DROP_LRU");
    assert_eq!(at, t0);
}

// covers: ORCH-2414
#[tokio::test(start_paused = true)]
async fn a_finished_task_is_forgotten_after_retention_within_one_purge_interval() {
    let h = Harness::start(&["--task-retention-ms=10000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(1, MS));
    let task = h.submit(task(1));
    let (_, _, finished) = terminal(&task).await;
    let id = task.id.clone();
    drop(task);
    tokio::time::sleep_until(finished + Duration::from_millis(10_000) - MS).await;
    assert!(
        h.task(&id).is_some(),
        "forgotten before the retention period"
    );
    // The purge runs every PURGE_INTERVAL: the task is gone by the first run after retention.
    tokio::time::sleep(PURGE_INTERVAL + MS).await;
    assert!(
        h.task(&id).is_none(),
        "kept past retention + one purge interval"
    );
}

// covers: ORCH-2414
#[tokio::test(start_paused = true)]
async fn the_oldest_finished_tasks_beyond_the_retention_count_are_forgotten_at_the_next_purge() {
    let start = Instant::now();
    let h = Harness::start(&["--task-retention-max=2"]);
    h.add_pool("a", 1);
    h.engine.always(tokens(1, MS));
    // One after another, so they finish at distinct instants (2, 4 and 6 ms).
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let t = h.submit(task(1));
        terminal(&t).await;
        tasks.push(t);
    }
    let kept =
        |h: &Harness| -> Vec<bool> { tasks.iter().map(|t| h.task(&t.id).is_some()).collect() };
    // The purge runs at start and every PURGE_INTERVAL after.
    tokio::time::sleep_until(start + PURGE_INTERVAL - MS).await;
    assert_eq!(kept(&h), [true, true, true], "purged before the next run");
    tokio::time::sleep(MS).await;
    settle().await;
    assert_eq!(kept(&h), [false, true, true], "not the oldest that went");
}

// covers: ORCH-2207
#[tokio::test(start_paused = true)]
async fn a_session_keeps_its_pool_for_its_ttl_after_the_last_turn_and_not_a_millisecond_longer() {
    let h = Harness::start(&["--session-ttl-ms=1000"]);
    h.add_pool("a", 2);
    h.add_pool("b", 1);
    h.engine.always(tokens(1, MS));
    let turn = || {
        h.submit(serde_json::json!({
            "model_ref": "tiny", "prompt": "p", "max_tokens": 1, "session_id": "s1"
        }))
    };
    // Most free slots: the first turn goes to a.
    let first = turn();
    let turn_at = Instant::now();
    terminal(&first).await;
    assert_eq!(first.pool_id().as_deref(), Some("a"));
    // A pool with more free slots appears; within the TTL the session still goes to a.
    h.add_pool("c", 5);
    tokio::time::sleep_until(turn_at + 999 * MS).await;
    let second = turn();
    let second_at = Instant::now();
    terminal(&second).await;
    assert_eq!(
        second.pool_id().as_deref(),
        Some("a"),
        "affinity lost within the TTL"
    );
    // The TTL counts from the last turn: exactly then, placement is free again.
    tokio::time::sleep_until(second_at + 1000 * MS).await;
    let third = turn();
    terminal(&third).await;
    assert_eq!(
        third.pool_id().as_deref(),
        Some("c"),
        "affinity outlived the TTL"
    );
}

// covers: ORCH-2117
#[test]
fn no_task_is_queued_after_shutdown_emptied_the_queue() {
    // A real race on real threads: admissions from two threads while shutdown runs. Every
    // task admitted must have its terminal event (none left queued), and admissions after
    // shutdown are refused.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Rounds in which shutdown came while both threads were still admitting: some of
        // their tasks admitted, some refused. The test is about those.
        let mut raced = 0;
        for _ in 0..20 {
            let h = Arc::new(Harness::start(&["--admission-capacity=100000"]));
            h.add_pool("a", 1);
            h.orch.pools.set_health("a", false, None); // nothing dispatches: all stay queued
            let admitters: Vec<_> = (0..2)
                .map(|_| {
                    let h = h.clone();
                    std::thread::spawn(move || {
                        let mut admitted = Vec::new();
                        for _ in 0..2000 {
                            let req = serde_json::from_value(task(1)).unwrap();
                            if let Ok(a) = h.orch.admit(req) {
                                admitted.push(a.task_id);
                            }
                        }
                        admitted
                    })
                })
                .collect();
            // Shutdown once the first admissions are in (the threads run on meanwhile).
            while h.orch.queue.lock().tasks.is_empty() {
                std::thread::yield_now();
            }
            h.orch.stop_admitting();
            let admitted: Vec<String> = admitters
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            for id in &admitted {
                assert!(
                    h.task(id).unwrap().is_terminal(),
                    "task {id} was queued after shutdown emptied the queue"
                );
            }
            if !admitted.is_empty() && admitted.len() < 4000 {
                raced += 1;
            }
            let late = serde_json::from_value(task(1)).unwrap();
            let e = h.orch.admit(late).unwrap_err();
            assert_eq!(e.0.code, ErrorCode::PoolUnavailable);
        }
        assert!(
            raced > 0,
            "shutdown never came while admissions ran: nothing was tested"
        );
    });
}

// covers: ORCH-2104
#[tokio::test(start_paused = true)]
async fn a_resubmission_answers_the_existing_task_before_the_model_check_and_after_shutdown() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    let body = serde_json::json!({
        "task_id": "t-1", "model_ref": "tiny", "prompt": "p", "max_tokens": 5
    });
    let first = h.submit(body.clone());
    // The only pool fails: a new task for the model is refused...
    h.orch
        .pools
        .upsert(with_phase("a", crate::pools::PoolPhase::Failed, false));
    let other = serde_json::from_value(task(5)).unwrap();
    let e = h.orch.admit(other).unwrap_err();
    assert_eq!(e.0.code, ErrorCode::ModelNotAvailable);
    // ...but the resubmission learns about its task, even after shutdown began.
    h.orch.stop_admitting();
    let again = h
        .orch
        .admit(serde_json::from_value(body.clone()).unwrap())
        .unwrap();
    assert_eq!(again.task_id, first.id);
    // Another body under the same id is a conflict, not a refusal for the model.
    let mut changed = body;
    changed["max_tokens"] = 6.into();
    let e = h
        .orch
        .admit(serde_json::from_value(changed).unwrap())
        .unwrap_err();
    assert_eq!(e.0.code, ErrorCode::Conflict);
}

fn with_phase(id: &str, phase: crate::pools::PoolPhase, healthy: bool) -> crate::pools::PoolEntry {
    crate::pools::PoolEntry {
        phase,
        healthy,
        ..pool(id, 1)
    }
}

// covers: ORCH-2111
#[tokio::test(start_paused = true)]
async fn a_task_for_a_restarting_pool_queues_and_starts_the_instant_the_pool_serves_again() {
    use crate::pools::PoolPhase;
    let h = Harness::start(&[]);
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Restarting, false));
    h.engine.push(tokens(1, MS));
    let task = h.submit(task(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(names(&task), ["queued"]);
    let back = Instant::now();
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Serving, true));
    let (name, _, at) = terminal(&task).await;
    assert_eq!(name, "end");
    assert_eq!(
        at - back,
        2 * MS,
        "not dispatched the instant the pool served"
    );
}

// covers: ORCH-2112
#[tokio::test(start_paused = true)]
async fn when_every_pool_of_a_model_fails_its_queued_tasks_end_at_once_and_new_ones_get_503() {
    use crate::pools::PoolPhase;
    let h = Harness::start(&[]);
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Restarting, false));
    let queued = h.submit(task(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed_at = Instant::now();
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Failed, false));
    let (code, at) = outcome(&queued).await;
    assert_eq!(code, "POOL_UNAVAILABLE");
    assert_eq!(at, failed_at, "waited instead of ending");
    let e = h
        .orch
        .admit(serde_json::from_value(task(1)).unwrap())
        .unwrap_err();
    assert_eq!(e.0.code, ErrorCode::ModelNotAvailable);
    assert_eq!(e.0.retry_after_ms, Some(5000));
}

// covers: ORCH-2113
#[tokio::test(start_paused = true)]
async fn a_model_whose_last_pool_went_away_stays_admissible_for_exactly_the_memory_window() {
    let h = Harness::start(&["--model-memory-ms=10000"]);
    h.add_pool("a", 1);
    let gone = Instant::now();
    h.orch.pools.remove("a");
    tokio::time::sleep_until(gone + Duration::from_millis(10_000) - MS).await;
    let admitted = h.orch.admit(serde_json::from_value(task(1)).unwrap());
    assert!(admitted.is_ok(), "refused within the window");
    tokio::time::sleep(MS).await;
    let e = h
        .orch
        .admit(serde_json::from_value(task(1)).unwrap())
        .unwrap_err();
    assert_eq!(e.0.code, ErrorCode::ModelNotAvailable);
}

// covers: ORCH-2118
#[tokio::test(start_paused = true)]
async fn a_task_queued_during_a_restart_is_told_the_measured_restart_time_left() {
    use crate::pools::PoolPhase;
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    // A first restart of 4 s teaches how long restarts take.
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Restarting, false));
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Serving, true));
    // The next restart: a task queued 1 s into it is told 3 s.
    h.orch
        .pools
        .upsert(with_phase("a", PoolPhase::Restarting, false));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let req = serde_json::from_value(task(1)).unwrap();
    let admitted = h.orch.admit(req).unwrap();
    assert_eq!(admitted.predicted_start_ms, 3000);
    let t = h.task(&admitted.task_id).unwrap();
    let queued: serde_json::Value =
        serde_json::from_str(&t.frames_from(0).unwrap().0[0].data).unwrap();
    assert_eq!(queued["predicted_start_ms"], 3000);
}

// covers: ORCH-2114, ORCH-2201
#[tokio::test(start_paused = true)]
async fn a_task_asking_for_more_context_than_any_pool_has_is_refused_and_a_fitting_one_goes_to_the_pool_that_holds_it(
) {
    let h = Harness::start(&[]);
    h.orch.pools.upsert(crate::pools::PoolEntry {
        ctx_max: Some(512),
        ..pool("small", 4)
    });
    h.orch.pools.upsert(crate::pools::PoolEntry {
        ctx_max: Some(2048),
        ..pool("large", 1)
    });
    let with_ctx = |ctx: u32| {
        serde_json::from_value(serde_json::json!({
            "model_ref": "tiny", "prompt": "p", "max_tokens": 8, "ctx": ctx
        }))
        .unwrap()
    };
    let e = h.orch.admit(with_ctx(4096)).unwrap_err();
    assert_eq!(e.0.code, ErrorCode::InvalidParams);
    assert!(e.0.message.contains("(2048)"), "{}", e.0.message);
    h.engine.always(tokens(1, MS));
    let id = h.orch.admit(with_ctx(1024)).unwrap().task_id;
    let t = h.task(&id).unwrap();
    assert_eq!(terminal(&t).await.0, "end");
    // Most free slots would pick `small`; only `large` holds 1024 tokens.
    assert_eq!(t.pool_id().as_deref(), Some("large"));
}

// covers: ORCH-2115
#[tokio::test(start_paused = true)]
async fn a_strict_task_is_refused_when_no_single_slot_pool_serves_its_model() {
    let h = Harness::start(&[]);
    h.add_pool("wide", 4);
    let strict = serde_json::from_value(serde_json::json!({
        "model_ref": "tiny", "prompt": "p", "max_tokens": 4, "seed": 1, "determinism": "strict"
    }))
    .unwrap();
    let e = h.orch.admit(strict).unwrap_err();
    assert_eq!(e.0.code, ErrorCode::InvalidParams);
    assert!(e.0.message.contains("single-slot"), "{}", e.0.message);
}

// covers: ORCH-2415
#[tokio::test(start_paused = true)]
async fn a_finished_task_keeps_no_prompt_and_still_answers_its_resubmission() {
    let h = Harness::start(&[]);
    let body = serde_json::json!({
        "task_id": "big-1", "model_ref": "tiny", "prompt": "p".repeat(900_000), "max_tokens": 4
    });
    h.add_pool("a", 1);
    let task = h.submit(body.clone());
    assert_eq!(task.prompt().len(), 900_000);
    h.orch.cancel(
        &task,
        llorch_contracts::ErrorEnvelope::new(llorch_contracts::ErrorCode::Cancelled, "client"),
    );
    assert!(task.is_terminal());
    assert_eq!(
        task.prompt().len(),
        0,
        "a finished task still holds its prompt"
    );
    // The digest still tells the same request from another one.
    let again = h
        .orch
        .admit(serde_json::from_value(body.clone()).unwrap())
        .unwrap();
    assert_eq!(again.task_id, "big-1");
    let mut other = body;
    other["prompt"] = "q".repeat(900_000).into();
    let e = h
        .orch
        .admit(serde_json::from_value(other).unwrap())
        .unwrap_err();
    assert_eq!(e.0.code, llorch_contracts::ErrorCode::Conflict);
}

// covers: ORCH-2414
#[tokio::test(start_paused = true)]
async fn finished_tasks_beyond_the_retention_bytes_are_forgotten_oldest_first() {
    let h = Harness::start(&["--task-retention-bytes=5000"]);
    h.add_pool("a", 1);
    let mut done = Vec::new();
    for _ in 0..6 {
        h.engine.push(tokens(20, MS));
        let t = h.submit(task(20));
        let (code, _) = outcome(&t).await;
        assert_eq!(code, "end");
        // Finished at distinct instants: "oldest" is well defined.
        tokio::time::sleep(MS).await;
        done.push(t);
    }
    let per_task = done[0].retained_bytes();
    assert!(per_task > 1000, "{per_task}");
    crate::retention::purge_finished(&h.orch);
    let kept: Vec<bool> = done.iter().map(|t| h.task(&t.id).is_some()).collect();
    let kept_bytes: usize = done
        .iter()
        .filter(|t| h.task(&t.id).is_some())
        .map(|t| t.retained_bytes())
        .sum();
    assert!(kept_bytes <= 5000, "{kept_bytes} bytes kept");
    assert!(
        kept_bytes + per_task > 5000,
        "forgot more than needed: {kept:?}"
    );
    // The newest are the ones kept.
    let first_kept = kept.iter().position(|k| *k).unwrap();
    assert!(
        first_kept > 0 && kept[first_kept..].iter().all(|k| *k),
        "{kept:?}"
    );
}
