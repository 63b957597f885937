use thiserror::Error;

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("certificate generation: {0}")]
    Cert(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{what} timed out after {ms} ms")]
    Timeout { what: &'static str, ms: u64 },
    #[error("stream: {0}")]
    Stream(String),
    #[error("frame: {0}")]
    Frame(String),
    #[error("peer refused the request: {0}")]
    Refused(String),
}
