//! Durable admissions on real processes (the crash oracle): orchestratord is killed with
//! SIGKILL at random moments — during an admission burst, with tasks queued, with tasks
//! streaming — and started again on the same data directory, several times. Every task that
//! got a 202 is known afterwards and ends with exactly one terminal event, which another crash
//! does not change (nor does it queue or run an ended task again); re-queued tasks start in
//! admission order within their class; a resubmission of an id with its body answers the same
//! task, with another body 409.

use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::harness::*;

struct Admitted {
    id: String,
    body: serde_json::Value,
    interactive: bool,
    round: usize,
}

/// The terminal frames in a task's whole event log.
async fn terminal_frames(s: &Stack, id: &str) -> Vec<(String, serde_json::Value)> {
    s.events(id)
        .await
        .into_iter()
        .filter(|f| matches!(f.event.as_deref(), Some("end" | "error")))
        .map(|f| (f.event.clone().unwrap_or_default(), data(&f)))
        .collect()
}

// covers: ORCH-2413
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_admitted_task_and_ends_each_exactly_once() {
    // A failure names its seed; LLORCH_TEST_SEED replays it.
    let seed: u64 = std::env::var("LLORCH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 2048),
        orch_env: vec![
            // Clients here do not follow every task: recovered tasks must not be cancelled
            // for that within the test.
            ("ORCHD_RECOVERY_REATTACH_MS", "600000".into()),
            ("ORCHD_CANCEL_ON_DISCONNECT", "false".into()),
        ],
        ..Default::default()
    })
    .await;
    let mut admitted: Vec<Admitted> = Vec::new();
    // Wall-clock time of each restart (ms since the epoch).
    let mut restarts = Vec::new();
    // Tasks the kills caught queued or streaming (re-queued or reset at recovery).
    let mut interrupted = 0.0;
    for round in 0..3 {
        // A burst of sequential submissions (so their order is known), interrupted by the
        // kill at a random moment: some get their 202, the one in flight may not.
        let bodies: Vec<serde_json::Value> = (0..14)
            .map(|k| {
                let interactive = rng.random_bool(0.3);
                serde_json::json!({
                    "task_id": format!("r{round}-{k}"),
                    "model_ref": "tiny",
                    "prompt": format!("crash {round} {k}"),
                    "max_tokens": rng.random_range(24..96),
                    "priority": if interactive { "interactive" } else { "batch" },
                })
            })
            .collect();
        let base = s.base.clone();
        let http = s.http.clone();
        let burst = tokio::spawn(async move {
            let mut got = Vec::new();
            for body in bodies {
                match http
                    .post(format!("{base}/v2/tasks"))
                    .json(&body)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 202 => got.push(body),
                    Ok(r) => panic!("submission refused: {} {:?}", r.status(), r.text().await),
                    // The kill: this one's answer never came (not promised).
                    Err(_) => break,
                }
            }
            got
        });
        // Not at once: a kill before the burst got going would leave too few admissions to
        // judge (three early kills once left 8).
        tokio::time::sleep(Duration::from_millis(rng.random_range(40..250))).await;
        restarts.push(llorch_test_support::now_ms());
        s.kill_and_restart_orch().await;
        let text = s.metrics().await;
        for outcome in ["requeued", "reset"] {
            interrupted += metric_value(
                &text,
                "orchd_recovered_tasks_total",
                &[("outcome", outcome)],
            )
            .unwrap_or(0.0);
        }
        for body in burst.await.unwrap() {
            admitted.push(Admitted {
                id: body["task_id"].as_str().unwrap().to_string(),
                interactive: body["priority"] == "interactive",
                body,
                round,
            });
        }
        s.wait_pools_ready(1).await;
    }
    assert!(
        interrupted > 0.0,
        "seed {seed}: no kill caught a task queued or streaming"
    );
    assert!(
        admitted.len() >= 10,
        "seed {seed}: too few admissions to judge ({})",
        admitted.len()
    );

    // Every admitted task is known and finishes.
    for a in &admitted {
        let r = s.get(&format!("/v2/tasks/{}", a.id)).await;
        assert_eq!(
            r.status(),
            200,
            "seed {seed}: {} unknown after the restarts:\n{}",
            a.id,
            s.orch_log()
        );
        let st = s.wait_task(&a.id, Duration::from_secs(180)).await;
        assert!(st.finished_at_ms.is_some(), "seed {seed}: {} {st:?}", a.id);
    }
    let mut outcomes = Vec::new();
    for a in &admitted {
        let ends = terminal_frames(&s, &a.id).await;
        assert_eq!(ends.len(), 1, "seed {seed}: {} has {ends:?}", a.id);
        outcomes.push(ends[0].clone());
    }
    // Re-queued tasks start in admission order within their class: those of a round that
    // started after that round's restart.
    for (round, restarted_at) in restarts.iter().enumerate() {
        for interactive in [true, false] {
            let mut starts = Vec::new();
            for a in admitted
                .iter()
                .filter(|a| a.round == round && a.interactive == interactive)
            {
                let st = s.status(&a.id).await;
                if let Some(at) = st.started_at_ms.filter(|at| at > restarted_at) {
                    starts.push((a.id.clone(), at));
                }
            }
            assert!(
                starts.windows(2).all(|w| w[0].1 <= w[1].1),
                "seed {seed}: round {round} started out of order: {starts:?}"
            );
        }
    }
    // Another crash changes no ending, and nothing that ended is queued or run again.
    s.kill_and_restart_orch().await;
    let text = s.metrics().await;
    for outcome in ["requeued", "reset"] {
        assert_eq!(
            metric_value(
                &text,
                "orchd_recovered_tasks_total",
                &[("outcome", outcome)]
            )
            .unwrap_or(0.0),
            0.0,
            "seed {seed}: a finished task was {outcome} after a restart"
        );
    }
    for (a, before) in admitted.iter().zip(&outcomes) {
        let ends = terminal_frames(&s, &a.id).await;
        assert_eq!(ends, vec![before.clone()], "seed {seed}: {}", a.id);
    }
    // Resubmissions: the same body answers the same task; another body is refused.
    let a = &admitted[0];
    let again = s.submit(a.body.clone()).await;
    assert_eq!(again.status(), 202);
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["task_id"], a.id.as_str());
    let mut other = a.body.clone();
    other["prompt"] = "something else".into();
    assert_eq!(s.submit(other).await.status(), 409);
}
