//! pool-managerd binary: parse config, init logging, run until SIGTERM/SIGINT.

use clap::Parser;
use pool_managerd::config::{Args, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("pool-managerd: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let _telemetry =
        llorch_observability::init("pool-managerd", &config.node_id.clone(), config.json_logs);
    match pool_managerd::run(config, llorch_http::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "pool-managerd failed");
            std::process::ExitCode::FAILURE
        }
    }
}
