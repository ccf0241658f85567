//! Trace export as documented: `OTEL_EXPORTER_OTLP_ENDPOINT` on port 4317 speaks gRPC and on
//! port 4318 HTTP/protobuf when no protocol variable is set. A live pool-managerd exports to
//! in-process receivers of each kind, each on OTLP's real port at a loopback address of its
//! own (127.0.0.0/8 is all loopback on Linux), so no collector on the machine is in the way.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use llorch_test_support::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use parking_lot::Mutex;
use prost::Message;
use tokio::net::TcpListener;
use tokio::process::Command;

/// What one receiver got: the request path and content type of each export, and the spans.
#[derive(Debug, Default)]
struct Received {
    exports: Vec<(String, String)>,
    /// `(service.name, span name)`.
    spans: Vec<(String, String)>,
}

type Sink = Arc<Mutex<Received>>;

fn record(sink: &Sink, path: String, content_type: String, req: ExportTraceServiceRequest) {
    let mut got = sink.lock();
    got.exports.push((path, content_type));
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
                    s.clone()
                }
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.spans.push((service.clone(), s.name));
            }
        }
    }
}

/// Binds `port` on some loopback address 127.0.0.x not in use.
async fn bind_loopback(port: u16, first: u8) -> TcpListener {
    for x in (first..=250).chain(2..first) {
        if let Ok(l) = TcpListener::bind(SocketAddr::from(([127, 0, 0, x], port))).await {
            return l;
        }
    }
    panic!("no loopback address 127.0.0.2-250 has port {port} free");
}

/// An OTLP/gRPC receiver: HTTP/2 with gRPC framing, answering every export with an empty
/// `ExportTraceServiceResponse` and `grpc-status: 0`.
async fn grpc_receiver(listener: TcpListener, sink: Sink) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let sink = sink.clone();
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(sock).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let path = req.uri().path().to_string();
                    let content_type = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let mut body = req.into_body();
                    let mut bytes = Vec::new();
                    while let Some(Ok(chunk)) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        bytes.extend_from_slice(&chunk);
                    }
                    // gRPC message: compressed flag, 4-byte big-endian length, the message.
                    assert!(bytes.len() >= 5 && bytes[0] == 0, "{bytes:?}");
                    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
                    let msg = &bytes[5..5 + len as usize];
                    record(
                        &sink,
                        path,
                        content_type,
                        ExportTraceServiceRequest::decode(msg).unwrap(),
                    );
                    let head = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc")
                        .body(())
                        .unwrap();
                    let mut send = respond.send_response(head, false).unwrap();
                    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), false)
                        .unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    send.send_trailers(trailers).unwrap();
                });
            }
        });
    }
}

/// An OTLP/HTTP receiver (protobuf bodies on `/v1/traces`).
async fn http_receiver(listener: TcpListener, sink: Sink) {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                let content_type = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                record(
                    &sink,
                    "/v1/traces".into(),
                    content_type,
                    ExportTraceServiceRequest::decode(body).unwrap(),
                );
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            },
        ),
    );
    axum::serve(listener, app).await.unwrap();
}

/// A pool-managerd without pools exporting to `endpoint` (no protocol variable): a few
/// requests make request spans, SIGTERM flushes them.
async fn run_node_exporting_to(endpoint: &str, dir: &std::path::Path) -> String {
    // One directory per exporter (two nodes run side by side).
    let name: String = endpoint.chars().filter(char::is_ascii_digit).collect();
    let log = dir.join(format!("pool-managerd-{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut node = Command::new(workspace_binary("pool-managerd"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("RUST_LOG", "info")
        .env("POOL_MANAGERD_BIND_ADDR", "127.0.0.1:0")
        .env("POOL_MANAGERD_ALLOW_UNAUTHENTICATED_LOOPBACK", "true")
        .env("POOL_MANAGERD_RUNTIME_DIR", dir.join(format!("run-{name}")))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = logged_addr(
        &mut node,
        &log,
        "pool-managerd listening",
        Duration::from_secs(20),
    )
    .await;
    let health = format!("http://{addr}/health");
    wait_http_ok("pool-managerd health", &health, Duration::from_secs(20)).await;
    for _ in 0..3 {
        reqwest::get(&health).await.unwrap();
    }
    signal(node.id().unwrap(), "-TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), node.wait())
        .await
        .expect("pool-managerd did not stop")
        .unwrap();
    assert!(status.success(), "{status}");
    std::fs::read_to_string(&log).unwrap()
}

// covers: OBS-6109
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_on_4317_exports_over_grpc_and_one_on_4318_over_http_without_a_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let first = 2 + (std::process::id() % 200) as u8;
    let grpc = bind_loopback(4317, first).await;
    let http = bind_loopback(4318, first).await;
    let grpc_url = format!("http://{}", grpc.local_addr().unwrap());
    let http_url = format!("http://{}", http.local_addr().unwrap());
    let (grpc_got, http_got) = (Sink::default(), Sink::default());
    let g = tokio::spawn(grpc_receiver(grpc, grpc_got.clone()));
    let h = tokio::spawn(http_receiver(http, http_got.clone()));

    let (grpc_log, http_log) = tokio::join!(
        run_node_exporting_to(&grpc_url, dir.path()),
        run_node_exporting_to(&http_url, dir.path())
    );
    for log in [&grpc_log, &http_log] {
        assert!(!log.contains("could not start"), "{log}");
    }
    let grpc_got = grpc_got.lock();
    assert!(
        !grpc_got.exports.is_empty(),
        "nothing over gRPC: {grpc_log}"
    );
    for (path, content_type) in &grpc_got.exports {
        assert_eq!(
            path,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert!(
            content_type.starts_with("application/grpc"),
            "{content_type}"
        );
    }
    assert!(
        grpc_got
            .spans
            .iter()
            .any(|(service, name)| service == "pool-managerd" && name == "request"),
        "{:?}",
        grpc_got.spans
    );
    let http_got = http_got.lock();
    assert!(
        !http_got.exports.is_empty(),
        "nothing over HTTP: {http_log}"
    );
    assert!(http_got
        .exports
        .iter()
        .all(|(_, content_type)| content_type == "application/x-protobuf"));
    assert!(
        http_got
            .spans
            .iter()
            .any(|(service, name)| service == "pool-managerd" && name == "request"),
        "{:?}",
        http_got.spans
    );
    g.abort();
    h.abort();
}
