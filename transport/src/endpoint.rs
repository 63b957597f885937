//! One QUIC endpoint per node: a UDP port that accepts peers and dials them, with mutual TLS,
//! one pooled connection per peer address, gossip on unidirectional streams, and forwarded
//! requests on bidirectional streams.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::TransportError;
use crate::frame::{self, RequestHead, ResponseHead};
use crate::signing::StateSigner;
use crate::tls::{self, TlsIdentity};

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub bind: SocketAddr,
    /// Dialling a peer, including the TLS handshake.
    pub connect_timeout: Duration,
    /// Opening a stream, writing a request, reading a gossip message.
    pub io_timeout: Duration,
    /// Keep-alive pings keep pooled connections open and notice dead peers.
    pub keep_alive: Duration,
    /// A connection with no traffic (keep-alives included) for this long is closed.
    pub idle_timeout: Duration,
    /// The mesh's cluster id, negotiated in the TLS handshake (ALPN `kvmesh/1/{id}`): nodes of
    /// another mesh under the same CA cannot connect, for requests or gossip. `None`: plain
    /// `kvmesh/1` (tools and tests).
    pub cluster_id: Option<String>,
}

impl EndpointConfig {
    pub fn new(bind: SocketAddr) -> Self {
        Self {
            bind,
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(5),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(3),
            cluster_id: None,
        }
    }
}

/// A request forwarded by a peer. `respond` takes the response head and body.
pub struct IncomingRequest {
    pub head: RequestHead,
    pub body: Bytes,
    pub peer: SocketAddr,
    /// The node name in the peer's certificate.
    pub peer_name: Option<String>,
    pub respond: quinn::SendStream,
}

/// Gossip messages from peers: (sender's advertised gossip address, payload).
pub type GossipInbox = mpsc::Receiver<(SocketAddr, Bytes)>;

pub type RequestHandler = Arc<dyn Fn(IncomingRequest) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Largest forwarded request body and gossip message accepted from a peer. chitchat cuts a
/// delta at 65,507 bytes (its datagram MTU); a SYN's digest grows by about 60 bytes a member,
/// so 256 KiB carries a mesh of thousands and bounds what one message can cost to check.
pub const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;
pub const MAX_GOSSIP_MESSAGE: usize = 256 * 1024;
/// Forwarded request bodies held at once, from all peers together (KiB): a request that would
/// pass it is reset (the origin retries elsewhere) instead of growing memory without bound.
pub const PEER_BODY_BUDGET_KIB: usize = 512 * 1024;
/// Concurrent request streams one peer may open (each a forwarded request in flight), and
/// gossip streams.
const MAX_BIDI_STREAMS: u32 = 1024;
const MAX_UNI_STREAMS: u32 = 256;
/// Gossip messages waiting for the gossip loop; beyond this they are dropped (gossip repeats).
const GOSSIP_INBOX: usize = 4096;

#[derive(Debug, Default)]
pub struct EndpointStats {
    pub gossip_bytes_sent: AtomicU64,
    pub gossip_bytes_received: AtomicU64,
    pub gossip_dropped: AtomicU64,
    pub refused_connections: AtomicU64,
}

pub struct MeshEndpoint {
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    pool: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    /// One dial at a time per peer: without it, every message to a peer whose handshake is slow
    /// would start a handshake of its own, and a busy mesh would storm itself.
    dialing: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    /// Gossip inboxes by channel: 0 is the node's mesh (or cell), 1 a cells backbone.
    gossip_tx: Mutex<HashMap<u8, mpsc::Sender<(SocketAddr, Bytes)>>>,
    handler: OnceLock<RequestHandler>,
    cfg: EndpointConfig,
    cancel: CancellationToken,
    tasks: TaskTracker,
    /// `PEER_BODY_BUDGET_KIB`, taken as forwarded bodies are read, given back when served.
    body_budget: Arc<tokio::sync::Semaphore>,
    /// Signs what this node gossips and checks its peers' (`signing`), with this identity.
    state_signer: Arc<StateSigner>,
    pub stats: EndpointStats,
}

fn timeout_err(what: &'static str, d: Duration) -> TransportError {
    TransportError::Timeout { what, ms: d.as_millis() as u64 }
}

impl MeshEndpoint {
    /// Binds the endpoint and starts accepting peers. Returns the gossip inbox: messages from
    /// peers as `(sender's advertised gossip address, payload)`.
    pub fn bind(
        identity: &TlsIdentity,
        cfg: EndpointConfig,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Arc<Self>, GossipInbox), TransportError> {
        Self::start(identity, cfg, None, cancel, tasks)
    }

    /// Like `bind`, but on a socket the caller made instead of a UDP port: the fault tests run
    /// the real endpoint on a simulated network this way. `cfg.bind` is ignored; the socket's
    /// own `local_addr` is the endpoint's address.
    pub fn with_socket(
        identity: &TlsIdentity,
        cfg: EndpointConfig,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Arc<Self>, GossipInbox), TransportError> {
        Self::start(identity, cfg, Some(socket), cancel, tasks)
    }

    fn start(
        identity: &TlsIdentity,
        cfg: EndpointConfig,
        socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
        cancel: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(Arc<Self>, GossipInbox), TransportError> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(cfg.keep_alive));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(cfg.idle_timeout).map_err(|e| TransportError::Tls(e.to_string()))?,
        ));
        transport.max_concurrent_bidi_streams(MAX_BIDI_STREAMS.into());
        transport.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
        let transport = Arc::new(transport);
        let server_crypto = QuicServerConfig::try_from(identity.server_config_for(cfg.cluster_id.as_deref())?)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = QuicClientConfig::try_from(identity.client_config_for(cfg.cluster_id.as_deref())?)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);
        let endpoint = match socket {
            None => quinn::Endpoint::server(server, cfg.bind)
                .map_err(|source| TransportError::Bind { addr: cfg.bind.to_string(), source })?,
            Some(socket) => {
                let addr = socket.local_addr().map_or_else(|_| cfg.bind.to_string(), |a| a.to_string());
                quinn::Endpoint::new_with_abstract_socket(
                    quinn::EndpointConfig::default(),
                    Some(server),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(|source| TransportError::Bind { addr, source })?
            }
        };
        let state_signer = Arc::new(StateSigner::new(identity)?);
        let (gossip_tx, gossip_rx) = mpsc::channel(GOSSIP_INBOX);
        let this = Arc::new(Self {
            endpoint,
            client,
            pool: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            gossip_tx: Mutex::new(HashMap::from([(0, gossip_tx)])),
            handler: OnceLock::new(),
            cfg,
            cancel: cancel.child_token(),
            tasks: tasks.clone(),
            stats: EndpointStats::default(),
            body_budget: Arc::new(tokio::sync::Semaphore::new(PEER_BODY_BUDGET_KIB)),
            state_signer,
        });
        let me = this.clone();
        tasks.spawn(async move { me.accept_loop().await });
        Ok((this, gossip_rx))
    }

    /// Signs this node's gossiped state and checks its peers', under this endpoint's identity.
    pub fn state_signer(&self) -> &Arc<StateSigner> {
        &self.state_signer
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.cfg.bind)
    }

    /// Sets what serves requests forwarded by peers; until set, peers' requests are refused.
    pub fn set_request_handler(&self, h: RequestHandler) {
        let _ = self.handler.set(h);
    }

    /// Closes every connection and stops accepting.
    pub async fn close(&self) {
        self.cancel.cancel();
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self: Arc<Self>) {
        loop {
            let incoming = tokio::select! {
                _ = self.cancel.cancelled() => break,
                i = self.endpoint.accept() => match i { Some(i) => i, None => break },
            };
            let me = self.clone();
            self.tasks.spawn(async move {
                let remote = incoming.remote_address();
                match tokio::time::timeout(me.cfg.connect_timeout, incoming).await {
                    Ok(Ok(conn)) => {
                        tracing::debug!(peer = %remote, name = ?tls::peer_name(&conn), "peer connected");
                        me.remember(remote, conn.clone());
                        me.serve_connection(conn).await;
                    }
                    // TLS refusals, ours (TransportError) or the peer's (ConnectionClosed with a
                    // crypto error). Anything else is a dial given up or lost, not a refusal.
                    Ok(Err(e @ (quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_)))) => {
                        me.stats.refused_connections.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %remote, error = %e, "refused peer connection (no certificate from this cluster's CA, or another protocol version)");
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %remote, error = %e, "peer handshake abandoned"),
                    Err(_) => tracing::debug!(peer = %remote, "peer handshake timed out"),
                }
            });
        }
    }

    fn remember(&self, addr: SocketAddr, conn: quinn::Connection) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.insert(addr, conn);
        }
    }

    fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        if let Ok(mut pool) = self.pool.lock() {
            if pool.get(&addr).is_some_and(|c| c.stable_id() == conn.stable_id()) {
                pool.remove(&addr);
            }
        }
    }

    /// Streams a peer opens on a connection, whichever side dialled it.
    async fn serve_connection(self: &Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let name = tls::peer_name(&conn);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                uni = conn.accept_uni() => match uni {
                    Ok(recv) => {
                        let me = self.clone();
                        self.tasks.spawn(async move { me.read_gossip(recv).await });
                    }
                    Err(e) => { tracing::debug!(peer = %remote, error = %e, "connection closed"); break; }
                },
                bi = conn.accept_bi() => match bi {
                    Ok((send, recv)) => {
                        let me = self.clone();
                        let name = name.clone();
                        self.tasks.spawn(async move { me.read_request(remote, name, send, recv).await });
                    }
                    Err(e) => { tracing::debug!(peer = %remote, error = %e, "connection closed"); break; }
                },
            }
        }
        self.forget(remote, &conn);
    }

    async fn read_gossip(&self, mut recv: quinn::RecvStream) {
        let data = match tokio::time::timeout(self.cfg.io_timeout, recv.read_to_end(MAX_GOSSIP_MESSAGE)).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return tracing::debug!(error = %e, "gossip stream failed"),
            Err(_) => return tracing::debug!("gossip stream timed out"),
        };
        self.stats.gossip_bytes_received.fetch_add(data.len() as u64, Ordering::Relaxed);
        let Some((channel, from, payload)) = split_gossip(&data) else {
            return tracing::warn!("malformed gossip frame dropped");
        };
        let tx = self.gossip_tx.lock().ok().and_then(|m| m.get(&channel).cloned());
        let Some(tx) = tx else {
            // A peer gossiping on a channel this node has not opened (a gateway's backbone
            // reaching a plain member): not an error, nothing to do.
            return tracing::debug!(peer = %from, channel, "gossip on an unopened channel dropped");
        };
        if tx.try_send((from, Bytes::copy_from_slice(payload))).is_err() {
            self.stats.gossip_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn read_request(
        &self,
        peer: SocketAddr,
        peer_name: Option<String>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let budget = self.body_budget.clone();
        let read = async {
            let head: RequestHead = frame::read_head(&mut recv).await?;
            let mut body = Vec::new();
            let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
            while let Some(chunk) =
                recv.read_chunk(64 * 1024, true).await.map_err(|e| TransportError::Stream(e.to_string()))?
            {
                if body.len() + chunk.bytes.len() > MAX_REQUEST_BODY {
                    return Err(TransportError::Stream(format!("request body over {MAX_REQUEST_BODY} bytes")));
                }
                let kib = chunk.bytes.len().div_ceil(1024) as u32;
                let permit = budget.clone().try_acquire_many_owned(kib).map_err(|_| {
                    TransportError::Stream("forwarded bodies are over this node's memory budget".into())
                })?;
                match &mut held {
                    Some(h) => h.merge(permit),
                    None => held = Some(permit),
                }
                body.extend_from_slice(&chunk.bytes);
            }
            Ok::<_, TransportError>((head, body, held))
        };
        let (head, body, _held) = match tokio::time::timeout(self.cfg.io_timeout, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "bad forwarded request");
                let _ = send.reset(1u32.into());
                return;
            }
            Err(_) => {
                let _ = send.reset(1u32.into());
                return;
            }
        };
        let Some(handler) = self.handler.get().cloned() else {
            let _ = send.reset(2u32.into());
            return;
        };
        handler(IncomingRequest { head, body: Bytes::from(body), peer, peer_name, respond: send }).await;
    }

    fn pooled(&self, addr: SocketAddr) -> Option<quinn::Connection> {
        let existing = self.pool.lock().ok().and_then(|p| p.get(&addr).cloned())?;
        if existing.close_reason().is_none() {
            return Some(existing);
        }
        self.forget(addr, &existing);
        None
    }

    fn dial_lock(&self, addr: SocketAddr) -> Arc<tokio::sync::Mutex<()>> {
        match self.dialing.lock() {
            Ok(mut m) => m.entry(addr).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The pooled connection to `addr`, dialling it if there is none (waiting for a dial
    /// already under way instead of starting another).
    pub async fn connection(self: &Arc<Self>, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        if let Some(c) = self.pooled(addr) {
            return Ok(c);
        }
        let lock = self.dial_lock(addr);
        let _dialing = tokio::time::timeout(self.cfg.connect_timeout, lock.lock())
            .await
            .map_err(|_| timeout_err("waiting for a dial", self.cfg.connect_timeout))?;
        if let Some(c) = self.pooled(addr) {
            return Ok(c);
        }
        self.dial(addr).await
    }

    /// Like `connection`, but gives up at once if a dial is already under way: for traffic
    /// that tolerates loss (gossip), queueing behind a slow handshake only adds load.
    async fn connection_or_skip(self: &Arc<Self>, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        if let Some(c) = self.pooled(addr) {
            return Ok(c);
        }
        let lock = self.dial_lock(addr);
        let Ok(_dialing) = lock.try_lock() else {
            return Err(TransportError::Connect { addr: addr.to_string(), message: "dial already under way".into() });
        };
        if let Some(c) = self.pooled(addr) {
            return Ok(c);
        }
        self.dial(addr).await
    }

    async fn dial(self: &Arc<Self>, addr: SocketAddr) -> Result<quinn::Connection, TransportError> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), addr, "kvmesh")
            .map_err(|e| TransportError::Connect { addr: addr.to_string(), message: e.to_string() })?;
        let conn = tokio::time::timeout(self.cfg.connect_timeout, connecting)
            .await
            .map_err(|_| timeout_err("connect", self.cfg.connect_timeout))?
            .map_err(|e| TransportError::Connect { addr: addr.to_string(), message: e.to_string() })?;
        self.remember(addr, conn.clone());
        let me = self.clone();
        let served = conn.clone();
        self.tasks.spawn(async move { me.serve_connection(served).await });
        Ok(conn)
    }

    /// Opens gossip channel `channel` (1..=15; 0 is opened at bind) and returns its inbox; a
    /// second gossip cluster on the same endpoint (the cells backbone) lives there.
    pub fn gossip_channel(&self, channel: u8) -> Result<GossipInbox, TransportError> {
        if channel == 0 || channel > MAX_GOSSIP_CHANNEL {
            return Err(TransportError::Frame(format!("gossip channel {channel} is not in 1..={MAX_GOSSIP_CHANNEL}")));
        }
        let (tx, rx) = mpsc::channel(GOSSIP_INBOX);
        let mut map = self.gossip_tx.lock().map_err(|_| TransportError::Frame("gossip channels poisoned".into()))?;
        if map.contains_key(&channel) {
            return Err(TransportError::Frame(format!("gossip channel {channel} is already open")));
        }
        map.insert(channel, tx);
        Ok(rx)
    }

    /// Closes gossip channel `channel` (its frames are dropped from now on), so that it can be
    /// opened again: a node leaves the cells backbone and may join it later.
    pub fn close_gossip_channel(&self, channel: u8) {
        if let Ok(mut map) = self.gossip_tx.lock() {
            map.remove(&channel);
        }
    }

    /// Sends one gossip message in the background; gossip tolerates loss, so failures are
    /// only logged and the caller never waits on a slow or dead peer.
    pub fn send_gossip(self: &Arc<Self>, to: SocketAddr, advertise: SocketAddr, payload: Vec<u8>) {
        self.send_gossip_on(0, to, advertise, payload)
    }

    /// `send_gossip` on gossip channel `channel`.
    pub fn send_gossip_on(self: &Arc<Self>, channel: u8, to: SocketAddr, advertise: SocketAddr, payload: Vec<u8>) {
        let me = self.clone();
        self.tasks.spawn(async move {
            let frame = gossip_frame(channel, advertise, &payload);
            let io = me.cfg.io_timeout;
            let sent = async {
                let conn = me.connection_or_skip(to).await?;
                let mut s = tokio::time::timeout(io, conn.open_uni())
                    .await
                    .map_err(|_| timeout_err("open gossip stream", io))?
                    .map_err(|e| TransportError::Stream(e.to_string()))?;
                tokio::time::timeout(io, s.write_all(&frame))
                    .await
                    .map_err(|_| timeout_err("write gossip", io))?
                    .map_err(|e| TransportError::Stream(e.to_string()))?;
                s.finish().map_err(|e| TransportError::Stream(e.to_string()))?;
                Ok::<_, TransportError>(())
            };
            tokio::select! {
                _ = me.cancel.cancelled() => {}
                r = sent => match r {
                    Ok(()) => { me.stats.gossip_bytes_sent.fetch_add(frame.len() as u64, Ordering::Relaxed); }
                    Err(e) => {
                        me.stats.gossip_dropped.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(peer = %to, error = %e, "gossip send failed");
                    }
                },
            }
        });
    }

    /// Forwards a request to a peer and waits for its response head (at most `first_byte`).
    /// The returned stream yields the response body; dropping it tells the peer to stop.
    pub async fn request(
        self: &Arc<Self>,
        to: SocketAddr,
        head: &RequestHead,
        body: &[u8],
        first_byte: Duration,
    ) -> Result<(ResponseHead, quinn::RecvStream), TransportError> {
        let io = self.cfg.io_timeout;
        let conn = self.connection(to).await?;
        let (mut send, mut recv) = tokio::time::timeout(io, conn.open_bi())
            .await
            .map_err(|_| timeout_err("open request stream", io))?
            .map_err(|e| TransportError::Stream(e.to_string()))?;
        let head_bytes = frame::encode_head(head)?;
        let write = async {
            send.write_all(&head_bytes).await?;
            send.write_all(body).await?;
            Ok::<_, quinn::WriteError>(())
        };
        let written = match tokio::time::timeout(io, write).await {
            Ok(Ok(())) => send.finish().map_err(|e| TransportError::Stream(e.to_string())),
            Ok(Err(e)) => Err(TransportError::Stream(e.to_string())),
            Err(_) => Err(timeout_err("write request", io)),
        };
        if let Err(e) = written {
            // A cut request must not reach the peer as a complete (shorter) one.
            let _ = send.reset(RESET_FAILED);
            return Err(e);
        }
        let resp: ResponseHead = tokio::time::timeout(first_byte, frame::read_head(&mut recv))
            .await
            .map_err(|_| timeout_err("response head", first_byte))??;
        Ok((resp, recv))
    }

    /// Round-trip time to a peer, as QUIC measures it on the pooled connection.
    pub fn rtt(&self, addr: SocketAddr) -> Option<Duration> {
        self.pool.lock().ok()?.get(&addr).map(|c| c.rtt())
    }

    /// Addresses with an open connection now.
    pub fn connected_peers(&self) -> Vec<SocketAddr> {
        self.pool.lock().map(|p| p.keys().copied().collect()).unwrap_or_default()
    }

    pub fn io_timeout(&self) -> Duration {
        self.cfg.io_timeout
    }
}

/// Highest gossip channel: the top 4 bits of the frame's length word.
pub const MAX_GOSSIP_CHANNEL: u8 = 15;

/// `[u16 BE: channel << 12 | address length][sender's advertised gossip address][payload]`:
/// the address lets replies reach the sender's gossip port even when its packets come from
/// elsewhere (NAT, 0.0.0.0 binds). Channel 0 frames are the format before channels existed.
fn gossip_frame(channel: u8, advertise: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let a = advertise.to_string();
    let mut out = Vec::with_capacity(2 + a.len() + payload.len());
    // A socket address is at most ~50 characters: the 12 bits always hold it.
    let word = (u16::from(channel & MAX_GOSSIP_CHANNEL) << 12) | (a.len() as u16 & 0x0FFF);
    out.extend_from_slice(&word.to_be_bytes());
    out.extend_from_slice(a.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn split_gossip(data: &[u8]) -> Option<(u8, SocketAddr, &[u8])> {
    let word = u16::from_be_bytes(data.get(..2)?.try_into().ok()?);
    let (channel, len) = ((word >> 12) as u8, (word & 0x0FFF) as usize);
    let addr = std::str::from_utf8(data.get(2..2 + len)?).ok()?.parse().ok()?;
    Some((channel, addr, &data[2 + len..]))
}

/// Writes a response head then pumps `body` into the stream; stops when the peer stops reading.
pub async fn respond<S, E>(
    mut send: quinn::SendStream,
    head: &ResponseHead,
    body: S,
    io: Duration,
) -> Result<(), TransportError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    match write_response(&mut send, head, body, io).await {
        Ok(()) => {
            send.finish().map_err(|e| TransportError::Stream(e.to_string()))?;
            // Wait until the peer has everything, so dropping the stream does not cut the tail.
            let _ = tokio::time::timeout(io, send.stopped()).await;
            Ok(())
        }
        Err(e) => {
            // Dropping an unfinished stream would *finish* it, and the origin would take a cut
            // answer for a complete one: reset it so the cut reads as an error there.
            let _ = send.reset(RESET_FAILED);
            Err(e)
        }
    }
}

/// Stream reset code for "the sender failed mid-message".
const RESET_FAILED: quinn::VarInt = quinn::VarInt::from_u32(3);

async fn write_response<S, E>(
    send: &mut quinn::SendStream,
    head: &ResponseHead,
    mut body: S,
    io: Duration,
) -> Result<(), TransportError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let head = frame::encode_head(head)?;
    tokio::time::timeout(io, send.write_all(&head))
        .await
        .map_err(|_| timeout_err("write response head", io))?
        .map_err(|e| TransportError::Stream(e.to_string()))?;
    while let Some(chunk) = futures::StreamExt::next(&mut body).await {
        let c = chunk.map_err(|e| TransportError::Stream(e.to_string()))?;
        tokio::time::timeout(io, send.write_all(&c))
            .await
            .map_err(|_| timeout_err("write response", io))?
            .map_err(|e| TransportError::Stream(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_frame_roundtrip_and_garbage() {
        let a: SocketAddr = "127.0.0.1:7946".parse().unwrap();
        let f = gossip_frame(0, a, b"xyz");
        assert_eq!(split_gossip(&f), Some((0, a, &b"xyz"[..])));
        let f = gossip_frame(1, a, b"xyz");
        assert_eq!(split_gossip(&f), Some((1, a, &b"xyz"[..])));
        assert_eq!(split_gossip(&[0, 50, 1]), None);
        assert_eq!(split_gossip(&[]), None);
    }
}
