//! Configuration: clap flags with `ORCHD_*` env names, validated once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use auth_min::Token;
use clap::Parser;
use llorch_core::AdmissionPolicy;

#[derive(Parser)]
#[command(
    name = "orchestratord",
    version,
    about = "llama-orch orchestrator (admission, queue, placement, SSE)"
)]
pub struct Args {
    /// Deployment profile: `home` (pools from the handoff directory) or `cloud`.
    #[arg(long, env = "ORCHD_PROFILE", default_value = "home")]
    pub profile: String,
    /// Address of the HTTP API.
    #[arg(long, env = "ORCHD_BIND_ADDR", default_value = "127.0.0.1:8080")]
    pub bind_addr: SocketAddr,
    /// A second port, on the bind address, serving only `/metrics`.
    #[arg(long, env = "ORCHD_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// HOME: the handoff directory pool-managerd writes (its POOL_MANAGERD_RUNTIME_DIR).
    #[arg(
        long,
        env = "ORCHD_RUNTIME_DIR",
        default_value = "/var/lib/llama-orch/runtime"
    )]
    pub runtime_dir: PathBuf,
    /// CLOUD: comma-separated pool-managerd base URLs to poll, each optionally named by its node
    /// id (`node-a=https://gpu-1:9200`): a named node is presented its own token from
    /// ORCHD_NODE_TOKENS_FILE, an unnamed one the shared node token.
    #[arg(long, env = "ORCHD_POOL_MANAGERS", default_value = "")]
    pub pool_managers: String,
    /// CLOUD: accept node registration (`POST /v2/nodes/register`) into the poll set.
    #[arg(long, env = "ORCHD_NODE_REGISTRATION", default_value_t = false, action = clap::ArgAction::Set)]
    pub node_registration: bool,
    /// CLOUD: most nodes registered at once; a new node id beyond it is refused (409) until
    /// one deregisters or is lost.
    #[arg(long, env = "ORCHD_MAX_NODES", default_value_t = 1024)]
    pub max_nodes: usize,
    /// CLOUD: interval of `GET /v2/pools` polls of every pool-managerd.
    #[arg(long, env = "ORCHD_POOL_POLL_INTERVAL_MS", default_value_t = 1000)]
    pub pool_poll_interval_ms: u64,
    /// CLOUD: consecutive good polls before a failed pool-managerd is used again.
    #[arg(long, env = "ORCHD_POOL_POLL_RECOVERY", default_value_t = 2)]
    pub pool_poll_recovery: u32,
    /// CLOUD: a registered node without a heartbeat for this long is offline.
    #[arg(
        long,
        env = "ORCHD_NODE_HEARTBEAT_TIMEOUT_MS",
        default_value_t = 15_000
    )]
    pub node_heartbeat_timeout_ms: u64,
    /// HOME: safety-net rescan interval of the handoff directory.
    #[arg(long, env = "ORCHD_HANDOFF_WATCH_INTERVAL_MS", default_value_t = 1000)]
    pub handoff_watch_interval_ms: u64,
    /// HOME: watch the handoff directory with the kernel's file events (inotify) as well as
    /// the rescan; `false` on filesystems whose writes the kernel does not report.
    #[arg(long, env = "ORCHD_HANDOFF_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub handoff_notify: bool,
    /// Interval of engine health probes of bound pools.
    #[arg(long, env = "ORCHD_POOL_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub pool_health_interval_ms: u64,
    /// HOME: pool-managerd URL for drain/reload forwarding.
    #[arg(
        long,
        env = "ORCHD_POOL_MANAGER_URL",
        default_value = "http://127.0.0.1:9200"
    )]
    pub pool_manager_url: String,
    /// Most tasks waiting in the queue.
    #[arg(long, env = "ORCHD_ADMISSION_CAPACITY", default_value_t = 1024)]
    pub admission_capacity: usize,
    /// What a full queue does: `reject` (429) or `drop-lru` (drop the oldest queued batch task).
    #[arg(long, env = "ORCHD_ADMISSION_POLICY", default_value = "reject")]
    pub admission_policy: String,
    /// Largest `max_tokens` a task may ask for.
    #[arg(long, env = "ORCHD_MAX_TOKENS_CAP", default_value_t = 8192)]
    pub max_tokens_cap: u32,
    /// Generation limit of an OpenAI request that sets neither `max_tokens` nor
    /// `max_completion_tokens` (at most ORCHD_MAX_TOKENS_CAP; default 1024, or the cap when
    /// that is lower).
    #[arg(long, env = "ORCHD_OPENAI_DEFAULT_MAX_TOKENS")]
    pub openai_default_max_tokens: Option<u32>,
    /// Largest request body.
    #[arg(long, env = "ORCHD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// HTTP connections served at once (more wait in the accept queue).
    #[arg(long, env = "ORCHD_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections one source address (an IPv6 /64) may hold before any of their requests
    /// presented a valid key; more are closed at once. Not applied without keys (every
    /// connection would count).
    #[arg(
        long,
        env = "ORCHD_MAX_UNAUTHENTICATED_PER_ADDRESS",
        default_value_t = 128
    )]
    pub max_unauthenticated_per_address: usize,
    /// CLOUD: a listener of its own for node registration and heartbeats (the node routes
    /// leave the API address): no client load can delay a heartbeat. Nodes then register at
    /// this address (POOL_MANAGERD_ORCHESTRATORD_URL).
    #[arg(long, env = "ORCHD_NODE_BIND_ADDR")]
    pub node_bind_addr: Option<SocketAddr>,
    /// Without ORCHD_NODE_BIND_ADDR: connections of ORCHD_MAX_CONNECTIONS kept for node
    /// registration and heartbeats; a connection accepted on them serves nothing else (429).
    #[arg(long, env = "ORCHD_NODE_RESERVED_CONNECTIONS", default_value_t = 64)]
    pub node_reserved_connections: usize,
    /// A response the client stops reading (an SSE stream, say) is cut after this long without
    /// progress, and its connection freed.
    #[arg(long, env = "ORCHD_STREAM_STALL_TIMEOUT_MS", default_value_t = 30_000)]
    pub stream_stall_timeout_ms: u64,
    /// Per-key metrics (`orchd_key_*`) carry each key's name; off, every key counts under
    /// `key="-"` (`/metrics` is open: it would name the keys and tell each one's volume).
    #[arg(long, env = "ORCHD_METRICS_KEY_LABELS", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_key_labels: bool,
    /// Cache-aware placement's prefix scope: `key` (a key's prompts match only its own earlier
    /// prompts, so placement tells no key what another's began with) or `global` (prefixes
    /// shared across keys: one operator's own clients).
    #[arg(long, env = "ORCHD_CACHE_SCOPE", default_value = "key")]
    pub cache_scope: String,
    /// Order within a priority class: `keys` (client keys take turns, one task each, FIFO
    /// within a key: one key's burst does not queue every other key behind it) or `fifo`
    /// (submission order across keys).
    #[arg(long, env = "ORCHD_QUEUE_FAIRNESS", default_value = "keys")]
    pub queue_fairness: String,
    /// Most event subscribers one task may have at once (429 beyond).
    #[arg(long, env = "ORCHD_MAX_SUBSCRIBERS_PER_TASK", default_value_t = 32)]
    pub max_subscribers_per_task: usize,
    /// Most streams (`/v2` event subscriptions and streamed `/v1` answers) one key may hold
    /// open at once, unless its line in the keys file says `conns=N` (429 beyond).
    #[arg(long, env = "ORCHD_KEY_MAX_STREAMS", default_value_t = 256)]
    pub key_max_streams: u32,
    /// Longest a client may take to send a request's headers.
    #[arg(long, env = "ORCHD_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send a request's body once its headers came (408 beyond).
    #[arg(long, env = "ORCHD_BODY_READ_TIMEOUT_MS", default_value_t = 30_000)]
    pub body_read_timeout_ms: u64,
    /// Longest a queued task waits for a pool before it fails with POOL_UNAVAILABLE.
    #[arg(long, env = "ORCHD_MAX_QUEUE_WAIT_MS", default_value_t = 300_000)]
    pub max_queue_wait_ms: u64,
    /// How long a model stays admissible after its last pool went away (its tasks queue
    /// meanwhile); after that, and at once when every pool serving it failed, new tasks for it
    /// get 503 MODEL_NOT_AVAILABLE. A restarting pool keeps its model admissible throughout.
    #[arg(long, env = "ORCHD_MODEL_MEMORY_MS", default_value_t = 30_000)]
    pub model_memory_ms: u64,
    /// Time allowed from dispatch to the first token (prompt processing included).
    #[arg(long, env = "ORCHD_FIRST_TOKEN_TIMEOUT_MS", default_value_t = 120_000)]
    pub first_token_timeout_ms: u64,
    /// Longest gap between two engine chunks before the task ends with DECODE_TIMEOUT.
    #[arg(long, env = "ORCHD_DECODE_TIMEOUT_MS", default_value_t = 30_000)]
    pub decode_timeout_ms: u64,
    /// Cancel a task when its last SSE subscriber disconnects.
    #[arg(long, env = "ORCHD_CANCEL_ON_DISCONNECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub cancel_on_disconnect: bool,
    /// How long a task whose last `/v2` event subscriber left waits for one to come back
    /// (resuming with `Last-Event-ID`) before it is cancelled; 0 cancels at once.
    #[arg(long, env = "ORCHD_DISCONNECT_GRACE_MS", default_value_t = 15_000)]
    pub disconnect_grace_ms: u64,
    /// Session TTL (KV affinity).
    #[arg(long, env = "ORCHD_SESSION_TTL_MS", default_value_t = 600_000)]
    pub session_ttl_ms: u64,
    /// How long finished tasks stay readable (status and SSE replay).
    #[arg(long, env = "ORCHD_TASK_RETENTION_MS", default_value_t = 600_000)]
    pub task_retention_ms: u64,
    /// Most finished tasks kept (the oldest are forgotten first).
    #[arg(long, env = "ORCHD_TASK_RETENTION_MAX", default_value_t = 10_000)]
    pub task_retention_max: usize,
    /// Most bytes of event log (and OpenAI chunks) the finished tasks keep together; the
    /// oldest are forgotten first.
    #[arg(long, env = "ORCHD_TASK_RETENTION_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub task_retention_bytes: usize,
    /// Most bytes of event log one task keeps for replay: beyond it the oldest frames are
    /// dropped (a replay that asks for them is answered `REPLAY_UNAVAILABLE`, 410).
    #[arg(long, env = "ORCHD_TASK_LOG_MAX_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub task_log_max_bytes: usize,
    /// SSE keep-alive comment interval.
    #[arg(long, env = "ORCHD_SSE_KEEPALIVE_MS", default_value_t = 15_000)]
    pub sse_keepalive_ms: u64,
    /// On SIGTERM: how long running tasks may finish before they are ended with an error.
    #[arg(long, env = "ORCHD_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Shared API token (prefer the _FILE form).
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// File holding the API token; refused when readable by group or others.
    #[arg(long, env = "LLORCH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The admin token: drain, reload, nodes, everyone's tasks.
    #[arg(long, env = "LLORCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    #[arg(long, env = "LLORCH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The node token: registration and heartbeats in, polls, proxy and control out.
    #[arg(long, env = "LLORCH_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
    #[arg(long, env = "LLORCH_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,
    /// Per-node tokens, one `node_id:secret` per line: each binds a node id to its own secret
    /// (that node registers and heartbeats only with it; no other key can take the id).
    #[arg(long, env = "ORCHD_NODE_TOKENS_FILE")]
    pub node_tokens_file: Option<PathBuf>,
    /// Client keys, one `name:secret` per line; re-read on SIGHUP.
    #[arg(long, env = "ORCHD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// HTTPS: this daemon's certificate chain (PEM), with ORCHD_TLS_KEY_FILE; both re-read on
    /// SIGHUP.
    #[arg(long, env = "ORCHD_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS: the certificate's private key (PEM); refused when group or others may read it.
    #[arg(long, env = "ORCHD_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Mutual TLS for nodes: registration and heartbeats need a client certificate that chains
    /// to this CA (other clients need none).
    #[arg(long, env = "ORCHD_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// The CA pool-managerd's certificates are verified against (https:// node URLs); the
    /// system's roots when unset.
    #[arg(long, env = "LLORCH_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// Allow clients without a token, only when bound to loopback.
    #[arg(
        long,
        env = "ORCHD_ALLOW_UNAUTHENTICATED_LOOPBACK",
        default_value_t = false
    )]
    pub allow_unauthenticated_loopback: bool,
    /// Log format: `pretty` or `json`.
    #[arg(long, env = "ORCHD_LOG_FORMAT", default_value = "pretty")]
    pub log_format: String,
    /// Threads of the async runtime (default: one per core).
    #[arg(long, env = "ORCHD_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Cache-aware placement: a task goes to the pool that recently served the longest prefix
    /// of its prompt (its engine's prompt cache likely still holds it).
    #[arg(long, env = "ORCHD_CACHE_AWARE", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_aware: bool,
    /// ... while that pool has at most this many more requests in flight than the least busy
    /// candidate; beyond, the least busy one takes the task.
    #[arg(long, env = "ORCHD_CACHE_BALANCE", default_value_t = 2)]
    pub cache_balance: u32,
    /// Prompt blocks (64 bytes each) remembered per pool for cache-aware placement.
    #[arg(long, env = "ORCHD_PREFIX_INDEX_BLOCKS", default_value_t = 65_536)]
    pub prefix_index_blocks: usize,
    /// The admission journal: `sqlite` (a file in ORCHD_DATA_DIR: admissions survive a crash)
    /// or `none` (in memory only).
    #[arg(long, env = "ORCHD_JOURNAL", default_value = "sqlite")]
    pub journal: String,
    /// Where the journal lives (default: $STATE_DIRECTORY under systemd, else
    /// $XDG_STATE_HOME/llama-orch, else ~/.local/state/llama-orch). Not the handoff runtime
    /// directory.
    #[arg(long, env = "ORCHD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `full`: each commit reaches the disk (survives power loss); `normal`: survives a crash
    /// of the process.
    #[arg(long, env = "ORCHD_JOURNAL_SYNC", default_value = "full")]
    pub journal_sync: String,
    /// How long finished tasks are remembered for idempotent resubmission (as digests).
    #[arg(long, env = "ORCHD_JOURNAL_DEDUPE_MS", default_value_t = 86_400_000)]
    pub journal_dedupe_ms: u64,
    /// The journal file's bound; beyond it the oldest finished tasks are forgotten first.
    #[arg(long, env = "ORCHD_JOURNAL_MAX_BYTES", default_value_t = 1 << 30)]
    pub journal_max_bytes: u64,
    /// Longest an admission waits for the journal; past it the client gets a retriable 503.
    #[arg(long, env = "ORCHD_JOURNAL_TIMEOUT_MS", default_value_t = 2000)]
    pub journal_timeout_ms: u64,
    /// After a restart, how long recovered tasks wait for their clients to reconnect before
    /// disconnect-cancel applies to them.
    #[arg(long, env = "ORCHD_RECOVERY_REATTACH_MS", default_value_t = 60_000)]
    pub recovery_reattach_ms: u64,
}

/// Where the journal is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JournalSetting {
    None,
    Sqlite {
        dir: PathBuf,
        sync: crate::journal::SyncMode,
    },
}

/// The default data directory: systemd's `StateDirectory=`, else the XDG state home.
fn default_data_dir() -> Option<PathBuf> {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("STATE_DIRECTORY")
        .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("llama-orch")))
        .or_else(|| var("HOME").map(|h| h.join(".local/state/llama-orch")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Home,
    Cloud,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Home => "home",
            Profile::Cloud => "cloud",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub profile: Profile,
    /// CLOUD: pool-managerd base URLs from configuration, with the node id the operator gave.
    pub pool_managers: Vec<(Option<String>, String)>,
    pub node_registration: bool,
    /// Most nodes registered at once (ORCHD_MAX_NODES).
    pub max_nodes: usize,
    pub pool_poll_interval: Duration,
    pub pool_poll_recovery: u32,
    pub node_heartbeat_timeout: Duration,
    pub bind_addr: SocketAddr,
    /// The metrics port's address (the bind address's IP), when one is configured.
    pub metrics_addr: Option<SocketAddr>,
    pub runtime_dir: PathBuf,
    pub handoff_rescan: Duration,
    /// ORCHD_HANDOFF_NOTIFY: kernel file events besides the rescan.
    pub handoff_notify: bool,
    pub pool_health_interval: Duration,
    pub pool_manager_url: String,
    pub admission_capacity: usize,
    pub admission_policy: AdmissionPolicy,
    pub max_tokens_cap: u32,
    pub openai_default_max_tokens: u32,
    pub max_body_bytes: usize,
    pub conn_limits: llorch_http::ConnLimits,
    /// CLOUD: the node routes' own listener (ORCHD_NODE_BIND_ADDR).
    pub node_bind_addr: Option<SocketAddr>,
    pub max_subscribers_per_task: usize,
    pub metrics_key_labels: bool,
    /// ORCHD_CACHE_SCOPE=global: prefixes match across keys.
    pub cache_scope_global: bool,
    /// ORCHD_QUEUE_FAIRNESS=keys: client keys take turns within a priority class.
    pub fair_share: bool,
    /// Most open streams of a key without `conns=`.
    pub key_max_streams: u32,
    pub max_queue_wait: Duration,
    pub model_memory: Duration,
    pub first_token_timeout: Duration,
    pub decode_timeout: Duration,
    pub cancel_on_disconnect: bool,
    pub disconnect_grace: Duration,
    pub session_ttl: Duration,
    pub task_retention: Duration,
    pub task_retention_max: usize,
    pub task_retention_bytes: usize,
    pub task_log_max_bytes: usize,
    pub sse_keepalive: Duration,
    pub shutdown_grace: Duration,
    /// The node credential this daemon presents to pool-managerd (the node token, else the
    /// shared one).
    pub token: Option<Token>,
    /// Every key it accepts, with its role (none: no authentication, loopback only).
    pub keys: llorch_http::Keys,
    /// Where the client keys come from (re-read on SIGHUP).
    pub api_keys_file: Option<PathBuf>,
    /// Only the shared token is set: it is client, admin and node credential at once.
    pub one_token_for_all: bool,
    /// What orchestratord presents to each node: node ids bound to their own tokens
    /// (ORCHD_NODE_TOKENS_FILE; only that token speaks for them, and only it is presented to
    /// them), else the shared node token.
    pub node_credentials: crate::cloud_source::NodeCredentials,
    /// HTTPS, when a certificate and key are set.
    pub tls: Option<std::sync::Arc<llorch_http::tls::ServerTls>>,
    /// How pool-managerd is reached over https:// (the CA it is verified against).
    pub client_tls: llorch_http::tls::ClientTls,
    pub json_logs: bool,
    /// Threads of the async runtime (`None`: one per core).
    pub worker_threads: Option<usize>,
    /// Cache-aware placement's balance (`None`: off).
    pub cache_balance: Option<u32>,
    pub prefix_index_blocks: usize,
    pub journal: JournalSetting,
    pub journal_dedupe: Duration,
    pub journal_max_bytes: u64,
    pub journal_timeout: Duration,
    pub recovery_reattach: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Auth(#[from] auth_min::AuthConfigError),
    #[error(transparent)]
    Tls(#[from] llorch_http::tls::TlsError),
}

/// Variables renamed since the migration plan, still read under their old names
/// (`llorch_http::env_alias`): deprecated, logged at start.
pub const ENV_ALIASES: &[llorch_http::env_alias::EnvAlias] = &[llorch_http::env_alias::EnvAlias {
    old: "PROMETHEUS_METRICS_PORT",
    new: "ORCHD_METRICS_PORT",
}];

/// Principal names a client key may not take: they name the other credentials.
const RESERVED_NAMES: &[&str] = &["shared", "admin", "node", "anonymous"];

/// The keys orchestratord accepts: the shared token (every role), the admin token (admin and
/// client routes), the node token, and the client keys. `None` when none is set.
pub(crate) fn keyring(
    shared: Option<Token>,
    admin: Option<Token>,
    node: Option<Token>,
    nodes: Vec<(String, Token)>,
    clients: Vec<(String, Token, auth_min::KeyLimits)>,
) -> Result<llorch_http::Keys, ConfigError> {
    use auth_min::{Principal, Role};
    let mut ring = auth_min::Keyring::default();
    if let Some(t) = shared {
        ring.add(Principal::everything("shared"), t)?;
    }
    if let Some(t) = admin {
        ring.add(Principal::new("admin", &[Role::Admin, Role::Client]), t)?;
    }
    if let Some(t) = node {
        ring.add(Principal::new("node", &[Role::Node]), t)?;
    }
    for (id, t) in nodes {
        ring.add(Principal::for_node(&id), t)?;
    }
    add_clients(&mut ring, clients)?;
    Ok((!ring.is_empty()).then(|| std::sync::Arc::new(std::sync::RwLock::new(ring))))
}

/// Adds the client keys of the keys file (a name of the other credentials is refused).
fn add_clients(
    ring: &mut auth_min::Keyring,
    clients: Vec<(String, Token, auth_min::KeyLimits)>,
) -> Result<(), ConfigError> {
    use auth_min::{Principal, Role};
    for (name, t, limits) in clients {
        if RESERVED_NAMES.contains(&name.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "ORCHD_API_KEYS_FILE: the key name {name:?} is reserved ({})",
                RESERVED_NAMES.join(", ")
            )));
        }
        ring.add(
            Principal::new(&name, &[Role::Client]).with_limits(limits),
            t,
        )?;
    }
    Ok(())
}

/// Reads the client keys file again into `keys` (SIGHUP): the new client keys replace the old
/// ones; the shared, admin and node tokens stay. On any error nothing changes.
pub(crate) fn reload_client_keys(
    keys: &llorch_http::Keys,
    path: &std::path::Path,
) -> Result<usize, ConfigError> {
    let Some(keys) = keys else {
        return Err(ConfigError::Invalid("no keys to reload".into()));
    };
    let clients = auth_min::load_keys_file(path)?;
    let mut next = keys
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    next.retain(|p| RESERVED_NAMES.contains(&&*p.name) || p.node.is_some());
    let n = clients.len();
    add_clients(&mut next, clients)?;
    *keys
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
    Ok(n)
}

/// The per-node tokens file: `node_id:secret` lines (a keys file without limits).
fn node_tokens(path: &std::path::Path) -> Result<Vec<(String, Token)>, ConfigError> {
    let mut out = Vec::new();
    for (id, token, limits) in auth_min::load_keys_file(path)? {
        if !limits.is_none() {
            return Err(ConfigError::Invalid(format!(
                "ORCHD_NODE_TOKENS_FILE: node {id:?} has limits; node tokens take none"
            )));
        }
        out.push((id, token));
    }
    Ok(out)
}

fn ms(name: &str, v: u64) -> Result<Duration, ConfigError> {
    llorch_http::positive_ms(name, v).map_err(ConfigError::Invalid)
}

impl Config {
    pub fn from_args(a: Args) -> Result<Self, ConfigError> {
        let profile = match a.profile.as_str() {
            "home" => Profile::Home,
            "cloud" => Profile::Cloud,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_PROFILE {other:?} is not one of: home, cloud"
                )))
            }
        };
        let pool_managers =
            parse_managers(&a.pool_managers, node_schemes(a.tls_cert_file.is_some()))?;
        if profile == Profile::Cloud && pool_managers.is_empty() && !a.node_registration {
            return Err(ConfigError::Invalid(
                "ORCHD_PROFILE=cloud needs ORCHD_POOL_MANAGERS (comma-separated pool-managerd URLs) or ORCHD_NODE_REGISTRATION=true".into(),
            ));
        }
        if profile == Profile::Home && (!pool_managers.is_empty() || a.node_registration) {
            return Err(ConfigError::Invalid(
                "ORCHD_POOL_MANAGERS and ORCHD_NODE_REGISTRATION need ORCHD_PROFILE=cloud".into(),
            ));
        }
        if let Some(node_addr) = a.node_bind_addr {
            if profile == Profile::Home {
                return Err(ConfigError::Invalid(
                    "ORCHD_NODE_BIND_ADDR needs ORCHD_PROFILE=cloud (nodes register only there)"
                        .into(),
                ));
            }
            // Two listeners on port 0 get two ports of the kernel's.
            if node_addr == a.bind_addr && node_addr.port() != 0 {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_NODE_BIND_ADDR {node_addr} is ORCHD_BIND_ADDR: give the node routes another port"
                )));
            }
        }
        if profile == Profile::Cloud
            && a.node_bind_addr.is_none()
            && a.node_reserved_connections >= a.max_connections
        {
            return Err(ConfigError::Invalid(format!(
                "ORCHD_NODE_RESERVED_CONNECTIONS ({}) must be below ORCHD_MAX_CONNECTIONS ({}): clients need connections too",
                a.node_reserved_connections, a.max_connections
            )));
        }
        let admission_policy = match a.admission_policy.as_str() {
            "reject" => AdmissionPolicy::Reject,
            "drop-lru" => AdmissionPolicy::DropLru,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_ADMISSION_POLICY {other:?} is not one of: reject, drop-lru"
                )))
            }
        };
        let json_logs = llorch_http::parse_log_format("ORCHD_LOG_FORMAT", &a.log_format)
            .map_err(ConfigError::Invalid)?;
        if a.admission_capacity == 0 {
            return Err(ConfigError::Invalid(
                "ORCHD_ADMISSION_CAPACITY must be at least 1".into(),
            ));
        }
        if a.max_tokens_cap == 0 {
            return Err(ConfigError::Invalid(
                "ORCHD_MAX_TOKENS_CAP must be at least 1".into(),
            ));
        }
        let openai_default_max_tokens = match a.openai_default_max_tokens {
            None => a.max_tokens_cap.min(1024),
            Some(n) if n == 0 || n > a.max_tokens_cap => {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_OPENAI_DEFAULT_MAX_TOKENS must be between 1 and ORCHD_MAX_TOKENS_CAP ({}), got {n}",
                    a.max_tokens_cap
                )))
            }
            Some(n) => n,
        };
        if !is_http_url(&a.pool_manager_url) {
            return Err(ConfigError::Invalid(format!(
                "ORCHD_POOL_MANAGER_URL {:?} must start with http:// or https://",
                a.pool_manager_url
            )));
        }
        let tls = llorch_http::tls::ServerTlsFiles::from_settings(
            ("ORCHD_TLS_CERT_FILE", a.tls_cert_file),
            ("ORCHD_TLS_KEY_FILE", a.tls_key_file),
            a.tls_client_ca_file.clone(),
        )?;
        if tls.is_none() && a.tls_client_ca_file.is_some() {
            return Err(ConfigError::Invalid(
                "ORCHD_TLS_CLIENT_CA_FILE needs ORCHD_TLS_CERT_FILE and ORCHD_TLS_KEY_FILE (mutual TLS is TLS first)".into(),
            ));
        }
        let tls = match tls {
            Some(files) => Some(std::sync::Arc::new(llorch_http::tls::ServerTls::load(
                files,
            )?)),
            None => None,
        };
        let client_tls = llorch_http::tls::ClientTls::load(a.tls_ca_file.as_deref(), None)?;
        let shared = auth_min::load_token(a.api_token.as_deref(), a.api_token_file.as_deref())?;
        let admin = auth_min::load_token_as(
            "LLORCH_ADMIN_TOKEN",
            a.admin_token.as_deref(),
            a.admin_token_file.as_deref(),
        )?;
        let node = auth_min::load_token_as(
            "LLORCH_NODE_TOKEN",
            a.node_token.as_deref(),
            a.node_token_file.as_deref(),
        )?;
        let clients = match &a.api_keys_file {
            Some(path) => auth_min::load_keys_file(path)?,
            None => Vec::new(),
        };
        let nodes = match &a.node_tokens_file {
            Some(path) => node_tokens(path)?,
            None => Vec::new(),
        };
        let one_token_for_all = shared.is_some()
            && admin.is_none()
            && node.is_none()
            && nodes.is_empty()
            && clients.is_empty();
        let token = node.clone().or_else(|| shared.clone());
        let node_credentials = crate::cloud_source::NodeCredentials {
            per_node: nodes.iter().cloned().collect(),
            shared: token.clone(),
        };
        if profile == Profile::Cloud && token.is_none() {
            return Err(ConfigError::Invalid(
                "ORCHD_PROFILE=cloud needs a node token (LLORCH_NODE_TOKEN, or LLORCH_API_TOKEN, or their _FILE forms): pool-managerd and nodes authenticate with it".into(),
            ));
        }
        let any = shared
            .clone()
            .or_else(|| admin.clone())
            .or_else(|| node.clone())
            .or_else(|| clients.first().map(|(_, t, _)| t.clone()));
        auth_min::check_bind(a.bind_addr, any.as_ref(), a.allow_unauthenticated_loopback)?;
        let keys = keyring(shared, admin, node, nodes, clients)?;
        let per_address_unauthenticated = match keys {
            Some(_) => llorch_http::at_least(
                "ORCHD_MAX_UNAUTHENTICATED_PER_ADDRESS",
                a.max_unauthenticated_per_address,
                1,
            )
            .map_err(ConfigError::Invalid)?,
            None => 0,
        };
        Ok(Config {
            profile,
            pool_managers,
            node_registration: a.node_registration,
            max_nodes: llorch_http::at_least("ORCHD_MAX_NODES", a.max_nodes, 1)
                .map_err(ConfigError::Invalid)?,
            pool_poll_interval: ms("ORCHD_POOL_POLL_INTERVAL_MS", a.pool_poll_interval_ms)?,
            pool_poll_recovery: llorch_http::at_least(
                "ORCHD_POOL_POLL_RECOVERY",
                a.pool_poll_recovery,
                1,
            )
            .map_err(ConfigError::Invalid)?,
            node_heartbeat_timeout: ms(
                "ORCHD_NODE_HEARTBEAT_TIMEOUT_MS",
                a.node_heartbeat_timeout_ms,
            )?,
            bind_addr: a.bind_addr,
            metrics_addr: llorch_http::metrics_port::address(
                "ORCHD_METRICS_PORT",
                a.bind_addr,
                a.metrics_port,
            )
            .map_err(ConfigError::Invalid)?,
            runtime_dir: a.runtime_dir,
            handoff_rescan: ms(
                "ORCHD_HANDOFF_WATCH_INTERVAL_MS",
                a.handoff_watch_interval_ms,
            )?,
            handoff_notify: a.handoff_notify,
            pool_health_interval: ms("ORCHD_POOL_HEALTH_INTERVAL_MS", a.pool_health_interval_ms)?,
            pool_manager_url: a.pool_manager_url.trim_end_matches('/').to_string(),
            admission_capacity: a.admission_capacity,
            admission_policy,
            max_tokens_cap: a.max_tokens_cap,
            openai_default_max_tokens,
            max_body_bytes: llorch_http::at_least("ORCHD_MAX_BODY_BYTES", a.max_body_bytes, 1024)
                .map_err(ConfigError::Invalid)?,
            conn_limits: llorch_http::ConnLimits {
                max_connections: llorch_http::at_least(
                    "ORCHD_MAX_CONNECTIONS",
                    a.max_connections,
                    1,
                )
                .map_err(ConfigError::Invalid)?,
                // With a node listener of its own, the API address keeps nothing back.
                reserved: if a.node_bind_addr.is_some() || profile == Profile::Home {
                    0
                } else {
                    a.node_reserved_connections
                },
                header_read_timeout: ms("ORCHD_HEADER_READ_TIMEOUT_MS", a.header_read_timeout_ms)?,
                body_read_timeout: ms("ORCHD_BODY_READ_TIMEOUT_MS", a.body_read_timeout_ms)?,
                per_address_unauthenticated,
                write_stall_timeout: ms(
                    "ORCHD_STREAM_STALL_TIMEOUT_MS",
                    a.stream_stall_timeout_ms,
                )?,
            },
            node_bind_addr: a.node_bind_addr,
            metrics_key_labels: a.metrics_key_labels,
            cache_scope_global: match a.cache_scope.as_str() {
                "key" => false,
                "global" => true,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "ORCHD_CACHE_SCOPE {other:?} is not one of: key, global"
                    )))
                }
            },
            fair_share: match a.queue_fairness.as_str() {
                "keys" => true,
                "fifo" => false,
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "ORCHD_QUEUE_FAIRNESS {other:?} is not one of: keys, fifo"
                    )))
                }
            },
            max_subscribers_per_task: llorch_http::at_least(
                "ORCHD_MAX_SUBSCRIBERS_PER_TASK",
                a.max_subscribers_per_task,
                1,
            )
            .map_err(ConfigError::Invalid)?,
            key_max_streams: llorch_http::at_least("ORCHD_KEY_MAX_STREAMS", a.key_max_streams, 1)
                .map_err(ConfigError::Invalid)?,
            max_queue_wait: ms("ORCHD_MAX_QUEUE_WAIT_MS", a.max_queue_wait_ms)?,
            model_memory: Duration::from_millis(a.model_memory_ms),
            first_token_timeout: ms("ORCHD_FIRST_TOKEN_TIMEOUT_MS", a.first_token_timeout_ms)?,
            decode_timeout: ms("ORCHD_DECODE_TIMEOUT_MS", a.decode_timeout_ms)?,
            cancel_on_disconnect: a.cancel_on_disconnect,
            disconnect_grace: Duration::from_millis(a.disconnect_grace_ms),
            session_ttl: ms("ORCHD_SESSION_TTL_MS", a.session_ttl_ms)?,
            task_retention: ms("ORCHD_TASK_RETENTION_MS", a.task_retention_ms)?,
            task_retention_max: a.task_retention_max,
            task_retention_bytes: a.task_retention_bytes,
            task_log_max_bytes: llorch_http::at_least(
                "ORCHD_TASK_LOG_MAX_BYTES",
                a.task_log_max_bytes,
                4096,
            )
            .map_err(ConfigError::Invalid)?,
            sse_keepalive: ms("ORCHD_SSE_KEEPALIVE_MS", a.sse_keepalive_ms)?,
            shutdown_grace: Duration::from_millis(a.shutdown_grace_ms),
            token,
            keys,
            api_keys_file: a.api_keys_file,
            one_token_for_all,
            node_credentials,
            tls,
            client_tls,
            json_logs,
            cache_balance: a.cache_aware.then_some(a.cache_balance),
            prefix_index_blocks: llorch_http::at_least(
                "ORCHD_PREFIX_INDEX_BLOCKS",
                a.prefix_index_blocks,
                16,
            )
            .map_err(ConfigError::Invalid)?,
            journal: match a.journal.as_str() {
                "none" => JournalSetting::None,
                "sqlite" => JournalSetting::Sqlite {
                    dir: a.data_dir.or_else(default_data_dir).ok_or_else(|| {
                        ConfigError::Invalid(
                            "ORCHD_JOURNAL=sqlite needs ORCHD_DATA_DIR (no HOME to default to)"
                                .into(),
                        )
                    })?,
                    sync: crate::journal::SyncMode::parse(&a.journal_sync)
                        .map_err(|e| ConfigError::Invalid(e.to_string()))?,
                },
                other => {
                    return Err(ConfigError::Invalid(format!(
                        "ORCHD_JOURNAL {other:?} is not one of: sqlite, none"
                    )))
                }
            },
            journal_dedupe: ms("ORCHD_JOURNAL_DEDUPE_MS", a.journal_dedupe_ms)?,
            journal_max_bytes: llorch_http::at_least(
                "ORCHD_JOURNAL_MAX_BYTES",
                a.journal_max_bytes,
                1 << 20,
            )
            .map_err(ConfigError::Invalid)?,
            journal_timeout: ms("ORCHD_JOURNAL_TIMEOUT_MS", a.journal_timeout_ms)?,
            recovery_reattach: Duration::from_millis(a.recovery_reattach_ms),
            worker_threads: match a.worker_threads {
                Some(0) => {
                    return Err(ConfigError::Invalid(
                        "ORCHD_WORKER_THREADS must be at least 1".into(),
                    ))
                }
                n => n,
            },
        })
    }
}

/// Whether `url` is an http:// or https:// URL (the schemes the daemons speak).
pub fn is_http_url(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// The schemes a node's address may use: `https` only while this daemon serves TLS (a node's
/// token must not cross the network in clear text when the operator asked for TLS).
pub fn node_schemes(tls: bool) -> llorch_contracts::address::Schemes {
    if tls {
        llorch_contracts::address::Schemes::HttpsOnly
    } else {
        llorch_contracts::address::Schemes::Any
    }
}

fn parse_managers(
    list: &str,
    schemes: llorch_contracts::address::Schemes,
) -> Result<Vec<(Option<String>, String)>, ConfigError> {
    let mut out: Vec<(Option<String>, String)> = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        // `id=url`: the '=' before any "://" names the node.
        let (id, raw) = match entry.split_once('=') {
            Some((id, url)) if !id.contains("://") => (Some(id.trim().to_string()), url.trim()),
            _ => (None, entry),
        };
        if let Some(id) = &id {
            if !llorch_contracts::handoff::is_valid_pool_id(id) {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_POOL_MANAGERS entry {entry:?}: node id {id:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
                )));
            }
            if out.iter().any(|(other, _)| other.as_ref() == Some(id)) {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_POOL_MANAGERS names node {id:?} twice"
                )));
            }
        }
        let url = llorch_contracts::address::base_url(raw, schemes).map_err(|reason| {
            ConfigError::Invalid(format!(
                "ORCHD_POOL_MANAGERS entry {entry:?} must be an http:// or https:// base URL: {reason}"
            ))
        })?;
        match out.iter().find(|(_, u)| *u == url) {
            Some((other, _)) if *other != id => {
                return Err(ConfigError::Invalid(format!(
                    "ORCHD_POOL_MANAGERS lists {url} twice under different node ids"
                )))
            }
            Some(_) => {}
            None => out.push((id, url)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: OBS-6119
    #[test]
    fn every_variable_of_the_migration_plan_is_read() {
        use clap::CommandFactory;
        let aliases: Vec<&str> = ENV_ALIASES.iter().map(|a| a.old).collect();
        llorch_test_support::assert_migration_plan_read(
            "orchestratord",
            Args::command(),
            &aliases,
            llorch_observability::ENV_READ,
        );
    }

    fn parse(env: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["orchestratord"];
        argv.extend_from_slice(env);
        Config::from_args(
            Args::try_parse_from(argv).map_err(|e| ConfigError::Invalid(e.to_string()))?,
        )
    }

    #[test]
    fn openai_default_limit_follows_the_cap_unless_set() {
        let token = "--api-token=0123456789abcdef0123";
        assert_eq!(parse(&[token]).unwrap().openai_default_max_tokens, 1024);
        let low = parse(&[token, "--max-tokens-cap=512"]).unwrap();
        assert_eq!(low.openai_default_max_tokens, 512);
        let set = parse(&[token, "--openai-default-max-tokens=64"]).unwrap();
        assert_eq!(set.openai_default_max_tokens, 64);
        let e = parse(&[
            token,
            "--max-tokens-cap=512",
            "--openai-default-max-tokens=600",
        ])
        .unwrap_err();
        assert!(
            e.to_string().contains("ORCHD_OPENAI_DEFAULT_MAX_TOKENS"),
            "{e}"
        );
        assert!(parse(&[token, "--openai-default-max-tokens=0"]).is_err());
    }

    // covers: CLOUD-4101, CLOUD-4117
    #[test]
    fn cloud_needs_managers_or_registration_and_a_token() {
        let token = "--api-token=0123456789abcdef0123";
        let e = parse(&["--profile=cloud", token]).unwrap_err();
        assert!(e.to_string().contains("ORCHD_POOL_MANAGERS"), "{e}");
        let e = parse(&["--profile=cloud", "--pool-managers=http://10.0.0.2:9200"]).unwrap_err();
        assert!(e.to_string().contains("needs a node token"), "{e}");
        let c = parse(&[
            "--profile=cloud",
            token,
            "--pool-managers=http://a:9200/, http://b:9200,http://a:9200",
        ])
        .unwrap();
        let urls = |c: &Config| {
            c.pool_managers
                .iter()
                .map(|(_, u)| u.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(urls(&c), vec!["http://a:9200", "http://b:9200"]);
        assert!(parse(&["--profile=cloud", token, "--node-registration=true"]).is_ok());
        assert!(parse(&["--profile=cloud", token, "--pool-managers=ftp://a"]).is_err());
        let c = parse(&["--profile=cloud", token, "--pool-managers=https://a:9200"]).unwrap();
        assert_eq!(urls(&c), vec!["https://a:9200"]);
        // Named managers; and while TLS is on (what node_schemes(true) says), https only.
        let c = parse(&[
            "--profile=cloud",
            token,
            "--pool-managers=node-a=http://A:9200/",
        ])
        .unwrap();
        assert_eq!(
            c.pool_managers,
            vec![(Some("node-a".to_string()), "http://a:9200".to_string())]
        );
        assert!(parse_managers("http://a:9200", node_schemes(true)).is_err());
        assert!(parse_managers("https://a:9200", node_schemes(true)).is_ok());
        assert!(parse_managers("bad id!=http://a:9200", node_schemes(false)).is_err());
        assert!(parse_managers("a=http://x,a=http://y", node_schemes(false)).is_err());
        let e = parse(&[token, "--pool-managers=http://a:9200"]).unwrap_err();
        assert!(e.to_string().contains("ORCHD_PROFILE=cloud"), "{e}");
        assert!(parse(&["--profile=space", token]).is_err());
    }

    // covers: AUTH-5114
    #[test]
    fn out_of_range_values_are_refused_with_the_variable_name_not_clamped() {
        let token = "--api-token=0123456789abcdef0123";
        for (flag, name) in [
            (
                "--max-body-bytes=10",
                "ORCHD_MAX_BODY_BYTES must be at least 1024 (got 10)",
            ),
            (
                "--pool-poll-recovery=0",
                "ORCHD_POOL_POLL_RECOVERY must be at least 1",
            ),
            (
                "--decode-timeout-ms=0",
                "ORCHD_DECODE_TIMEOUT_MS must be greater than 0",
            ),
        ] {
            let e = parse(&[token, flag]).unwrap_err();
            assert!(e.to_string().contains(name), "{flag}: {e}");
        }
        assert_eq!(
            parse(&[token, "--max-body-bytes=1024"])
                .unwrap()
                .max_body_bytes,
            1024
        );
    }

    #[test]
    fn every_old_variable_name_is_accepted_and_lands_on_its_new_setting() {
        use clap::FromArgMatches;
        for alias in ENV_ALIASES {
            let (cmd, in_use) = llorch_http::env_alias::command_with::<Args>(ENV_ALIASES, |v| {
                (v == alias.old).then(|| "9464".into())
            })
            .unwrap();
            assert_eq!(in_use, vec![*alias]);
            let m = cmd
                .try_get_matches_from(["orchestratord", "--api-token=0123456789abcdef0123"])
                .unwrap();
            let config = Config::from_args(Args::from_arg_matches(&m).unwrap()).unwrap();
            match alias.new {
                "ORCHD_METRICS_PORT" => {
                    assert_eq!(config.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()))
                }
                other => panic!(
                    "{} lands on {other}, which this test does not check",
                    alias.old
                ),
            }
        }
    }
}
