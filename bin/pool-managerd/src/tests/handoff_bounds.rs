//! The handoff bound on tokio's paused clock: an external handoff file is seen, and its pool
//! ready, within 2 s of its write even when no kernel file event comes (the periodic rescan
//! alone, as on a network filesystem: `POOL_MANAGERD_HANDOFF_NOTIFY=false`).

use std::time::Duration;

use llorch_contracts::HandoffFile;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kit::*;
use crate::handoff_watcher::HandoffWatcher;

const MS: Duration = Duration::from_millis(1);

// covers: POOL-3209
#[tokio::test(start_paused = true)]
async fn an_external_file_only_the_rescan_sees_is_a_ready_pool_within_2_s_of_its_write() {
    // No kernel file events: only the periodic rescan (every 1000 ms, the default) sees what
    // is written.
    let b = build(&["--handoff-notify=false"]);
    let runtime = b.runtime_dir.clone();
    let url = "http://127.0.0.1:9";
    b.engines.external(
        url,
        EngineScript {
            healthy_after: Some(Duration::ZERO),
            ..Default::default()
        },
    );
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let watcher = tokio::spawn(HandoffWatcher::new(b.shared.clone(), cancel.clone()).run());
    // Written just after a rescan: the worst case, a whole interval before the next one.
    tokio::time::sleep_until(started + 1001 * MS).await;
    llorch_handoff::write_atomic(&runtime, &HandoffFile::external("ext", url, "tiny", 1)).unwrap();
    let written = Instant::now();
    let ready = loop {
        if b.shared.pool("ext").is_some_and(|p| p.ready) {
            break Instant::now();
        }
        assert!(
            Instant::now() - written <= 2000 * MS,
            "not ready within 2 s of the write: {:?}",
            b.shared.pool("ext")
        );
        tokio::time::sleep(MS).await;
    };
    assert!(
        ready >= started + 2000 * MS,
        "seen before the next rescan: not the rescan alone"
    );
    cancel.cancel();
    watcher.await.unwrap();
}
