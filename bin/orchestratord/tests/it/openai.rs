//! The OpenAI-compatible front on the real stack: the raw wire (chunks, `[DONE]`, usage only
//! when asked, comments for queue and keep-alive), answers, errors in OpenAI's shape, and that
//! an OpenAI request is a task (queue, priority, cancellation, slots).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use llorch_contracts::tasks::TaskState;

use crate::admission::occupy_the_slot;
use crate::harness::*;

fn chat(content: &str, max_tokens: u32, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "tiny", "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "stream": stream
    })
}

impl Stack {
    pub async fn oa_post(
        &self,
        path: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut rb = self.http.post(format!("{}/v1{path}", self.base)).json(body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb.send().await.unwrap()
    }
}

/// A streamed answer read line by line, as it arrives.
struct Lines {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Lines {
    fn new(resp: reqwest::Response) -> Self {
        Self {
            body: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next non-empty line, or `None` at the end of the body.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.find('\n') {
                let line: String = self.buf.drain(..=i).collect();
                let line = line.trim_end().to_string();
                if line.is_empty() {
                    continue;
                }
                return Some(line);
            }
            match self.body.next().await {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                _ => return None,
            }
        }
    }

    /// The next `data:` payload, skipping comments.
    async fn next_data(&mut self) -> Option<String> {
        loop {
            let line = self.next().await?;
            if let Some(d) = line.strip_prefix("data: ") {
                return Some(d.to_string());
            }
        }
    }

    async fn all(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(l) = self.next().await {
            out.push(l);
        }
        out
    }
}

fn chunks(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn task_id(resp: &reqwest::Response) -> String {
    resp.headers()["x-llorch-task-id"]
        .to_str()
        .unwrap()
        .to_string()
}

// covers: OAI-7101
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_speaks_openais_wire_and_is_a_task() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 4096),
        ..Default::default()
    })
    .await;
    let mut body = chat("Say hello", 12, true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let r = s.oa_post("/chat/completions", &body, &[]).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let id = task_id(&r);
    let lines = Lines::new(r).all().await;
    for l in &lines {
        assert!(
            l.starts_with("data: ") || l.starts_with(':'),
            "only data lines and comments: {l:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l == ": queued position=0"),
        "{lines:?}"
    );
    assert_eq!(lines.last().map(String::as_str), Some("data: [DONE]"));
    let all = chunks(&lines);
    let (usage, content): (Vec<_>, Vec<_>) = all
        .iter()
        .partition(|c| c["choices"].as_array().unwrap().is_empty());
    assert_eq!(usage.len(), 1, "one usage chunk");
    assert_eq!(
        all.last().unwrap()["choices"],
        serde_json::json!([]),
        "the usage chunk is the last before [DONE]"
    );
    let u = &usage[0]["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    for c in &all {
        assert_eq!(c["id"], id.as_str());
        assert!(id.starts_with("chatcmpl-"), "{id}");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "tiny");
        assert!(c["created"].as_u64().unwrap() > 1_700_000_000);
    }
    assert_eq!(content[0]["choices"][0]["delta"]["role"], "assistant");
    let pieces: Vec<&str> = content
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    let finish = content
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1, "one finish reason: {finish:?}");
    assert!(["length", "stop"].contains(&finish[0]));
    assert!(!pieces.is_empty());
    // The same request is a task of the queue.
    let st = s.status(&id).await;
    assert_eq!(st.state, TaskState::Completed);
    assert_eq!(st.tokens_out as usize, pieces.len());
    assert_eq!(st.pool_id.as_deref(), Some("p0"));
    let m = s.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "tasks_completed_total",
            &[("outcome", "end"), ("api", "openai")]
        ),
        Some(1.0)
    );

    // Without stream_options.include_usage: no usage chunk at all.
    let r = s
        .oa_post("/chat/completions", &chat("Again", 4, true), &[])
        .await;
    let lines = Lines::new(r).all().await;
    assert_eq!(lines.last().map(String::as_str), Some("data: [DONE]"));
    assert!(chunks(&lines)
        .iter()
        .all(|c| c.get("usage").is_none() && !c["choices"].as_array().unwrap().is_empty()));
}

// covers: OAI-7102
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_answers_completions_and_models_have_openais_shape() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 4096),
        ..Default::default()
    })
    .await;
    let r = s
        .oa_post("/chat/completions", &chat("Hi", 8, false), &[])
        .await;
    assert_eq!(r.status(), 200);
    let id = task_id(&r);
    let a: serde_json::Value = r.json().await.unwrap();
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["model"], "tiny");
    let choice = &a["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(["length", "stop"].contains(&choice["finish_reason"].as_str().unwrap()));
    let completion_tokens = a["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=8).contains(&completion_tokens), "{a}");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let prompt = serde_json::json!({"model": "tiny", "prompt": "Once upon", "max_tokens": 5});
    let r = s.oa_post("/completions", &prompt, &[]).await;
    let a: serde_json::Value = r.json().await.unwrap();
    assert_eq!(a["object"], "text_completion");
    assert!(a["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(!a["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(a["usage"]["completion_tokens"], 5);

    let mut streamed = prompt.clone();
    streamed["stream"] = true.into();
    let lines = Lines::new(s.oa_post("/completions", &streamed, &[]).await)
        .all()
        .await;
    assert_eq!(lines.last().map(String::as_str), Some("data: [DONE]"));
    let text: String = chunks(&lines)
        .iter()
        .map(|c| {
            assert_eq!(c["object"], "text_completion");
            c["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(!text.is_empty());

    let models: serde_json::Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(models["data"][0]["object"], "model");
    let one = s.get("/v1/models/tiny").await;
    assert_eq!(one.status(), 200);
    let none = s.get("/v1/models/nope").await;
    assert_eq!(none.status(), 404);
    let e: serde_json::Value = none.json().await.unwrap();
    assert_eq!(e["error"]["code"], "model_not_found");
}

/// `{"error": {message, type, param, code}}` with the expected status, type and code.
async fn assert_oa_error(r: reqwest::Response, status: u16, kind: &str, code: Option<&str>) {
    assert_eq!(r.status(), status);
    let e: serde_json::Value = r.json().await.unwrap();
    let err = &e["error"];
    assert!(!err["message"].as_str().unwrap().is_empty(), "{e}");
    assert_eq!(err["type"], kind, "{e}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "{e}"
    );
    if let Some(code) = code {
        assert_eq!(err["code"], code, "{e}");
    }
}

// covers: OAI-7103
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_error_has_openais_shape_and_status() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        orch_env: vec![
            ("ORCHD_ADMISSION_CAPACITY", "1".into()),
            ("ORCHD_MAX_QUEUE_WAIT_MS", "1500".into()),
            ("ORCHD_MAX_BODY_BYTES", "4096".into()),
        ],
        ..Default::default()
    })
    .await;
    let url = format!("{}/v1/chat/completions", s.base);
    let anon = reqwest::Client::new();
    let r = anon
        .post(&url)
        .json(&chat("x", 1, false))
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    assert_oa_error(r, 401, "invalid_request_error", Some("invalid_api_key")).await;
    let mut two = chat("x", 1, false);
    two["n"] = 2.into();
    let r = s.oa_post("/chat/completions", &two, &[]).await;
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert_oa_error(r, 400, "invalid_request_error", None).await;
    let r = s
        .http
        .post(&url)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_oa_error(r, 400, "invalid_request_error", None).await;
    let r = s
        .oa_post(
            "/chat/completions",
            &chat("x", 1, false),
            &[("X-Llorch-Priority", "urgent")],
        )
        .await;
    assert_oa_error(r, 400, "invalid_request_error", None).await;
    let mut other = chat("x", 1, false);
    other["model"] = "no-such-model".into();
    let r = s.oa_post("/chat/completions", &other, &[]).await;
    assert_oa_error(r, 404, "invalid_request_error", Some("model_not_found")).await;
    let big = chat(&"x".repeat(8000), 1, false);
    let r = s.oa_post("/chat/completions", &big, &[]).await;
    assert_oa_error(r, 413, "invalid_request_error", Some("payload_too_large")).await;
    let r = s.http.get(&url).send().await.unwrap();
    assert_oa_error(r, 405, "invalid_request_error", None).await;
    let r = s.get("/v1/no/such/route").await;
    assert_oa_error(r, 404, "invalid_request_error", None).await;
    // /v2 keeps its own envelope.
    let r = s.get("/v2/tasks/none").await;
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["code"], "NOT_FOUND");

    // The slot busy, the queue (capacity 1) takes one request; the next gets 429.
    let busy = occupy_the_slot(&s).await;
    let queued = {
        let s_base = s.base.clone();
        let http = s.http.clone();
        tokio::spawn(async move {
            http.post(format!("{s_base}/v1/chat/completions"))
                .json(&chat("waits", 4, false))
                .send()
                .await
                .unwrap()
        })
    };
    wait_for("a queued request", Duration::from_secs(10), || async {
        let m = s.metrics().await;
        (metric_value(&m, "queue_depth", &[("priority", "interactive")]) == Some(1.0)).then_some(())
    })
    .await;
    let r = s
        .oa_post("/chat/completions", &chat("too many", 4, false), &[])
        .await;
    assert!(r.headers().contains_key("retry-after"));
    assert_oa_error(r, 429, "rate_limit_error", Some("queue_full")).await;
    // Past the longest queue wait: 503 for a whole answer...
    let r = queued.await.unwrap();
    assert_oa_error(r, 503, "server_error", Some("pool_unavailable")).await;
    // ...and an error chunk, then the end, for a stream.
    let r = s
        .oa_post("/chat/completions", &chat("waits too", 4, true), &[])
        .await;
    assert_eq!(r.status(), 200);
    let lines = Lines::new(r).all().await;
    assert_eq!(lines[0], ": queued position=0");
    let last = lines.last().unwrap();
    let e: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(e["error"]["code"], "pool_unavailable", "{lines:?}");
    assert!(!lines.iter().any(|l| l == "data: [DONE]"));
    s.cancel(&busy).await;
}

// covers: OAI-7104
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_chunk_comes_while_generating_and_a_closed_request_frees_its_slot() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 1, 8192),
        ..Default::default()
    })
    .await;
    let r = s
        .oa_post("/chat/completions", &chat("the", 6000, true), &[])
        .await;
    let id = task_id(&r);
    let mut lines = Lines::new(r);
    loop {
        let d = lines.next_data().await.unwrap();
        let c: serde_json::Value = serde_json::from_str(&d).unwrap();
        if c["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            break;
        }
    }
    assert_eq!(
        s.engine_slots_busy("p0").await,
        1,
        "the first chunk came only after the generation ended"
    );
    // Closing the stream cancels the task; the engine stops within a second.
    drop(lines);
    let closed = Instant::now();
    wait_for("slot freed", Duration::from_secs(5), || async {
        (s.engine_slots_busy("p0").await == 0).then_some(())
    })
    .await;
    assert!(
        closed.elapsed() < Duration::from_secs(1),
        "{:?}",
        closed.elapsed()
    );
    let st = s.wait_task(&id, Duration::from_secs(5)).await;
    assert_eq!(st.state, TaskState::Cancelled);

    // A whole-answer request whose client goes away is cancelled the same way.
    let base = s.base.clone();
    let http = s.http.clone();
    let pending = tokio::spawn(async move {
        http.post(format!("{base}/v1/chat/completions"))
            .json(&chat("the", 6000, false))
            .send()
            .await
    });
    wait_for("engine busy", Duration::from_secs(10), || async {
        (s.engine_slots_busy("p0").await == 1).then_some(())
    })
    .await;
    pending.abort();
    let closed = Instant::now();
    wait_for("slot freed", Duration::from_secs(5), || async {
        (s.engine_slots_busy("p0").await == 0).then_some(())
    })
    .await;
    assert!(
        closed.elapsed() < Duration::from_secs(1),
        "{:?}",
        closed.elapsed()
    );
    let m = s.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "tasks_completed_total",
            &[("outcome", "CANCELLED"), ("api", "openai")]
        ),
        Some(2.0)
    );
}

// covers: OAI-7105
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_streams_beyond_the_slots_all_complete_and_interactive_ones_go_first() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("p0", 2, 32768),
        ..Default::default()
    })
    .await;
    // Three times more streams than slots: all complete; the engine never queues one itself.
    let streams: Vec<_> = (0..6)
        .map(|k| {
            let (base, http) = (s.base.clone(), s.http.clone());
            tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&chat(&format!("stream {k}"), 300, true))
                    .send()
                    .await
                    .unwrap();
                Lines::new(r).all().await
            })
        })
        .collect();
    while !streams.iter().all(|h| h.is_finished()) {
        s.assert_engine_not_oversubscribed("p0", 2).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for h in streams {
        let lines = h.await.unwrap();
        assert_eq!(lines.last().map(String::as_str), Some("data: [DONE]"));
    }

    // Both slots busy; two batch requests, then an interactive one. One slot frees: the
    // interactive request takes it, the batch ones wait.
    let a = occupy_the_slot(&s).await;
    let b = occupy_the_slot(&s).await;
    let mut ids = Vec::new();
    let mut open = Vec::new();
    for (prompt, priority, max_tokens) in [
        ("b1", "batch", 8),
        ("b2", "batch", 8),
        ("i1", "interactive", 3000),
    ] {
        let r = s
            .oa_post(
                "/chat/completions",
                &chat(prompt, max_tokens, true),
                &[("X-Llorch-Priority", priority)],
            )
            .await;
        ids.push(task_id(&r));
        open.push(Lines::new(r));
    }
    s.cancel(&a).await;
    wait_for(
        "the interactive request started",
        Duration::from_secs(20),
        || async { s.status(&ids[2]).await.started_at_ms.map(|_| ()) },
    )
    .await;
    for batch in &ids[..2] {
        assert_eq!(
            s.status(batch).await.state,
            TaskState::Queued,
            "a batch request started before the interactive one"
        );
    }
    s.cancel(&b).await;
    for o in open {
        assert_eq!(
            o.all().await.last().map(String::as_str),
            Some("data: [DONE]")
        );
    }
}

// covers: OAI-7106
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_come_from_embedding_pools_as_floats_or_base64_of_the_same_vector() {
    use base64::Engine as _;
    let embedding_pool = format!(
        "[[pools]]\nid = \"e0\"\nmodel = \"{}\"\nmodel_id = \"tiny-embed\"\nslots = 2\nctx = 2048\nembeddings = true\nargs = [\"--threads\", \"1\", \"--pooling\", \"mean\"]\n",
        tiny_model().display()
    );
    let s = Stack::start(StackOptions {
        pools_toml: format!("{}{embedding_pool}", pool_toml("p0", 1, 2048)),
        ..Default::default()
    })
    .await;
    s.wait_pools_ready(2).await;
    assert!(s.handoff("e0").embeddings && !s.handoff("p0").embeddings);
    let ask = |format: &str| {
        serde_json::json!({
            "model": "tiny-embed", "input": ["first text", "second text"],
            "encoding_format": format
        })
    };
    let r = s.oa_post("/embeddings", &ask("float"), &[]).await;
    assert_eq!(r.status(), 200);
    let id = task_id(&r);
    let floats: serde_json::Value = r.json().await.unwrap();
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["model"], "tiny-embed");
    assert!(floats["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let data = floats["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let r = s.oa_post("/embeddings", &ask("base64"), &[]).await;
    let encoded: serde_json::Value = r.json().await.unwrap();
    for (i, (f, b)) in data
        .iter()
        .zip(encoded["data"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(f["index"], i);
        assert_eq!(f["object"], "embedding");
        let from_floats: Vec<f32> = f["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b["embedding"].as_str().unwrap())
            .unwrap();
        let from_base64: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(from_floats.len() > 8);
        assert_eq!(from_floats, from_base64);
    }
    // An embeddings request is a task, placed on the embedding pool.
    let st = s.status(&id).await;
    assert_eq!(st.state, TaskState::Completed);
    assert_eq!(st.pool_id.as_deref(), Some("e0"));
    // A model no embedding pool serves is refused at once.
    let mut wrong = ask("float");
    wrong["model"] = "tiny".into();
    let r = s.oa_post("/embeddings", &wrong, &[]).await;
    assert_oa_error(r, 400, "invalid_request_error", None).await;
    // And a generation for a model only embeddings pools serve.
    let mut generation = chat("x", 4, false);
    generation["model"] = "tiny-embed".into();
    let r = s.oa_post("/chat/completions", &generation, &[]).await;
    assert_oa_error(r, 400, "invalid_request_error", None).await;
}

// covers: OAI-7107
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_refusing_a_request_fails_it_and_stays_healthy() {
    let s = Stack::start(StackOptions {
        pools_toml: pool_toml("real", 1, 2048),
        ..Default::default()
    })
    .await;
    let fault = crate::fault_engine::start_refusing_completions().await;
    let file = llorch_contracts::HandoffFile::external("refusing", &fault.url, "picky", 1);
    llorch_handoff::write_atomic(&s.runtime_dir, &file).unwrap();
    s.wait_pools_ready(2).await;
    let mut req = chat("x", 4, false);
    req["model"] = "picky".into();
    // Three refusals in a row: as many as would eject a failing pool.
    for _ in 0..3 {
        let r = s.oa_post("/chat/completions", &req, &[]).await;
        let id = task_id(&r);
        assert_oa_error(r, 400, "invalid_request_error", Some("invalid_params")).await;
        let st = s.status(&id).await;
        assert_eq!(st.attempts, 1, "a refusal is not retried: {st:?}");
        // The client learns the status; the engine's words go to orchestratord's log only.
        let message = st.error.unwrap().message;
        assert!(message.contains("(500)"), "{message}");
        assert!(!message.contains("template refused"), "{message}");
    }
    let log = s.orch_log();
    assert!(
        log.contains("the chat template refused the messages"),
        "{log}"
    );
    // The request's fault, not the engine's: the pool stays healthy, and is not ejected.
    let pool = s.get("/v2/pools/refusing/health").await;
    let health: serde_json::Value = pool.json().await.unwrap();
    assert_eq!(health["ready"], true, "{health}");
    let m = s.metrics().await;
    assert_eq!(
        metric_value(&m, "orchd_pool_ejections_total", &[("pool_id", "refusing")]),
        Some(0.0)
    );
}
