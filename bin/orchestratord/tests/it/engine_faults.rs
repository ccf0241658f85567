//! Faults between orchestratord and a real engine, injected by the project's fault proxy: a
//! pool `proxied` whose handoff URL is the proxy in front of the `real` pool's llama-server
//! (the slow model, so a stream is still running when the fault comes). Each test names the
//! fault and the one outcome orchestratord owes the client; the pool serves again once the
//! fault is lifted (nothing leaked: its slot is free).

use std::time::Duration;

use llorch_contracts::HandoffFile;
use llorch_fault_proxy::{Fault, FaultProxy};

use crate::harness::*;

struct Proxied {
    s: Stack,
    proxy: FaultProxy,
}

async fn proxied(orch_env: Vec<(&'static str, String)>) -> Proxied {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml_for(&slow_model(), "real", 2, 4096),
        orch_env,
        ..Default::default()
    })
    .await;
    let engine = s.handoff("real").url;
    let upstream = engine.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), upstream)
        .await
        .unwrap();
    // The real engine's key, for the pool that reaches it through the proxy.
    llorch_handoff::write_key(&s.runtime_dir, "proxied", &s.engine_key("real")).unwrap();
    let file = HandoffFile::external("proxied", &proxy.url(), "tiny", 1);
    llorch_handoff::write_atomic(&s.runtime_dir, &file).unwrap();
    s.wait_pools_ready(2).await;
    Proxied { s, proxy }
}

fn pinned(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": "once upon a time", "max_tokens": max_tokens,
        "placement": {"mode": "pin", "pin_pool_id": "proxied"}})
}

impl Proxied {
    /// Submits a pinned task and reads its stream up to the first token.
    async fn streaming(&self, max_tokens: u32) -> (String, EventStream) {
        let a = self.s.submit_ok(pinned(max_tokens)).await;
        let mut events = self.s.open_events(&a.task_id, None).await;
        let first = events.frame_named("token").await;
        assert!(first.is_some(), "no token before the fault");
        (a.task_id, events)
    }

    /// The proxied pool is ready with its slot free, then serves a whole task.
    async fn serves_again(&self) {
        self.proxy.set(Fault::Pass);
        wait_for(
            "the proxied pool healthy with nothing in flight",
            Duration::from_secs(30),
            || async {
                let pools: serde_json::Value = self.s.get("/v2/pools").await.json().await.unwrap();
                pools["pools"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| {
                        p["pool_id"] == "proxied" && p["healthy"] == true && p["in_flight"] == 0
                    })
                    .then_some(())
            },
        )
        .await;
        let a = self.s.submit_ok(pinned(8)).await;
        let st = self.s.wait_task(&a.task_id, Duration::from_secs(60)).await;
        assert_eq!(
            st.state,
            llorch_contracts::tasks::TaskState::Completed,
            "{st:?}"
        );
    }
}

/// The rest of a stream; its terminal frame's event name and data.
async fn ending(events: &mut EventStream) -> (String, serde_json::Value) {
    let mut last = None;
    while let Some(f) = events.frame().await {
        last = Some(f);
    }
    let f = last.expect("the stream ended without a frame");
    (f.event.clone().unwrap_or_default(), data(&f))
}

// covers: ORCH-2312
#[tokio::test]
async fn an_engine_that_goes_silent_mid_stream_ends_the_task_with_decode_timeout() {
    let p = proxied(vec![("ORCHD_DECODE_TIMEOUT_MS", "1500".into())]).await;
    let (_, mut events) = p.streaming(4000).await;
    p.proxy.set(Fault::HalfOpen);
    let (event, d) = ending(&mut events).await;
    assert_eq!(
        (event.as_str(), d["code"].as_str()),
        ("error", Some("DECODE_TIMEOUT")),
        "{d}"
    );
    p.serves_again().await;
}

// covers: ORCH-2213
#[tokio::test]
async fn an_engine_connection_reset_mid_stream_ends_the_task_with_worker_reset() {
    let p = proxied(vec![]).await;
    let (_, mut events) = p.streaming(4000).await;
    p.proxy.set(Fault::Reset);
    let (event, d) = ending(&mut events).await;
    assert_eq!(
        (event.as_str(), d["code"].as_str()),
        ("error", Some("WORKER_RESET")),
        "{d}"
    );
    assert!(p.proxy.resets() >= 1);
    p.serves_again().await;
}

// covers: ORCH-2302
#[tokio::test]
async fn a_slow_and_late_engine_link_still_delivers_every_token_once_and_in_order() {
    let p = proxied(vec![]).await;
    p.proxy.set(Fault::Bandwidth(8 * 1024));
    let a = p.s.submit_ok(pinned(40)).await;
    let frames = p.s.events(&a.task_id).await;
    p.proxy.set(Fault::Latency(Duration::from_millis(40)));
    let b = p.s.submit_ok(pinned(40)).await;
    let late = p.s.events(&b.task_id).await;
    for frames in [frames, late] {
        let indices: Vec<u64> = frames
            .iter()
            .filter(|f| f.event.as_deref() == Some("token"))
            .map(|f| data(f)["i"].as_u64().unwrap())
            .collect();
        let end = frames.last().unwrap();
        assert_eq!(end.event.as_deref(), Some("end"), "{:?}", names(&frames));
        assert_eq!(indices, (0..indices.len() as u64).collect::<Vec<_>>());
        assert_eq!(data(end)["tokens_out"], indices.len() as u64);
    }
}

// covers: ORCH-2314
#[tokio::test]
async fn an_engine_that_answers_400_and_withholds_the_body_neither_hangs_the_task_nor_keeps_its_slot(
) {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("real", 1, 2048),
        orch_env: vec![("ORCHD_FIRST_TOKEN_TIMEOUT_MS", "1000".into())],
        ..Default::default()
    })
    .await;
    let fault = crate::fault_engine::start_refusing_without_a_body().await;
    let file = HandoffFile::external("mute", &fault.url, "tiny", 1);
    llorch_handoff::write_atomic(&s.runtime_dir, &file).unwrap();
    s.wait_pools_ready(2).await;
    let pin = |max_tokens: u32| {
        serde_json::json!({"model_ref": "tiny", "prompt": "hi", "max_tokens": max_tokens,
            "placement": {"mode": "pin", "pin_pool_id": "mute"}})
    };
    // Waited out: the task ends (the body read is bounded by the first-token timeout).
    let a = s.submit_ok(pin(5)).await;
    let st = s.wait_task(&a.task_id, Duration::from_secs(20)).await;
    assert_eq!(
        st.state,
        llorch_contracts::tasks::TaskState::Failed,
        "{st:?}"
    );
    // Two dispatches (the retry budget), each given up at the first-token timeout (1 s).
    let error = st.error.clone().unwrap();
    assert_eq!(
        error.code,
        llorch_contracts::ErrorCode::WorkerReset,
        "{error:?}"
    );
    assert!(
        error.message.contains("did not answer in time"),
        "{error:?}"
    );
    assert_eq!(st.attempts, 2, "{st:?}");
    // Cancelled while the body is withheld: it ends cancelled, at once.
    let b = s.submit_ok(pin(5)).await;
    wait_for(
        "the task running on the mute pool",
        Duration::from_secs(10),
        || async {
            (s.status(&b.task_id).await.state == llorch_contracts::tasks::TaskState::Running)
                .then_some(())
        },
    )
    .await;
    assert_eq!(s.cancel(&b.task_id).await, 204);
    let st = s.wait_task(&b.task_id, Duration::from_secs(5)).await;
    assert_eq!(
        st.state,
        llorch_contracts::tasks::TaskState::Cancelled,
        "{st:?}"
    );
    // Nothing held: the mute pool's slot is free again.
    wait_for(
        "nothing in flight on the mute pool",
        Duration::from_secs(10),
        || async {
            let pools: serde_json::Value = s.get("/v2/pools").await.json().await.unwrap();
            pools["pools"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["pool_id"] == "mute" && p["in_flight"] == 0)
                .then_some(())
        },
    )
    .await;
}
