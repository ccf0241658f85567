//! The disconnect grace: a task whose last event subscriber left is cancelled exactly
//! `ORCHD_DISCONNECT_GRACE_MS` later, unless a subscriber came back in between; an OpenAI
//! client's task ends at once.

use std::time::Duration;

use tokio::time::Instant;

use super::kit::*;
use crate::sse::SubscriberGuard;

const MS: Duration = Duration::from_millis(1);

// covers: ORCH-2309
#[tokio::test(start_paused = true)]
async fn a_task_left_by_its_last_subscriber_is_cancelled_exactly_at_the_grace() {
    let h = Harness::start(&["--disconnect-grace-ms=1500"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(5_000, 10 * MS));
    let task = h.submit(task(5_000));
    let guard = SubscriberGuard::new(h.orch.clone(), task.clone());
    tokio::time::sleep(100 * MS).await;
    drop(guard);
    let left = Instant::now();
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at - left, 1500 * MS);
    assert_eq!(h.engine.open_streams(), 0);
}

// covers: ORCH-2309
#[tokio::test(start_paused = true)]
async fn a_subscriber_back_within_the_grace_keeps_the_task_and_the_grace_restarts_when_it_leaves() {
    let h = Harness::start(&["--disconnect-grace-ms=1000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(5_000, 10 * MS));
    let task = h.submit(task(5_000));
    drop(SubscriberGuard::new(h.orch.clone(), task.clone()));
    // Back after 600 ms (a reconnect), gone again 900 ms later.
    tokio::time::sleep(600 * MS).await;
    let back = SubscriberGuard::new(h.orch.clone(), task.clone());
    tokio::time::sleep(900 * MS).await;
    assert!(
        !task.is_terminal(),
        "cancelled while a subscriber was there"
    );
    drop(back);
    let left = Instant::now();
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(
        at - left,
        1000 * MS,
        "the first departure's timer cancelled it"
    );
}

// covers: ORCH-2309
#[tokio::test(start_paused = true)]
async fn a_task_that_ends_within_the_grace_keeps_its_own_ending() {
    let h = Harness::start(&["--disconnect-grace-ms=1000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(20, 10 * MS));
    let task = h.submit(task(20));
    drop(SubscriberGuard::new(h.orch.clone(), task.clone()));
    let (code, ended) = outcome(&task).await;
    assert_eq!(code, "end");
    // The grace timer ends with its task, long before the grace would have run out.
    settle().await;
    assert!(ended.elapsed() < 1000 * MS);
    assert_eq!(h.orch.runners.len(), 0, "the grace timer outlived its task");
    tokio::time::sleep(2000 * MS).await;
    let n = names(&task);
    assert_eq!(
        n.iter().filter(|e| **e == "end" || **e == "error").count(),
        1,
        "{n:?}"
    );
    assert_eq!(n.last(), Some(&"end"));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_cannot_come_back_ends_its_task_at_once() {
    let h = Harness::start(&["--disconnect-grace-ms=1000"]);
    h.add_pool("a", 1);
    h.engine.push(tokens(5_000, 10 * MS));
    let task = h.submit(task(5_000));
    let guard = SubscriberGuard::without_grace(h.orch.clone(), task.clone());
    tokio::time::sleep(50 * MS).await;
    drop(guard);
    let left = Instant::now();
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at, left);
}
