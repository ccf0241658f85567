//! orchestratord binary: parse config, init logging, run until SIGTERM/SIGINT.

use llorch_http::env_alias::EnvAlias;

/// jemalloc rather than glibc's malloc: admission allocates each task on one worker thread and
/// frees it on another, into a heap that grows with the queue. glibc grew its per-thread arenas
/// a page range at a time (an `mprotect` for every other admission) and took another arena's
/// lock for every cross-thread free; with jemalloc, admission at 100 000 queued went from
/// 34-36k to 42-45k a second (test-harness/bench/README.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use orchestratord::config::{Args, Config, ENV_ALIASES};

fn main() -> std::process::ExitCode {
    let parsed = llorch_http::env_alias::parse::<Args>(ENV_ALIASES)
        .map_err(|e| e.to_string())
        .and_then(|(args, renamed)| {
            Config::from_args(args)
                .map(|c| (c, renamed))
                .map_err(|e| e.to_string())
        });
    let (config, renamed) = match parsed {
        Ok(c) => c,
        Err(error) => {
            eprintln!("orchestratord: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(error) => {
            eprintln!("orchestratord: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(config, renamed))
}

async fn serve(config: Config, renamed: Vec<EnvAlias>) -> std::process::ExitCode {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let _telemetry = llorch_observability::init("orchestratord", host.trim(), config.json_logs);
    llorch_http::env_alias::log_renamed(&renamed);
    match orchestratord::run(config, llorch_http::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "orchestratord failed");
            std::process::ExitCode::FAILURE
        }
    }
}
