//! Gossip over real QUIC on loopback: nodes join through a seed, see each other's state, drop a
//! node that dies, and ignore a mesh with another cluster id.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gossip::{EngineLoad, GossipConfig, LoadReport, Membership, NodeMeta, NodeRole};
use kvmesh_transport::endpoint::EndpointConfig;
use kvmesh_transport::{certs, MeshEndpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

struct TestNode {
    membership: Arc<Membership>,
    endpoint: Arc<MeshEndpoint>,
    cancel: CancellationToken,
}

async fn start(dir: &std::path::Path, name: &str, cluster: &str, seeds: Vec<String>) -> TestNode {
    certs::create_node(dir, dir, name).unwrap();
    let (ca, crt, key) = TlsIdentity::paths_in(dir, name);
    let id = TlsIdentity::load(&ca, &crt, &key).unwrap();
    let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
    let (endpoint, inbox) =
        MeshEndpoint::bind(&id, EndpointConfig::new("127.0.0.1:0".parse().unwrap()), &cancel, &tasks).unwrap();
    let addr = endpoint.local_addr();
    let meta = NodeMeta {
        role: NodeRole::Worker,
        models: vec!["m".into()],
        http_addr: "127.0.0.1:1".into(),
        quic_addr: addr.to_string(),
    };
    let mut cfg = GossipConfig::new(name, cluster, addr, seeds);
    cfg.gossip_interval = Duration::from_millis(100);
    let membership = Membership::start(cfg, endpoint.clone(), inbox, &meta, &cancel, &tasks).await.unwrap();
    TestNode { membership, endpoint, cancel }
}

async fn wait_for(what: &str, limit: Duration, f: impl Fn() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

fn names(n: &TestNode) -> Vec<String> {
    let mut v: Vec<_> = n.membership.peers().iter().map(|p| p.node_id.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_share_load_and_drop_the_dead() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    let a = start(dir.path(), "a", "c1", vec![]).await;
    let seed = vec![a.endpoint.local_addr().to_string()];
    let b = start(dir.path(), "b", "c1", seed.clone()).await;
    let c = start(dir.path(), "c", "c1", seed).await;
    let all = vec!["a".to_string(), "b".into(), "c".into()];
    let took =
        wait_for("full membership", Duration::from_secs(3), || [&a, &b, &c].iter().all(|n| names(n) == all)).await;
    eprintln!("full membership after {took:?}");

    let load = LoadReport {
        engines: vec![EngineLoad {
            name: "gpu0".into(),
            models: vec!["m".into()],
            healthy: true,
            role: Default::default(),
            running: 7,
            waiting: 2,
            kv_usage: 0.5,
            tokens_per_s: 100.0,
            block_size: Some(16),
            cards: Vec::new(),
            max_model_len: None,
            ttft_fit: None,
        }],
        ..Default::default()
    };
    b.membership.set_load(&load).await.unwrap();
    wait_for("load reaches a and c", Duration::from_secs(3), || {
        [&a, &c].iter().all(|n| n.membership.peers().iter().any(|p| p.node_id == "b" && p.load == load))
    })
    .await;

    // c dies without a word: its endpoint closes and it stops gossiping.
    c.cancel.cancel();
    c.endpoint.close().await;
    let took = wait_for("c leaves a's and b's view", Duration::from_secs(6), || {
        names(&a) == ["a", "b"] && names(&b) == ["a", "b"]
    })
    .await;
    eprintln!("dead node dropped after {took:?}");
    assert!(took < Duration::from_secs(4), "dead node took {took:?} to leave");

    // b leaves cleanly: peers drop it within a few rounds.
    b.membership.leave().await;
    wait_for("b leaves a's view", Duration::from_secs(2), || names(&a) == ["a"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_cluster_id_does_not_merge() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    let a = start(dir.path(), "a", "prod", vec![]).await;
    let x = start(dir.path(), "x", "staging", vec![a.endpoint.local_addr().to_string()]).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(names(&a), ["a"]);
    assert_eq!(names(&x), ["x"]);
}
