//! Logging and tracing of both daemons.
//!
//! - Logs: `tracing` to stderr, human-readable or JSON lines (`*_LOG_FORMAT`), filter from
//!   `RUST_LOG` (default `info`), ANSI colours only on a terminal.
//! - Traces: exported over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set — otherwise no OpenTelemetry layer exists at
//!   all. The transport is `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else
//!   `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`; `http/json` is sent as
//!   protobuf, which every OTLP/HTTP receiver takes); with neither set, the endpoint's port
//!   decides: 4317 (OTLP's gRPC port) is gRPC, anything else HTTP/protobuf (4318 is OTLP/HTTP's
//!   port). Resource: `service.name`, `service.version`, `node_id`.
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

/// The environment variables this crate reads, besides each daemon's own settings.
pub const ENV_READ: &[&str] = &[
    "RUST_LOG",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
];

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// The OTLP transport of the trace exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OtlpTransport {
    Grpc,
    HttpProtobuf,
}

/// OTLP's gRPC port: an endpoint on it speaks gRPC when no protocol is configured.
const OTLP_GRPC_PORT: u16 = 4317;

/// The transport the environment asks for (`var` reads a variable): the protocol variables
/// first, else the endpoint's port. An unknown protocol is an error naming it.
fn otlp_transport(var: impl Fn(&str) -> Option<String>) -> Result<OtlpTransport, String> {
    let set = |name: &str| {
        var(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = set(name) {
            return match p.to_ascii_lowercase().as_str() {
                "grpc" => Ok(OtlpTransport::Grpc),
                "http/protobuf" | "http/json" => Ok(OtlpTransport::HttpProtobuf),
                _ => Err(format!(
                    "{name}={p:?} is not one of: grpc, http/protobuf, http/json"
                )),
            };
        }
    }
    let endpoint = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .unwrap_or_default();
    Ok(if url_port(&endpoint) == Some(OTLP_GRPC_PORT) {
        OtlpTransport::Grpc
    } else {
        OtlpTransport::HttpProtobuf
    })
}

/// The explicit port of an `http(s)://host:port/…` URL.
fn url_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let (host, port) = host_port.rsplit_once(':')?;
    // `[::1]` without a port splits inside the brackets.
    if host.starts_with('[') && !host.ends_with(']') {
        return None;
    }
    port.parse().ok()
}

fn provider(service: &'static str, node_id: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let transport = otlp_transport(|v| std::env::var(v).ok())?;
    // The protocol is set explicitly, so the crate's own reading of the variables (which knows
    // no port rule, and no http/json without its feature) cannot contradict this choice.
    let exporter = match transport {
        OtlpTransport::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(Protocol::Grpc)
            .build(),
        OtlpTransport::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(env: &[(&str, &str)]) -> Result<OtlpTransport, String> {
        otlp_transport(|name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    // covers: OBS-6109
    #[test]
    fn without_a_protocol_port_4317_is_grpc_and_4318_or_any_other_is_http() {
        use OtlpTransport::*;
        let ep = "OTEL_EXPORTER_OTLP_ENDPOINT";
        assert_eq!(transport(&[(ep, "http://collector:4317")]), Ok(Grpc));
        assert_eq!(transport(&[(ep, "http://10.0.0.5:4317/")]), Ok(Grpc));
        assert_eq!(transport(&[(ep, "https://[::1]:4317")]), Ok(Grpc));
        assert_eq!(
            transport(&[(ep, "http://collector:4318")]),
            Ok(HttpProtobuf)
        );
        assert_eq!(transport(&[(ep, "http://collector")]), Ok(HttpProtobuf));
        assert_eq!(transport(&[(ep, "http://[::1]")]), Ok(HttpProtobuf));
        assert_eq!(
            transport(&[(ep, "http://c:9999/otlp:4317")]),
            Ok(HttpProtobuf),
            "a port-like path is not the port"
        );
        // The traces endpoint wins over the generic one, as in the exporter itself.
        assert_eq!(
            transport(&[
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://c:4318/v1/traces"
                ),
                (ep, "http://c:4317"),
            ]),
            Ok(HttpProtobuf)
        );
    }

    // covers: OBS-6109
    #[test]
    fn a_protocol_variable_beats_the_port_and_an_unknown_one_is_refused() {
        use OtlpTransport::*;
        let ep = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let p = "OTEL_EXPORTER_OTLP_PROTOCOL";
        assert_eq!(transport(&[ep, (p, "http/protobuf")]), Ok(HttpProtobuf));
        assert_eq!(transport(&[ep, (p, "http/json")]), Ok(HttpProtobuf));
        assert_eq!(
            transport(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (p, "GRPC")
            ]),
            Ok(Grpc)
        );
        assert_eq!(
            transport(&[
                ep,
                (p, "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
            ]),
            Ok(HttpProtobuf),
            "the traces protocol wins"
        );
        let e = transport(&[ep, (p, "grcp")]).unwrap_err();
        assert!(e.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grcp\""), "{e}");
    }
}
