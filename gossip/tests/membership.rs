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

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
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

fn engine(waiting: u32) -> EngineLoad {
    EngineLoad {
        name: "gpu0".into(),
        models: vec!["m".into()],
        healthy: true,
        role: Default::default(),
        running: 1,
        waiting,
        kv_usage: 0.5,
        tokens_per_s: 100.0,
        block_size: Some(16),
        cards: Vec::new(),
        max_model_len: None,
        ttft_fit: None,
    }
}

/// A member that runs chitchat under another member's name. chitchat relays whatever state a
/// member sends, so each forged state reaches `a` as if from `b`: a newer generation of `b`
/// (which the view would prefer to the real one) at the forger's address, with another HTTP
/// address and a huge queue.
async fn forge_b(
    dir: &std::path::Path,
    forger: &str,
    b: &TestNode,
    generation: u64,
    chain: &str,
    seed: std::net::SocketAddr,
) -> (chitchat::ChitchatHandle, CancellationToken) {
    use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};
    use kvmesh_gossip::schema::{KEY_LOAD, KEY_NODE, KEY_VERSION, SCHEMA_VERSION};
    use kvmesh_gossip::signed::{seal, KEY_CERT};

    certs::create_node(dir, dir, forger).unwrap();
    let (ca, crt, key) = TlsIdentity::paths_in(dir, forger);
    let id = TlsIdentity::load(&ca, &crt, &key).unwrap();
    let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
    let (endpoint, inbox) =
        MeshEndpoint::bind(&id, EndpointConfig::new("127.0.0.1:0".parse().unwrap()), &cancel, &tasks).unwrap();
    let addr = endpoint.local_addr();
    let chitchat_id = ChitchatId::new("b".to_string(), generation, addr);
    let config = ChitchatConfig {
        chitchat_id: chitchat_id.clone(),
        cluster_id: "c1".into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: addr,
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let meta = NodeMeta {
        role: NodeRole::Worker,
        models: vec!["m".into()],
        http_addr: "10.6.6.6:80".into(),
        quic_addr: addr.to_string(),
    };
    let mut load = b.membership.peers().iter().find(|p| p.is_self).unwrap().load.clone();
    for e in &mut load.engines {
        e.waiting = 1_000_000;
    }
    let values = [
        (KEY_CERT, chain.to_owned()),
        (KEY_VERSION, SCHEMA_VERSION.to_string()),
        (KEY_NODE, serde_json::to_string(&meta).unwrap()),
        (KEY_LOAD, serde_json::to_string(&load).unwrap()),
    ];
    // Signed as the real code signs, with the forger's own key: chitchat numbers initial values
    // 1, 2, ... in order.
    let signer = endpoint.state_signer().clone();
    let mut held: Vec<(&str, u64)> = Vec::new();
    let mut initial = Vec::new();
    for (i, (k, v)) in values.iter().enumerate() {
        held.push((k, i as u64 + 1));
        held.sort();
        let index = kvmesh_gossip::signed::state_index(held.iter().copied());
        initial.push((k.to_string(), seal(&signer, "c1", &chitchat_id, k, i as u64 + 1, &index, v).unwrap()));
    }
    let checker = kvmesh_gossip::signed::Checker::new(signer.clone(), "c1");
    let transport =
        kvmesh_gossip::quic::QuicTransport::new(endpoint, inbox, 0, Arc::new(std::sync::Mutex::new(checker)));
    let handle = spawn_chitchat(config, initial, &transport).await.unwrap();
    (handle, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_gossip_state_under_another_members_name() {
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    let a = start(dir.path(), "a", "c1", vec![]).await;
    let a_addr = a.endpoint.local_addr();
    let b = start(dir.path(), "b", "c1", vec![a_addr.to_string()]).await;
    let load = LoadReport { engines: vec![engine(2)], ..Default::default() };
    b.membership.set_load(&load).await.unwrap();
    wait_for("a sees b and its load", Duration::from_secs(3), || {
        a.membership.peers().iter().any(|p| p.node_id == "b" && p.load == load)
    })
    .await;
    let real = a.membership.peers().iter().find(|p| p.node_id == "b").unwrap().clone();
    assert_eq!(a.membership.rejected_states(), 0);

    // m1 publishes b's own (public) certificate chain with values signed by m1's key; m2
    // publishes its own chain under b's name.
    let b_chain = b.endpoint.state_signer().chain().to_owned();
    let (m1, stop1) = forge_b(dir.path(), "m1", &b, real.generation + 1, &b_chain, a_addr).await;
    let m2_dir = dir.path().join("m2");
    std::fs::create_dir_all(&m2_dir).unwrap();
    std::fs::copy(dir.path().join("ca.crt"), m2_dir.join("ca.crt")).unwrap();
    std::fs::copy(dir.path().join("ca.key"), m2_dir.join("ca.key")).unwrap();
    let m2_chain = {
        certs::create_node(&m2_dir, &m2_dir, "m2").unwrap();
        let (ca, crt, key) = TlsIdentity::paths_in(&m2_dir, "m2");
        kvmesh_transport::StateSigner::new(&TlsIdentity::load(&ca, &crt, &key).unwrap()).unwrap().chain().to_owned()
    };
    let (m2, stop2) = forge_b(&m2_dir, "m2", &b, real.generation + 2, &m2_chain, a_addr).await;

    // Both forged states reach a (each is refused and counted), and meanwhile, and for a second
    // after, a's view of b is always b's own: its generation, address and load.
    let mut deadline = Instant::now() + Duration::from_secs(5);
    let mut reached = None;
    loop {
        let view = a.membership.peers();
        let seen = view.iter().find(|p| p.node_id == "b").expect("b stays in a's view");
        assert_eq!(seen.generation, real.generation, "a forged generation replaced b");
        assert_eq!(seen.meta.http_addr, real.meta.http_addr);
        assert_eq!(seen.load, real.load, "forged load");
        assert!(!view.iter().any(|p| p.node_id.starts_with('m')), "forgers gossip no state of their own");
        if reached.is_none() && a.membership.rejected_states() >= 2 {
            reached = Some(Instant::now());
            deadline = Instant::now() + Duration::from_secs(1);
        }
        if Instant::now() >= deadline {
            assert!(
                reached.is_some(),
                "the forged states never reached a ({} refused)",
                a.membership.rejected_states()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And b's real updates still arrive.
    let load = LoadReport { engines: vec![engine(3)], ..Default::default() };
    b.membership.set_load(&load).await.unwrap();
    wait_for("b's update reaches a", Duration::from_secs(3), || {
        a.membership.peers().iter().any(|p| p.node_id == "b" && p.load == load)
    })
    .await;
    for (m, stop) in [(m1, stop1), (m2, stop2)] {
        stop.cancel();
        let _ = m.shutdown().await;
    }
}

/// The header of a chitchat 0.11 message of `kind` (1 SYN-ACK, 2 ACK).
fn header(kind: u8) -> Vec<u8> {
    let mut msg = 45_139u16.to_le_bytes().to_vec();
    msg.extend_from_slice(&[0, kind]);
    msg
}

/// One node section of a delta: `values` as (key, sealed value, version).
fn section(
    id: &chitchat::ChitchatId,
    last_gc: u64,
    from: u64,
    values: &[(String, String, u64)],
    max: Option<u64>,
) -> kvmesh_gossip::wire::NodeSection {
    kvmesh_gossip::wire::NodeSection {
        id: id.clone(),
        last_gc_version: last_gc,
        from_version_excluded: from,
        key_values: values
            .iter()
            .map(|(key, value, version)| kvmesh_gossip::wire::KeyValue {
                key: key.clone(),
                value: value.clone(),
                version: *version,
                status: kvmesh_gossip::wire::STATUS_SET,
            })
            .collect(),
        set_max_version: max,
    }
}

/// An ACK carrying one node section.
fn forged_ack(id: &chitchat::ChitchatId, last_gc: u64, values: &[(&str, String, u64)], max: Option<u64>) -> Vec<u8> {
    let values: Vec<_> = values.iter().map(|(k, v, n)| (k.to_string(), v.clone(), *n)).collect();
    let mut msg = header(2);
    kvmesh_gossip::wire::write_delta([&section(id, last_gc, 0, &values, max)], &mut msg);
    msg
}

/// A member relays values of `b`'s own state (its real chitchat id) under versions above
/// `b`'s: were they applied, chitchat would take them over `b`'s real ones and ignore `b`'s
/// next updates (a lower version), taking `b` out of the view. Each is refused before chitchat
/// sees it, and `b`'s updates keep arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_forgery_cannot_stall_another_members_updates() {
    use kvmesh_gossip::schema::KEY_LOAD;
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    let a = start(dir.path(), "a", "c1", vec![]).await;
    let a_addr = a.endpoint.local_addr();
    let b = start(dir.path(), "b", "c1", vec![a_addr.to_string()]).await;
    let m = start(dir.path(), "m", "c1", vec![a_addr.to_string()]).await;
    let load = LoadReport { engines: vec![engine(2)], ..Default::default() };
    b.membership.set_load(&load).await.unwrap();
    wait_for("a sees b's load and m", Duration::from_secs(3), || {
        names(&a) == ["a", "b", "m"] && a.membership.peers().iter().any(|p| p.node_id == "b" && p.load == load)
    })
    .await;
    let b_id = chitchat::ChitchatId::new("b".to_string(), b.membership.generation(), b.endpoint.local_addr());
    let forged = serde_json::to_string(&LoadReport { engines: vec![engine(1_000_000)], ..Default::default() }).unwrap();
    let m_addr = m.endpoint.local_addr();
    let before = a.membership.rejected_states();
    let attacks = [
        // A forged load under a far higher version, unsigned and signed by m.
        forged_ack(&b_id, 0, &[(KEY_LOAD, format!("AAAA.x.{forged}"), 1_000_000)], None),
        forged_ack(
            &b_id,
            0,
            &[(
                KEY_LOAD,
                kvmesh_gossip::signed::seal(m.endpoint.state_signer(), "c1", &b_id, KEY_LOAD, 1_000_000, "x", &forged)
                    .unwrap(),
                1_000_000,
            )],
            None,
        ),
        // A bare raise of b's version, and a reset through a GC version.
        forged_ack(&b_id, 0, &[], Some(1_000_000)),
        forged_ack(&b_id, 1_000_000, &[], None),
    ];
    let n = attacks.len() as u64;
    for msg in attacks {
        m.endpoint.send_gossip(a_addr, m_addr, msg);
    }
    wait_for("a refuses every forged message", Duration::from_secs(3), || a.membership.rejected_states() >= before + n)
        .await;
    let seen = a.membership.peers().iter().find(|p| p.node_id == "b").cloned().expect("b stays in a's view");
    assert_eq!(seen.load, load, "a forged load reached the view");
    let next = LoadReport { engines: vec![engine(3)], ..Default::default() };
    b.membership.set_load(&next).await.unwrap();
    wait_for("b's next update reaches a", Duration::from_secs(3), || {
        a.membership.peers().iter().any(|p| p.node_id == "b" && p.load == next)
    })
    .await;
}

/// A SYN-ACK: a digest of one member (`id` at heartbeat `hb`) and one node section from
/// `from` with the given values (key, sealed value, version).
fn synack(id: &chitchat::ChitchatId, hb: u64, from: u64, values: &[(String, String, u64)]) -> Vec<u8> {
    use chitchat::Serializable;
    let mut msg = header(1);
    1u16.serialize(&mut msg);
    id.serialize(&mut msg);
    for n in [hb, 0, 0] {
        n.serialize(&mut msg);
    }
    kvmesh_gossip::wire::write_delta([&section(id, 0, from, values, None)], &mut msg);
    msg
}

/// Values `(key, payload)` sealed by `signer` for `id` as its node publishes them one after
/// another from version `first`, over a state already holding `held` (key, version).
fn publish(
    signer: &kvmesh_transport::StateSigner,
    id: &chitchat::ChitchatId,
    held: &mut std::collections::BTreeMap<String, u64>,
    first: u64,
    values: &[(&str, String)],
) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for (i, (key, payload)) in values.iter().enumerate() {
        let version = first + i as u64;
        held.insert(key.to_string(), version);
        let index = kvmesh_gossip::signed::state_index(held.iter().map(|(k, v)| (k.as_str(), *v)));
        let sealed = kvmesh_gossip::signed::seal(signer, "c1", id, key, version, &index, payload).unwrap();
        out.push((key.to_string(), sealed, version));
    }
    out
}

/// A relay that leaves values out of a node's delta (chitchat then never asks for them again)
/// never makes a peer use a state with some values new and others stale: the view keeps the
/// node's last whole state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_leaves_values_out_never_makes_a_peer_use_a_mixed_state() {
    use kvmesh_gossip::schema::{KEY_KV, KEY_LOAD, KEY_NODE, KEY_VERSION, SCHEMA_VERSION};
    use kvmesh_gossip::signed::KEY_CERT;
    use kvmesh_gossip::KvSummarySlot;
    let dir = tempfile::tempdir().unwrap();
    certs::create_ca(dir.path(), "t").unwrap();
    let a = start(dir.path(), "a", "c1", vec![]).await;
    let a_addr = a.endpoint.local_addr();
    let m = start(dir.path(), "m", "c1", vec![a_addr.to_string()]).await;
    let m_addr = m.endpoint.local_addr();
    wait_for("a sees m", Duration::from_secs(3), || names(&a) == ["a", "m"]).await;

    // c: an honest node's signed state (its address unused), relayed by m.
    certs::create_node(dir.path(), dir.path(), "c").unwrap();
    let (ca, crt, key) = TlsIdentity::paths_in(dir.path(), "c");
    let c = kvmesh_transport::StateSigner::new(&TlsIdentity::load(&ca, &crt, &key).unwrap()).unwrap();
    let c_id = chitchat::ChitchatId::new("c".to_string(), 1, "127.0.0.1:9".parse().unwrap());
    let meta = |http: &str| {
        serde_json::to_string(&NodeMeta {
            role: NodeRole::Worker,
            models: vec!["m".into()],
            http_addr: http.into(),
            quic_addr: "127.0.0.1:9".into(),
        })
        .unwrap()
    };
    let mut held = std::collections::BTreeMap::new();
    let start_values = publish(
        &c,
        &c_id,
        &mut held,
        1,
        &[
            (KEY_CERT, c.chain().to_owned()),
            (KEY_VERSION, SCHEMA_VERSION.to_string()),
            (KEY_NODE, meta("127.0.0.1:1")),
            (KEY_LOAD, serde_json::to_string(&LoadReport::default()).unwrap()),
            (KEY_KV, serde_json::to_string(&KvSummarySlot::default()).unwrap()),
        ],
    );
    let mut hb = 1;
    wait_for("a sees c", Duration::from_secs(3), || {
        hb += 1;
        m.endpoint.send_gossip(a_addr, m_addr, synack(&c_id, hb, 0, &start_values));
        a.membership.peers().iter().any(|p| p.node_id == "c")
    })
    .await;
    let whole = a.membership.peers().iter().find(|p| p.node_id == "c").cloned().unwrap();

    // c then publishes a new load (6) and a new address (7); m relays the address alone.
    let next = publish(
        &c,
        &c_id,
        &mut held,
        6,
        &[
            (KEY_LOAD, serde_json::to_string(&LoadReport { engines: vec![engine(3)], held: 3 }).unwrap()),
            (KEY_NODE, meta("127.0.0.1:77")),
        ],
    );
    let before = a.membership.rejected_states();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        hb += 1;
        m.endpoint.send_gossip(a_addr, m_addr, synack(&c_id, hb, 5, &next[1..]));
        if let Some(seen) = a.membership.peers().iter().find(|p| p.node_id == "c") {
            assert_eq!(seen.meta, whole.meta, "a new address with a stale load was used");
            assert_eq!(seen.load, whole.load);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The values did reach a (its chitchat took them), they were just never used.
    assert_eq!(a.membership.rejected_states(), before, "nothing forged, nothing refused yet");
}
