//! In-process test layer: the real orchestrator (admission, dispatcher, runner, retention) in
//! the test's own runtime, with a scripted engine in place of HTTP, so tests run on tokio's
//! paused clock and every bound is asserted exactly. The scripted engine is a fault-timing
//! double only: every behaviour here also has a test against the real `llama-server` in
//! `tests/it`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use llamacpp_client::Health;
use llorch_contracts::tasks::TaskRequest;
use parking_lot::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Args, Config};
use crate::engine::{Answer, CompletionCall, Engine, EngineError};
use crate::metrics::Metrics;
use crate::pools::PoolEntry;
use crate::state::Orchestrator;
use crate::tasks::Task;

/// One step of a scripted completion stream; each waits `after` (virtual time) first.
#[derive(Debug, Clone)]
pub enum Step {
    /// A chunk carrying one token.
    Token(Duration, &'static str),
    /// The final chunk (`stop: true`) with this `stop_type` (`limit`, `eos`).
    Stop(Duration, &'static str),
    /// The final chunk, reporting prompt tokens taken from the cache and evaluated.
    StopCached(Duration, u32, u32),
    /// The stream goes silent and stays open.
    Stall,
    /// The connection closes without the final chunk.
    Close(Duration),
    /// The stream breaks with a transport error.
    Break(Duration),
    /// A chunk in which the engine reports an error.
    EngineError(Duration),
    /// A chunk holding only an SSE comment (no data, no progress).
    Comment(Duration),
    /// A data chunk with empty content (no progress either).
    Empty(Duration),
    /// This many bytes of one frame that never ends.
    Unterminated(Duration, usize),
}

/// How the scripted engine answers one completion request.
#[derive(Debug, Clone)]
pub enum Script {
    Stream(Vec<Step>),
    /// The request is never answered.
    NoAnswer,
    /// The connection is refused at once.
    Unreachable,
    /// An HTTP status without a stream (4xx refused, 5xx failed).
    Status(u16),
}

/// `n` tokens, one every `every`, then the final chunk after one more `every`.
pub fn tokens(n: usize, every: Duration) -> Script {
    let mut steps: Vec<Step> = (0..n).map(|_| Step::Token(every, "tok")).collect();
    steps.push(Step::Stop(every, "limit"));
    Script::Stream(steps)
}

#[derive(Default)]
pub struct ScriptedEngine {
    /// Scripts for the next calls, in order; when empty, `fallback`.
    scripts: Mutex<VecDeque<Script>>,
    fallback: Mutex<Option<Script>>,
    /// Base URL of every completion call, in order.
    calls: Mutex<Vec<String>>,
    /// The `id_slot` each completion call asked for, in order.
    slots: Mutex<Vec<Option<u64>>>,
    /// Streams a runner holds right now (dropping the stream aborts the request).
    open: Arc<AtomicUsize>,
    /// Base URL of every tokenizer call, in order.
    tokenized: Mutex<Vec<String>>,
}

impl ScriptedEngine {
    /// Base URLs the tokenizer was asked at.
    pub fn tokenized(&self) -> Vec<String> {
        self.tokenized.lock().clone()
    }

    pub fn push(&self, script: Script) {
        self.scripts.lock().push_back(script);
    }

    pub fn always(&self, script: Script) {
        *self.fallback.lock() = Some(script);
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }

    /// The engine slot each call was pinned to (`None`: the engine picks).
    pub fn slots(&self) -> Vec<Option<u64>> {
        self.slots.lock().clone()
    }

    pub fn open_streams(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn data(json: serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {json}\n\n"))
}

impl Engine for ScriptedEngine {
    fn completion<'a>(
        &'a self,
        call: CompletionCall<'a>,
    ) -> BoxFuture<'a, Result<Answer, EngineError>> {
        self.calls.lock().push(call.base_url.to_string());
        let body: serde_json::Value = serde_json::from_slice(&call.body).unwrap_or_default();
        self.slots.lock().push(body["id_slot"].as_u64());
        let script = self
            .scripts
            .lock()
            .pop_front()
            .or_else(|| self.fallback.lock().clone())
            .unwrap_or(Script::NoAnswer);
        let open = self.open.clone();
        async move {
            let steps = match script {
                Script::NoAnswer => std::future::pending().await,
                Script::Unreachable => {
                    return Err(EngineError::Unreachable {
                        what: "engine",
                        reason: "connection refused".into(),
                    })
                }
                Script::Status(status) if (400..500).contains(&status) => {
                    return Ok(Answer::Refused {
                        status,
                        body: "upstream-secret: scripted refusal".into(),
                    })
                }
                Script::Status(status) => return Ok(Answer::Failed { status }),
                Script::Stream(steps) => steps,
            };
            open.fetch_add(1, Ordering::SeqCst);
            let guard = OpenGuard(open);
            let stream = futures_util::stream::unfold(
                (steps.into_iter(), guard),
                |(mut steps, guard)| async move {
                    let item = match steps.next()? {
                        Step::Token(after, t) => {
                            tokio::time::sleep(after).await;
                            Ok(data(serde_json::json!({"content": t, "stop": false})))
                        }
                        Step::Stop(after, kind) => {
                            tokio::time::sleep(after).await;
                            Ok(data(serde_json::json!({
                                "content": "", "stop": true, "stop_type": kind,
                                "tokens_predicted": 0, "timings": {"predicted_ms": 1.0}
                            })))
                        }
                        Step::StopCached(after, cache_n, prompt_n) => {
                            tokio::time::sleep(after).await;
                            Ok(data(serde_json::json!({
                                "content": "", "stop": true, "stop_type": "limit",
                                "tokens_predicted": 0,
                                "timings": {"predicted_ms": 1.0, "cache_n": cache_n, "prompt_n": prompt_n}
                            })))
                        }
                        Step::Stall => std::future::pending().await,
                        Step::Close(after) => {
                            tokio::time::sleep(after).await;
                            return None;
                        }
                        Step::Break(after) => {
                            tokio::time::sleep(after).await;
                            Err(EngineError::Broken {
                                what: "engine stream",
                                reason: "connection reset by peer".into(),
                            })
                        }
                        Step::Comment(after) => {
                            tokio::time::sleep(after).await;
                            Ok(Bytes::from_static(b": ping\n\n"))
                        }
                        Step::Empty(after) => {
                            tokio::time::sleep(after).await;
                            Ok(data(serde_json::json!({"content": "", "stop": false})))
                        }
                        Step::Unterminated(after, n) => {
                            tokio::time::sleep(after).await;
                            let mut b = b"data: ".to_vec();
                            b.resize(n, b'x');
                            Ok(Bytes::from(b))
                        }
                        Step::EngineError(after) => {
                            tokio::time::sleep(after).await;
                            Ok(data(
                                serde_json::json!({"error": {"code": 500, "message": "scripted"}}),
                            ))
                        }
                    };
                    Some((item, (steps, guard)))
                },
            );
            Ok(Answer::Stream(stream.boxed()))
        }
        .boxed()
    }

    fn health<'a>(
        &'a self,
        _base_url: &'a str,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<Health, EngineError>> {
        async { Ok(Health::Ok) }.boxed()
    }

    /// One token per whitespace-separated word, plus one (the start-of-text token).
    fn tokenize<'a>(
        &'a self,
        base_url: &'a str,
        _bearer: Option<&'a str>,
        text: &'a str,
    ) -> BoxFuture<'a, Result<u32, EngineError>> {
        self.tokenized.lock().push(base_url.to_string());
        let n = text.split_whitespace().count() as u32 + 1;
        async move { Ok(n) }.boxed()
    }
}

/// The orchestrator with its dispatcher and retention running on the test's runtime.
pub struct Harness {
    pub orch: Arc<Orchestrator>,
    pub engine: Arc<ScriptedEngine>,
    cancel: CancellationToken,
}

impl Harness {
    /// `flags` are orchestratord's command-line flags (`--decode-timeout-ms=500`, ...).
    pub fn start(flags: &[&str]) -> Harness {
        let mut all = vec!["--api-token=inprocess-test-token-0123"];
        all.extend_from_slice(flags);
        Harness::start_with_keys(&all)
    }

    /// Like [`Harness::start`] without the shared token: `flags` give every credential.
    pub fn start_with_keys(flags: &[&str]) -> Harness {
        Harness::start_with_journal(flags, Arc::new(crate::journal::NoJournal))
    }

    /// Like [`Harness::start_with_keys`], over `journal`.
    pub fn start_with_journal(
        flags: &[&str],
        journal: Arc<dyn crate::journal::Journal>,
    ) -> Harness {
        interest_in_everything();
        let mut argv = vec!["orchestratord", "--journal=none"];
        argv.extend_from_slice(flags);
        let config = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
        let engine = Arc::new(ScriptedEngine::default());
        let orch = Arc::new(
            Orchestrator::with_journal(
                config,
                Arc::new(Metrics::new().unwrap()),
                engine.clone(),
                journal,
            )
            .unwrap(),
        );
        // Both end when the harness drops (its token is cancelled).
        let cancel = CancellationToken::new();
        tokio::spawn(crate::dispatcher::run(orch.clone(), cancel.child_token()));
        tokio::spawn(crate::retention::run(orch.clone(), cancel.child_token()));
        Harness {
            orch,
            engine,
            cancel,
        }
    }

    /// Starts the CLOUD poller over `nodes` (the config's `--pool-managers`).
    pub fn poll(&self, nodes: Arc<dyn crate::cloud_source::NodeApi>) {
        let c = &self.orch.config;
        let source = crate::cloud_source::CloudSource {
            metrics: self.orch.metrics.clone(),
            managers: self.orch.managers.clone(),
            pools: self.orch.pools.clone(),
            nodes,
            interval: c.pool_poll_interval,
            recovery: c.pool_poll_recovery,
            heartbeat_timeout: c.node_heartbeat_timeout,
            node_door: self.orch.node_door.clone(),
        };
        tokio::spawn(source.run(self.cancel.child_token()));
    }

    /// Starts the HOME source over the config's runtime directory, reading GPU memory figures
    /// from `manager` at `manager_url` (a scripted pool-managerd).
    pub fn watch_home(&self, manager: Arc<dyn crate::cloud_source::NodeApi>, manager_url: &str) {
        let c = &self.orch.config;
        let source = crate::home_source::HomeSource {
            pools: self.orch.pools.clone(),
            metrics: self.orch.metrics.clone(),
            engine: self.engine.clone(),
            dir: c.runtime_dir.clone(),
            rescan: c.handoff_rescan,
            notify: c.handoff_notify,
            probe_interval: c.pool_health_interval,
            manager: Some(crate::home_source::Manager {
                url: manager_url.to_string(),
                api: manager,
                credential: None,
            }),
        };
        tokio::spawn(source.run(self.cancel.child_token()));
    }

    /// A ready pool serving model `tiny` at `http://{id}` with `slots` slots.
    pub fn add_pool(&self, id: &str, slots: u32) {
        self.orch.pools.upsert(pool(id, slots));
    }

    /// The task with `id`, whichever key submitted it (no two of a test's keys share an id).
    pub fn task(&self, id: &str) -> Option<Arc<Task>> {
        let mut found = self.orch.tasks.filtered(|t| t.id == id);
        assert!(found.len() <= 1, "several keys use task id {id:?}");
        found.pop()
    }

    /// Where the task with `id` stands in the queue (none once it left it, or is unknown).
    pub fn position(&self, id: &str) -> Option<u32> {
        self.orch.queue_position(&*self.task(id)?)
    }

    /// Admits a task (panics on refusal); `body` is a `/v2/tasks` request.
    pub fn submit(&self, body: serde_json::Value) -> Arc<Task> {
        let req: TaskRequest = serde_json::from_value(body).unwrap();
        let id = self.orch.admit(req).unwrap().task_id;
        self.task(&id).unwrap()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub fn pool(id: &str, slots: u32) -> PoolEntry {
    PoolEntry {
        pool_id: id.into(),
        model_id: "tiny".into(),
        url: format!("http://{id}"),
        manager: None,
        credential: None,
        slots_total: slots,
        ctx_max: None,
        engine: "llamacpp".into(),
        engine_version: None,
        node_id: None,
        device_mask: None,
        healthy: true,
        draining: false,
        last_error: None,
        in_flight: 0,
        lost: CancellationToken::new(),
        phase: crate::pools::PoolPhase::Serving,
        restarting_since: None,
        vram_free_bytes: None,
        embeddings: false,
        ejection: Default::default(),
    }
}

/// `text` written to `name` in `dir`, readable by its owner alone (as key and token files must
/// be); its path.
pub fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

pub fn task(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": "p", "max_tokens": max_tokens})
}

/// The frames the task's log still keeps, and whether the terminal one is among them.
pub fn kept(task: &Task) -> (Vec<crate::tasks::Frame>, bool) {
    match task.frames_from(0) {
        Ok(found) => found,
        Err(gap) => task.frames_from(gap.first_kept).unwrap(),
    }
}

/// Waits for the task's terminal frame; returns its event name, its data, and when it came
/// (the task's own record of it: a task awaited after it ended reports its end, not the await).
pub async fn terminal(task: &Task) -> (&'static str, serde_json::Value, Instant) {
    let mut rx = task.watch_frames();
    loop {
        let (frames, done) = kept(task);
        if done {
            let last = frames.last().unwrap();
            return (
                last.event,
                serde_json::from_str(&last.data).unwrap(),
                task.finished_at()
                    .expect("a terminal frame without its time"),
            );
        }
        rx.changed().await.unwrap();
    }
}

/// How the task ended (`end`, or its error's code) and when.
pub async fn outcome(task: &Task) -> (String, Instant) {
    let (name, data, at) = terminal(task).await;
    let code = match name {
        "end" => "end",
        _ => data["code"].as_str().unwrap_or("?"),
    };
    (code.to_string(), at)
}

/// Names of the task's frames so far.
pub fn names(task: &Task) -> Vec<&'static str> {
    kept(task).0.iter().map(|f| f.event).collect()
}

/// Lets every task that can run, run, without moving the clock.
pub async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

/// Installs a global subscriber interested in every callsite: without one, a callsite first
/// hit on a thread without a capture is cached as uninteresting everywhere, and a capture on
/// another thread, in a test running beside it, misses its lines.
pub fn interest_in_everything() {
    static EVERYTHING: std::sync::Once = std::sync::Once::new();
    EVERYTHING.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// Collects the log lines written while its subscriber is the default (this thread only).
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        interest_in_everything();
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish()
    }

    pub fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock())
            .matches(needle)
            .count()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
