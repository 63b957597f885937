//! The request path of a client's request, top to bottom, as named stages. Read
//! [`Pipeline::stages`] to follow a request from the HTTP handler to the engine and back:
//!
//! 1. **admit** (`guard::admit`): audit slot, API key, parse, the key's models, `max_tokens`,
//!    prompt guardrails;
//! 2. **tokenize** (`tokens`): the prompt's token ids (or approximate keys of its text), once
//!    per request, here;
//! 3. **limit** (`guard::limits`): prompt length, token and request rates, mesh-wide;
//! 4. **hold** (`router::flow`, `policy::flow`): while every engine serving the model is
//!    saturated, the request waits here, and leaves in priority and fair-share order; one that
//!    cannot leave before its deadline is answered 503 (429 when its tenant's share of the
//!    queue is used);
//! 5. **place** (`router::cells`): with cells, a prompt homed in another cell goes where its
//!    home node there places it; a request on a stored response (`router::stored`) goes to the
//!    engine that stored it, and skips 5 and 6;
//! 6. **pick** (`router::pick`, `policy::candidates`, `policy::route`): the engine predicted to
//!    start it soonest, or a prefill/decode split;
//! 7. **forward** (`router::forward`, `router::split`): the client's bytes to that engine, this
//!    node's or a peer's; a failure before the client saw anything goes back to pick;
//! 8. **relay** (`router::relay`, `guard::answer`, `guard::stream`): the answer streamed back
//!    through the answer guardrails; the audit record written before it ends.
//!
//! Errors become answers in one place (`reply`), in OpenAI's shape. Requests a peer forwards
//! here take the router's own path (`router::peer`): parse, keys, pick, forward.

pub(crate) mod form;

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::Response;
use kvmesh_policy::request::{self, InferenceRequest};
use tracing::Instrument;

use crate::ctx::RequestCtx;
use crate::guard::{Flow, Guard, Refusal};
use crate::metrics::NodeMetrics;
use crate::reply::refusal_response;
use crate::router::flow::{Asking, HoldAt};
use crate::router::{Router, Scope};

/// Who may call the admin and mesh-debug routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAccess {
    /// Holders of an admin key (keys are configured).
    AdminKey,
    /// No keys: clients on loopback only.
    Loopback,
    /// No keys, and `[auth] open_admin`: everyone.
    Open,
}

impl AdminAccess {
    pub fn of(auth: &crate::config::AuthConfig) -> Self {
        match (auth.enabled(), auth.open_admin) {
            (true, _) => Self::AdminKey,
            (false, false) => Self::Loopback,
            (false, true) => Self::Open,
        }
    }
}

/// A stage's span, a child of the request's: `admit`, `tokenize`, `limit`, `hold`, `route`
/// (place, pick and forward, up to the answer's head). Exported with the request span over
/// OTLP, so a trace shows where a request's time went.
pub(crate) fn stage(name: &'static str) -> tracing::Span {
    tracing::info_span!("stage", stage = name, otel.name = name)
}

pub struct Pipeline {
    pub router: Arc<Router>,
    /// Auth, limits, guardrails and audit; `None` when none is configured.
    pub guard: Option<Arc<Guard>>,
    pub admin_access: AdminAccess,
    metrics: Arc<NodeMetrics>,
    max_body_bytes: usize,
    body_timeout: std::time::Duration,
}

impl Pipeline {
    pub fn new(
        router: Arc<Router>,
        guard: Option<Arc<Guard>>,
        admin_access: AdminAccess,
        max_body_bytes: usize,
        body_timeout: std::time::Duration,
    ) -> Self {
        let metrics = router.metrics.clone();
        Self { router, guard, admin_access, metrics, max_body_bytes, body_timeout }
    }

    /// How long a request's body may take to arrive once its headers are in.
    pub fn body_timeout(&self) -> std::time::Duration {
        self.body_timeout
    }

    /// A request refused before its body was read (no valid API key): answered and recorded
    /// like any refusal.
    pub async fn refuse_unread(&self, ctx: RequestCtx, e: kvmesh_policy::openai::ApiError) -> Response {
        let flow = self.guard.as_ref().and_then(|g| g.open(&ctx).ok());
        let span = ctx.span.clone();
        self.refuse(&ctx, flow, e.into()).instrument(span).await
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }

    /// A client's request, from its first byte to the end of its answer.
    pub async fn serve(&self, ctx: RequestCtx, headers: &HeaderMap, body: Bytes) -> Response {
        if self.router.is_draining() {
            // Before the guard: refused like a closed port, so it leaves no audit record.
            return self.router.refuse_draining(&ctx);
        }
        let span = ctx.span.clone();
        self.stages(ctx, headers, body).instrument(span).await
    }

    /// The stages, in order.
    async fn stages(&self, mut ctx: RequestCtx, headers: &HeaderMap, body: Bytes) -> Response {
        // 1. admit
        let admitted = self.admit(&mut ctx, headers, body).instrument(stage("admit")).await;
        let (mut flow, req, body) = match admitted {
            Ok(admitted) => admitted,
            Err((flow, refusal)) => return self.refuse(&ctx, flow, refusal).await,
        };
        // 2. tokenize (only what touches an engine's KV cache is keyed: tokenizer work and a
        //    stored response's routes go by load, and leave no route history)
        let mut prompt = match req.uses_kv_cache() {
            true => match self.router.prompt_keys(&req).instrument(stage("tokenize")).await {
                Ok(prompt) => prompt,
                Err(e) => return self.refuse(&ctx, flow, e.into()).await,
            },
            false => kvmesh_policy::candidates::PromptKeys::default(),
        };
        // 3. limit
        if let (Some(guard), Some(f)) = (&self.guard, flow.as_mut()) {
            let limited = stage("limit").in_scope(|| {
                let peers = self.router.mesh().map(|m| m.peers()).unwrap_or_default();
                guard.limit(f, &req, prompt.known().then_some(prompt.tokens), &peers)
            });
            if let Err(refusal) = limited {
                return self.refuse(&ctx, flow, refusal).await;
            }
        }
        // 4. hold (work that takes engine time; a stored response's retrieval or cancel does not)
        if req.uses_kv_cache() {
            let asking = Asking {
                model: &req.model,
                at: HoldAt::Mesh,
                budget: None,
                tenant: &ctx.tenant,
                weight: ctx.weight,
                priority: ctx.priority,
                tokens: prompt.tokens,
                arrived: ctx.started,
            };
            if let Err(held) = self.router.hold(asking).instrument(stage("hold")).await {
                return self.refuse(&ctx, flow, held.refusal).await;
            }
        }
        let route = async {
            match req.pinned_to(ctx.response_id.as_deref()) {
                // 5-7. a stored response's follow-up, retrieval or cancel: to the engine that stored it
                Some(id) => self.router.serve_stored(&ctx, &req, &body, id, false).await,
                None => match self.router.place_in_home_cell(&ctx, &req, &body, &mut prompt).await {
                    // 5. place
                    Some(answer) => answer,
                    // 6. pick → 7. forward (retried while the client has seen nothing)
                    None => self.router.pick_and_forward(&ctx, &req, &body, &mut prompt, Scope::Mesh).await,
                },
            }
        };
        // Until the answer's head (a stream's first chunk): its body is relayed after.
        let answer = route.instrument(stage("route")).await;
        // 8. relay
        match (&self.guard, flow) {
            (Some(guard), Some(flow)) => guard.answer(flow, &req, answer).await,
            _ => answer,
        }
    }

    /// The admit stage: the guard's checks when there is a guard, else the parse alone.
    async fn admit(
        &self,
        ctx: &mut RequestCtx,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(Option<Flow>, InferenceRequest, Bytes), (Option<Flow>, Refusal)> {
        let Some(guard) = &self.guard else {
            // Fields only the node may set never reach an engine from a client.
            if ctx.endpoint.work() == kvmesh_policy::endpoint::Work::Stored {
                return Ok((None, InferenceRequest::stored(ctx.endpoint, ctx.stream_query()), body));
            }
            if ctx.endpoint.is_multipart() {
                let parsed =
                    form::parse(ctx.endpoint, ctx.content_type.as_deref(), body.clone(), ctx.default_model.as_deref())
                        .await
                        .map_err(|e| (None, e.into()))?;
                ctx.set_model(&parsed.model);
                return Ok((None, parsed, body));
            }
            let parsed = request::parse_client(ctx.endpoint, &body, request::client_salt, ctx.default_model.as_deref())
                .map_err(|e| (None, e.into()))?;
            ctx.set_model(&parsed.req.model);
            let body = parsed.body.map(Bytes::from).unwrap_or(body);
            return Ok((None, parsed.req, body));
        };
        let mut flow = guard.open(ctx).map_err(|r| (None, r))?;
        match guard.admit(&mut flow, ctx, headers, body).await {
            Ok((req, body)) => Ok((Some(flow), req, body)),
            Err(refusal) => Err((Some(flow), refusal)),
        }
    }

    /// A refusal from a stage before routing: answered (with `retry-after` for a 429) and
    /// recorded.
    async fn refuse(&self, ctx: &RequestCtx, flow: Option<Flow>, refusal: Refusal) -> Response {
        let resp = refusal_response(&self.metrics, ctx, &refusal);
        if let (Some(guard), Some(flow)) = (&self.guard, flow) {
            guard.refuse(flow, &refusal).await;
        }
        resp
    }
}
