//! Prometheus metrics of pool-managerd. Gauges are set from the registry at scrape time, so a
//! scrape always agrees with `GET /v2/pools`; counters count real events only.

use llorch_contracts::PoolStatus;
use prometheus::core::Collector;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    auth_failures: prometheus::IntCounterVec,
    per_address_refusals: prometheus::IntCounter,
    pub handoff_processed: IntCounterVec,
    pub handoff_duration_ms: HistogramVec,
    pub engine_restarts: IntCounterVec,
    pub health_checks: IntCounterVec,
    pub proxy_requests: IntCounterVec,
    pool_ready: GaugeVec,
    slots_total: GaugeVec,
    slots_free: GaugeVec,
    engine_tokens_per_second: GaugeVec,
    engine_requests_deferred: GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let handoff_processed = IntCounterVec::new(
            Opts::new(
                "pool_handoff_files_processed_total",
                "Handoff files processed, by outcome (registered, updated, retired, invalid, managed).",
            ),
            &["pool_id", "outcome"],
        )?;
        let handoff_duration_ms = HistogramVec::new(
            HistogramOpts::new(
                "pool_handoff_processing_duration_ms",
                "Time from a handoff file event to its pool being registered and probed, in ms.",
            )
            .buckets(vec![
                0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0,
            ]),
            &["pool_id"],
        )?;
        let engine_restarts = IntCounterVec::new(
            Opts::new(
                "pool_engine_restarts_total",
                "Engine restarts after a crash, a failed start or a hung engine.",
            ),
            &["pool_id"],
        )?;
        let health_checks = IntCounterVec::new(
            Opts::new(
                "pool_health_checks_total",
                "Engine health probes, by outcome (ok, fail).",
            ),
            &["pool_id", "outcome"],
        )?;
        let proxy_requests = IntCounterVec::new(
            Opts::new(
                "pool_proxy_requests_total",
                "Requests through the engine proxy, by outcome (ok, engine_error, unavailable, refused, timeout).",
            ),
            &["pool_id", "outcome"],
        )?;
        let pool_ready = GaugeVec::new(
            Opts::new("pool_ready", "1 when the pool can take work."),
            &["pool_id"],
        )?;
        let slots_total = GaugeVec::new(
            Opts::new(
                "pool_slots_total",
                "Slots (parallel sequences) of the pool's engine.",
            ),
            &["pool_id"],
        )?;
        let slots_free = GaugeVec::new(
            Opts::new("pool_slots_free", "Idle slots at the last health probe."),
            &["pool_id"],
        )?;
        let engine_tokens_per_second = GaugeVec::new(
            Opts::new(
                "pool_engine_tokens_per_second",
                "Generation throughput the engine reports (llamacpp:predicted_tokens_seconds).",
            ),
            &["pool_id"],
        )?;
        let engine_requests_deferred = GaugeVec::new(
            Opts::new(
                "pool_engine_requests_deferred",
                "Requests waiting inside the engine for a slot (llamacpp:requests_deferred); above 0 means the engine is oversubscribed.",
            ),
            &["pool_id"],
        )?;
        registry.register(Box::new(engine_tokens_per_second.clone()))?;
        registry.register(Box::new(engine_requests_deferred.clone()))?;
        registry.register(Box::new(handoff_processed.clone()))?;
        registry.register(Box::new(handoff_duration_ms.clone()))?;
        registry.register(Box::new(engine_restarts.clone()))?;
        registry.register(Box::new(health_checks.clone()))?;
        registry.register(Box::new(proxy_requests.clone()))?;
        registry.register(Box::new(pool_ready.clone()))?;
        registry.register(Box::new(slots_total.clone()))?;
        registry.register(Box::new(slots_free.clone()))?;
        let auth_failures = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "auth_failures_total",
                "Requests refused for their credentials (401, 403), by the route group they asked for (the role its routes need).",
            ),
            &["route_group"],
        )?;
        registry.register(Box::new(auth_failures.clone()))?;
        for group in llorch_http::ROUTE_GROUPS {
            auth_failures.with_label_values(&[group.as_str()]).inc_by(0);
        }
        let per_address_refusals = prometheus::IntCounter::new(
            "connections_refused_per_address_total",
            "Connections closed at once: their source address held its most unauthenticated connections (POOL_MANAGERD_MAX_UNAUTHENTICATED_PER_ADDRESS).",
        )?;
        registry.register(Box::new(per_address_refusals.clone()))?;
        Ok(Self {
            auth_failures,
            per_address_refusals,
            registry,
            handoff_processed,
            handoff_duration_ms,
            engine_restarts,
            health_checks,
            proxy_requests,
            pool_ready,
            slots_total,
            slots_free,
            engine_tokens_per_second,
            engine_requests_deferred,
        })
    }

    /// Starts a managed pool's counters at 0, so they exist from the first scrape.
    pub fn init_pool(&self, pool_id: &str) {
        self.engine_restarts.with_label_values(&[pool_id]).inc_by(0);
        for outcome in ["ok", "fail"] {
            self.health_checks
                .with_label_values(&[pool_id, outcome])
                .inc_by(0);
        }
        for outcome in ["ok", "engine_error", "unavailable"] {
            self.proxy_requests
                .with_label_values(&[pool_id, outcome])
                .inc_by(0);
        }
    }

    /// Engine-side numbers read from llama-server's own `/metrics` at a health probe.
    pub fn record_engine(&self, pool_id: &str, samples: &[(String, f64)]) {
        for (name, value) in samples {
            match name.as_str() {
                "llamacpp:predicted_tokens_seconds" => self
                    .engine_tokens_per_second
                    .with_label_values(&[pool_id])
                    .set(*value),
                "llamacpp:requests_deferred" => self
                    .engine_requests_deferred
                    .with_label_values(&[pool_id])
                    .set(*value),
                _ => {}
            }
        }
    }

    /// Renders the text exposition, with pool gauges taken from `pools`.
    pub fn render(&self, pools: &[PoolStatus]) -> String {
        let groups = llorch_http::ROUTE_GROUPS.map(|g| {
            (
                self.auth_failures.with_label_values(&[g.as_str()]),
                llorch_http::auth_failures_of(g),
            )
        });
        let refused = [(
            self.per_address_refusals.clone(),
            llorch_http::per_address_refusals(),
        )];
        for (counter, total) in groups.into_iter().chain(refused) {
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
        self.pool_ready.reset();
        self.slots_total.reset();
        self.slots_free.reset();
        // Engine gauges only for pools that still exist.
        for vec in [
            &self.engine_tokens_per_second,
            &self.engine_requests_deferred,
        ] {
            for family in vec.collect() {
                for m in family.get_metric() {
                    let id = m
                        .get_label()
                        .iter()
                        .find(|l| l.name() == "pool_id")
                        .map(|l| l.value().to_string());
                    if let Some(id) = id {
                        if !pools.iter().any(|p| p.pool_id == id) {
                            let _ = vec.remove_label_values(&[&id]);
                        }
                    }
                }
            }
        }
        for p in pools {
            let id = p.pool_id.as_str();
            self.pool_ready
                .with_label_values(&[id])
                .set(if p.ready { 1.0 } else { 0.0 });
            self.slots_total
                .with_label_values(&[id])
                .set(f64::from(p.slots_total));
            self.slots_free
                .with_label_values(&[id])
                .set(f64::from(p.slots_free));
        }
        let mut buf = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(%error, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
