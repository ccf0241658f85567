//! `llorch status`: one overview of the service from its existing endpoints — readiness
//! (`/ready`), version and profile, pools (`/v2/pools`), nodes (`/v2/nodes`, admin only), queue
//! depth and recent rates (two scrapes of the open `/metrics`, a window apart). Also the pool
//! and node tables of `llorch pools` and `llorch nodes`.

use std::time::{Duration, Instant};

use llorch_client::{ClientError, OrchClient};
use llorch_contracts::meta::{NodeView, OrchPool};
use serde::Serialize;

use crate::exposition::{self, Sample};
use crate::table::{or_dash, Table};

/// Everything `llorch status` shows (also its `--json`).
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub url: String,
    pub version: Option<String>,
    /// `home` or `cloud`.
    pub profile: Option<String>,
    /// `GET /ready` answered 200: some pool can take work.
    pub ready: bool,
    /// Why not, when not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_ready_reason: Option<String>,
    pub pools: Vec<PoolRow>,
    pub nodes: NodesSection,
    /// Tasks waiting, by priority (`queue_depth`).
    pub queue: QueueDepth,
    /// Rates over the window between two scrapes; absent with `--window-ms 0` or without
    /// `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rates: Option<Rates>,
}

/// One pool, with the state `llorch` derives from its flags and its recent tokens/s.
#[derive(Debug, Serialize)]
pub struct PoolRow {
    #[serde(flatten)]
    pub pool: OrchPool,
    /// `ready`, `draining`, `restarting`, `failed`, `unhealthy` or `ejected`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct NodesSection {
    /// The token could list them (`/v2/nodes` needs the admin role).
    pub listed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub nodes: Vec<NodeView>,
}

#[derive(Debug, Default, Serialize)]
pub struct QueueDepth {
    pub interactive: u64,
    pub batch: u64,
}

#[derive(Debug, Serialize)]
pub struct Rates {
    pub window_ms: u64,
    pub tokens_per_s: f64,
    /// Tasks that ended, however they ended.
    pub tasks_completed_per_s: f64,
    /// Tasks that ended in an error other than a client's cancel.
    pub tasks_failed_per_s: f64,
    pub tasks_admitted_per_s: f64,
    pub tasks_rejected_per_s: f64,
}

/// What a pool's flags say, in one word.
pub fn pool_state(p: &OrchPool) -> String {
    if p.draining {
        "draining".into()
    } else if p.phase != "serving" {
        p.phase.clone()
    } else if !p.healthy {
        "unhealthy".into()
    } else if p.ejected_for_ms.is_some() {
        "ejected".into()
    } else {
        "ready".into()
    }
}

/// Gathers the report. The pool list comes first: a refused token or an unreachable
/// orchestratord fails the whole command; the other parts degrade to a note.
pub async fn gather(c: &OrchClient, window: Duration) -> Result<StatusReport, ClientError> {
    let pools = c.pools().await?.pools;
    let (version, capabilities, ready, nodes, first) = tokio::join!(
        c.version(),
        c.capabilities(),
        c.ready(),
        c.nodes(),
        c.metrics_text()
    );
    let first = first.ok().map(|t| (Instant::now(), exposition::parse(&t)));
    let second = match &first {
        Some(_) if !window.is_zero() => {
            tokio::time::sleep(window).await;
            c.metrics_text()
                .await
                .ok()
                .map(|t| (Instant::now(), exposition::parse(&t)))
        }
        _ => None,
    };
    let latest = second
        .as_ref()
        .or(first.as_ref())
        .map(|(_, s)| s.as_slice());
    let rates = match (&first, &second) {
        (Some(a), Some(b)) => Some(rates(a, b)),
        _ => None,
    };
    let (ready, not_ready_reason) = match ready {
        Ok(_) => (true, None),
        Err(ClientError::Api { error, .. }) => (false, Some(error.message)),
        Err(e) => (false, Some(e.to_string())),
    };
    Ok(StatusReport {
        url: c.base().to_string(),
        version: version.ok().map(|v| v.version),
        profile: capabilities.ok().map(|c| c.profile),
        ready,
        not_ready_reason,
        pools: pools
            .into_iter()
            .map(|pool| PoolRow {
                state: pool_state(&pool),
                tokens_per_s: rates.as_ref().and_then(|_| {
                    pool_tokens_per_s(first.as_ref()?, second.as_ref()?, &pool.pool_id)
                }),
                pool,
            })
            .collect(),
        nodes: nodes_section(nodes),
        queue: latest.map(queue_depth).unwrap_or_default(),
        rates,
    })
}

fn nodes_section(
    nodes: Result<llorch_contracts::meta::NodesResponse, ClientError>,
) -> NodesSection {
    let (note, nodes) = match nodes {
        Ok(n) if n.nodes.is_empty() => (
            Some("none (HOME: pools come from the handoff directory; CLOUD: no node configured or registered)".to_string()),
            n.nodes,
        ),
        Ok(n) => (None, n.nodes),
        Err(ClientError::Api { status: 403, .. }) => {
            return NodesSection {
                listed: false,
                note: Some(
                    "not listed: this token may not list nodes (the admin token can)".into(),
                ),
                nodes: Vec::new(),
            }
        }
        Err(e) => {
            return NodesSection {
                listed: false,
                note: Some(format!("not listed: {e}")),
                nodes: Vec::new(),
            }
        }
    };
    NodesSection {
        listed: true,
        note,
        nodes,
    }
}

fn queue_depth(samples: &[Sample]) -> QueueDepth {
    let depth = |priority: &str| {
        exposition::sum(samples, "queue_depth", |s| {
            s.label("priority") == Some(priority)
        })
        .unwrap_or(0.0)
        .max(0.0) as u64
    };
    QueueDepth {
        interactive: depth("interactive"),
        batch: depth("batch"),
    }
}

type Scrape = (Instant, Vec<Sample>);

/// The per-second increase of a counter between two scrapes (a restart in between, which
/// resets counters, counts as no increase).
fn per_second(a: &Scrape, b: &Scrape, name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    let secs = b.0.duration_since(a.0).as_secs_f64();
    let before = exposition::sum(&a.1, name, &keep).unwrap_or(0.0);
    let after = exposition::sum(&b.1, name, &keep).unwrap_or(0.0);
    if secs <= 0.0 {
        return 0.0;
    }
    (after - before).max(0.0) / secs
}

fn rates(a: &Scrape, b: &Scrape) -> Rates {
    Rates {
        window_ms: b.0.duration_since(a.0).as_millis() as u64,
        tokens_per_s: per_second(a, b, "tokens_out_total", |_| true),
        tasks_completed_per_s: per_second(a, b, "tasks_completed_total", |_| true),
        tasks_failed_per_s: per_second(a, b, "tasks_completed_total", |s| {
            !matches!(s.label("outcome"), Some("end") | Some("CANCELLED"))
        }),
        tasks_admitted_per_s: per_second(a, b, "tasks_enqueued_total", |_| true),
        tasks_rejected_per_s: per_second(a, b, "tasks_rejected_total", |_| true),
    }
}

fn pool_tokens_per_s(a: &Scrape, b: &Scrape, pool_id: &str) -> Option<f64> {
    let keep = |s: &Sample| s.label("pool_id") == Some(pool_id);
    exposition::sum(&b.1, "tokens_out_total", keep)?;
    Some(per_second(a, b, "tokens_out_total", keep))
}

/// The pool table (`llorch pools`, `llorch status`).
pub fn pools_table(rows: &[PoolRow]) -> Table {
    let mut t = Table::new(&[
        "POOL",
        "MODEL",
        "STATE",
        "SLOTS BUSY",
        "CTX/SLOT",
        "NODE",
        "ENGINE",
        "TOKENS/S",
        "LAST ERROR",
    ]);
    for r in rows {
        let p = &r.pool;
        t.row(vec![
            p.pool_id.clone(),
            p.model_id.clone(),
            r.state.clone(),
            format!("{}/{}", p.in_flight, p.slots_total),
            or_dash(p.ctx_max),
            or_dash(p.node_id.as_ref()),
            format!("{} {}", p.engine, p.engine_version.as_deref().unwrap_or("")),
            or_dash(r.tokens_per_s.map(|v| format!("{v:.1}"))),
            or_dash(p.last_error.as_ref()),
        ]);
    }
    t
}

/// The node table (`llorch nodes`, `llorch status`).
pub fn nodes_table(nodes: &[NodeView]) -> Table {
    let mut t = Table::new(&[
        "NODE",
        "ADDRESS",
        "ONLINE",
        "POOLS",
        "GPUS",
        "HEARTBEAT",
        "LAST ERROR",
    ]);
    for n in nodes {
        t.row(vec![
            or_dash(n.node_id.as_ref()),
            n.address.clone(),
            if n.online { "yes" } else { "no" }.into(),
            if n.pools.is_empty() {
                "-".into()
            } else {
                n.pools.join(",")
            },
            n.gpus.len().to_string(),
            or_dash(n.last_heartbeat_ms_ago.map(|ms| format!("{ms} ms ago"))),
            or_dash(n.last_error.as_ref()),
        ]);
    }
    t
}

/// The human form of the report.
pub fn render(r: &StatusReport) -> String {
    let mut out = format!("orchestratord {}", r.url);
    if let Some(v) = &r.version {
        out.push_str(&format!(" · version {v}"));
    }
    if let Some(p) = &r.profile {
        out.push_str(&format!(" · profile {p}"));
    }
    match (&r.ready, &r.not_ready_reason) {
        (true, _) => out.push_str(" · ready"),
        (false, Some(why)) => out.push_str(&format!(" · NOT READY ({why})")),
        (false, None) => out.push_str(" · NOT READY"),
    }
    out.push_str("\n\n");
    if r.pools.is_empty() {
        out.push_str("POOLS  none known\n");
    } else {
        out.push_str(&pools_table(&r.pools).render());
        out.push('\n');
    }
    out.push('\n');
    if r.nodes.nodes.is_empty() {
        out.push_str(&format!(
            "NODES  {}\n",
            r.nodes.note.as_deref().unwrap_or("none")
        ));
    } else {
        out.push_str(&nodes_table(&r.nodes.nodes).render());
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&format!(
        "QUEUE  interactive {} · batch {}\n",
        r.queue.interactive, r.queue.batch
    ));
    match &r.rates {
        Some(x) => out.push_str(&format!(
            "RATES  over {:.1} s: {:.1} tokens/s · {:.2} tasks/s ended ({:.2} failed) · {:.2} admitted/s · {:.2} rejected/s\n",
            x.window_ms as f64 / 1000.0,
            x.tokens_per_s,
            x.tasks_completed_per_s,
            x.tasks_failed_per_s,
            x.tasks_admitted_per_s,
            x.tasks_rejected_per_s
        )),
        None => out.push_str("RATES  not measured (/metrics unreadable, or --window-ms 0)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(id: &str) -> OrchPool {
        OrchPool {
            pool_id: id.into(),
            model_id: "tiny".into(),
            url: "http://127.0.0.1:1".into(),
            manager: None,
            slots_total: 2,
            ctx_max: Some(512),
            engine: "llamacpp".into(),
            engine_version: Some("b1".into()),
            node_id: None,
            device_mask: None,
            healthy: true,
            draining: false,
            last_error: None,
            in_flight: 1,
            phase: "serving".into(),
            vram_free_bytes: None,
            ejected_for_ms: None,
        }
    }

    #[test]
    fn a_pools_state_is_one_word_from_its_flags() {
        let mut p = pool("p0");
        assert_eq!(pool_state(&p), "ready");
        p.ejected_for_ms = Some(1000);
        assert_eq!(pool_state(&p), "ejected");
        p.healthy = false;
        assert_eq!(pool_state(&p), "unhealthy");
        p.phase = "restarting".into();
        assert_eq!(pool_state(&p), "restarting");
        p.draining = true;
        assert_eq!(pool_state(&p), "draining");
    }

    #[test]
    fn rates_are_increases_per_second_and_a_reset_counts_as_none() {
        let t0 = Instant::now();
        let a = (
            t0,
            exposition::parse("tokens_out_total{pool_id=\"p0\"} 100\ntasks_completed_total{outcome=\"end\",pool_id=\"p0\",api=\"v2\"} 10\ntasks_completed_total{outcome=\"WORKER_RESET\",pool_id=\"p0\",api=\"v2\"} 1\ntasks_rejected_total{reason=\"queue_full\"} 50\n"),
        );
        let b = (
            t0 + Duration::from_secs(2),
            exposition::parse("tokens_out_total{pool_id=\"p0\"} 300\ntasks_completed_total{outcome=\"end\",pool_id=\"p0\",api=\"v2\"} 14\ntasks_completed_total{outcome=\"WORKER_RESET\",pool_id=\"p0\",api=\"v2\"} 3\ntasks_rejected_total{reason=\"queue_full\"} 0\nqueue_depth{priority=\"batch\"} 4\n"),
        );
        let r = rates(&a, &b);
        assert_eq!(r.window_ms, 2000);
        assert_eq!(r.tokens_per_s, 100.0);
        assert_eq!(r.tasks_completed_per_s, 3.0);
        assert_eq!(r.tasks_failed_per_s, 1.0);
        assert_eq!(r.tasks_rejected_per_s, 0.0, "a restart reset the counter");
        assert_eq!(pool_tokens_per_s(&a, &b, "p0"), Some(100.0));
        assert_eq!(pool_tokens_per_s(&a, &b, "p9"), None);
        let q = queue_depth(&b.1);
        assert_eq!((q.interactive, q.batch), (0, 4));
    }
}
