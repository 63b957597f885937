//! Block keys carry what vLLM's block hashes carry (issue 19): a request's `cache_salt` keys its
//! blocks apart, in the engine's cache (the simulator salts the first block's hash and reports
//! the salt in the event's `extra_keys`, as vLLM does) and in the node's index, so a salted
//! repeat matches its blocks, another salt or none matches nothing, and the engine's reported
//! cached tokens agree with the node's prediction each time.

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
    let predicted = scrape(&n.url(), "kvmesh_cached_tokens_predicted_total").await;
    let reported = scrape(&n.url(), "kvmesh_cached_tokens_reported_total").await;
    assert_eq!(predicted, reported);
    assert!(reported >= cached as f64);
    n.shutdown().await;
    e.shutdown().await;
}
