//! Multi-node tests of the mesh. This crate holds the harness (`Cluster`), the tests live in
//! `tests/`.
//!
//! What runs: real nodes in one process, each with a real QUIC endpoint, mutual TLS and gossip,
//! and an embedded engine simulator. Their QUIC runs on loopback UDP, or on a simulated network
//! (`simnet`: delay, loss, partitions, hosts down) for the fault tests; and, in [`netns`], real
//! `kvmesh` processes in network namespaces with kernel-made faults (root only). Membership and
//! gossip faults also run in virtual time (`tests/virtual_time.rs`); request-level faults run in
//! real time (`simnet` explains why).
//!
//! Must not: be a dependency of any shipped crate.

pub mod netns;
pub mod simnet;

use std::time::{Duration, Instant};

use kvmesh_node::config::Config;
use kvmesh_node::{Node, RunningNode, StartOptions};
use kvmesh_sim::EngineConfig;
use tokio_util::sync::CancellationToken;

pub use simnet::SimNet;

/// Nodes sharing one throwaway CA. Node `i` is named `n{i}`; all join through `n0`.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<Option<RunningNode>>,
    seed: Option<String>,
    pub cluster_id: String,
    /// When set, nodes' QUIC runs on this simulated network instead of loopback UDP.
    pub net: Option<SimNet>,
}

/// Simulated engines run 50x faster than real time so tests finish quickly.
pub fn fast_engine() -> EngineConfig {
    EngineConfig { time_scale: 0.02, ..EngineConfig::default() }
}

impl Cluster {
    pub fn new(cluster_id: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        kvmesh_transport::certs::create_ca(dir.path(), cluster_id).expect("CA");
        Self { dir, nodes: Vec::new(), seed: None, cluster_id: cluster_id.to_owned(), net: None }
    }

    /// A cluster whose nodes talk QUIC over `net`; a node's address there is its name's.
    pub fn simulated(cluster_id: &str, net: SimNet) -> Self {
        Self { net: Some(net), ..Self::new(cluster_id) }
    }

    /// A config for the next node, joined through the first one, with certificates made.
    pub fn config(&self, name: &str) -> Config {
        kvmesh_transport::certs::create_node(self.dir.path(), self.dir.path(), name).expect("node cert");
        Config {
            node_name: name.to_owned(),
            http_addr: "127.0.0.1:0".into(),
            quic_addr: self.net.as_ref().map_or_else(|| "127.0.0.1:0".into(), |n| n.addr(name).to_string()),
            seeds: self.seed.clone().into_iter().collect(),
            tls_dir: Some(self.dir.path().to_path_buf()),
            cluster_id: self.cluster_id.clone(),
            gossip_interval_ms: 100,
            load_publish_interval_ms: 200,
            summary_interval_ms: 200,
            engine_poll_interval_ms: 100,
            embedded: fast_engine(),
            ..Config::default()
        }
    }

    pub async fn start(&mut self, cfg: Config) -> usize {
        let node = self.launch(cfg).await;
        if self.seed.is_none() {
            self.seed = node.mesh.as_ref().map(|m| m.advertise.to_string());
        }
        self.nodes.push(Some(node));
        self.nodes.len() - 1
    }

    /// Starts a node in slot `i` (after `kill(i)`: a restart, a new process with the config's
    /// name, and on a simulated network the same address).
    pub async fn restart(&mut self, i: usize, cfg: Config) {
        self.kill(i).await;
        self.nodes[i] = Some(self.launch(cfg).await);
    }

    async fn launch(&self, cfg: Config) -> RunningNode {
        let quic_socket = self.net.as_ref().map(|n| n.socket(&cfg.node_name) as _);
        Node::start_with(cfg, &CancellationToken::new(), StartOptions { quic_socket }).await.expect("node starts")
    }

    pub async fn with_nodes(cluster_id: &str, n: usize) -> Self {
        let mut c = Self::new(cluster_id);
        for i in 0..n {
            let cfg = c.config(&format!("n{i}"));
            c.start(cfg).await;
        }
        c
    }

    pub fn node(&self, i: usize) -> &RunningNode {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn live(&self) -> impl Iterator<Item = &RunningNode> {
        self.nodes.iter().flatten()
    }

    /// Names each running node currently sees as live (itself included), sorted.
    pub fn views(&self) -> Vec<Vec<String>> {
        self.live()
            .map(|n| {
                let mut v: Vec<String> =
                    n.mesh.as_ref().map(|m| m.peers().iter().map(|p| p.node_id.clone()).collect()).unwrap_or_default();
                v.sort();
                v
            })
            .collect()
    }

    /// Waits until every running node sees exactly the running nodes; returns how long it took.
    pub async fn converge(&self, limit: Duration) -> Duration {
        let mut want: Vec<String> = self.live().map(|n| n.node_name.clone()).collect();
        want.sort();
        let t = Instant::now();
        loop {
            if self.views().iter().all(|v| *v == want) {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "no convergence within {limit:?}: want {want:?}, views {:?}", self.views());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops node `i` abruptly: no goodbye to peers, its engine and endpoint just vanish.
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill().await;
        }
    }

    /// Shuts every node down gracefully, all at once.
    pub async fn shutdown(mut self) {
        futures::future::join_all(self.nodes.iter_mut().filter_map(Option::take).map(|n| n.shutdown())).await;
    }
}
