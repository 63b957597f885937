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
    n.shutdown().await;
    stop.cancel();
}
