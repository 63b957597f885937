//! Draining: `POST /admin/drain` and graceful shutdown (the SIGTERM path) refuse new requests
//! with a retryable 503 `draining`, let open streams run to their end, lose no audit record,
//! and take the node out of its peers' view.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kvmesh_node::audit::AuditConfig;
use kvmesh_sim::EngineConfig;
use serde_json::{json, Value};

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Reads a whole SSE answer; panics on an error event or a missing `[DONE]`. Returns the
/// completion tokens the usage chunk reports.
async fn finish_stream(
    mut stream: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    mut text: String,
) -> u64 {
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("the stream is not cut")));
    }
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert!(!events.iter().any(|e| e.contains("\"error\"")), "error event in {text}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    usage["usage"]["completion_tokens"].as_u64().unwrap()
}

fn long_stream(tokens: u32) -> Value {
    chat(
        "Tell me a long story.",
        json!({"max_tokens": tokens, "stream": true, "stream_options": {"include_usage": true}}),
    )
}

#[tokio::test]
async fn drain_refuses_new_requests_while_the_open_stream_completes() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut cfg = node_config(vec![]);
    // Real time: about 6.5 ms a token, so 200 tokens stream for over a second.
    cfg.embedded = EngineConfig::default();
    cfg.audit = AuditConfig { path: Some(audit.clone()), ..Default::default() };
    let n = node(cfg).await;
    let url = n.url();
    let client = reqwest::Client::new();

    let r = client.post(format!("{url}/v1/chat/completions")).json(&long_stream(200)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = Box::pin(r.bytes_stream());
    let first = String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()).into_owned();

    let t = Instant::now();
    let d: Value = client.post(format!("{url}/admin/drain")).send().await.unwrap().json().await.unwrap();
    assert_eq!(d["draining"], true, "{d}");
    assert_eq!(d["already_draining"], false, "{d}");
    assert!(d["open_requests"].as_u64().unwrap() >= 1, "the stream is open: {d}");

    // New requests, streamed or not, on either endpoint: a retryable 503 `draining`.
    for (path, body) in [
        ("/v1/chat/completions", chat("new", json!({"max_tokens": 2}))),
        ("/v1/chat/completions", long_stream(2)),
        ("/v1/completions", json!({"model": "kvmesh-sim", "prompt": "new", "max_tokens": 2})),
    ] {
        let (s, h, text) = post_raw(&url, path, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(s, 503, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_openai_error(&v);
        assert_eq!(v["error"]["code"], "draining");
        assert_eq!(h["x-should-retry"], "true");
    }
    let health = reqwest::get(format!("{url}/health")).await.unwrap();
    assert_eq!(health.status(), 503);
    let health: Value = health.json().await.unwrap();
    assert_eq!(health["status"], "draining");
    // Whoever probes learns health, not engine addresses or errors (those are in the status).
    assert!(health["engines"][0].get("url").is_none() && health["engines"][0].get("error").is_none(), "{health}");
    let status: Value = reqwest::get(format!("{url}/v1/mesh/status")).await.unwrap().json().await.unwrap();
    assert_eq!(status["draining"], true);
    assert_eq!(scrape(&url, "kvmesh_draining").await, 1.0);
    // A second drain is harmless.
    let again: Value = client.post(format!("{url}/admin/drain")).send().await.unwrap().json().await.unwrap();
    assert_eq!(again["already_draining"], true);

    // The stream that was open runs to its end, and it was still running when all of the above
    // happened (so the drain really overlapped it).
    assert_eq!(finish_stream(stream, first).await, 200);
    assert!(t.elapsed() > Duration::from_millis(300), "the stream ended too soon to prove anything");
    let status: Value = reqwest::get(format!("{url}/v1/mesh/status")).await.unwrap().json().await.unwrap();
    assert_eq!(status["open_requests"], 0);

    n.shutdown().await;
    // The served stream has its record; refused requests never entered the pipeline.
    let recs = audit_lines(&audit);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["status"], 200);
    assert_eq!(recs[0]["outcome"], "ok");
    assert_eq!(recs[0]["completion_tokens"], 200);
}

/// `RunningNode::shutdown` is what SIGTERM runs: under load, no open stream is cut and every
/// request has its audit record.
#[tokio::test]
async fn shutdown_under_load_cuts_no_stream_and_loses_no_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let mut cfg = node_config(vec![]);
    cfg.embedded = EngineConfig { time_scale: 0.5, ..EngineConfig::default() };
    cfg.audit = AuditConfig { path: Some(audit.clone()), ..Default::default() };
    let n = node(cfg).await;
    let url = n.url();
    let client = reqwest::Client::new();
    let mut open = Vec::new();
    for i in 0..12 {
        let body = long_stream(100 + i);
        let r = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut s = Box::pin(r.bytes_stream());
        let first = String::from_utf8_lossy(&s.next().await.unwrap().unwrap()).into_owned();
        open.push(async move { (100 + i as u64, finish_stream(s, first).await) });
    }
    let status: Value = reqwest::get(format!("{url}/v1/mesh/status")).await.unwrap().json().await.unwrap();
    assert!(status["open_requests"].as_u64().unwrap() >= 6, "streams must be open when the shutdown starts: {status}");
    let (streams, ()) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(futures::future::join_all(open), n.shutdown())
    })
    .await
    .expect("streams and shutdown finish");
    for (want, got) in streams {
        assert_eq!(got, want);
    }
    let recs = audit_lines(&audit);
    assert_eq!(recs.len(), 12);
    assert!(recs.iter().all(|r| r["status"] == 200 && r["outcome"] == "ok"), "{recs:?}");
}

/// A drained node leaves its peer's view within a few gossip rounds (no failure detection
/// needed), and the peer keeps serving with its own engine.
#[tokio::test]
async fn a_drained_node_leaves_the_mesh_and_peers_serve_without_it() {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "drain").unwrap();
    let a = node(mesh_config(dir.path(), "drain", "a", None)).await;
    let b = node(mesh_config(dir.path(), "drain", "b", a.mesh.as_ref().map(|m| m.advertise.to_string()))).await;
    let view = |n: &kvmesh_node::RunningNode| n.mesh.as_ref().unwrap().peers().len();
    eventually("a and b see each other", Duration::from_secs(10), async || view(&a) == 2 && view(&b) == 2).await;

    let t = Instant::now();
    let d: Value =
        reqwest::Client::new().post(format!("{}/admin/drain", b.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(d["left_mesh"], true, "{d}");
    // The answer comes once the leave had a few rounds to spread; a sees it within a few more.
    eventually("b leaves a's view", Duration::from_secs(2), async || view(&a) == 1).await;
    let gone = t.elapsed();
    assert!(gone < Duration::from_secs(2), "took {gone:?}");
    for i in 0..6 {
        let (s, h, v) = post(&a.url(), &chat(&format!("after the drain {i}"), json!({"max_tokens": 2}))).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(h["x-kvmesh-served-by"], "a/embedded-sim");
    }
    b.shutdown().await;
    a.shutdown().await;
}

/// Without keys, the admin routes answer loopback clients only (`[auth] open_admin` opens them);
/// a drained node outside a mesh takes requests again after `DELETE /admin/drain`.
#[tokio::test]
async fn admin_routes_are_closed_to_remote_clients_and_a_drain_can_be_undone() {
    let e = engine(fast_engine(), false).await;
    // Listen on every address, so the node can be reached other than by loopback.
    let mut cfg = node_config(vec![entry(e.url())]);
    cfg.http_addr = "0.0.0.0:0".into();
    let n = node(cfg).await;
    let port = n.http_addr.port();
    let client = reqwest::Client::new();
    // The host's own non-loopback address, when it has one.
    let far = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("10.255.255.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    if let Some(ip) = far {
        for (method, path) in [("POST", "/admin/drain"), ("GET", "/v1/mesh/status"), ("GET", "/v1/mesh/peers")] {
            let r = client.request(method.parse().unwrap(), format!("http://{ip}:{port}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 403, "{method} {path} from {ip}");
            let v: Value = r.json().await.unwrap();
            assert_openai_error(&v);
            assert_eq!(v["error"]["code"], "admin_disabled");
        }
        // Serving is unaffected: the remote client's request is answered.
        let (s, _, _) = post(&format!("http://{ip}:{port}"), &chat("hi", json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs this with a non-loopback address");
        eprintln!("no non-loopback address on this host: the remote half of this test did not run");
    }
    let url = n.url();
    let d: Value = client.post(format!("{url}/admin/drain")).send().await.unwrap().json().await.unwrap();
    assert_eq!(d["draining"], true);
    let (s, _, _) = post(&url, &chat("hi", json!({"max_tokens": 1}))).await;
    assert_eq!(s, 503);
    let u: Value = client.delete(format!("{url}/admin/drain")).send().await.unwrap().json().await.unwrap();
    assert_eq!(u["was_draining"], true, "{u}");
    let (s, _, _) = post(&url, &chat("hi", json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200);
    assert_eq!(scrape(&url, "kvmesh_draining").await, 0.0);
    n.shutdown().await;
    e.shutdown().await;
}
