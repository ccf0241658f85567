use std::time::Duration;

use rand::{Rng, SeedableRng};

use crate::harness::*;

/// 200 tasks with random priorities, sizes, cancels and disconnects. Every admitted task ends
/// with exactly one terminal event and none is dispatched twice.
// covers: ORCH-2303
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_run_of_200_tasks_ends_each_task_exactly_once() {
    let toml = format!("{}{}", pool_toml("a", 2, 4096), pool_toml("b", 2, 4096));
    let s = std::sync::Arc::new(
        Stack::start(StackOptions {
            pools_toml: toml,
            ..Default::default()
        })
        .await,
    );
    s.wait_pools_ready(2).await;
    let seed: u64 = rand::random();
    eprintln!("randomized run seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut handles = Vec::new();
    let mut ids = Vec::new();
    for k in 0..200 {
        let priority = if rng.random_bool(0.5) {
            "interactive"
        } else {
            "batch"
        };
        let max_tokens = rng.random_range(1..120u32);
        let action = rng.random_range(0..10u8);
        let delay_ms = rng.random_range(0..30u64);
        let body = serde_json::json!({
            "task_id": format!("rand-{k}"), "model_ref": "tiny", "prompt": format!("task {k}"),
            "max_tokens": max_tokens, "priority": priority,
        });
        let id = s.submit_ok(body).await.task_id;
        ids.push(id.clone());
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            match action {
                // Cancel after a random delay (queued or running).
                0 | 1 => {
                    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    assert_eq!(s.cancel(&id).await, 204);
                }
                // Subscribe, then disconnect after the first event.
                2 => {
                    let mut ev = s.open_events(&id, None).await;
                    ev.frame().await;
                }
                // Watch to the end.
                _ => {
                    let frames = s.events(&id).await;
                    assert!(
                        matches!(names(&frames).last(), Some(&"end") | Some(&"error")),
                        "{id}: {frames:?}"
                    );
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    for id in &ids {
        let st = s.wait_task(id, Duration::from_secs(60)).await;
        if st.attempts > 1 {
            let log = s.orch_log();
            let lines: Vec<&str> = log.lines().filter(|l| l.contains(id.as_str())).collect();
            panic!(
                "{id} dispatched {} times ({st:?}):\n{}",
                st.attempts,
                lines.join("\n")
            );
        }
        // Replaying the whole log: exactly one terminal event, and it is last.
        let frames = s.events(id).await;
        let n = names(&frames);
        let terminals = n.iter().filter(|e| **e == "end" || **e == "error").count();
        assert_eq!(terminals, 1, "{id}: {n:?}");
        assert!(matches!(n.last(), Some(&"end") | Some(&"error")));
        if *n.last().unwrap() == "end" {
            let tokens = n.iter().filter(|e| **e == "token").count() as u64;
            assert_eq!(data(frames.last().unwrap())["tokens_out"], tokens);
        }
    }
    let m = s.metrics().await;
    let completed: f64 = ["a", "b", "none"]
        .iter()
        .flat_map(|p| {
            ["end", "CANCELLED"].map(|o| {
                metric_value(
                    &m,
                    "tasks_completed_total",
                    &[("outcome", o), ("pool_id", p)],
                )
                .unwrap_or(0.0)
            })
        })
        .sum();
    assert_eq!(
        completed, 200.0,
        "every task counted once as completed or cancelled"
    );
}
