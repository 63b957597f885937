//! Running chitchat for this node and keeping a ready-to-read view of live peers, so the request
//! path never waits on the gossip lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// tokio's clock, so that heartbeat ages follow a paused (virtual) clock in tests as chitchat's
// failure detector does.
use tokio::time::Instant;

use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use kvmesh_transport::{MeshEndpoint, StateSigner};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::GossipError;
use crate::quic::QuicTransport;
use crate::schema::*;
use crate::signed::{self, Checker, Reader, Rejection, KEY_CERT};

/// Key set by a node that is leaving, so peers drop it at once instead of waiting for the
/// failure detector.
const KEY_LEAVING: &str = "leaving";

#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: String,
    /// Meshes with different cluster ids ignore each other's gossip.
    pub cluster_id: String,
    /// This node's QUIC address as peers should dial it.
    pub advertise_addr: SocketAddr,
    /// `host:port` of seed nodes; DNS names are re-resolved by chitchat.
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    /// Phi-accrual threshold: lower detects dead nodes sooner and risks false suspicion.
    pub phi_threshold: f64,
    /// How long a dead node's state is kept (so a flapping node keeps its history).
    pub dead_node_grace: Duration,
    /// The endpoint's gossip channel this cluster uses (0: the mesh or cell; 1: the cells
    /// backbone).
    pub channel: u8,
}

impl GossipConfig {
    pub fn new(node_id: &str, cluster_id: &str, advertise_addr: SocketAddr, seeds: Vec<String>) -> Self {
        Self {
            node_id: node_id.to_owned(),
            cluster_id: cluster_id.to_owned(),
            advertise_addr,
            seeds,
            // 300 ms keeps gossip under 100 KB/s per node at 100 nodes (bench gossip); with phi 8
            // a silent node leaves the views within ~2 s.
            gossip_interval: Duration::from_millis(300),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(60),
            channel: 0,
        }
    }
}

/// A live member of the mesh as this node last heard of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub node_id: String,
    /// Start time of the node's process (ms since epoch); a restart makes a new generation.
    pub generation: u64,
    /// QUIC address (also the gossip address).
    pub addr: SocketAddr,
    pub meta: NodeMeta,
    pub load: LoadReport,
    pub kv: KvSummarySlot,
    /// The KV summary's shards as gossiped: (chitchat version, value). Shared, not copied,
    /// between view rebuilds while unchanged.
    pub kv_shards: Vec<Option<(u64, Arc<str>)>>,
    /// Per-tenant usage of the rate-limit window (empty when the node has none or predates it).
    pub usage: UsageReport,
    /// Cells keys (`cell`, `cellm`, `cell.{name}`, `cellm.{name}`), raw: the node reads them.
    pub cell_keys: Vec<(String, String)>,
    pub is_self: bool,
}

pub struct Membership {
    handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    self_id: ChitchatId,
    peers: watch::Receiver<Arc<Vec<Peer>>>,
    last_load: Mutex<String>,
    last_usage: Mutex<String>,
    gossip_interval: Duration,
    /// Per live peer (node id, generation): its last heartbeat value and when this node first
    /// saw it. chitchat does not notify heartbeats, so a sampler refreshes this every round.
    heartbeats: Arc<Mutex<Heartbeats>>,
    left: AtomicBool,
    /// Seals what this node publishes (`signed`).
    signer: Arc<StateSigner>,
    cluster_id: String,
    /// Peer states left out of the view for a failed signature or certificate.
    rejected: Arc<AtomicU64>,
}

/// (node id, generation) to (last heartbeat seen, when it was first seen).
type Heartbeats = HashMap<(String, u64), (u64, Instant)>;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Membership {
    pub async fn start(
        cfg: GossipConfig,
        endpoint: Arc<MeshEndpoint>,
        inbox: kvmesh_transport::endpoint::GossipInbox,
        meta: &NodeMeta,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<Arc<Self>, GossipError> {
        let self_id = ChitchatId::new(cfg.node_id.clone(), now_ms(), cfg.advertise_addr);
        let config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: cfg.cluster_id.clone(),
            gossip_interval: cfg.gossip_interval,
            listen_addr: cfg.advertise_addr,
            seed_nodes: cfg.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: cfg.phi_threshold,
                sampling_window_size: 1000,
                max_interval: Duration::from_secs(10),
                initial_interval: cfg.gossip_interval * 2,
                dead_node_grace_period: cfg.dead_node_grace,
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            // A node is usable once its schema and metadata arrived, and until it says it leaves
            // (unchecked here: the view checks every value it reads).
            extra_liveness_predicate: Some(Box::new(|s: &NodeState| {
                s.get(KEY_VERSION).and_then(signed::payload) == Some(&SCHEMA_VERSION.to_string())
                    && s.contains_key(KEY_NODE)
                    && s.contains_key(KEY_CERT)
                    && !s.contains_key(KEY_LEAVING)
            })),
        };
        let signer = endpoint.state_signer().clone();
        let checker = Arc::new(Mutex::new(Checker::new(signer.clone(), &cfg.cluster_id)));
        let rejected = checker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).rejected.clone();
        let transport = QuicTransport::new(endpoint, inbox, cfg.channel, checker.clone());
        // Nothing before it is signed: the values are set below, each sealed with the version
        // chitchat gives it.
        let handle =
            spawn_chitchat(config, Vec::new(), &transport).await.map_err(|e| GossipError::Start(e.to_string()))?;
        let chitchat = handle.chitchat();
        let initial = [
            (KEY_CERT, signer.chain().to_owned()),
            (KEY_VERSION, SCHEMA_VERSION.to_string()),
            (KEY_NODE, serde_json::to_string(meta)?),
            (KEY_LOAD, serde_json::to_string(&LoadReport::default())?),
            (KEY_KV, serde_json::to_string(&KvSummarySlot::default())?),
        ];
        {
            let mut c = chitchat.lock().await;
            for (key, value) in initial {
                set_sealed(&mut c, &signer, &cfg.cluster_id, key, &value)?;
            }
        }
        let mut live = chitchat.lock().await.live_nodes_watcher();
        let (tx, rx) = watch::channel(Arc::new(Vec::new()));
        let me = self_id.clone();
        let view_checker = checker.clone();
        let cancel_gossip = cancel.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let mut prev: Arc<Vec<Peer>> = Arc::new(Vec::new());
            loop {
                let peers = {
                    let mut check = view_checker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    Arc::new(peers_from(&live.borrow_and_update(), &me, &prev, &mut check))
                };
                prev = peers.clone();
                if tx.send(peers).is_err() {
                    break;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    changed = live.changed() => if changed.is_err() { break },
                }
            }
        });
        tracing::info!(node = %cfg.node_id, addr = %cfg.advertise_addr, seeds = ?cfg.seeds, cluster = %cfg.cluster_id, "gossip started");
        let this = Arc::new(Self {
            handle: tokio::sync::Mutex::new(Some(handle)),
            self_id,
            peers: rx,
            last_load: Mutex::new(String::new()),
            last_usage: Mutex::new(String::new()),
            gossip_interval: cfg.gossip_interval,
            heartbeats: Arc::new(Mutex::new(HashMap::new())),
            left: AtomicBool::new(false),
            signer,
            cluster_id: cfg.cluster_id.clone(),
            rejected,
        });
        tasks.spawn(sample_heartbeats(
            chitchat,
            this.self_id.clone(),
            this.heartbeats.clone(),
            checker,
            cfg.gossip_interval,
            cancel_gossip.clone(),
        ));
        // chitchat runs on a task of its own; stop it with the node, leave() or not.
        let me = this.clone();
        tasks.spawn(async move {
            cancel_gossip.cancelled().await;
            if let Some(h) = me.handle.lock().await.take() {
                let _ = h.shutdown().await;
            }
        });
        Ok(this)
    }

    /// Live members, this node included.
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        self.peers.borrow().clone()
    }

    /// A receiver that changes whenever the live set or any member's state does.
    pub fn watch(&self) -> watch::Receiver<Arc<Vec<Peer>>> {
        self.peers.clone()
    }

    pub fn node_id(&self) -> &str {
        &self.self_id.node_id
    }

    /// The gossip round this membership runs at.
    pub fn gossip_interval(&self) -> Duration {
        self.gossip_interval
    }

    pub fn generation(&self) -> u64 {
        self.self_id.generation_id
    }

    /// Publishes engine load if it changed since the last call.
    pub async fn set_load(&self, load: &LoadReport) -> Result<(), GossipError> {
        let json = serde_json::to_string(load)?;
        {
            let Ok(mut last) = self.last_load.lock() else { return Ok(()) };
            if *last == json {
                return Ok(());
            }
            *last = json.clone();
        }
        self.set(KEY_LOAD, json).await;
        Ok(())
    }

    /// Publishes per-tenant usage if it changed since the last call.
    pub async fn set_usage(&self, usage: &UsageReport) -> Result<(), GossipError> {
        let json = serde_json::to_string(usage)?;
        {
            let Ok(mut last) = self.last_usage.lock() else { return Ok(()) };
            if *last == json {
                return Ok(());
            }
            *last = json.clone();
        }
        self.set(KEY_USAGE, json).await;
        Ok(())
    }

    pub async fn set_kv_summary(&self, slot: &KvSummarySlot) -> Result<(), GossipError> {
        self.set(KEY_KV, serde_json::to_string(slot)?).await;
        Ok(())
    }

    /// Publishes one shard of the KV summary (an opaque string, `policy::summary` encoded).
    pub async fn set_kv_shard(&self, shard: usize, value: String) {
        if shard < KV_SHARDS {
            self.set(&kv_shard_key(shard), value).await;
        }
    }

    /// Publishes a cells key (see the schema); chitchat ignores an unchanged value, so
    /// republishing costs nothing until it changes.
    pub async fn set_cell_key(&self, key: &str, value: String) {
        if key.starts_with(KEY_CELL) {
            self.set(key, value).await;
        }
    }

    /// Withdraws a cells key (a cell that left the backbone): set to an empty payload, which
    /// readers take as absent. Never a chitchat deletion: tombstones carry no signature, so
    /// peers refuse deltas with them (`signed`).
    pub async fn delete_cell_key(&self, key: &str) {
        if !key.starts_with(KEY_CELL) {
            return;
        }
        let held = match self.handle.lock().await.as_ref() {
            Some(h) => h.with_chitchat(|c| c.self_node_state().contains_key(key)).await,
            None => false,
        };
        if held {
            self.set(key, String::new()).await;
        }
    }

    async fn set(&self, key: &str, value: String) {
        if let Some(h) = self.handle.lock().await.as_ref() {
            let sealed = h.with_chitchat(|c| set_sealed(c, &self.signer, &self.cluster_id, key, &value)).await;
            if let Err(e) = sealed {
                tracing::error!(key, error = %e, "cannot sign gossiped state; not published");
            }
        }
    }

    /// Peer states left out of the view since start because a value was not signed by its node
    /// or its certificate was refused (`signed`).
    pub fn rejected_states(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// For each live peer in the current view, how long ago its heartbeat last advanced here
    /// (to within one gossip round): how stale this node's picture of that peer is. A healthy
    /// mesh keeps it near a few rounds; the failure detector drops a peer well before it grows
    /// past seconds.
    pub fn heartbeat_ages(&self) -> Vec<(String, Duration)> {
        let peers = self.peers();
        let Ok(beats) = self.heartbeats.lock() else { return Vec::new() };
        let now = Instant::now();
        peers
            .iter()
            .filter(|p| !p.is_self)
            .filter_map(|p| {
                let (_, seen) = beats.get(&(p.node_id.clone(), p.generation))?;
                Some((p.node_id.clone(), now.duration_since(*seen)))
            })
            .collect()
    }

    /// Tells peers this node is leaving, gives that a few rounds to spread, then stops gossip.
    /// Only the first call that got the word out does anything (a drain, then SIGTERM, both
    /// leave); a call dropped before that (an HTTP client gone) leaves the next one to do it.
    pub async fn leave(&self) {
        if self.left.load(Ordering::SeqCst) {
            return;
        }
        self.set(KEY_LEAVING, "1".into()).await;
        if self.left.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(self.gossip_interval * 3).await;
        if let Some(h) = self.handle.lock().await.take() {
            if let Err(e) = h.shutdown().await {
                tracing::debug!(error = %e, "gossip shutdown");
            }
        }
    }
}

/// Sets `key` to `value` in this node's state, sealed with the version chitchat will give it
/// (one past the state's highest); an unchanged payload is left as it is.
fn set_sealed(
    c: &mut chitchat::Chitchat,
    signer: &StateSigner,
    cluster: &str,
    key: &str,
    value: &str,
) -> Result<(), GossipError> {
    let id = c.self_chitchat_id().clone();
    let state = c.self_node_state();
    if state.get(key).and_then(signed::payload) == Some(value) {
        return Ok(());
    }
    let version = state.max_version() + 1;
    let index = signed::index_of(state, Some((key, version)));
    let sealed = signed::seal(signer, cluster, &id, key, version, &index, value)?;
    state.set(key, sealed);
    debug_assert_eq!(state.get_versioned(key).map(|v| v.version), Some(version));
    Ok(())
}

/// Every `every`, notes which live peers' heartbeats advanced since the last look.
async fn sample_heartbeats(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    me: ChitchatId,
    out: Arc<Mutex<Heartbeats>>,
    checker: Arc<Mutex<Checker>>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let beats: Vec<((String, u64), u64)> = {
            let c = chitchat.lock().await;
            // What was checked of nodes chitchat no longer holds is forgotten.
            checker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|id| c.node_states().contains_key(id));
            c.live_nodes()
                .filter(|id| **id != me)
                .filter_map(|id| {
                    let hb = u64::from(c.node_state(id)?.heartbeat());
                    Some(((id.node_id.to_string(), id.generation_id), hb))
                })
                .collect()
        };
        let now = Instant::now();
        let Ok(mut seen) = out.lock() else { break };
        seen.retain(|k, _| beats.iter().any(|(b, _)| b == k));
        for (k, hb) in beats {
            match seen.get_mut(&k) {
                Some((prev, _)) if *prev == hb => {}
                Some(e) => *e = (hb, now),
                None => {
                    seen.insert(k, (hb, now));
                }
            }
        }
    }
}

/// Parses chitchat's live node states into peers, each value checked against its node's
/// signature (`signed`): a state with a value its node did not sign is left out whole. A node
/// restarted under the same name may briefly appear twice: the newest generation wins and the
/// stale state is dropped.
fn peers_from(
    states: &std::collections::BTreeMap<ChitchatId, NodeState>,
    me: &ChitchatId,
    prev: &[Peer],
    checker: &mut Checker,
) -> Vec<Peer> {
    let mut out: Vec<Peer> = Vec::new();
    for (id, state) in states {
        let before = prev.iter().find(|p| p.node_id == *id.node_id && p.generation == id.generation_id);
        let peer = checker.reader(id, state).and_then(|mut reader| read_peer(&mut reader, id, me, before));
        let whole = !matches!(peer, Err(Rejection::Incomplete));
        let stand_in = checker.note_incomplete(id, whole);
        let peer = match peer {
            Ok(Some(peer)) => peer,
            Ok(None) => continue,
            // Values still arriving (or left out by a relay): the last whole state stands in
            // for a while (`signed::INCOMPLETE_GRACE`), then the node is left out.
            Err(Rejection::Incomplete) => match before {
                Some(last) if stand_in => last.clone(),
                _ => continue,
            },
            Err(Rejection::NoCertificate) => {
                tracing::debug!(peer = %id.node_id, "state without a certificate yet");
                continue;
            }
            // Logged and counted once by the checker.
            Err(_) => continue,
        };
        match out.iter_mut().find(|p| p.node_id == peer.node_id) {
            Some(existing) if existing.generation >= peer.generation => {}
            Some(existing) => *existing = peer,
            None => out.push(peer),
        }
    }
    out
}

/// One member's state as a peer, every value it reads checked; `None` without metadata.
fn read_peer(
    reader: &mut Reader<'_>,
    id: &ChitchatId,
    me: &ChitchatId,
    before: Option<&Peer>,
) -> Result<Option<Peer>, Rejection> {
    reader.check_whole()?;
    let mut kv_shards = Vec::with_capacity(KV_SHARDS);
    for i in 0..KV_SHARDS {
        let shard = reader.get_versioned(&kv_shard_key(i))?.map(|(version, value)| {
            // Unchanged since the last view: share the value instead of copying it.
            match before.and_then(|p| p.kv_shards.get(i).cloned().flatten()) {
                Some((ver, val)) if ver == version => (ver, val),
                _ => (version, Arc::from(value)),
            }
        });
        kv_shards.push(shard);
    }
    // Decoded and bounded (`schema::MAX_*`): a peer's state is input like any other.
    let Some(meta) = reader.get(KEY_NODE)?.and_then(NodeMeta::decode) else {
        return Ok(None);
    };
    let load = reader.get(KEY_LOAD)?.and_then(LoadReport::decode).unwrap_or_default();
    let kv = reader.get(KEY_KV)?.and_then(KvSummarySlot::decode).unwrap_or_default();
    let usage = reader.get(KEY_USAGE)?.and_then(UsageReport::decode).unwrap_or_default();
    let mut cell_keys = Vec::new();
    for key in reader.keys_with_prefix(KEY_CELL, MAX_CELL_KEYS) {
        if let Some(value) = reader.get(&key)? {
            cell_keys.push((key, value.to_owned()));
        }
    }
    Ok(Some(Peer {
        node_id: id.node_id.to_string(),
        generation: id.generation_id,
        addr: id.gossip_advertise_addr,
        meta,
        load,
        kv,
        kv_shards,
        usage,
        cell_keys,
        is_self: id == me,
    }))
}
