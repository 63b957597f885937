//! Block keys carry what vLLM's block hashes carry (issue 19), end to end through a node and
//! the engine simulator's KV events (their fields as vLLM's `kv_events.py` sends them):
//! - a request's `cache_salt` keys its blocks apart (the salt in the first block's
//!   `extra_keys`);
//! - a LoRA adapter's blocks are its own (`lora_name`), and an alias shares the base model's
//!   (`/v1/models` `root`/`parent`);
//! - blocks the GPU evicted but a CPU offloading tier holds (`medium` `CPU`, hashes only) are
//!   predicted as cached, as the engine reports them;
//! - each data-parallel rank's events (the port plus the rank) index that rank, and a repeat is
//!   sent back to its rank with `X-data-parallel-rank`.
//!
//! In each, the engine's reported cached tokens equal the node's prediction.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn matched(h: &reqwest::header::HeaderMap) -> u64 {
    let route = h["x-kvmesh-route"].to_str().unwrap_or("");
    route.split("; ").find_map(|kv| kv.strip_prefix("matched_blocks=")).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_cache_salt_keys_blocks_apart_in_the_engine_and_in_the_index() {
    let e = engine(fast_engine(), true).await;
    let n = node(node_config(vec![kv_entry("gpu0", &e)])).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the subscription lands
    let doc = "a tenant's private document, long enough for many blocks ".repeat(20);
    let salted = |salt: Option<&str>| {
        let mut body = chat(&doc, json!({"max_tokens": 1}));
        if let Some(s) = salt {
            body["cache_salt"] = Value::String(s.into());
        }
        body
    };
    let (s, _, _) = post(&n.url(), &salted(Some("tenant-a"))).await;
    assert_eq!(s, 200);
    eventually("the salted blocks are indexed", Duration::from_secs(3), async || {
        n.engines.engines[0].kv.cached_blocks() > 0
    })
    .await;
    // The same salt: the node's keys meet the blocks its index holds, and the engine agrees.
    let (s, h, v) = post(&n.url(), &salted(Some("tenant-a"))).await;
    assert_eq!(s, 200);
    assert!(matched(&h) > 0, "{:?}", h.get("x-kvmesh-route"));
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(cached > 0, "{v}");
    // Another salt, and no salt: nothing is shared, on either side.
    for other in [Some("tenant-b"), None] {
        let (s, h, v) = post(&n.url(), &salted(other)).await;
        assert_eq!(s, 200);
        assert_eq!(matched(&h), 0, "{other:?}: {:?}", h.get("x-kvmesh-route"));
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0, "{other:?}: {v}");
    }
    // Every prediction matched what the engine reported.
    let reported = predictions_held(&n).await;
    assert!(reported >= cached as f64);
    n.shutdown().await;
    e.shutdown().await;
}

/// Every request's predicted cached tokens equalled what the engine reported.
async fn predictions_held(n: &kvmesh_node::RunningNode) -> f64 {
    let predicted = scrape(&n.url(), "kvmesh_cached_tokens_predicted_total").await;
    let reported = scrape(&n.url(), "kvmesh_cached_tokens_reported_total").await;
    assert_eq!(predicted, reported, "the node's predictions and the engine's reports");
    reported
}

fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_lora_adapter_keys_its_own_blocks_and_an_alias_shares_the_base_models() {
    let cfg = kvmesh_sim::EngineConfig {
        lora_modules: vec!["sql=/adapters/sql".into()],
        model_aliases: vec!["sim-alias".into()],
        ..fast_engine()
    };
    let e = engine(cfg, true).await;
    let n = node(node_config(vec![kv_entry("gpu0", &e)])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = "a schema and its documentation, long enough for many blocks ".repeat(20);
    let ask = |model: &str| {
        let mut b = chat(&doc, json!({"max_tokens": 1}));
        b["model"] = Value::String(model.into());
        b
    };
    let (s, _, v) = post(&n.url(), &ask("sql")).await;
    assert_eq!((s, cached(&v)), (200, 0), "{v}");
    eventually("the adapter's blocks are indexed", Duration::from_secs(3), async || {
        n.engines.engines[0].kv.cached_blocks() > 0
    })
    .await;
    let (s, h, v) = post(&n.url(), &ask("sql")).await;
    assert_eq!(s, 200);
    assert!(matched(&h) > 0 && cached(&v) > 0, "the adapter's repeat: {:?} {v}", h.get("x-kvmesh-route"));
    // The base model shares none of the adapter's blocks, on either side.
    let (s, h, v) = post(&n.url(), &ask("kvmesh-sim")).await;
    assert_eq!((s, matched(&h), cached(&v)), (200, 0, 0), "{v}");
    eventually("the base model's blocks are indexed", Duration::from_secs(3), async || {
        let (_, h, _) = post(&n.url(), &ask("sim-alias")).await;
        matched(&h) > 0
    })
    .await;
    // An alias of the base model meets the base model's blocks.
    let (s, h, v) = post(&n.url(), &ask("sim-alias")).await;
    assert!(s == 200 && matched(&h) > 0 && cached(&v) > 0, "{:?} {v}", h.get("x-kvmesh-route"));
    predictions_held(&n).await;
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn blocks_offloaded_to_cpu_are_predicted_cached_as_the_engine_reports_them() {
    // A GPU cache of 64 blocks, a CPU tier of 4096: a few other prompts push the first one out
    // of the GPU, never out of the CPU tier.
    let cfg = kvmesh_sim::EngineConfig { num_gpu_blocks: 64, cpu_offload_blocks: 4096, ..fast_engine() };
    let e = engine(cfg, true).await;
    let n = node(node_config(vec![kv_entry("gpu0", &e)])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = |i: usize| format!("document {i}: ") + &"words that fill blocks of the KV cache ".repeat(40);
    let (s, _, _) = post(&n.url(), &chat(&doc(0), json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200);
    for i in 1..4 {
        let (s, _, _) = post(&n.url(), &chat(&doc(i), json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
    }
    eventually("the first prompt is offloaded and off the GPU", Duration::from_secs(3), async || {
        let idx = n.engines.engines[0].kv.index.read().unwrap();
        idx.offloaded_len() > 0 && idx.len() <= 64
    })
    .await;
    let (s, _, v) = post(&n.url(), &chat(&doc(0), json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200);
    assert!(cached(&v) > 0, "loaded from the CPU tier: {v}");
    let reported = predictions_held(&n).await;
    assert!(reported >= cached(&v) as f64);
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn each_data_parallel_rank_is_indexed_from_its_own_events_and_served_by_name() {
    let cfg = kvmesh_sim::EngineConfig { data_parallel_size: 2, ..fast_engine() };
    let e = engine(cfg, true).await;
    let entry = kvmesh_node::config::EngineEntry { data_parallel_size: 2, ..kv_entry("gpu0", &e) };
    let n = node(node_config(vec![entry])).await;
    let names: Vec<String> = n.engines.engines.iter().map(|e| e.name.clone()).collect();
    assert_eq!(names, ["gpu0-dp0", "gpu0-dp1"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = |i: usize| format!("conversation {i}: ") + &"a long shared system prompt ".repeat(30);
    // New prompts go to either rank (equal, idle: a random one of the two): send until both
    // ranks have served some.
    let mut served = std::collections::HashMap::new();
    for i in 0..40 {
        let (s, h, _) = post(&n.url(), &chat(&doc(i), json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
        served.insert(i, h["x-kvmesh-served-by"].to_str().unwrap().to_owned());
        let ranks: std::collections::HashSet<&String> = served.values().collect();
        if ranks.len() == 2 && served.len() >= 6 {
            break;
        }
    }
    assert_eq!(served.values().collect::<std::collections::HashSet<_>>().len(), 2, "{served:?}");
    eventually("both ranks' events are indexed", Duration::from_secs(3), async || {
        n.engines.engines.iter().all(|e| e.kv.cached_blocks() > 0)
    })
    .await;
    // Each repeat goes back to the rank that holds it, and that rank reports the hit.
    for i in 0..served.len() {
        let (s, h, v) = post(&n.url(), &chat(&doc(i), json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
        assert_eq!(h["x-kvmesh-served-by"].to_str().unwrap(), served[&i], "prompt {i}");
        assert!(matched(&h) > 0 && cached(&v) > 0, "prompt {i}: {:?} {v}", h.get("x-kvmesh-route"));
    }
    predictions_held(&n).await;
    n.shutdown().await;
    e.shutdown().await;
}

/// With API keys, each tenant's prompts are cached under its own salt: another tenant sending
/// the same prompt hits nothing (and so cannot time or count another's cached prompts), a
/// tenant's repeat hits its own blocks, and only an admin key sees `x-kvmesh-route`.
#[tokio::test]
async fn tenants_do_not_share_cached_prompts_nor_see_routing_details() {
    use kvmesh_policy::auth::{hash_key, KeyEntry};
    let e = engine(fast_engine(), true).await;
    let mut cfg = node_config(vec![kv_entry("gpu0", &e)]);
    let key = |tenant: &str, admin: bool| KeyEntry {
        tenant: tenant.into(),
        key_sha256: hash_key(&format!("sk-{tenant}")),
        models: vec![],
        admin,
        share_cache: false,
        ..Default::default()
    };
    cfg.auth.keys = vec![key("acme", false), key("globex", false), key("ops", true)];
    let n = node(cfg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let doc = "a confidential contract that one tenant keeps asking about ".repeat(20);
    let send = async |tenant: &str| {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", n.url()))
            .bearer_auth(format!("sk-{tenant}"))
            .json(&chat(&doc, json!({"max_tokens": 1})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let route = r.headers().get("x-kvmesh-route").map(|v| v.to_str().unwrap().to_owned());
        (route, r.json::<Value>().await.unwrap())
    };
    let (route, _) = send("acme").await;
    assert_eq!(route, None, "a tenant's key sees no routing details");
    eventually("acme's blocks are indexed", Duration::from_secs(3), async || {
        n.engines.engines[0].kv.cached_blocks() > 0
    })
    .await;
    let (_, v) = send("globex").await;
    assert_eq!(cached(&v), 0, "another tenant hits none of acme's blocks: {v}");
    let (_, v) = send("acme").await;
    assert!(cached(&v) > 0, "acme's repeat hits its own blocks: {v}");
    let (route, _) = send("ops").await;
    assert!(route.is_some_and(|r| r.contains("matched_blocks=")), "an admin key sees the route");
    predictions_held(&n).await;
    n.shutdown().await;
    e.shutdown().await;
}
