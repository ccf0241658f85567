//! The ceiling the admission benchmark compares orchestratord with: a bare axum handler for
//! `POST /v2/tasks` that parses the same JSON into the same `TaskRequest`, pushes it onto a
//! mutex-guarded queue and answers 202 with the task id and its position. No auth, no
//! validation, no events, no metrics: what any HTTP admission costs on this machine.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use llorch_contracts::tasks::TaskRequest;
use parking_lot::Mutex;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: String,
}

/// The allocator orchestratord runs with: the ceiling is compared like with like.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Queue = Arc<Mutex<VecDeque<TaskRequest>>>;

async fn admit(
    State(queue): State<Queue>,
    Json(req): Json<TaskRequest>,
) -> (StatusCode, Json<serde_json::Value>) {
    let id = req
        .task_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let position = {
        let mut q = queue.lock();
        q.push_back(req);
        q.len() - 1
    };
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"task_id": id, "queue_position": position})),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.bind).await?;
    // The benchmark reads the address from this line.
    println!("listening on {}", listener.local_addr()?);
    // As orchestratord does: small answers leave at once.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let queue: Queue = Arc::default();
    let app = Router::new()
        .route("/v2/tasks", post(admit))
        .route("/health", axum::routing::get(|| async { "ok" }))
        .with_state(queue);
    axum::serve(listener, app).await?;
    Ok(())
}
