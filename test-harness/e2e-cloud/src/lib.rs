//! A small network of our own for the CLOUD end-to-end tests: one namespace for orchestratord,
//! one per pool-managerd node, veth links between them, and a link from the test (root
//! namespace) to orchestratord. All addresses live only inside these namespaces. `Net` removes
//! namespaces, links and processes when dropped, also when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::process::{Child, Command};

pub use llorch_test_support::*;

pub const TOKEN: &str = "e2e-cloud-token-31f0c2a9d8b7";
const PREFIX: &str = "llorch-e2e";

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Namespaces left by a run that was killed before it could clean up.
pub fn remove_stale_namespaces() {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) {
            let pid: u32 = rest
                .split('-')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if pid != std::process::id() && !pid_alive(pid) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", name])
                    .status();
            }
        }
    }
}

pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        .unwrap();
    assert_eq!(
        uid, "0",
        "the CLOUD e2e tests build network namespaces and need root (run `make test` as root)"
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One test's network. `k` keeps subnets of concurrent tests apart.
pub struct Net {
    pub k: u32,
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    pub children: Vec<Child>,
}

pub struct Host {
    pub ns: String,
    /// Address other hosts reach this one at.
    pub addr: String,
    /// Name of this host's interface toward orchestratord (nodes) or toward the test (orch).
    pub ifname: String,
    /// orchestratord's address on this node's link.
    pub gateway: String,
}

impl Net {
    pub fn new() -> Net {
        require_root();
        remove_stale_namespaces();
        let k = NEXT.fetch_add(1, Ordering::SeqCst) + (std::process::id() % 40) * 5;
        Net {
            k: k % 200 + 1,
            dir: tempfile::tempdir().unwrap(),
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    fn ns_name(&self, role: &str) -> String {
        format!("{PREFIX}-{}-{}-{role}", std::process::id(), self.k)
    }

    fn add_ns(&mut self, role: &str) -> String {
        let ns = self.ns_name(role);
        sh(&["ip", "netns", "add", &ns]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// A veth pair `a`(in ns_a, addr_a) — `b`(in ns_b or the root namespace, addr_b).
    fn link(
        &self,
        a_ns: &str,
        a_if: &str,
        a_addr: &str,
        b_ns: Option<&str>,
        b_if: &str,
        b_addr: &str,
    ) {
        sh(&[
            "ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if,
        ]);
        sh(&["ip", "link", "set", a_if, "netns", a_ns]);
        sh(&["ip", "-n", a_ns, "addr", "add", a_addr, "dev", a_if]);
        sh(&["ip", "-n", a_ns, "link", "set", a_if, "up"]);
        match b_ns {
            Some(ns) => {
                sh(&["ip", "link", "set", b_if, "netns", ns]);
                sh(&["ip", "-n", ns, "addr", "add", b_addr, "dev", b_if]);
                sh(&["ip", "-n", ns, "link", "set", b_if, "up"]);
            }
            None => {
                sh(&["ip", "addr", "add", b_addr, "dev", b_if]);
                sh(&["ip", "link", "set", b_if, "up"]);
            }
        }
    }

    /// orchestratord's namespace, linked to the test's (root) namespace.
    pub fn orchestrator_host(&mut self) -> Host {
        let ns = self.add_ns("orch");
        let k = self.k;
        let (o_if, t_if) = (format!("ll{k}ot"), format!("ll{k}to"));
        self.link(
            &ns,
            &o_if,
            &format!("10.251.{k}.2/24"),
            None,
            &t_if,
            &format!("10.251.{k}.1/24"),
        );
        Host {
            ns,
            addr: format!("10.251.{k}.2"),
            ifname: o_if,
            gateway: String::new(),
        }
    }

    /// A node namespace `n` (1, 2, …) linked to orchestratord's namespace.
    pub fn node_host(&mut self, orch: &Host, n: u32) -> Host {
        let ns = self.add_ns(&format!("node{n}"));
        let k = self.k;
        let net = 251 + n;
        let (o_if, n_if) = (format!("ll{k}o{n}"), format!("ll{k}n{n}"));
        self.link(
            &orch.ns,
            &o_if,
            &format!("10.{net}.{k}.1/24"),
            Some(&ns),
            &n_if,
            &format!("10.{net}.{k}.2/24"),
        );
        Host {
            ns,
            addr: format!("10.{net}.{k}.2"),
            ifname: o_if,
            gateway: format!("10.{net}.{k}.1"),
        }
    }

    /// Starts `bin` inside `ns` with `env`, logging to `log`.
    pub fn spawn_in(&mut self, ns: &str, bin: &Path, env: &[(&str, String)], log: &Path) -> usize {
        let file = std::fs::File::create(log).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(bin)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::var_os("HOME").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("LLORCH_API_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.children.push(cmd.spawn().unwrap());
        self.children.len() - 1
    }

    /// orchestratord's environment in the CLOUD profile on the orchestrator host: listening on
    /// port 8080 of its namespace, its journal in this run's directory, polling the
    /// pool-managerd (port 9200) of every host in `nodes`.
    pub fn cloud_orchestratord_env(&self, nodes: &[Host]) -> Vec<(&'static str, String)> {
        let managers: Vec<String> = nodes
            .iter()
            .map(|h| format!("http://{}:9200", h.addr))
            .collect();
        vec![
            ("ORCHD_PROFILE", "cloud".to_string()),
            ("ORCHD_BIND_ADDR", "0.0.0.0:8080".into()),
            (
                "ORCHD_DATA_DIR",
                self.path("orchestratord-data").display().to_string(),
            ),
            ("ORCHD_POOL_MANAGERS", managers.join(",")),
        ]
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ip link set <ifname> up|down` inside orchestratord's namespace: a partition.
    pub fn set_link(&self, orch: &Host, node: &Host, up: bool) {
        sh(&[
            "ip",
            "-n",
            &orch.ns,
            "link",
            "set",
            &node.ifname,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.start_kill();
        }
        // Deleting a namespace removes its veth ends (and their peers).
        for ns in &self.namespaces {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
    }
}

/// A pool on a node: (pool id, model id, slots, ctx).
pub type PoolSpec<'a> = (&'a str, &'a str, u32, u32);

/// A pools file for `pools` (model id `tiny-slow` gets the slow model, others the tiny one).
pub fn pools_toml(pools: &[PoolSpec<'_>]) -> String {
    pools
        .iter()
        .map(|(id, model_id, slots, ctx)| {
            let model = if *model_id == "tiny-slow" { slow_model() } else { tiny_model() };
            format!(
                "[[pools]]\nid = \"{id}\"\nmodel = \"{}\"\nmodel_id = \"{model_id}\"\nslots = {slots}\nctx = {ctx}\nargs = [\"--threads\", \"1\"]\n",
                model.display()
            )
        })
        .collect()
}

/// Starts pool-managerd node `i` on `host` with `pools`, on port 9200 (`token`: its own, else
/// the cluster's); returns its index in `net.children`.
pub fn start_node(
    net: &mut Net,
    host: &Host,
    i: usize,
    pools: &[PoolSpec<'_>],
    token: Option<&str>,
) -> usize {
    let env: Vec<(&'static str, String)> = token
        .map(|t| ("LLORCH_API_TOKEN", t.to_string()))
        .into_iter()
        .collect();
    start_node_with(net, host, i, pools, &env)
}

/// [`start_node`] with more of pool-managerd's environment (`extra` wins).
pub fn start_node_with(
    net: &mut Net,
    host: &Host,
    i: usize,
    pools: &[PoolSpec<'_>],
    extra: &[(&'static str, String)],
) -> usize {
    std::fs::write(net.path(&format!("node{i}.toml")), pools_toml(pools)).unwrap();
    let mut env = pool_managerd_env(
        &net.path(&format!("node{i}.toml")),
        &net.path(&format!("node{i}-run")),
    );
    env.extend([
        ("POOL_MANAGERD_BIND_ADDR", format!("{}:9200", host.addr)),
        ("POOL_MANAGERD_NODE_ID", format!("node{i}")),
    ]);
    env.extend(extra.iter().cloned());
    net.spawn_in(
        &host.ns,
        &workspace_binary("pool-managerd"),
        &env,
        &net.path(&format!("node{i}.log")),
    )
}

/// Free slots of a pool as the pool-managerd on `host` reports them (asked inside its
/// namespace, on port 9200).
pub fn node_slots_free(host: &Host, pool: &str) -> Option<u64> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &host.ns, "curl", "-sf", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("http://{}:9200/v2/pools/{pool}/status", host.addr))
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["slots_free"].as_u64()
}
