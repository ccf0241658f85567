//! The state of one scenario: the daemons it runs against (shared, see `daemons`), the tasks it
//! submitted by name, the last answer it got, and streams it holds open. Helpers speak JSON over
//! real HTTP; every wait polls with a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cucumber::World;
use llorch_client::{EventStream, SseFrame};
use llorch_test_support::{authed_client, wait_for};

use crate::daemons::{self, Daemons, PoolSpec, Setup};

/// An HTTP answer, read whole.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub async fn read(r: reqwest::Response) -> Answer {
        Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            text: r.text().await.unwrap_or_default(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "the answer ({}) is not JSON ({e}): {}",
                self.status, self.text
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Event streams held open across steps.
#[derive(Default)]
pub struct OpenStreams(pub BTreeMap<String, EventStream>);

impl std::fmt::Debug for OpenStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

#[derive(Debug, World)]
#[world(init = Self::new)]
pub struct Bdd {
    /// orchestratord settings asked for by the scenario, applied when its stack starts.
    pub orch_env: Vec<(String, String)>,
    pub daemons: Option<Arc<Daemons>>,
    /// The secret "a client" uses, and the one used to look at and clean up any task.
    pub client_token: String,
    pub admin_token: String,
    /// The secret pool-managerd takes: the node token in a stack of separate secrets.
    pub node_token: String,
    /// The pools the HOME stack was asked for, as the feature gave them.
    pub pool_specs: Vec<PoolSpec>,
    /// Task ids by the names the scenario gave them.
    pub tasks: BTreeMap<String, String>,
    /// Every task this scenario submitted, to cancel what is left when it ends.
    pub submitted: Vec<String>,
    pub answer: Option<Answer>,
    pub answers: Vec<Answer>,
    /// A metrics scrape taken before the scenario's action.
    pub metrics_before: Option<String>,
    /// Whole streams read to their end, by task name.
    pub streams: BTreeMap<String, Vec<SseFrame>>,
    /// Frames read after a Last-Event-ID, by task name.
    pub resumed: BTreeMap<String, Vec<SseFrame>>,
    pub open: OpenStreams,
    /// Pool ids remembered by a step for later ones.
    pub pools_seen: BTreeMap<String, String>,
    /// Engine pids remembered before a kill.
    pub pids: BTreeMap<String, u32>,
}

impl Bdd {
    fn new() -> Self {
        Bdd {
            orch_env: Vec::new(),
            daemons: None,
            client_token: daemons::TOKEN.into(),
            admin_token: daemons::TOKEN.into(),
            node_token: daemons::TOKEN.into(),
            pool_specs: Vec::new(),
            tasks: BTreeMap::new(),
            submitted: Vec::new(),
            answer: None,
            answers: Vec::new(),
            metrics_before: None,
            streams: BTreeMap::new(),
            resumed: BTreeMap::new(),
            open: OpenStreams::default(),
            pools_seen: BTreeMap::new(),
            pids: BTreeMap::new(),
        }
    }

    pub fn d(&self) -> &Daemons {
        self.daemons
            .as_deref()
            .expect("no daemons: the scenario has no Given that starts them")
    }

    pub fn base(&self) -> String {
        self.d().base().to_string()
    }

    /// Starts (or reuses) the HOME stack with these pools and the settings asked so far.
    pub async fn home(&mut self, pools: Vec<PoolSpec>, separate_keys: bool) {
        let setup = Setup::Home {
            pools: pools.clone(),
            orch_env: self.orch_env.clone(),
            separate_keys,
        };
        self.daemons = Some(daemons::acquire(setup).await);
        if separate_keys {
            self.client_token = daemons::CLIENT_KEY.into();
            self.admin_token = daemons::ADMIN_TOKEN.into();
            self.node_token = daemons::NODE_TOKEN.into();
        }
        self.pool_specs = pools.clone();
        let ids: Vec<String> = pools.into_iter().map(|p| p.id).collect();
        self.wait_pools_ready(&ids, Duration::from_secs(40)).await;
    }

    pub fn answer(&self) -> &Answer {
        self.answer
            .as_ref()
            .expect("no answer yet: a When step sends the request")
    }

    pub fn task_id(&self, name: &str) -> String {
        self.tasks
            .get(name)
            .unwrap_or_else(|| panic!("no task named {name:?} in this scenario"))
            .clone()
    }

    pub fn http(&self, token: &str) -> reqwest::Client {
        authed_client(token)
    }

    /// POSTs a task as "a client"; remembers the id under `name` when admitted.
    pub async fn submit(&mut self, name: Option<&str>, body: serde_json::Value) -> Answer {
        let r = self
            .http(&self.client_token)
            .post(format!("{}/v2/tasks", self.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let a = Answer::read(r).await;
        if a.status == 202 {
            let id = a.json()["task_id"].as_str().unwrap().to_string();
            self.submitted.push(id.clone());
            if let Some(name) = name {
                self.tasks.insert(name.to_string(), id);
            }
        }
        self.answer = Some(a.clone());
        self.answers.push(a.clone());
        a
    }

    /// [`Bdd::submit`], asserting admission.
    pub async fn submit_ok(&mut self, name: &str, body: serde_json::Value) -> String {
        let a = self.submit(Some(name), body).await;
        assert_eq!(a.status, 202, "task {name} not admitted: {}", a.text);
        self.task_id(name)
    }

    /// The task's status as the admin sees it.
    pub async fn status(&self, id: &str) -> serde_json::Value {
        let r = self
            .http(&self.admin_token)
            .get(format!("{}/v2/tasks/{id}", self.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "status of task {id}");
        r.json().await.unwrap()
    }

    pub async fn wait_started(&self, id: &str, within: Duration) -> serde_json::Value {
        wait_for(&format!("task {id} started"), within, || async {
            let s = self.status(id).await;
            s["started_at_ms"].is_u64().then_some(s)
        })
        .await
    }

    /// The task's status once it has ended; on timeout, panics with its last status and the
    /// orchestratord log lines that name it.
    pub async fn wait_finished(&self, id: &str, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status(id).await;
            if s["finished_at_ms"].is_u64() {
                return s;
            }
            if Instant::now() >= deadline {
                let log = self.d().orch_log();
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(id)).collect();
                panic!(
                    "task {id} did not end within {within:?}; last status {s}; its log lines:\n{}",
                    lines.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn cancel(&self, id: &str) -> u16 {
        self.http(&self.admin_token)
            .post(format!("{}/v2/tasks/{id}/cancel", self.base()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    pub async fn open_events(&self, id: &str, last_event_id: Option<u64>) -> EventStream {
        llorch_client::OrchClient::new(&self.base(), Some(&self.client_token))
            .events(id, last_event_id)
            .await
            .unwrap()
    }

    /// Reads a stream to its end (the server closes it after the terminal event).
    pub async fn read_to_end(mut s: EventStream, within: Duration) -> Vec<SseFrame> {
        let mut out = Vec::new();
        tokio::time::timeout(within, async {
            while let Some(f) = s.frame().await {
                out.push(f);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {within:?}: {out:?}"));
        out
    }

    /// orchestratord's pool list (admin view); `None` unless it answered 200 (a daemon that is
    /// down or refusing must never read as "no pool").
    pub async fn pools(&self) -> Option<Vec<serde_json::Value>> {
        let r = self
            .http(&self.admin_token)
            .get(format!("{}/v2/pools", self.base()))
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => Some(
                r.json::<serde_json::Value>().await.unwrap()["pools"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default(),
            ),
            _ => None,
        }
    }

    /// Pool `id` as orchestratord lists it (inner `None`: not listed); `None` unless it
    /// answered.
    pub async fn pool(&self, id: &str) -> Option<Option<serde_json::Value>> {
        let pools = self.pools().await?;
        Some(pools.into_iter().find(|p| p["pool_id"] == id))
    }

    /// Waits until orchestratord lists every pool of `ids` healthy and not draining.
    pub async fn wait_pools_ready(&self, ids: &[String], within: Duration) {
        wait_for(&format!("pools {ids:?} ready"), within, || async {
            // Unreachable reads as "not yet": this waits for pools to appear.
            let pools = self.pools().await.unwrap_or_default();
            ids.iter()
                .all(|id| {
                    pools.iter().any(|p| {
                        p["pool_id"] == id.as_str()
                            && p["healthy"] == true
                            && p["draining"] == false
                    })
                })
                .then_some(())
        })
        .await;
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Run after every scenario: cancels the tasks it left running or queued and waits until
    /// they have ended, so the next scenario finds the shared daemons idle. A failed scenario
    /// may have left the daemons in any state: the next one gets fresh ones.
    pub async fn clean_up(&mut self, failed: bool) {
        self.open.0.clear();
        if self.daemons.is_none() {
            return;
        }
        if failed {
            daemons::spoil().await;
            return;
        }
        for id in self.submitted.clone() {
            if !self.status(&id).await["finished_at_ms"].is_u64() {
                self.cancel(&id).await;
            }
        }
        for id in self.submitted.clone() {
            self.wait_finished(&id, Duration::from_secs(15)).await;
        }
        if let Daemons::Lone(l) = self.d() {
            // Handoff files written by the scenario go; orchestratord retires their pools.
            for e in std::fs::read_dir(&l.runtime_dir).unwrap().flatten() {
                let _ = std::fs::remove_file(e.path());
            }
            wait_for("no pool left", Duration::from_secs(10), || async {
                self.pools()
                    .await
                    .is_some_and(|p| p.is_empty())
                    .then_some(())
            })
            .await;
        }
    }
}
