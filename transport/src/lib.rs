//! The QUIC endpoint between nodes. It owns mutual TLS with the cluster's CA (`tls`), the
//! certificate tooling behind `kvmesh cert` (`certs`), signatures on the state a node gossips
//! (`signing`), the framing of request streams
//! (`frame`), and one endpoint per node (`endpoint`). That endpoint pools a connection per
//! peer, carries gossip on unidirectional streams, and carries forwarded requests on
//! bidirectional streams.
//!
//! Must not: parse OpenAI requests, choose peers, or interpret gossip. It moves authenticated
//! bytes between nodes, with a timeout on every open, read and write.

pub mod certs;
pub mod endpoint;
pub mod error;
pub mod frame;
pub mod signing;
pub mod tls;

pub use endpoint::{IncomingRequest, MeshEndpoint, RequestHandler};
pub use error::TransportError;
pub use frame::{PeerRequest, PlaceQuery, Placement, PromptDigest, RequestHead, ResponseHead};
pub use signing::{AuthorKey, StateSigner};
pub use tls::TlsIdentity;

/// The socket trait `MeshEndpoint::with_socket` takes, re-exported so callers need not pin quinn
/// themselves.
pub use quinn::AsyncUdpSocket;

/// ALPN protocol id: the protocol's name and version. A peer speaking another version fails the
/// handshake instead of misreading frames.
pub const ALPN: &[u8] = b"kvmesh/1";
