//! The node's HTTP surface: the OpenAI API clients call (each request enters the pipeline
//! with its `RequestCtx` made here), `/health` and `/metrics`; the admin and mesh-debug routes
//! are in `admin`, behind one authorization layer.

mod admin;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::Endpoint;
use serde_json::json;

use crate::ctx::RequestCtx;
use crate::reply::{error_response, reply_error};
use crate::request::Pipeline;

pub fn router(p: Arc<Pipeline>) -> Router {
    let limit = p.max_body_bytes();
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(admin::router(p.clone()))
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
    let (parts, body) = req.into_parts();
    let ctx = RequestCtx::client(&p.router.node_name, endpoint, &parts.headers);
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

async fn chat(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    serve(p, Endpoint::Chat, req).await
}

async fn completions(State(p): State<Arc<Pipeline>>, req: Request) -> Response {
    serve(p, Endpoint::Completions, req).await
}

/// Models served anywhere this node can route: its engines' and its live peers'.
async fn models(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let tenant = match p.guard.as_ref().map(|g| g.check_client(&headers)) {
        Some(Err(denied)) => return error_response(&denied),
        Some(Ok(t)) => t,
        None => None,
    };
    let mut ids = mesh_models(&p, true);
    ids.retain(|m| tenant.as_ref().is_none_or(|t| t.may_use(m)));
    let data: Vec<_> =
        ids.into_iter().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "kvmesh"})).collect();
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
