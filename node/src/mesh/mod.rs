//! This node's place in the mesh: its QUIC endpoint, its gossip membership, what it publishes
//! (`publish`), the cells backbone when it is a gateway (`backbone`), and the routing view of
//! its peers' engines that the request path reads (`view`).

mod backbone;
mod publish;
pub mod view;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvmesh_gossip::{GossipConfig, Membership, NodeMeta, Peer};
use kvmesh_transport::endpoint::EndpointConfig;
use kvmesh_transport::{AsyncUdpSocket, MeshEndpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::engine::EngineSet;
use crate::error::NodeError;
use view::{PeerTable, RoutingView, TableSettings};

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
    /// The peers' engines as the request path sees them, rebuilt on every gossip change.
    pub table: PeerTable,
    /// Client requests this node holds (flow control), gossiped with its load.
    pub held: Arc<std::sync::atomic::AtomicU32>,
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
        // Peers know a node by the name in its certificate: its requests and gossip must carry
        // that same name.
        let Some(cert_name) = identity.name() else {
            return Err(NodeError::Config(format!(
                "the certificate {} names no node (no DNS name): make one with `kvmesh cert node --name {}`",
                cert.display(),
                cfg.node_name
            )));
        };
        if let Some(name) = Some(cert_name).filter(|n| n != &cfg.node_name) {
            return Err(NodeError::Config(format!(
                "the certificate {} is for node `{name}`, but node_name is `{}`: set --node-name {name}, or make a \
                 certificate for this name with `kvmesh cert node --name {}`",
                cert.display(),
                cfg.node_name,
                cfg.node_name
            )));
        }
        let bind: SocketAddr =
            cfg.quic_addr.parse().map_err(|_| NodeError::Config(format!("quic_addr `{}`", cfg.quic_addr)))?;
        // The base cluster id (cells' gossip ids derive from it): another mesh under the same
        // CA fails the handshake.
        let ecfg = EndpointConfig { cluster_id: Some(cfg.cluster_id.clone()), ..EndpointConfig::new(bind) };
        let bound = match socket {
            None => MeshEndpoint::bind(&identity, ecfg, cancel, tasks),
            Some(s) => MeshEndpoint::with_socket(&identity, ecfg, s, cancel, tasks),
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
            table: PeerTable::new(TableSettings {
                with_cells: cell.is_some(),
                epoch: engines.epoch(),
                suspect_for: Config::ms(cfg.peer_suspect_ms),
                history_ttl_ms: cfg.route_history_ttl_s * 1000,
                history_max_keys: cfg.route_history_max_keys,
            }),
            held: Arc::default(),
        });
        tasks.spawn(rebuild_view(mesh.clone(), cancel.clone()));
        tasks.spawn(publish::publish_load(
            mesh.clone(),
            engines.clone(),
            Config::ms(cfg.load_publish_interval_ms),
            cancel.clone(),
        ));
        tasks.spawn(publish::publish_summary(
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
            tasks.spawn(backbone::elect(mesh.clone(), cancel.clone(), tasks.clone()));
        }
        Ok(mesh)
    }

    /// The routing view of the peers' engines (and the cells table), as of gossip's latest
    /// view.
    pub fn view(&self) -> Arc<RoutingView> {
        self.table.view(&self.membership.peers())
    }

    /// The cells table as this node's cell gossips it (empty without cells, or before a
    /// gateway published it).
    pub fn cells(&self) -> Arc<Vec<crate::cells::CellView>> {
        self.view().cells.clone()
    }

    /// Live peers, this node included.
    pub fn peers(&self) -> Arc<Vec<Peer>> {
        self.membership.peers()
    }

    /// A peer failed before answering: skip it for a while. Gossip decides whether it is dead.
    pub fn suspect(&self, node_id: &str) {
        self.table.suspect(node_id);
    }

    /// Whether `node_id` failed a request within the last `peer_suspect_ms`.
    pub fn is_suspect(&self, node_id: &str) -> bool {
        self.table.is_suspect(node_id)
    }

    /// Requests this node has open on peers' engines.
    pub fn in_flight_total(&self) -> u32 {
        self.table.in_flight_total()
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

/// Rebuilds the routing view whenever gossip's view changes (`view::PeerTable::rebuild`).
async fn rebuild_view(mesh: Arc<Mesh>, cancel: CancellationToken) {
    let mut watch = mesh.membership.watch();
    loop {
        let peers = watch.borrow_and_update().clone();
        mesh.table.rebuild(peers);
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = watch.changed() => if changed.is_err() { return },
        }
    }
}
