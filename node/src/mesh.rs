//! This node's place in the mesh: its QUIC endpoint, its gossip membership, the load it
//! publishes, and what it knows of its peers' engines for the request path.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvmesh_gossip::{EngineLoad, GossipConfig, KvSummarySlot, LoadReport, Membership, NodeMeta, Peer};
use kvmesh_policy::summary::{self, BloomShard};
use kvmesh_transport::endpoint::EndpointConfig;
use kvmesh_transport::{AsyncUdpSocket, MeshEndpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::EngineSet;
use crate::error::NodeError;

/// One engine on a peer, as gossip describes it.
#[derive(Debug, Clone)]
pub struct RemoteEngine {
    pub node_id: String,
    pub generation: u64,
    pub addr: SocketAddr,
    pub engine: EngineLoad,
    /// Engines on that node (when several, the node picks among them with its exact index).
    pub node_engines: usize,
    pub summary: Vec<Option<Arc<BloomShard>>>,
    /// Sampling stride of `summary`.
    pub summary_stride: u32,
}

impl RemoteEngine {
    pub fn key(&self) -> String {
        format!("{}/{}", self.node_id, self.engine.name)
    }
}

/// The cells table and the peer view it was parsed from.
type CellsTable = (Arc<Vec<Peer>>, Arc<Vec<crate::cells::CellView>>);

/// A peer's decoded summary shard, with the gossip version it was decoded from.
type CachedShard = (u64, Option<Arc<BloomShard>>);

pub struct Mesh {
    pub endpoint: Arc<MeshEndpoint>,
    pub membership: Arc<Membership>,
    /// With cells: this node's cell.
    pub cell: Option<String>,
    /// With cells: the backbone membership while this node is a gateway (`node::cells`).
    backbone: Mutex<Option<Backbone>>,
    /// How to join the backbone, kept for an elected gateway that joins later.
    backbone_cfg: Option<BackboneJoin>,
    pub advertise: SocketAddr,
    /// Decoded peer summary shards by (node, generation, shard), re-decoded only when their
    /// gossip version changes.
    summaries: Mutex<HashMap<(String, u64, usize), CachedShard>>,
    suspects: Mutex<HashMap<String, Instant>>,
    /// The cells table parsed from the view it was read from: parsed again only when the view
    /// changes, not per request.
    cells_table: Mutex<Option<CellsTable>>,
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
    suspect_for: Duration,
}

/// This node's seat on the cells backbone: the membership, and the token that stops it and
/// the gateway loop.
struct Backbone {
    membership: Arc<Membership>,
    stop: CancellationToken,
}

/// What joining the backbone takes.
struct BackboneJoin {
    gossip: GossipConfig,
    meta: NodeMeta,
    interval: Duration,
    /// Gateways per cell when elected (0: set in config).
    elected: usize,
}

impl Mesh {
    pub async fn start(
        cfg: &Config,
        http_addr: SocketAddr,
        engines: &Arc<EngineSet>,
        socket: Option<Arc<dyn AsyncUdpSocket>>,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, NodeError> {
        let (ca, cert, key) =
            cfg.tls_paths().ok_or_else(|| NodeError::Config("the mesh needs --tls-dir or --ca/--cert/--key".into()))?;
        let identity = TlsIdentity::load(&ca, &cert, &key).map_err(|e| {
            NodeError::Config(format!(
                "{e} (make certificates with `kvmesh cert ca` and `kvmesh cert node --name {}`)",
                cfg.node_name
            ))
        })?;
        let bind: SocketAddr =
            cfg.quic_addr.parse().map_err(|_| NodeError::Config(format!("quic_addr `{}`", cfg.quic_addr)))?;
        let bound = match socket {
            None => MeshEndpoint::bind(&identity, EndpointConfig::new(bind), cancel, tasks),
            Some(s) => MeshEndpoint::with_socket(&identity, EndpointConfig::new(bind), s, cancel, tasks),
        };
        let (endpoint, inbox) = bound.map_err(|e| NodeError::Mesh(e.to_string()))?;
        let advertise = match &cfg.advertise_addr {
            Some(a) => a.parse().map_err(|_| NodeError::Config(format!("advertise_addr `{a}`")))?,
            None => {
                SocketAddr::new(routable_ip(endpoint.local_addr().ip(), &cfg.seeds).await, endpoint.local_addr().port())
            }
        };
        let http_ip = if http_addr.ip().is_unspecified() { advertise.ip() } else { http_addr.ip() };
        let meta = NodeMeta {
            role: cfg.role,
            models: engines.models(),
            http_addr: SocketAddr::new(http_ip, http_addr.port()).to_string(),
            quic_addr: advertise.to_string(),
        };
        // A cell is a mesh of its own: nodes of other cells ignore its gossip.
        let cell = cfg.cells.name.clone();
        let cluster_id = match &cell {
            Some(c) => format!("{}/{c}", cfg.cluster_id),
            None => cfg.cluster_id.clone(),
        };
        let mut gcfg = GossipConfig::new(&cfg.node_name, &cluster_id, advertise, cfg.seeds.clone());
        gcfg.gossip_interval = Config::ms(cfg.gossip_interval_ms);
        gcfg.phi_threshold = cfg.phi_threshold;
        let membership = Membership::start(gcfg, endpoint.clone(), inbox, &meta, cancel, tasks)
            .await
            .map_err(|e| NodeError::Mesh(e.to_string()))?;
        let backbone_cfg = cell.as_ref().map(|_| {
            let mut b = GossipConfig::new(
                &cfg.node_name,
                &format!("{}/backbone", cfg.cluster_id),
                advertise,
                cfg.cells.backbone_seeds.clone(),
            );
            b.gossip_interval = Config::ms(cfg.cells.backbone_interval_ms);
            b.phi_threshold = cfg.phi_threshold;
            b.channel = 1;
            BackboneJoin {
                gossip: b,
                meta: meta.clone(),
                interval: Config::ms(cfg.cells.backbone_interval_ms),
                elected: cfg.cells.elected_gateways,
            }
        });
        let mesh = Arc::new(Self {
            endpoint,
            membership,
            cell: cell.clone(),
            backbone: Mutex::new(None),
            backbone_cfg,
            advertise,
            summaries: Mutex::new(HashMap::new()),
            suspects: Mutex::new(HashMap::new()),
            cells_table: Mutex::new(None),
            in_flight: Mutex::new(HashMap::new()),
            suspect_for: Config::ms(cfg.peer_suspect_ms),
        });
        tasks.spawn(publish_load(
            mesh.clone(),
            engines.clone(),
            Config::ms(cfg.load_publish_interval_ms),
            cancel.clone(),
        ));
        tasks.spawn(publish_summary(
            mesh.clone(),
            engines.clone(),
            Config::ms(cfg.summary_interval_ms),
            cfg.summary_min_change,
            cfg.summary_stride,
            cancel.clone(),
        ));
        if cell.is_some() && cfg.cells.gateway {
            mesh.join_backbone(cancel, tasks).await?;
        } else if cell.is_some() && cfg.cells.elected_gateways > 0 {
            tasks.spawn(crate::cells::elect(mesh.clone(), cancel.clone(), tasks.clone()));
        }
        Ok(mesh)
    }

    /// Whether this node is one of its cell's gateways now.
    pub fn is_gateway(&self) -> bool {
        self.backbone.lock().map(|b| b.is_some()).unwrap_or(false)
    }

    /// Gateways per cell when they are elected (0: set in config, or no cells).
    pub fn elected_gateways(&self) -> usize {
        self.backbone_cfg.as_ref().map_or(0, |b| b.elected)
    }

    /// Joins the cells backbone and starts the gateway loop (`node::cells::gateway`); nothing
    /// when already on it or without cells. Besides the configured seeds, an elected gateway
    /// tries the nodes the cells table says other cells elect (their first members by name).
    pub async fn join_backbone(
        self: &Arc<Self>,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(), NodeError> {
        let (Some(join), Some(cell)) = (&self.backbone_cfg, &self.cell) else { return Ok(()) };
        if self.is_gateway() {
            return Ok(());
        }
        let mut gossip = join.gossip.clone();
        if join.elected > 0 {
            for c in self.cells().iter().filter(|c| &c.report.name != cell) {
                let mut members: Vec<&(String, SocketAddr)> = c.members.iter().collect();
                members.sort();
                gossip.seeds.extend(members.iter().take(join.elected).map(|(_, a)| a.to_string()));
            }
            gossip.seeds.sort();
            gossip.seeds.dedup();
        }
        let inbox = self.endpoint.gossip_channel(1).map_err(|e| NodeError::Mesh(e.to_string()))?;
        let stop = cancel.child_token();
        let membership = match Membership::start(gossip, self.endpoint.clone(), inbox, &join.meta, &stop, tasks).await {
            Ok(m) => m,
            Err(e) => {
                self.endpoint.close_gossip_channel(1);
                return Err(NodeError::Mesh(format!("cells backbone: {e}")));
            }
        };
        tasks.spawn(crate::cells::gateway(
            cell.clone(),
            self.membership.clone(),
            membership.clone(),
            join.interval,
            stop.clone(),
        ));
        if let Ok(mut b) = self.backbone.lock() {
            *b = Some(Backbone { membership, stop });
        }
        tracing::info!(%cell, "joined the cells backbone as a gateway");
        Ok(())
    }

    /// Leaves the backbone (an elected gateway that is no longer elected): says goodbye there,
    /// stops the gateway loop, which withdraws the cells table it republished, and frees the
    /// gossip channel for a later term.
    pub async fn leave_backbone(&self) {
        let Some(b) = self.backbone.lock().ok().and_then(|mut b| b.take()) else { return };
        b.membership.leave().await;
        b.stop.cancel();
        self.endpoint.close_gossip_channel(1);
        tracing::info!(cell = ?self.cell, "left the cells backbone");
    }

    /// The cells table as this node's cell gossips it (empty without cells, or before a
    /// gateway published it).
    pub fn cells(&self) -> Arc<Vec<crate::cells::CellView>> {
        if self.cell.is_none() {
            return Arc::default();
        }
        let peers = self.peers();
        let Ok(mut cached) = self.cells_table.lock() else { return Arc::new(crate::cells::table(&peers)) };
        match &*cached {
            Some((view, table)) if Arc::ptr_eq(view, &peers) => table.clone(),
            _ => {
                let table = Arc::new(crate::cells::table(&peers));
                *cached = Some((peers, table.clone()));
                table
            }
        }
    }

    /// Live peers, this node included.
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        self.membership.peers()
    }

    /// Engines on other live nodes, except nodes that just failed a request.
    pub fn remote_engines(&self) -> Vec<RemoteEngine> {
        let now = Instant::now();
        let suspects = self.suspects.lock().map(|s| s.clone()).unwrap_or_default();
        let peers = self.peers();
        self.prune_summaries(&peers);
        peers
            .iter()
            .filter(|p| !p.is_self && suspects.get(&p.node_id).is_none_or(|until| *until <= now))
            .flat_map(|p| {
                let summary = self.peer_summary(p);
                p.load.engines.iter().map(move |e| RemoteEngine {
                    node_id: p.node_id.clone(),
                    generation: p.generation,
                    addr: p.addr,
                    engine: e.clone(),
                    node_engines: p.load.engines.len(),
                    summary: summary.clone(),
                    summary_stride: p.kv.stride.clamp(1, summary::MAX_STRIDE),
                })
            })
            .collect()
    }

    /// A peer's KV summary shards, decoded (cached per gossip version).
    fn peer_summary(&self, p: &Peer) -> Vec<Option<Arc<BloomShard>>> {
        let Ok(mut cache) = self.summaries.lock() else { return vec![None; summary::SHARDS] };
        (0..summary::SHARDS)
            .map(|i| {
                let (ver, raw) = p.kv_shards.get(i).cloned().flatten()?;
                let key = (p.node_id.clone(), p.generation, i);
                match cache.get(&key) {
                    Some((v, shard)) if *v == ver => shard.clone(),
                    _ => {
                        let shard = BloomShard::decode(&raw).map(Arc::new);
                        cache.insert(key, (ver, shard.clone()));
                        shard
                    }
                }
            })
            .collect()
    }

    /// Drops decoded summaries of nodes (or generations) no longer in the view.
    fn prune_summaries(&self, peers: &[Peer]) {
        if let Ok(mut cache) = self.summaries.lock() {
            if cache.len() > summary::SHARDS * peers.len().max(1) * 2 {
                cache.retain(|(n, g, _), _| peers.iter().any(|p| &p.node_id == n && p.generation == *g));
            }
        }
    }

    /// The in-flight counter of a remote engine (`node/engine`).
    pub fn in_flight(&self, key: &str) -> Arc<AtomicU32> {
        let Ok(mut m) = self.in_flight.lock() else { return Arc::new(AtomicU32::new(0)) };
        m.entry(key.to_owned()).or_insert_with(|| Arc::new(AtomicU32::new(0))).clone()
    }

    /// Requests this node has open on peers' engines.
    pub fn in_flight_total(&self) -> u32 {
        self.in_flight.lock().map(|m| m.values().map(|c| c.load(Ordering::Relaxed)).sum()).unwrap_or(0)
    }

    pub fn in_flight_now(&self, key: &str) -> u32 {
        self.in_flight.lock().ok().and_then(|m| m.get(key).map(|c| c.load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// A peer failed before answering: skip it for a while. Gossip decides whether it is dead.
    pub fn suspect(&self, node_id: &str) {
        if let Ok(mut s) = self.suspects.lock() {
            let now = Instant::now();
            s.retain(|_, until| *until > now);
            s.insert(node_id.to_owned(), now + self.suspect_for);
        }
    }

    /// Whether `node_id` failed a request within the last `peer_suspect_ms`.
    pub fn is_suspect(&self, node_id: &str) -> bool {
        let now = Instant::now();
        self.suspects.lock().ok().and_then(|s| s.get(node_id).map(|until| *until > now)).unwrap_or(false)
    }

    /// Leaves gossip: peers drop this node within a few rounds. The endpoint stays open so
    /// forwarded streams can finish; `close` ends it.
    pub async fn leave(&self) {
        let backbone = self.backbone.lock().ok().and_then(|b| b.as_ref().map(|b| b.membership.clone()));
        match backbone {
            Some(b) => tokio::join!(self.membership.leave(), b.leave()).0,
            None => self.membership.leave().await,
        }
    }

    pub async fn close(&self) {
        self.endpoint.close().await;
    }
}

/// The IP peers can reach this node on: the bound one, or when bound to an unspecified address,
/// the local address that routes to the first seed (no packet is sent). Config validation
/// refuses an unspecified bind with neither seeds nor `advertise_addr`, so loopback is only a
/// last resort when no seed resolves.
async fn routable_ip(bound: IpAddr, seeds: &[String]) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    for seed in seeds {
        let Ok(Ok(mut addrs)) = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(seed)).await
        else {
            continue;
        };
        if let Some(target) = addrs.next() {
            let any: IpAddr =
                if target.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
            if let Ok(sock) = std::net::UdpSocket::bind((any, 0)) {
                if sock.connect(target).is_ok() {
                    if let Ok(local) = sock.local_addr() {
                        return local.ip();
                    }
                }
            }
        }
    }
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}

/// Publishes this node's engine load whenever it changes (checked every `every`).
async fn publish_load(mesh: Arc<Mesh>, engines: Arc<EngineSet>, every: Duration, cancel: CancellationToken) {
    let mut last_tokens: HashMap<String, (f64, Instant)> = HashMap::new();
    let mut tick = ticker(every);
    while next_tick(&mut tick, &cancel).await {
        let report = LoadReport {
            engines: engines
                .engines
                .iter()
                .map(|e| {
                    let v = e.snapshot();
                    let now = Instant::now();
                    let tps = match last_tokens.insert(e.name.clone(), (v.load.generation_tokens, now)) {
                        Some((prev, at)) if v.load.generation_tokens >= prev => {
                            ((v.load.generation_tokens - prev) / now.duration_since(at).as_secs_f64().max(1e-3)) as f32
                        }
                        _ => 0.0,
                    };
                    EngineLoad {
                        name: e.name.clone(),
                        models: v.models.clone(),
                        healthy: v.healthy,
                        role: e.role,
                        running: v.load.running as u32,
                        waiting: v.load.waiting as u32,
                        kv_usage: ((v.load.kv_usage * 100.0).round() / 100.0) as f32,
                        // Rounded so that noise does not re-gossip an unchanged engine.
                        tokens_per_s: (tps / 10.0).round() * 10.0,
                        block_size: v.load.block_size,
                    }
                })
                .collect(),
        };
        if let Err(e) = mesh.membership.set_load(&report).await {
            tracing::warn!(error = %e, "publishing load failed");
        }
    }
}

/// Publishes the KV summary of this node's engines: a Bloom filter of the union of their exact
/// indexes, in 16 shards. Every `every`, a shard is re-gossiped if at least `min_change` of its
/// bits changed, or if any changed and it was last sent over `STALE_AFTER` ago. A long new
/// prefix shows up at the next tick, and steady churn costs at most one summary per tick.
async fn publish_summary(
    mesh: Arc<Mesh>,
    engines: Arc<EngineSet>,
    every: Duration,
    min_change: f64,
    stride: u32,
    cancel: CancellationToken,
) {
    const STALE_AFTER: Duration = Duration::from_secs(10);
    let mut last: Vec<Option<(BloomShard, Instant)>> = vec![None; summary::SHARDS];
    let mut version = 0u64;
    let mut tick = ticker(every);
    while next_tick(&mut tick, &cancel).await {
        let mut keys: Vec<u64> = Vec::new();
        let mut capacity = 0usize;
        let now = engines.now_ms();
        let mut routed_keys: Vec<u64> = Vec::new();
        for e in &engines.engines {
            if let Ok(index) = e.kv.index.read() {
                keys.extend(index.keys());
            }
            // What this node routed to the engine within the TTL: the only evidence for an
            // engine without KV events, and for approximate-mode (text) keys.
            if let Ok(routed) = e.routed.lock() {
                routed_keys.extend(routed.live_keys(now));
            }
            capacity += e.snapshot().load.num_gpu_blocks.unwrap_or(28_000) as usize;
        }
        // The filter is sized for every key it holds (so its false-positive rate stays at its
        // bound), up to the summary's cap; over the cap, exact keys go in before routed ones.
        routed_keys.truncate(summary::MAX_CAPACITY_KEYS.saturating_sub(keys.len()));
        keys.extend(routed_keys);
        let capacity = capacity.max(keys.len());
        let shards = summary::build(keys.into_iter(), capacity, stride);
        let mut sent = false;
        for (i, shard) in shards.into_iter().enumerate() {
            let due = match &last[i] {
                None => true,
                Some((prev, at)) => {
                    let d = shard.difference(prev);
                    d > 0.0 && (d >= min_change || at.elapsed() >= STALE_AFTER)
                }
            };
            if due {
                mesh.membership.set_kv_shard(i, shard.encode()).await;
                last[i] = Some((shard, Instant::now()));
                sent = true;
            }
        }
        if sent {
            version += 1;
            let slot = KvSummarySlot { format: "bloom-v1".into(), version, stride };
            if let Err(e) = mesh.membership.set_kv_summary(&slot).await {
                tracing::warn!(error = %e, "publishing the KV summary failed");
            }
        }
    }
}

/// An interval that skips missed ticks instead of bursting after a stall.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick; false once the node is shutting down.
async fn next_tick(tick: &mut tokio::time::Interval, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tick.tick() => true,
    }
}
