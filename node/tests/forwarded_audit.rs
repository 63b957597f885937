//! The serving node records the requests peers forward to it, as the receiving node records
//! them for its client: an edge node admits and records; the worker that served each one
//! records it too, naming its origin, and its file verifies.

mod common;

use std::time::Duration;

use common::*;
use kvmesh_node::audit::AuditConfig;
use kvmesh_node::config::NodeRole;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_on_record_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "fwd").unwrap();
    let (worker_log, edge_log) = (dir.path().join("worker.jsonl"), dir.path().join("edge.jsonl"));
    let mut cfg = mesh_config(dir.path(), "fwd", "worker", None);
    cfg.audit = AuditConfig { path: Some(worker_log.clone()), ..Default::default() };
    let worker = node(cfg).await;
    let mut cfg = mesh_config(dir.path(), "fwd", "edge", worker.mesh.as_ref().map(|m| m.advertise.to_string()));
    cfg.role = NodeRole::Edge;
    cfg.audit = AuditConfig { path: Some(edge_log.clone()), ..Default::default() };
    let edge = node(cfg).await;
    eventually("the edge sees the worker's engine", Duration::from_secs(10), async || {
        post(&edge.url(), &chat("ping", json!({"max_tokens": 1}))).await.0 == 200
    })
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let body = chat(&format!("forwarded {i}"), json!({"max_tokens": 2, "stream": i % 2 == 0}));
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", edge.url()))
            .header("x-request-id", format!("fwd-{i}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["x-kvmesh-served-by"].to_str().unwrap().starts_with("worker/"));
        let _ = r.text().await.unwrap();
        ids.push(format!("fwd-{i}"));
    }
    edge.shutdown().await;
    worker.shutdown().await;
    let records = |path: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(path).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    };
    let (at_worker, at_edge) = (records(&worker_log), records(&edge_log));
    for id in &ids {
        let w = at_worker
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not recorded by the worker"));
        assert_eq!(w["origin"], "edge", "{w}");
        assert_eq!(w["status"], 200, "{w}");
        assert!(w["served_by"].as_str().unwrap().starts_with("worker/"), "{w}");
        assert!(w["request_sha256"].is_string(), "{w}");
        let e = at_edge
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not recorded by the edge"));
        assert!(e.get("origin").is_none(), "the receiving node's own record: {e}");
    }
    for path in [worker_log, edge_log] {
        let files = kvmesh_node::audit::chain_files(&path);
        kvmesh_node::audit::verify(&files).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    }
}
