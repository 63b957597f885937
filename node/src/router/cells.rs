//! Requests whose prompt has its home in another cell (`policy::cells`, ARCHITECTURE.md
//! *Cells*).
//!
//! The origin asks the prompt's home node there where the request should go (a placement: the
//! block keys out, an engine back) and forwards the request itself. The prompt then crosses the
//! mesh once, as in a flat mesh, instead of twice through the home node; and the home node,
//! which places every request of that prefix from every cell, keeps them on its cell's engines
//! with its own fresh view: its exact index and in-flight counts for its engine, its cell's
//! gossip, and the placements it made itself (counted as in flight for
//! `cells.routing.placement_lease_ms`, since it never sees those requests end).
//!
//! A home node that would split the request between a prefill and a decode engine asks for the
//! whole request instead, and serves it as a relay (`RequestHead::relay`): one forward cannot
//! say "prefill there, decode here". So does a home node that cannot answer a placement (one
//! of an older version answers the empty body with a 400). A placement that fails outright (the
//! home node unreachable, draining, or gone quiet) leaves the request to this node's own cell.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::Response;
use kvmesh_policy::candidates::PromptKeys;
use kvmesh_policy::cells::{self, CellLoad};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::InferenceRequest;
use kvmesh_policy::route::{RouteDecision, RouteReason};
use kvmesh_transport::endpoint::respond;
use kvmesh_transport::frame::MAX_PLACEMENT;
use kvmesh_transport::{IncomingRequest, PeerRequest, PlaceQuery, Placement, PromptDigest, RequestHead, ResponseHead};

use super::relay::{quic_body, read_limited};
use super::{Retry, Router, Scope, Target};
use crate::ctx::RequestCtx;
use crate::mesh::Mesh;

/// Longest wait for a placement's answer once the query is sent. A home node answers from
/// memory, without waiting on an engine, so a slower answer means it is overloaded or gone:
/// the request is better routed in this cell than held longer.
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(1);

/// What came of asking a home node for a placement, when it gave none.
enum Unplaced {
    /// It wants the whole request (a split), or gave an answer this node cannot read.
    Relay,
    /// It could not be asked, or refused before doing anything: route in this cell.
    Failed(String),
}

impl Router {
    /// The `place` stage: with cells, serves a client's request whose prompt has its home in
    /// another cell through the prompt's home node there. `None`: route it in this cell (no
    /// cells, no cells table yet, a prompt without tokens, home here, or the home cell failed
    /// before any engine took the request); the keys it computed stay in `prompt` for that.
    pub(crate) async fn place_in_home_cell(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        req: &InferenceRequest,
        body: &Bytes,
        prompt: &mut PromptKeys,
    ) -> Option<Response> {
        let mesh = self.mesh()?.clone();
        let own = mesh.cell.as_deref()?;
        if !prompt.known() {
            return None;
        }
        let table = mesh.cells();
        if table.len() < 2 {
            return None;
        }
        // Every node must derive the same affinity key: the mesh-wide default block size.
        let bs = self.s.default_block_size;
        let tokens = prompt.tokens as u32;
        let keys = prompt.pin(bs);
        let key = cells::affinity_key(keys, &self.s.cells)?;
        let loads: Vec<CellLoad<'_>> = table
            .iter()
            .map(|c| CellLoad { name: &c.report.name, engines: c.report.engines, load: c.report.load })
            .collect();
        let home = &table[cells::home(key, &loads, &self.s.cells, rand::random::<f64>)?];
        if home.report.name == own {
            return None;
        }
        let cell = home.report.name.as_str();
        // A home node that just failed is skipped until its suspicion ends: every origin that
        // saw it fail moves that prompt to the same next member (rendezvous order), and gossip
        // drops it from the table if it is dead.
        let members = home.members.iter().filter(|(n, _)| !mesh.is_suspect(n));
        let (name, addr) = cells::member(key, members.map(|(n, a)| ((n, *a), n.as_str())))?;
        let digest = PromptDigest::new(tokens, bs, keys)?;
        let reason = RouteReason::CellHome;
        ctx.span.record("peer", name.as_str());
        ctx.span.record("reason", reason.as_str());
        self.metrics.route_decisions.with_label_values(&[reason.as_str()]).inc();
        let query = PeerRequest::Place(PlaceQuery { model: req.model.clone() });
        let mut ask = ctx.peer_head(query, &self.node_name, req.stream);
        ask.prompt = Some(digest);
        let unplaced = match self.ask_placement(&mesh, name, addr, &ask).await {
            Ok(Placement::Engine { node, addr: at, engine, route }) => {
                let target = mesh.table.named(&node, at.unwrap_or(addr), &engine, &req.model, bs);
                // The home node's own reason stays, renamed: this request's reason is its home cell.
                let decision = RouteDecision::CellPlaced { cell: cell.to_owned(), home: name.clone(), placed: route };
                let header = decision.to_string();
                ctx.span.record("route", header.as_str());
                let ask = PeerRequest::Engine(engine.clone());
                let head = ctx.peer_head(ask, &self.node_name, req.stream);
                match self.forward_remote(ctx, head, body, &target, &header, None).await {
                    Ok(resp) => return Some(resp),
                    Err(Retry { error, reason }) => {
                        Unplaced::Failed(format!("{} ({reason}): {}", target.id, error.message))
                    }
                }
            }
            Ok(Placement::Relay) => Unplaced::Relay,
            Err(u) => u,
        };
        let why = match unplaced {
            Unplaced::Failed(why) => why,
            Unplaced::Relay => {
                let decision = RouteDecision::CellRelayed { cell: cell.to_owned(), home: name.clone() };
                let header = decision.to_string();
                ctx.span.record("route", header.as_str());
                let home_node = mesh.table.named(name, addr, "", &req.model, bs);
                let head = ctx.peer_head(PeerRequest::Relay, &self.node_name, req.stream);
                match self.forward_remote(ctx, head, body, &home_node, &header, None).await {
                    Ok(resp) => return Some(resp),
                    Err(Retry { error, reason }) => format!("relay ({reason}): {}", error.message),
                }
            }
        };
        tracing::warn!(%cell, node = %name, error = %why, "the home cell failed before any engine took the request; routing in this cell");
        self.metrics.retries.with_label_values(&["cell_home"]).inc();
        None
    }

    /// Asks `name` at `addr` where the request of `head` should go.
    async fn ask_placement(
        &self,
        mesh: &Mesh,
        name: &str,
        addr: SocketAddr,
        query: &RequestHead,
    ) -> Result<Placement, Unplaced> {
        let io = mesh.endpoint.io_timeout();
        let (rhead, recv) = match mesh.endpoint.request(addr, query, &[], PLACEMENT_TIMEOUT.min(io)).await {
            Ok(r) => r,
            Err(e) => {
                mesh.suspect(name);
                return Err(Unplaced::Failed(format!("placement: {e}")));
            }
        };
        let answer = read_limited(quic_body(recv), io, MAX_PLACEMENT).await;
        match (rhead.status, answer) {
            (200, Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|e| {
                tracing::debug!(node = %name, error = %e, "unreadable placement; relaying the request whole");
                Unplaced::Relay
            }),
            (200, Err(e)) => Err(Unplaced::Failed(format!("placement cut short: {e}"))),
            (status, answer) if rhead.retryable => {
                // Draining, or unable to place: skip it like a node that did not answer.
                mesh.suspect(name);
                let text = answer.map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                Err(Unplaced::Failed(format!("placement refused ({status}): {}", text.trim())))
            }
            (status, _) => {
                tracing::debug!(node = %name, status, "no placement; relaying the request whole");
                Err(Unplaced::Relay)
            }
        }
    }

    /// Answers a peer's placement query: where in this cell the prompt should go. Nothing runs
    /// here, so every refusal is retryable.
    pub(super) async fn serve_placement(self: Arc<Self>, req: IncomingRequest, query: PlaceQuery) {
        let answer = if self.is_draining() {
            Err(ApiError::unavailable(format!("Node {} is draining.", self.node_name)).with_code("draining"))
        } else {
            self.place(&query.model, req.head.prompt.as_ref())
        };
        let (status, body) = match answer
            .and_then(|p| serde_json::to_vec(&p).map_err(|e| ApiError::internal(format!("placement answer: {e}"))))
        {
            Ok(body) => (StatusCode::OK, body),
            Err(e) => {
                tracing::info!(origin = %req.head.origin, status = e.status.as_u16(), error = %e.message, "placement refused");
                (e.status, e.to_json().into_bytes())
            }
        };
        let head = ResponseHead {
            status: status.as_u16(),
            content_type: "application/json".into(),
            served_by: self.node_name.clone(),
            retryable: status != StatusCode::OK,
            retry_after_s: None,
        };
        let io = self.mesh().map(|m| m.endpoint.io_timeout()).unwrap_or(Duration::from_secs(5));
        if let Err(e) = respond(req.respond, &head, Body::from(body).into_data_stream(), io).await {
            tracing::debug!(peer = %req.peer, error = %e, "peer stopped reading the placement");
        }
    }

    /// Picks an engine in this cell for a prompt known by its block keys, as for a request
    /// relayed here, and counts a peer's engine it picked as in flight for the lease.
    fn place(&self, model: &str, digest: Option<&PromptDigest>) -> Result<Placement, ApiError> {
        let digest =
            digest.ok_or_else(|| ApiError::invalid("A placement query needs the prompt's block keys.", None))?;
        let keys = digest.keys().map_err(|e| ApiError::invalid(e.to_string(), None))?;
        // Given keys cannot be recut at another block size: engines of another block size see
        // no prefix, as for a relayed digest.
        let mut prompt = PromptKeys::from_keys(digest.tokens as usize, digest.block_size, keys);
        let picked = self.pick(model, &mut prompt, Scope::Cell, &[], true, None)?;
        self.metrics.route_decisions.with_label_values(&[RouteReason::CellPlace.as_str()]).inc();
        if picked.split.is_some() {
            return Ok(Placement::Relay);
        }
        self.remember_route(&picked.target, &mut prompt);
        let route = picked.decision.to_string();
        Ok(match picked.target {
            Target::Local(e) => {
                Placement::Engine { node: self.node_name.clone(), addr: None, engine: e.name.clone(), route }
            }
            Target::Remote(r) => {
                if let Some(mesh) = self.mesh() {
                    mesh.table.record(&r.id, &[], true);
                }
                Placement::Engine { node: r.id.node.to_string(), addr: Some(r.addr), engine: r.load.name, route }
            }
        })
    }
}
