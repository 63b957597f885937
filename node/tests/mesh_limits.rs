//! A tenant's per-minute limit holds across a mesh under a burst: four nodes, 60 requests a
//! minute, 400 requests at once spread over the nodes, before any node has heard of the others'
//! admissions (`policy::limits::Limiter::admit`: each node's unseen admissions are held to its
//! share of what remains). The stated bound (docs/security.md) is the limit plus nodes − 1.

mod common;

use std::time::Duration;

use common::*;
use kvmesh_policy::auth::{hash_key, KeyEntry};
use kvmesh_policy::limits::LimitSpec;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_four_nodes_admits_at_most_the_limit_plus_three() {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "limits").unwrap();
    let mut nodes: Vec<kvmesh_node::RunningNode> = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let seed = nodes.first().and_then(|n| n.mesh.as_ref()).map(|m| m.advertise.to_string());
        let mut cfg = mesh_config(dir.path(), "limits", name, seed);
        cfg.auth.keys = vec![KeyEntry {
            tenant: "acme".into(),
            key_sha256: hash_key("sk-acme"),
            models: vec![],
            admin: false,
            share_cache: false,
            ..Default::default()
        }];
        cfg.limits.default = LimitSpec { requests_per_minute: Some(60), ..Default::default() };
        nodes.push(node(cfg).await);
    }
    let live = |n: &kvmesh_node::RunningNode| n.mesh.as_ref().unwrap().peers().len();
    eventually("four nodes see each other", Duration::from_secs(15), async || nodes.iter().all(|n| live(n) == 4)).await;

    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let http = reqwest::Client::builder().pool_max_idle_per_host(200).build().unwrap();
    let burst = (0..400).map(|i| {
        let (http, url) = (http.clone(), urls[i % 4].clone());
        async move {
            let body = json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": format!("burst {i}")}], "max_tokens": 1});
            let r = http.post(format!("{url}/v1/chat/completions")).bearer_auth("sk-acme").json(&body).send().await.unwrap();
            r.status().as_u16()
        }
    });
    let statuses = futures::future::join_all(burst).await;
    let admitted = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    println!("burst of 400 over 4 nodes, 60/min: admitted {admitted}, limited {limited}");
    assert_eq!(admitted + limited, 400, "{statuses:?}");
    assert!(admitted <= 60 + 3, "admitted {admitted}: over the limit plus nodes - 1");
    assert!(admitted >= 40, "admitted only {admitted}");
    for n in nodes {
        n.shutdown().await;
    }
}
