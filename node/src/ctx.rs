//! One request's context, made once at the edge (the HTTP handler, or the QUIC stream a peer
//! opened) and passed down every stage: its id, endpoint, start instant, span, and, once known,
//! model and tenant. Every latency histogram measures from `started`, whatever stages ran.

/// The header a client names its priority band in (`critical`, `standard`, `sheddable`).
pub const PRIORITY_HEADER: &str = "x-kvmesh-priority";

use kvmesh_policy::flow::Priority;
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
    /// For a stored response's routes (`/v1/responses/{id}`, `.../cancel`): the id in the path.
    pub response_id: Option<String>,
    /// The model a request naming none is for: the mesh's only model, when it has one.
    pub default_model: Option<String>,
    /// A stored response's retrieval query (`stream=true&starting_after=N`), checked.
    pub query: Option<String>,
    /// The body's content type when it is not JSON (a multipart form, with its boundary).
    pub content_type: Option<String>,
    /// The session a header names (`policy::affinity`); the body's, if any, is the request's.
    pub session: Option<String>,
    /// The W3C trace context the request arrived with (`traceparent`, `tracestate`), checked:
    /// the request span's parent, and passed on to engines and peers.
    pub trace: Option<(String, Option<String>)>,
    /// The band the client asked for (`x-kvmesh-priority`), unbounded.
    pub asked_priority: Option<Priority>,
    /// The band it is held in: what it asked for, bounded by its key (`policy::flow`).
    pub priority: Priority,
    /// Its tenant's weight in the fair queue.
    pub weight: u32,
}

/// A request id that may go into logs and HTTP headers: 1 to `MAX_REQUEST_ID` visible ASCII
/// characters (no spaces, no control characters: a newline would forge a log line, and make the
/// engine's `x-request-id` header invalid).
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
}

fn fresh_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl RequestCtx {
    /// A client's request arriving at `node`: its `x-request-id` when it sent a usable one.
    pub fn client(node: &str, endpoint: Endpoint, headers: &HeaderMap) -> Self {
        let id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| valid_request_id(v))
            .map(str::to_owned)
            .unwrap_or_else(fresh_id);
        let mut ctx = Self::new(id, node, endpoint);
        ctx.asked_priority = headers.get(PRIORITY_HEADER).and_then(|v| v.to_str().ok()).and_then(Priority::parse);
        ctx
    }

    /// Bounds the band asked for by what the caller may have (its key's, or the node's for
    /// clients without keys), with its default band when it asked for none.
    pub fn set_priority(&mut self, default: Priority, max: Priority, weight: u32) {
        self.priority = Priority::bounded(self.asked_priority, default, max);
        self.weight = weight.max(1);
    }

    /// A request a peer forwarded, under the origin's id when it is a usable one (a peer is not
    /// trusted with what reaches logs and engine headers: another id is made otherwise).
    pub fn peer(id: &str, origin: &str, endpoint: Endpoint) -> Self {
        let origin = if valid_request_id(origin) { origin } else { "invalid-origin" };
        match valid_request_id(id) {
            true => Self::new(id.to_owned(), origin, endpoint),
            false => {
                let fresh = fresh_id();
                tracing::warn!(peer_id = ?id, id = %fresh, "a peer sent an unusable request id; using a fresh one");
                Self::new(fresh, origin, endpoint)
            }
        }
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
        Self {
            id,
            endpoint,
            started: Instant::now(),
            span,
            model: String::new(),
            tenant: ANONYMOUS.to_owned(),
            response_id: None,
            default_model: None,
            query: None,
            content_type: None,
            session: None,
            asked_priority: None,
            priority: Priority::Standard,
            weight: 1,
            trace: None,
        }
    }

    /// The path the engine is called on: the endpoint's, with the response id in place.
    pub fn upstream_path(&self) -> String {
        let path = match &self.response_id {
            Some(id) => self.endpoint.path().replace("{response_id}", id),
            None => self.endpoint.path().to_owned(),
        };
        match &self.query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }
    }

    /// The head of this request sent to a peer (`ask`), from `node`.
    pub fn peer_head(
        &self,
        ask: kvmesh_transport::PeerRequest,
        node: &str,
        stream: bool,
    ) -> kvmesh_transport::RequestHead {
        let mut head = kvmesh_transport::RequestHead::new(ask, &self.upstream_path(), &self.id, node, stream);
        head.content_type = self.content_type.clone();
        head.tenant = Some(self.tenant.clone());
        head.priority = Some(self.priority.as_str().to_owned());
        head.weight = Some(self.weight);
        for (k, v) in self.trace_headers() {
            match k {
                "traceparent" => head.traceparent = Some(v),
                _ => head.tracestate = Some(v),
            }
        }
        head
    }

    /// The content type the engine is sent the body with.
    pub fn body_type(&self) -> &str {
        self.content_type.as_deref().unwrap_or("application/json")
    }

    /// A retrieval that asks for the stored response's events.
    pub fn stream_query(&self) -> bool {
        self.query.as_deref().is_some_and(|q| q.split('&').any(|kv| kv == "stream=true"))
    }

    /// Keeps of a retrieval's query what vLLM reads, in one spelling each: `stream=true` or
    /// `stream=false` (any other spelling, which vLLM might read as true where this node would
    /// not, is refused by being dropped: the engine then answers whole, as the node expects) and
    /// `starting_after` with a number. Anything else is dropped.
    pub fn set_query(&mut self, query: Option<&str>) {
        let kept: Vec<&str> = query
            .unwrap_or_default()
            .split('&')
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                match k {
                    "stream" => v == "true" || v == "false",
                    "starting_after" => !v.is_empty() && v.len() <= 12 && v.bytes().all(|b| b.is_ascii_digit()),
                    _ => false,
                }
            })
            .take(2)
            .collect();
        self.query = (!kept.is_empty()).then(|| kept.join("&"));
    }

    /// Takes the caller's W3C trace context (`traceparent`, `tracestate` headers, or a peer's
    /// head): when valid, the request span continues that trace.
    pub fn continue_trace(&mut self, headers: &HeaderMap) {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&opentelemetry_http::HeaderExtractor(headers));
        if !cx.span().span_context().is_valid() {
            return;
        }
        let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let Some(parent) = text("traceparent") else { return };
        let state = text("tracestate").filter(|s| s.len() <= 512);
        let _ = self.span.set_parent(cx);
        self.trace = Some((parent, state));
    }

    /// The trace context to send to an engine or a peer: this node's request span (a child of
    /// the caller's) when spans are exported, else the caller's own, unchanged.
    pub fn trace_headers(&self) -> Vec<(&'static str, String)> {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let cx = self.span.context();
        if cx.span().span_context().is_valid() {
            let mut carrier = std::collections::HashMap::new();
            opentelemetry_sdk::propagation::TraceContextPropagator::new().inject_context(&cx, &mut carrier);
            return ["traceparent", "tracestate"]
                .into_iter()
                .filter_map(|k| carrier.remove(k).filter(|v| !v.is_empty()).map(|v| (k, v)))
                .collect();
        }
        match &self.trace {
            Some((parent, state)) => std::iter::once(("traceparent", parent.clone()))
                .chain(state.clone().map(|s| ("tracestate", s)))
                .collect(),
            None => Vec::new(),
        }
    }

    /// The parsed request's model, recorded on the span.
    pub fn set_model(&mut self, model: &str) {
        self.model = model.to_owned();
        self.span.record("model", model);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_ids_are_replaced() {
        assert!(valid_request_id("abc-123_X.y"));
        for bad in ["", "a\nFAKE", "a b", "é", &"x".repeat(MAX_REQUEST_ID + 1)] {
            assert!(!valid_request_id(bad), "{bad:?}");
        }
        let ctx = RequestCtx::peer("x\nINFO forged", "n1", Endpoint::Chat);
        assert!(valid_request_id(&ctx.id) && !ctx.id.contains("forged"));
        let mut q = RequestCtx::peer("a", "n1", Endpoint::ResponseRetrieve);
        q.set_query(Some("stream=1&starting_after=3&x=%0a"));
        assert_eq!(q.query.as_deref(), Some("starting_after=3"), "stream=1 is not forwarded");
        q.set_query(Some("stream=true"));
        assert!(q.stream_query());
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "ok-id".parse().unwrap());
        assert_eq!(RequestCtx::client("n", Endpoint::Chat, &h).id, "ok-id");
    }
}
