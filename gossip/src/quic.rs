//! chitchat's `Transport` on the node's QUIC endpoint: each gossip message travels on its own
//! unidirectional stream of a pooled, mutually authenticated connection. Streams carry any size,
//! so chitchat's datagram MTU is not a limit.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::signed::Checker;
use crate::wire;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use kvmesh_transport::endpoint::GossipInbox;
use kvmesh_transport::MeshEndpoint;

pub struct QuicTransport {
    endpoint: Arc<MeshEndpoint>,
    inbox: Mutex<Option<GossipInbox>>,
    channel: u8,
    checker: Arc<Mutex<Checker>>,
}

impl QuicTransport {
    /// `inbox` is the inbox of gossip channel `channel`: the one `MeshEndpoint::bind` returned
    /// for 0, `MeshEndpoint::gossip_channel` for others. Every received delta is checked by
    /// `checker` before chitchat sees it (`Checker::admit`).
    pub fn new(endpoint: Arc<MeshEndpoint>, inbox: GossipInbox, channel: u8, checker: Arc<Mutex<Checker>>) -> Self {
        Self { endpoint, inbox: Mutex::new(Some(inbox)), channel, checker }
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
            checker: self.checker.clone(),
        }))
    }
}

struct QuicSocket {
    endpoint: Arc<MeshEndpoint>,
    advertise: SocketAddr,
    inbox: GossipInbox,
    channel: u8,
    checker: Arc<Mutex<Checker>>,
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
            if let Err(why) = check_decompressed_bound(&payload) {
                tracing::warn!(peer = %from, error = %why, "gossip message dropped");
                continue;
            }
            // Signed state only: a delta is checked on its bytes, before chitchat applies it.
            let msg = match wire::read(&payload) {
                Ok(msg) => msg,
                Err(why) => {
                    tracing::warn!(peer = %from, error = %why, "undecodable gossip message dropped");
                    continue;
                }
            };
            let payload = {
                let mut checker = self.checker.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let keep = match msg.sections.is_empty() {
                    true => Vec::new(),
                    false => match checker.admit(&msg.sections) {
                        Ok(keep) => keep,
                        Err(_) => continue,
                    },
                };
                // A node section its node did not sign is left out (the other nodes' go on).
                // A digest names members and carries their heartbeats, unsigned: chitchat would
                // create a member from a digest alone and repeat it in its own digests. Only
                // members whose signed state this node has checked stay; others arrive with
                // their state in a delta.
                match wire::rewrite(&payload, &msg, |id| checker.certified(id), &keep) {
                    Some(rewritten) => bytes::Bytes::from(rewritten),
                    None => payload,
                }
            };
            match ChitchatMessage::deserialize(&mut payload.as_ref()) {
                Ok(msg) => return Ok((from, msg)),
                Err(e) => tracing::warn!(peer = %from, error = %e, "undecodable gossip message dropped"),
            }
        }
    }
}

/// Compressed blocks a gossip message may hold. chitchat decompresses each block of a delta
/// into at most 64 KiB, with no bound on their number: a 4 MiB message of tiny zstd frames
/// would decompress into tens of GiB. A real delta has one block per 16 KiB of uncompressed
/// state, so 1,024 (64 MiB at most) is far above any honest message.
pub const MAX_COMPRESSED_BLOCKS: usize = 1024;

/// zstd's frame magic number, as it appears on the wire.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// Refuses a message that could decompress past `MAX_COMPRESSED_BLOCKS` blocks, before chitchat
/// decodes it. Every compressed block is a zstd frame starting with its magic number; counting
/// the magic over-counts only where uncompressed bytes happen to hold it, which no honest
/// message does a thousand times.
pub fn check_decompressed_bound(payload: &[u8]) -> Result<(), String> {
    let frames = payload.windows(ZSTD_MAGIC.len()).filter(|w| *w == ZSTD_MAGIC).count();
    match frames > MAX_COMPRESSED_BLOCKS {
        true => Err(format!(
            "{frames} compressed blocks (at most {MAX_COMPRESSED_BLOCKS}): it could decompress to {} MiB",
            frames * 64 / 1024
        )),
        false => Ok(()),
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    #[test]
    fn a_decompression_bomb_is_refused_and_real_gossip_is_not() {
        let mut bomb = Vec::new();
        for _ in 0..=MAX_COMPRESSED_BLOCKS {
            bomb.extend_from_slice(&[0]);
            bomb.extend_from_slice(&ZSTD_MAGIC);
            bomb.extend_from_slice(&[0x20, 0, 0]);
        }
        assert!(check_decompressed_bound(&bomb).is_err());
        bomb.truncate(bomb.len() - 8);
        assert!(check_decompressed_bound(&bomb).is_ok());
        // Real gossip passes the check: every mesh test (gossip/tests, node/tests, netsim-tests)
        // gossips through it.
    }
}
