//! Supervision bounds, each at its exact virtual instant (jitter fixed at 0: a restart waits
//! half its backoff ceiling).

use std::time::Duration;

use llorch_contracts::PoolState;
use tokio::sync::oneshot;

use super::kit::*;
use crate::state::Command;

const MS: Duration = Duration::from_millis(1);
const S: Duration = Duration::from_secs(1);

/// Crashes `after` its spawn, having been healthy at 100 ms.
fn crashes(after: Duration) -> EngineScript {
    EngineScript {
        exits_after: Some(after),
        ..healthy()
    }
}

/// From each engine's exit to the next spawn.
fn restart_gaps(s: &Supervised) -> Vec<Duration> {
    s.engines
        .spawned()
        .windows(2)
        .map(|w| w[1].at - w[0].gone_at.unwrap())
        .collect()
}

// covers: POOL-3103
#[tokio::test(start_paused = true)]
async fn a_pool_is_ready_when_its_engine_answers_health_and_its_handoff_file_is_written() {
    let s = Supervised::start(&[], vec![healthy()]);
    s.until("ready", |p| p.ready).await;
    let spawned = s.engines.spawned();
    assert_eq!(s.status().state, PoolState::Ready);
    let file =
        llorch_contracts::HandoffFile::parse(&std::fs::read(s.runtime_dir.join("p.json")).unwrap())
            .unwrap();
    assert_eq!(file.url, spawned[0].url);
    assert_eq!(spawned.len(), 1);
}

// covers: POOL-3105
#[tokio::test(start_paused = true)]
async fn a_crashed_engine_is_restarted_after_half_the_backoff_ceiling_and_delays_double() {
    let s = Supervised::start(
        &[
            "--restart-backoff-ms=1000",
            "--restart-backoff-max-ms=60000",
        ],
        vec![crashes(S), crashes(S), crashes(S), crashes(S)],
    );
    s.until("fifth engine spawned", |p| p.restart_count == 4 && p.ready)
        .await;
    let gaps = restart_gaps(&s);
    assert_eq!(gaps, [500 * MS, 1000 * MS, 2000 * MS, 4000 * MS]);
}

// covers: POOL-3105
#[tokio::test(start_paused = true)]
async fn the_restart_delay_stops_growing_at_the_configured_maximum() {
    let s = Supervised::start(
        &["--restart-backoff-ms=1000", "--restart-backoff-max-ms=2000"],
        vec![crashes(S), crashes(S), crashes(S), crashes(S)],
    );
    s.until("fifth engine spawned", |p| p.restart_count == 4 && p.ready)
        .await;
    let gaps = restart_gaps(&s);
    // Ceilings 1 s, 2 s, then capped at 2 s; jitter 0 waits half of each.
    assert_eq!(gaps, [500 * MS, 1000 * MS, 1000 * MS, 1000 * MS]);
}

// covers: POOL-3107
#[tokio::test(start_paused = true)]
async fn the_fifth_failure_within_five_minutes_opens_the_circuit_until_a_trial_five_minutes_later()
{
    let s = Supervised::start(&["--restart-backoff-ms=1000"], Vec::new());
    // Every start fails before the engine is healthy (at 50 ms; healthy would be 100 ms).
    s.engines.always(crashes(50 * MS));
    let failed_at = s.until("failed", |p| p.state == PoolState::Failed).await;
    assert_eq!(s.engines.spawned().len(), 5);
    assert!(!s.status().ready && !s.status().live);
    // All five failures fell within the 5-minute window.
    assert!(failed_at - s.engines.spawned()[0].at < Duration::from_secs(300));
    // Open: nothing starts for the open period (from the fifth engine's exit); then exactly
    // one trial.
    let failure = s.engines.spawned()[4].gone_at.unwrap();
    tokio::time::sleep_until(failure + Duration::from_secs(300) - MS).await;
    assert_eq!(
        s.engines.spawned().len(),
        5,
        "restarted with the circuit open"
    );
    assert_eq!(s.status().state, PoolState::Failed);
    s.until("trial", |p| p.state != PoolState::Failed).await;
    let spawned = s.engines.spawned();
    assert_eq!(spawned.len(), 6);
    assert_eq!(spawned[5].at - failure, Duration::from_secs(300));
    // The trial crashes too: open again, now for ten minutes.
    s.until("failed again", |p| p.state == PoolState::Failed)
        .await;
    let failure = s.engines.spawned()[5].gone_at.unwrap();
    tokio::time::sleep_until(failure + Duration::from_secs(600) - MS).await;
    assert_eq!(s.engines.spawned().len(), 6);
    s.until("second trial", |p| p.state != PoolState::Failed)
        .await;
    let spawned = s.engines.spawned();
    assert_eq!(spawned.len(), 7);
    assert_eq!(spawned[6].at - failure, Duration::from_secs(600));
}

// covers: POOL-3107
#[tokio::test(start_paused = true)]
async fn a_trial_start_that_becomes_healthy_closes_the_circuit_and_the_pool_serves_again() {
    let s = Supervised::start(
        &["--restart-backoff-ms=1000", "--breaker-open-ms=60000"],
        Vec::new(),
    );
    s.engines.always(crashes(S));
    s.until("failed", |p| p.state == PoolState::Failed).await;
    // The fault went away while the circuit was open (the trial engine falls over only after
    // two healthy seconds).
    s.engines.always(crashes(2 * S));
    s.until("ready", |p| p.ready).await;
    let spawned = s.engines.spawned();
    assert_eq!(spawned.len(), 6);
    assert_eq!(
        spawned[5].at - spawned[4].gone_at.unwrap(),
        Duration::from_secs(60)
    );
    let file = std::fs::read(s.runtime_dir.join("p.json")).unwrap();
    assert_eq!(
        llorch_contracts::HandoffFile::parse(&file).unwrap().state,
        None,
        "the handoff file says the pool serves"
    );
    // Closed: the next crash (inside the failures' 5-minute window) restarts, it does not fail.
    let after = s
        .until("the next crash", |p| p.state != PoolState::Ready)
        .await;
    assert_eq!(s.status().state, PoolState::Restarting, "at {after:?}");
}

// covers: POOL-3108
#[tokio::test(start_paused = true)]
async fn a_hung_engine_is_killed_when_its_third_probe_in_a_row_times_out() {
    let interval = Duration::from_millis(1000);
    // Ready at 100 ms; probes every second from then (1.1 s, 2.1 s, ...), each hung probe
    // waits its whole timeout (the interval, at most 2 s). The hang begins just before the
    // probe at 2.1 s: probes at 2.1, 3.1 and 4.1 s fail, the third at 5.1 s.
    let s = Supervised::start(
        &["--health-interval-ms=1000", "--max-probe-failures=3"],
        vec![EngineScript {
            hangs_after: Some(Duration::from_millis(2050)),
            ..healthy()
        }],
    );
    s.until("restarted", |p| p.restart_count == 1).await;
    let spawned = s.engines.spawned();
    let hung = &spawned[0];
    let ready = hung.at + 100 * MS;
    assert_eq!(hung.stop_began.unwrap(), ready + 5 * interval);
    assert!(s.status().last_error.unwrap().contains("engine hung"));
}

// covers: POOL-3109
#[tokio::test(start_paused = true)]
async fn an_engine_that_never_becomes_healthy_is_killed_exactly_at_the_start_timeout() {
    let s = Supervised::start(
        &["--engine-start-timeout-ms=5000"],
        vec![EngineScript::default()],
    );
    s.until("restart after start timeout", |p| p.restart_count == 1)
        .await;
    let first = &s.engines.spawned()[0];
    assert_eq!(first.stop_began.unwrap() - first.at, 5000 * MS);
    assert!(s
        .status()
        .last_error
        .unwrap()
        .contains("did not become healthy within 5000 ms"));
}

// covers: POOL-3112
#[tokio::test(start_paused = true)]
async fn shutdown_gives_an_engine_that_ignores_sigterm_exactly_the_grace_then_kills_it() {
    let s = Supervised::start(
        &["--shutdown-grace-ms=3000"],
        vec![EngineScript {
            ignores_sigterm: true,
            ..healthy()
        }],
    );
    s.until("ready", |p| p.ready).await;
    s.cancel.cancel();
    s.done.await.unwrap();
    let e = &s.engines.spawned()[0];
    assert_eq!(e.gone_at.unwrap() - e.stop_began.unwrap(), 3000 * MS);
    assert_eq!(s.shared.pool("p").unwrap().state, PoolState::Stopped);
    assert!(
        !s.runtime_dir.join("p.json").exists(),
        "handoff file left behind"
    );
}

// covers: POOL-3110
#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_busy_slot_until_its_deadline_then_stops_the_engine() {
    let s = Supervised::start(
        &[],
        vec![EngineScript {
            busy_until: Some(Duration::from_secs(3600)),
            ..healthy()
        }],
    );
    s.until("ready", |p| p.ready).await;
    let (reply, answer) = oneshot::channel();
    let asked = tokio::time::Instant::now();
    s.commands
        .send(Command::Drain {
            deadline: Duration::from_millis(2000),
            reply,
        })
        .await
        .unwrap();
    answer.await.unwrap().unwrap();
    s.until("stopped", |p| p.state == PoolState::Stopped).await;
    let e = &s.engines.spawned()[0];
    assert_eq!(e.stop_began.unwrap() - asked, 2000 * MS);
}

// covers: POOL-3110
#[tokio::test(start_paused = true)]
async fn drain_of_an_idle_engine_stops_it_at_once() {
    let s = Supervised::start(&[], vec![healthy()]);
    s.until("ready", |p| p.ready).await;
    let (reply, answer) = oneshot::channel();
    let asked = tokio::time::Instant::now();
    s.commands
        .send(Command::Drain {
            deadline: Duration::from_secs(60),
            reply,
        })
        .await
        .unwrap();
    answer.await.unwrap().unwrap();
    s.until("stopped", |p| p.state == PoolState::Stopped).await;
    assert_eq!(s.engines.spawned()[0].stop_began.unwrap(), asked);
}

// covers: POOL-3111
#[tokio::test(start_paused = true)]
async fn a_reload_whose_engine_fails_to_start_keeps_the_old_engine_serving() {
    let s = Supervised::start(
        &[],
        vec![
            healthy(),
            EngineScript {
                exits_after: Some(50 * MS),
                ..Default::default()
            },
        ],
    );
    s.until("ready", |p| p.ready).await;
    let (reply, answer) = oneshot::channel();
    s.commands
        .send(Command::Reload {
            model_path: s.runtime_dir.join("other.gguf"),
            reply,
        })
        .await
        .unwrap();
    let error = answer.await.unwrap().unwrap_err();
    assert!(error.contains("before becoming healthy"), "{error}");
    let st = s.status();
    assert!(st.ready, "old engine not kept: {st:?}");
    assert_eq!(st.url.as_deref(), Some(s.engines.spawned()[0].url.as_str()));
    assert!(st.last_error.unwrap().contains("rolled back"));
    assert!(
        s.engines.spawned()[0].stop_began.is_none(),
        "old engine stopped"
    );
}

// covers: POOL-3106
#[tokio::test(start_paused = true)]
async fn backoff_starts_over_after_a_minute_of_health() {
    let s = Supervised::start(
        &["--restart-backoff-ms=1000", "--health-interval-ms=1000"],
        vec![crashes(S), crashes(S), crashes(Duration::from_secs(120))],
    );
    s.until("fourth engine ready", |p| p.restart_count == 3 && p.ready)
        .await;
    let gaps = restart_gaps(&s);
    // 0.5 s, 1 s, then — after two healthy minutes — back to 0.5 s instead of 2 s.
    assert_eq!(gaps, [500 * MS, 1000 * MS, 500 * MS]);
}

// covers: POOL-3202
#[tokio::test(start_paused = true)]
async fn the_handoff_file_says_restarting_during_a_restart_failed_when_the_circuit_opens_and_goes_on_drain(
) {
    let handoff_state = |s: &Supervised| {
        std::fs::read(s.runtime_dir.join("p.json"))
            .ok()
            .map(|b| llorch_contracts::HandoffFile::parse(&b).unwrap().state)
    };
    let s = Supervised::start(&["--restart-backoff-ms=1000"], Vec::new());
    s.engines.always(crashes(S));
    s.until("ready", |p| p.ready).await;
    assert_eq!(
        handoff_state(&s),
        Some(None),
        "a serving pool's file carries no state"
    );
    s.until("restarting", |p| p.state == PoolState::Restarting)
        .await;
    assert_eq!(handoff_state(&s), Some(Some(PoolState::Restarting)));
    s.until("failed", |p| p.state == PoolState::Failed).await;
    assert_eq!(handoff_state(&s), Some(Some(PoolState::Failed)));

    let d = Supervised::start(&[], vec![healthy()]);
    d.until("ready", |p| p.ready).await;
    let (reply, answer) = oneshot::channel();
    d.commands
        .send(Command::Drain {
            deadline: Duration::from_secs(1),
            reply,
        })
        .await
        .unwrap();
    answer.await.unwrap().unwrap();
    assert_eq!(handoff_state(&d), None, "a drained pool's file was kept");
}
