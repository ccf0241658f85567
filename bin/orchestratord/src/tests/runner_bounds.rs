//! Bounds of one running task: cancel, first-token and decode timeouts, failures before and
//! after the first token, a lost node — each at the exact virtual instant it must happen.

use std::time::Duration;

use tokio::time::Instant;

use super::kit::*;

const MS: Duration = Duration::from_millis(1);

// covers: ORCH-2301
#[tokio::test(start_paused = true)]
async fn a_task_streams_its_tokens_and_ends_with_end_after_the_last_chunk() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(tokens(3, 10 * MS));
    let t0 = Instant::now();
    let task = h.submit(task(3));
    let (name, data, at) = terminal(&task).await;
    assert_eq!(name, "end", "{data}");
    assert_eq!(data["tokens_out"], 3);
    assert_eq!(data["finish_reason"], "length");
    // Three tokens and the final chunk, 10 ms apart.
    assert_eq!(at - t0, 40 * MS);
    assert_eq!(
        names(&task),
        ["queued", "started", "token", "token", "token", "metrics", "end"]
    );
    assert_eq!(h.orch.pools.get("a").unwrap().in_flight, 0);
}

// covers: ORCH-2308
#[tokio::test(start_paused = true)]
async fn cancel_of_a_running_task_aborts_the_engine_stream_and_frees_the_slot_at_once() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(tokens(1000, 10 * MS));
    let task = h.submit(task(1000));
    tokio::time::sleep(55 * MS).await;
    assert_eq!(h.engine.open_streams(), 1);
    assert_eq!(h.orch.pools.get("a").unwrap().in_flight, 1);
    let cancelled_at = Instant::now();
    h.orch.cancel(
        &task,
        llorch_contracts::ErrorEnvelope::new(llorch_contracts::ErrorCode::Cancelled, "client"),
    );
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "CANCELLED");
    assert_eq!(at, cancelled_at, "cancel took virtual time");
    assert_eq!(h.engine.open_streams(), 0, "engine request not aborted");
    assert_eq!(
        h.orch.pools.get("a").unwrap().in_flight,
        0,
        "slot not freed"
    );
    assert_eq!(task.status(None).tokens_out, 5);
}

// covers: ORCH-2312
#[tokio::test(start_paused = true)]
async fn a_stream_stalled_after_tokens_ends_with_decode_timeout_exactly_decode_timeout_after_the_last_chunk(
) {
    let h = Harness::start(&["--decode-timeout-ms=700"]);
    h.add_pool("a", 1);
    h.engine.push(Script::Stream(vec![
        Step::Token(10 * MS, "x"),
        Step::Token(10 * MS, "y"),
        Step::Stall,
    ]));
    let t0 = Instant::now();
    let task = h.submit(task(10));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "DECODE_TIMEOUT");
    assert_eq!(at - t0, 20 * MS + 700 * MS);
    assert_eq!(h.engine.open_streams(), 0);
}

// covers: ORCH-2312
#[tokio::test(start_paused = true)]
async fn an_open_stream_without_a_first_token_ends_with_decode_timeout_exactly_at_the_first_token_timeout(
) {
    let h = Harness::start(&["--first-token-timeout-ms=1500", "--decode-timeout-ms=100"]);
    h.add_pool("a", 1);
    h.engine.push(Script::Stream(vec![Step::Stall]));
    let t0 = Instant::now();
    let task = h.submit(task(10));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "DECODE_TIMEOUT");
    assert_eq!(at - t0, 1500 * MS);
}

// covers: ORCH-2214
#[tokio::test(start_paused = true)]
async fn an_engine_that_never_answers_is_marked_unhealthy_and_the_retry_waits_for_its_health() {
    let h = Harness::start(&["--first-token-timeout-ms=1000"]);
    h.add_pool("a", 1);
    h.engine.always(Script::NoAnswer);
    let t0 = Instant::now();
    let task = h.submit(task(10));
    // The first attempt times out at 1 s: the pool takes no work until a probe says healthy.
    tokio::time::sleep(1500 * MS).await;
    assert!(!h.orch.pools.get("a").unwrap().healthy);
    assert_eq!(
        h.engine.calls().len(),
        1,
        "retried on a pool known to be failing"
    );
    h.orch.pools.set_health("a", true, None);
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    // The retry started when the pool was healthy again and timed out 1 s later.
    assert_eq!(at - t0, 2500 * MS);
    assert_eq!(h.engine.calls().len(), 2);
    assert_eq!(task.status(None).attempts, 2);
}

// covers: ORCH-2212
#[tokio::test(start_paused = true)]
async fn a_stream_closed_before_the_first_token_is_retried_once_on_the_other_pool() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.add_pool("b", 1);
    h.engine.push(Script::Stream(vec![Step::Close(5 * MS)]));
    h.engine.push(tokens(2, MS));
    let task = h.submit(task(2));
    let (name, _, _) = terminal(&task).await;
    assert_eq!(name, "end");
    let calls = h.engine.calls();
    assert_eq!(calls.len(), 2);
    assert_ne!(calls[0], calls[1], "the retry went to the pool that failed");
    assert_eq!(
        names(&task),
        ["queued", "started", "started", "token", "token", "metrics", "end"]
    );
}

// covers: ORCH-2212
#[tokio::test(start_paused = true)]
async fn a_server_error_before_the_first_token_is_retried_and_a_second_failure_ends_with_worker_reset(
) {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(Script::Status(503));
    h.engine.push(Script::Unreachable);
    let task = h.submit(task(2));
    tokio::time::sleep(100 * MS).await;
    assert_eq!(
        h.engine.calls().len(),
        1,
        "retried on a pool known to be failing"
    );
    h.orch.pools.set_health("a", true, None); // the next probe finds it up
    let (code, _) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(h.engine.calls().len(), 2);
}

// covers: ORCH-2213
#[tokio::test(start_paused = true)]
async fn a_stream_broken_after_the_first_token_ends_with_worker_reset_without_a_retry() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.add_pool("b", 1);
    h.engine.push(Script::Stream(vec![
        Step::Token(MS, "x"),
        Step::Break(3 * MS),
    ]));
    let t0 = Instant::now();
    let task = h.submit(task(10));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(at - t0, 4 * MS);
    assert_eq!(
        h.engine.calls().len(),
        1,
        "generation was retried after a token"
    );
    assert_eq!(task.status(None).tokens_out, 1);
}

// covers: ORCH-2314
#[tokio::test(start_paused = true)]
async fn an_engine_refusal_ends_the_task_with_invalid_params_without_a_retry() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.add_pool("b", 1);
    h.engine.push(Script::Status(400));
    let task = h.submit(task(10));
    let (name, data, _) = terminal(&task).await;
    assert_eq!(
        (name, data["code"].as_str()),
        ("error", Some("INVALID_PARAMS"))
    );
    // The status is told; what the upstream said is not (it goes to the log).
    let message = data["message"].as_str().unwrap();
    assert!(message.contains("(400)"), "{message}");
    assert!(!message.contains("upstream-secret"), "{message}");
    assert_eq!(h.engine.calls().len(), 1);
}

// covers: ORCH-2314
#[tokio::test(start_paused = true)]
async fn an_error_chunk_in_the_stream_ends_the_task_with_invalid_params() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(Script::Stream(vec![
        Step::Token(MS, "x"),
        Step::EngineError(MS),
    ]));
    let task = h.submit(task(10));
    let (name, data, _) = terminal(&task).await;
    assert_eq!(
        (name, data["code"].as_str()),
        ("error", Some("INVALID_PARAMS"))
    );
    assert!(
        data["message"].as_str().unwrap().contains("engine error"),
        "{data}"
    );
}

// covers: CLOUD-4104
#[tokio::test(start_paused = true)]
async fn a_lost_node_ends_its_running_task_with_worker_reset_at_that_instant() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(tokens(1000, 10 * MS));
    let task = h.submit(task(1000));
    tokio::time::sleep(25 * MS).await;
    let lost_at = Instant::now();
    h.orch.pools.mark_lost("a", "node gone".into());
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(at, lost_at);
    assert_eq!(h.engine.open_streams(), 0);
}

// covers: CLOUD-4104
#[tokio::test(start_paused = true)]
async fn a_node_lost_before_the_first_token_sends_the_task_to_another_pool() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(Script::NoAnswer);
    h.engine.push(tokens(1, MS));
    let task = h.submit(task(1));
    tokio::time::sleep(10 * MS).await;
    h.add_pool("b", 1);
    h.orch.pools.mark_lost("a", "node gone".into());
    let (name, _, _) = terminal(&task).await;
    assert_eq!(name, "end");
    assert_eq!(h.engine.calls(), ["http://a", "http://b"]);
}

// covers: ORCH-2214
#[tokio::test(start_paused = true)]
async fn a_pool_whose_engine_turns_unhealthy_takes_no_task_until_it_is_healthy_again() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.orch
        .pools
        .set_health("a", false, Some("probe failed".into()));
    h.engine.push(tokens(1, MS));
    let task = h.submit(task(1));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(names(&task), ["queued"]);
    assert!(h.engine.calls().is_empty());
    let healthy_at = Instant::now();
    h.orch.pools.set_health("a", true, None);
    let (name, _, at) = terminal(&task).await;
    assert_eq!(name, "end");
    // Dispatched at once; the 1 ms token and the 1 ms final chunk follow.
    assert_eq!(at - healthy_at, 2 * MS);
}

// covers: ORCH-2312
#[tokio::test(start_paused = true)]
async fn comments_or_empty_chunks_from_a_stalled_engine_do_not_keep_its_task_alive() {
    let h = Harness::start(&["--decode-timeout-ms=700"]);
    h.add_pool("a", 1);
    let mut steps = vec![Step::Token(10 * MS, "x")];
    steps.extend((0..50).flat_map(|_| [Step::Comment(100 * MS), Step::Empty(100 * MS)]));
    h.engine.push(Script::Stream(steps));
    let t0 = Instant::now();
    let task = h.submit(task(10));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "DECODE_TIMEOUT");
    // Measured from the last token, not from the last comment.
    assert_eq!(at - t0, 10 * MS + 700 * MS);
    assert_eq!(h.engine.open_streams(), 0);
}

// covers: ORCH-2313
#[tokio::test(start_paused = true)]
async fn an_engine_that_overruns_max_tokens_is_cut_off_at_max_tokens() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    h.engine.push(tokens(50, 10 * MS));
    let task = h.submit(task(3));
    let (name, data, _) = terminal(&task).await;
    assert_eq!(name, "end", "{data}");
    assert_eq!(data["tokens_out"], 3);
    assert_eq!(data["finish_reason"], "length");
    assert_eq!(
        h.engine.open_streams(),
        0,
        "the engine stream was not dropped"
    );
    assert_eq!(h.orch.pools.get("a").unwrap().in_flight, 0);
}

// covers: ORCH-2313
#[tokio::test(start_paused = true)]
async fn an_engine_frame_that_never_ends_is_refused_at_one_mebibyte() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    let mut steps = vec![Step::Token(10 * MS, "x")];
    // 64 KiB pieces of one frame: refused once it passes 1 MiB, not buffered for ever.
    steps.extend((0..40).map(|_| Step::Unterminated(MS, 64 * 1024)));
    h.engine.push(Script::Stream(steps));
    let t0 = Instant::now();
    let task = h.submit(task(10));
    let (code, at) = outcome(&task).await;
    assert_eq!(code, "WORKER_RESET");
    assert_eq!(at - t0, 10 * MS + 17 * MS, "ended with the 17th piece");
    let st = task.status(None);
    assert!(
        st.error.as_ref().unwrap().message.contains("exceeded"),
        "{st:?}"
    );
}

// covers: ORCH-2215
#[tokio::test(start_paused = true)]
async fn a_pool_failing_three_dispatches_in_a_row_is_ejected_for_a_second_then_used_again() {
    let h = Harness::start(&[]);
    h.add_pool("a", 1);
    // The engine passes its health probe but fails every completion.
    h.engine.always(Script::Status(500));
    let first = h.submit(task(5));
    settle().await;
    // Its probe says healthy again: the retry goes there and fails too (two in a row).
    h.orch.pools.set_health("a", true, None);
    let (code, _) = outcome(&first).await;
    assert_eq!(code, "WORKER_RESET");
    let second = h.submit(task(5));
    settle().await;
    // The third failure in a row ejects the pool for 1 s, whatever its probe says.
    let ejected_at = Instant::now();
    h.orch.pools.set_health("a", true, None);
    h.engine.always(tokens(2, 10 * MS));
    assert_eq!(
        h.orch.pools.get("a").unwrap().wire().ejected_for_ms,
        Some(1000)
    );
    tokio::time::sleep_until(ejected_at + 1000 * MS - MS).await;
    settle().await;
    assert_eq!(
        second.status(None).attempts,
        1,
        "dispatched to an ejected pool"
    );
    let (code, at) = outcome(&second).await;
    assert_eq!(code, "end");
    // Dispatched exactly when the cool-down ended: two tokens and the final chunk later.
    assert_eq!(at - ejected_at, 1000 * MS + 30 * MS);
    let m = h.orch.metrics.render(&[("a".into(), true)], &[]);
    assert!(
        m.contains("orchd_pool_ejections_total{pool_id=\"a\"} 1"),
        "{m}"
    );
}
