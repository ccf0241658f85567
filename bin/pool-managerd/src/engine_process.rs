//! Engine processes: spawn `llama-server` on a loopback port in its own process group (the port
//! the pools file names, or one the kernel gives the engine, read back from its log), log to
//! a file, stop it (SIGTERM → grace → SIGKILL to the whole group), and clean up engines a
//! previous run of the daemon left behind (pid records under `{runtime_dir}/engines/`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

use crate::config::PoolSpec;

/// A running engine process. Dropping it kills the process (last resort; [`stop`] is the
/// orderly way).
pub struct EngineProcess {
    pub child: Child,
    pub pid: u32,
    /// The port it listens on: the pools file's, or the one it reported ([`EngineProcess::locate`]).
    port: Option<u16>,
    /// Its log, and how far it was read for the port it reported.
    log_path: PathBuf,
    log_read: u64,
    pub model_path: PathBuf,
    pub model_id: String,
    /// The engine's API key (`LLAMA_API_KEY`): fresh for this start, known only to this daemon
    /// (and, through the key file, a HOME orchestratord).
    pub api_key: String,
    record: PathBuf,
}

/// What identifies a spawned engine across a restart of the daemon: a pid alone can be reused
/// (after a reboot, or by a busy host), so the record also holds the process's start time (in
/// clock ticks since boot) and the boot it belongs to.
#[derive(Debug, Serialize, Deserialize)]
struct PidRecord {
    pid: u32,
    pool_id: String,
    binary: String,
    #[serde(default)]
    start_ticks: Option<u64>,
    #[serde(default)]
    boot_id: Option<String>,
}

/// `/proc/<pid>/stat` field 22: when the process started, in clock ticks after boot.
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start with field 3.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// This boot's id (changes at every boot).
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn logs_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("logs")
}

fn records_dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("engines")
}

/// 256 random bits, hex: an engine's API key.
fn fresh_api_key() -> String {
    rand::random::<[u8; 32]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What of the daemon's environment an engine gets: what finds its libraries and devices and
/// tunes its math (`PATH`, `LD_LIBRARY_PATH`, locale and time zone, the CUDA / ROCm / Vulkan /
/// OpenMP / BLAS / ggml variables), and nothing else: no token, no TLS key path, no
/// `LLAMA_ARG_*` that would change its arguments behind the pools file.
fn engine_environment(
    vars: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    const NAMES: &[&str] = &["PATH", "LD_LIBRARY_PATH", "LANG", "LC_ALL", "TZ", "TMPDIR"];
    const PREFIXES: &[&str] = &[
        "CUDA_",
        "NVIDIA_",
        "HIP_",
        "ROCR_",
        "HSA_",
        "GGML_",
        "OMP_",
        "OPENBLAS_",
        "MKL_",
        "VK_",
    ];
    vars.filter(|(name, _)| {
        name.to_str()
            .is_some_and(|n| NAMES.contains(&n) || PREFIXES.iter().any(|p| n.starts_with(p)))
    })
    .collect()
}

pub struct SpawnRequest<'a> {
    pub binary: &'a Path,
    pub runtime_dir: &'a Path,
    pub spec: &'a PoolSpec,
    /// Model file and id to load (differs from `spec` during a reload).
    pub model_path: &'a Path,
    pub model_id: &'a str,
    /// Suffix of the pid record, so a reload's second engine does not overwrite the first's.
    pub instance: &'a str,
    /// Run as this (uid, gid) instead of the daemon's user.
    pub user: Option<(u32, u32)>,
}

pub fn spawn(req: SpawnRequest<'_>) -> std::io::Result<EngineProcess> {
    // Without a port in the pools file the engine binds port 0 and says which port it got:
    // no port is picked here and released for another process to take first.
    let port = req.spec.port;
    let logs = logs_dir(req.runtime_dir);
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{}.log", req.spec.id));
    // Never through a symlink planted in the runtime dir.
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log_path)?
    };
    let log_err = log.try_clone()?;
    // Earlier starts' lines stay in the file: only what this start writes is read.
    let log_read = log.metadata()?.len();

    let api_key = fresh_api_key();
    let mut cmd = Command::new(req.binary);
    // A cleared environment: the daemon's own (tokens, TLS key paths) never reaches the engine;
    // the key goes by the environment, never the command line (which every user may read).
    cmd.env_clear()
        .envs(engine_environment(std::env::vars_os()))
        .env("LLAMA_API_KEY", &api_key);
    cmd.arg("--model")
        .arg(req.model_path)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.unwrap_or(0).to_string(),
        ])
        .args(["--parallel", &req.spec.slots.to_string()])
        .args(["--ctx-size", &req.spec.ctx.to_string()])
        .args(["--n-gpu-layers", &req.spec.gpu_layers.to_string()])
        .args(["--alias", req.model_id])
        .arg("--metrics")
        .args(req.spec.embeddings.then_some("--embeddings"))
        .args(&req.spec.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .process_group(0)
        .kill_on_drop(true);
    match &req.spec.device_mask {
        Some(mask) => cmd.env("CUDA_VISIBLE_DEVICES", mask),
        None => cmd.env_remove("CUDA_VISIBLE_DEVICES"),
    };
    if let Some((uid, gid)) = req.user {
        // std drops the supplementary groups too when root changes user.
        cmd.uid(uid).gid(gid);
    }
    // The engine must never outlive the daemon, even when the daemon is SIGKILLed (set after
    // the change of user, which would clear it).
    die_with_parent(&mut cmd);
    let child = cmd.spawn()?;
    let pid = child.id().unwrap_or(0);

    let records = records_dir(req.runtime_dir);
    std::fs::create_dir_all(&records)?;
    let record = records.join(format!("{}{}.pid", req.spec.id, req.instance));
    let body = serde_json::to_vec(&PidRecord {
        pid,
        pool_id: req.spec.id.clone(),
        binary: req.binary.display().to_string(),
        start_ticks: process_start_ticks(pid),
        boot_id: boot_id(),
    })
    .map_err(std::io::Error::other)?;
    std::fs::write(&record, body)?;

    Ok(EngineProcess {
        child,
        pid,
        port,
        log_path,
        log_read,
        model_path: req.model_path.to_path_buf(),
        model_id: req.model_id.to_string(),
        api_key,
        record,
    })
}

#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    // SAFETY: killpg(2) has no memory-safety preconditions; a stale group only yields ESRCH.
    unsafe {
        libc::killpg(pid as libc::pid_t, signal);
    }
}

/// The process and its group: for a recorded engine that may not lead its own group. Only
/// called after `is_engine_process` confirmed the pid still runs the engine binary.
#[allow(unsafe_code)]
fn signal_process_and_group(pid: u32, signal: libc::c_int) {
    if pid == 0 || pid > i32::MAX as u32 {
        return;
    }
    signal_group(pid, signal);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

impl EngineProcess {
    /// The port it listens on, once known: the pools file's, or the one its log reports (read
    /// on from where the last call stopped; `None` until the line is there) when the engine
    /// process does listen on it.
    pub fn locate(&mut self) -> Option<u16> {
        use std::io::{BufRead, Seek};
        if self.port.is_some() {
            return self.port;
        }
        let mut file = std::fs::File::open(&self.log_path).ok()?;
        file.seek(std::io::SeekFrom::Start(self.log_read)).ok()?;
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                // A line not ended yet is read again next time.
                Ok(n) if n > 0 && line.ends_with(b"\n") => {
                    self.log_read += n as u64;
                    let Some(port) =
                        llamacpp_client::listening_port(&String::from_utf8_lossy(&line))
                    else {
                        continue;
                    };
                    // Only a port the engine itself listens on: its log is its own to write,
                    // and the engine's key and its requests go where it points.
                    if llamacpp_client::listening_addrs(self.pid)
                        .iter()
                        .any(|a| a.port() == port)
                    {
                        self.port = Some(port);
                        return self.port;
                    }
                    tracing::warn!(
                        pid = self.pid,
                        port,
                        "the engine named a port it does not listen on; not taken"
                    );
                }
                _ => return None,
            }
        }
    }

    /// Has the process exited? Returns a description of how, when it has.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(describe_exit(status)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for engine: {e}")),
        }
    }

    /// Waits for the process to exit and describes how.
    pub async fn wait_exit(&mut self) -> String {
        match self.child.wait().await {
            Ok(status) => describe_exit(status),
            Err(e) => format!("cannot wait for engine: {e}"),
        }
    }

    /// SIGTERM to the process group, wait up to `grace`, then SIGKILL. Removes the pid record.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_none() {
            signal_group(self.pid, libc::SIGTERM);
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    pid = self.pid,
                    grace_ms = grace.as_millis() as u64,
                    "engine ignored SIGTERM; sending SIGKILL"
                );
                signal_group(self.pid, libc::SIGKILL);
                let _ = self.child.wait().await;
            }
        }
        // Any stragglers of the group (children the engine forked).
        signal_group(self.pid, libc::SIGKILL);
        let _ = std::fs::remove_file(&self.record);
    }
}

pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("engine exited with status {code}"),
        (None, Some(sig)) => format!("engine killed by signal {sig}"),
        _ => "engine exited".into(),
    }
}

/// Kills engines recorded by a previous run of the daemon that are still alive, and removes
/// their records. Adoption is not attempted: a respawn is cheap and guarantees the engine runs
/// with the current configuration. Returns the pids killed.
pub async fn kill_orphans(runtime_dir: &Path, grace: Duration) -> Vec<u32> {
    let dir = records_dir(runtime_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(_) => return Vec::new(),
    };
    let mut killed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let record: Option<PidRecord> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(r) = record {
            if is_recorded_engine(&r) {
                tracing::warn!(pid = r.pid, pool_id = %r.pool_id, "killing engine left behind by a previous run");
                signal_process_and_group(r.pid, libc::SIGTERM);
                let deadline = tokio::time::Instant::now() + grace;
                while is_alive(r.pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if is_alive(r.pid) {
                    signal_process_and_group(r.pid, libc::SIGKILL);
                }
                killed.push(r.pid);
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    killed
}

fn is_alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// The record's process is still the one it recorded: same boot, same start time, alive and
/// running the recorded binary. Anything less (an old record without them, a reboot, a reused
/// pid) is not ours to kill.
fn is_recorded_engine(r: &PidRecord) -> bool {
    let same_boot = r.boot_id.is_some() && r.boot_id == boot_id();
    let same_start = r.start_ticks.is_some() && r.start_ticks == process_start_ticks(r.pid);
    if !(same_boot && same_start) {
        if is_alive(r.pid) {
            tracing::info!(pid = r.pid, pool_id = %r.pool_id, "a recorded engine pid now belongs to another process (or another boot); leaving it alone");
        }
        return false;
    }
    is_engine_process(r.pid, &r.binary)
}

/// The pid is alive and runs the recorded binary (guards against pid reuse).
fn is_engine_process(pid: u32, binary: &str) -> bool {
    if !is_alive(pid) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let argv0 = String::from_utf8_lossy(argv0);
    let name = |p: &str| Path::new(p).file_name().map(|n| n.to_os_string());
    argv0 == binary || (name(&argv0).is_some() && name(&argv0) == name(binary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_an_engine_reports_is_read_from_its_listening_line() {
        let port = llamacpp_client::listening_port;
        assert_eq!(
            port("0.00.016.682 I srv  llama_server: listening on http://127.0.0.1:33403\n"),
            Some(33403)
        );
        assert_eq!(
            port("main: server is listening on http://127.0.0.1:8080 - starting the main loop"),
            Some(8080)
        );
        assert_eq!(port("listening on http://[::1]:9000/"), Some(9000));
        assert_eq!(port("listening on http://127.0.0.1:0"), None);
        assert_eq!(port("load_model: loading model"), None);
        assert_eq!(port("listening on http://127.0.0.1:notaport"), None);
    }

    #[tokio::test]
    async fn an_engine_on_a_kernel_port_is_located_from_this_starts_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("p.log");
        // An earlier start's line stays in the file.
        std::fs::write(&log, "listening on http://127.0.0.1:1111\n").unwrap();
        // This test process stands in for the engine: it listens on the port the log names.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut process = EngineProcess {
            child: Command::new("true").spawn().unwrap(),
            pid: std::process::id(),
            port: None,
            log_read: std::fs::metadata(&log).unwrap().len(),
            log_path: log.clone(),
            model_path: PathBuf::new(),
            model_id: String::new(),
            api_key: String::new(),
            record: dir.path().join("none.pid"),
        };
        assert_eq!(process.locate(), None);
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        use std::io::Write;
        // A port the engine does not listen on is not taken.
        writeln!(f, "listening on http://127.0.0.1:1").unwrap();
        assert_eq!(process.locate(), None);
        // A line not yet ended is not taken.
        write!(f, "loading\nsrv listening on http://127.0.0.1:{port}").unwrap();
        assert_eq!(process.locate(), None);
        writeln!(f, " now").unwrap();
        assert_eq!(process.locate(), Some(port));
        assert_eq!(process.locate(), Some(port));
        drop(listener);
    }

    // covers: POOL-3120
    #[test]
    fn an_engine_gets_what_finds_its_libraries_and_devices_and_no_secret() {
        let vars = [
            ("PATH", "/usr/bin"),
            ("LD_LIBRARY_PATH", "/opt/cuda/lib"),
            ("CUDA_VISIBLE_DEVICES", "0"),
            ("OPENBLAS_CORETYPE", "haswell"),
            ("LLORCH_API_TOKEN", "secret"),
            ("POOL_MANAGERD_NODE_TOKEN", "secret"),
            ("POOL_MANAGERD_TLS_KEY_FILE", "/etc/key.pem"),
            ("LLAMA_ARG_HOST", "0.0.0.0"),
            ("LLAMA_API_KEY", "someone-elses"),
            ("HOME", "/root"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let kept: Vec<String> = engine_environment(vars.into_iter())
            .into_iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            kept,
            [
                "PATH",
                "LD_LIBRARY_PATH",
                "CUDA_VISIBLE_DEVICES",
                "OPENBLAS_CORETYPE"
            ]
        );
        let a = fresh_api_key();
        assert_eq!(a.len(), 64);
        assert_ne!(a, fresh_api_key());
    }

    // covers: POOL-3114
    #[test]
    fn an_engine_log_planted_as_a_symlink_is_refused_and_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        std::fs::create_dir_all(logs_dir(dir.path())).unwrap();
        std::os::unix::fs::symlink(&target, logs_dir(dir.path()).join("p0.log")).unwrap();
        let spec = crate::pools_file::PoolSpec {
            id: "p0".into(),
            model_path: "/nonexistent.gguf".into(),
            model_id: "m".into(),
            device_mask: None,
            slots: 1,
            ctx: 512,
            gpu_layers: 0,
            port: None,
            extra_args: vec![],
            embeddings: false,
        };
        let spawned = spawn(SpawnRequest {
            binary: Path::new("/bin/true"),
            runtime_dir: dir.path(),
            spec: &spec,
            model_path: &spec.model_path,
            model_id: &spec.model_id,
            instance: "a",
            user: None,
        });
        let err = spawned
            .err()
            .expect("spawned with its log through a symlink");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }
}
