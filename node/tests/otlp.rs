//! `observability.otlp_endpoint`: a request through a node reaches a collector as an OTLP/HTTP
//! protobuf POST to `/v1/traces` carrying its `request` span and request id. (Its own test
//! binary: it installs the process-wide tracing subscriber.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use common::*;
use kvmesh_node::telemetry::OtlpExport;
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

type Received = Arc<Mutex<Vec<(String, Bytes)>>>;

/// A collector that keeps each POST to /v1/traces (content type and body) and answers 200.
async fn collector() -> (String, Received, tokio_util::sync::CancellationToken) {
    let got: Received = Arc::default();
    let keep = got.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |headers: HeaderMap, body: Bytes| {
            let keep = keep.clone();
            async move {
                let ct = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                keep.lock().unwrap().push((ct, body));
                ""
            }
        }),
    );
    let (addr, stop) = serve_app(app).await;
    (format!("http://{addr}"), got, stop)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

// The exporter's batch thread waits on POSTs spawned onto this runtime, so it needs workers of
// its own while the test blocks on a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_the_collector_as_otlp_protobuf() {
    let (endpoint, got, stop) = collector().await;
    let otlp = Arc::new(OtlpExport::start(&endpoint, "otlp-test-node").unwrap());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::sink))
        .with(otlp.layer());
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", n.url()))
        .header("x-request-id", "otlp-req-42")
        .json(&chat("hello collector", json!({"max_tokens": 2})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let flush = otlp.clone();
    eventually("the request span is exported", Duration::from_secs(10), async || {
        let f = flush.clone();
        tokio::task::spawn_blocking(move || f.flush()).await.unwrap();
        got.lock().unwrap().iter().any(|(_, b)| contains(b, b"otlp-req-42"))
    })
    .await;
    let posts = got.lock().unwrap().clone();
    let (ct, body) = posts.iter().find(|(_, b)| contains(b, b"otlp-req-42")).unwrap();
    assert_eq!(ct, "application/x-protobuf");
    // Protobuf strings are raw UTF-8: the span name, the service and its attributes are there.
    assert!(contains(body, b"request"), "span name");
    assert!(contains(body, b"kvmesh") && contains(body, b"otlp-test-node"), "resource");
    assert!(contains(body, b"request_id"), "span attribute");
    // The stages' spans, children of the request's.
    let all: Vec<u8> = posts.iter().flat_map(|(_, b)| b.clone()).collect();
    for stage in ["admit", "tokenize", "hold", "route"] {
        assert!(contains(&all, stage.as_bytes()), "stage span {stage}");
    }
    n.shutdown().await;

    // One trace across two nodes to an engine: the client's trace id is in both nodes' spans
    // and in the `traceparent` the engine receives (whose parent is the serving node's span).
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let keep = seen.clone();
    let app = Router::new()
        .route("/health", axum::routing::get(|| async { "" }))
        .route("/metrics", axum::routing::get(|| async { "" }))
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "kvmesh-sim", "object": "model"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            post(move |headers: HeaderMap| {
                let keep = keep.clone();
                async move {
                    if let Some(t) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
                        keep.lock().unwrap().push(t.to_owned());
                    }
                    axum::Json(json!({"id": "x", "object": "chat.completion", "model": "kvmesh-sim",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
                }
            }),
        );
    let (engine_addr, engine_stop) = serve_app(app).await;
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "trace").unwrap();
    let mut wcfg = mesh_config(dir.path(), "trace", "worker", None);
    wcfg.engines = vec![entry(format!("http://{engine_addr}"))];
    let worker = node(wcfg).await;
    let mut ecfg = mesh_config(dir.path(), "trace", "edge", worker.mesh.as_ref().map(|m| m.advertise.to_string()));
    ecfg.role = kvmesh_node::config::NodeRole::Edge;
    let edge = node(ecfg).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    eventually("the edge routes to the worker's engine", Duration::from_secs(10), async || {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", edge.url()))
            .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
            .json(&chat("trace me", json!({"max_tokens": 1})))
            .send()
            .await
            .unwrap();
        r.status() == 200
    })
    .await;
    let got_parent = seen.lock().unwrap().last().cloned().expect("the engine got a traceparent");
    let parts: Vec<&str> = got_parent.split('-').collect();
    assert_eq!(parts.len(), 4, "{got_parent}");
    assert_eq!(parts[1], trace_id, "the engine continues the client's trace");
    assert_ne!(parts[2], client_span, "its parent is the serving node's span, not the client's");
    let id_bytes = hex::decode(trace_id).unwrap();
    let flush = otlp.clone();
    eventually("both nodes' spans carry the trace id", Duration::from_secs(10), async || {
        let f = flush.clone();
        tokio::task::spawn_blocking(move || f.flush()).await.unwrap();
        // Each node's `request` span (the edge's and the worker's) in the client's trace.
        let posts = got.lock().unwrap().clone();
        let with_trace: usize =
            posts.iter().map(|(_, b)| b.windows(16).filter(|w| *w == id_bytes.as_slice()).count()).sum();
        with_trace >= 2
    })
    .await;
    edge.shutdown().await;
    worker.shutdown().await;
    engine_stop.cancel();
    stop.cancel();
}
