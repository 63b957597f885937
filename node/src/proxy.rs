//! The request pipeline: validate, choose an engine (this node's or a peer's), forward the
//! client's bytes, and relay the answer, streaming chunks through as they arrive.
//!
//! Failure rules: anything that fails before the client has seen a byte may be retried on
//! another engine (bounded by `max_attempts`); once a stream has started, a failure ends it with
//! an OpenAI error event and `[DONE]`, never a silent cut or a hang (every wait has a timeout).
//! A request forwarded by a peer is served by this node's own engines only, so a request
//! crosses the mesh at most once. With cells, the origin asks a prompt's home node in another
//! cell where to send it and forwards it there, so it still crosses once; only a request that
//! home node splits between prefill and decode is relayed to it whole and routed there again
//! (`proxy::cells`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use kvmesh_policy::blocks;
use kvmesh_policy::cells::{CellSettings, Placements};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::InferenceRequest;
use kvmesh_policy::request::{self, Endpoint};
use kvmesh_policy::route::{self, unreported};
use kvmesh_policy::route_history::RoutedKeys;
use kvmesh_policy::score::{Estimate, ScoreWeights};
use kvmesh_transport::endpoint::respond;
use kvmesh_transport::{IncomingRequest, PromptDigest, RequestHead, ResponseHead, TransportError};
use tracing::Instrument;

use crate::config::{Config, RoutingPolicy};
use crate::engine::{Engine, EngineSet, InFlight};
use crate::guard::Guard;
use crate::mesh::{Mesh, RemoteEngine};
use crate::metrics::NodeMetrics;
use crate::tokens::Tokenizers;

mod cells;

/// RTT assumed for a peer with no open connection yet (QUIC has not measured it).
const UNMEASURED_PEER_RTT_MS: f64 = 1.0;

pub struct Pipeline {
    pub node_name: String,
    pub engines: Arc<EngineSet>,
    pub metrics: Arc<NodeMetrics>,
    mesh: OnceLock<Arc<Mesh>>,
    guard: OnceLock<Arc<Guard>>,
    client: reqwest::Client,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    max_attempts: u32,
    max_body_bytes: usize,
    tokenizers: Tokenizers,
    weights: ScoreWeights,
    default_block_size: u32,
    peer_requests: std::sync::atomic::AtomicU32,
    routing: RoutingPolicy,
    rr_next: std::sync::atomic::AtomicU32,
    /// Block keys this node routed to each peer's engine, by `RemoteEngine::key`: evidence of a
    /// prefix there before the peer's summary shows it, and for approximate-mode prompts.
    remote_routed: std::sync::Mutex<std::collections::HashMap<String, RoutedKeys>>,
    route_history_ttl_ms: u64,
    route_history_max_keys: usize,
    /// Set by a drain or a shutdown: new requests, clients' and peers', get a retryable 503.
    draining: std::sync::atomic::AtomicBool,
    pd: kvmesh_policy::pd::PdSettings,
    cells: CellSettings,
    /// Requests this node placed on its cell peers' engines for other cells' origins, by
    /// `RemoteEngine::key` (`proxy::cells`).
    placements: std::sync::Mutex<std::collections::HashMap<String, Placements>>,
}

/// A request split between a prefill and a decode engine (`policy::pd`).
struct Split {
    prefill: Target,
    decode: Target,
    route: Route,
}

pub fn error_response(e: &ApiError) -> Response {
    (e.status, [(header::CONTENT_TYPE, "application/json")], e.to_json()).into_response()
}

/// Largest non-streamed answer relayed; a completion JSON is far smaller.
const MAX_BUFFERED_RESPONSE: usize = 64 * 1024 * 1024;

/// Where a request may go.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// Any engine in the mesh (a client's request).
    Mesh,
    /// This node's engines only, preferring the named one (a peer's forwarded request).
    Local(&'a str),
    /// Any engine in this node's cell, preferring this node's: a request relayed from another
    /// cell to its home node (`policy::cells`). Never relayed again.
    Cell,
}

#[derive(Clone)]
enum Target {
    Local(Arc<Engine>),
    Remote(RemoteEngine),
}

/// What the router knows of a prompt: its ids (tokenized here) or the block keys a peer sent;
/// failing both, approximate keys over its text (a model with no tokenizer here).
#[derive(Default)]
struct PromptKeys {
    tokens: usize,
    ids: Option<Vec<u32>>,
    given: Option<(u32, Vec<u64>)>,
    approx: Option<Vec<u64>>,
}

impl PromptKeys {
    fn known(&self) -> bool {
        self.ids.is_some() || self.given.is_some()
    }

    /// Chained block keys at block size `bs` (empty when unknown at that size).
    fn keys(&self, seed: u64, bs: u32) -> Vec<u64> {
        match (&self.given, &self.ids) {
            (Some((given_bs, keys)), _) if *given_bs == bs => keys.clone(),
            (_, Some(ids)) => blocks::block_keys(seed, ids, bs as usize),
            _ => Vec::new(),
        }
    }
}

/// Approximate keys of a prompt's text (roles and contents in order), and its length in bytes.
fn approx_keys(req: &InferenceRequest, seed: u64) -> (Vec<u64>, usize) {
    use kvmesh_policy::request::Prompt;
    let parts: Vec<&str> = match &req.prompt {
        Prompt::Chat(messages) => messages.iter().flat_map(|m| [m.role.as_str(), m.content.as_str()]).collect(),
        Prompt::Text(text) => vec![text.as_str()],
        Prompt::TokenIds(_) => Vec::new(),
    };
    let bytes = parts.iter().map(|p| p.len()).sum();
    (blocks::text_chunk_keys(seed, &parts), bytes)
}

/// With several engines on the peer, its exact indexes know better which one holds the prefix
/// than our node-level summary: it chooses, from the block keys sent along.
fn peer_chooses(remote: &RemoteEngine, route: &Route) -> bool {
    remote.node_engines > 1 && route.reason == "prefix"
}

/// Why a request went where it went, for the `x-kvmesh-route` header, the span and metrics.
struct Route {
    header: String,
    reason: &'static str,
}

impl Target {
    /// `node/engine`, as in `x-kvmesh-served-by`.
    fn label(&self, node: &str) -> String {
        match self {
            Target::Local(e) => format!("{node}/{}", e.name),
            Target::Remote(r) => r.key(),
        }
    }

    fn key(&self) -> String {
        match self {
            Target::Local(e) => format!("local/{}", e.name),
            Target::Remote(r) => r.key(),
        }
    }
}

impl Pipeline {
    pub fn new(
        cfg: &Config,
        engines: Arc<EngineSet>,
        metrics: Arc<NodeMetrics>,
        client: reqwest::Client,
        tokenizers: Tokenizers,
    ) -> Self {
        Self {
            tokenizers,
            peer_requests: std::sync::atomic::AtomicU32::new(0),
            routing: cfg.routing,
            rr_next: std::sync::atomic::AtomicU32::new(rand::random()),
            remote_routed: Default::default(),
            route_history_ttl_ms: cfg.route_history_ttl_s * 1000,
            route_history_max_keys: cfg.route_history_max_keys,
            pd: cfg.pd.clone(),
            cells: cfg.cells.routing.clone(),
            placements: Default::default(),
            weights: cfg.score.clone(),
            default_block_size: cfg.default_block_size,
            node_name: cfg.node_name.clone(),
            engines,
            metrics,
            mesh: OnceLock::new(),
            guard: OnceLock::new(),
            client,
            first_byte_timeout: Config::ms(cfg.engine_first_byte_timeout_ms),
            idle_timeout: Config::ms(cfg.engine_idle_timeout_ms),
            max_attempts: cfg.max_attempts,
            max_body_bytes: cfg.max_body_bytes,
            draining: std::sync::atomic::AtomicBool::new(false),
        }
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

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The answer to a request that arrives while draining: a 503 with code `draining`, marked
    /// as never accepted (a peer's origin retries elsewhere), with the hints clients and load
    /// balancers act on: `x-should-retry` (OpenAI's SDKs) and `connection: close`, so the next
    /// attempt opens a connection that can land on another node.
    fn refuse_draining(&self, endpoint: Endpoint) -> Response {
        let e =
            ApiError::unavailable(format!("Node {} is draining; send the request to another node.", self.node_name))
                .with_code("draining");
        let mut r = not_accepted(self.reply_error(endpoint, "", &e, Instant::now()));
        r.headers_mut().insert("x-should-retry", HeaderValue::from_static("true"));
        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }

    pub fn set_mesh(&self, mesh: Arc<Mesh>) {
        let _ = self.mesh.set(mesh);
    }

    pub fn mesh(&self) -> Option<&Arc<Mesh>> {
        self.mesh.get()
    }

    /// Auth, limits, guardrails and audit for client requests (see `guard`).
    pub fn set_guard(&self, guard: Arc<Guard>) {
        let _ = self.guard.set(guard);
    }

    pub fn guard(&self) -> Option<&Arc<Guard>> {
        self.guard.get()
    }

    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tokenizers
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    /// A client's request: may be served anywhere in the mesh.
    pub async fn handle(self: &Arc<Self>, endpoint: Endpoint, headers: &HeaderMap, body: Bytes) -> Response {
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        if self.is_draining() {
            // Before the guard: refused like a closed port, so it leaves no audit record.
            return self.refuse_draining(endpoint);
        }
        let span = request_span(&request_id, &self.node_name, endpoint);
        match self.guard() {
            Some(g) => g.clone().serve(self, endpoint, headers, &request_id, body).instrument(span).await,
            None => self.dispatch(endpoint, &request_id, body, Scope::Mesh, None).instrument(span).await,
        }
    }

    /// A request a peer forwarded: served by this node's engines, answered on the QUIC stream.
    pub async fn serve_peer(self: Arc<Self>, mut req: IncomingRequest) {
        if let Some(query) = req.head.place.take() {
            return self.serve_placement(req, query).await;
        }
        self.peer_requests.fetch_add(1, Ordering::Relaxed);
        let _done = DecrementOnDrop(&self.peer_requests);
        let endpoint = match req.head.path.as_str() {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            _ => None,
        };
        let span = request_span(&req.head.request_id, &req.head.origin, endpoint.unwrap_or(Endpoint::Chat));
        let send = req.respond;
        let resp = match endpoint {
            Some(ep) if self.is_draining() => self.refuse_draining(ep),
            Some(ep) => {
                // The origin may give up (its client left, its timeout fired) before the engine
                // answers: stop then, so the engine is not kept working for nobody.
                let scope = if req.head.relay { Scope::Cell } else { Scope::Local(&req.head.engine) };
                let work = self.dispatch(ep, &req.head.request_id, req.body, scope, req.head.prompt.as_ref());
                tokio::select! {
                    r = work.instrument(span) => r,
                    _ = send.stopped() => {
                        tracing::debug!(peer = %req.peer, "origin stopped waiting; request dropped");
                        return;
                    }
                }
            }
            None => error_response(&ApiError::not_found(format!("No route {}", req.head.path))),
        };
        let head = ResponseHead {
            status: resp.status().as_u16(),
            content_type: header_str(resp.headers(), header::CONTENT_TYPE.as_str())
                .unwrap_or("application/json")
                .to_owned(),
            served_by: header_str(resp.headers(), "x-kvmesh-served-by").unwrap_or(&self.node_name).to_owned(),
            retryable: resp.extensions().get::<NotAccepted>().is_some(),
        };
        let io = self.mesh().map(|m| m.endpoint.io_timeout()).unwrap_or(Duration::from_secs(5));
        let body = resp.into_body().into_data_stream();
        // An error here means the origin stopped reading (its client left): dropping the body
        // closes the engine connection, and the engine aborts the request.
        if let Err(e) = respond(send, &head, body, io).await {
            tracing::debug!(peer = %req.peer, error = %e, "peer stopped reading the response");
        }
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

    async fn dispatch(
        self: &Arc<Self>,
        endpoint: Endpoint,
        request_id: &str,
        body: Bytes,
        scope: Scope<'_>,
        digest: Option<&PromptDigest>,
    ) -> Response {
        let started = Instant::now();
        let req = match request::parse(endpoint, &body) {
            Ok(r) => r,
            Err(e) => return self.reply_error(endpoint, "", &e, started),
        };
        tracing::Span::current().record("model", req.model.as_str());
        // Token ids only matter when there is a choice to make, and are made once per request:
        // a peer that leaves the choice to this node sends the block keys it computed.
        let prompt = match (scope, digest.map(|d| (d, d.keys()))) {
            (Scope::Local("") | Scope::Cell, Some((d, Ok(keys)))) => {
                let label = if self.tokenizers.has(&req.model) { req.model.as_str() } else { "other" };
                self.metrics.tokenize_requests.with_label_values(&[label, "from_peer"]).inc();
                PromptKeys { tokens: d.tokens as usize, given: Some((d.block_size, keys)), ..Default::default() }
            }
            (Scope::Mesh | Scope::Local("") | Scope::Cell, _) => match self.tokenizers.prompt_ids(&req).await {
                Ok(ids) => PromptKeys { tokens: ids.as_ref().map_or(0, Vec::len), ids, ..Default::default() },
                Err(e) => {
                    let resp = self.reply_error(endpoint, &req.model, &e, started);
                    // An overloaded tokenizer refused before any engine saw it: the origin may
                    // try elsewhere.
                    return if e.status == StatusCode::SERVICE_UNAVAILABLE { not_accepted(resp) } else { resp };
                }
            },
            (Scope::Local(_), _) => PromptKeys::default(),
        };
        self.route(endpoint, request_id, &req, &body, prompt, scope, started).await
    }

    /// A client's request the guard admitted (parsed, and tokenized when it had to count:
    /// `tokenized` is then `Some`, holding the ids or `None` for a model with no tokenizer).
    pub(crate) async fn route_client(
        self: &Arc<Self>,
        endpoint: Endpoint,
        request_id: &str,
        req: &InferenceRequest,
        body: &Bytes,
        tokenized: Option<Option<Vec<u32>>>,
    ) -> Response {
        let started = Instant::now();
        let prompt = match tokenized {
            Some(ids) => PromptKeys { tokens: ids.as_ref().map_or(0, Vec::len), ids, ..Default::default() },
            None => match self.tokenizers.prompt_ids(req).await {
                Ok(ids) => PromptKeys { tokens: ids.as_ref().map_or(0, Vec::len), ids, ..Default::default() },
                Err(e) => return self.reply_error(endpoint, &req.model, &e, started),
            },
        };
        self.route(endpoint, request_id, req, body, prompt, Scope::Mesh, started).await
    }

    /// Chooses, forwards and retries: everything after parsing and tokenizing.
    #[allow(clippy::too_many_arguments)]
    async fn route(
        self: &Arc<Self>,
        endpoint: Endpoint,
        request_id: &str,
        req: &InferenceRequest,
        body: &Bytes,
        prompt: PromptKeys,
        scope: Scope<'_>,
        started: Instant,
    ) -> Response {
        let seed = blocks::chain_seed(&req.model, None, req.cache_salt.as_deref());
        let mut prompt = prompt;
        if !prompt.known() && matches!(scope, Scope::Mesh | Scope::Local("") | Scope::Cell) {
            let (keys, bytes) = approx_keys(req, seed);
            prompt.tokens = bytes / 4;
            prompt.approx = Some(keys);
        }
        if matches!(scope, Scope::Mesh) {
            if let Some(resp) =
                self.send_to_home_cell(endpoint, request_id, req, body, &mut prompt, seed, started).await
            {
                return resp;
            }
        }
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<ApiError> = None;
        for attempt in 0..self.max_attempts {
            let (target, route, split) = match self.pick(&req.model, &prompt, seed, scope, &tried, attempt == 0) {
                Ok(t) => t,
                Err(e) => {
                    // After a failed attempt, the failure says more than "nothing left".
                    let e = if attempt > 0 { last_error.take().unwrap_or(e) } else { e };
                    return not_accepted(self.reply_error(endpoint, &req.model, &e, started));
                }
            };
            if let Some(split) = split {
                match self.serve_split(endpoint, request_id, req, body, &split, started).await {
                    Ok(resp) => {
                        self.remember_route(&split.prefill, &prompt, seed);
                        self.remember_route(&split.decode, &prompt, seed);
                        return resp;
                    }
                    Err(reason) => {
                        // Serve it whole instead: nothing has reached the client yet.
                        tracing::warn!(%reason, prefill = %split.prefill.key(), decode = %split.decode.key(), "disaggregated serving failed; serving whole");
                        self.metrics.pd_fallbacks.with_label_values(&[reason]).inc();
                    }
                }
            }
            tried.push(target.key());
            let span = tracing::Span::current();
            span.record("peer", target.key().as_str());
            let reason = if attempt > 0 { "retry" } else { route.reason };
            span.record("reason", reason);
            span.record("route", route.header.as_str());
            self.metrics.route_decisions.with_label_values(&[reason]).inc();
            let outcome = match &target {
                Target::Local(e) => {
                    self.forward_local(endpoint, &req.model, req.stream, request_id, body, e.clone(), &route, started)
                        .await
                }
                Target::Remote(r) => {
                    let digest = peer_chooses(r, &route)
                        .then(|| {
                            let bs = r.engine.block_size.unwrap_or(self.default_block_size);
                            PromptDigest::new(prompt.tokens as u32, bs, &prompt.keys(seed, bs))
                        })
                        .flatten();
                    let head = RequestHead {
                        path: endpoint.path().to_owned(),
                        request_id: request_id.to_owned(),
                        origin: self.node_name.clone(),
                        engine: if peer_chooses(r, &route) { String::new() } else { r.engine.name.clone() },
                        stream: req.stream,
                        prompt: digest,
                        ..Default::default()
                    };
                    self.forward_remote(endpoint, &req.model, head, body, r, &route, started).await
                }
            };
            match outcome {
                Ok(resp) => {
                    if resp.status().is_success() {
                        self.remember_route(&target, &prompt, seed);
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
        not_accepted(self.reply_error(endpoint, &req.model, &e, started))
    }

    /// Answers with an OpenAI error, counted and logged like every other answer.
    pub fn reply_error(&self, endpoint: Endpoint, model: &str, e: &ApiError, started: Instant) -> Response {
        tracing::info!(status = e.status.as_u16(), error = %e.message, "request rejected");
        // A model nobody serves is the client's free text: keep it out of metric labels.
        let model = if e.code.as_deref() == Some("model_not_found") { "unknown" } else { model };
        self.metrics.requests.with_label_values(&[endpoint.path(), model, e.status.as_str()]).inc();
        self.metrics.duration.with_label_values(&[endpoint.path(), "false"]).observe(started.elapsed().as_secs_f64());
        error_response(e)
    }

    /// The engine with the lowest predicted time to first token for this request, among those
    /// not tried yet: cached prefix (exact index for this node's engines), queue, KV pressure and
    /// network distance (`policy::score`).
    fn pick(
        &self,
        model: &str,
        prompt: &PromptKeys,
        seed: u64,
        scope: Scope<'_>,
        tried: &[String],
        may_split: bool,
    ) -> Result<(Target, Route, Option<Split>), ApiError> {
        let mut targets: Vec<Target> = Vec::new();
        let mut cands: Vec<Estimate> = Vec::new();
        let mut roles: Vec<kvmesh_policy::pd::Role> = Vec::new();
        let local: Vec<&Arc<Engine>> = match scope {
            Scope::Local(name) => {
                let named: Vec<_> = self
                    .engines
                    .engines
                    .iter()
                    .filter(|e| e.name == name && e.is_healthy() && e.serves(model))
                    .collect();
                if named.is_empty() {
                    self.engines.engines.iter().collect()
                } else {
                    named
                }
            }
            Scope::Mesh | Scope::Cell => self.engines.engines.iter().collect(),
        };
        // Keys are computed once per block size in use (engines normally share one).
        let mut keys_by_size: Vec<(u32, Vec<u64>)> = Vec::new();
        let mut keys_for = |bs: u32| -> Vec<u64> {
            if !prompt.known() {
                return Vec::new();
            }
            if let Some((_, k)) = keys_by_size.iter().find(|(b, _)| *b == bs) {
                return k.clone();
            }
            let k = prompt.keys(seed, bs);
            keys_by_size.push((bs, k.clone()));
            k
        };
        let mut known = false;
        let now = self.engines.now_ms();
        for e in local {
            let v = e.snapshot();
            let serves = v.models.iter().any(|m| m == model);
            known |= serves;
            let t = Target::Local(e.clone());
            let routed = |keys: &[u64]| e.routed.lock().map(|r| r.matched_blocks(keys, now)).unwrap_or(0);
            let (matched, bs) = if let Some(approx) = &prompt.approx {
                (routed(approx), blocks::APPROX_CHUNK_TOKENS)
            } else if e.kv_events.is_none() {
                // No KV events: what this node sent there recently is the best evidence.
                let bs = v.load.block_size.unwrap_or(self.default_block_size);
                (routed(&keys_for(bs)), bs)
            } else {
                match e.kv.index.read() {
                    // Mid-resync the index lacks the missed batches: count on no cached prefix
                    // until they are applied (or the index is dropped).
                    Ok(index) if e.kv.resyncing.load(Ordering::Relaxed) => {
                        (0, index.block_size().or(v.load.block_size).unwrap_or(self.default_block_size))
                    }
                    Ok(index) => {
                        let bs = index.block_size().or(v.load.block_size).unwrap_or(self.default_block_size);
                        (index.matched_blocks(&keys_for(bs)), bs)
                    }
                    Err(_) => (0, self.default_block_size),
                }
            };
            cands.push(Estimate {
                usable: v.healthy && serves && !tried.contains(&t.key()),
                rtt_ms: 0.0,
                running: v.load.running,
                waiting: v.load.waiting + unreported(e.in_flight.load(Ordering::Relaxed), v.load.running),
                kv_usage: v.load.kv_usage,
                matched_blocks: matched,
                block_size: bs,
            });
            roles.push(e.role);
            targets.push(t);
        }
        if let (Scope::Mesh | Scope::Cell, Some(mesh)) = (scope, self.mesh()) {
            for r in mesh.remote_engines() {
                let serves = r.engine.models.iter().any(|m| m == model);
                known |= serves;
                let rtt = mesh.endpoint.rtt(r.addr).map(|d| d.as_secs_f64() * 1000.0).unwrap_or(UNMEASURED_PEER_RTT_MS);
                // The peer's gossiped summary covers all its engines (a union): the match is
                // the node's, and the node itself picks the engine when it has several. What
                // this node routed there itself counts too, until the summary catches up.
                let (keys, bs) = match &prompt.approx {
                    Some(approx) => (approx.clone(), blocks::APPROX_CHUNK_TOKENS),
                    None => {
                        let bs = r.engine.block_size.unwrap_or(self.default_block_size);
                        (keys_for(bs), bs)
                    }
                };
                let key = r.key();
                let routed = match self.remote_routed.lock() {
                    Ok(m) => m.get(&key).map(|h| h.matched_blocks(&keys, now)).unwrap_or(0),
                    Err(_) => 0,
                };
                let matched = kvmesh_policy::summary::matched_blocks(&r.summary, &keys, r.summary_stride).max(routed);
                cands.push(Estimate {
                    usable: r.engine.healthy && serves && !tried.contains(&key),
                    rtt_ms: rtt,
                    running: r.engine.running as f64,
                    waiting: r.engine.waiting as f64
                        + unreported(mesh.in_flight_now(&key) + self.placed_now(&key), r.engine.running as f64),
                    kv_usage: r.engine.kv_usage as f64,
                    matched_blocks: matched,
                    block_size: bs,
                });
                roles.push(r.engine.role);
                targets.push(Target::Remote(r));
            }
        }
        if !known {
            return Err(ApiError::model_not_found(model));
        }
        let prompt_tokens = prompt.tokens;
        let mode = match self.routing {
            RoutingPolicy::Kvmesh => route::Mode::Kvmesh,
            RoutingPolicy::LeastLoad => route::Mode::LeastLoad,
            RoutingPolicy::RoundRobin => {
                // Baseline: the next usable engine in a fixed order, blind to load and cache.
                let mut order: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].usable).collect();
                order.sort_by_key(|&i| targets[i].label(&self.node_name));
                if order.is_empty() {
                    return Err(ApiError::unavailable(format!(
                        "No healthy engine serves `{model}` right now; retry later."
                    )));
                }
                let i = order[self.rr_next.fetch_add(1, Ordering::Relaxed) as usize % order.len()];
                let header = format!("engine={}; reason=round_robin", targets[i].label(&self.node_name));
                return Ok((targets.swap_remove(i), Route { header, reason: "round_robin" }, None));
            }
        };
        let rules = route::Rules { mode, weights: &self.weights, pd: &self.pd };
        // The home node of a relayed prompt keeps it on its own engine when no other is
        // clearly better, so that the prefix settles where the prompt's next requests arrive.
        let prefer = matches!(scope, Scope::Cell)
            .then(|| (0..cands.len()).find(|&i| cands[i].usable && matches!(targets[i], Target::Local(_))))
            .flatten();
        let route::Picked { choice, split } =
            route::pick(rules, prompt_tokens, &mut cands, &roles, may_split && prompt.known(), prefer, |n| {
                rand::random_range(0..n)
            })
            .ok_or_else(|| {
                ApiError::unavailable(format!("No healthy engine serves `{model}` right now; retry later."))
            })?;
        let split = split.map(|s| {
            let header = format!(
                "engine={}; prefill={}; prompt_tokens={prompt_tokens}; predicted_ms={:.1}; whole_ms={:.1}; reason=pd",
                targets[s.decode].label(&self.node_name),
                targets[s.prefill].label(&self.node_name),
                s.predicted_ms,
                s.whole_ms
            );
            Split {
                prefill: targets[s.prefill].clone(),
                decode: targets[s.decode].clone(),
                route: Route { header, reason: "pd" },
            }
        });
        let matched = cands[choice.index].matched_blocks;
        let mut header = format!(
            "engine={}; matched_blocks={matched}; prompt_tokens={prompt_tokens}; predicted_ms={:.1}",
            targets[choice.index].label(&self.node_name),
            choice.predicted_ms
        );
        if let Some((ru, ms)) = choice.runner_up {
            header.push_str(&format!("; runner_up={}@{ms:.1}", targets[ru].label(&self.node_name)));
        }
        let reason = if matched > 0 && prompt.approx.is_some() {
            "prefix_approx"
        } else if matched > 0 {
            "prefix"
        } else if prompt.known() {
            "load"
        } else {
            "load_no_tokenizer"
        };
        header.push_str(&format!("; reason={reason}"));
        Ok((targets.swap_remove(choice.index), Route { header, reason }, split))
    }

    /// Serves a request split in two (vLLM's NixlConnector flow, as llm-d's sidecar drives it):
    /// the prefill engine gets a copy with `do_remote_decode`, not streamed and one token long;
    /// its answer's `kv_transfer_params` go verbatim into the original request, which the decode
    /// engine serves and streams. `Err(reason)` means nothing reached the client, and the request
    /// can still be served whole.
    async fn serve_split(
        self: &Arc<Self>,
        endpoint: Endpoint,
        request_id: &str,
        req: &InferenceRequest,
        body: &Bytes,
        split: &Split,
        started: Instant,
    ) -> Result<Response, &'static str> {
        let Ok(serde_json::Value::Object(original)) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Err("body_not_object");
        };
        let mut prefill = original.clone();
        prefill.insert(
            "kv_transfer_params".into(),
            serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        );
        prefill.insert("stream".into(), false.into());
        prefill.remove("stream_options");
        prefill.insert("max_tokens".into(), 1.into());
        for k in ["max_completion_tokens", "min_tokens"] {
            if prefill.contains_key(k) {
                prefill.insert(k.into(), 1.into());
            }
        }
        let prefill_body = Bytes::from(serde_json::Value::Object(prefill).to_string());
        let prefill_id = format!("{request_id}-prefill");
        self.metrics.route_decisions.with_label_values(&["pd"]).inc();
        let answer = match self
            .forward_to(&split.prefill, endpoint, &req.model, false, &prefill_id, &prefill_body, &split.route, started)
            .await
        {
            Ok(resp) if resp.status().is_success() => resp,
            Ok(_) | Err(_) => return Err("prefill_failed"),
        };
        let bytes =
            axum::body::to_bytes(answer.into_body(), MAX_BUFFERED_RESPONSE).await.map_err(|_| "prefill_failed")?;
        let params = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|mut v| v.get_mut("kv_transfer_params").map(serde_json::Value::take))
            .filter(serde_json::Value::is_object)
            .ok_or("prefill_no_transfer_params")?;
        let mut decode = original;
        decode.insert("kv_transfer_params".into(), params);
        let decode_body = Bytes::from(serde_json::Value::Object(decode).to_string());
        tracing::Span::current().record("route", split.route.header.as_str());
        match self
            .forward_to(
                &split.decode,
                endpoint,
                &req.model,
                req.stream,
                request_id,
                &decode_body,
                &split.route,
                started,
            )
            .await
        {
            Ok(resp) if resp.extensions().get::<NotAccepted>().is_none() => Ok(resp),
            Ok(_) | Err(_) => Err("decode_failed"),
        }
    }

    /// One engine, local or a peer's, named explicitly.
    #[allow(clippy::too_many_arguments)]
    async fn forward_to(
        self: &Arc<Self>,
        target: &Target,
        endpoint: Endpoint,
        model: &str,
        stream: bool,
        request_id: &str,
        body: &Bytes,
        route: &Route,
        started: Instant,
    ) -> Result<Response, Retry> {
        match target {
            Target::Local(e) => {
                self.forward_local(endpoint, model, stream, request_id, body, e.clone(), route, started).await
            }
            Target::Remote(r) => {
                let head = RequestHead {
                    path: endpoint.path().to_owned(),
                    request_id: request_id.to_owned(),
                    origin: self.node_name.clone(),
                    engine: r.engine.name.clone(),
                    stream,
                    ..Default::default()
                };
                self.forward_remote(endpoint, model, head, body, r, route, started).await
            }
        }
    }

    /// Records where a served prompt went, for engines and peers whose caches this node cannot
    /// see exactly (engines with KV events are indexed exactly and need no record).
    fn remember_route(&self, target: &Target, prompt: &PromptKeys, seed: u64) {
        let now = self.engines.now_ms();
        match target {
            Target::Local(e) => {
                let keys = match &prompt.approx {
                    Some(approx) => approx.clone(),
                    None if e.kv_events.is_none() => {
                        prompt.keys(seed, e.snapshot().load.block_size.unwrap_or(self.default_block_size))
                    }
                    None => return,
                };
                if let Ok(mut r) = e.routed.lock() {
                    r.record(&keys, now);
                }
            }
            Target::Remote(r) => {
                let keys = match &prompt.approx {
                    Some(approx) => approx.clone(),
                    None => prompt.keys(seed, r.engine.block_size.unwrap_or(self.default_block_size)),
                };
                if keys.is_empty() {
                    return;
                }
                if let Ok(mut m) = self.remote_routed.lock() {
                    m.entry(r.key())
                        .or_insert_with(|| RoutedKeys::new(self.route_history_ttl_ms, self.route_history_max_keys))
                        .record(&keys, now);
                    // Engines of peers that left (or restarted under new names) would keep their
                    // histories forever: now and then, drop the ones with nothing live.
                    if m.len() > 64 && rand::random::<u8>() < 4 {
                        m.retain(|_, h| {
                            h.prune(now);
                            !h.is_empty()
                        });
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_local(
        self: &Arc<Self>,
        endpoint: Endpoint,
        model: &str,
        stream: bool,
        request_id: &str,
        body: &Bytes,
        engine: Arc<Engine>,
        route: &Route,
        started: Instant,
    ) -> Result<Response, Retry> {
        let in_flight = InFlight::new(engine.in_flight.clone());
        let mut rb = self
            .client
            .post(format!("{}{}", engine.url, endpoint.path()))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id)
            .body(body.clone());
        if let Some(k) = &engine.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = match tokio::time::timeout(self.first_byte_timeout, rb.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                engine.mark_down(&e.to_string());
                return Err(Retry {
                    error: ApiError::bad_gateway(format!("Engine {} could not be reached.", engine.name)),
                    reason: if e.is_connect() { "connect" } else { "send" },
                });
            }
            Err(_) => return Ok(self.first_byte_timed_out(endpoint, model, &engine.name, started)),
        };
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let upstream: ByteStream = resp.bytes_stream().map(|r| r.map_err(|e| e.to_string())).boxed();
        if is_retryable(status) {
            let text = read_small(upstream, self.idle_timeout).await;
            return Err(Retry {
                error: ApiError::unavailable(format!("Engine {} answered {status}: {}", engine.name, text.trim())),
                reason: "engine_unavailable",
            });
        }
        let served_by = format!("{}/{}", self.node_name, engine.name);
        let answer = Answer { status, content_type, served_by, stream, request_id, route: &route.header };
        self.relay_answer(endpoint, model, answer, upstream, in_flight, started).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward_remote(
        self: &Arc<Self>,
        endpoint: Endpoint,
        model: &str,
        head: RequestHead,
        body: &Bytes,
        remote: &RemoteEngine,
        route: &Route,
        started: Instant,
    ) -> Result<Response, Retry> {
        let Some(mesh) = self.mesh() else {
            return Err(Retry { error: ApiError::unavailable("This node is not in a mesh."), reason: "no_mesh" });
        };
        let in_flight = InFlight::new(mesh.in_flight(&remote.key()));
        let (rhead, recv) = match mesh.endpoint.request(remote.addr, &head, body, self.first_byte_timeout).await {
            Ok(r) => r,
            Err(TransportError::Timeout { what: "response head", .. }) => {
                return Ok(self.first_byte_timed_out(endpoint, model, &remote.key(), started));
            }
            Err(e) => {
                mesh.suspect(&remote.node_id);
                return Err(Retry {
                    error: ApiError::bad_gateway(format!("Peer {} could not be reached: {e}", remote.node_id)),
                    reason: "peer",
                });
            }
        };
        let status = StatusCode::from_u16(rhead.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let upstream = quic_body(recv);
        // Only failures from before any engine accepted the request: anything later might
        // have run (or still run) there, and must not run twice.
        if rhead.retryable {
            let text = read_small(upstream, self.idle_timeout).await;
            return Err(Retry {
                error: ApiError::unavailable(format!("Peer {} answered {status}: {}", remote.node_id, text.trim())),
                reason: "peer_unavailable",
            });
        }
        let answer = Answer {
            status,
            content_type: Some(rhead.content_type),
            served_by: rhead.served_by,
            stream: head.stream,
            request_id: &head.request_id,
            route: &route.header,
        };
        let relayed = self.relay_answer(endpoint, model, answer, upstream, in_flight, started).await;
        if relayed.is_err() {
            mesh.suspect(&remote.node_id);
        }
        relayed
    }

    fn first_byte_timed_out(&self, endpoint: Endpoint, model: &str, target: &str, started: Instant) -> Response {
        // The engine may still be working on it; another engine would double the work, and
        // the client has waited long enough already.
        let e = ApiError::gateway_timeout(format!(
            "{target} did not answer within {} ms.",
            self.first_byte_timeout.as_millis()
        ));
        self.reply_error(endpoint, model, &e, started)
    }

    /// Turns an engine's (or peer's) answer into the client's response. A stream is held until
    /// its first chunk arrives, so a stream that dies before sending anything can still be
    /// retried elsewhere; then it passes through. Anything else is buffered, so a failure inside
    /// it still becomes a clean error.
    async fn relay_answer(
        self: &Arc<Self>,
        endpoint: Endpoint,
        model: &str,
        a: Answer<'_>,
        mut upstream: ByteStream,
        in_flight: InFlight,
        started: Instant,
    ) -> Result<Response, Retry> {
        let ep = endpoint.path();
        let streaming = a.stream && a.status.is_success();
        let first = if streaming {
            match tokio::time::timeout(self.first_byte_timeout, upstream.next()).await {
                Ok(Some(Ok(chunk))) => Some(chunk),
                Ok(Some(Err(e))) => {
                    return Err(Retry {
                        error: ApiError::bad_gateway(format!("{} failed before streaming: {e}", a.served_by)),
                        reason: "stream_failed_before_first_chunk",
                    })
                }
                Ok(None) => {
                    return Err(Retry {
                        error: ApiError::bad_gateway(format!("{} ended the stream before any data.", a.served_by)),
                        reason: "stream_failed_before_first_chunk",
                    })
                }
                Err(_) => return Ok(self.first_byte_timed_out(endpoint, model, &a.served_by, started)),
            }
        } else {
            None
        };
        self.metrics.requests.with_label_values(&[ep, model, a.status.as_str()]).inc();
        let served_by = HeaderValue::from_str(&a.served_by).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let content_type = a.content_type.unwrap_or_else(|| "application/json".into());
        let builder = Response::builder()
            .status(a.status)
            .header(header::CONTENT_TYPE, content_type)
            .header("x-kvmesh-served-by", served_by)
            .header("x-request-id", a.request_id);
        let builder = match HeaderValue::from_str(a.route) {
            Ok(v) if !a.route.is_empty() => builder.header("x-kvmesh-route", v),
            _ => builder,
        };
        if let Some(first) = first {
            let ttft = started.elapsed().as_secs_f64();
            self.metrics.ttfb.with_label_values(&[ep, "true"]).observe(ttft);
            self.metrics.recent_ttft.record(ttft);
            let upstream = futures::stream::iter([Ok(first)]).chain(upstream).boxed();
            let relay = relay(self.clone(), upstream, in_flight, started, ep, self.idle_timeout);
            return Ok(builder
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(relay))
                .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))));
        }
        let body = match read_limited(upstream, self.idle_timeout, MAX_BUFFERED_RESPONSE).await {
            Ok(b) => b,
            Err(why) => {
                return Ok(error_response(&ApiError::bad_gateway(format!(
                    "{} failed while answering: {why}",
                    a.served_by
                ))))
            }
        };
        drop(in_flight);
        let label = if a.stream { "true" } else { "false" };
        self.metrics.ttfb.with_label_values(&[ep, label]).observe(started.elapsed().as_secs_f64());
        self.metrics.duration.with_label_values(&[ep, label]).observe(started.elapsed().as_secs_f64());
        self.metrics.recent_e2e.record(started.elapsed().as_secs_f64());
        Ok(builder
            .body(Body::from(body))
            .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))))
    }
}

/// This node's in-flight requests on an engine that its last report cannot account for as
/// running: they are queued there, or sent after the report.
/// Marks an error answered before any engine accepted the request (safe to send elsewhere).
#[derive(Clone, Copy)]
struct NotAccepted;

fn not_accepted(mut r: Response) -> Response {
    r.extensions_mut().insert(NotAccepted);
    r
}

struct DecrementOnDrop<'a>(&'a std::sync::atomic::AtomicU32);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn request_span(request_id: &str, origin: &str, endpoint: Endpoint) -> tracing::Span {
    tracing::info_span!(
        "request",
        request_id = %request_id,
        origin = %origin,
        endpoint = endpoint.path(),
        model = tracing::field::Empty,
        peer = tracing::field::Empty,
        reason = tracing::field::Empty,
        route = tracing::field::Empty,
    )
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

/// An answer's head, wherever it came from.
struct Answer<'a> {
    status: StatusCode,
    content_type: Option<String>,
    served_by: String,
    stream: bool,
    request_id: &'a str,
    /// `x-kvmesh-route`: the decision and what explains it (empty for peer-served requests).
    route: &'a str,
}

/// A failure before the client saw anything: the pipeline may try another engine.
struct Retry {
    error: ApiError,
    reason: &'static str,
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// A QUIC response body as a byte stream; a reset or lost connection is an error item.
fn quic_body(recv: quinn::RecvStream) -> ByteStream {
    futures::stream::unfold(Some(recv), |state| async move {
        let mut r = state?;
        match r.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => Some((Ok(c.bytes), Some(r))),
            Ok(None) => None,
            Err(e) => Some((Err(e.to_string()), None)),
        }
    })
    .boxed()
}

async fn read_small(s: ByteStream, timeout: Duration) -> String {
    match read_limited(s, timeout.min(Duration::from_secs(5)), 4096).await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned(),
        Err(_) => String::new(),
    }
}

async fn read_limited(mut s: ByteStream, idle: Duration, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(idle, s.next()).await {
            Err(_) => return Err(format!("no data for {} ms", idle.as_millis())),
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Err(e))) => return Err(e),
            Ok(Some(Ok(chunk))) => {
                if out.len() + chunk.len() > limit {
                    return Err(format!("answer larger than {limit} bytes"));
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
}

struct RelayState {
    pipeline: Arc<Pipeline>,
    upstream: ByteStream,
    _in_flight: InFlight,
    started: Instant,
    endpoint: &'static str,
    idle: Duration,
    finished: bool,
    /// Whether what was sent so far ends on an event boundary (`\n\n`).
    clean: bool,
    /// When the previous chunk went out: the gap to the next one is an inter-token latency.
    last_chunk: Option<Instant>,
}

/// Relays an SSE stream chunk by chunk. Dropping it (client gone) drops the upstream, which
/// makes the engine (or the peer, then its engine) abort the request.
fn relay(
    pipeline: Arc<Pipeline>,
    upstream: ByteStream,
    in_flight: InFlight,
    started: Instant,
    endpoint: &'static str,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let state = RelayState {
        pipeline,
        upstream,
        _in_flight: in_flight,
        started,
        endpoint,
        idle,
        finished: false,
        clean: true,
        last_chunk: None,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let item = match tokio::time::timeout(s.idle, s.upstream.next()).await {
            Ok(Some(Ok(chunk))) => {
                let now = Instant::now();
                // `[DONE]` follows the last token at once; it is not a token.
                if let (Some(prev), false) = (s.last_chunk, chunk.starts_with(b"data: [DONE]")) {
                    let gap = now.duration_since(prev).as_secs_f64();
                    s.pipeline.metrics.inter_token.with_label_values(&[s.endpoint]).observe(gap);
                    s.pipeline.metrics.recent_itl.record(gap);
                }
                s.last_chunk = Some(now);
                chunk
            }
            Ok(None) => {
                let e2e = s.started.elapsed().as_secs_f64();
                s.pipeline.metrics.duration.with_label_values(&[s.endpoint, "true"]).observe(e2e);
                s.pipeline.metrics.recent_e2e.record(e2e);
                return None;
            }
            Ok(Some(Err(e))) => {
                s.finished = true;
                s.pipeline.metrics.stream_errors.with_label_values(&["upstream"]).inc();
                tracing::warn!(error = %e, "stream failed mid-response");
                stream_error(&format!("The engine failed mid-stream: {e}"), s.clean)
            }
            Err(_) => {
                s.finished = true;
                s.pipeline.metrics.stream_errors.with_label_values(&["idle_timeout"]).inc();
                stream_error(&format!("The engine sent nothing for {} ms.", s.idle.as_millis()), s.clean)
            }
        };
        s.clean = item.ends_with(b"\n\n");
        Some((Ok(item), s))
    })
}

/// The end of a stream that failed after it started: an error event, then `[DONE]`.
fn stream_error(message: &str, clean: bool) -> Bytes {
    let e = ApiError::bad_gateway(message);
    // A cut inside an event is closed first so the error arrives as an event of its own.
    let sep = if clean { "" } else { "\n\n" };
    Bytes::from(format!("{sep}{}data: [DONE]\n\n", e.to_sse_event()))
}
