//! chitchat's `Transport` on the node's QUIC endpoint: each gossip message travels on its own
//! unidirectional stream of a pooled, mutually authenticated connection. Streams carry any size,
//! so chitchat's datagram MTU is not a limit.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use kvmesh_transport::endpoint::GossipInbox;
use kvmesh_transport::MeshEndpoint;

pub struct QuicTransport {
    endpoint: Arc<MeshEndpoint>,
    inbox: Mutex<Option<GossipInbox>>,
    channel: u8,
}

impl QuicTransport {
    /// `inbox` is the inbox of gossip channel `channel`: the one `MeshEndpoint::bind` returned
    /// for 0, `MeshEndpoint::gossip_channel` for others.
    pub fn new(endpoint: Arc<MeshEndpoint>, inbox: GossipInbox, channel: u8) -> Self {
        Self { endpoint, inbox: Mutex::new(Some(inbox)), channel }
    }
}

#[async_trait]
impl Transport for QuicTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inbox = self
            .inbox
            .lock()
            .map_err(|_| anyhow::anyhow!("gossip inbox lock poisoned"))?
            .take()
            .ok_or_else(|| anyhow::anyhow!("the QUIC gossip transport can be opened once"))?;
        Ok(Box::new(QuicSocket {
            endpoint: self.endpoint.clone(),
            advertise: listen_addr,
            inbox,
            channel: self.channel,
        }))
    }
}

struct QuicSocket {
    endpoint: Arc<MeshEndpoint>,
    advertise: SocketAddr,
    inbox: GossipInbox,
    channel: u8,
}

#[async_trait]
impl Socket for QuicSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        // Never waits on the peer: a slow or dead peer must not stall the gossip round.
        self.endpoint.send_gossip_on(self.channel, to, self.advertise, msg.serialize_to_vec());
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (from, payload) = self.inbox.recv().await.ok_or_else(|| anyhow::anyhow!("QUIC endpoint closed"))?;
            match ChitchatMessage::deserialize(&mut payload.as_ref()) {
                Ok(msg) => return Ok((from, msg)),
                Err(e) => tracing::warn!(peer = %from, error = %e, "undecodable gossip message dropped"),
            }
        }
    }
}
