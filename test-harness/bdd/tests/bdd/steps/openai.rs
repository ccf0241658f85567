//! The OpenAI-compatible chat route, streamed.

use cucumber::{then, when};

use super::Caller;
use crate::world::{Answer, Bdd};

fn chat(content: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "model": "tiny", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "stream": true
    })
}

fn lines(w: &Bdd) -> Vec<&str> {
    w.answer()
        .text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect()
}

fn chunks(w: &Bdd) -> Vec<serde_json::Value> {
    lines(w)
        .into_iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn task_of_answer(w: &Bdd) -> String {
    w.answer()
        .header("x-llorch-task-id")
        .expect("an X-Llorch-Task-Id header")
        .to_string()
}

#[when(expr = "a client streams a chat completion of {string} with max_tokens {int}")]
async fn stream_chat(w: &mut Bdd, content: String, max_tokens: u32) {
    let r = w
        .http(&w.client_token)
        .post(format!("{}/v1/chat/completions", w.base()))
        .json(&chat(&content, max_tokens))
        .send()
        .await
        .unwrap();
    // The whole stream: the body ends after [DONE].
    let a = Answer::read(r).await;
    if let Some(id) = a.header("x-llorch-task-id") {
        w.submitted.push(id.to_string());
    }
    w.answer = Some(a);
}

#[when(expr = "a request {caller} posts a chat completion")]
async fn post_chat(w: &mut Bdd, caller: Caller) {
    let r = caller
        .client(w)
        .post(format!("{}/v1/chat/completions", w.base()))
        .json(&chat("hello", 4))
        .send()
        .await
        .unwrap();
    w.answer = Some(Answer::read(r).await);
}

#[then(expr = "the answer is {int} with content type {string}")]
fn status_and_type(w: &mut Bdd, status: u16, content_type: String) {
    let a = w.answer();
    assert_eq!(a.status, status, "{}", a.text);
    let ct = a.header("content-type").unwrap_or("");
    assert!(ct.starts_with(&content_type), "{ct}");
}

#[then(expr = "every line is a data line or a comment, and the last one is {string}")]
fn data_lines(w: &mut Bdd, last: String) {
    let lines = lines(w);
    for l in &lines {
        assert!(l.starts_with("data: ") || l.starts_with(':'), "{l:?}");
    }
    assert_eq!(lines.last().copied(), Some(last.as_str()), "{lines:?}");
}

#[then(expr = "every chunk is a {string} of model {string} named after the task")]
fn chunk_shape(w: &mut Bdd, object: String, model: String) {
    let id = task_of_answer(w);
    let chunks = chunks(w);
    assert!(!chunks.is_empty());
    for c in &chunks {
        assert_eq!(c["object"], object.as_str(), "{c}");
        assert_eq!(c["model"], model.as_str(), "{c}");
        assert_eq!(c["id"], id.as_str(), "{c}");
    }
}

#[then("exactly one chunk has a finish reason")]
fn one_finish_reason(w: &mut Bdd) {
    let finishes: Vec<String> = chunks(w)
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str().map(String::from))
        .collect();
    assert_eq!(finishes.len(), 1, "{finishes:?}");
    assert!(
        ["length", "stop"].contains(&finishes[0].as_str()),
        "{finishes:?}"
    );
}

#[then(expr = "the task of the chat completion completed on pool {string}")]
async fn chat_task_completed(w: &mut Bdd, pool: String) {
    let s = w.status(&task_of_answer(w)).await;
    assert_eq!(s["state"], "completed", "{s}");
    assert_eq!(s["pool_id"], pool.as_str(), "{s}");
}

#[then(expr = "the answer is {int} with an OpenAI error object")]
fn openai_error(w: &mut Bdd, status: u16) {
    let a = w.answer();
    assert_eq!(a.status, status, "{}", a.text);
    let e = &a.json()["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        a.text
    );
    assert!(e["type"].is_string(), "{}", a.text);
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{}",
        a.text
    );
}

#[then("no chunk carries usage, which nobody asked for")]
fn no_usage(w: &mut Bdd) {
    for c in chunks(w) {
        assert!(c.get("usage").is_none_or(|u| u.is_null()), "{c}");
        assert!(!c["choices"].as_array().unwrap().is_empty(), "{c}");
    }
}
