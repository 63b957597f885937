//! The event loop of one cluster-simulator run: engines, nodes, gossip and clients in virtual
//! time (microseconds).
//!
//! Why one long file: it is one event loop, and every handler advances the same world; split,
//! the simulated timeline would be scattered over modules that all need all of its state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::gossip::GossipModel;
use crate::{ClusterConfig, EdgeStats, Row};
use kvmesh_policy::blocks;
use kvmesh_policy::candidates::{self, Cache, EngineFacts, Open, PromptKeys};
use kvmesh_policy::cells::{self, CellLoad, Placements};
use kvmesh_policy::pd::Role;
use kvmesh_policy::prefix_index::{EngineIndex, IndexEvent, Tier};
use kvmesh_policy::route::Mode;
use kvmesh_policy::route_history::{self, RoutedKeys};
use kvmesh_policy::score::{self, Estimate};
use kvmesh_policy::summary::{self, BloomShard};
use kvmesh_sim::engine::{CoreConfig, EngineCore, NewSequence, ScheduledStep};
use kvmesh_sim::kv_cache::{KvEvent, Medium};
use kvmesh_sim::workload::Workload;
use kvmesh_sim::SimError;

type Us = u64;

fn us(ms: f64) -> Us {
    (ms * 1000.0).max(0.0).round() as Us
}

/// Model name the simulated engines serve; the routers' chain seed derives from it.
const MODEL: &str = "kvmesh-sim";

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Load {
    running: f64,
    waiting: f64,
    kv_usage: f64,
}

impl From<Load> for candidates::Load {
    fn from(l: Load) -> Self {
        Self { running: l.running, waiting: l.waiting, kv_usage: l.kv_usage }
    }
}

/// What other nodes see of a value a node publishes: versions with the time they arrive.
struct Published<T> {
    versions: VecDeque<(Us, T)>,
}

impl<T> Published<T> {
    fn new() -> Self {
        Self { versions: VecDeque::new() }
    }

    fn push(&mut self, visible_at: Us, v: T) {
        self.versions.push_back((visible_at, v));
    }

    /// The latest version visible at `now` (observers all see a version at the same moment).
    fn visible(&mut self, now: Us) -> Option<&T> {
        while self.versions.len() >= 2 && self.versions[1].0 <= now {
            self.versions.pop_front();
        }
        self.versions.front().filter(|(at, _)| *at <= now).map(|(_, v)| v)
    }
}

struct Engine {
    core: EngineCore,
    node: usize,
    /// The node's exact index of this engine, from its KV events.
    index: EngineIndex,
    kv_seq: u64,
    step: Option<ScheduledStep>,
    /// What the node's last poll of `/metrics` read.
    polled: Load,
    load: Published<Load>,
    last_published: Option<Load>,
    /// When a load change last went into the byte count: chitchat carries only a key's latest
    /// value each round, so changes within one gossip interval cost one transfer.
    load_counted_at: Option<Us>,
}

type Summary = Arc<Vec<Option<Arc<BloomShard>>>>;

struct Node {
    engine: Option<usize>,
    /// 0: the cluster; 1..: edge sites.
    site: usize,
    /// Its cell (always 0 without cells).
    cell: usize,
    /// Requests in flight, by engine: this node's own to peers' engines, and everyone's to its own
    /// engine (it proxies them all).
    in_flight: HashMap<usize, u32>,
    routed: HashMap<usize, RoutedKeys>,
    rr: u64,
    last_shards: Vec<Option<BloomShard>>,
    summary: Published<Summary>,
    /// Requests this node placed for origins in other cells, by engine: counted as its own in
    /// flight while their lease runs (the origin, not this node, proxies them).
    placed: HashMap<usize, Placements>,
    /// Prompts this node routed to its own engine that its KV events may not show yet
    /// (`route_history::PENDING_MS`).
    pending: RoutedKeys,
}

/// One cell of a `kvmesh-cells` run.
struct Cell {
    name: String,
    engines: Vec<usize>,
    /// Nodes on the backbone; the first publishes the cell's aggregate.
    gateways: Vec<usize>,
    /// Nodes with engines, with their names: where requests homed here are sent.
    members: Vec<(usize, String)>,
    /// Requests running and waiting on the cell's engines, as the rest of the mesh sees it.
    load: Published<f64>,
}

/// A request on its way to its home node in another cell, which routes it there.
struct Relay {
    home: usize,
    prompt: Vec<u32>,
    output_len: usize,
    conv: Option<usize>,
    arrived: Us,
    /// One-way delay from the home node back to the client.
    back: Us,
}

/// A placement asked of a prompt's home node: the origin still holds the request, and
/// forwards it to the engine the home node names.
struct Placing {
    origin: usize,
    home: usize,
    prompt: Vec<u32>,
    keys: Vec<u64>,
    output_len: usize,
    conv: Option<usize>,
    arrived: Us,
}

/// Bytes of one cell's report in the cells table (name, engines, load as compact JSON, with
/// chitchat's key and version). Member lists change only with membership and are not counted.
pub const CELL_ENTRY_BYTES: f64 = 120.0;

struct Request {
    origin: usize,
    engine: usize,
    sent: Us,
    /// One-way delay from the engine back to the client.
    back: Us,
    prompt_tokens: usize,
    cached_tokens: usize,
    out_tokens: usize,
    first: Option<Us>,
    last: Option<Us>,
    itls: Vec<f32>,
    conv: Option<usize>,
    reply: Vec<u32>,
}

struct Conv {
    history: Vec<u32>,
    turn: usize,
    rng: SmallRng,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    ConvStart,
    ConvTurn(usize),
    Relay(usize),
    Place(usize),
    Deliver(usize),
    StepDone(usize),
    Poll(usize),
    PublishLoad(usize),
    PublishSummary(usize),
    PublishCell(usize),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    RoundRobin,
    Route(Mode),
    Oracle,
    /// llm-d's router policy, central (`llmd`).
    LlmD,
}

impl Policy {
    /// One router in front of every engine: no gossip, no forwarding hop.
    fn central(self) -> bool {
        matches!(self, Policy::Oracle | Policy::LlmD)
    }
}

struct Stats {
    ttft: Histogram<u64>,
    itl: Histogram<u64>,
    e2e: Histogram<u64>,
    done: usize,
    good: usize,
    out_tokens: u64,
    prompt: u64,
    cached: u64,
    load_bytes: u64,
    summary_bytes: u64,
    cell_bytes: u64,
    relayed: usize,
    submitted: usize,
    /// By edge site (index 0 unused: the cluster), with the cached tokens the choices used.
    edge: Vec<(EdgeStats, u64)>,
    /// Requests sent to each engine (after warm-up).
    per_engine: Vec<u64>,
    /// Requests sent to an engine holding fewer of their leading blocks than another engine
    /// held at that moment (exact indexes).
    lost: usize,
}

/// What a simulated node sees of one engine, before it becomes `policy::candidates` facts.
pub enum Seen<'a> {
    /// A central oracle: the engine's true queue and exact index, no unreported load.
    Oracle { load: candidates::Load, index: &'a EngineIndex, rtt_ms: f64 },
    /// The node's own engine: its polled load and exact index (from its KV events).
    Own {
        polled: candidates::Load,
        index: &'a EngineIndex,
        in_flight: u32,
        history: Option<&'a RoutedKeys>,
        pending: &'a RoutedKeys,
    },
    /// A peer's engine: load and node summary as gossip delivered them (`None`: nothing yet,
    /// so not usable), and what this node sent and placed there.
    Peer {
        load: Option<candidates::Load>,
        shards: &'a [Option<Arc<BloomShard>>],
        stride: u32,
        rtt_ms: f64,
        in_flight: u32,
        history: Option<&'a RoutedKeys>,
    },
}

/// The facts a simulated node routes on, as the node's router builds them
/// (`node::router::pick`): the test `node_and_simulator_agree` feeds both the same engines.
pub fn engine_facts(seen: Seen<'_>, block_size: u32) -> EngineFacts<'_> {
    let base = |usable, rtt_ms, load, open, cache, history| EngineFacts {
        usable,
        rtt_ms,
        load,
        open,
        cache,
        history,
        pending: None,
        block_size,
        role: Role::Both,
        fit: None,
    };
    match seen {
        Seen::Oracle { load, index, rtt_ms } => base(true, rtt_ms, load, Open::Known, Cache::Index(index), None),
        Seen::Own { polled, index, in_flight, history, pending } => EngineFacts {
            pending: Some(pending),
            ..base(true, 0.0, polled, Open::All(in_flight), Cache::Index(index), history)
        },
        Seen::Peer { load, shards, stride, rtt_ms, in_flight, history } => base(
            load.is_some(),
            rtt_ms,
            load.unwrap_or_default(),
            Open::Mine(in_flight),
            Cache::Summary { shards, stride },
            history,
        ),
    }
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("valid sigfig"))
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Token ids of a seeded stream: prompts are made of ids, not text, here.
fn tokens(stream: u64, n: usize) -> impl Iterator<Item = u32> {
    (0..n as u64).map(move |i| {
        let mut z = stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        100 + ((z ^ (z >> 31)) % 30_000) as u32
    })
}

struct World<'a> {
    cfg: &'a ClusterConfig,
    workload: &'a Workload,
    policy: Policy,
    rng: SmallRng,
    now: Us,
    queue: BinaryHeap<Reverse<(Us, u64, Ev)>>,
    next_ev: u64,
    engines: Vec<Engine>,
    nodes: Vec<Node>,
    /// With the `kvmesh-cells` policy, the cells (else one, holding everything).
    cells: Vec<Cell>,
    cells_on: bool,
    /// Nodes rank engines for a prompt's prefix (`affinity::prefix_ranks`) among near-equals;
    /// off for the `kvmesh-random` baseline, which draws among them.
    placement: bool,
    /// Each engine's `node/engine` label, as the rendezvous ranks hash them.
    labels: Vec<String>,
    /// The `llm-d` policy's router, and the charge of the request it is routing.
    llmd: Option<crate::llmd::LlmD>,
    llmd_pending: Option<(Vec<u64>, u64)>,
    /// Gossip among the backbone's gateways.
    backbone: GossipModel,
    relays: Vec<Option<Relay>>,
    placings: Vec<Option<Placing>>,
    /// Nodes clients send to: (cluster nodes, edge nodes).
    entries: (Vec<usize>, Vec<usize>),
    edge_rtt: Vec<f64>,
    requests: Vec<Request>,
    convs: Vec<Conv>,
    arrivals: u64,
    rate: f64,
    scale: f64,
    end_arrivals: Us,
    warmup: Us,
    gossip: GossipModel,
    /// Gossip settings in force (the configured ones, or fitted to `gossip_budget_kb_s`).
    g: crate::Gossip,
    chain_seed: u64,
    stats: Stats,
    /// Prompts and output lengths of requests on their way to an engine.
    pending: HashMap<usize, Vec<u32>>,
    outputs: HashMap<usize, usize>,
    /// Requests not finished, plus conversations with turns left: periodic events run until
    /// this is 0 after the arrival window.
    open: usize,
}

/// Runs one (size, policy, rate) point.
pub fn simulate(
    cfg: &ClusterConfig,
    workload: &Workload,
    cluster_nodes: usize,
    policy: &str,
    rate_per_engine: f64,
) -> Result<Row, SimError> {
    let wall = Instant::now();
    let name = policy;
    let policy = match policy {
        "round-robin" => Policy::RoundRobin,
        "least-load" => Policy::Route(Mode::LeastLoad),
        "kvmesh" | "kvmesh-cells" | "kvmesh-random" => Policy::Route(Mode::Kvmesh),
        "oracle" => Policy::Oracle,
        "llm-d" => Policy::LlmD,
        other => return Err(SimError::Cluster(format!("unknown policy `{other}`"))),
    };
    let cells_on = policy == Policy::Route(Mode::Kvmesh) && name == "kvmesh-cells";
    let mut w = World::new(cfg, workload, cluster_nodes, policy, rate_per_engine, cells_on);
    // As the node: only `routing = "kvmesh"` ranks near-equals by the prompt's prefix.
    w.placement = policy == Policy::Route(Mode::Kvmesh) && name != "kvmesh-random";
    w.start();
    while let Some(Reverse((t, _, ev))) = w.queue.pop() {
        w.now = t;
        w.handle(ev);
    }
    Ok(w.row(cluster_nodes, name, wall.elapsed().as_secs_f64()))
}

impl<'a> World<'a> {
    fn new(
        cfg: &'a ClusterConfig,
        workload: &'a Workload,
        n: usize,
        policy: Policy,
        rate_per_engine: f64,
        cells_on: bool,
    ) -> Self {
        let e = &cfg.engine;
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let n_cells = if cells_on { n.div_ceil(cfg.cells.size).max(1) } else { 1 };
        let node = |engine: Option<usize>, site: usize, cell: usize| Node {
            engine,
            site,
            cell,
            in_flight: HashMap::new(),
            routed: HashMap::new(),
            rr: 0,
            last_shards: vec![None; summary::SHARDS],
            summary: Published::new(),
            placed: HashMap::new(),
            pending: RoutedKeys::new(route_history::PENDING_MS, route_history::PENDING_MAX_KEYS),
        };
        // Cluster nodes first, each with its engine; then edge sites' nodes (with an engine each
        // where the site has engines).
        let mut nodes: Vec<Node> = (0..n).map(|i| node(Some(i), 0, i % n_cells)).collect();
        let mut engine_nodes: Vec<usize> = (0..n).collect();
        let mut edge_rtt = vec![0.0];
        let mut edge_nodes = Vec::new();
        for (s, site) in cfg.network.edge.iter().enumerate() {
            edge_rtt.push(site.rtt_ms);
            for _ in 0..site.nodes {
                edge_nodes.push(nodes.len());
                let engine = site.engines.then_some(engine_nodes.len());
                if engine.is_some() {
                    engine_nodes.push(nodes.len());
                }
                nodes.push(node(engine, s + 1, 0));
            }
        }
        let engines: Vec<Engine> = engine_nodes
            .iter()
            .map(|&i| Engine {
                core: EngineCore::new(
                    CoreConfig {
                        block_size: e.block_size,
                        num_gpu_blocks: e.num_gpu_blocks,
                        max_num_seqs: e.max_num_seqs,
                        max_num_batched_tokens: e.max_num_batched_tokens,
                        enable_prefix_caching: true,
                        hash_seed: rng.random(),
                        timing: e.timing.clone(),
                        // The cluster simulator's engines have no offloading tier.
                        num_cpu_blocks: 0,
                        cpu_load_ms_per_token: 0.0,
                        scheduling: kvmesh_sim::engine::Scheduling::Fcfs,
                    },
                    // Output ids: a seeded stream per request, like the engine simulator's filler.
                    |seed, i| tokens(seed ^ 0x5EED, i + 1).last().unwrap_or(100),
                ),
                node: i,
                index: EngineIndex::new(blocks::chain_seed(MODEL, None, None)),
                kv_seq: 0,
                step: None,
                polled: Load::default(),
                load: Published::new(),
                last_published: None,
                load_counted_at: None,
            })
            .collect();
        let cluster_entries = if policy.central() {
            // The oracle: one central router in the cluster that every client reaches.
            nodes.push(node(None, 0, 0));
            vec![nodes.len() - 1]
        } else {
            (0..n).collect()
        };
        let scale = engines.len() as f64 / 8.0;
        let rate = rate_per_engine * engines.len() as f64;
        let end_arrivals = us(cfg.duration_s * 1000.0);
        let mut cells: Vec<Cell> = (0..n_cells)
            .map(|c| Cell {
                name: format!("cell-{c}"),
                engines: Vec::new(),
                gateways: Vec::new(),
                members: Vec::new(),
                load: Published::new(),
            })
            .collect();
        for (e, engine) in engines.iter().enumerate() {
            cells[nodes[engine.node].cell].engines.push(e);
        }
        for (i, nd) in nodes.iter().enumerate() {
            let c = &mut cells[nd.cell];
            if nd.site == 0 && nd.engine.is_some() {
                if c.gateways.len() < cfg.cells.gateways {
                    c.gateways.push(i);
                }
                c.members.push((i, format!("node-{i}")));
            }
        }
        // Gossip within a cell reaches its members (all nodes, without cells).
        let members = (0..n_cells).map(|c| nodes.iter().filter(|nd| nd.cell == c).count()).max().unwrap_or(1);
        let g = match cfg.gossip_budget_kb_s {
            Some(budget) => {
                let stride = cfg.gossip.summary_stride.max(1) as usize;
                let shard = BloomShard::with_capacity(e.num_gpu_blocks as usize / stride).encode().len() + 16;
                crate::gossip::budgeted(&cfg.gossip, members, budget, (shard * summary::SHARDS) as f64)
            }
            None => cfg.gossip.clone(),
        };
        let gossip = GossipModel { nodes: members, interval_ms: g.gossip_interval_ms, fanout: g.fanout };
        let backbone = GossipModel {
            nodes: n_cells * cfg.cells.gateways,
            interval_ms: cfg.cells.backbone_interval_ms,
            fanout: g.fanout,
        };
        Self {
            cfg,
            workload,
            policy,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            next_ev: 0,
            engines,
            nodes,
            cells,
            cells_on,
            placement: true,
            labels: engine_nodes.iter().map(|i| format!("node-{i}/engine")).collect(),
            llmd: (policy == Policy::LlmD).then(|| {
                crate::llmd::LlmD::new(engine_nodes.len(), e.num_gpu_blocks, peak_prefill_tokens_per_s(e), cfg.seed)
            }),
            llmd_pending: None,
            backbone,
            relays: Vec::new(),
            placings: Vec::new(),
            entries: (cluster_entries, if policy.central() { Vec::new() } else { edge_nodes }),
            edge_rtt,
            requests: Vec::new(),
            convs: Vec::new(),
            arrivals: 0,
            rate,
            scale,
            end_arrivals,
            warmup: us(cfg.duration_s * 1000.0 * cfg.warmup_fraction),
            gossip,
            g,
            chain_seed: blocks::chain_seed(MODEL, None, None),
            stats: Stats {
                ttft: hist(),
                itl: hist(),
                e2e: hist(),
                done: 0,
                good: 0,
                out_tokens: 0,
                prompt: 0,
                cached: 0,
                load_bytes: 0,
                summary_bytes: 0,
                cell_bytes: 0,
                relayed: 0,
                submitted: 0,
                edge: vec![(EdgeStats::default(), 0); cfg.network.edge.len() + 1],
                per_engine: vec![0; engine_nodes.len()],
                lost: 0,
            },
            pending: HashMap::new(),
            outputs: HashMap::new(),
            open: 0,
        }
    }

    fn at(&mut self, t: Us, ev: Ev) {
        self.next_ev += 1;
        self.queue.push(Reverse((t, self.next_ev, ev)));
    }

    fn start(&mut self) {
        let g = self.g.clone();
        // Timers start at random phases, as independent processes would.
        for e in 0..self.engines.len() {
            let t = self.rng.random_range(0..us(g.engine_poll_interval_ms).max(1));
            self.at(t, Ev::Poll(e));
            let t = self.rng.random_range(0..us(g.load_publish_interval_ms).max(1));
            self.at(t, Ev::PublishLoad(e));
            let t = self.rng.random_range(0..us(g.summary_interval_ms).max(1));
            self.at(t, Ev::PublishSummary(e));
        }
        if self.cells_on {
            let interval = self.cfg.cells.backbone_interval_ms;
            for c in 0..self.cells.len() {
                let t = self.rng.random_range(0..us(interval).max(1));
                self.at(t, Ev::PublishCell(c));
            }
            // Until every cell's first report has crossed the backbone and the cells' gossip,
            // routers read the cells they have not heard from as idle, and the mean load as
            // lower than it is, so busy cells spill spuriously: a mesh that just started, not
            // the steady state measured here. Measure from then (at 1,000 nodes, 126 gateways
            // with 2 s rounds: 10.6 s in).
            let first_reports = interval + self.backbone.max_delay_ms() + self.gossip.max_delay_ms();
            self.warmup = self.warmup.max(us(first_reports));
        }
        match self.workload {
            Workload::MultiTurn(_) => self.at(0, Ev::ConvStart),
            _ => self.at(0, Ev::Arrival),
        }
    }

    fn gap(&mut self, rate: f64) -> Us {
        us(-(1.0 - self.rng.random::<f64>()).ln() / rate * 1000.0)
    }

    fn entry(&mut self) -> usize {
        let (cluster, edge) = &self.entries;
        if !edge.is_empty() && (cluster.is_empty() || self.rng.random::<f64>() < self.cfg.network.edge_share) {
            edge[self.rng.random_range(0..edge.len())]
        } else {
            cluster[self.rng.random_range(0..cluster.len())]
        }
    }

    fn rtt_ms(&self, a: usize, b: usize) -> f64 {
        let (sa, sb) = (self.nodes[a].site, self.nodes[b].site);
        if a == b {
            0.0
        } else if sa == sb {
            self.cfg.network.rtt_ms
        } else {
            // Edge sites reach each other through the cluster.
            self.cfg.network.rtt_ms.max(self.edge_rtt[sa] + self.edge_rtt[sb])
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival => self.arrival(),
            Ev::ConvStart => self.conv_start(),
            Ev::ConvTurn(c) => self.conv_turn(c),
            Ev::Relay(r) => {
                if let Some(x) = self.relays[r].take() {
                    self.submit(x.home, x.prompt, x.output_len, x.conv, x.arrived, Some(x.back));
                }
            }
            Ev::Place(p) => {
                if let Some(x) = self.placings[p].take() {
                    self.place(x);
                }
            }
            Ev::Deliver(r) => self.deliver(r),
            Ev::StepDone(e) => self.step_done(e),
            Ev::Poll(e) => {
                let c = &self.engines[e].core;
                self.engines[e].polled =
                    Load { running: c.num_running() as f64, waiting: c.num_waiting() as f64, kv_usage: c.kv_usage() };
                self.after(self.g.engine_poll_interval_ms, ev);
            }
            Ev::PublishLoad(e) => {
                // The node rounds KV usage so that noise does not re-gossip an unchanged engine;
                // chitchat sends a key only when its value changed.
                // The queue as the node reports it now: every request to its engine passes
                // through it (`candidates::reported_queue`), fresher than the last poll.
                let mut v = self.engines[e].polled;
                let open = self.nodes[self.engines[e].node].in_flight.get(&e).copied().unwrap_or(0);
                let (running, waiting) = candidates::reported_queue(open, &v.into());
                (v.running, v.waiting) = (running, waiting);
                v.kv_usage = (v.kv_usage * 100.0).round() / 100.0;
                if self.engines[e].last_published != Some(v) {
                    let at = self.now + us(self.gossip.delay_ms(&mut self.rng));
                    self.engines[e].load.push(at, v);
                    self.engines[e].last_published = Some(v);
                    let round = us(self.g.gossip_interval_ms);
                    if self.engines[e].load_counted_at.is_none_or(|t| self.now >= t + round) {
                        self.engines[e].load_counted_at = Some(self.now);
                        if self.now >= self.warmup {
                            self.stats.load_bytes += crate::gossip::LOAD_BYTES as u64;
                        }
                    }
                }
                self.after(self.g.load_publish_interval_ms, ev);
            }
            Ev::PublishSummary(e) => {
                self.publish_summary(e);
                self.after(self.g.summary_interval_ms, ev);
            }
            Ev::PublishCell(c) => {
                self.publish_cell(c);
                self.after(self.cfg.cells.backbone_interval_ms, ev);
            }
        }
    }

    /// Re-arms a periodic event while the run has work left.
    fn after(&mut self, ms: f64, ev: Ev) {
        if self.now < self.end_arrivals || self.open > 0 {
            self.at(self.now + us(ms), ev);
        }
    }

    fn arrival(&mut self) {
        let i = self.arrivals;
        self.arrivals += 1;
        let mut rate = self.rate;
        let (prompt, output_len) = match self.workload {
            Workload::SharedPrefix(w) => {
                let groups = ((w.groups as f64 * self.scale).round() as u64).max(1);
                let g = w.draw_group(&mut self.rng, groups);
                // Question streams: the arrival's number (its `b`-th request's, in a burst).
                let prompt = |b: u64| -> Vec<u32> {
                    let q = if w.burst > 1 { i << 10 | b } else { i };
                    tokens(1 << 40 | g, w.prefix_tokens).chain(tokens(2 << 40 | q, w.question_tokens)).collect()
                };
                // A burst: the group's other requests reach other nodes at the same moment.
                for b in 1..w.burst as u64 {
                    let origin = self.entry();
                    self.submit(origin, prompt(b), w.output_tokens as usize, None, self.now, None);
                }
                rate /= w.burst as f64;
                (prompt(0), w.output_tokens as usize)
            }
            Workload::LongPrompt(w) => {
                let n = w.prompt_tokens.sample(&mut self.rng, 1.0) as usize;
                let p: Vec<u32> = tokens(3 << 40, w.shared_prefix_tokens)
                    .chain(tokens(4 << 40 | i, n.saturating_sub(w.shared_prefix_tokens)))
                    .collect();
                (p, w.output_tokens as usize)
            }
            // Refused by `run_all`: its prompts need a chat template's rendering.
            Workload::MultiTurn(_) | Workload::Agentic(_) => return,
        };
        let origin = self.entry();
        self.submit(origin, prompt, output_len, None, self.now, None);
        let t = self.now + self.gap(rate);
        if t < self.end_arrivals {
            self.at(t, Ev::Arrival);
        }
    }

    fn conv_start(&mut self) {
        let Workload::MultiTurn(w) = self.workload else { return };
        let max = ((w.conversations as f64 * self.scale).round() as usize).max(1);
        let c = self.convs.len();
        let system: Vec<u32> = tokens(5 << 40, w.system_prompt_tokens).collect();
        self.convs.push(Conv { history: system, turn: 0, rng: SmallRng::seed_from_u64(10_000 + c as u64) });
        self.open += 1; // the conversation, until its last turn ends
        self.conv_turn(c);
        let t = self.now + self.gap(self.rate / w.turns.max(1) as f64);
        if t < self.end_arrivals && self.convs.len() < max {
            self.at(t, Ev::ConvStart);
        }
    }

    fn conv_turn(&mut self, c: usize) {
        let Workload::MultiTurn(w) = self.workload else { return };
        let conv = &mut self.convs[c];
        let user = w.user_tokens.sample(&mut conv.rng, 1.0) as usize;
        let out = w.output_tokens.sample(&mut conv.rng, 1.0) as usize;
        let stream = 6 << 40 | (c as u64) << 8 | conv.turn as u64;
        conv.history.extend(tokens(stream, user));
        let prompt = conv.history.clone();
        let origin = self.entry();
        self.submit(origin, prompt, out, Some(c), self.now, None);
    }

    /// A request reaches node `origin` (from a client that sent it at `arrived`, or relayed
    /// from another cell with `relayed` the one-way delay back to the client): the node routes
    /// it and forwards it to the engine, or with cells to its home node in another cell.
    fn submit(
        &mut self,
        origin: usize,
        prompt: Vec<u32>,
        output_len: usize,
        conv: Option<usize>,
        arrived: Us,
        relayed: Option<Us>,
    ) {
        let bs = self.cfg.engine.block_size as usize;
        let keys = blocks::block_keys(self.chain_seed, &prompt, bs);
        if relayed.is_none() {
            if arrived >= self.warmup {
                self.stats.submitted += 1;
            }
            if let Some(home) = self.relay_to(origin, &keys) {
                if arrived >= self.warmup {
                    self.stats.relayed += 1;
                }
                let net = &self.cfg.network;
                let tokens = prompt.len() as f64;
                let one_way = self.rtt_ms(origin, home) / 2.0;
                if self.cfg.cells.place {
                    // The origin asks the home node where to send the prompt (its block keys, a
                    // few KB) and holds the request meanwhile; its own overhead is counted once,
                    // when it forwards.
                    let ms = net.node_us_per_prompt_token * tokens / 1000.0 + one_way;
                    self.placings.push(Some(Placing { origin, home, prompt, keys, output_len, conv, arrived }));
                    self.at(self.now + us(ms), Ev::Place(self.placings.len() - 1));
                } else {
                    let ms = net.node_overhead_ms
                        + (net.node_us_per_prompt_token + net.forward_us_per_prompt_token) * tokens / 1000.0
                        + one_way;
                    self.relays.push(Some(Relay { home, prompt, output_len, conv, arrived, back: us(one_way) }));
                    self.at(self.now + us(ms), Ev::Relay(self.relays.len() - 1));
                }
                return;
            }
        }
        let engine = self.route(origin, &keys, &prompt, relayed.is_some());
        // A relayed request carries the block keys its origin computed: the home node does not
        // tokenize it again.
        let tokenize_us = if relayed.is_some() { 0.0 } else { self.cfg.network.node_us_per_prompt_token };
        self.launch(origin, engine, prompt, &keys, output_len, conv, arrived, relayed.unwrap_or(0), tokenize_us, 0.0);
    }

    /// The home node's answer to a placement: it routes the prompt within its cell as if it had
    /// received it, counts the pick as its own in flight for a lease, and the origin forwards the
    /// request to the engine it named.
    fn place(&mut self, x: Placing) {
        let Placing { origin, home, prompt, keys, output_len, conv, arrived } = x;
        let net = &self.cfg.network;
        // Handling the placement stream at the home node, and its answer's way back.
        let answered_ms = net.node_overhead_ms + self.rtt_ms(home, origin) / 2.0;
        let engine = self.route(home, &keys, &prompt, true);
        if self.nodes[home].engine != Some(engine) {
            let now_ms = self.now / 1000;
            let (ttl, max) = (self.cfg.route_history_ttl_s * 1000, self.cfg.route_history_max_keys);
            self.nodes[home].routed.entry(engine).or_insert_with(|| RoutedKeys::new(ttl, max)).record(&keys, now_ms);
            self.nodes[home].placed.entry(engine).or_default().record(now_ms);
        }
        self.launch(origin, engine, prompt, &keys, output_len, conv, arrived, 0, 0.0, answered_ms);
    }

    /// Sends a routed request from `origin` to `engine`'s node after `wait_ms`: its forward,
    /// the engine's frontend, and the way back. `tokenize_us` per prompt token is what the
    /// origin still spends on it; `extra_back` is a relay's one-way delay to the client.
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &mut self,
        origin: usize,
        engine: usize,
        prompt: Vec<u32>,
        keys: &[u64],
        output_len: usize,
        conv: Option<usize>,
        arrived: Us,
        extra_back: Us,
        tokenize_us: f64,
        wait_ms: f64,
    ) {
        let target = self.engines[engine].node;
        let one_way = self.rtt_ms(origin, target) / 2.0;
        let back = us(one_way) + extra_back;
        if self.nodes[origin].site != 0 && self.now >= self.warmup {
            self.edge_decision(origin, engine, keys, prompt.len());
        }
        if self.now >= self.warmup {
            self.stats.per_engine[engine] += 1;
            let held = self.engines[engine].index.matched_blocks(keys);
            if self.engines.iter().any(|e| e.index.matched_blocks(keys) > held) {
                self.stats.lost += 1;
            }
        }
        *self.nodes[origin].in_flight.entry(engine).or_default() += 1;
        // As the node: it credits its own engine with the prompts it routes there itself (a
        // peer names the engine and sends no keys the serving node could record).
        if !self.policy.central() && origin == target {
            self.nodes[target].pending.record(keys, self.now / 1000);
        }
        // What an origin sends to another cell's engine, placed there by that cell's home
        // node, it never routes itself: the node keeps no history of it, nor does this.
        let own_cell = !self.cells_on || self.nodes[origin].cell == self.nodes[target].cell;
        if origin != target && own_cell && !self.policy.central() {
            let now_ms = self.now / 1000;
            let (ttl, max) = (self.cfg.route_history_ttl_s * 1000, self.cfg.route_history_max_keys);
            self.nodes[origin].routed.entry(engine).or_insert_with(|| RoutedKeys::new(ttl, max)).record(keys, now_ms);
        }
        let r = self.requests.len();
        self.requests.push(Request {
            origin,
            engine,
            sent: arrived,
            back,
            prompt_tokens: prompt.len(),
            cached_tokens: 0,
            out_tokens: 0,
            first: None,
            last: None,
            itls: Vec::new(),
            conv,
            reply: Vec::with_capacity(if conv.is_some() { output_len } else { 0 }),
        });
        if let (Some(llmd), Some((hashes, uncached))) = (self.llmd.as_mut(), self.llmd_pending.take()) {
            llmd.dispatched(r, engine, &hashes, uncached);
        }
        self.open += 1;
        self.pending.insert(r, prompt);
        self.outputs.insert(r, output_len);
        let (net, eng) = (&self.cfg.network, &self.cfg.engine);
        let tokens = self.requests[r].prompt_tokens as f64;
        // The oracle reaches its engines directly, as a router in front of engines does.
        let forwarded = origin != target && !self.policy.central();
        let forward_us = if forwarded { net.forward_us_per_prompt_token } else { 0.0 };
        let node_ms = net.node_overhead_ms + (tokenize_us + forward_us) * tokens / 1000.0;
        let frontend_ms = eng.timing.frontend_ms + eng.frontend_us_per_prompt_token * tokens / 1000.0;
        let t = self.now + us(wait_ms + node_ms + one_way + frontend_ms);
        self.at(t, Ev::Deliver(r));
    }

    fn route(&mut self, origin: usize, keys: &[u64], prompt: &[u32], relayed: bool) -> usize {
        let prompt_tokens = prompt.len();
        let n = self.engines.len();
        match self.policy {
            Policy::RoundRobin => {
                let node = &mut self.nodes[origin];
                node.rr += 1;
                ((node.rr - 1) % n as u64) as usize
            }
            Policy::LlmD => {
                let Some(llmd) = self.llmd.as_mut() else { return 0 };
                let hashes = llmd.hashes(prompt);
                let rng = &mut self.rng;
                let (e, uncached) = llmd.pick(&hashes, prompt_tokens, |k| rng.random_range(0..k));
                self.llmd_pending = Some((hashes, uncached));
                e
            }
            Policy::Oracle | Policy::Route(_) => {
                // With cells a node sees only its own cell's engines.
                let pool: Vec<usize> =
                    if self.cells_on { self.cells[self.nodes[origin].cell].engines.clone() } else { (0..n).collect() };
                let bs = self.cfg.engine.block_size;
                let now_ms = self.now / 1000;
                let oracle = self.policy == Policy::Oracle;
                let own = self.nodes[origin].engine;
                // What gossip shows the origin now (advancing the delayed copies), then the
                // facts, through the same `policy::candidates` code the node uses.
                let lease = self.cfg.cells.routing.placement_lease_ms;
                let mut seen: Vec<(Option<Load>, Option<Summary>, u32)> = Vec::with_capacity(pool.len());
                for &e in &pool {
                    let node_of = self.engines[e].node;
                    let placed = self.nodes[origin].placed.get_mut(&e).map(|p| p.live(now_ms, lease)).unwrap_or(0);
                    let local = oracle || own == Some(e);
                    let load = if local { None } else { self.engines[e].load.visible(self.now).copied() };
                    let summary = if local { None } else { self.nodes[node_of].summary.visible(self.now).cloned() };
                    seen.push((load, summary, placed));
                }
                let mut facts = Vec::with_capacity(pool.len());
                for (&e, (load, summary, placed)) in pool.iter().zip(&seen) {
                    let engine = &self.engines[e];
                    let in_flight = self.nodes[origin].in_flight.get(&e).copied().unwrap_or(0) + placed;
                    let history = self.nodes[origin].routed.get(&e);
                    let seen = if oracle {
                        let c = &engine.core;
                        let load = candidates::Load {
                            running: c.num_running() as f64,
                            waiting: c.num_waiting() as f64,
                            kv_usage: c.kv_usage(),
                        };
                        Seen::Oracle { load, index: &engine.index, rtt_ms: self.rtt_ms(origin, engine.node) }
                    } else if own == Some(e) {
                        Seen::Own {
                            polled: engine.polled.into(),
                            index: &engine.index,
                            in_flight,
                            history,
                            pending: &self.nodes[origin].pending,
                        }
                    } else {
                        Seen::Peer {
                            load: load.map(Into::into),
                            shards: summary.as_deref().map(Vec::as_slice).unwrap_or(&[]),
                            stride: self.g.summary_stride,
                            rtt_ms: self.rtt_ms(origin, engine.node),
                            in_flight,
                            history,
                        }
                    };
                    let f = engine_facts(seen, bs);
                    facts.push(f);
                }
                let mode = match self.policy {
                    Policy::Route(m) => m,
                    _ => Mode::Kvmesh,
                };
                let rules = candidates::Rules { mode, weights: &self.cfg.weights, pd: &self.cfg.pd };
                // A relayed request reached its home node, which prefers its own engine.
                let mut prompt = PromptKeys::from_keys(prompt_tokens, bs, keys.to_vec());
                // Otherwise a prefix nobody is known to hold goes where every node puts it.
                let ranks = (self.placement && !oracle)
                    .then(|| {
                        let labels: Vec<String> = pool.iter().map(|&e| self.labels[e].clone()).collect();
                        prompt.placement_ranks(bs, &labels)
                    })
                    .flatten();
                let prefer = match relayed.then(|| own.and_then(|e| pool.iter().position(|&p| p == e))).flatten() {
                    Some(i) => kvmesh_policy::score::Prefer::Candidate(i),
                    None => ranks
                        .as_deref()
                        .map_or(kvmesh_policy::score::Prefer::Nothing, kvmesh_policy::score::Prefer::Placed),
                };
                let rng = &mut self.rng;
                let picked =
                    candidates::decide(rules, &mut prompt, &facts, now_ms, false, prefer, |k| rng.random_range(0..k));
                match picked {
                    Some(p) => pool[p.index],
                    // Nothing visible yet (the first gossip rounds): the node's own engine, else
                    // any.
                    None => self.nodes[origin]
                        .engine
                        .unwrap_or_else(|| pool.get(self.rng.random_range(0..pool.len().max(1))).copied().unwrap_or(0)),
                }
            }
        }
    }

    /// With cells: the prompt's home node (`cells::member`) in its home cell, when that is not
    /// `origin`'s own cell
    /// (`policy::cells::home` on the cells table as `origin` sees it).
    fn relay_to(&mut self, origin: usize, keys: &[u64]) -> Option<usize> {
        if !self.cells_on || self.cells.len() < 2 {
            return None;
        }
        let key = cells::affinity_key(keys, &self.cfg.cells.routing)?;
        let now = self.now;
        let loads: Vec<f64> = self.cells.iter_mut().map(|c| c.load.visible(now).copied().unwrap_or(0.0)).collect();
        let table: Vec<CellLoad<'_>> = self
            .cells
            .iter()
            .zip(&loads)
            .map(|(c, l)| CellLoad { name: &c.name, engines: c.engines.len() as u32, load: *l })
            .collect();
        let rng = &mut self.rng;
        let home = cells::home(key, &table, &self.cfg.cells.routing, || rng.random::<f64>())?;
        if home == self.nodes[origin].cell {
            return None;
        }
        cells::member(key, self.cells[home].members.iter().map(|(i, name)| (*i, name.as_str())))
    }

    /// A cell's first gateway publishes the cell's load as it sees it (its own engine as polled,
    /// its cell peers' as gossiped) on the backbone; every gateway republishes the table into its
    /// cell, so routers see it after a backbone and a cell delay.
    fn publish_cell(&mut self, c: usize) {
        let Some(&gateway) = self.cells[c].gateways.first() else { return };
        let now = self.now;
        let mut load = 0.0;
        for i in 0..self.cells[c].engines.len() {
            let e = self.cells[c].engines[i];
            let l = if self.engines[e].node == gateway {
                Some(self.engines[e].polled)
            } else {
                self.engines[e].load.visible(now).copied()
            };
            load += l.map(|l| l.running + l.waiting).unwrap_or(0.0);
        }
        let delay = self.backbone.delay_ms(&mut self.rng) + self.gossip.delay_ms(&mut self.rng);
        self.cells[c].load.push(now + us(delay), load);
        if now >= self.warmup {
            self.stats.cell_bytes += CELL_ENTRY_BYTES as u64;
        }
    }

    /// For requests received at the edge: was going far worth it? Judged with the truth at
    /// decision time (each engine's exact cache and current queue, no gossip delay) through the
    /// same TTFT prediction the router uses; a choice within the router's tolerance of the best
    /// counts as right.
    fn edge_decision(&mut self, origin: usize, engine: usize, keys: &[u64], prompt_tokens: usize) {
        let w = &self.cfg.weights;
        let truth = |e: usize| {
            let c = &self.engines[e].core;
            let est = Estimate {
                usable: true,
                rtt_ms: self.rtt_ms(origin, self.engines[e].node),
                running: c.num_running() as f64,
                waiting: c.num_waiting() as f64,
                kv_usage: c.kv_usage(),
                matched_blocks: self.engines[e].index.matched_blocks(keys),
                offloaded_blocks: 0,
                block_size: self.cfg.engine.block_size,
                fit: None,
            };
            score::predicted_ttft_ms(prompt_tokens, &est, w)
        };
        let site = self.nodes[origin].site;
        let near = |e: usize| self.nodes[self.engines[e].node].site == site;
        let best = |want_near: bool| {
            (0..self.engines.len()).filter(|&e| near(e) == want_near).map(truth).fold(f64::INFINITY, f64::min)
        };
        let (best_near, best_far, chosen) = (best(true), best(false), truth(engine));
        let slack = 1.0 + w.tolerance;
        let far = !near(engine);
        let matched = self.engines[engine].index.matched_blocks(keys) * self.cfg.engine.block_size as usize;
        let (s, tokens) = &mut self.stats.edge[site];
        s.requests += 1;
        *tokens += matched as u64;
        if far {
            s.sent_far += 1;
            s.far_paid += (chosen <= best_near * slack) as usize;
        } else {
            s.near_missed += (best_far * slack < chosen) as usize;
        }
    }

    fn deliver(&mut self, r: usize) {
        let e = self.requests[r].engine;
        // The engine's own node proxies every request to it, so its count for its engine covers
        // all origins (an origin's count for a peer's engine covers only its own).
        let (origin, target) = (self.requests[r].origin, self.engines[e].node);
        if origin != target {
            *self.nodes[target].in_flight.entry(e).or_default() += 1;
        }
        let prompt = self.pending.remove(&r).unwrap_or_default();
        let output_len = self.outputs.remove(&r).unwrap_or(1);
        self.engines[e].core.add(NewSequence {
            id: r as u64,
            prompt,
            output_len,
            output_seed: r as u64,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        if self.engines[e].step.is_none() {
            self.start_step(e);
        }
    }

    fn start_step(&mut self, e: usize) {
        let step = self.engines[e].core.schedule();
        if step.is_empty() {
            return;
        }
        let t = self.now + us(step.duration_ms).max(1);
        self.engines[e].step = Some(step);
        self.at(t, Ev::StepDone(e));
    }

    fn step_done(&mut self, e: usize) {
        let Some(step) = self.engines[e].step.take() else { return };
        let out = self.engines[e].core.complete(step);
        for t in out.tokens {
            let r = t.seq as usize;
            let at = self.now + self.requests[r].back;
            let req = &mut self.requests[r];
            match req.last {
                None => {
                    if let Some(llmd) = self.llmd.as_mut() {
                        llmd.first_token(r);
                    }
                    req.first = Some(at);
                    req.cached_tokens = t.cached_prompt_tokens;
                    req.prompt_tokens = t.prompt_tokens;
                }
                Some(prev) => req.itls.push((at - prev) as f32 / 1000.0),
            }
            req.last = Some(at);
            req.out_tokens += 1;
            if req.conv.is_some() {
                req.reply.push(t.token);
            }
            if t.finished {
                self.finish(r, at);
            }
        }
        let mut events = out.kv_events;
        events.extend(self.engines[e].core.take_kv_events());
        if !events.is_empty() {
            let engine = &mut self.engines[e];
            engine.kv_seq += 1;
            let batch = events.into_iter().map(|ev| match ev {
                KvEvent::BlockStored {
                    block_hashes,
                    parent_block_hash,
                    token_ids,
                    block_size,
                    cache_salt,
                    lora,
                    medium,
                } => IndexEvent::Stored {
                    block_hashes,
                    parent: parent_block_hash,
                    token_ids,
                    block_size,
                    salt: cache_salt,
                    adapter: lora,
                    tier: tier(medium),
                },
                KvEvent::BlockRemoved { block_hashes, medium } => {
                    IndexEvent::Removed { block_hashes, tier: tier(medium) }
                }
                KvEvent::AllBlocksCleared => IndexEvent::Cleared,
            });
            engine.index.apply_batch(engine.kv_seq, batch);
        }
        self.start_step(e);
    }

    fn finish(&mut self, r: usize, at: Us) {
        self.open -= 1;
        let (origin, engine) = (self.requests[r].origin, self.requests[r].engine);
        let target = self.engines[engine].node;
        for node in if origin == target { vec![origin] } else { vec![origin, target] } {
            if let Some(n) = self.nodes[node].in_flight.get_mut(&engine) {
                *n = n.saturating_sub(1);
            }
        }
        let req = &mut self.requests[r];
        if req.sent >= self.warmup {
            let s = &mut self.stats;
            let ttft = req.first.map(|f| f - req.sent).unwrap_or(0);
            let _ = s.ttft.record(ttft.max(1));
            let _ = s.e2e.record((at - req.sent).max(1));
            for v in &req.itls {
                let _ = s.itl.record(((*v * 1000.0) as u64).max(1));
            }
            let slo = self.workload.slo();
            let itl_ok = slo.itl_p99_ms.is_none_or(|limit| {
                let mut v = req.itls.clone();
                v.sort_by(f32::total_cmp);
                let p99 = v.get(((v.len() as f64) * 0.99) as usize).or(v.last()).copied().unwrap_or(0.0);
                p99 as f64 <= limit
            });
            s.done += 1;
            s.good += (ttft as f64 <= slo.ttft_p90_s * 1e6 && itl_ok) as usize;
            s.out_tokens += req.out_tokens as u64;
            s.prompt += req.prompt_tokens as u64;
            s.cached += req.cached_tokens as u64;
        }
        req.itls = Vec::new();
        if let Some(c) = req.conv {
            let reply = std::mem::take(&mut req.reply);
            let Workload::MultiTurn(w) = self.workload else { return };
            let conv = &mut self.convs[c];
            conv.history.extend(reply);
            conv.turn += 1;
            if conv.turn < w.turns {
                let think = us(w.think_time_s.sample(&mut conv.rng, 0.0) * 1000.0);
                self.at(at + think, Ev::ConvTurn(c));
            } else {
                self.open -= 1;
            }
        }
    }

    /// The node's summary publisher: the Bloom filter of its engine's exact index, shards
    /// re-gossiped when any of their bits changed (the node's default `summary_min_change` 0).
    fn publish_summary(&mut self, e: usize) {
        let node = self.engines[e].node;
        let capacity = (self.cfg.engine.num_gpu_blocks as usize).max(self.engines[e].index.len());
        let shards = summary::build(self.engines[e].index.keys(), capacity, self.g.summary_stride);
        let mut sent = false;
        let mut bytes = 0u64;
        for (i, shard) in shards.into_iter().enumerate() {
            let due = match &self.nodes[node].last_shards[i] {
                None => true,
                Some(prev) => shard.difference(prev) > 0.0,
            };
            if due {
                bytes += shard.encode().len() as u64 + 16;
                self.nodes[node].last_shards[i] = Some(shard);
                sent = true;
            }
        }
        if sent {
            let view: Summary =
                Arc::new(self.nodes[node].last_shards.iter().map(|s| s.clone().map(Arc::new)).collect());
            let at = self.now + us(self.gossip.delay_ms(&mut self.rng));
            self.nodes[node].summary.push(at, view);
            if self.now >= self.warmup {
                self.stats.summary_bytes += bytes;
            }
        }
    }

    fn row(&self, cluster_nodes: usize, policy: &str, wall_s: f64) -> Row {
        let s = &self.stats;
        let measured_s = (self.now.saturating_sub(self.warmup) as f64 / 1e6).max(1e-9);
        let publishers = cluster_nodes as f64;
        // Every node receives every other member's publications once (and sends as much):
        // the whole mesh's, or with cells its cell's.
        let receives =
            if self.cells_on { (self.gossip.nodes as f64 - 1.0) / publishers } else { (publishers - 1.0) / publishers };
        let deltas = (s.load_bytes + s.summary_bytes) as f64 / measured_s * receives.max(0.0);
        let summary = s.summary_bytes as f64 / measured_s * receives.max(0.0);
        // The cells table: every node hears every cell's entry.
        let table = s.cell_bytes as f64 / measured_s;
        let gossip_kb_s = if self.policy.central() || cluster_nodes == 1 {
            0.0
        } else {
            (self.gossip.digest_bytes_per_s() + deltas + if self.cells_on { table } else { 0.0 }) / 1000.0
        };
        // A gateway also gossips on the backbone: its digests and the cells' entries again.
        let gateway_kb_s = self.cells_on.then(|| gossip_kb_s + (self.backbone.digest_bytes_per_s() + table) / 1000.0);
        let edge = s
            .edge
            .iter()
            .zip(&self.edge_rtt)
            .filter(|((e, _), _)| e.requests > 0)
            .map(|((e, tokens), rtt)| {
                (*rtt, EdgeStats { mean_matched_tokens: *tokens as f64 / e.requests as f64, ..e.clone() })
            })
            .collect();
        Row {
            nodes: cluster_nodes,
            seed: self.cfg.seed,
            policy: policy.to_owned(),
            rate: self.rate,
            done: s.done,
            ttft_ms: [pct(&s.ttft, 0.5), pct(&s.ttft, 0.9), pct(&s.ttft, 0.99)],
            itl_ms: [pct(&s.itl, 0.5), pct(&s.itl, 0.99)],
            e2e_ms: [pct(&s.e2e, 0.5), pct(&s.e2e, 0.99)],
            out_tok_s: s.out_tokens as f64 / measured_s,
            hit_rate: if s.prompt > 0 { s.cached as f64 / s.prompt as f64 } else { 0.0 },
            goodput: s.good as f64 / measured_s,
            gossip_kb_s,
            summary_kb_s: if self.policy.central() { 0.0 } else { summary / 1000.0 },
            cells: self.cells.len(),
            gateway_kb_s,
            relayed: s.relayed as f64 / s.submitted.max(1) as f64,
            load_cov: cov(&s.per_engine),
            lost: s.lost as f64 / s.per_engine.iter().sum::<u64>().max(1) as f64,
            edge,
            wall_s,
            gossip: self.g.clone(),
        }
    }
}

/// llm-d's calibration of an engine (`guides/recipes/router/calibration`): a cache-miss prompt
/// of `max_num_batched_tokens` tokens over its TTFT on an idle engine, in tokens per second.
fn peak_prefill_tokens_per_s(e: &crate::EngineModel) -> f64 {
    let chunk = e.max_num_batched_tokens as u64;
    let mut step = kvmesh_sim::timing::StepShape::default();
    step.add_prefill(chunk, 0);
    let ttft_ms =
        e.timing.frontend_ms + e.frontend_us_per_prompt_token * chunk as f64 / 1000.0 + e.timing.step_ms(&step);
    chunk as f64 / ttft_ms.max(1e-3) * 1000.0
}

/// Coefficient of variation (standard deviation over mean) of per-engine counts.
fn cov(counts: &[u64]) -> f64 {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<u64>() as f64 / n.max(1.0);
    if mean <= 0.0 {
        return 0.0;
    }
    let var = counts.iter().map(|&c| (c as f64 - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

/// The index tier of a simulated engine's medium.
fn tier(m: Medium) -> Tier {
    match m {
        Medium::Gpu => Tier::Gpu,
        Medium::Cpu => Tier::Offloaded,
    }
}
