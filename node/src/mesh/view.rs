//! The routing view: every peer engine's facts in one table, rebuilt when gossip changes.
//!
//! A [`RoutingView`] is an immutable snapshot of what gossip says of the peers' engines
//! (address, generation, load, decoded KV summary) and of the cells table, built by
//! [`PeerTable::rebuild`] whenever the membership's watch fires, never per request. What this
//! node learns itself about a peer's engine lives beside it, keyed by the same typed
//! [`EngineId`] `(node, generation, engine)`:
//! - requests it has open there (an atomic counter, carried from one snapshot to the next);
//! - whether the node failed a request lately (an atomic deadline per node);
//! - the block keys it sent there and the placements it made there ([`Ledger`], all engines'
//!   under one lock, taken once per pick).
//!
//! An entry lives exactly as long as its engine is in the view: a rebuild drops the counters,
//! ledgers and decoded summaries of engines (and generations) that left, so nothing needs a
//! random sweep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use kvmesh_gossip::{EngineLoad, Peer};
use kvmesh_policy::cells::Placements;
use kvmesh_policy::models::{Catalog, EngineModels};
use kvmesh_policy::route_history::RoutedKeys;
use kvmesh_policy::summary::{self, BloomShard};

use crate::cells::{self, CellView};

/// A peer's engine as gossip identifies it: a restart under the same name is a new generation,
/// and so a new engine with nothing carried over.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineId {
    pub node: Arc<str>,
    pub generation: u64,
    pub engine: Arc<str>,
}

impl std::fmt::Display for EngineId {
    /// `node/engine`, as in `x-kvmesh-served-by`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node, self.engine)
    }
}

/// One engine on a peer, as the current view describes it.
#[derive(Debug, Clone)]
pub struct PeerEngine {
    pub id: EngineId,
    pub addr: SocketAddr,
    pub load: EngineLoad,
    /// Engines on that node (when several, the node picks among them with its exact indexes).
    pub node_engines: usize,
    /// The node's KV summary (the union of its engines' blocks), decoded once per version.
    pub summary: Arc<Vec<Option<Arc<BloomShard>>>>,
    /// Sampling stride of `summary`.
    pub summary_stride: u32,
    /// This node's requests open on the engine.
    pub in_flight: Arc<AtomicU32>,
    suspect_until: Arc<AtomicU64>,
}

impl PeerEngine {
    /// A peer's engine known only by name and address (a placement's answer, a home node):
    /// nothing gossiped, nothing carried.
    pub fn named(node: &str, addr: SocketAddr, engine: &str, model: &str, block_size: u32) -> Self {
        Self {
            id: EngineId { node: node.into(), generation: 0, engine: engine.into() },
            addr,
            load: EngineLoad {
                name: engine.to_owned(),
                models: vec![model.to_owned()],
                healthy: true,
                role: Default::default(),
                running: 0,
                waiting: 0,
                kv_usage: 0.0,
                tokens_per_s: 0.0,
                block_size: Some(block_size),
                cards: Vec::new(),
                max_model_len: None,
                ttft_fit: None,
            },
            node_engines: 1,
            summary: Arc::default(),
            summary_stride: 1,
            in_flight: Arc::default(),
            suspect_until: Arc::default(),
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.load.models.iter().any(|m| m == model)
    }
}

/// The snapshot the request path reads.
#[derive(Debug, Default)]
pub struct RoutingView {
    /// The gossip view it was built from.
    pub peers: Arc<Vec<Peer>>,
    /// Engines of live peers (this node's own are not here).
    pub engines: Vec<PeerEngine>,
    /// With cells: the cells table from the same view.
    pub cells: Arc<Vec<CellView>>,
    /// How the peers' engines key each model name they serve (aliases, LoRA adapters).
    pub catalog: Catalog,
}

/// What this node recorded about one peer engine: evidence of what it holds and of load the
/// engine cannot report.
#[derive(Debug)]
pub struct Ledger {
    /// Block keys routed there (`policy::route_history`).
    pub routed: RoutedKeys,
    /// Requests this node placed there for other cells' origins (`policy::cells`).
    pub placed: Placements,
    /// Requests this node sent there lately: the engine's gossiped load may not count them
    /// yet (flow control, `policy::flow::EngineLoad::recent`).
    pub sent: Placements,
}

/// Per-node state carried across snapshots.
#[derive(Debug, Default)]
struct NodeState {
    /// Milliseconds on the table's clock until which the node is skipped (0: not suspected).
    suspect_until: Arc<AtomicU64>,
}

/// A peer's decoded summary shard, with the gossip version it was decoded from.
type CachedShard = (u64, Option<Arc<BloomShard>>);

/// What rebuilding needs to keep between snapshots.
#[derive(Default)]
struct Carried {
    /// By node name, whatever its generation: a suspicion outlives a restart or a flap out of
    /// the view until it runs out, as it would for a node never seen (another cell's).
    nodes: HashMap<String, NodeState>,
    in_flight: HashMap<EngineId, Arc<AtomicU32>>,
    shards: HashMap<(String, u64, usize), CachedShard>,
}

/// The table: the current snapshot, what is carried between snapshots, and the ledgers.
pub struct PeerTable {
    current: RwLock<Arc<RoutingView>>,
    carried: Mutex<Carried>,
    ledgers: Mutex<HashMap<EngineId, Ledger>>,
    with_cells: bool,
    epoch: Instant,
    suspect_for: Duration,
    history_ttl_ms: u64,
    history_max_keys: usize,
}

/// Settings of the table.
#[derive(Debug, Clone)]
pub struct TableSettings {
    pub with_cells: bool,
    /// Start of the millisecond clock of route histories and placements (the engine set's).
    pub epoch: Instant,
    pub suspect_for: Duration,
    pub history_ttl_ms: u64,
    pub history_max_keys: usize,
}

impl PeerTable {
    pub fn new(s: TableSettings) -> Self {
        Self {
            current: RwLock::new(Arc::default()),
            carried: Mutex::new(Carried::default()),
            ledgers: Mutex::new(HashMap::new()),
            with_cells: s.with_cells,
            epoch: s.epoch,
            suspect_for: s.suspect_for,
            history_ttl_ms: s.history_ttl_ms,
            history_max_keys: s.history_max_keys,
        }
    }

    /// The latest snapshot, rebuilt first if `peers` (the membership's current view) is newer,
    /// so the request path never routes on a view older than gossip's. The watch task
    /// normally has rebuilt it already.
    pub fn view(&self, peers: &Arc<Vec<Peer>>) -> Arc<RoutingView> {
        let v = self.current.read().map(|v| v.clone()).unwrap_or_default();
        if Arc::ptr_eq(&v.peers, peers) {
            return v;
        }
        self.rebuild(peers.clone())
    }

    /// Builds the snapshot of `peers` and makes it current; returns it.
    pub fn rebuild(&self, peers: Arc<Vec<Peer>>) -> Arc<RoutingView> {
        let Ok(mut carried) = self.carried.lock() else {
            return Arc::new(RoutingView { peers, ..RoutingView::default() });
        };
        // Another rebuild may have made it current while this one waited.
        if let Ok(v) = self.current.read() {
            if Arc::ptr_eq(&v.peers, &peers) {
                return v.clone();
            }
        }
        let carried = &mut *carried;
        let mut nodes = HashMap::new();
        let mut in_flight = HashMap::new();
        let mut shards = HashMap::new();
        let mut engines = Vec::new();
        for p in peers.iter().filter(|p| !p.is_self) {
            let state = carried.nodes.remove(&p.node_id).unwrap_or_default();
            let suspect_until = state.suspect_until.clone();
            nodes.insert(p.node_id.clone(), state);
            let summary = Arc::new(decode_summary(p, &mut carried.shards, &mut shards));
            let node: Arc<str> = p.node_id.as_str().into();
            for e in &p.load.engines {
                let id = EngineId { node: node.clone(), generation: p.generation, engine: e.name.as_str().into() };
                let counter = carried.in_flight.remove(&id).unwrap_or_default();
                in_flight.insert(id.clone(), counter.clone());
                engines.push(PeerEngine {
                    id,
                    addr: p.addr,
                    load: e.clone(),
                    node_engines: p.load.engines.len(),
                    summary: summary.clone(),
                    summary_stride: p.kv.stride.clamp(1, summary::MAX_STRIDE),
                    in_flight: counter,
                    suspect_until: suspect_until.clone(),
                });
            }
        }
        // Suspicions of nodes outside the view (home nodes in other cells, a node that flapped
        // out) run out on their own.
        let now = self.now_ms();
        for (name, state) in carried.nodes.drain() {
            if state.suspect_until.load(Ordering::Relaxed) > now {
                nodes.insert(name, state);
            }
        }
        // Requests still open on an engine that left keep their counter until they end.
        for (id, counter) in carried.in_flight.drain() {
            if counter.load(Ordering::Relaxed) > 0 {
                in_flight.insert(id, counter);
            }
        }
        carried.nodes = nodes;
        carried.in_flight = in_flight;
        carried.shards = shards;
        if let Ok(mut ledgers) = self.ledgers.lock() {
            ledgers.retain(|id, _| carried.in_flight.contains_key(id));
        }
        let cells = if self.with_cells { Arc::new(cells::table(&peers)) } else { Arc::default() };
        let models: Vec<EngineModels> = engines
            .iter()
            .map(|e| match e.load.cards.is_empty() {
                true => EngineModels::from_names(&e.load.models),
                false => EngineModels::new(e.load.cards.clone()),
            })
            .collect();
        let catalog = Catalog::build(&models);
        let view = Arc::new(RoutingView { peers, engines, cells, catalog });
        if let Ok(mut current) = self.current.write() {
            *current = view.clone();
        }
        view
    }

    /// Milliseconds on the table's clock (route histories and placements).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The ledgers, locked: once per pick, to read every candidate's, or to record.
    pub fn ledgers(&self) -> Option<MutexGuard<'_, HashMap<EngineId, Ledger>>> {
        self.ledgers.lock().ok()
    }

    fn new_ledger(&self) -> Ledger {
        Ledger {
            routed: RoutedKeys::new(self.history_ttl_ms, self.history_max_keys),
            placed: Placements::default(),
            sent: Placements::default(),
        }
    }

    /// Records that `keys` were routed to `id` (or a placement there), creating its ledger.
    pub fn record(&self, id: &EngineId, keys: &[u64], placed: bool) {
        let now = self.now_ms();
        let Some(mut ledgers) = self.ledgers() else { return };
        let ledger = ledgers.entry(id.clone()).or_insert_with(|| self.new_ledger());
        if !keys.is_empty() {
            ledger.routed.record(keys, now);
        }
        if placed {
            ledger.placed.record(now);
        }
    }

    /// Records a request sent to `id` now, forgetting those older than `lag_ms` (bounded by what
    /// is sent within it).
    pub fn record_sent(&self, id: &EngineId, lag_ms: u64) {
        let now = self.now_ms();
        let Some(mut ledgers) = self.ledgers() else { return };
        let ledger = ledgers.entry(id.clone()).or_insert_with(|| self.new_ledger());
        ledger.sent.live(now, lag_ms);
        ledger.sent.record(now);
    }

    /// A peer failed before answering: its engines are skipped for `suspect_for`. A node not
    /// in the view (another cell's home node, or one not heard of yet) is remembered by name,
    /// and its engines are skipped when it appears.
    pub fn suspect(&self, node: &str) {
        let until = self.now_ms() + self.suspect_for.as_millis() as u64;
        if let Ok(mut carried) = self.carried.lock() {
            // The view's engines share their node's deadline.
            carried.nodes.entry(node.to_owned()).or_default().suspect_until.store(until, Ordering::Relaxed);
        }
    }

    /// Whether `node` failed a request within the last `suspect_for`.
    pub fn is_suspect(&self, node: &str) -> bool {
        let now = self.now_ms();
        self.carried
            .lock()
            .ok()
            .and_then(|c| c.nodes.get(node).map(|s| s.suspect_until.load(Ordering::Relaxed) > now))
            .unwrap_or(false)
    }

    /// A peer engine known only by name and address (a placement's answer, a home node), with
    /// an in-flight counter the table keeps while requests are open on it, so that they count
    /// in [`in_flight_total`](Self::in_flight_total) (drain and shutdown wait for them).
    pub fn named(&self, node: &str, addr: SocketAddr, engine: &str, model: &str, block_size: u32) -> PeerEngine {
        let mut e = PeerEngine::named(node, addr, engine, model, block_size);
        if let Ok(mut carried) = self.carried.lock() {
            e.in_flight = carried.in_flight.entry(e.id.clone()).or_default().clone();
            e.suspect_until = carried.nodes.entry(node.to_owned()).or_default().suspect_until.clone();
        }
        e
    }

    /// Whether this engine's node is suspected now.
    pub fn suspected(&self, e: &PeerEngine) -> bool {
        e.suspect_until.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Requests this node has open on peers' engines.
    pub fn in_flight_total(&self) -> u32 {
        self.carried.lock().map(|c| c.in_flight.values().map(|n| n.load(Ordering::Relaxed)).sum()).unwrap_or(0)
    }
}

/// A peer's summary shards, decoded: taken from the previous snapshot when their gossip
/// version is unchanged.
fn decode_summary(
    p: &Peer,
    old: &mut HashMap<(String, u64, usize), CachedShard>,
    new: &mut HashMap<(String, u64, usize), CachedShard>,
) -> Vec<Option<Arc<BloomShard>>> {
    (0..summary::SHARDS)
        .map(|i| {
            let (ver, raw) = p.kv_shards.get(i).cloned().flatten()?;
            let key = (p.node_id.clone(), p.generation, i);
            let shard = match old.remove(&key) {
                Some((v, shard)) if v == ver => shard,
                _ => BloomShard::decode(&raw).map(Arc::new),
            };
            new.insert(key, (ver, shard.clone()));
            shard
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_gossip::{KvSummarySlot, LoadReport, NodeMeta, NodeRole, UsageReport};

    fn peer(name: &str, generation: u64, engines: &[&str]) -> Peer {
        Peer {
            node_id: name.into(),
            generation,
            addr: "127.0.0.1:7000".parse().expect("addr"),
            meta: NodeMeta {
                role: NodeRole::Worker,
                models: vec![],
                http_addr: "127.0.0.1:8000".into(),
                quic_addr: "127.0.0.1:7000".into(),
            },
            load: LoadReport {
                engines: engines
                    .iter()
                    .map(|e| EngineLoad {
                        name: (*e).into(),
                        models: vec!["m".into()],
                        healthy: true,
                        role: Default::default(),
                        running: 1,
                        waiting: 0,
                        kv_usage: 0.1,
                        tokens_per_s: 0.0,
                        block_size: Some(16),
                        cards: Vec::new(),
                        max_model_len: None,
                        ttft_fit: None,
                    })
                    .collect(),
                ..Default::default()
            },
            kv: KvSummarySlot::default(),
            kv_shards: vec![],
            usage: UsageReport::default(),
            cell_keys: vec![],
            is_self: false,
        }
    }

    fn table() -> PeerTable {
        PeerTable::new(TableSettings {
            with_cells: false,
            epoch: Instant::now(),
            suspect_for: Duration::from_secs(60),
            history_ttl_ms: 60_000,
            history_max_keys: 100,
        })
    }

    #[test]
    fn counters_and_ledgers_follow_their_engine_and_die_with_it() {
        let t = table();
        let v1 = t.view(&Arc::new(vec![peer("a", 1, &["e0", "e1"]), peer("b", 1, &["e0"])]));
        assert_eq!(v1.engines.len(), 3);
        let a0 = v1.engines[0].clone();
        a0.in_flight.fetch_add(1, Ordering::Relaxed);
        t.record(&a0.id, &[1, 2, 3], false);
        t.record(&v1.engines[2].id, &[4], true);
        // Load changes: a new view, the same engines.
        let v2 = t.view(&Arc::new(vec![peer("a", 1, &["e0", "e1"]), peer("b", 1, &["e0"])]));
        assert!(Arc::ptr_eq(&v2.engines[0].in_flight, &a0.in_flight), "counter carried");
        assert_eq!(t.ledgers().map(|l| l.len()), Some(2));
        // b restarts (new generation) and a's e1 goes away: b's ledger dies with its generation;
        // a/e0's counter survives while its request is open.
        let v3 = t.view(&Arc::new(vec![peer("a", 1, &["e0"]), peer("b", 2, &["e0"])]));
        assert_eq!(v3.engines.len(), 2);
        assert!(Arc::ptr_eq(&v3.engines[0].in_flight, &a0.in_flight));
        let ledgers: Vec<String> = t.ledgers().map(|l| l.keys().map(|k| k.to_string()).collect()).unwrap_or_default();
        assert_eq!(ledgers, vec!["a/e0".to_string()]);
        assert_eq!(t.in_flight_total(), 1);
        a0.in_flight.fetch_sub(1, Ordering::Relaxed);
        let _ = t.view(&Arc::new(vec![peer("b", 2, &["e0"])]));
        assert_eq!(t.ledgers().map(|l| l.len()), Some(0), "a left: nothing kept");
    }

    #[test]
    fn an_unchanged_view_is_not_rebuilt() {
        let t = table();
        let peers = Arc::new(vec![peer("a", 1, &["e0"])]);
        let v1 = t.view(&peers);
        let v2 = t.view(&peers);
        assert!(Arc::ptr_eq(&v1, &v2));
    }

    #[test]
    fn suspicion_covers_every_engine_of_the_node_and_survives_rebuilds() {
        let t = table();
        let v = t.view(&Arc::new(vec![peer("a", 1, &["e0", "e1"]), peer("b", 1, &["e0"])]));
        t.suspect("a");
        assert!(t.is_suspect("a") && !t.is_suspect("b"));
        assert!(t.suspected(&v.engines[1]) && !t.suspected(&v.engines[2]));
        let v = t.view(&Arc::new(vec![peer("a", 1, &["e0", "e1"]), peer("b", 1, &["e0"])]));
        assert!(t.suspected(&v.engines[0]));
        t.suspect("c");
        assert!(t.is_suspect("c"), "a node not in the view (another cell's)");
        let _ = t.view(&Arc::new(vec![peer("b", 1, &["e0"])]));
        assert!(t.is_suspect("c"), "kept across rebuilds until it runs out");
        let v = t.view(&Arc::new(vec![peer("b", 1, &["e0"]), peer("c", 7, &["e0"])]));
        assert!(t.suspected(&v.engines[1]), "applied when the node appears, at any generation");
        assert!(t.is_suspect("a"), "a suspected node that flapped out stays suspected");
        let v = t.view(&Arc::new(vec![peer("a", 2, &["e0"])]));
        assert!(t.suspected(&v.engines[0]), "and when it comes back");
    }

    #[test]
    fn requests_on_a_named_engine_count_as_open() {
        let t = table();
        let e = t.named("far", "127.0.0.1:7100".parse().expect("addr"), "e0", "m", 16);
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(t.in_flight_total(), 1);
        let _ = t.view(&Arc::new(vec![peer("b", 1, &["e0"])]));
        assert_eq!(t.in_flight_total(), 1, "kept while open");
        e.in_flight.fetch_sub(1, Ordering::Relaxed);
        let _ = t.view(&Arc::new(vec![peer("b", 2, &["e0"])]));
        assert_eq!(t.in_flight_total(), 0);
    }
}
