use thiserror::Error;

#[derive(Debug, Error)]
pub enum GossipError {
    #[error("gossip failed to start: {0}")]
    Start(String),
    #[error("encoding node state: {0}")]
    Encode(#[from] serde_json::Error),
}
