use std::time::Duration;

use llorch_contracts::HandoffFile;

use crate::harness::*;

/// Exercises both live daemons so every family has samples, then checks both scrapes against
/// `ci/metrics.lint.json`: same names, types and labels, no unlisted family, bounded values.
// covers: OBS-6101
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_both_live_daemons_match_the_lint_list() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    // A task that completes, one rejected, one cancelled while running.
    let done = s.submit_ok(task("complete", 20)).await.task_id;
    s.wait_task(&done, Duration::from_secs(10)).await;
    assert_eq!(s.submit(task("", 5)).await.status(), 400);
    let running = s.submit_ok(task("the", 8000)).await.task_id;
    wait_for("running", Duration::from_secs(10), || async {
        s.status(&running).await.started_at_ms.map(|_| ())
    })
    .await;
    s.cancel(&running).await;
    // An external handoff file (pointing at the same engine) for pool-managerd's handoff metrics.
    let url = s.handoff("p0").url;
    llorch_handoff::write_atomic(
        &s.runtime_dir,
        &HandoffFile::external("ext0", &url, "tiny", 1),
    )
    .unwrap();
    s.wait_pools_ready(2).await;

    let pm = authed_client(TOKEN);
    let pm_text = wait_for(
        "pool-managerd engine gauges",
        Duration::from_secs(10),
        || async {
            let t = pm
                .get(format!("{}/metrics", s.pm_base))
                .send()
                .await
                .ok()?
                .text()
                .await
                .ok()?;
            (t.contains("pool_engine_tokens_per_second")
                && t.contains("pool_handoff_processing_duration_ms"))
            .then_some(t)
        },
    )
    .await;
    let orch_text = s.metrics().await;
    let mut problems = lint_scrape("orchestratord", &orch_text, "home");
    problems.extend(lint_scrape("pool-managerd", &pm_text, "home"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Cardinality stays with the pools: two pools, nothing else carries pool_id.
    for text in [&orch_text, &pm_text] {
        for f in parse_exposition(text).values() {
            let pools: std::collections::BTreeSet<&String> = f
                .values
                .iter()
                .filter(|(k, _)| k == "pool_id")
                .map(|(_, v)| v)
                .collect();
            assert!(
                pools
                    .iter()
                    .all(|p| ["p0", "ext0", "none"].contains(&p.as_str())),
                "{pools:?}"
            );
        }
    }
}
