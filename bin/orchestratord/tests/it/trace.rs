//! One task is one trace across both daemons (CLOUD on loopback), checked by an in-process
//! OTLP receiver.

use std::time::Duration;

use crate::cloud::{start_node, start_orchestratord};
use crate::harness::*;

/// One span as the in-process OTLP receiver got it.
#[derive(Debug, Clone)]
pub(crate) struct GotSpan {
    pub(crate) name: String,
    pub(crate) service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: Vec<(String, String)>,
    resource: Vec<(String, String)>,
}

fn kv_pairs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Vec<(String, String)> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// An OTLP/HTTP (protobuf) trace receiver on loopback, in this process.
pub(crate) async fn otlp_receiver() -> (String, std::sync::Arc<parking_lot::Mutex<Vec<GotSpan>>>) {
    use prost::Message;
    let got = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body).unwrap();
                for rs in req.resource_spans {
                    let resource = rs.resource.map(|r| kv_pairs(&r.attributes)).unwrap_or_default();
                    let service = resource.iter().find(|(k, _)| k == "service.name").map(|(_, v)| v.clone()).unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            sink.lock().push(GotSpan {
                                name: s.name,
                                service: service.clone(),
                                trace_id: s.trace_id,
                                span_id: s.span_id,
                                parent: s.parent_span_id,
                                attrs: kv_pairs(&s.attributes),
                                resource: resource.clone(),
                            });
                        }
                    }
                }
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

// covers: OBS-6108
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_trace_across_both_daemons() {
    let (otlp, spans) = otlp_receiver().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "node-t", &pool_toml("t0", 1, 2048), &otel).await;
    let mut env = vec![("ORCHD_POOL_MANAGERS", node.url.clone())];
    env.extend(otel.iter().cloned());
    let cloud = start_orchestratord(dir, &env).await;
    cloud
        .api
        .wait_healthy(&["t0"], Duration::from_secs(40))
        .await;
    let id = cloud.api.submit(task("traced", 8)).await;
    let events = cloud
        .api
        .http
        .get(format!("{}/v2/tasks/{id}/events", cloud.api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(events.contains("event: end"), "{events}");

    let wanted = [
        "admission",
        "placement",
        "dispatch",
        "sse_stream",
        "engine_proxy",
        "pool_health_check",
        "health_check",
        "handoff_processing",
    ];
    let got = wait_for("spans of both daemons", Duration::from_secs(15), || async {
        let got = spans.lock().clone();
        let task_traced = got.iter().any(|s| s.name == "engine_proxy");
        (task_traced && wanted.iter().all(|w| got.iter().any(|s| s.name == *w))).then_some(got)
    })
    .await;
    let admission = got
        .iter()
        .find(|s| s.name == "admission" && s.attrs.iter().any(|(k, v)| k == "task_id" && *v == id))
        .expect("admission span of the task");
    let trace = &admission.trace_id;
    let in_trace = |name: &str| {
        got.iter()
            .filter(|s| s.name == name && &s.trace_id == trace)
            .cloned()
            .collect::<Vec<_>>()
    };
    for child in ["placement", "dispatch", "sse_stream"] {
        let spans = in_trace(child);
        assert!(!spans.is_empty(), "no {child} span in the task's trace");
        assert!(
            spans.iter().all(|s| s.parent == admission.span_id),
            "{child} is not a child of admission"
        );
    }
    let dispatch = &in_trace("dispatch")[0];
    let proxy = in_trace("engine_proxy");
    assert_eq!(
        proxy.len(),
        1,
        "pool-managerd's engine_proxy is not in the task's trace"
    );
    assert_eq!(proxy[0].service, "pool-managerd");
    assert_eq!(dispatch.service, "orchestratord");
    // engine_proxy → (pool-managerd request span) → dispatch, across the process boundary.
    let mut cur = proxy[0].parent.clone();
    let mut reached = false;
    for _ in 0..5 {
        if cur == dispatch.span_id {
            reached = true;
            break;
        }
        match got.iter().find(|s| s.span_id == cur) {
            Some(p) => cur = p.parent.clone(),
            None => break,
        }
    }
    assert!(reached, "engine_proxy does not descend from dispatch");
    for s in [admission, dispatch, &proxy[0]] {
        assert!(s.resource.iter().any(|(k, _)| k == "node_id"), "{s:?}");
        assert!(
            s.resource
                .iter()
                .any(|(k, v)| k == "service.version" && !v.is_empty()),
            "{s:?}"
        );
    }
    // A crashed engine's restart is traced on the node too.
    let handoff = llorch_contracts::HandoffFile::parse(
        &std::fs::read(node.runtime_dir.join("t0.json")).unwrap(),
    )
    .unwrap();
    std::process::Command::new("kill")
        .args(["-KILL", &handoff.pid.unwrap().to_string()])
        .status()
        .unwrap();
    wait_for("engine_restart span", Duration::from_secs(15), || async {
        spans
            .lock()
            .iter()
            .any(|s| s.name == "engine_restart" && s.service == "pool-managerd")
            .then_some(())
    })
    .await;
    for s in &got {
        for (k, v) in &s.attrs {
            assert!(
                !v.contains(TOKEN) && !k.eq_ignore_ascii_case("authorization"),
                "secret in span {s:?}"
            );
        }
    }
}

// covers: OBS-6107
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tasks_correlation_id_is_in_both_daemons_json_logs() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(
        dir.path(),
        "node-a",
        &pool_toml("a0", 1, 1024),
        &[("POOL_MANAGERD_LOG_FORMAT", "json".into())],
    )
    .await;
    let pm_log = dir.path().join("node-a/pool-managerd.log");
    let cloud = start_orchestratord(
        dir,
        &[
            ("ORCHD_POOL_MANAGERS", node.url.clone()),
            ("ORCHD_LOG_FORMAT", "json".into()),
        ],
    )
    .await;
    cloud
        .api
        .wait_healthy(&["a0"], Duration::from_secs(40))
        .await;
    let correlation = "corr-join-7f3a91";
    let r = cloud
        .api
        .http
        .post(format!("{}/v2/tasks", cloud.api.base))
        .header("x-correlation-id", correlation)
        .json(&task("joined logs", 4))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<serde_json::Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    cloud.api.finish(&id, Duration::from_secs(30)).await;
    // Lines of a JSON log that carry the correlation id (in a field or an enclosing span).
    let lines_with = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v.to_string().contains(correlation))
            .collect()
    };
    let orch = wait_for("orchestratord's line", Duration::from_secs(5), || async {
        let lines = lines_with(&cloud.dir.path().join("orchestratord.log"));
        lines
            .iter()
            .any(|l| l["message"] == "task finished" && l.to_string().contains(&id))
            .then_some(lines)
    })
    .await;
    assert!(!orch.is_empty());
    let pm = wait_for("pool-managerd's line", Duration::from_secs(5), || async {
        let lines = lines_with(&pm_log);
        lines
            .iter()
            .any(|l| l["message"] == "engine request proxied")
            .then_some(lines)
    })
    .await;
    assert!(!pm.is_empty());
}
