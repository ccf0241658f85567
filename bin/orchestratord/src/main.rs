//! orchestratord binary: parse config, init logging, run until SIGTERM/SIGINT.

use clap::Parser;
use orchestratord::config::{Args, Config};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match Config::from_args(Args::parse()) {
        Ok(c) => c,
        Err(error) => {
            eprintln!("orchestratord: configuration error: {error}");
            return std::process::ExitCode::from(2);
        }
    };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let _telemetry = llorch_observability::init("orchestratord", host.trim(), config.json_logs);
    match orchestratord::run(config, llorch_http::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "orchestratord failed");
            std::process::ExitCode::FAILURE
        }
    }
}
