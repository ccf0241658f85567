//! Event streams (SSE): order, numbering, resumption, terminal events; slots freed.

use std::time::Duration;

use cucumber::{then, when};
use llorch_client::SseFrame;
use llorch_test_support::wait_for;

use crate::world::Bdd;

const STREAM_WITHIN: Duration = Duration::from_secs(30);

fn names(frames: &[SseFrame]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f.event.as_deref().unwrap_or(""))
        .collect()
}

fn data(f: &SseFrame) -> serde_json::Value {
    serde_json::from_str(&f.data).unwrap()
}

fn frame_id(f: &SseFrame) -> u64 {
    f.id.as_deref()
        .and_then(|i| i.parse().ok())
        .unwrap_or_else(|| panic!("a frame without a numeric id: {f:?}"))
}

fn stream<'a>(w: &'a Bdd, name: &str) -> &'a [SseFrame] {
    w.streams
        .get(name)
        .unwrap_or_else(|| panic!("the stream of task {name} was not read"))
}

#[when(expr = "the client follows the events of task {string} to the end")]
async fn follow_to_end(w: &mut Bdd, name: String) {
    let s = w.open_events(&w.task_id(&name), None).await;
    let frames = Bdd::read_to_end(s, STREAM_WITHIN).await;
    w.streams.insert(name, frames);
}

#[when(expr = "the client follows the events of task {string} after event id {int}")]
async fn follow_after(w: &mut Bdd, name: String, last_event_id: u64) {
    let s = w.open_events(&w.task_id(&name), Some(last_event_id)).await;
    let frames = Bdd::read_to_end(s, STREAM_WITHIN).await;
    w.resumed.insert(name, frames);
}

#[when(expr = "the client receives a token of task {string}")]
async fn receive_a_token(w: &mut Bdd, name: String) {
    let mut s = w.open_events(&w.task_id(&name), None).await;
    let token = tokio::time::timeout(STREAM_WITHIN, s.frame_named("token"))
        .await
        .unwrap_or_else(|_| panic!("no token of task {name} within {STREAM_WITHIN:?}"));
    assert!(
        token.is_some(),
        "the stream of task {name} ended without a token"
    );
    w.open.0.insert(name, s);
}

#[then(
    expr = "the stream of task {string} has queued events, then one started event on pool {string}, then tokens, then one end event"
)]
fn stream_in_order(w: &mut Bdd, name: String, pool: String) {
    let frames = stream(w, &name);
    let n = names(frames);
    let started = n
        .iter()
        .position(|e| *e == "started")
        .unwrap_or_else(|| panic!("no started event: {n:?}"));
    assert!(started > 0, "no queued event: {n:?}");
    assert!(n[..started].iter().all(|e| *e == "queued"), "{n:?}");
    assert_eq!(data(&frames[started])["pool_id"], pool.as_str());
    let (last, middle) = n[started + 1..].split_last().unwrap();
    assert!(!middle.is_empty(), "no token: {n:?}");
    assert!(middle.iter().all(|e| *e == "token"), "{n:?}");
    assert_eq!(*last, "end", "{n:?}");
}

#[then(expr = "the token events of task {string} are numbered from 0 up by one")]
fn tokens_numbered(w: &mut Bdd, name: String) {
    let tokens: Vec<u64> = stream(w, &name)
        .iter()
        .filter(|f| f.event.as_deref() == Some("token"))
        .map(|f| data(f)["i"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (0..tokens.len() as u64).collect();
    assert_eq!(tokens, want);
}

#[then(expr = "the end event of task {string} has a finish reason and counts its token events")]
fn end_counts_tokens(w: &mut Bdd, name: String) {
    let frames = stream(w, &name);
    let tokens = names(frames).iter().filter(|e| **e == "token").count();
    let end = frames
        .iter()
        .find(|f| f.event.as_deref() == Some("end"))
        .unwrap();
    assert_eq!(data(end)["tokens_out"], tokens as u64, "{end:?}");
    let reason = data(end)["finish_reason"].clone();
    assert!(reason == "length" || reason == "stop", "{end:?}");
}

#[then(expr = "the verbose stream of task {string} also carries a metrics event")]
async fn verbose_has_metrics(w: &mut Bdd, name: String) {
    let id = w.task_id(&name);
    let text = w
        .http(&w.client_token)
        .get(format!("{}/v2/tasks/{id}/events?verbose=true", w.base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("event: metrics"), "{text}");
    assert!(text.contains("event: end"), "{text}");
}

#[then(expr = "a second subscriber of task {string} gets the same frames")]
async fn second_subscriber(w: &mut Bdd, name: String) {
    let s = w.open_events(&w.task_id(&name), None).await;
    let again = Bdd::read_to_end(s, STREAM_WITHIN).await;
    assert_eq!(&again, stream(w, &name));
}

#[then(expr = "the frame ids of task {string} increase")]
fn frame_ids_increase(w: &mut Bdd, name: String) {
    let ids: Vec<u64> = stream(w, &name).iter().map(frame_id).collect();
    assert!(ids.windows(2).all(|p| p[0] < p[1]), "{ids:?}");
}

#[then(expr = "the resumed stream of task {string} holds exactly its frames after id {int}")]
fn resumed_after(w: &mut Bdd, name: String, after: u64) {
    let want: Vec<SseFrame> = stream(w, &name)
        .iter()
        .filter(|f| frame_id(f) > after)
        .cloned()
        .collect();
    let got = w.resumed.get(&name).unwrap();
    assert!(!want.is_empty(), "nothing after id {after} to compare");
    assert_eq!(got, &want);
}

/// The rest of a stream held open, else a new subscription read whole (a replay).
async fn frames_to_end(w: &mut Bdd, name: &str) -> Vec<SseFrame> {
    let s = match w.open.0.remove(name) {
        Some(s) => s,
        None => w.open_events(&w.task_id(name), None).await,
    };
    let frames = Bdd::read_to_end(s, STREAM_WITHIN).await;
    w.streams.insert(name.to_string(), frames.clone());
    frames
}

#[then(expr = "the stream of task {string} ends with error {string}")]
async fn stream_ends_with_error(w: &mut Bdd, name: String, code: String) {
    let frames = frames_to_end(w, &name).await;
    let last = frames.last().expect("an empty stream");
    assert_eq!(last.event.as_deref(), Some("error"), "{frames:?}");
    assert_eq!(data(last)["code"], code.as_str(), "{last:?}");
    let terminal = names(&frames)
        .iter()
        .filter(|e| **e == "end" || **e == "error")
        .count();
    assert_eq!(terminal, 1, "{frames:?}");
}

#[then(expr = "the stream of task {string} ends with an end event")]
async fn stream_ends_with_end(w: &mut Bdd, name: String) {
    let frames = match w.streams.get(&name) {
        Some(f) => f.clone(),
        None => frames_to_end(w, &name).await,
    };
    assert_eq!(names(&frames).last(), Some(&"end"), "{frames:?}");
}

#[then(expr = "the stream of task {string} has no started event")]
fn no_started_event(w: &mut Bdd, name: String) {
    let n = names(stream(w, &name));
    assert!(!n.contains(&"started") && !n.contains(&"token"), "{n:?}");
}

#[then(expr = "the engine of pool {string} has no busy slot within {int} second(s)")]
async fn engine_slot_idle(w: &mut Bdd, pool: String, secs: u64) {
    let bytes = std::fs::read(w.d().home().runtime_dir.join(format!("{pool}.json"))).unwrap();
    let url = llorch_contracts::HandoffFile::parse(&bytes).unwrap().url;
    let key = llorch_handoff::read_key(&w.d().home().runtime_dir, &pool)
        .unwrap()
        .unwrap();
    wait_for(
        &format!("no busy slot on the engine of {pool}"),
        Duration::from_secs(secs),
        || async {
            let slots: Vec<serde_json::Value> = reqwest::Client::new()
                .get(format!("{url}/slots"))
                .bearer_auth(&key)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            slots
                .iter()
                .all(|s| s["is_processing"] == false)
                .then_some(())
        },
    )
    .await;
}
