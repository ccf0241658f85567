//! Headless Chromium for the console test, driven over its DevTools protocol (CDP) on a
//! WebSocket: open a page, read it with JavaScript, click and type with real input events,
//! take a screenshot. Every wait polls with a deadline; nothing sleeps a fixed time. Runs as
//! root, without a display, on two cores (`--no-sandbox`, `--disable-dev-shm-usage`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long one protocol command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(50);

/// Replies awaited, by command id.
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Browser {
    child: Child,
    pid: u32,
    log: PathBuf,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    /// Uncaught exceptions of the page (`Runtime.exceptionThrown`).
    exceptions: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
    _profile: tempfile::TempDir,
}

/// Chromium from `PATH`; the test fails (never skips) when it is missing.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "chromium is not installed (the console test drives headless Chromium): run `make deps`"
    );
}

impl Browser {
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let log = profile.path().join("chromium.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut child = Command::new(chromium())
            .args([
                "--headless",
                // Root in a container: Chromium's sandbox cannot start there.
                "--no-sandbox",
                "--disable-gpu",
                // /dev/shm is small in containers.
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--mute-audio",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            // Its own process group: the renderer and helper processes go with it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        // Chromium writes the port it bound (and the browser's path) into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "chromium exited ({status}) before it listened; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let text = std::fs::read_to_string(&port_file).unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                break format!("ws://127.0.0.1:{port}{path}");
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not listen within 30 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(POLL).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let (mut sink, mut stream) = ws.split();
        let (out, mut outgoing) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = outgoing.recv().await {
                if sink.send(m).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Arc::default();
        let exceptions: Arc<Mutex<Vec<Value>>> = Arc::default();
        tokio::spawn({
            let pending = pending.clone();
            let exceptions = exceptions.clone();
            async move {
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(text) = m else { continue };
                    let Ok(v) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    if let Some(id) = v["id"].as_u64() {
                        if let Some(reply) = pending.lock().remove(&id) {
                            let _ = reply.send(v);
                        }
                    } else if v["method"] == "Runtime.exceptionThrown" {
                        exceptions
                            .lock()
                            .push(v["params"]["exceptionDetails"].clone());
                    }
                }
            }
        });
        Browser {
            child,
            pid,
            log,
            out,
            pending,
            exceptions,
            next_id: AtomicU64::new(1),
            _profile: profile,
        }
    }

    /// Sends one command (to a page's session, or the browser) and returns its result.
    async fn send(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.try_send(session, method, params)
            .await
            .unwrap_or_else(|error| panic!("{method} failed: {error}"))
    }

    /// [`Browser::send`], with the protocol's error as `Err`.
    async fn try_send(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, Value> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        self.out.send(Message::text(msg.to_string())).unwrap();
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer from chromium within 30 s"))
            .unwrap_or_else(|_| {
                panic!(
                    "{method}: chromium's connection closed; its log:\n{}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )
            });
        match reply.get("error") {
            Some(error) => Err(error.clone()),
            None => Ok(reply["result"].clone()),
        }
    }

    /// A new tab showing `url`.
    pub async fn open(&self, url: &str) -> Page<'_> {
        let target = self
            .send(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .send(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let page = Page {
            browser: self,
            session: attached["sessionId"].as_str().unwrap().to_string(),
        };
        for domain in ["Page.enable", "Runtime.enable"] {
            page.send(domain, json!({})).await;
        }
        // Every Content-Security-Policy violation of the page is recorded where the test can
        // read it (scripts added this way are not subject to the page's policy).
        page.send(
            "Page.addScriptToEvaluateOnNewDocument",
            json!({"source": "window.__cspViolations = []; document.addEventListener('securitypolicyviolation', (e) => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));"}),
        )
        .await;
        page.send(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page.send("Page.navigate", json!({"url": url})).await;
        page
    }

    /// Uncaught exceptions any page threw so far.
    pub fn exceptions(&self) -> Vec<Value> {
        self.exceptions.lock().clone()
    }

    /// Closes the browser and waits for it (at most 10 s, then kills its process group).
    pub async fn close(mut self) {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let _ = self.out.send(Message::text(
            json!({"id": id, "method": "Browser.close"}).to_string(),
        ));
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            self.kill_group();
        }
    }

    fn kill_group(&self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pid)])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Whatever is left of the browser's process group (a failed test ends here).
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            self.kill_group();
        }
    }
}

pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

impl Page<'_> {
    async fn send(&self, method: &str, params: Value) -> Value {
        self.browser.send(Some(&self.session), method, params).await
    }

    /// The value of a JavaScript expression; panics when it throws.
    pub async fn eval(&self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression} threw: {e}"))
    }

    /// The value of `expression`, or why it has none (an exception, no context to run in:
    /// while the page loads).
    async fn try_eval(&self, expression: &str) -> Result<Value, Value> {
        let r = self
            .browser
            .try_send(
                Some(&self.session),
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await?;
        match r.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(r["result"]["value"].clone()),
        }
    }

    /// Polls `expression` until it is neither null, false, nor undefined, and returns it; on
    /// timeout panics with `what`, the last value and the page's text.
    pub async fn wait_for(&self, what: &str, timeout: Duration, expression: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.try_eval(expression).await;
            if let Ok(v) = &last {
                if truthy(v) {
                    return v.clone();
                }
            }
            if Instant::now() >= deadline {
                let text = self
                    .try_eval("document.body ? document.body.innerText : ''")
                    .await
                    .unwrap_or_default();
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last {last:?}; the page:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clicks the element `selector` names with the mouse, once it is shown and nothing
    /// covers its centre; repeats the click until `effect` (an expression) holds, so a click
    /// that landed while the page moved is not lost.
    pub async fn click_until(&self, selector: &str, effect: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let locate = format!(
            "(() => {{ const el = document.querySelector({sel}); if (!el || el.disabled) return null; \
             el.scrollIntoView({{block: 'center', inline: 'center'}}); const r = el.getBoundingClientRect(); \
             if (r.width === 0 || r.height === 0) return null; const x = r.left + r.width / 2, y = r.top + r.height / 2; \
             const hit = document.elementFromPoint(x, y); return hit && el.contains(hit) ? {{x, y}} : null; }})()",
            sel = serde_json::to_string(selector).unwrap()
        );
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let at = self
                .wait_for(&format!("{selector} to be clickable"), left, &locate)
                .await;
            for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
                self.send(
                    "Input.dispatchMouseEvent",
                    json!({"type": kind, "x": at["x"], "y": at["y"], "button": "left", "clickCount": 1}),
                )
                .await;
            }
            // The effect of one click shows within a second or it was lost.
            let settle = Instant::now() + Duration::from_secs(1);
            while Instant::now() < settle {
                if self.holds(effect).await {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
            assert!(
                Instant::now() < deadline,
                "clicking {selector} never led to: {effect}"
            );
        }
    }

    async fn holds(&self, expression: &str) -> bool {
        self.try_eval(expression).await.is_ok_and(|v| truthy(&v))
    }

    /// Focuses the input `selector`, selects what it holds and types `text` over it.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        self.wait_for(
            &format!("{selector} to take input"),
            Duration::from_secs(10),
            &format!(
                "(() => {{ const el = document.querySelector({sel}); if (!el || el.offsetParent === null) return null; \
                 el.focus(); el.select(); return document.activeElement === el; }})()"
            ),
        )
        .await;
        self.send("Input.insertText", json!({"text": text})).await;
        let typed = self
            .eval(&format!("document.querySelector({sel}).value"))
            .await;
        assert_eq!(typed.as_str(), Some(text), "typing into {selector}");
    }

    /// Loads the page again (same tab, same session storage).
    pub async fn reload(&self) {
        self.send("Page.reload", json!({"ignoreCache": true})).await;
    }

    /// A PNG of the whole page at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let metrics = self.send("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let shot = self
            .send(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true, "clip": {
                    "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1
                }}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

fn truthy(v: &Value) -> bool {
    !v.is_null() && *v != Value::Bool(false)
}
