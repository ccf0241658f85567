//! Handoff files written by an external provisioner into orchestratord's runtime directory.

use std::time::Duration;

use cucumber::{then, when};
use llorch_contracts::HandoffFile;
use llorch_test_support::wait_for;

use crate::world::Bdd;

#[when(expr = "a handoff file for pool {string} naming that llama-server is written")]
fn write_handoff(w: &mut Bdd, pool: String) {
    let l = w.d().lone();
    let file = HandoffFile::external(&pool, &l.engine.url, "tiny", 1);
    llorch_handoff::write_atomic(&l.runtime_dir, &file).unwrap();
}

#[when(expr = "an invalid handoff file for pool {string} is written")]
fn write_invalid_handoff(w: &mut Bdd, pool: String) {
    let l = w.d().lone();
    std::fs::write(
        l.runtime_dir.join(format!("{pool}.json")),
        br#"{"version": 1, "pool_id": "broken", "url": "#,
    )
    .unwrap();
}

#[when(expr = "the handoff file of pool {string} is deleted")]
fn delete_handoff(w: &mut Bdd, pool: String) {
    std::fs::remove_file(w.d().lone().runtime_dir.join(format!("{pool}.json"))).unwrap();
}

#[then(expr = "orchestratord lists pool {string} as ready within {int} second(s)")]
async fn ready_within(w: &mut Bdd, pool: String, secs: u64) {
    w.wait_pools_ready(&[pool], Duration::from_secs(secs)).await;
}

#[then(expr = "orchestratord no longer lists pool {string} within {int} second(s)")]
async fn gone_within(w: &mut Bdd, pool: String, secs: u64) {
    wait_for(
        &format!("pool {pool} retired"),
        Duration::from_secs(secs),
        || async {
            w.pool(&pool)
                .await
                .is_some_and(|p| p.is_none())
                .then_some(())
        },
    )
    .await;
}

#[then(expr = "orchestratord logged the invalid handoff file of pool {string}")]
fn logged_invalid(w: &mut Bdd, pool: String) {
    let log = w.d().orch_log();
    let file = format!("{pool}.json");
    assert!(
        log.lines()
            .any(|l| l.contains("ignoring invalid handoff file") && l.contains(&file)),
        "{log}"
    );
}

#[then(expr = "orchestratord does not list pool {string}")]
async fn not_listed(w: &mut Bdd, pool: String) {
    let pools = w
        .pools()
        .await
        .expect("orchestratord answers its pool list");
    assert!(!pools.is_empty(), "orchestratord lists no pool at all");
    assert!(
        pools.iter().all(|p| p["pool_id"] != pool.as_str()),
        "{pools:?}"
    );
}
