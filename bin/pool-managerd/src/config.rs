//! Configuration: clap flags with `POOL_MANAGERD_*` env names, plus the pools file
//! (`pools_file`). Everything is validated once, with messages that say what to change.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use auth_min::Token;
use clap::Parser;

pub use crate::pools_file::PoolSpec;
use crate::pools_file::{read_pools_file, validate_pools, PoolsFile};

/// Command line and environment. Secrets are read here and immediately turned into a
/// [`Token`], which never prints its value.
#[derive(Parser)]
#[command(name = "pool-managerd", version, about = "llama-orch GPU-node daemon")]
pub struct Args {
    /// Address of the HTTP API (status, control, engine proxy, metrics).
    #[arg(
        long,
        env = "POOL_MANAGERD_BIND_ADDR",
        default_value = "127.0.0.1:9200"
    )]
    pub bind_addr: SocketAddr,
    /// TOML file describing the pools this node runs (see README "Configuration").
    #[arg(long, env = "POOL_MANAGERD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of handoff files, engine logs and engine pid records.
    #[arg(
        long,
        env = "POOL_MANAGERD_RUNTIME_DIR",
        default_value = "/var/lib/llama-orch/runtime"
    )]
    pub runtime_dir: PathBuf,
    /// Identity of this node in pool status and registration (default: the host name).
    #[arg(long, env = "POOL_MANAGERD_NODE_ID")]
    pub node_id: Option<String>,
    /// llama-server binary; overrides the pools file. Otherwise `PATH`, then the project cache.
    #[arg(long, env = "POOL_MANAGERD_ENGINE_BINARY")]
    pub engine_binary: Option<PathBuf>,
    /// Run engines as this user (a name or a uid; its primary group too), apart from the
    /// daemon's files and secrets. Needs pool-managerd to run as root; the engine binary and
    /// the model files must be readable by that user.
    #[arg(long, env = "POOL_MANAGERD_ENGINE_USER")]
    pub engine_user: Option<String>,
    /// Safety-net rescan interval of the handoff directory (the notify watcher reacts at once).
    #[arg(
        long,
        env = "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS",
        default_value_t = 1000
    )]
    pub handoff_watch_interval_ms: u64,
    /// Watch the handoff directory with the kernel's file events (inotify) as well as the
    /// periodic rescan; `false` on filesystems whose writes the kernel does not report (network
    /// filesystems, some FUSE mounts): the rescan alone.
    #[arg(long, env = "POOL_MANAGERD_HANDOFF_NOTIFY", default_value_t = true, action = clap::ArgAction::Set)]
    pub handoff_notify: bool,
    /// Delete a handoff file written by an external provisioner once it has been ingested.
    #[arg(
        long,
        env = "POOL_MANAGERD_AUTO_DELETE_HANDOFF",
        default_value_t = false
    )]
    pub auto_delete_handoff: bool,
    /// How often GPU memory is re-read through NVML (0 = only at start).
    #[arg(
        long,
        env = "POOL_MANAGERD_GPU_DISCOVERY_INTERVAL_MS",
        default_value_t = 30000
    )]
    pub gpu_discovery_interval_ms: u64,
    /// Interval of engine health probes.
    #[arg(long, env = "POOL_MANAGERD_HEALTH_INTERVAL_MS", default_value_t = 2000)]
    pub health_interval_ms: u64,
    /// Consecutive failed health probes after which an engine counts as hung and is restarted.
    #[arg(long, env = "POOL_MANAGERD_MAX_PROBE_FAILURES", default_value_t = 3)]
    pub max_probe_failures: u32,
    /// How long an engine may take to load its model and answer /health.
    #[arg(
        long,
        env = "POOL_MANAGERD_ENGINE_START_TIMEOUT_MS",
        default_value_t = 120000
    )]
    pub engine_start_timeout_ms: u64,
    /// First restart delay; doubles per failure up to the maximum (with jitter).
    #[arg(long, env = "POOL_MANAGERD_RESTART_BACKOFF_MS", default_value_t = 1000)]
    pub restart_backoff_ms: u64,
    /// Upper bound of the restart delay.
    #[arg(
        long,
        env = "POOL_MANAGERD_RESTART_BACKOFF_MAX_MS",
        default_value_t = 60000
    )]
    pub restart_backoff_max_ms: u64,
    /// How long an open circuit (a pool `failed` after 5 failures in 5 min) waits before one
    /// trial start; each failed trial doubles it, up to an hour.
    #[arg(long, env = "POOL_MANAGERD_BREAKER_OPEN_MS", default_value_t = 300_000)]
    pub breaker_open_ms: u64,
    /// SIGTERM → this grace → SIGKILL, for engines being stopped.
    #[arg(long, env = "POOL_MANAGERD_SHUTDOWN_GRACE_MS", default_value_t = 10000)]
    pub shutdown_grace_ms: u64,
    /// Largest request body accepted (engine proxy included).
    #[arg(long, env = "POOL_MANAGERD_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Engine proxy: the longest the engine may stay silent (before answering, or between two
    /// pieces of its answer); the request is then cut and the engine's connection closed.
    #[arg(
        long,
        env = "POOL_MANAGERD_PROXY_IDLE_TIMEOUT_MS",
        default_value_t = 180_000
    )]
    pub proxy_idle_timeout_ms: u64,
    /// Engine proxy: the longest one proxied request may take, start to end of its answer.
    #[arg(
        long,
        env = "POOL_MANAGERD_PROXY_MAX_DURATION_MS",
        default_value_t = 3_600_000
    )]
    pub proxy_max_duration_ms: u64,
    /// Directories a `reload` may load a model from (comma-separated); default: the
    /// directories of the pools file's models.
    #[arg(long, env = "POOL_MANAGERD_MODEL_DIRS", value_delimiter = ',')]
    pub model_dirs: Vec<PathBuf>,
    /// HTTP connections served at once (more wait in the accept queue).
    #[arg(long, env = "POOL_MANAGERD_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// Connections one source address (an IPv6 /64) may hold before any of their requests
    /// presented a valid token; more are closed at once. Not applied without a token.
    #[arg(
        long,
        env = "POOL_MANAGERD_MAX_UNAUTHENTICATED_PER_ADDRESS",
        default_value_t = 128
    )]
    pub max_unauthenticated_per_address: usize,
    /// Longest a client may take to send a request's headers.
    #[arg(
        long,
        env = "POOL_MANAGERD_HEADER_READ_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub header_read_timeout_ms: u64,
    /// Longest a client may take to send a request's body once its headers came (408 beyond).
    #[arg(
        long,
        env = "POOL_MANAGERD_BODY_READ_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub body_read_timeout_ms: u64,
    /// Shared API token (prefer the _FILE form).
    #[arg(long, env = "LLORCH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// File holding the API token; refused when readable by group or others.
    #[arg(long, env = "LLORCH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The node token (between the daemons: registration, heartbeats, polls, the engine proxy,
    /// drain and reload); when set, the only key this daemon accepts.
    #[arg(long, env = "LLORCH_NODE_TOKEN", hide_env_values = true)]
    pub node_token: Option<String>,
    /// File holding the node token.
    #[arg(long, env = "LLORCH_NODE_TOKEN_FILE")]
    pub node_token_file: Option<PathBuf>,
    /// Allow clients without a token, only when bound to loopback (single-user HOME setups).
    #[arg(
        long,
        env = "POOL_MANAGERD_ALLOW_UNAUTHENTICATED_LOOPBACK",
        default_value_t = false
    )]
    pub allow_unauthenticated_loopback: bool,
    /// HTTPS: this daemon's certificate chain (PEM), with POOL_MANAGERD_TLS_KEY_FILE; both
    /// re-read on SIGHUP. Also the client certificate it presents to an orchestratord that
    /// asks for one (mutual TLS: the certificate then needs the clientAuth usage too).
    #[arg(long, env = "POOL_MANAGERD_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// HTTPS: the certificate's private key (PEM); refused when group or others may read it.
    #[arg(long, env = "POOL_MANAGERD_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// The CA orchestratord's certificate is verified against (an https:// orchestratord URL);
    /// the system's roots when unset.
    #[arg(long, env = "LLORCH_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// This node's own token (its line in orchestratord's ORCHD_NODE_TOKENS_FILE): when set,
    /// the only credential this daemon accepts (from orchestratord's polls, proxy, drain and
    /// reload) and the one it registers and heartbeats with; the shared node token no longer
    /// opens it. Default: the node token. Prefer the _FILE form.
    #[arg(long, env = "POOL_MANAGERD_REGISTRATION_TOKEN", hide_env_values = true)]
    pub registration_token: Option<String>,
    #[arg(long, env = "POOL_MANAGERD_REGISTRATION_TOKEN_FILE")]
    pub registration_token_file: Option<PathBuf>,
    /// CLOUD: orchestratord to register with (and heartbeat to). Needs a token.
    #[arg(long, env = "POOL_MANAGERD_ORCHESTRATORD_URL")]
    pub orchestratord_url: Option<String>,
    /// CLOUD: the URL orchestratord reaches this daemon at (default: http://<bind addr>, or
    /// https:// with TLS on).
    #[arg(long, env = "POOL_MANAGERD_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// CLOUD: heartbeat interval to orchestratord.
    #[arg(
        long,
        env = "POOL_MANAGERD_HEARTBEAT_INTERVAL_MS",
        default_value_t = 5000
    )]
    pub heartbeat_interval_ms: u64,
    /// Log format: `pretty` or `json`.
    #[arg(long, env = "POOL_MANAGERD_LOG_FORMAT", default_value = "pretty")]
    pub log_format: String,
    /// A second port, on the bind address, serving only `/metrics` (still with the node token).
    #[arg(long, env = "POOL_MANAGERD_METRICS_PORT")]
    pub metrics_port: Option<u16>,
}

/// Variables renamed since the migration plan, still read under their old names
/// (`llorch_http::env_alias`): deprecated, logged at start.
pub const ENV_ALIASES: &[llorch_http::env_alias::EnvAlias] = &[
    llorch_http::env_alias::EnvAlias {
        old: "POOL_MANAGERD_WATCH_INTERVAL_MS",
        new: "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS",
    },
    llorch_http::env_alias::EnvAlias {
        old: "PROMETHEUS_METRICS_PORT",
        new: "POOL_MANAGERD_METRICS_PORT",
    },
    // The plan's "optional, future" push to orchestratord: registration does that job, so the
    // callback URL is the address the node registers with.
    llorch_http::env_alias::EnvAlias {
        old: "POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL",
        new: "POOL_MANAGERD_ORCHESTRATORD_URL",
    },
];

/// The callback path the migration plan sketched (`POOL_MANAGERD_ORCHESTRATORD_CALLBACK_URL`):
/// not part of orchestratord's address, so it is dropped from it.
const PLAN_CALLBACK_PATH: &str = "/callbacks/pool-ready";

/// Node registration with orchestratord (CLOUD).
#[derive(Debug, Clone)]
pub struct Registration {
    /// What this node presents to orchestratord.
    pub token: Token,
    pub orchestratord_url: String,
    /// POOL_MANAGERD_ADVERTISE_URL; `None`: the address this node is bound to (the port the
    /// kernel gave, on port 0), known once bound.
    pub advertise_url: Option<String>,
    pub heartbeat_interval: Duration,
}

/// Validated configuration. Holds the token as [`Token`], whose `Debug` shows a fingerprint:
/// the node token when one is set, else the shared API token (client keys are never here, so
/// this daemon refuses them).
#[derive(Debug, Clone)]
pub struct Config {
    pub registration: Option<Registration>,
    pub bind_addr: SocketAddr,
    pub runtime_dir: PathBuf,
    pub node_id: String,
    pub engine_binary: Option<PathBuf>,
    /// Engines run as this (uid, gid) (POOL_MANAGERD_ENGINE_USER); `None`: as the daemon.
    pub engine_user: Option<(u32, u32)>,
    pub pools: Vec<PoolSpec>,
    /// Canonical directories a `reload` may load a model from.
    pub model_dirs: Vec<PathBuf>,
    pub handoff_rescan: Duration,
    /// POOL_MANAGERD_HANDOFF_NOTIFY: kernel file events besides the rescan.
    pub handoff_notify: bool,
    pub auto_delete_handoff: bool,
    pub gpu_discovery_interval: Duration,
    pub health_interval: Duration,
    pub max_probe_failures: u32,
    pub engine_start_timeout: Duration,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    pub breaker_open: Duration,
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
    pub proxy_idle_timeout: Duration,
    pub proxy_max_duration: Duration,
    pub conn_limits: llorch_http::ConnLimits,
    pub token: Option<Token>,
    /// `token` is this node's own (POOL_MANAGERD_REGISTRATION_TOKEN), not one shared by nodes.
    pub own_token: bool,
    /// HTTPS, when a certificate and key are set.
    pub tls: Option<std::sync::Arc<llorch_http::tls::ServerTls>>,
    /// How orchestratord is reached over https:// (the CA it is verified against, the
    /// certificate presented when it asks for one).
    pub client_tls: llorch_http::tls::ClientTls,
    pub json_logs: bool,
    /// The metrics port's address (the bind address's IP), when one is configured.
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    PoolsFile(#[from] crate::pools_file::PoolsFileError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Auth(#[from] auth_min::AuthConfigError),
    #[error(transparent)]
    Tls(#[from] llorch_http::tls::TlsError),
}

/// POOL_MANAGERD_ENGINE_USER as (uid, gid): a user of this system (by name or uid), taken on
/// only by a daemon that runs as root.
fn engine_user(user: &str) -> Result<(u32, u32), ConfigError> {
    let found = match user.parse::<u32>() {
        Ok(uid) => users::by_uid(uid),
        Err(_) => users::by_name(user),
    };
    let Some((uid, gid)) = found else {
        return Err(ConfigError::Invalid(format!(
            "POOL_MANAGERD_ENGINE_USER {user:?} is no user of this system"
        )));
    };
    if uid == 0 {
        return Err(ConfigError::Invalid(
            "POOL_MANAGERD_ENGINE_USER must not be root: it keeps engines apart from the daemon"
                .into(),
        ));
    }
    if !users::running_as_root() {
        return Err(ConfigError::Invalid(
            "POOL_MANAGERD_ENGINE_USER needs pool-managerd to run as root (to start engines as another user)".into(),
        ));
    }
    Ok((uid, gid))
}

/// The system's user database, through libc.
#[allow(unsafe_code)]
mod users {
    /// (uid, gid) of the user named `name`.
    pub fn by_name(name: &str) -> Option<(u32, u32)> {
        let name = std::ffi::CString::new(name).ok()?;
        lookup(|pwd, buf, len, out| {
            // SAFETY: every pointer is valid for the call; getpwnam_r writes into `pwd` and
            // `buf` (of `len` bytes) only, and sets `out` to `pwd` or null.
            unsafe { libc::getpwnam_r(name.as_ptr(), pwd, buf, len, out) }
        })
    }

    /// (uid, gid) of the user with `uid`.
    pub fn by_uid(uid: u32) -> Option<(u32, u32)> {
        lookup(|pwd, buf, len, out| {
            // SAFETY: as in `by_name`.
            unsafe { libc::getpwuid_r(uid, pwd, buf, len, out) }
        })
    }

    fn lookup(
        call: impl Fn(
            *mut libc::passwd,
            *mut libc::c_char,
            libc::size_t,
            *mut *mut libc::passwd,
        ) -> libc::c_int,
    ) -> Option<(u32, u32)> {
        // SAFETY: an all-zero passwd is a valid (empty) value of this plain C struct.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut out);
        (rc == 0 && !out.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
    }

    pub fn running_as_root() -> bool {
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }
}

impl Config {
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_pools_file(path)?,
            None => PoolsFile::default(),
        };
        let shared =
            auth_min::load_token(args.api_token.as_deref(), args.api_token_file.as_deref())?;
        let node = auth_min::load_token_as(
            "LLORCH_NODE_TOKEN",
            args.node_token.as_deref(),
            args.node_token_file.as_deref(),
        )?;
        // The node's own token (its line in ORCHD_NODE_TOKENS_FILE), when it has one, is the only
        // credential it takes and presents: no token another node holds opens this one.
        let own = auth_min::load_token_as(
            "POOL_MANAGERD_REGISTRATION_TOKEN",
            args.registration_token.as_deref(),
            args.registration_token_file.as_deref(),
        )?;
        let own_token = own.is_some();
        let token = own.or(node).or(shared);
        auth_min::check_bind(
            args.bind_addr,
            token.as_ref(),
            args.allow_unauthenticated_loopback,
        )?;
        let json_logs = llorch_http::parse_log_format("POOL_MANAGERD_LOG_FORMAT", &args.log_format)
            .map_err(ConfigError::Invalid)?;
        let non_zero =
            |name: &str, v: u64| llorch_http::positive_ms(name, v).map_err(ConfigError::Invalid);
        let pools = validate_pools(file.pools)?;
        let model_dirs = model_dirs(&args.model_dirs, &pools)?;
        let tls_files = llorch_http::tls::ServerTlsFiles::from_settings(
            ("POOL_MANAGERD_TLS_CERT_FILE", args.tls_cert_file),
            ("POOL_MANAGERD_TLS_KEY_FILE", args.tls_key_file),
            None,
        )?;
        let client_tls = llorch_http::tls::ClientTls::load(
            args.tls_ca_file.as_deref(),
            tls_files
                .as_ref()
                .map(|f| (f.cert.as_path(), f.key.as_path())),
        )?;
        let tls = match tls_files {
            Some(files) => Some(std::sync::Arc::new(llorch_http::tls::ServerTls::load(
                files,
            )?)),
            None => None,
        };
        let registration = match &args.orchestratord_url {
            None => None,
            Some(url) => {
                let url = llorch_contracts::address::base_url(
                    url,
                    llorch_contracts::address::Schemes::Any,
                )
                .map_err(|e| {
                    ConfigError::Invalid(format!("POOL_MANAGERD_ORCHESTRATORD_URL {url:?}: {e}"))
                })?;
                let url = url
                    .strip_suffix(PLAN_CALLBACK_PATH)
                    .map_or(url.clone(), str::to_string);
                let Some(presented) = token.clone() else {
                    return Err(ConfigError::Invalid(
                        "POOL_MANAGERD_ORCHESTRATORD_URL needs a token (LLORCH_NODE_TOKEN, or LLORCH_API_TOKEN, or their _FILE forms)".into(),
                    ));
                };
                if args.advertise_url.is_none() && args.bind_addr.ip().is_unspecified() {
                    return Err(ConfigError::Invalid(format!(
                        "bound to {} (all addresses): set POOL_MANAGERD_ADVERTISE_URL to the URL orchestratord reaches this node at",
                        args.bind_addr
                    )));
                }
                let advertise_url = args
                    .advertise_url
                    .as_deref()
                    .map(|a| a.trim_end_matches('/').to_string());
                Some(Registration {
                    token: presented,
                    orchestratord_url: url,
                    advertise_url,
                    heartbeat_interval: non_zero(
                        "POOL_MANAGERD_HEARTBEAT_INTERVAL_MS",
                        args.heartbeat_interval_ms,
                    )?,
                })
            }
        };
        Ok(Config {
            own_token,
            registration,
            bind_addr: args.bind_addr,
            runtime_dir: args.runtime_dir,
            node_id: args.node_id.unwrap_or_else(host_name),
            engine_binary: args.engine_binary.or(file.engine.binary),
            engine_user: match &args.engine_user {
                Some(user) => Some(engine_user(user)?),
                None => None,
            },
            pools,
            model_dirs,
            handoff_rescan: non_zero(
                "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS",
                args.handoff_watch_interval_ms,
            )?,
            handoff_notify: args.handoff_notify,
            auto_delete_handoff: args.auto_delete_handoff,
            gpu_discovery_interval: Duration::from_millis(args.gpu_discovery_interval_ms),
            health_interval: non_zero("POOL_MANAGERD_HEALTH_INTERVAL_MS", args.health_interval_ms)?,
            max_probe_failures: llorch_http::at_least(
                "POOL_MANAGERD_MAX_PROBE_FAILURES",
                args.max_probe_failures,
                1,
            )
            .map_err(ConfigError::Invalid)?,
            engine_start_timeout: non_zero(
                "POOL_MANAGERD_ENGINE_START_TIMEOUT_MS",
                args.engine_start_timeout_ms,
            )?,
            restart_backoff: non_zero("POOL_MANAGERD_RESTART_BACKOFF_MS", args.restart_backoff_ms)?,
            restart_backoff_max: non_zero(
                "POOL_MANAGERD_RESTART_BACKOFF_MAX_MS",
                args.restart_backoff_max_ms,
            )?,
            breaker_open: non_zero("POOL_MANAGERD_BREAKER_OPEN_MS", args.breaker_open_ms)?,
            shutdown_grace: Duration::from_millis(args.shutdown_grace_ms),
            max_body_bytes: llorch_http::at_least(
                "POOL_MANAGERD_MAX_BODY_BYTES",
                args.max_body_bytes,
                1024,
            )
            .map_err(ConfigError::Invalid)?,
            proxy_idle_timeout: non_zero(
                "POOL_MANAGERD_PROXY_IDLE_TIMEOUT_MS",
                args.proxy_idle_timeout_ms,
            )?,
            proxy_max_duration: non_zero(
                "POOL_MANAGERD_PROXY_MAX_DURATION_MS",
                args.proxy_max_duration_ms,
            )?,
            conn_limits: llorch_http::ConnLimits {
                max_connections: llorch_http::at_least(
                    "POOL_MANAGERD_MAX_CONNECTIONS",
                    args.max_connections,
                    1,
                )
                .map_err(ConfigError::Invalid)?,
                reserved: 0,
                // A reader (orchestratord) silent as long as an engine may be is gone.
                write_stall_timeout: non_zero(
                    "POOL_MANAGERD_PROXY_IDLE_TIMEOUT_MS",
                    args.proxy_idle_timeout_ms,
                )?,
                header_read_timeout: non_zero(
                    "POOL_MANAGERD_HEADER_READ_TIMEOUT_MS",
                    args.header_read_timeout_ms,
                )?,
                body_read_timeout: non_zero(
                    "POOL_MANAGERD_BODY_READ_TIMEOUT_MS",
                    args.body_read_timeout_ms,
                )?,
                per_address_unauthenticated: match token {
                    Some(_) => llorch_http::at_least(
                        "POOL_MANAGERD_MAX_UNAUTHENTICATED_PER_ADDRESS",
                        args.max_unauthenticated_per_address,
                        1,
                    )
                    .map_err(ConfigError::Invalid)?,
                    None => 0,
                },
            },
            token,
            tls,
            client_tls,
            json_logs,
            metrics_addr: llorch_http::metrics_port::address(
                "POOL_MANAGERD_METRICS_PORT",
                args.bind_addr,
                args.metrics_port,
            )
            .map_err(ConfigError::Invalid)?,
        })
    }
}

/// The canonical directories a reload may load from: the configured ones (each must exist), or
/// the directories of the pools file's models.
fn model_dirs(configured: &[PathBuf], pools: &[PoolSpec]) -> Result<Vec<PathBuf>, ConfigError> {
    if configured.is_empty() {
        let mut dirs: Vec<PathBuf> = pools
            .iter()
            .filter_map(|p| p.model_path.parent())
            .filter_map(|d| d.canonicalize().ok())
            .collect();
        dirs.sort();
        dirs.dedup();
        return Ok(dirs);
    }
    configured
        .iter()
        .map(|d| {
            d.canonicalize().ok().filter(|c| c.is_dir()).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "POOL_MANAGERD_MODEL_DIRS: {} is not a directory",
                    d.display()
                ))
            })
        })
        .collect()
}

/// `path`, canonical, when it is a regular file under one of `dirs`.
pub fn model_under(dirs: &[PathBuf], path: &std::path::Path) -> Option<PathBuf> {
    let canonical = path.canonicalize().ok()?;
    (canonical.is_file() && dirs.iter().any(|d| canonical.starts_with(d))).then_some(canonical)
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
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
            "pool-managerd",
            Args::command(),
            &aliases,
            llorch_observability::ENV_READ,
        );
    }

    // covers: POOL-3122
    #[test]
    fn an_engine_user_must_be_a_user_of_this_system_and_not_root() {
        let parse = |user: &str| {
            let args = Args::try_parse_from([
                "pool-managerd",
                "--allow-unauthenticated-loopback",
                &format!("--engine-user={user}"),
            ])
            .unwrap();
            Config::from_args(args).map(|c| c.engine_user)
        };
        for (user, says) in [
            ("no-such-user-llorch", "is no user of this system"),
            ("root", "must not be root"),
            ("0", "must not be root"),
        ] {
            let e = parse(user).unwrap_err().to_string();
            assert!(
                e.contains("POOL_MANAGERD_ENGINE_USER") && e.contains(says),
                "{user}: {e}"
            );
        }
        // As root (these tests run as root), a real user is taken by name or uid.
        if users::running_as_root() {
            assert_eq!(parse("nobody").unwrap(), Some((65534, 65534)));
            assert_eq!(parse("65534").unwrap(), Some((65534, 65534)));
        }
    }

    // covers: AUTH-5114
    #[test]
    fn out_of_range_values_are_refused_with_the_variable_name_not_clamped() {
        for (flag, name) in [
            (
                "--max-body-bytes=100",
                "POOL_MANAGERD_MAX_BODY_BYTES must be at least 1024 (got 100)",
            ),
            (
                "--max-probe-failures=0",
                "POOL_MANAGERD_MAX_PROBE_FAILURES must be at least 1",
            ),
        ] {
            let args =
                Args::try_parse_from(["pool-managerd", "--allow-unauthenticated-loopback", flag])
                    .unwrap();
            let e = Config::from_args(args).unwrap_err();
            assert!(e.to_string().contains(name), "{flag}: {e}");
        }
    }

    // covers: OBS-6119
    #[test]
    fn every_old_variable_name_is_accepted_and_lands_on_its_new_setting() {
        use clap::FromArgMatches;
        for alias in ENV_ALIASES {
            let value = match alias.new {
                "POOL_MANAGERD_ORCHESTRATORD_URL" => {
                    "http://orchestratord:8080/callbacks/pool-ready"
                }
                _ => "1234",
            };
            let (cmd, in_use) = llorch_http::env_alias::command_with::<Args>(ENV_ALIASES, |v| {
                (v == alias.old).then(|| value.into())
            })
            .unwrap();
            assert_eq!(in_use, vec![*alias]);
            let m = cmd
                .try_get_matches_from([
                    "pool-managerd",
                    "--allow-unauthenticated-loopback",
                    "--api-token=test-token-0123456789",
                ])
                .unwrap();
            let config = Config::from_args(Args::from_arg_matches(&m).unwrap()).unwrap();
            match alias.new {
                "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS" => {
                    assert_eq!(config.handoff_rescan, Duration::from_millis(1234))
                }
                "POOL_MANAGERD_METRICS_PORT" => {
                    assert_eq!(config.metrics_addr, Some("127.0.0.1:1234".parse().unwrap()))
                }
                // The plan's callback path is not part of orchestratord's address.
                "POOL_MANAGERD_ORCHESTRATORD_URL" => assert_eq!(
                    config.registration.map(|r| r.orchestratord_url).as_deref(),
                    Some("http://orchestratord:8080")
                ),
                other => panic!(
                    "{} lands on {other}, which this test does not check",
                    alias.old
                ),
            }
        }
    }

    // covers: AUTH-5114
    #[test]
    fn an_old_and_a_new_name_set_to_different_values_refuse_the_start() {
        let e = llorch_http::env_alias::command_with::<Args>(ENV_ALIASES, |v| match v {
            "POOL_MANAGERD_WATCH_INTERVAL_MS" => Some("500".into()),
            "POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS" => Some("250".into()),
            _ => None,
        })
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("keep only POOL_MANAGERD_HANDOFF_WATCH_INTERVAL_MS"),
            "{e}"
        );
    }
}
