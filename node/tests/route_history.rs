//! Prefix routing where the node cannot see an engine's cache: engines that publish no KV
//! events, and models with no tokenizer (approximate mode). The node remembers what it routed
//! where, for a TTL, and sends repeats there.

mod common;

use common::*;
use kvmesh_node::config::EngineEntry;
use kvmesh_sim::EngineConfig;
use serde_json::{json, Value};

async fn two_engines_without_kv_events(model: &str) -> (kvmesh_node::RunningNode, Vec<kvmesh_sim::RunningEngine>) {
    let cfg = EngineConfig { model: model.into(), ..fast_engine() };
    let engines = vec![engine(cfg.clone(), false).await, engine(cfg, false).await];
    let entries = engines
        .iter()
        .enumerate()
        .map(|(i, e)| EngineEntry { name: Some(format!("gpu{i}")), ..EngineEntry::new(e.url()) })
        .collect();
    (node(node_config(entries)).await, engines)
}

/// Sends each document twice more after its first request and checks that the repeats follow
/// it, with `reason` in the route header and the engine confirming cached tokens.
async fn repeats_follow_first(base: &str, model: &str, reason: &str) {
    for doc in 0..4 {
        let body = json!({"model": model, "max_tokens": 1,
                          "messages": [{"role": "user", "content": format!("document {doc}: ").repeat(120)}]});
        let (s, h, v) = post(base, &body).await;
        assert_eq!(s, 200, "{v}");
        let first = h["x-kvmesh-served-by"].to_str().unwrap().to_owned();
        for _ in 0..2 {
            let (s, h, v) = post(base, &body).await;
            assert_eq!(s, 200, "{v}");
            let route = h["x-kvmesh-route"].to_str().unwrap();
            assert_eq!(h["x-kvmesh-served-by"].to_str().unwrap(), first, "{route}");
            assert!(route.contains(&format!("reason={reason}")) && !route.contains("matched_blocks=0"), "{route}");
            assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0, "{v}");
        }
    }
}

#[tokio::test]
async fn engines_without_kv_events_are_matched_by_routed_history() {
    let (n, engines) = two_engines_without_kv_events("kvmesh-sim").await;
    repeats_follow_first(&n.url(), "kvmesh-sim", "prefix").await;
    assert!(n.engines.engines.iter().map(|e| e.routed.lock().unwrap().len()).sum::<usize>() > 0);
    n.shutdown().await;
    for e in engines {
        e.shutdown().await;
    }
}

#[tokio::test]
async fn a_model_without_tokenizer_is_routed_approximately() {
    let (n, engines) = two_engines_without_kv_events("no-tokenizer-model").await;
    let status: Value = reqwest::get(format!("{}/v1/mesh/status", n.url())).await.unwrap().json().await.unwrap();
    let m = status["models"].as_array().unwrap().iter().find(|m| m["model"] == "no-tokenizer-model").unwrap();
    assert_eq!(m["prefix_matching"], "approximate", "{status}");
    repeats_follow_first(&n.url(), "no-tokenizer-model", "prefix_approx").await;
    let text = reqwest::get(format!("{}/metrics", n.url())).await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l.contains("outcome=\"no_tokenizer\"")), "{text}");
    n.shutdown().await;
    for e in engines {
        e.shutdown().await;
    }
}
