//! The HOME source: pools bound from handoff files carry the free GPU memory the local
//! pool-managerd reports, and placement's tie-break uses it.

use std::sync::Arc;
use std::time::Duration;

use llorch_contracts::HandoffFile;

use super::cloud_bounds::{Node, ScriptedNodes};
use super::kit::*;

const MS: Duration = Duration::from_millis(1);

// covers: ORCH-2203
#[tokio::test(start_paused = true)]
async fn home_pools_carry_pool_managerds_free_gpu_memory_and_placement_breaks_ties_with_it() {
    let dir = tempfile::tempdir().unwrap();
    for id in ["a", "b"] {
        let file = HandoffFile::external(id, &format!("http://{id}"), "tiny", 1);
        llorch_handoff::write_atomic(dir.path(), &file).unwrap();
    }
    let runtime = format!("--runtime-dir={}", dir.path().display());
    let h = Harness::start(&[&runtime, "--pool-health-interval-ms=1000"]);
    let pm = Arc::new(ScriptedNodes::default());
    pm.set(
        "http://pm",
        Node::Vram(vec![("a", 1 << 30), ("b", 8 << 30)]),
    );
    h.watch_home(pm.clone(), "http://pm");
    let vram = |id: &str| h.orch.pools.get(id).and_then(|p| p.vram_free_bytes);
    // Bound from their files (the watch reports them at once), figures read at the first
    // probe round.
    for _ in 0..100 {
        if vram("a").is_some() && vram("b").is_some() {
            break;
        }
        tokio::time::sleep(100 * MS).await;
    }
    assert_eq!((vram("a"), vram("b")), (Some(1 << 30), Some(8 << 30)));
    // Equal free slots: the pool with more free GPU memory takes the task (else "a" by id).
    h.engine.push(tokens(3, MS));
    let first = h.submit(task(3));
    assert_eq!(outcome(&first).await.0, "end");
    assert_eq!(first.pool_id().as_deref(), Some("b"));
    // The figures follow pool-managerd at the next probe round.
    pm.set(
        "http://pm",
        Node::Vram(vec![("a", 16 << 30), ("b", 8 << 30)]),
    );
    tokio::time::sleep(1000 * MS).await;
    settle().await;
    assert_eq!(vram("a"), Some(16 << 30));
    h.engine.push(tokens(3, MS));
    let second = h.submit(task(3));
    assert_eq!(outcome(&second).await.0, "end");
    assert_eq!(second.pool_id().as_deref(), Some("a"));
}

// covers: POOL-3210
#[tokio::test(start_paused = true)]
async fn without_kernel_file_events_a_handoff_file_binds_its_pool_at_the_next_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = format!("--runtime-dir={}", dir.path().display());
    let h = Harness::start(&[
        &runtime,
        "--handoff-notify=false",
        "--handoff-watch-interval-ms=1000",
    ]);
    let pm = Arc::new(ScriptedNodes::default());
    pm.set("http://pm", Node::Vram(Vec::new()));
    let started = tokio::time::Instant::now();
    h.watch_home(pm, "http://pm");
    // Written just after a rescan: only the next one, a whole interval later, can see it.
    tokio::time::sleep_until(started + 1001 * MS).await;
    let file = HandoffFile::external("late", "http://late", "tiny", 1);
    llorch_handoff::write_atomic(dir.path(), &file).unwrap();
    let bound = loop {
        if h.orch.pools.get("late").is_some() {
            break tokio::time::Instant::now();
        }
        assert!(
            started.elapsed() <= 2001 * MS,
            "not bound by the rescan after the write"
        );
        tokio::time::sleep(MS).await;
    };
    assert!(
        bound >= started + 2000 * MS,
        "bound before the next rescan: not the rescan alone"
    );
}
