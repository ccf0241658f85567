//! Helpers shared by the integration tests of both daemons. They start real processes only:
//! the pinned `llama-server` and the tiny model written by the project's own generator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod pki;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// The llama-server the tests run: `LLORCH_ENGINE_BINARY`, else `PATH`, else the project cache
/// (`make engine`).
pub fn engine_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LLORCH_ENGINE_BINARY").map(PathBuf::from) {
        assert!(
            p.exists(),
            "LLORCH_ENGINE_BINARY={} does not exist; run `make engine`",
            p.display()
        );
        return p;
    }
    let cache = std::env::var_os("LLORCH_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/llama-orch")
        });
    let p = cache.join("bin/llama-server");
    assert!(
        p.exists(),
        "these tests need the real llama-server at {}: run `make engine`",
        p.display()
    );
    p
}

/// What every test's pool-managerd is started with: its pools file, its runtime directory, the
/// cached engine, and short health and shutdown intervals so a fault shows within a test's
/// time. Callers add the address to bind and what their test needs.
pub fn pool_managerd_env(config: &Path, runtime_dir: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("POOL_MANAGERD_CONFIG", config.display().to_string()),
        (
            "POOL_MANAGERD_RUNTIME_DIR",
            runtime_dir.display().to_string(),
        ),
        (
            "POOL_MANAGERD_ENGINE_BINARY",
            engine_binary().display().to_string(),
        ),
        ("POOL_MANAGERD_HEALTH_INTERVAL_MS", "200".into()),
        ("POOL_MANAGERD_SHUTDOWN_GRACE_MS", "2000".into()),
    ]
}

/// A binary of this workspace built next to the running test binary (`cargo test --workspace`
/// builds every daemon).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p {name}` or `cargo test --workspace`",
        p.display()
    );
    p
}

/// The wall clock, in ms since the epoch (as the daemons stamp times).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where the test models live: one file per distinct content, shared by every test process
/// (in a directory named by a hash of the bytes, written whole by a rename), so runs do not
/// pile up copies. The file keeps its plain name (`tiny.gguf`): engines take their model
/// alias from it.
fn shared_model(name: &str, bytes: &[u8]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    let dir = std::env::temp_dir()
        .join("llorch-test-models")
        .join(format!("{:016x}", h.finish()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    let whole = std::fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64);
    if !whole {
        let part = dir.join(format!(".{name}-{}.part", std::process::id()));
        std::fs::write(&part, bytes).unwrap();
        std::fs::rename(&part, &path).unwrap();
    }
    path
}

/// The tiny model, written by the project's own generator.
pub fn tiny_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let bytes = tiny_gguf::build(&tiny_gguf::TinyModel::with_seed(tiny_gguf::DEFAULT_SEED));
            shared_model("tiny", &bytes)
        })
        .clone()
}

/// A slower model (384-dim, 6 layers, ~43 MB): a few hundred tokens/s on one core, for tests
/// that must tell "stopped early" from "finished".
pub fn slow_model() -> PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL
        .get_or_init(|| shared_model("slow", &tiny_gguf::build(&tiny_gguf::TinyModel::slow(7))))
        .clone()
}

/// A second model file (other seed), for reloads.
pub fn other_model(dir: &Path) -> PathBuf {
    let path = dir.join("tiny-other.gguf");
    std::fs::write(
        &path,
        tiny_gguf::build(&tiny_gguf::TinyModel::with_seed(42)),
    )
    .unwrap();
    path
}

/// A file llama-server cannot load: it exits at start.
pub fn broken_model(dir: &Path) -> PathBuf {
    let path = dir.join("broken.gguf");
    std::fs::write(&path, b"GGUF this is not a model").unwrap();
    path
}

/// Polls `f` every 20 ms until it yields `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (`-KILL`, `-STOP`, ...) to process `pid` with kill(1); panics when it fails.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// True while a process with this pid exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Resident memory of a process in KiB (`VmRSS`); `None` when it cannot be read.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    static TICKS_PER_S: OnceLock<u64> = OnceLock::new();
    let ticks_per_s = *TICKS_PER_S.get_or_init(|| {
        let out = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    });
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15 of the whole line.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / ticks_per_s)
}

/// Watches the processes `pids` for `window` and returns the share of one core each used
/// over it (1.0 = a whole core).
pub async fn cpu_shares(pids: &[u32], window: Duration) -> Vec<f64> {
    let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    let started = Instant::now();
    // A measurement window, not a wait for a condition.
    tokio::time::sleep(window).await;
    let wall = started.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| (cpu_time(*p) - b).as_secs_f64() / wall)
        .collect()
}

/// Value of a metric sample line `name{labels} value`, if present.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The variables the migration plan lists for `daemon` (`orchestratord` or `pool-managerd`),
/// read from `../shared/reference/migration-plan-env.md` beside the workspace: the first
/// column of that daemon's table.
pub fn migration_plan_variables(daemon: &str) -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/migration-plan-env.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut in_section = false;
    let mut names = Vec::new();
    for line in text.lines() {
        if let Some(title) = line.strip_prefix("## ") {
            in_section = title.trim() == daemon;
            continue;
        }
        if !in_section {
            continue;
        }
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        if let Some((name, _)) = cell.split_once('`') {
            names.push(name.to_string());
        }
    }
    assert!(
        !names.is_empty(),
        "no variables of {daemon} in {}",
        path.display()
    );
    names
}

/// Fails naming each variable the migration plan lists for `daemon` that the daemon does not
/// read: none of `cmd`'s settings (their `env` names), none of its old names (`aliases`), and
/// not one of the variables read besides its settings (`also`: logging, tracing).
pub fn assert_migration_plan_read(
    daemon: &str,
    cmd: clap::Command,
    aliases: &[&str],
    also: &[&str],
) {
    let settings: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    let unread: Vec<String> = migration_plan_variables(daemon)
        .into_iter()
        .filter(|name| {
            !settings.contains(name)
                && !aliases.contains(&name.as_str())
                && !also.contains(&name.as_str())
        })
        .collect();
    assert!(
        unread.is_empty(),
        "{daemon} reads no setting for {unread:?} (the migration plan lists them)"
    );
}

/// A daemon's log, read whole. Panics when the file is missing or empty: a check that a log
/// lacks something (a secret) must not pass on a log that was never written.
pub fn read_log(path: &Path) -> String {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the log {}: {e}", path.display()));
    assert!(!text.is_empty(), "the log {} is empty", path.display());
    text
}

/// The address a daemon started on port 0 logged as bound (the `addr` field of its `marker`
/// line, pretty or JSON), polled from its log file until `timeout`. Binding port 0 leaves the choice to
/// the kernel: a port picked in advance can be taken by any outgoing connection before the
/// daemon binds it. Panics with the log when the daemon exits or the line never comes.
pub async fn logged_addr(child: &mut Child, log: &Path, marker: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("the daemon exited ({status}) before {marker:?}; the log:\n{text}");
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // `addr=HOST:PORT` (pretty logs) or `"addr":"HOST:PORT"` (JSON logs).
        let found = text.lines().filter(|l| l.contains(marker)).find_map(|l| {
            let (_, rest) = l
                .split_once("addr=")
                .or_else(|| l.split_once("\"addr\":\""))?;
            let end = rest.find(['"', ' ', ',']).unwrap_or(rest.len());
            Some(rest[..end].to_string())
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} line within {timeout:?}; the log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A llama-server started by the test itself (an "external provisioner").
pub struct ExternalEngine {
    pub child: Child,
    pub url: String,
}

impl ExternalEngine {
    /// Starts one on port 0: the kernel gives it a port, which its log then names (read from
    /// its output, which is drained for as long as it runs).
    pub async fn start(model: &Path, slots: u32) -> ExternalEngine {
        let mut child = Command::new(engine_binary())
            .args(["--model", &model.display().to_string()])
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args([
                "--parallel",
                &slots.to_string(),
                "--ctx-size",
                "1024",
                "--threads",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (found, port) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().map(drain_for_port(found.clone()));
        let stderr = child.stderr.take().map(drain_for_port(found));
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            let mut port = port;
            port.recv().await
        })
        .await
        .ok()
        .flatten()
        .expect("the external llama-server never said which port it listens on");
        drop((stdout, stderr));
        let url = format!("http://127.0.0.1:{port}");
        wait_http_ok(
            "external llama-server health",
            &format!("{url}/health"),
            Duration::from_secs(30),
        )
        .await;
        ExternalEngine { child, url }
    }
}

/// Reads an engine's output line by line to its end, sending the port of its `listening on`
/// line.
fn drain_for_port<R>(
    found: tokio::sync::mpsc::UnboundedSender<u16>,
) -> impl FnOnce(R) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    move |output| {
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(output).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(port) = llamacpp_client::listening_port(&line) {
                    let _ = found.send(port);
                }
            }
        })
    }
}

/// A client that sends `Authorization: Bearer <token>` on every request.
pub fn authed_client(token: &str) -> reqwest::Client {
    authed(reqwest::Client::builder(), token)
}

/// `builder` sending `Authorization: Bearer <token>` on every request.
fn authed(builder: reqwest::ClientBuilder, token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    builder.default_headers(headers).build().unwrap()
}

/// Polls `url` (no auth) until it answers 200, or panics after `timeout`.
pub async fn wait_http_ok(what: &str, url: &str, timeout: Duration) {
    let probe = reqwest::Client::new();
    wait_for(what, timeout, || {
        let probe = probe.clone();
        let url = url.to_string();
        async move {
            probe
                .get(url)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        }
    })
    .await;
}

/// A client of orchestratord's API for tests: the typed `llorch_client::OrchClient` (`typed`)
/// plus JSON-in, JSON-out helpers for polling and for bodies a typed client cannot send.
pub struct OrchClient {
    pub base: String,
    pub http: reqwest::Client,
    pub typed: llorch_client::OrchClient,
}

impl OrchClient {
    pub fn new(base: String, token: &str) -> Self {
        Self {
            typed: llorch_client::OrchClient::new(&base, Some(token)),
            http: authed_client(token),
            base,
        }
    }

    /// [`OrchClient::new`] whose every request gives up after `timeout` (a poll of a daemon
    /// that may not answer).
    pub fn with_timeout(base: String, token: &str, timeout: Duration) -> Self {
        Self::with_builder(base, token, || reqwest::Client::builder().timeout(timeout))
    }

    /// [`OrchClient::new`] for an https:// `base` whose certificate chains to `ca` (PEM).
    pub fn over_tls(base: String, token: &str, ca: &Path) -> Self {
        let certs = reqwest::Certificate::from_pem_bundle(&std::fs::read(ca).unwrap()).unwrap();
        Self::with_builder(base, token, || {
            reqwest::Client::builder().tls_certs_only(certs.iter().cloned())
        })
    }

    /// Both clients from `builder` (the typed one, and the JSON one with the token).
    fn with_builder(
        base: String,
        token: &str,
        builder: impl Fn() -> reqwest::ClientBuilder,
    ) -> Self {
        Self {
            typed: llorch_client::OrchClient::with_http(
                &base,
                Some(token),
                builder().build().unwrap(),
            ),
            http: authed(builder(), token),
            base,
        }
    }

    /// `GET path` as JSON; `Null` when unreachable or not JSON (callers poll).
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    }

    pub async fn pools(&self) -> Vec<serde_json::Value> {
        self.get_json("/v2/pools").await["pools"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn nodes(&self) -> Vec<serde_json::Value> {
        self.get_json("/v2/nodes").await["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The node entry with this address.
    pub async fn node_at(&self, address: &str) -> serde_json::Value {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n["address"] == address)
            .unwrap_or_else(|| panic!("no node at {address}"))
    }

    /// Submits a task (asserting 202) and returns its id.
    pub async fn submit(&self, body: serde_json::Value) -> String {
        let r = self
            .http
            .post(format!("{}/v2/tasks", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        r.json::<serde_json::Value>().await.unwrap()["task_id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Waits until the task has finished; returns its status.
    pub async fn finish(&self, id: &str, within: Duration) -> serde_json::Value {
        wait_for(&format!("task {id} finished"), within, || async {
            let v = self.get_json(&format!("/v2/tasks/{id}")).await;
            v["finished_at_ms"].is_u64().then_some(v)
        })
        .await
    }

    /// Waits until every pool in `ids` is bound and healthy.
    pub async fn wait_healthy(&self, ids: &[&str], within: Duration) {
        wait_for(&format!("pools {ids:?} healthy"), within, || async {
            let pools = self.typed.pools().await.ok()?.pools;
            ids.iter()
                .all(|id| pools.iter().any(|p| p.pool_id == *id && p.healthy))
                .then_some(())
        })
        .await;
    }
}

/// One metric family as a scrape shows it.
#[derive(Debug, Default, Clone)]
pub struct Family {
    pub kind: String,
    /// Label names of its samples (`le` of histogram buckets left out).
    pub labels: std::collections::BTreeSet<String>,
    /// Every (label, value) seen.
    pub values: std::collections::BTreeSet<(String, String)>,
}

/// Parses a Prometheus text exposition into families (histogram `_bucket/_sum/_count` samples
/// folded into their family).
pub fn parse_exposition(text: &str) -> std::collections::BTreeMap<String, Family> {
    let mut families: std::collections::BTreeMap<String, Family> = Default::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                families.entry(name.to_string()).or_default().kind = kind.to_string();
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, labels) = match line.split_once('{') {
            Some((n, rest)) => (n, rest.rsplit_once('}').map(|(l, _)| l).unwrap_or("")),
            None => (line.split_whitespace().next().unwrap_or(""), ""),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|base| families.get(*base).is_some_and(|f| f.kind == "histogram"))
            .unwrap_or(name)
            .to_string();
        let f = families.entry(family).or_default();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once('=') {
                let v = v.trim_matches('"').to_string();
                if k != "le" {
                    f.labels.insert(k.to_string());
                    f.values.insert((k.to_string(), v));
                }
            }
        }
    }
    families
}

/// The checked-in metrics lint list (`ci/metrics.lint.json`).
pub fn metrics_lint() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../ci/metrics.lint.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Checks a scrape of `daemon` against the lint list: every exposed family is listed with its
/// type and label names, enum-like labels stay within their values, and every listed family
/// (but those of another `profile`) is exposed. Returns the problems found.
pub fn lint_scrape(daemon: &str, text: &str, profile: &str) -> Vec<String> {
    let lint = metrics_lint();
    let listed = lint[daemon].as_array().unwrap();
    let exposed = parse_exposition(text);
    let mut problems = Vec::new();
    for (name, f) in &exposed {
        let Some(entry) = listed.iter().find(|e| e["name"] == name.as_str()) else {
            problems.push(format!(
                "{daemon}: {name} is exposed but not in ci/metrics.lint.json"
            ));
            continue;
        };
        if entry["type"] != f.kind.as_str() {
            problems.push(format!(
                "{daemon}: {name} is a {} but listed as {}",
                f.kind, entry["type"]
            ));
        }
        let want: std::collections::BTreeSet<String> = entry["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        if !f.labels.is_empty() && f.labels != want {
            problems.push(format!(
                "{daemon}: {name} has labels {:?}, listed {:?}",
                f.labels, want
            ));
        }
        if let Some(values) = entry["values"].as_object() {
            for (label, value) in &f.values {
                if let Some(allowed) = values.get(label) {
                    if !allowed
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| a == value.as_str())
                    {
                        problems.push(format!(
                            "{daemon}: {name}{{{label}={value:?}}} is not an allowed value"
                        ));
                    }
                }
            }
        }
    }
    for entry in listed {
        let name = entry["name"].as_str().unwrap();
        let other_profile = entry["profile"].as_str().is_some_and(|p| p != profile);
        if !other_profile && !exposed.contains_key(name) {
            problems.push(format!("{daemon}: {name} is listed but not exposed"));
        }
    }
    problems
}
