//! Logging and tracing of both daemons.
//!
//! - Logs: `tracing` to stderr, human-readable or JSON lines (`*_LOG_FORMAT`), filter from
//!   `RUST_LOG` (default `info`), ANSI colours only on a terminal.
//! - Traces: exported over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set — otherwise no OpenTelemetry layer exists at
//!   all. `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` picks gRPC, anything else HTTP/protobuf. Resource:
//!   `service.name`, `service.version`, `node_id`.
//! - Propagation: W3C `traceparent`, injected into requests to the other daemon and extracted
//!   from incoming requests, so one task is one trace across both processes.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(error) = p.shutdown() {
                eprintln!("trace exporter shutdown failed: {error}");
            }
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

fn provider(service: &'static str, node_id: &str) -> Result<SdkTracerProvider, String> {
    let grpc = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").is_ok_and(|p| p == "grpc");
    let exporter = if grpc {
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
    } else {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
    }
    .map_err(|e| e.to_string())?;
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("node_id", node_id.to_string()),
        ])
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Installs the global subscriber. Call once, early in `main`.
pub fn init(service: &'static str, node_id: &str, json: bool) -> Telemetry {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .boxed()
    } else {
        fmt.boxed()
    };
    let (otel, provider, problem) = if otlp_configured() {
        match provider(service, node_id) {
            Ok(p) => {
                opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
                let layer = tracing_opentelemetry::layer().with_tracer(p.tracer(service));
                (Some(layer), Some(p), None)
            }
            Err(e) => (None, None, Some(e)),
        }
    } else {
        (None, None, None)
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    if let Some(error) = problem {
        tracing::warn!(%error, "OTLP trace export is configured but could not start; tracing off");
    }
    Telemetry { provider }
}

use tracing_subscriber::Layer as _;

/// Adds `traceparent` for `span` to outgoing request headers (no-op when tracing is off).
pub fn inject(span: &tracing::Span, headers: &mut axum::http::HeaderMap) {
    if span.is_disabled() {
        return;
    }
    let cx = span.context();
    TraceContextPropagator::new()
        .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(headers));
}

/// Makes `span` a child of the trace named by the request's `traceparent`, if any.
pub fn set_parent_from(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

/// A span's trace context, kept after the span itself has closed (a task's admission span
/// closes when admission ends; its placement, dispatch and SSE spans come later).
#[derive(Clone, Default)]
pub struct TraceContext(opentelemetry::Context);

impl std::fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TraceContext")
    }
}

/// The trace context of `span`, for children created after it closes.
pub fn capture(span: &tracing::Span) -> TraceContext {
    if span.is_disabled() {
        return TraceContext::default();
    }
    TraceContext(span.context())
}

/// Makes `span` a child of `cx` in the exported trace.
pub fn adopt(span: &tracing::Span, cx: &TraceContext) {
    if !span.is_disabled() {
        let _ = span.set_parent(cx.0.clone());
    }
}
