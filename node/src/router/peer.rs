//! What a peer asks of this node (`transport::PeerRequest`), answered on its QUIC stream:
//! serve a request on a named engine or the best of this node's, route a relayed request in
//! this node's cell, or answer a placement query (`cells`). A peer's request was admitted and
//! is audited at its origin; here it is parsed, keyed, picked and forwarded.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use axum::response::Response;
use kvmesh_policy::candidates::PromptKeys;
use kvmesh_policy::endpoint::Work;
use kvmesh_policy::flow::Priority;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint, InferenceRequest};
use kvmesh_transport::endpoint::respond;
use kvmesh_transport::{IncomingRequest, PeerRequest, PromptDigest, ResponseHead};
use tracing::Instrument;

use super::flow::{Asking, HoldAt};
use super::{Router, Scope};
use crate::ctx::RequestCtx;
use crate::reply::{error_response, is_not_accepted, not_accepted, refusal_response, reply_error};

struct DecrementOnDrop<'a>(&'a AtomicU32);

impl Drop for DecrementOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// A request a peer sent: served by this node's engines (or its cell's, for a relay),
    /// answered on the QUIC stream.
    pub async fn serve_peer(self: Arc<Self>, req: IncomingRequest) {
        // A peer speaks for itself only: the origin it names is the name its certificate proves.
        if req.peer_name.as_deref() != Some(req.head.origin.as_str()) {
            tracing::warn!(peer = %req.peer, certificate = ?req.peer_name, claimed = ?req.head.origin, "a peer request names another origin than its certificate; refused");
            let head = ResponseHead {
                status: 403,
                content_type: "application/json".into(),
                served_by: self.node_name.clone(),
                retryable: false,
                retry_after_s: None,
            };
            let err = ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "permission_error",
                "The request's origin is not the node its certificate names.",
            );
            let body = futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(err.to_json()))]);
            let _ = respond(req.respond, &head, body, Duration::from_secs(2)).await;
            return;
        }
        let ask = req.head.ask();
        if let PeerRequest::Place(query) = ask {
            return self.serve_placement(req, query).await;
        }
        self.peer_requests.fetch_add(1, Ordering::Relaxed);
        let _done = DecrementOnDrop(&self.peer_requests);
        let (path, query) = match req.head.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (req.head.path.as_str(), None),
        };
        let parsed = Endpoint::from_path(path);
        let endpoint = parsed.map(|(e, _)| e);
        let mut ctx = RequestCtx::peer(&req.head.request_id, &req.head.origin, endpoint.unwrap_or(Endpoint::Chat));
        ctx.content_type = req.head.content_type.clone().filter(|ct| crate::request::form::forwardable(ct));
        // The origin's trace goes on here.
        let mut trace = HeaderMap::new();
        for (k, v) in [("traceparent", &req.head.traceparent), ("tracestate", &req.head.tracestate)] {
            if let Some(v) = v.as_deref().and_then(|v| axum::http::HeaderValue::from_str(v).ok()) {
                trace.insert(k, v);
            }
        }
        ctx.continue_trace(&trace);
        // The tenant the origin admitted it for: it owns the responses this request makes.
        if let Some(t) = req.head.tenant.as_deref().filter(|t| crate::ctx::valid_request_id(t)) {
            ctx.tenant = t.to_owned();
        }
        // The band and weight the origin held it by (bounded there by the client's key; an
        // unknown band reads as the default), and what is left of its wait.
        if let Some(p) = req.head.priority.as_deref().and_then(Priority::parse) {
            ctx.priority = p;
        }
        if let Some(w) = req.head.weight {
            ctx.weight = w.clamp(1, kvmesh_policy::auth::MAX_WEIGHT);
        }
        let budget = req.head.budget_ms.map(Duration::from_millis);
        let tokens = req.head.prompt_tokens.unwrap_or(0) as usize;
        if let Some((_, Some(id))) = parsed {
            ctx.response_id = Some(id.to_owned());
            ctx.set_query(query);
        }
        let send = req.respond;
        // This node's record of the request (the origin holds the one its client's answer
        // waited for): reserved now, written when the answer has been sent.
        let record = self.audit.get().and_then(|log| log.reserve()).map(|slot| {
            use sha2::Digest as _;
            let rec = crate::audit::AuditRecord {
                time_ms: crate::audit::unix_ms(),
                request_id: ctx.id.clone(),
                node: self.node_name.clone(),
                origin: Some(req.head.origin.clone()),
                tenant: req.head.tenant.clone().filter(|t| crate::ctx::valid_request_id(t)),
                endpoint: ctx.endpoint.path().to_owned(),
                stream: req.head.stream,
                request_sha256: Some(hex::encode(sha2::Sha256::digest(&req.body))),
                ..Default::default()
            };
            (slot, rec)
        });
        let resp = match endpoint {
            Some(_) if self.is_draining() => self.refuse_draining(&ctx),
            Some(_) => {
                let scope = match &ask {
                    PeerRequest::Relay => Scope::Cell,
                    PeerRequest::Engine(name) => Scope::Local(Some(name.as_str())),
                    PeerRequest::AnyEngine | PeerRequest::Place(_) => Scope::Local(None),
                };
                let span = ctx.span.clone();
                // The origin may give up (its client left, its timeout fired) before the engine
                // answers: stop then, so the engine is not kept working for nobody.
                let work = self.serve_forwarded(&mut ctx, req.body, scope, req.head.prompt.as_ref(), (budget, tokens));
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
            retryable: is_not_accepted(&resp),
            retry_after_s: header_str(resp.headers(), header::RETRY_AFTER.as_str()).and_then(|v| v.parse().ok()),
        };
        let io = self.mesh().map(|m| m.endpoint.io_timeout()).unwrap_or(Duration::from_secs(5));
        let body = resp.into_body().into_data_stream();
        let (status, served_by) = (head.status, head.served_by.clone());
        // An error here means the origin stopped reading (its client left): dropping the body
        // closes the engine connection, and the engine aborts the request.
        let sent = respond(send, &head, body, io).await;
        if let Err(e) = &sent {
            tracing::debug!(peer = %req.peer, error = %e, "peer stopped reading the response");
        }
        if let Some((slot, mut rec)) = record {
            rec.model = (!ctx.model.is_empty()).then(|| ctx.model.clone());
            rec.status = status;
            rec.served_by = Some(served_by);
            rec.outcome = match (&sent, status) {
                (Err(_), _) => crate::audit::Outcome::StreamError,
                (Ok(()), 200..=299) => crate::audit::Outcome::Ok,
                (Ok(()), _) => crate::audit::Outcome::Rejected,
            };
            rec.error = sent.err().map(|e| e.to_string());
            rec.latency_ms = ctx.started.elapsed().as_secs_f64() * 1000.0;
            // Not waited for: the origin's record is the one the answer depended on.
            let _ = slot.submit(rec);
        }
    }

    /// parse → keys (the origin's digest, or tokenized here when this node chooses and none
    /// came) → pick and forward.
    async fn serve_forwarded(
        self: &Arc<Self>,
        ctx: &mut RequestCtx,
        body: axum::body::Bytes,
        scope: Scope<'_>,
        digest: Option<&PromptDigest>,
        (budget, origin_tokens): (Option<Duration>, usize),
    ) -> Response {
        let parsed = match ctx.endpoint.work() {
            Work::Stored => Ok(InferenceRequest::stored(ctx.endpoint, ctx.stream_query())),
            _ if ctx.endpoint.is_multipart() => {
                // A form naming no model was admitted for the mesh's only model; it is this
                // node's only one too.
                let models = self.engines.models();
                let only = match models.as_slice() {
                    [m] => Some(m.as_str()),
                    _ => None,
                };
                crate::request::form::parse(ctx.endpoint, ctx.content_type.as_deref(), body.clone(), only).await
            }
            _ => request::parse(ctx.endpoint, &body),
        };
        let req = match parsed {
            Ok(r) => r,
            Err(e) => return reply_error(&self.metrics, ctx, &e),
        };
        ctx.set_model(&req.model);
        // A stored response's request: to the engine of this node that stored it.
        if let Some(id) = req.pinned_to(ctx.response_id.as_deref()) {
            return self.serve_stored(ctx, &req, &body, id, true).await;
        }
        // Token ids only matter when there is a choice to make, and are made once per request:
        // a peer that leaves the choice to this node sends the block keys it computed.
        let mut prompt = match (scope.chooses() && req.uses_kv_cache(), digest.map(|d| (d, d.keys()))) {
            (true, Some((d, Ok(keys)))) => {
                let label = if self.tokenizers.has(&req.model) { req.model.as_str() } else { "other" };
                self.metrics.tokenize_requests.with_label_values(&[label, "from_peer"]).inc();
                PromptKeys::from_keys(d.tokens as usize, d.block_size, keys)
            }
            (true, _) => match self.prompt_keys(&req).await {
                Ok(p) => p,
                Err(e) => {
                    let resp = reply_error(&self.metrics, ctx, &e);
                    // An overloaded tokenizer refused before any engine saw it: the origin may
                    // try elsewhere.
                    return if e.status.as_u16() == 503 { not_accepted(resp) } else { resp };
                }
            },
            (false, _) => PromptKeys::default(),
        };
        // hold, again: the origin let it go on its estimate of this node's engines' free places;
        // this node counts them exactly, and holds it while they are full (`router::flow`).
        if let (Scope::Local(engine), true) = (scope, req.uses_kv_cache()) {
            let asking = Asking {
                model: &req.model,
                at: HoldAt::Local(engine),
                budget,
                tenant: &ctx.tenant,
                weight: ctx.weight,
                priority: ctx.priority,
                // Keyed here, or as the origin counted it (a named engine: not keyed here).
                tokens: if prompt.tokens > 0 { prompt.tokens } else { origin_tokens },
                arrived: ctx.started,
            };
            if let Err(held) = self.hold(asking).instrument(crate::request::stage("hold")).await {
                // Refused before any engine saw it: the origin may try another engine
                // (draining, a full queue, no place in time here), unless its time is up.
                let resp = refusal_response(&self.metrics, ctx, &held.refusal);
                return if held.is_final() { resp } else { not_accepted(resp) };
            }
        }
        self.pick_and_forward(ctx, &req, &body, &mut prompt, scope).await
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}
