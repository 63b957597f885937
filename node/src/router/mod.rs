//! Choosing an engine for a request and getting it there: the `place`, `pick` and `forward`
//! stages of the request path, for client requests (`request::Pipeline`) and for requests
//! peers forward here (`peer`).
//!
//! - `pick`: this node's engines and the routing view of its peers' engines, turned into
//!   candidates by `policy::candidates` and chosen by `policy::route`.
//! - `forward`: the client's bytes to a local engine over HTTP, or to a peer over QUIC.
//! - `split`: prefill on one engine, decode on another (vLLM's NixlConnector flow).
//! - `relay`: the engine's answer back, streamed chunk by chunk.
//! - `cells`: a prompt homed in another cell, placed by its home node there.
//! - `peer`: what a peer asks of this node (`transport::PeerRequest`).
//!
//! Failure rules: anything that fails before the client has seen a byte may be retried on
//! another engine (bounded by `max_attempts`); once a stream has started, a failure ends it with
//! an OpenAI error event and `[DONE]`, never a silent cut or a hang (every wait has a timeout).
//! A request forwarded by a peer is served by this node's own engines only, so a request
//! crosses the mesh at most once. With cells, the origin asks a prompt's home node in another
//! cell where to send it and forwards it there, so it still crosses once; only a request that
//! home node splits between prefill and decode is relayed to it whole and routed there again.

mod cells;
pub mod check;
pub(crate) mod flow;
mod forward;
mod peer;
mod pick;
mod relay;
mod split;
pub(crate) mod stored;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use kvmesh_policy::candidates::PromptKeys;
use kvmesh_policy::cells::CellSettings;
use kvmesh_policy::models::KeySpace;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::pd::PdSettings;
use kvmesh_policy::request::InferenceRequest;
use kvmesh_policy::route::{RouteDecision, RouteReason};
use kvmesh_policy::score::ScoreWeights;
use kvmesh_transport::PeerRequest;

use crate::config::{Config, RoutingPolicy};
use crate::ctx::RequestCtx;
use crate::engine::{Engine, EngineSet};
use crate::mesh::view::PeerEngine;
use crate::mesh::Mesh;
use crate::metrics::NodeMetrics;
use crate::reply::{not_accepted, reply_error};
use crate::tokens::Tokenizers;

pub use forward::Retry;

/// The router's settings, from the node's config.
#[derive(Debug, Clone)]
pub struct RouterSettings {
    pub node_name: String,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_attempts: u32,
    pub routing: RoutingPolicy,
    pub weights: ScoreWeights,
    pub default_block_size: u32,
    pub pd: PdSettings,
    pub cells: CellSettings,
    /// Headers whose value names a client's session (`x-session-affinity`, and the configured
    /// one).
    pub session_headers: Vec<axum::http::HeaderName>,
    /// Flow control (the hold stage).
    pub flow: kvmesh_policy::flow::FlowSettings,
    /// How far a peer's gossiped load lags what this node sent it: a publish interval and two
    /// gossip rounds.
    pub report_lag_ms: u64,
}

impl RouterSettings {
    pub fn from_config(cfg: &Config) -> Self {
        Self {
            node_name: cfg.node_name.clone(),
            first_byte_timeout: Config::ms(cfg.engine_first_byte_timeout_ms),
            idle_timeout: Config::ms(cfg.engine_idle_timeout_ms),
            max_attempts: cfg.max_attempts,
            routing: cfg.routing,
            weights: cfg.score.clone(),
            default_block_size: cfg.default_block_size,
            pd: cfg.pd.clone(),
            cells: cfg.cells.routing.clone(),
            session_headers: std::iter::once("x-session-affinity")
                .chain(cfg.session_header.as_deref())
                .filter_map(|h| axum::http::HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            flow: cfg.flow.clone(),
            report_lag_ms: cfg.load_publish_interval_ms + 2 * cfg.gossip_interval_ms,
        }
    }
}

pub struct Router {
    pub node_name: String,
    pub engines: Arc<EngineSet>,
    pub metrics: Arc<NodeMetrics>,
    mesh: Option<Arc<Mesh>>,
    client: reqwest::Client,
    tokenizers: Tokenizers,
    s: RouterSettings,
    rr_next: AtomicU32,
    peer_requests: AtomicU32,
    /// Set by a drain or a shutdown: new requests, clients' and peers', get a retryable 503.
    draining: AtomicBool,
    /// Whether engines' reported prompt lengths agree with this node's (`check`).
    pub agreement: check::KeyAgreement,
    /// The node's audit log, where requests peers forward are recorded too (`peer`).
    audit: std::sync::OnceLock<Arc<crate::audit::AuditLog>>,
    /// Requests held while engines are saturated (`flow`).
    pub(crate) flow: flow::FlowControl,
}

/// Where a request may go.
#[derive(Clone, Copy)]
pub enum Scope<'a> {
    /// Any engine in the mesh (a client's request).
    Mesh,
    /// This node's engines only, preferring the named one (a peer named it), or the best of
    /// them (`None`: the peer sent block keys and left the choice here).
    Local(Option<&'a str>),
    /// Any engine in this node's cell, preferring this node's: a request relayed from another
    /// cell to its home node (`policy::cells`). Never relayed again.
    Cell,
}

impl Router {
    /// Records the requests peers forward here in `log` as well (their origin records them for
    /// its client).
    pub fn record_peer_requests_in(&self, log: Arc<crate::audit::AuditLog>) {
        let _ = self.audit.set(log);
    }

    /// The session a request's headers name (`x-session-affinity`, or the configured header).
    pub fn session_of(&self, headers: &axum::http::HeaderMap) -> Option<String> {
        self.s.session_headers.iter().find_map(|h| {
            let v = headers.get(h)?.to_str().ok().filter(|v| !v.is_empty())?;
            Some(kvmesh_policy::affinity::bounded(v))
        })
    }
}

impl Scope<'_> {
    /// Whether this node chooses among engines (and so needs the prompt's keys).
    fn chooses(self) -> bool {
        !matches!(self, Scope::Local(Some(_)))
    }
}

/// An engine a request can go to.
// A pick holds one target per candidate engine for one request, so the peer variant's size
// (its gossiped facts, inline) costs less than boxing every one.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Target {
    Local(Arc<Engine>),
    Remote(PeerEngine),
}

impl Target {
    /// `node/engine`, as in `x-kvmesh-served-by`.
    fn label(&self, node: &str) -> String {
        match self {
            Target::Local(e) => format!("{node}/{}", e.name),
            Target::Remote(r) => r.id.to_string(),
        }
    }

    /// What a retry skips: the same engine again.
    fn key(&self) -> String {
        match self {
            Target::Local(e) => format!("local/{}", e.name),
            Target::Remote(r) => r.id.to_string(),
        }
    }
}

impl Router {
    pub fn new(
        s: RouterSettings,
        engines: Arc<EngineSet>,
        metrics: Arc<NodeMetrics>,
        mesh: Option<Arc<Mesh>>,
        client: reqwest::Client,
        tokenizers: Tokenizers,
    ) -> Self {
        // Peers read how many requests this node holds from its gossiped load.
        let held = mesh.as_ref().map(|m| m.held.clone()).unwrap_or_default();
        let flow = flow::FlowControl::new(s.flow.clone(), held, metrics.clone());
        Self {
            flow,
            node_name: s.node_name.clone(),
            engines,
            metrics,
            mesh,
            client,
            tokenizers,
            s,
            rr_next: AtomicU32::new(rand::random()),
            peer_requests: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            agreement: check::KeyAgreement::default(),
            audit: std::sync::OnceLock::new(),
        }
    }

    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.as_ref()
    }

    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tokenizers
    }

    /// How the engines serving `model` key its blocks: as this node's own engines do when one
    /// serves it, else as the peers' do (`policy::models`).
    pub fn key_space(&self, model: &str) -> KeySpace {
        if let Some(space) = self.engines.key_space(model) {
            return space;
        }
        match &self.mesh {
            Some(mesh) => mesh.view().catalog.resolve(model),
            None => KeySpace::unknown(model),
        }
    }

    /// The tokenize stage: the prompt's keys in the model's key space (`Tokenizers::prompt_keys`).
    pub async fn prompt_keys(&self, req: &InferenceRequest) -> Result<PromptKeys, ApiError> {
        let space = self.key_space(&req.model);
        self.tokenizers.prompt_keys(req, &space).await
    }

    /// The mesh-wide block size peers and cells key prompts at.
    pub fn default_block_size(&self) -> u32 {
        self.s.default_block_size
    }

    /// Stops taking new requests; open ones finish. False when it was draining already.
    pub fn start_draining(&self) -> bool {
        let first = !self.draining.swap(true, Ordering::SeqCst);
        self.metrics.draining.set(1);
        if first {
            tracing::info!(open = self.open_requests(), "draining: new requests are refused from now on");
        }
        first
    }

    /// Takes requests again after a drain; false when it was not draining.
    pub fn stop_draining(&self) -> bool {
        let was = self.draining.swap(false, Ordering::SeqCst);
        self.metrics.draining.set(0);
        if was {
            tracing::info!("drain ended: taking requests again");
        }
        was
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The answer to a request that arrives while draining: a 503 with code `draining`, marked
    /// as never accepted (a peer's origin retries elsewhere), with the hints clients and load
    /// balancers act on: `x-should-retry` (OpenAI's SDKs) and `connection: close`, so the next
    /// attempt opens a connection that can land on another node.
    pub fn refuse_draining(&self, ctx: &RequestCtx) -> Response {
        let e =
            ApiError::unavailable(format!("Node {} is draining; send the request to another node.", self.node_name))
                .with_code("draining");
        let mut r = not_accepted(reply_error(&self.metrics, ctx, &e));
        r.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }

    /// Requests from peers being served now (graceful shutdown waits for them).
    pub fn peer_requests(&self) -> u32 {
        self.peer_requests.load(Ordering::Relaxed)
    }

    /// Requests this node has open on engines, its own and its peers'.
    pub fn open_requests(&self) -> u32 {
        let local: u32 = self.engines.engines.iter().map(|e| e.in_flight.load(Ordering::Relaxed)).sum();
        local + self.mesh().map(|m| m.in_flight_total()).unwrap_or(0) + self.peer_requests()
    }

    /// The `pick` and `forward` stages, retried: the engine with the lowest predicted time to
    /// first token among those not tried yet gets the request; a failure before the client saw
    /// anything sends it to the next one (at most `max_attempts`).
    pub(crate) async fn pick_and_forward(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        req: &InferenceRequest,
        body: &Bytes,
        prompt: &mut PromptKeys,
        scope: Scope<'_>,
    ) -> Response {
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<ApiError> = None;
        let session = ctx.session.as_deref().or(req.session.as_deref());
        for attempt in 0..self.s.max_attempts {
            let picked = match self.pick(&req.model, prompt, scope, &tried, attempt == 0 && req.may_split(), session) {
                Ok(p) => p,
                Err(e) => {
                    // After a failed attempt, the failure says more than "nothing left".
                    let e = if attempt > 0 { last_error.take().unwrap_or(e) } else { e };
                    return not_accepted(reply_error(&self.metrics, ctx, &e));
                }
            };
            if let Some(split) = &picked.split {
                match self.serve_split(ctx, req, body, split).await {
                    Ok(resp) => {
                        self.remember_route(&split.prefill, prompt);
                        self.remember_route(&split.decode, prompt);
                        return resp;
                    }
                    Err(reason) => {
                        // Serve it whole instead: nothing has reached the client yet.
                        tracing::warn!(%reason, prefill = %split.prefill.key(), decode = %split.decode.key(), "disaggregated serving failed; serving whole");
                        self.metrics.pd_fallbacks.with_label_values(&[reason]).inc();
                    }
                }
            }
            let expect = expectation(req, prompt, &picked);
            let target = picked.target;
            tried.push(target.key());
            let reason = if attempt > 0 { RouteReason::Retry } else { picked.decision.reason() };
            let header = picked.decision.to_string();
            ctx.span.record("peer", target.key().as_str());
            ctx.span.record("reason", reason.as_str());
            ctx.span.record("route", header.as_str());
            self.metrics.route_decisions.with_label_values(&[reason.as_str()]).inc();
            let outcome = match &target {
                Target::Local(e) => self.forward_local(ctx, req.stream, body, e.clone(), &header, expect).await,
                Target::Remote(r) => {
                    // A session's engine was chosen here, by name; the peer must not re-choose.
                    let chooses = peer_chooses(r, &picked.decision) && session.is_none();
                    let ask = if chooses { PeerRequest::AnyEngine } else { PeerRequest::Engine(r.load.name.clone()) };
                    let mut head = ctx.peer_head(ask, &self.node_name, req.stream);
                    head.prompt = chooses.then(|| self.digest(r, prompt)).flatten();
                    head.prompt_tokens = prompt.known().then(|| u32::try_from(prompt.tokens).unwrap_or(u32::MAX));
                    // A peer that places the prompt among its engines checks the answer itself.
                    let expect = if chooses { None } else { expect };
                    self.forward_remote(ctx, head, body, r, &header, expect).await
                }
            };
            match outcome {
                Ok(resp) => {
                    if resp.status().is_success() {
                        self.remember_route(&target, prompt);
                    }
                    return resp;
                }
                Err(Retry { error, reason }) => {
                    tracing::warn!(target = %target.key(), %reason, error = %error, "failed before answering; trying another engine");
                    self.metrics.retries.with_label_values(&[reason]).inc();
                    last_error = Some(error);
                }
            }
        }
        let e = last_error.unwrap_or_else(|| ApiError::unavailable("No engine could take the request."));
        not_accepted(reply_error(&self.metrics, ctx, &e))
    }

    /// The block keys a peer needs to choose among its engines, at that engine's block size.
    fn digest(&self, r: &PeerEngine, prompt: &mut PromptKeys) -> Option<kvmesh_transport::PromptDigest> {
        let bs = r.load.block_size.unwrap_or(self.s.default_block_size);
        let tokens = prompt.tokens as u32;
        kvmesh_transport::PromptDigest::new(tokens, bs, prompt.keys(bs))
    }
}

/// What the chosen engine should report of a prompt this node tokenized exactly (`check`).
fn expectation(req: &InferenceRequest, prompt: &PromptKeys, picked: &pick::Picked) -> Option<check::Expected> {
    // Only chat and completions report `usage.prompt_tokens_details` as `check` reads it; and a
    // prompt with media expands in the engine, so its length is not this node's.
    if !prompt.known() || req.media || !req.endpoint.reports_usage_on_request() {
        return None;
    }
    let block_size = picked.block_size;
    let matched = match &picked.decision {
        // Offloaded blocks the engine loads count as cached in its usage, as GPU hits do.
        RouteDecision::Whole { matched_blocks, .. } => *matched_blocks + picked.offloaded_blocks,
        RouteDecision::RoundRobin { .. } => 0,
        _ => return None,
    };
    Some(check::Expected {
        model: req.model.clone(),
        prompt_tokens: prompt.tokens,
        cached_tokens: kvmesh_policy::candidates::expected_cached_tokens(prompt.tokens, matched, block_size),
    })
}

/// With several engines on the peer, its exact indexes know better which one holds the prefix
/// than our node-level summary: it chooses, from the block keys sent along.
fn peer_chooses(remote: &PeerEngine, decision: &RouteDecision) -> bool {
    remote.node_engines > 1 && decision.reason() == RouteReason::Prefix
}
