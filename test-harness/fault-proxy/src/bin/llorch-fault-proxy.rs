//! `llorch-fault-proxy --listen ADDR --upstream ADDR [--fault SPEC] [--control ADDR]`: the
//! fault proxy as a process, for hosts the test process cannot reach (another network
//! namespace). The control address takes one fault per line (`pass`, `latency=MS`,
//! `bandwidth=BYTES_PER_S`, `stall-after=BYTES`, `reset`, `half-open`) and answers `ok` or
//! `error: …`; `stats` answers the counters. Each flag may come from the environment instead
//! (`FAULT_PROXY_LISTEN`, `FAULT_PROXY_UPSTREAM`, `FAULT_PROXY_FAULT`, `FAULT_PROXY_CONTROL`).

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use llorch_fault_proxy::{Fault, FaultProxy};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "FAULT_PROXY_LISTEN")]
    listen: SocketAddr,
    #[arg(long, env = "FAULT_PROXY_UPSTREAM")]
    upstream: SocketAddr,
    #[arg(long, env = "FAULT_PROXY_FAULT", default_value = "pass")]
    fault: Fault,
    #[arg(long, env = "FAULT_PROXY_CONTROL")]
    control: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let proxy = FaultProxy::start(args.listen, args.upstream)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    proxy.set(args.fault);
    println!(
        "fault proxy listening on {} for {}",
        proxy.addr(),
        args.upstream
    );
    let Some(control) = args.control else {
        tokio::signal::ctrl_c().await?;
        return Ok(());
    };
    let listener = TcpListener::bind(control)
        .await
        .with_context(|| format!("binding control {control}"))?;
    println!("control on {}", listener.local_addr()?);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((conn, _)) = accepted else { continue };
                let (read, mut write) = conn.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match line.trim() {
                        "stats" => format!(
                            "accepted={} open={} resets={} upstream_bytes={} fault={:?}",
                            proxy.accepted(), proxy.open(), proxy.resets(), proxy.upstream_bytes(), proxy.fault()
                        ),
                        spec => match spec.parse::<Fault>() {
                            Ok(f) => { proxy.set(f); "ok".to_string() }
                            Err(e) => format!("error: {e}"),
                        },
                    };
                    if write.write_all(format!("{answer}\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
}
