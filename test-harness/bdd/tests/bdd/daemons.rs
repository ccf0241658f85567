//! The real daemons a feature runs against, started once and shared by the scenarios of a
//! feature that ask for the same set-up (the current one is kept; asking for another one stops
//! it first, so at most one set of daemons runs at a time).
//!
//! - `Home`: pool-managerd provisions real llama-server engines and writes their handoff files;
//!   orchestratord watches the same runtime directory (the HOME profile).
//! - `Lone`: orchestratord alone on an empty runtime directory, plus one llama-server started
//!   by the suite itself, for an external provisioner's handoff files.
//! - `Cloud`: the CLOUD profile in network namespaces of its own (the e2e-cloud harness):
//!   orchestratord in one namespace polls a pool-managerd in each node namespace over veth
//!   links, and the suite reaches orchestratord over a link of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use llorch_e2e_cloud as e2e;
use llorch_test_support::*;
use tokio::process::{Child, Command};

/// The shared token of HOME stacks (`LLORCH_API_TOKEN`: client, admin and node at once).
pub const TOKEN: &str = "bdd-shared-token-5c1e8a0b7d2f";

/// Keys of the auth feature: a named client key, the admin token and the node token.
pub const CLIENT_KEY_NAME: &str = "client";
pub const CLIENT_KEY: &str = "bdd-client-key-0a1b2c3d4e5f";
pub const OTHER_CLIENT_KEY: &str = "bdd-other-key-9f8e7d6c5b4a";
pub const ADMIN_TOKEN: &str = "bdd-admin-token-13579bdf2468";
pub const NODE_TOKEN: &str = "bdd-node-token-2468ace13579b";

/// One pool of a stack: id, slots, which model file (`tiny` or `slow`), served as model id
/// `tiny` either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub id: String,
    pub slots: u32,
    pub model: String,
    pub ctx: u32,
}

impl PoolSpec {
    fn model_path(&self) -> PathBuf {
        match self.model.as_str() {
            "slow" => slow_model(),
            "tiny" => tiny_model(),
            other => panic!("unknown model {other:?}: use tiny or slow"),
        }
    }
}

fn pools_toml(pools: &[PoolSpec]) -> String {
    pools
        .iter()
        .map(|p| {
            format!(
                "[[pools]]\nid = \"{}\"\nmodel = \"{}\"\nmodel_id = \"tiny\"\nslots = {}\nctx = {}\nargs = [\"--threads\", \"1\"]\n",
                p.id,
                p.model_path().display(),
                p.slots,
                p.ctx
            )
        })
        .collect()
}

/// Starts a daemon with a clean environment (the shared token unless `env` empties it; an empty
/// value removes a variable), its output in `log`, killed when dropped.
fn spawn(bin: &Path, env: &[(String, String)], log: &Path) -> Child {
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
    for (k, v) in env {
        if v.is_empty() {
            cmd.env_remove(k);
        } else {
            cmd.env(k, v);
        }
    }
    cmd.spawn().unwrap()
}

fn owned(env: &[(&str, String)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The HOME profile on loopback.
pub struct Home {
    pub pm: Child,
    pub orch: Child,
    pub base: String,
    pub pm_base: String,
    pub runtime_dir: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Home {
    async fn start(pools: &[PoolSpec], orch_env: &[(String, String)], separate_keys: bool) -> Home {
        let dir = tempfile::tempdir().unwrap();
        // Separate roles: no shared token; client keys from a file, an admin token, and the
        // node token, which is pool-managerd's only secret.
        let (mut orch_roles, mut pm_roles) = (Vec::new(), Vec::new());
        if separate_keys {
            use std::os::unix::fs::PermissionsExt;
            let keys = dir.path().join("client-keys");
            std::fs::write(
                &keys,
                format!("{CLIENT_KEY_NAME}:{CLIENT_KEY}\nother:{OTHER_CLIENT_KEY}\n"),
            )
            .unwrap();
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
            orch_roles = owned(&[
                ("LLORCH_API_TOKEN", String::new()),
                ("ORCHD_API_KEYS_FILE", keys.display().to_string()),
                ("LLORCH_ADMIN_TOKEN", ADMIN_TOKEN.into()),
                ("LLORCH_NODE_TOKEN", NODE_TOKEN.into()),
            ]);
            pm_roles = owned(&[
                ("LLORCH_API_TOKEN", String::new()),
                ("LLORCH_NODE_TOKEN", NODE_TOKEN.into()),
            ]);
        }
        let runtime_dir = dir.path().join("run");
        let config = dir.path().join("pools.toml");
        std::fs::write(&config, pools_toml(pools)).unwrap();
        let mut env = pool_managerd_env(&config, &runtime_dir);
        env.extend([
            ("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0".into()),
            ("POOL_MANAGERD_RESTART_BACKOFF_MS", "200".into()),
        ]);
        let mut env = owned(&env);
        env.extend(pm_roles);
        let pm_log = dir.path().join("pool-managerd.log");
        let mut pm = spawn(&workspace_binary("pool-managerd"), &env, &pm_log);
        let pm_addr = logged_addr(
            &mut pm,
            &pm_log,
            "pool-managerd listening",
            Duration::from_secs(30),
        )
        .await;
        let pm_base = format!("http://{pm_addr}");
        let mut env = owned(&[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", runtime_dir.display().to_string()),
            ("ORCHD_POOL_MANAGER_URL", pm_base.clone()),
            ("ORCHD_HANDOFF_WATCH_INTERVAL_MS", "500".into()),
            ("ORCHD_POOL_HEALTH_INTERVAL_MS", "200".into()),
            ("ORCHD_SHUTDOWN_GRACE_MS", "3000".into()),
            (
                "ORCHD_DATA_DIR",
                dir.path().join("orchestratord-data").display().to_string(),
            ),
        ]);
        env.extend(orch_roles);
        env.extend(orch_env.iter().cloned());
        let orch_log = dir.path().join("orchestratord.log");
        let mut orch = spawn(&workspace_binary("orchestratord"), &env, &orch_log);
        let addr = logged_addr(
            &mut orch,
            &orch_log,
            "orchestratord listening",
            Duration::from_secs(30),
        )
        .await;
        Home {
            pm,
            orch,
            base: format!("http://{addr}"),
            pm_base,
            runtime_dir,
            dir,
        }
    }
}

/// orchestratord alone (HOME) on an empty runtime directory, and a llama-server of the suite's
/// own that a handoff file can name.
pub struct Lone {
    pub orch: Child,
    pub base: String,
    pub runtime_dir: PathBuf,
    pub engine: ExternalEngine,
    pub dir: tempfile::TempDir,
}

impl Lone {
    async fn start() -> Lone {
        let dir = tempfile::tempdir().unwrap();
        let runtime_dir = dir.path().join("run");
        // There before the daemon, as pool-managerd would make it.
        std::fs::create_dir(&runtime_dir).unwrap();
        let engine = ExternalEngine::start(&tiny_model(), 1).await;
        let env = owned(&[
            ("ORCHD_BIND_ADDR", "127.0.0.1:0".into()),
            ("ORCHD_RUNTIME_DIR", runtime_dir.display().to_string()),
            // A long rescan: what a scenario sees within its deadline came from the watch.
            ("ORCHD_HANDOFF_WATCH_INTERVAL_MS", "600000".into()),
            ("ORCHD_POOL_HEALTH_INTERVAL_MS", "200".into()),
            (
                "ORCHD_DATA_DIR",
                dir.path().join("orchestratord-data").display().to_string(),
            ),
        ]);
        let log = dir.path().join("orchestratord.log");
        let mut orch = spawn(&workspace_binary("orchestratord"), &env, &log);
        let addr = logged_addr(
            &mut orch,
            &log,
            "orchestratord listening",
            Duration::from_secs(30),
        )
        .await;
        Lone {
            orch,
            base: format!("http://{addr}"),
            runtime_dir,
            engine,
            dir,
        }
    }
}

/// The CLOUD profile across network namespaces: orchestratord and one pool-managerd per node,
/// each node with one pool of one slot (pool `a0` on node 1, `b0` on node 2, ...).
pub struct Cloud {
    pub net: e2e::Net,
    pub orch_host: e2e::Host,
    pub nodes: Vec<e2e::Host>,
    /// Index in `net.children` of each node's pool-managerd.
    pub node_children: Vec<usize>,
    pub base: String,
}

impl Cloud {
    async fn start(nodes: usize) -> Cloud {
        let mut net = e2e::Net::new();
        let orch_host = net.orchestrator_host();
        let hosts: Vec<e2e::Host> = (1..=nodes as u32)
            .map(|n| net.node_host(&orch_host, n))
            .collect();
        let mut env = net.cloud_orchestratord_env(&hosts);
        env.push(("ORCHD_POOL_POLL_INTERVAL_MS", "1000".into()));
        net.spawn_in(
            &orch_host.ns,
            &workspace_binary("orchestratord"),
            &env,
            &net.path("orchestratord.log"),
        );
        let mut node_children = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let pool = format!("{}0", (b'a' + i as u8) as char);
            node_children.push(e2e::start_node(
                &mut net,
                host,
                i,
                &[(pool.as_str(), "tiny", 1, 2048)],
                None,
            ));
        }
        let base = format!("http://{}:8080", orch_host.addr);
        wait_http_ok(
            "orchestratord across its link",
            &format!("{base}/health"),
            Duration::from_secs(20),
        )
        .await;
        Cloud {
            net,
            orch_host,
            nodes: hosts,
            node_children,
            base,
        }
    }

    /// Node `n` (1-based) as orchestratord knows it.
    pub fn node(&self, n: usize) -> &e2e::Host {
        &self.nodes[n - 1]
    }

    pub fn node_pid(&self, n: usize) -> u32 {
        self.net.children[self.node_children[n - 1]]
            .id()
            .expect("node process already reaped")
    }
}

/// The daemons of one set-up.
pub enum Daemons {
    Home(Home),
    Lone(Lone),
    Cloud(Cloud),
}

impl std::fmt::Debug for Daemons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Daemons::Home(h) => write!(f, "Home({})", h.base),
            Daemons::Lone(l) => write!(f, "Lone({})", l.base),
            Daemons::Cloud(c) => write!(f, "Cloud({})", c.base),
        }
    }
}

impl Daemons {
    /// orchestratord's base URL.
    pub fn base(&self) -> &str {
        match self {
            Daemons::Home(h) => &h.base,
            Daemons::Lone(l) => &l.base,
            Daemons::Cloud(c) => &c.base,
        }
    }

    pub fn home(&self) -> &Home {
        match self {
            Daemons::Home(h) => h,
            other => panic!("this step needs a HOME stack with pool-managerd, not {other:?}"),
        }
    }

    pub fn lone(&self) -> &Lone {
        match self {
            Daemons::Lone(l) => l,
            other => panic!("this step needs orchestratord alone, not {other:?}"),
        }
    }

    pub fn cloud(&self) -> &Cloud {
        match self {
            Daemons::Cloud(c) => c,
            other => panic!("this step needs a CLOUD cluster, not {other:?}"),
        }
    }

    /// orchestratord's log so far (for failure messages).
    pub fn orch_log(&self) -> String {
        let path = match self {
            Daemons::Home(h) => h.dir.path().join("orchestratord.log"),
            Daemons::Lone(l) => l.dir.path().join("orchestratord.log"),
            Daemons::Cloud(c) => c.net.path("orchestratord.log"),
        };
        std::fs::read_to_string(path).unwrap_or_default()
    }
}

/// What a scenario asks for; two scenarios asking for equal set-ups share the daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setup {
    Home {
        pools: Vec<PoolSpec>,
        orch_env: Vec<(String, String)>,
        /// Client keys, admin and node tokens apart instead of one shared token.
        separate_keys: bool,
    },
    Lone,
    Cloud {
        nodes: usize,
    },
}

struct Current {
    setup: Setup,
    daemons: Arc<Daemons>,
    spoiled: bool,
}

static CURRENT: tokio::sync::Mutex<Option<Current>> = tokio::sync::Mutex::const_new(None);

/// The daemons for `setup`: the running ones when they were started for an equal set-up and no
/// scenario spoiled them, else fresh ones (the previous ones stopped first).
pub async fn acquire(setup: Setup) -> Arc<Daemons> {
    let mut current = CURRENT.lock().await;
    if let Some(c) = current.as_ref() {
        if c.setup == setup && !c.spoiled {
            return c.daemons.clone();
        }
    }
    // Stops the previous daemons (kill on drop) before the new ones start.
    *current = None;
    let daemons = Arc::new(match &setup {
        Setup::Home {
            pools,
            orch_env,
            separate_keys,
        } => Daemons::Home(Home::start(pools, orch_env, *separate_keys).await),
        Setup::Lone => Daemons::Lone(Lone::start().await),
        Setup::Cloud { nodes } => Daemons::Cloud(Cloud::start(*nodes).await),
    });
    *current = Some(Current {
        setup,
        daemons: daemons.clone(),
        spoiled: false,
    });
    daemons
}

/// The next scenario must not reuse the current daemons (a scenario killed or drained part of
/// them, or failed and may have left them in any state).
pub async fn spoil() {
    if let Some(c) = CURRENT.lock().await.as_mut() {
        c.spoiled = true;
    }
}

/// Stops every daemon the suite started (at the end of the run).
pub async fn stop_all() {
    let current = CURRENT.lock().await.take();
    if let Some(c) = current {
        match Arc::try_unwrap(c.daemons) {
            Ok(d) => stop(d).await,
            Err(still_shared) => drop(still_shared),
        }
    }
}

async fn stop(d: Daemons) {
    match d {
        Daemons::Home(mut h) => {
            let _ = h.orch.start_kill();
            let _ = h.pm.start_kill();
            let _ = h.orch.wait().await;
            let _ = h.pm.wait().await;
        }
        Daemons::Lone(mut l) => {
            let _ = l.orch.start_kill();
            let _ = l.orch.wait().await;
        }
        // Net's drop kills its processes and deletes the namespaces.
        Daemons::Cloud(c) => drop(c),
    }
}
