//! One request's context, made once at the edge (the HTTP handler, or the QUIC stream a peer
//! opened) and passed down every stage: its id, endpoint, start instant, span, and, once known,
//! model and tenant. Every latency histogram measures from `started`, whatever stages ran.

use std::time::Instant;

use axum::http::HeaderMap;
use kvmesh_policy::request::Endpoint;

/// Tenant of every request when no API keys are configured.
pub const ANONYMOUS: &str = "anonymous";

/// Longest client-chosen `x-request-id` kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub id: String,
    pub endpoint: Endpoint,
    pub started: Instant,
    pub span: tracing::Span,
    /// The request's model once its body is parsed (empty before).
    pub model: String,
    /// The tenant its API key names ([`ANONYMOUS`] without keys).
    pub tenant: String,
}

impl RequestCtx {
    /// A client's request arriving at `node`: its `x-request-id` when it sent a usable one.
    pub fn client(node: &str, endpoint: Endpoint, headers: &HeaderMap) -> Self {
        let id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        Self::new(id, node, endpoint)
    }

    /// A request a peer forwarded, under the origin's id.
    pub fn peer(id: &str, origin: &str, endpoint: Endpoint) -> Self {
        Self::new(id.to_owned(), origin, endpoint)
    }

    fn new(id: String, origin: &str, endpoint: Endpoint) -> Self {
        let span = tracing::info_span!(
            "request",
            request_id = %id,
            origin = %origin,
            endpoint = endpoint.path(),
            model = tracing::field::Empty,
            peer = tracing::field::Empty,
            reason = tracing::field::Empty,
            route = tracing::field::Empty,
        );
        Self { id, endpoint, started: Instant::now(), span, model: String::new(), tenant: ANONYMOUS.to_owned() }
    }

    /// The parsed request's model, recorded on the span.
    pub fn set_model(&mut self, model: &str) {
        self.model = model.to_owned();
        self.span.record("model", model);
    }
}
