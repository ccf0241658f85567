//! Test harness: the real pool-managerd binary, a real llama-server and the tiny model.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use llorch_contracts::{PoolState, PoolStatus, PoolsResponse};
pub use llorch_test_support::*;
use tokio::process::{Child, Command};

pub const TOKEN: &str = "test-token-5f1c9a7e2b8d4c60a3e1";

pub fn pool_toml(id: &str, model: &Path, slots: u32, ctx: u32) -> String {
    format!(
        "[[pools]]\nid = \"{id}\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = {slots}\nctx = {ctx}\nargs = [\"--threads\", \"1\"]\n",
        model.display()
    )
}

pub struct Daemon {
    pub child: Child,
    pub base: String,
    /// Owns the temporary home; removed when the daemon handle drops.
    _dir: tempfile::TempDir,
    pub runtime_dir: PathBuf,
    pub log_path: PathBuf,
    pub http: reqwest::Client,
}

pub struct DaemonOptions {
    pub pools_toml: String,
    pub token: Option<&'static str>,
    pub extra_env: Vec<(String, String)>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            pools_toml: String::new(),
            token: Some(TOKEN),
            extra_env: Vec::new(),
        }
    }
}

impl Daemon {
    pub async fn start(opts: DaemonOptions) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, opts).await
    }

    /// Starts the daemon with `dir` as its home (runtime dir `dir/run`).
    pub async fn start_in(dir: tempfile::TempDir, opts: DaemonOptions) -> Daemon {
        let runtime_dir = dir.path().join("run");
        let config = dir.path().join("pools.toml");
        std::fs::write(&config, &opts.pools_toml).unwrap();
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pool-managerd"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("RUST_LOG", "info,pool_managerd=debug")
            .env("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0")
            .env("POOL_MANAGERD_CONFIG", &config)
            .env("POOL_MANAGERD_RUNTIME_DIR", &runtime_dir)
            .env("POOL_MANAGERD_NODE_ID", "test-node")
            .env("POOL_MANAGERD_ENGINE_BINARY", engine_binary())
            .env("POOL_MANAGERD_HEALTH_INTERVAL_MS", "200")
            .env("POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS", "500")
            .env("POOL_MANAGERD_RESTART_BACKOFF_MS", "200")
            .env("POOL_MANAGERD_RESTART_BACKOFF_MAX_MS", "2000")
            .env("POOL_MANAGERD_SHUTDOWN_GRACE_MS", "3000")
            .env("POOL_MANAGERD_ENGINE_START_TIMEOUT_MS", "30000")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        match opts.token {
            Some(t) => cmd.env("LLORCH_API_TOKEN", t),
            None => cmd.env("POOL_MANAGERD_ALLOW_UNAUTHENTICATED_LOOPBACK", "true"),
        };
        for (k, v) in &opts.extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let addr = logged_addr(
            &mut child,
            &log_path,
            "pool-managerd listening",
            Duration::from_secs(20),
        )
        .await;
        let http = match opts.token {
            Some(t) => authed_client(t),
            None => reqwest::Client::new(),
        };
        let mut d = Daemon {
            child,
            base: format!("http://{addr}"),
            _dir: dir,
            runtime_dir,
            log_path,
            http,
        };
        wait_http_ok(
            "pool-managerd /health",
            &format!("{}/health", d.base),
            Duration::from_secs(20),
        )
        .await;
        assert!(
            d.child.try_wait().unwrap().is_none(),
            "daemon exited: {}",
            d.log()
        );
        d
    }

    /// The status of a two-token completion through the pool's engine proxy (with the node
    /// token, as orchestratord sends it).
    pub async fn complete_through_proxy(&self, pool: &str) -> u16 {
        self.http
            .post(format!("{}/v2/pools/{pool}/engine/completion", self.base))
            .json(&serde_json::json!({"prompt": "the", "n_predict": 2}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// A client of the pool's engine directly, carrying the engine's API key (its key file,
    /// as pool-managerd wrote it for the engine serving now).
    pub fn engine_client(&self, pool: &str) -> reqwest::Client {
        let key = llorch_handoff::read_key(&self.runtime_dir, pool)
            .unwrap()
            .expect("a managed engine has a key file");
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
        value.set_sensitive(true);
        reqwest::Client::builder()
            .default_headers(
                [(reqwest::header::AUTHORIZATION, value)]
                    .into_iter()
                    .collect(),
            )
            .build()
            .unwrap()
    }

    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap()
    }

    pub async fn pools(&self) -> PoolsResponse {
        self.http
            .get(format!("{}/v2/pools", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn status(&self, id: &str) -> Option<PoolStatus> {
        let r = self
            .http
            .get(format!("{}/v2/pools/{id}/status", self.base))
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    /// Waits until the pool's status satisfies `pred`.
    pub async fn wait_pool(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        let pred = &pred;
        wait_for(&format!("pool {id} {what}"), timeout, || async move {
            self.status(id).await.filter(|s| pred(s))
        })
        .await
    }

    pub async fn wait_ready(&self, id: &str) -> PoolStatus {
        self.wait_pool(id, "ready", Duration::from_secs(30), |s| {
            s.state == PoolState::Ready && s.ready
        })
        .await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }
}
