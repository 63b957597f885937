//! The node's HTTP surface: the OpenAI API clients call (each request enters the pipeline
//! with its `RequestCtx` made here), `/health` and `/metrics`; the admin and mesh-debug routes
//! are in `admin`, behind one authorization layer.

mod admin;

use kvmesh_policy::flow::Priority;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmesh_policy::endpoint::Work;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::Endpoint;
use serde_json::json;

use crate::ctx::RequestCtx;
use crate::reply::{error_response, reply_error};
use crate::request::Pipeline;

pub fn router(p: Arc<Pipeline>) -> Router {
    let limit = p.max_body_bytes();
    Router::new()
        .route("/v1/models", get(models))
        .route("/version", get(version))
        .route(Endpoint::ResponseRetrieve.path(), get(stored))
        .route(Endpoint::ResponseCancel.path(), post(stored))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(admin::router(p.clone()))
        .merge(inference_routes())
        .fallback(|| async { error_response(&ApiError::not_found("Not Found")) })
        .method_not_allowed_fallback(|| async {
            error_response(&ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "Method Not Allowed",
            ))
        })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(p)
}

/// The API key is checked before the body is read (a client without one cannot make the node
/// buffer `max_body_bytes`), the body is read within `http_body_timeout_ms` and the size limit,
/// and the request goes down the pipeline.
async fn serve(p: Arc<Pipeline>, endpoint: Endpoint, req: Request) -> Response {
    serve_with(p, endpoint, None, req).await
}

async fn serve_with(p: Arc<Pipeline>, endpoint: Endpoint, response_id: Option<String>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut ctx = RequestCtx::client(&p.router.node_name, endpoint, &parts.headers);
    ctx.continue_trace(&parts.headers);
    // Bounded again by the client's key, once it is checked.
    ctx.set_priority(Priority::Standard, p.router.flow_settings().unkeyed_max_priority, 1);
    if response_id.is_some() {
        ctx.set_query(parts.uri.query());
    }
    ctx.response_id = response_id;
    ctx.session = p.router.session_of(&parts.headers);
    if endpoint.is_multipart() {
        ctx.content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .filter(|ct| crate::request::form::forwardable(ct))
            .map(str::to_owned);
    }
    // Only for endpoints that may name no model: chat and completions skip the scan.
    if endpoint.may_omit_model() {
        if let [only] = mesh_models(&p, true).as_slice() {
            ctx.default_model = Some(only.clone());
        }
    }
    if let Some(Err(e)) = p.guard.as_ref().map(|g| g.check_client(&parts.headers)) {
        return p.refuse_unread(ctx, e).await;
    }
    let limit = p.max_body_bytes();
    let declared = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return reply_error(p.metrics(), &ctx, &ApiError::too_large(limit));
    }
    let body = match tokio::time::timeout(p.body_timeout(), axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let e = match too_large {
                true => ApiError::too_large(limit),
                false => ApiError::invalid(format!("The request body could not be read: {e}"), None),
            };
            return reply_error(p.metrics(), &ctx, &e);
        }
        Err(_) => {
            let e = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "The request body did not arrive in time.",
            );
            return reply_error(p.metrics(), &ctx, &e);
        }
    };
    p.serve(ctx, &parts.headers, body).await
}

/// Every endpoint a request body is sent to (`policy::endpoint`), each down the same pipeline.
fn inference_routes() -> Router<Arc<Pipeline>> {
    Endpoint::ALL.into_iter().filter(|e| e.work() != Work::Stored).fold(Router::new(), |r, e| {
        r.route(e.path(), post(move |State(p): State<Arc<Pipeline>>, req: Request| serve(p, e, req)))
    })
}

/// A stored response's routes: sent to the engine that stored it, whatever node receives them.
async fn stored(
    State(p): State<Arc<Pipeline>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let endpoint = match req.method() == axum::http::Method::GET {
        true => Endpoint::ResponseRetrieve,
        false => Endpoint::ResponseCancel,
    };
    if !kvmesh_policy::endpoint::is_response_id(&id) {
        let e = ApiError::not_found(format!("Response with id '{}' not found.", id.escape_debug()));
        return error_response(&e);
    }
    serve_with(p, endpoint, Some(id), req).await
}

/// `/version` in vLLM's shape (`{"version": ...}`), with kvmesh's version: the node answering is
/// not one engine, and engines of several versions may serve behind it.
async fn version() -> Response {
    Json(json!({"version": concat!("kvmesh-", env!("CARGO_PKG_VERSION"))})).into_response()
}

/// Models served anywhere this node can route (its healthy engines' and its live peers'), as
/// vLLM lists them (`ModelCard`: `root`, `parent` for a LoRA adapter, `max_model_len`, a
/// permission entry), merged across the mesh, each with the nodes that serve it
/// (`kvmesh_nodes`). A key limited to some models sees only those.
async fn models(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let tenant = match p.guard.as_ref().map(|g| g.check_client(&headers)) {
        Some(Err(denied)) => return error_response(&denied),
        Some(Ok(t)) => t,
        None => None,
    };
    // (card, max_model_len, node) of every healthy engine, this node's first.
    let mut served: Vec<(kvmesh_policy::models::ModelCard, Option<u32>, String)> = Vec::new();
    for e in &p.router.engines.engines {
        let v = e.snapshot();
        if !v.healthy {
            continue;
        }
        let cards = match v.cards.cards().is_empty() {
            true => v.models.iter().map(|m| kvmesh_policy::models::ModelCard::base(m)).collect(),
            false => v.cards.cards().to_vec(),
        };
        served.extend(cards.into_iter().map(|c| (c, v.max_model_len, p.router.node_name.clone())));
    }
    let view = p.router.mesh().map(|m| m.view()).unwrap_or_default();
    for r in view.engines.iter().filter(|r| r.load.healthy) {
        let cards = match r.load.cards.is_empty() {
            true => r.load.models.iter().map(|m| kvmesh_policy::models::ModelCard::base(m)).collect(),
            false => r.load.cards.clone(),
        };
        served.extend(cards.into_iter().map(|c| (c, r.load.max_model_len, r.id.node.to_string())));
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut data: Vec<serde_json::Value> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (card, max_len, node) in served {
        if tenant.as_ref().is_some_and(|t| !t.may_use(&card.id)) {
            continue;
        }
        match index.get(&card.id) {
            Some(&i) => {
                let entry = &mut data[i];
                // The smallest context any engine serving it has: a request that fits is served
                // wherever it goes.
                if let (Some(new), Some(old)) = (max_len, entry["max_model_len"].as_u64()) {
                    entry["max_model_len"] = json!(old.min(new as u64));
                }
                if let Some(nodes) = entry["kvmesh_nodes"].as_array_mut() {
                    if !nodes.iter().any(|n| n == &node) {
                        nodes.push(json!(node));
                    }
                }
            }
            None => {
                index.insert(card.id.clone(), data.len());
                data.push(json!({
                    "id": card.id,
                    "object": "model",
                    "created": created,
                    "owned_by": "vllm",
                    "root": card.root.clone().unwrap_or_else(|| card.id.clone()),
                    "parent": card.parent,
                    "max_model_len": max_len,
                    "permission": [{
                        "id": format!("modelperm-{:016x}", rand::random::<u64>()),
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": false,
                        "allow_sampling": true,
                        "allow_logprobs": true,
                        "allow_search_indices": false,
                        "allow_view": true,
                        "allow_fine_tuning": false,
                        "organization": "*",
                        "group": null,
                        "is_blocking": false,
                    }],
                    "kvmesh_nodes": [node],
                }));
            }
        }
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

/// Models served by this node's engines and, in a mesh, its peers' (healthy ones only, or all
/// that gossip lists).
pub(crate) fn mesh_models(p: &Pipeline, healthy_peers_only: bool) -> Vec<String> {
    let mut ids = p.router.engines.models();
    let view = p.router.mesh().map(|m| m.view()).unwrap_or_default();
    for r in &view.engines {
        if healthy_peers_only && !r.load.healthy {
            continue;
        }
        for m in &r.load.models {
            if !ids.contains(m) {
                ids.push(m.clone());
            }
        }
    }
    ids
}

/// 200 while this node can serve something (a healthy engine of its own or, in a mesh, a
/// peer's), 503 otherwise and while it drains (so load balancers stop sending); the body lists
/// this node's engines.
async fn health(State(p): State<Arc<Pipeline>>) -> Response {
    let p = &p.router;
    let engines: Vec<_> = p
        .engines
        .engines
        .iter()
        .map(|e| {
            let v = e.snapshot();
            // Addresses and errors are for admins (`/v1/mesh/status`), not for whoever probes.
            json!({"name": e.name, "healthy": v.healthy, "models": v.models})
        })
        .collect();
    let can_serve = p.engines.engines.iter().any(|e| e.is_healthy())
        || p.mesh().is_some_and(|m| m.view().engines.iter().any(|r| r.load.healthy));
    let (status, word) = match (p.is_draining(), can_serve) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, true) => (StatusCode::OK, "ok"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_engine"),
    };
    (status, Json(json!({"status": word, "node": p.node_name, "engines": engines}))).into_response()
}

async fn metrics(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Some(Err(denied)) = p.guard.as_ref().map(|g| g.check_metrics(&headers)) {
        return error_response(&denied);
    }
    let r = &p.router;
    r.tokenizers().observe();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        r.metrics.render(&r.engines, r.mesh().map(|m| &**m)),
    )
        .into_response()
}
