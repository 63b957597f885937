use thiserror::Error;

#[derive(Debug, Error)]
pub enum GossipError {
    #[error("gossip failed to start: {0}")]
    Start(String),
    #[error("encoding node state: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("signing node state: {0}")]
    Sign(#[from] kvmesh_transport::TransportError),
}
