//! pool-managerd binary: parse config, init logging, run until SIGTERM/SIGINT.

use pool_managerd::config::{Args, Config, ENV_ALIASES};

/// jemalloc, as orchestratord: the engine proxy allocates per chunk on whichever worker polls
/// it (relay-cpu, alternating binaries: 2.5 µs less CPU per proxied token).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
            eprintln!("pool-managerd: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let _telemetry =
        llorch_observability::init("pool-managerd", &config.node_id.clone(), config.json_logs);
    llorch_http::env_alias::log_renamed(&renamed);
    match pool_managerd::run(config, llorch_http::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "pool-managerd failed");
            std::process::ExitCode::FAILURE
        }
    }
}
