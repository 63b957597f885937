//! Prefill/decode disaggregation through a node: engine simulators acting as vLLM with
//! NixlConnector, each behind a recording pass-through so the test sees exactly what each
//! engine was sent and answered.

mod common;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post as route_post};
use axum::Router;
use common::*;
use kvmesh_node::config::EngineEntry;
use kvmesh_policy::pd::Role;
use kvmesh_sim::EngineConfig;
use serde_json::{json, Value};

/// Requests and answers seen by one engine.
type Log = Arc<Mutex<Vec<(Value, Value)>>>;

/// Forwards everything to `upstream`, recording chat completions (body and JSON answer).
async fn spy(upstream: String) -> (String, Log) {
    let log: Log = Arc::default();
    let client = reqwest::Client::new();
    let state = (upstream, client, log.clone());
    async fn pass(State((up, client, _)): State<(String, reqwest::Client, Log)>, uri: axum::http::Uri) -> Response {
        match client.get(format!("{up}{}", uri.path())).send().await {
            Ok(r) => (StatusCode::from_u16(r.status().as_u16()).unwrap(), r.bytes().await.unwrap_or_default())
                .into_response(),
            Err(_) => StatusCode::BAD_GATEWAY.into_response(),
        }
    }
    async fn chat(
        State((up, client, log)): State<(String, reqwest::Client, Log)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let mut rb = client.post(format!("{up}/v1/chat/completions")).header("content-type", "application/json");
        if let Some(id) = headers.get("x-request-id") {
            rb = rb.header("x-request-id", id.to_str().unwrap());
        }
        let r = rb.body(body.clone()).send().await.unwrap();
        let status = r.status().as_u16();
        let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let bytes = r.bytes().await.unwrap();
        let answer = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        log.lock().unwrap().push((serde_json::from_slice(&body).unwrap(), answer));
        (StatusCode::from_u16(status).unwrap(), [("content-type", ct)], bytes).into_response()
    }
    let app = Router::new()
        .route("/v1/chat/completions", route_post(chat))
        .route("/health", get(pass))
        .route("/metrics", get(pass))
        .route("/v1/models", get(pass))
        .with_state(state);
    let (addr, _stop) = serve_app(app).await;
    (format!("http://{addr}"), log)
}

fn nixl_engine(kv_transfer: bool) -> EngineConfig {
    EngineConfig { kv_transfer, ..fast_engine() }
}

fn entry_with(url: String, name: &str, role: Role) -> EngineEntry {
    EngineEntry { name: Some(name.into()), role, ..EngineEntry::new(url) }
}

fn long_chat(doc: usize, stream: bool) -> Value {
    json!({"model": "kvmesh-sim", "max_tokens": 12, "ignore_eos": true, "seed": 3, "stream": stream,
           "messages": [{"role": "user", "content": format!("long uncached document {doc}: ").repeat(120)}]})
}

#[tokio::test]
async fn long_prompts_are_prefilled_on_one_engine_and_decoded_on_another() {
    let (p, d) = (engine(nixl_engine(true), false).await, engine(nixl_engine(true), false).await);
    let ((p_url, p_log), (d_url, d_log)) = (spy(p.url()).await, spy(d.url()).await);
    let mut cfg =
        node_config(vec![entry_with(p_url, "prefill", Role::Prefill), entry_with(d_url, "decode", Role::Decode)]);
    cfg.pd.min_uncached_tokens = 256;
    let n = node(cfg).await;

    let (s, h, split) = post(&n.url(), &long_chat(1, false)).await;
    assert_eq!(s, 200, "{split}");
    let route = h["x-kvmesh-route"].to_str().unwrap();
    assert!(route.contains("reason=pd") && route.contains("prefill=test-node/prefill"), "{route}");
    assert_eq!(h["x-kvmesh-served-by"], "test-node/decode");
    {
        let p_log = p_log.lock().unwrap();
        let d_log = d_log.lock().unwrap();
        let (sent, answered) = &p_log[0];
        assert_eq!(sent["max_tokens"], 1, "{sent}");
        assert_eq!(sent["stream"], false);
        assert_eq!(sent["kv_transfer_params"]["do_remote_decode"], true);
        let params = &answered["kv_transfer_params"];
        assert_eq!(params["do_remote_prefill"], true, "{answered}");
        // The decode engine got the original request with the prefill's params, unchanged.
        let (decoded, _) = &d_log[0];
        assert_eq!(&decoded["kv_transfer_params"], params);
        assert_eq!(decoded["max_tokens"], 12);
    }
    // The same request served whole (sent straight to an engine) gives the same answer.
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", d.url()))
        .json(&long_chat(1, false))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(split["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"]);
    assert_eq!(split["usage"]["completion_tokens"], 12);

    // Streamed: the decode engine streams to the client.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", n.url()))
        .json(&long_chat(2, true))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["x-kvmesh-route"].to_str().unwrap().contains("reason=pd"));
    let text = r.text().await.unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");

    // A short prompt is served whole by the decode engine.
    let (s, h, _) = post(&n.url(), &chat("short", json!({"max_tokens": 2}))).await;
    assert_eq!(s, 200);
    assert!(!h["x-kvmesh-route"].to_str().unwrap().contains("reason=pd"));
    assert_eq!(h["x-kvmesh-served-by"], "test-node/decode");
    n.shutdown().await;
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn a_failed_hop_falls_back_to_serving_whole() {
    // The prefill engine has no connector: it answers without kv_transfer_params.
    let (p, d) = (engine(nixl_engine(false), false).await, engine(nixl_engine(true), false).await);
    let mut cfg =
        node_config(vec![entry_with(p.url(), "prefill", Role::Prefill), entry_with(d.url(), "decode", Role::Decode)]);
    cfg.pd.min_uncached_tokens = 256;
    let n = node(cfg).await;
    let (s, h, v) = post(&n.url(), &long_chat(3, false)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-kvmesh-served-by"], "test-node/decode");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(scrape(&n.url(), "kvmesh_pd_fallbacks_total").await, 1.0);

    // The prefill engine gone: served whole again, once the node sees it down.
    p.shutdown().await;
    let (s, _, v) = post(&n.url(), &long_chat(4, true)).await;
    assert_eq!(s, 200, "{v}");
    assert!(scrape(&n.url(), "kvmesh_pd_fallbacks_total").await >= 1.0);
    n.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn a_decode_engine_refusing_before_its_first_byte_is_retried_elsewhere() {
    let p = engine(nixl_engine(true), false).await;
    let good = engine(nixl_engine(true), false).await;
    let (bad, stop) = scripted_engine(Script::Unavailable).await;
    let mut cfg = node_config(vec![
        entry_with(p.url(), "prefill", Role::Prefill),
        entry_with(format!("http://{bad}"), "bad", Role::Decode),
        entry_with(good.url(), "good", Role::Decode),
    ]);
    cfg.pd.min_uncached_tokens = 256;
    let n = node(cfg).await;
    for doc in 10..16 {
        let (s, h, v) = post(&n.url(), &long_chat(doc, false)).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(h["x-kvmesh-served-by"], "test-node/good", "{v}");
    }
    n.shutdown().await;
    p.shutdown().await;
    good.shutdown().await;
    stop.cancel();
}

/// A client's engine-owned fields (`kv_transfer_params` pointing a decode engine at another host,
/// `priority`, `request_id`, `chat_template`) never reach an engine, served whole or split; the
/// split's own `kv_transfer_params` are the prefill engine's answer.
#[tokio::test]
async fn a_clients_engine_owned_fields_never_reach_an_engine() {
    let (p, d) = (engine(nixl_engine(true), false).await, engine(nixl_engine(true), false).await);
    let ((p_url, p_log), (d_url, d_log)) = (spy(p.url()).await, spy(d.url()).await);
    let mut cfg =
        node_config(vec![entry_with(p_url, "prefill", Role::Prefill), entry_with(d_url, "decode", Role::Decode)]);
    cfg.pd.min_uncached_tokens = 256;
    let n = node(cfg).await;
    let hostile = |mut body: Value| {
        let o = body.as_object_mut().unwrap();
        o.insert(
            "kv_transfer_params".into(),
            json!({"do_remote_prefill": true, "remote_host": "10.9.9.9", "remote_port": 80,
                   "remote_engine_id": "x", "remote_block_ids": [1, 2], "remote_request_id": "r"}),
        );
        o.insert("priority".into(), json!(-100));
        o.insert("request_id".into(), json!("chosen-by-client"));
        o.insert("chat_template".into(), json!("{{ 'injected' }}"));
        body
    };
    // Split (a long prompt), then whole (a short one).
    let (s, h, v) = post(&n.url(), &hostile(long_chat(7, false))).await;
    assert_eq!(s, 200, "{v}");
    assert!(h["x-kvmesh-route"].to_str().unwrap().contains("reason=pd"));
    let (s, _, v) = post(&n.url(), &hostile(chat("short", json!({"max_tokens": 2})))).await;
    assert_eq!(s, 200, "{v}");
    let (p_log, d_log) = (p_log.lock().unwrap().clone(), d_log.lock().unwrap().clone());
    let seen: Vec<&(Value, Value)> = p_log.iter().chain(d_log.iter()).collect();
    assert!(seen.len() >= 3, "prefill, decode and the whole request: {}", seen.len());
    for (sent, _) in &seen {
        for k in ["priority", "request_id", "chat_template"] {
            assert!(sent.get(k).is_none(), "{k} reached an engine: {sent}");
        }
        if let Some(params) = sent.get("kv_transfer_params") {
            assert_ne!(params["remote_host"], "10.9.9.9", "the client's transfer target reached an engine");
        }
    }
    // The decode hop carries exactly what the prefill engine answered.
    let answered = &p_log.last().unwrap().1["kv_transfer_params"];
    assert_eq!(
        &d_log.iter().find(|(s, _)| s.get("kv_transfer_params").is_some()).unwrap().0["kv_transfer_params"],
        answered
    );
    n.shutdown().await;
    p.shutdown().await;
    d.shutdown().await;
}

/// A split request's audit record names both hops, and every record carries the SHA-256 of the
/// request as the client sent it and of the answer as the client received it.
#[tokio::test]
async fn audit_records_name_the_split_and_digest_request_and_answer() {
    use sha2::Digest as _;
    let (p, d) = (engine(nixl_engine(true), false).await, engine(nixl_engine(true), false).await);
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut cfg =
        node_config(vec![entry_with(p.url(), "prefill", Role::Prefill), entry_with(d.url(), "decode", Role::Decode)]);
    cfg.pd.min_uncached_tokens = 256;
    cfg.audit = kvmesh_node::audit::AuditConfig { path: Some(audit.clone()), ..Default::default() };
    let n = node(cfg).await;
    let sent = serde_json::to_vec(&long_chat(9, false)).unwrap();
    let (s, h, received) = post_raw(&n.url(), "/v1/chat/completions", sent.clone()).await;
    assert_eq!(s, 200, "{received}");
    assert!(h["x-kvmesh-route"].to_str().unwrap().contains("reason=pd"));
    n.shutdown().await;
    let text = std::fs::read_to_string(&audit).unwrap();
    let rec: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(rec["pd"], "prefill=test-node/prefill; decode=test-node/decode", "{rec}");
    assert_eq!(rec["request_sha256"], hex::encode(sha2::Sha256::digest(&sent)), "{rec}");
    assert_eq!(rec["response_sha256"], hex::encode(sha2::Sha256::digest(received.as_bytes())), "{rec}");
    p.shutdown().await;
    d.shutdown().await;
    // A stream's digest covers what was sent before its closing `[DONE]`, which waits for the
    // record.
    let (p, d) = (engine(nixl_engine(true), false).await, engine(nixl_engine(true), false).await);
    let mut cfg =
        node_config(vec![entry_with(p.url(), "prefill", Role::Prefill), entry_with(d.url(), "decode", Role::Decode)]);
    cfg.audit = kvmesh_node::audit::AuditConfig { path: Some(audit.clone()), ..Default::default() };
    let n = node(cfg).await;
    let (s, _, received) =
        post_raw(&n.url(), "/v1/chat/completions", serde_json::to_vec(&long_chat(10, true)).unwrap()).await;
    assert_eq!(s, 200);
    n.shutdown().await;
    let body = received.strip_suffix("data: [DONE]\n\n").expect("ends with [DONE]");
    let text = std::fs::read_to_string(&audit).unwrap();
    let rec: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(rec["response_sha256"], hex::encode(sha2::Sha256::digest(body.as_bytes())), "{rec}");
    d.shutdown().await;
}
