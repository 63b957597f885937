//! The cluster simulator: a discrete-event model of a kvmesh cluster in virtual time, to show
//! how routing behaves at sizes and loads that cannot run on one machine.
//!
//! Owns: the virtual-time world (engines, nodes, gossip delay and bytes, cells) and the
//! figures `kvmesh simulate` prints. Must not: route by rules of its own; every routing
//! decision goes through `policy` as the node's does, so the two cannot drift.
//!
//! What is real and what is modelled:
//! - Engines: the engine simulator's own scheduler, KV cache and step-time formula
//!   (`engine::EngineCore`, `timing`), driven by an event queue instead of a clock.
//! - Routing: the product's code. Each node keeps the exact index of its engine from that
//!   engine's KV events (`policy::prefix_index`), publishes its Bloom summary
//!   (`policy::summary`), remembers what it routed where (`policy::route_history`), and turns
//!   what it sees into candidates and a choice with `policy::candidates::decide`, the same call
//!   the node's router makes (`node::router::pick`).
//! - Staleness: each node reads its engine's load every `engine_poll_interval_ms` (as the node
//!   polls `/metrics`), publishes load every `load_publish_interval_ms` and its summary every
//!   `summary_interval_ms`; other nodes see a publication after the gossip delay of `gossip`.
//! - Network: a fixed RTT within a site and between sites (`sites`), half of it each way; the
//!   node adds `node_overhead_ms` plus `node_us_per_prompt_token` per request (and
//!   `forward_us_per_prompt_token` when it forwards to a peer), the engine's API server
//!   `frontend_ms` plus `frontend_us_per_prompt_token` (tokenizing). Bandwidth and CPU
//!   contention are not modelled.
//! - Gossip bytes: modelled (`gossip`), from the sizes the product would publish.
//!
//! Policies: `round-robin`, `least-load`, `kvmesh` and `kvmesh-random` run on every node as the
//! router does; `oracle` is one central router that sees every engine's exact index and load
//! with no delay (what llm-d's precise-prefix scheduler knows); `llm-d` is one central router
//! with llm-d's default policy (`llmd`).

pub mod gossip;
pub mod llmd;
mod world;

pub use world::{engine_facts, Seen};

use std::path::PathBuf;

use serde::Deserialize;

use kvmesh_policy::cells::CellSettings;
use kvmesh_policy::pd::PdSettings;
use kvmesh_policy::score::ScoreWeights;
use kvmesh_sim::timing::TimingModel;
use kvmesh_sim::workload::Workload;
use kvmesh_sim::SimError;

pub use world::simulate;

/// `kvmesh simulate --config FILE`: what to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Workload file (`shared/workloads/` shape). Distinct prefixes (groups, conversations)
    /// scale with the number of engines from the file's 8.
    pub workload: PathBuf,
    /// Cluster sizes to run (nodes with one engine each).
    pub nodes: Vec<usize>,
    pub policies: Vec<String>,
    /// Arrival rates per engine, requests/s (the cluster's rate is this times its engines).
    pub rates_per_engine: Vec<f64>,
    /// Virtual seconds of arrivals per run; the first `warmup_fraction` is not counted.
    pub duration_s: f64,
    pub warmup_fraction: f64,
    pub seed: u64,
    /// Seeds to run every point with (each a separate run and row); empty: `seed` alone.
    pub seeds: Vec<u64>,
    pub engine: EngineModel,
    pub network: Network,
    pub gossip: Gossip,
    /// How the `kvmesh-cells` policy splits the mesh.
    pub cells: Cells,
    /// When set, gossip intervals are stretched so that a node's gossip stays within this many
    /// KB/s at each size (`gossip::budgeted`); otherwise `gossip` applies as given.
    pub gossip_budget_kb_s: Option<f64>,
    pub weights: ScoreWeights,
    pub pd: PdSettings,
    pub route_history_ttl_s: u64,
    pub route_history_max_keys: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            workload: PathBuf::from("examples/workloads/shared-prefix.toml"),
            nodes: vec![8],
            policies: ["round-robin", "least-load", "kvmesh", "oracle"].map(String::from).to_vec(),
            rates_per_engine: vec![5.0],
            duration_s: 40.0,
            warmup_fraction: 0.25,
            seed: 7,
            seeds: Vec::new(),
            engine: EngineModel::default(),
            network: Network::default(),
            gossip: Gossip::default(),
            cells: Cells::default(),
            gossip_budget_kb_s: None,
            weights: ScoreWeights::default(),
            pd: PdSettings::default(),
            route_history_ttl_s: 120,
            route_history_max_keys: 32_768,
        }
    }
}

/// One engine per node, as the engine simulator's defaults (8B model on one H100).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineModel {
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub timing: TimingModel,
    /// The engine's API server tokenizes each prompt before scheduling it, on the CPU, on top
    /// of `timing.frontend_ms`. Fitted, with the network's per-token costs, to the real-process
    /// runs at low load (`scripts/validate-simulator.sh`: TTFT p50 at 10 req/s of the oracle
    /// and of kvmesh).
    pub frontend_us_per_prompt_token: f64,
}

impl Default for EngineModel {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_gpu_blocks: 28_000,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            timing: TimingModel::default(),
            frontend_us_per_prompt_token: 0.35,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Network {
    /// RTT between two nodes of one site, ms.
    pub rtt_ms: f64,
    /// Added by the node that receives a request (scoring, proxying), ms.
    pub node_overhead_ms: f64,
    /// Added per prompt token by the receiving node (tokenizing the uncached part, scoring).
    pub node_us_per_prompt_token: f64,
    /// Added per prompt token when the request is forwarded to a peer's engine: the QUIC hop
    /// and the peer node's proxying of the body. Fitted with the per-token costs above.
    pub forward_us_per_prompt_token: f64,
    /// Edge sites: nodes without engines that clients send to, `rtt_ms` away from the cluster.
    pub edge: Vec<EdgeSite>,
    /// With edge sites: the share of requests that clients send to the edge (the rest go to
    /// cluster nodes).
    pub edge_share: f64,
}

impl Default for Network {
    fn default() -> Self {
        Self {
            rtt_ms: 0.5,
            node_overhead_ms: 0.5,
            node_us_per_prompt_token: 0.5,
            forward_us_per_prompt_token: 1.0,
            edge: Vec::new(),
            edge_share: 1.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeSite {
    pub nodes: usize,
    /// RTT to every cluster node, ms.
    pub rtt_ms: f64,
    /// Whether each of the site's nodes has an engine (a small local GPU pool); otherwise they
    /// are pure routers.
    #[serde(default)]
    pub engines: bool,
}

/// The node's gossip settings (same names and defaults as the node's config).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gossip {
    pub gossip_interval_ms: f64,
    pub fanout: usize,
    pub engine_poll_interval_ms: f64,
    pub load_publish_interval_ms: f64,
    pub summary_interval_ms: f64,
    /// Sampling stride of published summaries (the node's `summary_stride`).
    pub summary_stride: u32,
}

impl Default for Gossip {
    fn default() -> Self {
        Self {
            gossip_interval_ms: 300.0,
            fanout: 3,
            engine_poll_interval_ms: 500.0,
            load_publish_interval_ms: 200.0,
            summary_interval_ms: 2_000.0,
            summary_stride: kvmesh_policy::summary::DEFAULT_STRIDE,
        }
    }
}

/// Cells (`policy::cells`), for the `kvmesh-cells` policy: cluster nodes are dealt into cells of
/// about `size` (node `i` into cell `i mod cells`; edge nodes into the first), each a full mesh
/// of its own. `gateways` nodes per cell are also on the backbone, where the first of them
/// publishes the cell's aggregate load every `backbone_interval_ms` (also the backbone's gossip
/// round); gateways republish the table into their cells. A request whose home is another cell
/// is placed by the prompt's home node there, which routes it within its cell (`place`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cells {
    pub size: usize,
    pub gateways: usize,
    pub backbone_interval_ms: f64,
    pub routing: CellSettings,
    /// How a request reaches its home cell. `true` (the node's way): the origin asks the home
    /// node where to send it and forwards it there itself. `false`: the whole request is relayed
    /// through the home node, which forwards it again unless its own engine serves it (the first
    /// design, kept to compare; the node still does this for a split request).
    pub place: bool,
}

impl Default for Cells {
    fn default() -> Self {
        Self { size: 16, gateways: 2, backbone_interval_ms: 2_000.0, routing: CellSettings::default(), place: true }
    }
}

impl ClusterConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: &str| Err(SimError::Cluster(m.to_owned()));
        if self.nodes.is_empty() || self.nodes.contains(&0) {
            return bad("nodes: give at least one cluster size, each at least 1");
        }
        if self.rates_per_engine.is_empty() || self.rates_per_engine.iter().any(|r| !positive(*r)) {
            return bad("rates_per_engine: give at least one rate, each above 0");
        }
        if !positive(self.duration_s) || !(0.0..1.0).contains(&self.warmup_fraction) {
            return bad("duration_s must be above 0 and warmup_fraction in [0, 1)");
        }
        for p in &self.policies {
            if !POLICIES.contains(&p.as_str()) {
                return Err(SimError::Cluster(format!("policies: unknown `{p}` (known: {})", POLICIES.join(", "))));
            }
        }
        let g = &self.gossip;
        if [g.gossip_interval_ms, g.engine_poll_interval_ms, g.load_publish_interval_ms, g.summary_interval_ms]
            .iter()
            .any(|v| !positive(*v))
            || g.fanout == 0
            || !(1..=kvmesh_policy::summary::MAX_STRIDE).contains(&g.summary_stride)
        {
            return bad("gossip: every interval must be above 0, fanout at least 1, summary_stride in 1..=64");
        }
        if self.network.edge.iter().any(|e| e.nodes == 0 || e.rtt_ms < 0.0)
            || !(0.0..=1.0).contains(&self.network.edge_share)
        {
            return bad("network.edge: each site needs nodes >= 1 and rtt_ms >= 0; edge_share in [0, 1]");
        }
        let c = &self.cells;
        if c.size == 0 || c.gateways == 0 || !positive(c.backbone_interval_ms) {
            return bad("cells: size and gateways must be at least 1, backbone_interval_ms above 0");
        }
        c.routing.validate().map_err(SimError::Cluster)?;
        if self.gossip_budget_kb_s.is_some_and(|b| !positive(b)) {
            return bad("gossip_budget_kb_s must be above 0 (or left out)");
        }
        if self.engine.block_size == 0 || self.engine.num_gpu_blocks == 0 {
            return bad("engine: block_size and num_gpu_blocks must be above 0");
        }
        self.engine.timing.validate().map_err(SimError::Cluster)
    }
}

/// Above zero and finite (NaN is neither).
fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// `kvmesh-cells` is kvmesh with the mesh split into cells (`cells`); the others run flat.
/// `kvmesh-random` is kvmesh drawing at random among near-equal engines where kvmesh ranks them
/// by the prompt's prefix (`affinity::prefix_ranks`): the baseline that measures placement.
/// `llm-d` is llm-d's router policy ("sticky until saturated", `llmd`), central like the oracle.
pub const POLICIES: [&str; 7] =
    ["round-robin", "least-load", "kvmesh", "kvmesh-random", "kvmesh-cells", "oracle", "llm-d"];

/// One (size, policy, rate) run, in the routing benchmark's terms.
#[derive(Debug, Clone)]
pub struct Row {
    pub nodes: usize,
    /// The run's seed (arrivals, placement draws, engines' hash seeds).
    pub seed: u64,
    pub policy: String,
    /// Cluster-wide arrival rate, requests/s.
    pub rate: f64,
    pub done: usize,
    pub ttft_ms: [f64; 3],
    pub itl_ms: [f64; 2],
    pub e2e_ms: [f64; 2],
    pub out_tok_s: f64,
    pub hit_rate: f64,
    pub goodput: f64,
    /// Gossip bytes per node per second (digests + load + summaries), modelled.
    pub gossip_kb_s: f64,
    /// Of which KV summaries.
    pub summary_kb_s: f64,
    /// Cells the mesh was split into (1: flat).
    pub cells: usize,
    /// With cells: gossip of a gateway node (its cell's, the cells table and the backbone's).
    pub gateway_kb_s: Option<f64>,
    /// With cells: the share of requests whose home is another cell (placed by its home node,
    /// or relayed to it with `place = false`).
    pub relayed: f64,
    /// Coefficient of variation of the requests each engine was sent (after warm-up).
    pub load_cov: f64,
    /// Share of requests sent to an engine that held fewer of their leading blocks than another
    /// engine held at that moment: the cache the choice lost.
    pub lost: f64,
    /// Requests received at edge nodes, by site (its RTT to the cluster, ms).
    pub edge: Vec<(f64, EdgeStats)>,
    /// Wall-clock seconds the run took.
    pub wall_s: f64,
    /// Gossip settings in force.
    pub gossip: Gossip,
}

/// How requests received at edge nodes were placed, judged against the truth when each was
/// routed: every engine's exact cache and current queue, scored with the router's own TTFT
/// prediction (`score::predicted_ttft_ms`), so only stale or missing information makes a
/// choice wrong.
#[derive(Debug, Clone, Default)]
pub struct EdgeStats {
    pub requests: usize,
    /// Sent to an engine outside the edge node's site.
    pub sent_far: usize,
    /// Of those: the far engine was truly at least as good (within the router's tolerance) as
    /// the best one in the site.
    pub far_paid: usize,
    /// Kept in the site although a far engine was truly better by more than the tolerance.
    pub near_missed: usize,
    /// Cached prefix the chosen engine held, tokens.
    pub mean_matched_tokens: f64,
}

/// Runs every (size, rate, policy) of `cfg`; `progress` is called after each run.
pub fn run_all(cfg: &ClusterConfig, mut progress: impl FnMut(&Row)) -> Result<Vec<Row>, SimError> {
    cfg.validate()?;
    let workload = Workload::load(&cfg.workload)?;
    if matches!(workload, Workload::Agentic(_)) {
        return Err(SimError::Cluster(
            "the cluster simulator does not model the agentic workload (its prompts are tools and messages rendered by \
             a chat template); run it on real nodes with `kvmesh bench routing`"
                .into(),
        ));
    }
    let mut rows = Vec::new();
    let seeds = if cfg.seeds.is_empty() { vec![cfg.seed] } else { cfg.seeds.clone() };
    for &n in &cfg.nodes {
        for &r in &cfg.rates_per_engine {
            for &seed in &seeds {
                let cfg = ClusterConfig { seed, ..cfg.clone() };
                for p in &cfg.policies {
                    let row = simulate(&cfg, &workload, n, p, r)?;
                    progress(&row);
                    rows.push(row);
                }
            }
        }
    }
    Ok(rows)
}
