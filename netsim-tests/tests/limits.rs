//! Tenant limits hold mesh-wide: a tenant that spreads its requests over three nodes gets the
//! quota of one, because every node counts what its peers admitted (gossiped usage).

use std::collections::HashSet;
use std::time::Duration;

use kvmesh_netsim_tests::Cluster;
use kvmesh_policy::auth::{hash_key, KeyEntry};
use kvmesh_policy::limits::LimitSpec;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_multiply_its_rate_by_spreading_over_nodes() {
    let mut cluster = Cluster::new("limits");
    for i in 0..3 {
        let mut cfg = cluster.config(&format!("n{i}"));
        cfg.auth.keys = vec![KeyEntry {
            tenant: "acme".into(),
            key_sha256: hash_key("sk-acme"),
            models: vec![],
            admin: false,
            share_cache: false,
            ..Default::default()
        }];
        cfg.limits.default = LimitSpec { requests_per_minute: Some(6), ..Default::default() };
        cfg.usage_publish_interval_ms = 50;
        cluster.start(cfg).await;
    }
    cluster.converge(Duration::from_secs(5)).await;
    let urls: Vec<String> = cluster.live().map(|n| n.url()).collect();
    let client = reqwest::Client::new();
    let body = json!({"model": "kvmesh-sim", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let mut ok = 0;
    let mut limited_on = HashSet::new();
    // Round-robin over the three nodes, slower than gossip spreads usage (the documented bound:
    // requests sent within one publish interval plus gossip delay may all be admitted).
    for i in 0..15 {
        let url = &urls[i % 3];
        let r =
            client.post(format!("{url}/v1/chat/completions")).bearer_auth("sk-acme").json(&body).send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                assert!(r.headers().contains_key("retry-after"));
                limited_on.insert(url.clone());
            }
            s => panic!("unexpected status {s}: {}", r.text().await.unwrap_or_default()),
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Alone, each node would have admitted 5 of its own 5 requests (15 in all).
    assert_eq!(ok, 6, "the mesh admitted {ok} requests against a limit of 6 per minute");
    assert_eq!(limited_on.len(), 3, "every node refused the tenant: {limited_on:?}");
    cluster.shutdown().await;
}
