//! The real HOME stack: pool-managerd (real llama-server engines, tiny model) and
//! orchestratord sharing a handoff directory, talking real HTTP.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use llorch_client::SseFrame;
use llorch_contracts::tasks::{AdmissionResponse, TaskStatus};
use llorch_contracts::HandoffFile;
pub use llorch_test_support::*;
use tokio::process::{Child, Command};

pub const TOKEN: &str = "orchd-test-token-7d2e9f01a4b3";

pub fn pool_toml(id: &str, slots: u32, ctx: u32) -> String {
    pool_toml_for(&tiny_model(), id, slots, ctx)
}

/// A pool of `model`, served as model id `tiny` (the slow model generates a few hundred
/// tokens/s: for tests that must tell an abort from a natural end).
pub fn pool_toml_for(model: &Path, id: &str, slots: u32, ctx: u32) -> String {
    format!(
        "[[pools]]\nid = \"{id}\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = {slots}\nctx = {ctx}\nargs = [\"--threads\", \"1\"]\n",
        model.display()
    )
}

pub struct Stack {
    pub pm: Child,
    pub orch: Child,
    pub base: String,
    pub pm_base: String,
    pub runtime_dir: PathBuf,
    pub orch_log: PathBuf,
    pub http: reqwest::Client,
    /// pool-managerd's environment, for a restart.
    pm_env: Vec<(&'static str, String)>,
    /// orchestratord's environment (its data directory included), for a restart.
    orch_env: Vec<(&'static str, String)>,
    orch_restarts: usize,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
pub struct StackOptions {
    pub pools_toml: String,
    pub orch_env: Vec<(&'static str, String)>,
    pub pm_env: Vec<(&'static str, String)>,
    /// Do not wait for a ready pool (tests of an empty stack).
    pub no_wait: bool,
}

pub fn spawn(bin: &Path, env: &[(&str, String)], log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("LLORCH_API_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true);
    // orchestratord's journal: a directory of its own beside its log (a restart on the same
    // log name reuses it), unless the test says where.
    if bin.file_name().is_some_and(|n| n == "orchestratord")
        && !env.iter().any(|(k, _)| *k == "ORCHD_DATA_DIR")
    {
        let stem = log.file_stem().unwrap_or_default().to_string_lossy();
        cmd.env("ORCHD_DATA_DIR", log.with_file_name(format!("{stem}-data")));
    }
    for (k, v) in env {
        // An empty value removes the variable (a stack without the shared token).
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    cmd.spawn().unwrap()
}

impl Stack {
    pub async fn start(opts: StackOptions) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let runtime_dir = dir.path().join("run");
        let config = dir.path().join("pools.toml");
        std::fs::write(&config, &opts.pools_toml).unwrap();
        let pm_log = dir.path().join("pool-managerd.log");
        let mut pm_env = pool_managerd_env(&config, &runtime_dir);
        pm_env.extend([
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            ("POOL_MANAGERD_RESTART_BACKOFF_MS", "200".into()),
        ]);
        pm_env.extend(opts.pm_env.iter().cloned());
        let mut pm = spawn(&workspace_binary("pool-managerd"), &pm_env, &pm_log);
        let pm_base = format!(
            "http://{}",
            logged_addr(
                &mut pm,
                &pm_log,
                "pool-managerd listening",
                Duration::from_secs(30)
            )
            .await
        );
        let orch_log = dir.path().join("orchestratord.log");
        let mut env = vec![
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".to_string()),
            ("ORCHD_RUNTIME_DIR", runtime_dir.display().to_string()),
            ("ORCHD_POOL_MANAGER_URL", pm_base.clone()),
            ("ORCHD_HANDOFF_WATCH_INTERVAL_MS", "500".into()),
            ("ORCHD_POOL_HEALTH_INTERVAL_MS", "200".into()),
            ("ORCHD_SHUTDOWN_GRACE_MS", "3000".into()),
            (
                "ORCHD_DATA_DIR",
                dir.path().join("orchestratord-data").display().to_string(),
            ),
        ];
        env.extend(opts.orch_env.iter().cloned());
        let mut orch = spawn(&workspace_binary("orchestratord"), &env, &orch_log);
        let base = format!(
            "http://{}",
            logged_addr(
                &mut orch,
                &orch_log,
                "orchestratord listening",
                Duration::from_secs(30)
            )
            .await
        );
        let http = authed_client(TOKEN);
        let stack = Stack {
            pm,
            orch,
            base,
            pm_base,
            runtime_dir,
            orch_log,
            http,
            pm_env,
            orch_env: env,
            orch_restarts: 0,
            _dir: dir,
        };
        let path = if opts.no_wait { "health" } else { "ready" };
        let url = format!("{}/{path}", stack.base);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let probe = reqwest::Client::new();
        while !probe
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            if std::time::Instant::now() >= deadline {
                panic!(
                    "orchestratord not {path} within 30 s\n--- orchestratord log:\n{}\n--- pool-managerd log:\n{}",
                    stack.orch_log(),
                    std::fs::read_to_string(stack.runtime_dir.with_file_name("pool-managerd.log"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stack
    }

    /// SIGKILLs pool-managerd (its engines die with it) and starts it again on the same
    /// address, config and runtime directory; its new log goes beside the first one.
    pub async fn kill_and_restart_pm(&mut self) {
        self.pm.start_kill().unwrap();
        self.pm.wait().await.unwrap();
        let addr = self.pm_base.trim_start_matches("http://").to_string();
        let mut env = self.pm_env.clone();
        env.push(("POOL_MANAGERD_BIND_ADDR", addr));
        let log = self
            .runtime_dir
            .with_file_name("pool-managerd-restarted.log");
        self.pm = spawn(&workspace_binary("pool-managerd"), &env, &log);
        logged_addr(
            &mut self.pm,
            &log,
            "pool-managerd listening",
            Duration::from_secs(30),
        )
        .await;
    }

    /// SIGKILLs orchestratord and starts it again with the same environment and data
    /// directory (its journal); it binds a new port, which `base` follows. Returns once it
    /// listens.
    pub async fn kill_and_restart_orch(&mut self) {
        self.orch.start_kill().unwrap();
        self.orch.wait().await.unwrap();
        self.orch_restarts += 1;
        let log = self
            .orch_log
            .with_file_name(format!("orchestratord-{}.log", self.orch_restarts));
        self.orch = spawn(&workspace_binary("orchestratord"), &self.orch_env, &log);
        self.base = format!(
            "http://{}",
            logged_addr(
                &mut self.orch,
                &log,
                "orchestratord listening",
                Duration::from_secs(30)
            )
            .await
        );
        self.orch_log = log;
    }

    /// Waits until orchestratord sees `n` ready pools.
    pub async fn wait_pools_ready(&self, n: usize) {
        wait_for(
            &format!("{n} ready pools"),
            Duration::from_secs(30),
            || async move {
                let v: serde_json::Value = self
                    .http
                    .get(format!("{}/v2/pools", self.base))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let ready = v["pools"]
                    .as_array()?
                    .iter()
                    .filter(|p| p["healthy"] == true && p["draining"] == false)
                    .count();
                (ready >= n).then_some(())
            },
        )
        .await;
    }

    pub fn orch_log(&self) -> String {
        read_log(&self.orch_log)
    }

    pub fn handoff(&self, pool: &str) -> HandoffFile {
        HandoffFile::parse(&std::fs::read(self.runtime_dir.join(format!("{pool}.json"))).unwrap())
            .unwrap()
    }

    pub async fn submit(&self, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v2/tasks", self.base))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn submit_ok(&self, body: serde_json::Value) -> AdmissionResponse {
        let r = self.submit(body).await;
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        r.json().await.unwrap()
    }

    pub async fn status(&self, id: &str) -> TaskStatus {
        self.http
            .get(format!("{}/v2/tasks/{id}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn cancel(&self, id: &str) -> u16 {
        self.http
            .post(format!("{}/v2/tasks/{id}/cancel", self.base))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn open_events(&self, id: &str, last_event_id: Option<u64>) -> EventStream {
        llorch_client::OrchClient::new(&self.base, Some(TOKEN))
            .events(id, last_event_id)
            .await
            .unwrap()
    }

    /// All frames of a task's stream, through its terminal frame.
    pub async fn events(&self, id: &str) -> Vec<SseFrame> {
        let mut s = self.open_events(id, None).await;
        let mut out = Vec::new();
        while let Some(f) = s.frame().await {
            out.push(f);
        }
        out
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One sample of an engine's own metrics: it never queued a request itself (nothing
    /// deferred) and never runs more than `slots` at once; orchestratord must not oversubscribe
    /// it.
    pub async fn assert_engine_not_oversubscribed(&self, pool: &str, slots: u32) {
        let m = self
            .engine_get(pool, "/metrics")
            .await
            .text()
            .await
            .unwrap();
        assert_eq!(
            metric_value(&m, "llamacpp:requests_deferred", &[]),
            Some(0.0),
            "engine queued a request: orchestratord oversubscribed it"
        );
        assert!(metric_value(&m, "llamacpp:requests_processing", &[]).unwrap() <= f64::from(slots));
    }

    /// The API key pool-managerd gave the pool's engine (its key file).
    pub fn engine_key(&self, pool: &str) -> String {
        llorch_handoff::read_key(&self.runtime_dir, pool)
            .unwrap()
            .expect("a managed engine has a key file")
    }

    /// A request to the pool's engine directly (its handoff url), with the engine's key.
    pub fn engine_request(
        &self,
        method: reqwest::Method,
        pool: &str,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let url = self.handoff(pool).url;
        reqwest::Client::new()
            .request(method, format!("{url}{path}"))
            .bearer_auth(self.engine_key(pool))
    }

    /// `GET path` on the pool's engine directly, with its key.
    pub async fn engine_get(&self, pool: &str, path: &str) -> reqwest::Response {
        self.engine_request(reqwest::Method::GET, pool, path)
            .send()
            .await
            .unwrap()
    }

    /// `GET path` on orchestratord with the token.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    pub async fn engine_slots_busy(&self, pool: &str) -> usize {
        let slots: Vec<serde_json::Value> =
            self.engine_get(pool, "/slots").await.json().await.unwrap();
        slots.iter().filter(|s| s["is_processing"] == true).count()
    }

    /// The task's status once it has ended; on timeout, panics with its last status and every
    /// orchestratord log line that names it.
    pub async fn wait_task(&self, id: &str, timeout: Duration) -> TaskStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let s = self.status(id).await;
            if s.finished_at_ms.is_some() {
                return s;
            }
            if std::time::Instant::now() >= deadline {
                let log = std::fs::read_to_string(&self.orch_log).unwrap_or_default();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
                panic!(
                    "timed out after {timeout:?} waiting for task {id} to end; last status \
                     {s:?}; its orchestratord log lines:\n{}",
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub use llorch_client::EventStream;

pub fn data(f: &SseFrame) -> serde_json::Value {
    serde_json::from_str(&f.data).unwrap()
}

pub fn names(frames: &[SseFrame]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f.event.as_deref().unwrap_or(""))
        .collect()
}

pub fn task(prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model_ref": "tiny", "prompt": prompt, "max_tokens": max_tokens})
}
