//! CLOUD registration bounds: heartbeats at the interval, registration again at once after a
//! 404, backoff while orchestratord is down, deregistration at shutdown.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use llorch_contracts::nodes::{NodeHeartbeat, NodeRegistration};
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::kit::*;
use crate::registration::{ControlPlane, Unreachable};

const MS: Duration = Duration::from_millis(1);

/// A scripted orchestratord: answers calls from a queue (then 200/204), records each call.
#[derive(Default)]
struct Plane {
    answers: Mutex<VecDeque<Result<u16, Unreachable>>>,
    calls: Mutex<Vec<(&'static str, Instant)>>,
}

impl Plane {
    fn answer(&self, kind: &'static str) -> BoxFuture<'_, Result<u16, Unreachable>> {
        self.calls.lock().push((kind, Instant::now()));
        let a = self.answers.lock().pop_front().unwrap_or(Ok(200));
        async move { a }.boxed()
    }

    fn calls(&self) -> Vec<(&'static str, Instant)> {
        self.calls.lock().clone()
    }
}

impl ControlPlane for Plane {
    fn register<'a>(&'a self, _: &'a NodeRegistration) -> BoxFuture<'a, Result<u16, Unreachable>> {
        self.answer("register")
    }
    fn heartbeat<'a>(
        &'a self,
        _: &'a str,
        _: &'a NodeHeartbeat,
    ) -> BoxFuture<'a, Result<u16, Unreachable>> {
        self.answer("heartbeat")
    }
    fn deregister<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<u16, Unreachable>> {
        self.answer("deregister")
    }
}

struct Node {
    plane: Arc<Plane>,
    cancel: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    start: Instant,
    _built: Built,
}

fn node(answers: Vec<Result<u16, Unreachable>>) -> Node {
    let built = build(&[
        "--api-token=registration-test-token-0123",
        "--orchestratord-url=http://orchestratord",
        "--heartbeat-interval-ms=5000",
    ]);
    let plane = Arc::new(Plane::default());
    plane.answers.lock().extend(answers);
    let reg = built.shared.config.registration.clone().unwrap();
    let cancel = CancellationToken::new();
    let start = Instant::now();
    let done = tokio::spawn(crate::registration::run(
        built.shared.clone(),
        reg,
        "http://127.0.0.1:9200".into(),
        plane.clone(),
        cancel.clone(),
    ));
    Node {
        plane,
        cancel,
        done,
        start,
        _built: built,
    }
}

fn offsets(n: &Node) -> Vec<(&'static str, Duration)> {
    n.plane
        .calls()
        .into_iter()
        .map(|(k, t)| (k, t - n.start))
        .collect()
}

// covers: CLOUD-4107
#[tokio::test(start_paused = true)]
async fn a_registered_node_heartbeats_exactly_every_interval() {
    let n = node(Vec::new());
    tokio::time::sleep(Duration::from_millis(15_000)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        offsets(&n),
        [
            ("register", Duration::ZERO),
            ("heartbeat", 5000 * MS),
            ("heartbeat", 10_000 * MS),
            ("heartbeat", 15_000 * MS),
        ]
    );
}

// covers: CLOUD-4107
#[tokio::test(start_paused = true)]
async fn a_node_orchestratord_forgot_registers_again_the_instant_a_heartbeat_answers_404() {
    // register ok, heartbeat 404, register ok, then heartbeats.
    let n = node(vec![Ok(200), Ok(404), Ok(200)]);
    tokio::time::sleep(Duration::from_millis(10_000)).await;
    tokio::task::yield_now().await;
    assert_eq!(
        offsets(&n),
        [
            ("register", Duration::ZERO),
            ("heartbeat", 5000 * MS),
            ("register", 5000 * MS),
            ("heartbeat", 10_000 * MS),
        ]
    );
}

// covers: CLOUD-4107
#[tokio::test(start_paused = true)]
async fn registration_retries_with_doubling_backoff_while_orchestratord_is_down() {
    let down = || Err::<u16, Unreachable>(Unreachable("connection refused".into()));
    let n = node(vec![down(), down(), down(), down(), Ok(200)]);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    tokio::task::yield_now().await;
    // Ceilings 0.5, 1, 2, 4 s; jitter 0 waits half of each: 0.25, 0.5, 1, 2 s.
    let registers: Vec<Duration> = offsets(&n)
        .into_iter()
        .filter(|(k, _)| *k == "register")
        .map(|(_, t)| t)
        .collect();
    assert_eq!(
        registers,
        [Duration::ZERO, 250 * MS, 750 * MS, 1750 * MS, 3750 * MS]
    );
}

// covers: CLOUD-4107
#[tokio::test(start_paused = true)]
async fn a_registered_node_deregisters_when_it_stops() {
    let n = node(Vec::new());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    n.cancel.cancel();
    let Node {
        plane, done, start, ..
    } = n;
    done.await.unwrap();
    let calls: Vec<_> = plane
        .calls()
        .into_iter()
        .map(|(k, t)| (k, t - start))
        .collect();
    assert_eq!(calls.last().unwrap(), &("deregister", 1000 * MS));
}
