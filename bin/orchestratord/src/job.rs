//! What an OpenAI task carries beside its `/v2` event log: the engine request (an OpenAI route
//! of llama-server and the allowlisted body) and the `ChunkLog`, where the runner appends each
//! choice object the engine streams (deltas, tool calls, reasoning text: llama-server shapes
//! them) for the OpenAI responder to relay or gather. Content pieces also become `token`
//! events, so the task reads the same in `GET /v2/tasks/{id}` and in the metrics.

use bytes::Bytes;
use llorch_contracts::openai::Usage;
use std::borrow::Cow;

use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Which OpenAI route of the engine a task goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Chat,
    Completions,
    /// Not streamed: the engine's whole answer is logged as one entry.
    Embeddings,
}

impl Route {
    pub fn path(self) -> &'static str {
        match self {
            Route::Chat => "/v1/chat/completions",
            Route::Completions => "/v1/completions",
            Route::Embeddings => "/v1/embeddings",
        }
    }

    /// `object` of a streamed chunk.
    pub fn chunk_object(self) -> &'static str {
        match self {
            Route::Chat => "chat.completion.chunk",
            Route::Completions | Route::Embeddings => "text_completion",
        }
    }

    /// `object` of a whole answer.
    pub fn object(self) -> &'static str {
        match self {
            Route::Chat => "chat.completion",
            Route::Completions => "text_completion",
            Route::Embeddings => "list",
        }
    }

    /// The generated text a choice object carries (`delta.content` or `text`).
    fn content(self, choice: &serde_json::Value) -> Option<&str> {
        match self {
            Route::Chat => choice.get("delta")?.get("content")?.as_str(),
            Route::Completions => choice.get("text")?.as_str(),
            Route::Embeddings => None,
        }
    }
}

impl Job {
    pub fn new(route: Route, body: Bytes, created: u64, model: String) -> Self {
        Self {
            route,
            body: Mutex::new(body),
            created,
            model,
            log: ChunkLog::default(),
        }
    }

    pub fn is_embeddings(&self) -> bool {
        self.route == Route::Embeddings
    }

    pub fn body(&self) -> Bytes {
        self.body.lock().clone()
    }

    /// The text whose prefix the engine's prompt cache can reuse: the messages (their JSON:
    /// a later turn of a chat starts with the earlier turns) or the prompt. None for
    /// embeddings.
    pub fn prefix_text(&self) -> Option<String> {
        if self.is_embeddings() {
            return None;
        }
        let body: serde_json::Value = serde_json::from_slice(&self.body.lock()).ok()?;
        match (body.get("messages"), body.get("prompt")) {
            (Some(messages), _) => Some(messages.to_string()),
            (None, Some(serde_json::Value::String(prompt))) => Some(prompt.clone()),
            _ => None,
        }
    }

    /// Drops the request body (the task ended).
    pub fn release(&self) {
        *self.body.lock() = Bytes::new();
    }
}

pub(crate) struct Job {
    pub route: Route,
    /// The engine request body: allowlisted fields, streaming on, usage asked for; emptied
    /// when the task ends.
    body: Mutex<Bytes>,
    /// `created` of every chunk and of the answer (Unix seconds at admission).
    pub created: u64,
    /// The model as the client named it.
    pub model: String,
    pub log: ChunkLog,
}

#[derive(Default)]
struct LogInner {
    /// Each choice as the engine wrote it (raw JSON: relayed without re-encoding).
    choices: Vec<Box<RawValue>>,
    usage: Option<Usage>,
    bytes: usize,
}

/// The engine's choice objects in arrival order, and the usage it reported. Followers are
/// woken through the task's own frame watch (the runner emits a `token` event, or pokes the
/// watch for a choice without text), so a relay waits on one channel.
#[derive(Default)]
pub(crate) struct ChunkLog {
    inner: Mutex<LogInner>,
}

impl ChunkLog {
    /// Appends a choice; `bare_role` marks an opening role delta, dropped when one is logged
    /// already (a retry before the first token streams it again). False when dropped.
    fn push(&self, choice: Box<RawValue>, bare_role: bool) -> bool {
        let mut inner = self.inner.lock();
        if bare_role && !inner.choices.is_empty() {
            return false;
        }
        inner.bytes += choice.get().len() + 16;
        inner.choices.push(choice);
        true
    }

    /// Bytes the logged choices hold.
    pub fn bytes(&self) -> usize {
        self.inner.lock().bytes
    }

    /// Choices from index `from` on, parsed.
    pub fn from(&self, from: usize) -> Vec<serde_json::Value> {
        let inner = self.inner.lock();
        inner
            .choices
            .get(from..)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| serde_json::from_str(c.get()).ok())
            .collect()
    }

    /// Calls `f` with each choice's JSON from index `from` on (no copies); returns the next
    /// index.
    pub fn for_each_from(&self, from: usize, mut f: impl FnMut(&str)) -> usize {
        let inner = self.inner.lock();
        for c in inner.choices.get(from..).unwrap_or_default() {
            f(c.get());
        }
        inner.choices.len().max(from)
    }

    pub fn usage(&self) -> Option<Usage> {
        self.inner.lock().usage.clone()
    }

    /// Logs an engine's whole (not streamed) answer and its usage; `Err` for a body that is
    /// not JSON or reports an error.
    pub fn whole(&self, body: Vec<u8>) -> Result<(), String> {
        #[derive(Deserialize)]
        struct View<'a> {
            #[serde(default)]
            usage: Option<Usage>,
            #[serde(default, borrow)]
            error: Option<&'a RawValue>,
        }
        let text = String::from_utf8(body)
            .map_err(|e| format!("engine answered a body that is not UTF-8: {e}"))?;
        let view: View<'_> = serde_json::from_str(&text)
            .map_err(|e| format!("engine answered a body that is not JSON: {e}"))?;
        if let Some(err) = view.error {
            return Err(format!("engine error: {}", err.get()));
        }
        let usage = view.usage;
        // Kept as the engine wrote it: read once more, by the responder, into its own shape.
        let raw = RawValue::from_string(text).map_err(|e| e.to_string())?;
        self.inner.lock().usage = usage;
        self.push(raw, false);
        Ok(())
    }

    /// The first logged entry read as `T` (a whole answer).
    pub fn parse_first<T: serde::de::DeserializeOwned>(&self) -> Option<T> {
        let inner = self.inner.lock();
        serde_json::from_str(inner.choices.first()?.get()).ok()
    }
}

/// One chunk of an engine's OpenAI stream, borrowed from its text: only what the decoder
/// reads is parsed; choices stay raw.
#[derive(Deserialize)]
struct EngineChunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<&'a RawValue>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    timings: Option<llamacpp_client::Timings>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

/// What the decoder reads of a choice: its text and finish reason.
#[derive(Deserialize)]
struct ChoiceView<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaView<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaView<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<&'a RawValue>,
}

/// What one `data:` frame of the engine's stream meant.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Piece {
    /// Generated text (a `token` event).
    pub token: Option<String>,
    /// The generation ended: finish reason, decode time, the engine's token count.
    pub done: Option<(String, u64, Option<u32>)>,
    /// A choice was logged (followers must be woken even without text).
    pub logged: bool,
    /// The choice carries output the client sees (text, a tool-call fragment, reasoning, a
    /// finish reason): progress, and a unit of the generation limit.
    pub visible: bool,
    /// The engine's report of the prompt: tokens from its cache, tokens evaluated.
    pub prompt_cache: Option<(u32, u32)>,
}

/// Reads an engine's OpenAI stream into the task's `ChunkLog`.
pub(crate) struct Decoder<'a> {
    job: &'a Job,
    /// Something beyond the opening role delta reached the log (and so the client): a retry
    /// elsewhere would repeat it.
    relayed: bool,
    finish_reason: Option<String>,
    decode_ms: u64,
    completion_tokens: Option<u32>,
    /// The task's `max_tokens`: text beyond it is not logged (never reaches the client; the
    /// runner cuts the stream off there).
    limit: u32,
    /// Text pieces logged so far.
    texts: u32,
}

impl<'a> Decoder<'a> {
    pub fn new(job: &'a Job, limit: u32) -> Self {
        Self {
            job,
            relayed: false,
            finish_reason: None,
            decode_ms: 0,
            completion_tokens: None,
            limit,
            texts: 0,
        }
    }

    fn done(&self) -> Option<(String, u64, Option<u32>)> {
        self.finish_reason
            .clone()
            .map(|f| (f, self.decode_ms, self.completion_tokens))
    }

    /// One `data:` payload; `Err` is the engine's own error report.
    pub fn decode(&mut self, data: &str) -> Result<Piece, String> {
        if data.trim() == "[DONE]" {
            // A stream that ends without a finish reason stopped by itself.
            let done = self
                .done()
                .unwrap_or_else(|| ("stop".to_string(), self.decode_ms, self.completion_tokens));
            return Ok(Piece {
                token: None,
                done: Some(done),
                logged: false,
                visible: false,
                prompt_cache: None,
            });
        }
        let Ok(chunk) = serde_json::from_str::<EngineChunk<'_>>(data) else {
            return Ok(Piece::default());
        };
        if let Some(err) = chunk.error {
            return Err(format!("engine error: {}", err.get()));
        }
        if let Some(u) = chunk.usage {
            self.completion_tokens = Some(u.completion_tokens);
            self.job.log.inner.lock().usage = Some(u);
        }
        let mut piece = Piece::default();
        if let Some(t) = chunk.timings {
            if let Some(ms) = t.predicted_ms {
                self.decode_ms = ms.round() as u64;
            }
            piece.prompt_cache = t.prompt_cache();
        }
        // One choice per request (`n` is always 1), whose index is 0.
        if let Some(raw) = chunk.choices.first() {
            let view: ChoiceView<'_> = serde_json::from_str(raw.get())
                .map_err(|e| format!("engine sent a choice that is not one: {e}"))?;
            if let Some(reason) = &view.finish_reason {
                self.finish_reason = Some(reason.clone());
            }
            let text = match (self.job.route, &view.delta) {
                (Route::Chat, Some(d)) => d.content.as_deref(),
                (Route::Completions, _) => view.text.as_deref(),
                _ => None,
            };
            piece.token = text.filter(|t| !t.is_empty()).map(str::to_string);
            // Output the client sees besides text: a tool-call fragment, reasoning, the end.
            let other = view.delta.as_ref().is_some_and(|d| {
                d.tool_calls.is_some_and(|t| t.get() != "null")
                    || d.reasoning_content
                        .as_deref()
                        .is_some_and(|r| !r.is_empty())
            }) || view.finish_reason.is_some();
            piece.visible = piece.token.is_some() || other;
            // The opening delta: a role and nothing else.
            let bare_role = !piece.visible && view.delta.as_ref().is_some_and(|d| d.role.is_some());
            // Text past the limit is the engine overrunning it: not for the client.
            let over = piece.token.is_some() && self.texts >= self.limit;
            // An empty delta says nothing: not logged, not relayed, no progress.
            if (piece.visible || bare_role) && !over {
                piece.logged = self.job.log.push((*raw).to_owned(), bare_role);
                if piece.token.is_some() {
                    self.texts += 1;
                }
            }
            self.relayed |= piece.logged && piece.visible;
        }
        Ok(piece)
    }

    /// Whether output beyond the opening role delta was logged for the client (text, tool-call
    /// fragments, reasoning): after that, a broken stream must not be retried elsewhere.
    pub fn relayed(&self) -> bool {
        self.relayed
    }

    /// The stream closed: done when a finish reason was seen.
    pub fn at_end(&self) -> Option<(String, u64, Option<u32>)> {
        self.done()
    }
}

/// The whole answer of a non-streamed request, gathered from the logged choices.
pub(crate) fn gather(route: Route, choices: &[serde_json::Value]) -> serde_json::Value {
    let finish_reason = choices
        .iter()
        .rev()
        .find_map(|c| c.get("finish_reason").filter(|f| !f.is_null()).cloned())
        .unwrap_or(serde_json::Value::Null);
    match route {
        // Answered from the raw log (`ChunkLog::parse_first`), never gathered.
        Route::Embeddings => serde_json::Value::Null,
        Route::Completions => {
            let text: String = choices.iter().filter_map(|c| route.content(c)).collect();
            serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason
            })
        }
        Route::Chat => {
            let mut content: Option<String> = None;
            let mut reasoning: Option<String> = None;
            let mut tool_calls: Vec<serde_json::Value> = Vec::new();
            for delta in choices.iter().filter_map(|c| c.get("delta")) {
                if let Some(t) = delta.get("content").and_then(|v| v.as_str()) {
                    content.get_or_insert_with(String::new).push_str(t);
                }
                if let Some(t) = delta.get("reasoning_content").and_then(|v| v.as_str()) {
                    reasoning.get_or_insert_with(String::new).push_str(t);
                }
                for call in delta
                    .get("tool_calls")
                    .and_then(|v| v.as_array())
                    .into_iter()
                    .flatten()
                {
                    merge_tool_call(&mut tool_calls, call);
                }
            }
            let mut message = serde_json::json!({"role": "assistant", "content": content});
            if let Some(r) = reasoning {
                message["reasoning_content"] = r.into();
            }
            if !tool_calls.is_empty() {
                message["tool_calls"] = tool_calls.into();
            }
            serde_json::json!({
                "index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason
            })
        }
    }
}

/// Folds one streamed tool-call fragment into the calls gathered so far: fragments of one call
/// share an `index`; `id`, `type` and the function name come once, `arguments` in pieces.
fn merge_tool_call(calls: &mut Vec<serde_json::Value>, fragment: &serde_json::Value) {
    // Only objects are merged: the engine's output is not trusted to be well formed.
    let Some(frag) = fragment.as_object() else {
        return;
    };
    let index = frag
        .get("index")
        .and_then(|i| i.as_u64())
        .unwrap_or(calls.len() as u64);
    let pos = calls
        .iter()
        .position(|c| c.get("index").and_then(|i| i.as_u64()) == Some(index));
    let pos = pos.unwrap_or_else(|| {
        calls.push(serde_json::json!({"index": index, "function": {"arguments": ""}}));
        calls.len() - 1
    });
    let Some(call) = calls.get_mut(pos).and_then(|c| c.as_object_mut()) else {
        return;
    };
    for key in ["id", "type"] {
        if let Some(v) = frag.get(key).filter(|v| !v.is_null()) {
            call.insert(key.into(), v.clone());
        }
    }
    let Some(f) = frag.get("function").and_then(|f| f.as_object()) else {
        return;
    };
    let Some(target) = call
        .entry("function")
        .or_insert_with(|| serde_json::json!({}))
        .as_object_mut()
    else {
        return;
    };
    if let Some(name) = f.get("name").filter(|v| !v.is_null()) {
        target.insert("name".into(), name.clone());
    }
    if let Some(args) = f.get("arguments").and_then(|v| v.as_str()) {
        let mut joined = target
            .get("arguments")
            .and_then(|a| a.as_str())
            .unwrap_or_default()
            .to_string();
        joined.push_str(args);
        target.insert("arguments".into(), joined.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(route: Route) -> Job {
        Job::new(route, Bytes::new(), 0, "m".into())
    }

    #[test]
    fn a_chat_stream_logs_its_choices_and_ends_at_done_with_the_engines_usage() {
        let j = job(Route::Chat);
        let mut d = Decoder::new(&j, 100);
        let frames = [
            json!({"choices":[{"index":0,"delta":{"role":"assistant","content":null},"finish_reason":null}]}),
            json!({"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}),
            json!({"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}),
            json!({"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}),
            json!({"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9},
                   "timings":{"predicted_ms":12.4}}),
        ];
        let pieces: Vec<Piece> = frames
            .iter()
            .map(|f| d.decode(&f.to_string()).unwrap())
            .collect();
        let tokens: Vec<Option<String>> = pieces.iter().map(|p| p.token.clone()).collect();
        assert_eq!(
            tokens,
            vec![None, Some("Hel".into()), Some("lo".into()), None, None]
        );
        // Every choice is logged (the relay is woken for the text-less ones too).
        let logged: Vec<bool> = pieces.iter().map(|p| p.logged).collect();
        assert_eq!(logged, vec![true, true, true, true, false]);
        let end = d.decode("[DONE]").unwrap();
        assert_eq!(end.done, Some(("length".into(), 12, Some(2))));
        let logged = j.log.from(0);
        assert_eq!(logged.len(), 4);
        assert_eq!(logged[1]["delta"]["content"], "Hel");
        assert_eq!(j.log.usage().unwrap().prompt_tokens, 7);
        let answer = gather(Route::Chat, &logged);
        assert_eq!(answer["message"]["content"], "Hello");
        assert_eq!(answer["message"]["role"], "assistant");
        assert_eq!(answer["finish_reason"], "length");
    }

    // covers: OAI-7110
    #[test]
    fn text_past_max_tokens_is_never_logged_for_the_client() {
        let j = job(Route::Chat);
        let mut d = Decoder::new(&j, 2);
        for text in ["a", "b", "c", "d", "e"] {
            let chunk =
                json!({"choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]});
            d.decode(&chunk.to_string()).unwrap();
        }
        let logged: Vec<String> = j
            .log
            .from(0)
            .iter()
            .map(|c| c["delta"]["content"].as_str().unwrap_or("").to_string())
            .collect();
        assert_eq!(logged, ["a", "b"], "the overrun reached the client");
    }

    // covers: OAI-7110
    #[test]
    fn only_output_beyond_the_opening_role_delta_counts_as_relayed() {
        let j = job(Route::Chat);
        let mut d = Decoder::new(&j, 100);
        d.decode(&json!({"choices":[{"delta":{"role":"assistant","content":null}}]}).to_string())
            .unwrap();
        assert!(
            !d.relayed(),
            "a retry may still happen after the role delta"
        );
        let call =
            json!({"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}]});
        let piece = d.decode(&call.to_string()).unwrap();
        assert!(piece.token.is_none() && piece.logged);
        assert!(
            d.relayed(),
            "a tool-call fragment reached the client: no retry elsewhere"
        );
    }

    // covers: OAI-7110
    #[test]
    fn empty_deltas_are_neither_logged_nor_progress() {
        let j = job(Route::Chat);
        let mut d = Decoder::new(&j, 100);
        for empty in [
            json!({"choices":[{"delta":{}}]}),
            json!({"choices":[{"delta":{"content":""}}]}),
            json!({"choices":[{"delta":{"tool_calls":null,"reasoning_content":""}}]}),
        ] {
            let p = d.decode(&empty.to_string()).unwrap();
            assert!(!p.logged && !p.visible, "{empty}");
        }
        assert!(j.log.from(0).is_empty());
        let reasoning = json!({"choices":[{"delta":{"reasoning_content":"hmm"}}]});
        assert!(d.decode(&reasoning.to_string()).unwrap().visible);
    }

    // covers: OAI-7111
    #[test]
    fn an_engine_error_in_the_stream_is_reported() {
        let j = job(Route::Completions);
        let mut d = Decoder::new(&j, 100);
        let e = d
            .decode(r#"{"error":{"code":500,"message":"boom"}}"#)
            .unwrap_err();
        assert!(e.contains("boom"), "{e}");
        assert!(d.at_end().is_none());
    }

    // covers: OAI-7110
    #[test]
    fn a_repeated_opening_role_delta_is_logged_once() {
        let j = job(Route::Chat);
        let mut d = Decoder::new(&j, 100);
        let role =
            json!({"choices":[{"delta":{"role":"assistant","content":null},"finish_reason":null}]});
        d.decode(&role.to_string()).unwrap();
        d.decode(&role.to_string()).unwrap();
        assert_eq!(j.log.from(0).len(), 1);
    }

    // covers: OAI-7111
    #[test]
    fn tool_call_fragments_are_gathered_by_index() {
        let choices = vec![
            json!({"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}}),
            json!({"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\"city\":"}}]}}),
            json!({"delta":{"tool_calls":[{"index":0,"function":{"arguments":"\"Oslo\"}"}}]}}),
            json!({"delta":{"tool_calls":[{"index":1,"id":"call_2","type":"function","function":{"name":"now"}}]}}),
            json!({"delta":{},"finish_reason":"tool_calls"}),
        ];
        let answer = gather(Route::Chat, &choices);
        let calls = answer["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "call_1");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
        assert_eq!(calls[1]["function"]["name"], "now");
        assert_eq!(calls[1]["function"]["arguments"], "");
        assert_eq!(answer["message"]["content"], serde_json::Value::Null);
        assert_eq!(answer["finish_reason"], "tool_calls");
    }

    // covers: OAI-7111
    #[test]
    fn malformed_tool_call_fragments_are_skipped_not_fatal() {
        let choices = vec![
            json!({"delta":{"tool_calls":["not an object", {"index":0,"function":"a string"}]}}),
            json!({"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{}"}}]}}),
        ];
        let answer = gather(Route::Chat, &choices);
        let calls = answer["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0]["function"]["name"], "f");
        assert_eq!(calls[0]["function"]["arguments"], "{}");
    }

    // covers: OAI-7111
    #[test]
    fn completions_gather_their_text() {
        let choices = vec![
            json!({"text":"a","finish_reason":null}),
            json!({"text":"b","finish_reason":"stop"}),
        ];
        let answer = gather(Route::Completions, &choices);
        assert_eq!(answer["text"], "ab");
        assert_eq!(answer["finish_reason"], "stop");
    }
}
