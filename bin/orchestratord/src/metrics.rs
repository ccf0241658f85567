//! Prometheus metrics of orchestratord (DESIGN §3, issue list). Every sample comes from a real
//! event; gauges are set where their value changes.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub tasks_enqueued: IntCounterVec,
    pub tasks_started: IntCounterVec,
    pub tasks_canceled: IntCounterVec,
    pub tasks_rejected: IntCounterVec,
    pub key_tasks: IntCounterVec,
    pub key_tokens_out: IntCounterVec,
    pub journal_errors: prometheus::IntCounter,
    pub recovered_tasks: IntCounterVec,
    pub prefix_placements: IntCounterVec,
    pub prefix_blocks: IntCounterVec,
    pub engine_prompt_tokens: IntCounterVec,
    pub tasks_completed: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub admission_latency_ms: Histogram,
    pub first_token_ms: HistogramVec,
    pub decode_ms: HistogramVec,
    pub tokens_out: IntCounterVec,
    pub pool_health_check_ms: HistogramVec,
    pub pool_health_checks: IntCounterVec,
    pub pool_ejections: IntCounterVec,
    pools_available: IntGaugeVec,
    node_online: IntGaugeVec,
    auth_failures: IntCounterVec,
    per_address_refusals: IntCounter,
    /// Tokens and first-token latency of the last minutes, for the console (`GET /v2/overview`).
    pub rates: std::sync::Arc<crate::activity::Rates>,
    /// Per-key series carry the key's name (ORCHD_METRICS_KEY_LABELS=true); otherwise every
    /// key counts under `key="-"`: the open `/metrics` names no key and tells no key's volume.
    key_labels: std::sync::atomic::AtomicBool,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
    5000.0, 10000.0, 30000.0,
];

impl Metrics {
    /// Per-key series by key name from now on (ORCHD_METRICS_KEY_LABELS).
    pub fn name_keys(&self, on: bool) {
        self.key_labels
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The `key` label of a per-key series: the key's name, or `-` unless key labels are on.
    pub fn key<'a>(&self, name: &'a str) -> &'a str {
        if self.key_labels.load(std::sync::atomic::Ordering::Relaxed) {
            name
        } else {
            "-"
        }
    }

    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, labels: &[&str]| -> Result<HistogramVec, prometheus::Error> {
                let h = HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    labels,
                )?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let m = Self {
            tasks_enqueued: counter("tasks_enqueued_total", "Tasks admitted to the queue, by priority and API (v2, openai).", &["priority", "api"])?,
            tasks_started: counter("tasks_started_total", "Tasks dispatched to a pool (retries count again).", &["pool_id"])?,
            tasks_canceled: counter("tasks_canceled_total", "Tasks cancelled, by stage (queued, running).", &["stage"])?,
            tasks_rejected: counter("tasks_rejected_total", "Submissions refused, by reason.", &["reason"])?,
            key_tasks: counter(
                "orchd_key_tasks_total",
                "Submissions by key name (key=\"-\" unless ORCHD_METRICS_KEY_LABELS=true): admitted, or refused by the key's rate (key_rate), concurrency (key_concurrency) or open-stream (key_streams) limit.",
                &["key", "outcome"],
            )?,
            journal_errors: {
                let c = prometheus::IntCounter::new(
                    "orchd_journal_errors_total",
                    "Journal writes that failed or did not answer in time (admissions refused with 503, first tokens or endings not made durable).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            prefix_placements: counter(
                "orchd_prefix_placements_total",
                "Dispatches of tasks with a prompt of at least one block, by whether the pool had served a prefix of it recently (hit) or not (miss).",
                &["outcome"],
            )?,
            engine_prompt_tokens: counter(
                "orchd_engine_prompt_tokens_total",
                "Prompt tokens of finished generations as the engine reported them: taken from its slot's cache (cached) or evaluated; cached / (cached + evaluated) is the measured prompt-cache hit rate.",
                &["kind"],
            )?,
            prefix_blocks: counter(
                "orchd_prefix_blocks_total",
                "Prompt blocks (64 bytes) of dispatched tasks (prompt), and how many of them the chosen pool had served recently (matched): matched / prompt is the estimated prompt-cache hit rate.",
                &["kind"],
            )?,
            recovered_tasks: counter(
                "orchd_recovered_tasks_total",
                "Tasks read back from the journal at start, by what became of them: requeued (never streamed), reset (ended WORKER_RESET: they were streaming), restored (already ended), expired (deadline passed).",
                &["outcome"],
            )?,
            key_tokens_out: counter(
                "orchd_key_tokens_out_total",
                "Tokens streamed to clients, by the name of the key that submitted the task (counted when the task ends).",
                &["key"],
            )?,
            tasks_completed: counter(
                "tasks_completed_total",
                "Tasks that reached their terminal event, by outcome (end or the error code), pool (none when never dispatched) and API (v2, openai).",
                &["outcome", "pool_id", "api"],
            )?,
            queue_depth: {
                let g = IntGaugeVec::new(Opts::new("queue_depth", "Tasks waiting in the queue."), &["priority"])?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            admission_latency_ms: {
                let h = Histogram::with_opts(
                    HistogramOpts::new("admission_latency_ms", "Time to validate and enqueue a submission.")
                        .buckets(LATENCY_BUCKETS.to_vec()),
                )?;
                registry.register(Box::new(h.clone()))?;
                h
            },
            first_token_ms: histogram("latency_first_token_ms", "Time from dispatch to the first token.", &["pool_id"])?,
            decode_ms: histogram("latency_decode_ms", "Time from the first token to the end of generation.", &["pool_id"])?,
            tokens_out: counter("tokens_out_total", "Token events streamed to clients.", &["pool_id"])?,
            pool_health_check_ms: histogram(
                "orchd_pool_health_check_duration_ms",
                "Duration of engine health probes.",
                &["pool_id"],
            )?,
            pool_health_checks: counter(
                "orchd_pool_health_checks_total",
                "Pool health checks by orchestratord (HOME: engine /health; CLOUD: pool-managerd polls), by outcome (ok, fail).",
                &["pool_id", "outcome"],
            )?,
            pool_ejections: counter(
                "orchd_pool_ejections_total",
                "Pools ejected from placement after failing dispatches in a row while their health probe passed.",
                &["pool_id"],
            )?,
            pools_available: {
                let g = IntGaugeVec::new(
                    Opts::new("orchd_pools_available", "1 when orchestratord may place work on the pool."),
                    &["pool_id"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            node_online: {
                let g = IntGaugeVec::new(
                    Opts::new("orchd_node_online", "CLOUD: 1 when the pool-managerd node answers polls (and heartbeats, if registered)."),
                    &["node"],
                )?;
                registry.register(Box::new(g.clone()))?;
                g
            },
            auth_failures: {
                let c = IntCounterVec::new(
                    Opts::new(
                        "auth_failures_total",
                        "Requests refused for their credentials (401, 403), by the route group they asked for (the role its routes need).",
                    ),
                    &["route_group"],
                )?;
                registry.register(Box::new(c.clone()))?;
                for group in llorch_http::ROUTE_GROUPS {
                    c.with_label_values(&[group.as_str()]).inc_by(0);
                }
                c
            },
            per_address_refusals: {
                let c = IntCounter::new(
                    "connections_refused_per_address_total",
                    "Connections closed at once: their source address held its most unauthenticated connections (ORCHD_MAX_UNAUTHENTICATED_PER_ADDRESS).",
                )?;
                registry.register(Box::new(c.clone()))?;
                c
            },
            registry,
            rates: std::sync::Arc::new(crate::activity::Rates::new(tokio::time::Instant::now())),
            key_labels: std::sync::atomic::AtomicBool::new(false),
        };
        for p in ["interactive", "batch"] {
            m.queue_depth.with_label_values(&[p]).set(0);
        }
        // Exported from the start (at 0), so a scrape and an alert see them before any event.
        for (counter, labels) in [
            (&m.prefix_placements, &["hit", "miss"][..]),
            (&m.prefix_blocks, &["matched", "prompt"][..]),
            (&m.engine_prompt_tokens, &["cached", "evaluated"][..]),
            (
                &m.recovered_tasks,
                &["requeued", "reset", "restored", "expired"][..],
            ),
        ] {
            for label in labels {
                counter.with_label_values(&[label]).inc_by(0);
            }
        }
        Ok(m)
    }

    /// Text exposition; pool and node gauges are set from their tables first, so a scrape
    /// always agrees with `GET /v2/pools` and `GET /v2/nodes`.
    pub fn render(&self, pools: &[(String, bool)], nodes: &[(String, bool)]) -> String {
        for group in llorch_http::ROUTE_GROUPS {
            sync_counter(
                &self.auth_failures.with_label_values(&[group.as_str()]),
                llorch_http::auth_failures_of(group),
            );
        }
        sync_counter(
            &self.per_address_refusals,
            llorch_http::per_address_refusals(),
        );
        // Series of pools that went away are dropped: pool ids come from handoff files and
        // nodes, and must not grow the exposition for ever.
        let current: std::collections::HashSet<&str> =
            pools.iter().map(|(id, _)| id.as_str()).collect();
        prune(&self.tasks_started, &current);
        prune(&self.tasks_completed, &current);
        prune(&self.first_token_ms, &current);
        prune(&self.decode_ms, &current);
        prune(&self.tokens_out, &current);
        prune(&self.pool_health_check_ms, &current);
        prune(&self.pool_health_checks, &current);
        prune(&self.pool_ejections, &current);
        self.pools_available.reset();
        for (id, ready) in pools {
            self.pools_available
                .with_label_values(&[id])
                .set(i64::from(*ready));
            // Exposed at 0 from the start, so a rate over it works before the first ejection.
            self.pool_ejections.with_label_values(&[id]).inc_by(0);
        }
        self.node_online.reset();
        for (node, online) in nodes {
            self.node_online
                .with_label_values(&[node])
                .set(i64::from(*online));
        }
        let mut buf = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%error, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Brings a counter up to a total counted elsewhere (a process-wide atomic).
pub(crate) fn sync_counter(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// Removes the series of `vec` whose `pool_id` is neither a current pool nor `none`.
fn prune<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    current: &std::collections::HashSet<&str>,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: std::collections::HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let gone = labels
                .get("pool_id")
                .is_some_and(|id| *id != "none" && !current.contains(id));
            if gone {
                let _ = vec.remove(&labels);
            }
        }
    }
}

/// A pool's `tokens_out_total` that also feeds the rate history: the runner counts each token
/// once, here.
#[derive(Clone)]
pub(crate) struct TokensOut {
    counter: IntCounter,
    rates: std::sync::Arc<crate::activity::Rates>,
}

impl TokensOut {
    pub fn new(metrics: &Metrics, pool_id: &str) -> Self {
        Self {
            counter: metrics.tokens_out.with_label_values(&[pool_id]),
            rates: metrics.rates.clone(),
        }
    }

    pub fn inc(&self) {
        self.counter.inc();
        self.rates.add_tokens(tokio::time::Instant::now(), 1);
    }
}
