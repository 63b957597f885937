use thiserror::Error;

#[derive(Debug, Error)]
pub enum NodeError {
    /// The configuration is unusable; the message says what to change.
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot read config file {path}: {source}")]
    ConfigFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    ConfigParse { path: String, message: String },
    #[error("cannot bind HTTP address {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded engine simulator: {0}")]
    EmbeddedEngine(#[from] kvmesh_sim::SimError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("latency histogram: {0}")]
    Histogram(String),
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("mesh: {0}")]
    Mesh(String),
    #[error("benchmark: {0}")]
    Bench(String),
    #[error("audit trail: {0}")]
    Audit(String),
}
