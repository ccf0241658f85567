use std::time::Duration;

use llorch_contracts::{HandoffFile, PoolState, ProvisioningMode};

use crate::harness::*;

fn external_file(pool_id: &str, url: &str, slots: u32) -> HandoffFile {
    HandoffFile::external(pool_id, url, "tiny", slots)
}

/// Writes like a careful provisioner: temporary file, then rename.
fn drop_file(dir: &std::path::Path, file: &HandoffFile) {
    let tmp = dir.join(format!(".{}.tmp", file.pool_id));
    std::fs::write(&tmp, serde_json::to_vec(file).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{}.json", file.pool_id))).unwrap();
}

// covers: POOL-3203
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_handoff_file_registers_pool_and_deleting_it_retires_the_pool() {
    let engine = ExternalEngine::start(&tiny_model(), 2).await;
    let d = Daemon::start(DaemonOptions::default()).await;
    assert!(d.pools().await.pools.is_empty());

    drop_file(&d.runtime_dir, &external_file("ext", &engine.url, 2));
    let st = d.wait_ready("ext").await;
    assert_eq!(st.provisioning_mode, ProvisioningMode::External);
    assert_eq!(st.slots_total, 2);
    assert_eq!(st.slots_free, 2);
    assert_eq!(st.url.as_deref(), Some(engine.url.as_str()));

    // The proxy reaches the external engine too.
    let r = d
        .http
        .post(format!("{}/v2/pools/ext/engine/completion", d.base))
        .json(&serde_json::json!({"prompt": "the", "n_predict": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tokens_predicted"], 4);

    std::fs::remove_file(d.runtime_dir.join("ext.json")).unwrap();
    wait_for("pool retired", Duration::from_secs(5), || async {
        d.status("ext").await.is_none().then_some(())
    })
    .await;
    let m = d.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "ext"), ("outcome", "registered")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "ext"), ("outcome", "retired")]
        ),
        Some(1.0)
    );
    assert!(
        metric_value(
            &m,
            "pool_handoff_processing_duration_ms_count",
            &[("pool_id", "ext")]
        )
        .unwrap()
            >= 1.0
    );
}

// covers: POOL-3204
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_handoff_file_changes_nothing_and_counts_a_failure() {
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let d = Daemon::start(DaemonOptions::default()).await;
    drop_file(&d.runtime_dir, &external_file("good", &engine.url, 1));
    d.wait_ready("good").await;
    let before = d.pools().await.pools;

    std::fs::write(d.runtime_dir.join("bad.json"), b"{ this is not json").unwrap();
    // Same pool id as an existing pool, but invalid content: must not disturb it.
    std::fs::write(
        d.runtime_dir.join("good.json"),
        br#"{"version": 1, "pool_id": "good"}"#,
    )
    .unwrap();
    wait_for("invalid files counted", Duration::from_secs(5), || async {
        let m = d.metrics().await;
        let bad = metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "bad"), ("outcome", "invalid")],
        );
        let good = metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "good"), ("outcome", "invalid")],
        );
        (bad == Some(1.0) && good == Some(1.0)).then_some(())
    })
    .await;
    // That rescans do not report the file again is proven in process
    // (`llorch-handoff` `watch::tests::rescan_alone_finds_files_without_duplicates`).
    let m = d.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pool_handoff_files_processed_total",
            &[("pool_id", "bad"), ("outcome", "invalid")]
        ),
        Some(1.0)
    );
    let after = d.pools().await.pools;
    assert_eq!(after.len(), before.len());
    assert_eq!(after[0].pool_id, "good");
    assert_eq!(after[0].state, PoolState::Ready);
    assert!(pid_alive(d.child.id().unwrap()), "daemon died");
}

// covers: POOL-3203
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_removes_ingested_file_and_keeps_the_pool() {
    let engine = ExternalEngine::start(&tiny_model(), 1).await;
    let d = Daemon::start(DaemonOptions {
        extra_env: vec![("POOL_MANAGERD_AUTO_DELETE_HANDOFF".into(), "true".into())],
        ..Default::default()
    })
    .await;
    drop_file(&d.runtime_dir, &external_file("auto", &engine.url, 1));
    d.wait_ready("auto").await;
    wait_for("file auto-deleted", Duration::from_secs(5), || async {
        (!d.runtime_dir.join("auto.json").exists()).then_some(())
    })
    .await;
    // The watcher takes events in order: once a file dropped after the deletion has its pool,
    // the deletion was judged too.
    drop_file(&d.runtime_dir, &external_file("later", &engine.url, 1));
    d.wait_ready("later").await;
    assert!(
        d.status("auto").await.unwrap().ready,
        "auto-deleted file retired its pool"
    );
}
