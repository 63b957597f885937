use thiserror::Error;

#[derive(Debug, Error)]
pub enum SimError {
    #[error("invalid engine-sim configuration: {0}")]
    Config(String),
    /// The cluster simulator's configuration or workload file.
    #[error("cluster simulator: {0}")]
    Cluster(String),
    #[error(transparent)]
    Policy(#[from] kvmesh_policy::PolicyError),
    #[error("cannot bind HTTP address {addr}: {source}")]
    BindHttp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind KV-events endpoint {endpoint}: {message}")]
    BindKvEvents { endpoint: String, message: String },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}
