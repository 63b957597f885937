//! Helpers shared by the node's integration tests: real nodes, real engine simulators and
//! scripted fake engines, all on loopback.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::{self, get};
use axum::Router;
use futures::StreamExt;
use kvmesh_node::config::{Config, EngineEntry};
use kvmesh_node::{Node, RunningNode};
use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub fn fast_engine() -> EngineConfig {
    EngineConfig { time_scale: 0.02, ..EngineConfig::default() }
}

pub async fn engine(cfg: EngineConfig, kv: bool) -> RunningEngine {
    EngineSim::start(cfg, "127.0.0.1:0", kv.then_some("tcp://127.0.0.1:0"), &CancellationToken::new()).await.unwrap()
}

pub fn node_config(engines: Vec<EngineEntry>) -> Config {
    Config {
        node_name: "test-node".into(),
        http_addr: "127.0.0.1:0".into(),
        engines,
        engine_poll_interval_ms: 100,
        engine_connect_timeout_ms: 500,
        ..Config::default()
    }
}

pub fn entry(url: String) -> EngineEntry {
    EngineEntry::new(url)
}

/// An engine simulator as a named engine with its KV events.
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn kv_entry(name: &str, e: &RunningEngine) -> EngineEntry {
    EngineEntry { name: Some(name.into()), kv_events: e.kv_events_endpoint.clone(), ..entry(e.url()) }
}

pub async fn node(cfg: Config) -> RunningNode {
    Node::start(cfg, &CancellationToken::new()).await.unwrap()
}

pub fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": content}]});
    if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
        o.extend(e);
    }
    b
}

pub async fn post_raw(base: &str, path: &str, body: Vec<u8>) -> (u16, reqwest::header::HeaderMap, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

pub async fn post(base: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let (s, h, t) = post_raw(base, "/v1/chat/completions", serde_json::to_vec(body).unwrap()).await;
    (s, h, serde_json::from_str(&t).unwrap_or(Value::String(t)))
}

/// Asserts an OpenAI error envelope with all four fields.
pub fn assert_openai_error(v: &Value) {
    let e = &v["error"];
    assert!(e["message"].is_string(), "no message in {v}");
    assert!(e["type"].is_string(), "no type in {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "param/code missing in {v}");
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.trim_start_matches('\n').strip_prefix("data: ")).map(str::to_owned).collect()
}

pub async fn scrape(url: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < timeout, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How a scripted engine answers chat completions.
#[derive(Clone, Copy)]
pub enum Script {
    /// Sends two chunks, then breaks the connection.
    FailMidStream,
    /// Answers 503 with an OpenAI error.
    Unavailable,
}

/// A fake engine that passes health and model checks, then misbehaves as scripted.
pub async fn scripted_engine(script: Script) -> (SocketAddr, CancellationToken) {
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "vllm:num_requests_running{engine=\"0\"} 0\n" }))
        .route("/v1/models", get(|| async { axum::Json(json!({"object":"list","data":[{"id":"kvmesh-sim","object":"model"}]})) }))
        .route(
            "/v1/chat/completions",
            routing::post(move || async move {
                match script {
                    Script::Unavailable => (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        axum::Json(json!({"error":{"message":"overloaded","type":"service_unavailable","param":null,"code":null}})),
                    )
                        .into_response(),
                    Script::FailMidStream => {
                        let chunks = futures::stream::iter(0..3).then(|i| async move {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            if i < 2 {
                                Ok::<_, std::io::Error>(Bytes::from(format!(
                                    "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"w{i}\"}}}}]}}\n\n"
                                )))
                            } else {
                                Err(std::io::Error::other("engine crashed"))
                            }
                        });
                        Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Body::from_stream(chunks))
                            .unwrap()
                    }
                }
            }),
        );
    serve_app(app).await
}

/// Serves `app` on a loopback port until the token is cancelled.
pub async fn serve_app(app: Router) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    });
    (addr, cancel)
}

/// A mesh node with the embedded simulator, its certificate made in `dir` (which holds the CA),
/// joining through `seed`, with fast gossip and polling for tests.
pub fn mesh_config(dir: &std::path::Path, cluster_id: &str, name: &str, seed: Option<String>) -> Config {
    kvmesh_transport::certs::create_node(dir, dir, name).unwrap();
    Config {
        node_name: name.into(),
        http_addr: "127.0.0.1:0".into(),
        quic_addr: "127.0.0.1:0".into(),
        seeds: seed.into_iter().collect(),
        tls_dir: Some(dir.to_path_buf()),
        cluster_id: cluster_id.into(),
        gossip_interval_ms: 100,
        load_publish_interval_ms: 100,
        summary_interval_ms: 200,
        engine_poll_interval_ms: 100,
        embedded: fast_engine(),
        ..Config::default()
    }
}
