//! Membership faults in virtual time: the real transport (quinn with mutual TLS over the
//! `SimNet` socket) and the real membership (chitchat, `kvmesh_gossip::Membership`) on tokio's
//! paused clock. Time moves only when every task waits, straight to the next timer, so the
//! bounds below are the protocol's, not this machine's: no slack for scheduling, and a minute
//! of gossip runs in a second or two.
//!
//! Runs are not bit-identical: chitchat picks gossip peers, and quinn and rustls draw keys and
//! connection ids, from the OS's randomness. So bounds are asserted, not exact figures; the
//! simulated network's drops are seeded.
//!
//! What runs here is membership and gossiped state (views, load reports, restarts): everything
//! in it is driven by tokio timers and in-memory packets. Whole requests are not: they reach
//! engines over real HTTP and, for the embedded engine, real KV-event sockets, which a paused
//! clock would overrun. The request-level scenarios (nothing the client saw accepted is lost or
//! run twice) are in `faults.rs`, in real time on the same simulated network.
//!
//! Bounds, with gossip every `G` = 100 ms, phi threshold 8 and chitchat's prior of two rounds
//! between heartbeats:
//! - a silent peer leaves a view after phi passes 8: at most 8 x 2 rounds of silence, plus a
//!   round to notice: `DETECT` = 1.7 s;
//! - after a heal, a peer is back once a gossip round crosses (a QUIC dial: a handshake, a
//!   few ms here) and two fresh heartbeats reset its detector: a few rounds, and chitchat
//!   picks one random peer per round, so `HEAL` = 2 s covers the unlucky draws;
//! - a value set on one node reaches every node of a connected mesh within a few rounds of
//!   random gossip: `SPREAD` = 1.5 s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvmesh_gossip::{EngineLoad, GossipConfig, LoadReport, Membership, NodeMeta, NodeRole};
use kvmesh_netsim_tests::simnet::{LinkRule, SimNet};
use kvmesh_transport::endpoint::EndpointConfig;
use kvmesh_transport::{MeshEndpoint, TlsIdentity};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const G: Duration = Duration::from_millis(100);
const DETECT: Duration = Duration::from_millis(1_700);
const HEAL: Duration = Duration::from_millis(2_000);
const SPREAD: Duration = Duration::from_millis(1_500);

struct Mesh {
    net: SimNet,
    dir: tempfile::TempDir,
    nodes: Vec<Option<VNode>>,
}

struct VNode {
    name: String,
    membership: Arc<Membership>,
    endpoint: Arc<MeshEndpoint>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Mesh {
    fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        kvmesh_transport::certs::create_ca(dir.path(), "vt").expect("CA");
        let net = SimNet::new(seed);
        net.set_default(LinkRule { delay: Duration::from_millis(1), jitter: Duration::from_micros(500), loss: 0.0 });
        Self { net, dir, nodes: Vec::new() }
    }

    fn addr(&self, name: &str) -> SocketAddr {
        self.net.addr(name)
    }

    /// Starts `name` (a new generation if it ran before) with `seeds` by name.
    async fn start(&mut self, name: &str, seeds: &[&str]) -> usize {
        let node = self.launch(name, seeds).await;
        match self.nodes.iter().position(|n| n.as_ref().is_some_and(|n| n.name == name)) {
            Some(i) => {
                self.nodes[i] = Some(node);
                i
            }
            None => {
                self.nodes.push(Some(node));
                self.nodes.len() - 1
            }
        }
    }

    async fn launch(&self, name: &str, seeds: &[&str]) -> VNode {
        let (ca, crt, key) = TlsIdentity::paths_in(self.dir.path(), name);
        if !crt.exists() {
            kvmesh_transport::certs::create_node(self.dir.path(), self.dir.path(), name).expect("node cert");
        }
        let id = TlsIdentity::load(&ca, &crt, &key).expect("identity");
        let addr = self.addr(name);
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        let (endpoint, inbox) =
            MeshEndpoint::with_socket(&id, EndpointConfig::new(addr), self.net.socket(name), &cancel, &tasks)
                .expect("endpoint");
        let meta = NodeMeta {
            role: NodeRole::Worker,
            models: vec![],
            http_addr: "127.0.0.1:0".into(),
            quic_addr: addr.to_string(),
        };
        let mut cfg = GossipConfig::new(name, "vt", addr, seeds.iter().map(|s| self.addr(s).to_string()).collect());
        cfg.gossip_interval = G;
        let membership =
            Membership::start(cfg, endpoint.clone(), inbox, &meta, &cancel, &tasks).await.expect("membership");
        VNode { name: name.to_owned(), membership, endpoint, cancel, tasks }
    }

    /// The node vanishes without a goodbye: its address drops every packet, its tasks stop.
    async fn crash(&mut self, i: usize) {
        let Some(n) = self.nodes[i].take() else { return };
        self.net.set_down(self.addr(&n.name), true);
        n.cancel.cancel();
        n.tasks.close();
        n.tasks.wait().await;
        n.endpoint.close().await;
        self.nodes[i] = None;
    }

    fn live(&self) -> impl Iterator<Item = &VNode> {
        self.nodes.iter().flatten()
    }

    /// Each live node's view (names, sorted), by node.
    fn views(&self) -> Vec<(String, Vec<String>)> {
        self.live()
            .map(|n| {
                let mut v: Vec<String> = n.membership.peers().iter().map(|p| p.node_id.clone()).collect();
                v.sort();
                (n.name.clone(), v)
            })
            .collect()
    }

    fn node(&self, name: &str) -> &VNode {
        self.live().find(|n| n.name == name).expect("live node")
    }

    async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.crash(i).await;
        }
    }
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn load(running: u32) -> LoadReport {
    LoadReport {
        engines: vec![EngineLoad {
            name: "e".into(),
            models: vec!["m".into()],
            healthy: true,
            role: Default::default(),
            running,
            waiting: 0,
            kv_usage: 0.0,
            tokens_per_s: 0.0,
            block_size: Some(16),
            cards: Vec::new(),
            max_model_len: None,
            ttft_fit: None,
        }],
        ..Default::default()
    }
}

/// `running` that `observer` sees published by `of` (None: not in its view).
fn seen_load(m: &Mesh, observer: &str, of: &str) -> Option<u32> {
    m.node(observer).membership.peers().iter().find(|p| p.node_id == of)?.load.engines.first().map(|e| e.running)
}

/// Virtual time until `done` holds (checked every 10 ms of virtual time); panics with the
/// views after `limit`.
async fn until(m: &Mesh, limit: Duration, what: &str, mut done: impl FnMut(&Mesh) -> bool) -> Duration {
    let t = Instant::now();
    while !done(m) {
        assert!(t.elapsed() <= limit, "{what}: not within {limit:?} of virtual time; views {:?}", m.views());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    t.elapsed()
}

/// Polls for `span` of virtual time that `ok` holds throughout.
async fn holds(m: &Mesh, span: Duration, what: &str, mut ok: impl FnMut(&Mesh) -> bool) {
    let t = Instant::now();
    while t.elapsed() < span {
        assert!(ok(m), "{what} broke at {:?}; views {:?}", t.elapsed(), m.views());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn mesh_of(seed: u64, all: &[&str]) -> Mesh {
    let mut m = Mesh::new(seed);
    for name in all {
        m.start(name, &all[..1]).await;
    }
    let whole = names(all);
    let took = until(&m, Duration::from_secs(5), "join", |m| m.views().iter().all(|(_, v)| *v == whole)).await;
    eprintln!("{} nodes joined in {took:?} of virtual time", all.len());
    m
}

#[tokio::test(start_paused = true)]
async fn a_third_partitioned_then_healed() {
    let all = ["n0", "n1", "n2", "n3", "n4", "n5"];
    let m = mesh_of(1, &all).await;
    let (minor, major) = (["n0", "n1"], ["n2", "n3", "n4", "n5"]);
    let addrs = |side: &[&str]| side.iter().map(|n| m.addr(n)).collect::<Vec<_>>();
    let (a, b) = (addrs(&minor), addrs(&major));
    m.net.partition(&a, &b);
    let split = until(&m, DETECT, "each side sees only itself", |m| {
        m.views().iter().all(|(n, v)| *v == names(if minor.contains(&n.as_str()) { &minor } else { &major }))
    })
    .await;
    // Each side goes on: its members' new load reaches its own side (no split-brain: a side
    // serves from what it can reach, and knows what it can reach).
    for (i, n) in all.iter().enumerate() {
        m.node(n).membership.set_load(&load(100 + i as u32)).await.expect("load");
    }
    until(&m, SPREAD, "loads spread within each side", |m| {
        all.iter().enumerate().all(|(i, of)| {
            let side: &[&str] = if minor.contains(of) { &minor } else { &major };
            side.iter().all(|obs| seen_load(m, obs, of) == Some(100 + i as u32))
        })
    })
    .await;
    m.net.heal();
    let healed = until(&m, HEAL, "views whole and every load seen everywhere", |m| {
        all.iter().enumerate().all(|(i, of)| all.iter().all(|obs| seen_load(m, obs, of) == Some(100 + i as u32)))
    })
    .await;
    eprintln!("partition seen in {split:?}, healed in {healed:?} (virtual)");
    m.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_way_cut_leaves_views_whole() {
    // n0 -> n1 packets vanish; n1 -> n0 still arrive. A QUIC connection needs both ways, so
    // these two cannot talk directly, but gossip relays their state through the others: nobody
    // is declared dead, and their updates still reach each other.
    let all = ["n0", "n1", "n2", "n3"];
    let m = mesh_of(2, &all).await;
    m.net.block(m.addr("n0"), m.addr("n1"));
    let whole = names(&all);
    holds(&m, Duration::from_secs(10), "whole views under a one-way cut", |m| {
        m.views().iter().all(|(_, v)| *v == whole)
    })
    .await;
    m.node("n0").membership.set_load(&load(7)).await.expect("load");
    m.node("n1").membership.set_load(&load(9)).await.expect("load");
    until(&m, SPREAD, "updates cross the cut by way of the others", |m| {
        seen_load(m, "n1", "n0") == Some(7) && seen_load(m, "n0", "n1") == Some(9)
    })
    .await;
    m.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn twenty_percent_loss() {
    let all = ["n0", "n1", "n2", "n3", "n4"];
    let mut m = Mesh::new(3);
    m.net.set_loss(0.2);
    for name in all {
        m.start(name, &all[..1]).await;
    }
    let whole = names(&all);
    let took =
        until(&m, Duration::from_secs(5), "join under 20% loss", |m| m.views().iter().all(|(_, v)| *v == whole)).await;
    holds(&m, Duration::from_secs(20), "no false death under 20% loss", |m| m.views().iter().all(|(_, v)| *v == whole))
        .await;
    m.node("n3").membership.set_load(&load(42)).await.expect("load");
    let spread =
        until(&m, SPREAD, "an update under 20% loss", |m| all.iter().all(|o| seen_load(m, o, "n3") == Some(42))).await;
    eprintln!("under 20% loss: joined in {took:?}, an update spread in {spread:?} (virtual)");
    assert!(m.net.stats().lost > 0, "the loss was applied");
    m.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_flapping_node_settles() {
    let all = ["n0", "n1", "n2", "n3"];
    let m = mesh_of(4, &all).await;
    let flapper = m.addr("n3");
    let whole = names(&all);
    let steady = names(&["n0", "n1", "n2"]);
    for round in 0..3 {
        // A short outage (0.5 s: phi reaches about 2) is ridden out: nobody drops n3.
        m.net.set_down(flapper, true);
        holds(&m, Duration::from_millis(500), "a short outage evicts nobody", |m| {
            m.views().iter().all(|(_, v)| *v == whole)
        })
        .await;
        m.net.set_down(flapper, false);
        tokio::time::sleep(Duration::from_millis(500)).await;
        // A long one (2.5 s) is not: the first time, the others drop n3 within the detection
        // bound. Later ones take longer or are ridden out: chitchat's detector learns from the
        // gaps it saw (a 0.5 s outage counts as a slow heartbeat), which is what an adaptive
        // detector is for. Throughout, the steady three keep one another.
        m.net.set_down(flapper, true);
        let t = Instant::now();
        let mut gone = None;
        while t.elapsed() < Duration::from_millis(2_500) {
            let views = m.views();
            let steady_ok = views.iter().filter(|(n, _)| n != "n3").all(|(_, v)| steady.iter().all(|x| v.contains(x)));
            assert!(steady_ok, "flap {round}: the steady three lost one another: {views:?}");
            if gone.is_none() && views.iter().filter(|(n, _)| n != "n3").all(|(_, v)| *v == steady) {
                gone = Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if round == 0 {
            assert!(gone.is_some_and(|g| g <= DETECT), "flap 0: dropped after {gone:?}, bound {DETECT:?}");
        }
        m.net.set_down(flapper, false);
        let back = until(&m, HEAL, "whole again once it answers", |m| m.views().iter().all(|(_, v)| *v == whole)).await;
        eprintln!("flap {round}: dropped after {gone:?} of silence, whole again {back:?} after its return (virtual)");
    }
    m.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_restart_under_the_same_name_replaces_the_old_generation() {
    let all = ["n0", "n1", "n2", "n3"];
    let mut m = mesh_of(5, &all).await;
    let old = m.node("n2").membership.generation();
    let i = m.nodes.iter().position(|n| n.as_ref().is_some_and(|n| n.name == "n2")).expect("n2");
    m.crash(i).await;
    // Generations are wall-clock milliseconds: let one pass for real.
    std::thread::sleep(Duration::from_millis(2));
    m.net.set_down(m.addr("n2"), false);
    m.start("n2", &["n0"]).await;
    let new = m.node("n2").membership.generation();
    assert!(new > old, "a new generation: {old} -> {new}");
    let took = until(&m, HEAL, "every view holds n2's new generation, once", |m| {
        m.live().all(|n| {
            let p = n.membership.peers();
            p.len() == 4 && p.iter().filter(|p| p.node_id == "n2").all(|p| p.generation == new)
        })
    })
    .await;
    eprintln!("the restarted node replaced its old generation everywhere in {took:?} (virtual)");
    m.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_seed_down_at_start() {
    // n0, the first seed, is down when the others start; they also list n1, and join there.
    let mut m = Mesh::new(6);
    m.net.set_down(m.addr("n0"), true);
    for name in ["n1", "n2", "n3"] {
        m.start(name, &["n0", "n1"]).await;
    }
    let three = names(&["n1", "n2", "n3"]);
    until(&m, Duration::from_secs(5), "the others meet through the second seed", |m| {
        m.views().iter().all(|(_, v)| *v == three)
    })
    .await;
    m.net.set_down(m.addr("n0"), false);
    m.start("n0", &["n1"]).await;
    let all = names(&["n0", "n1", "n2", "n3"]);
    let took = until(&m, HEAL, "the seed joins when it comes up", |m| m.views().iter().all(|(_, v)| *v == all)).await;
    eprintln!("the late seed was in every view {took:?} (virtual) after it started");
    m.shutdown().await;
}
