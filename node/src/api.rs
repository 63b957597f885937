//! The node's HTTP surface: the OpenAI API clients call, plus `/health` and `/metrics`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::Endpoint;
use serde_json::json;

use crate::proxy::{error_response, Pipeline};

pub fn router(p: Arc<Pipeline>) -> Router {
    let limit = p.max_body_bytes();
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/mesh/peers", get(peers))
        .route("/admin/keys/reload", post(reload_keys))
        .route("/admin/reload", post(reload))
        .route("/admin/drain", post(drain))
        .route("/v1/mesh/status", get(status))
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

/// A body over the size limit or unreadable is answered here; anything else goes down the pipeline.
async fn serve(
    p: Arc<Pipeline>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match body {
        Ok(b) => p.handle(endpoint, &headers, b).await,
        Err(rejection) => {
            let e = match rejection {
                BytesRejection::FailedToBufferBody(_) => ApiError::too_large(p.max_body_bytes()),
                other => ApiError::invalid(other.body_text(), None),
            };
            p.reply_error(endpoint, "", &e, std::time::Instant::now())
        }
    }
}

async fn chat(State(p): State<Arc<Pipeline>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    serve(p, Endpoint::Chat, headers, body).await
}

async fn completions(
    State(p): State<Arc<Pipeline>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(p, Endpoint::Completions, headers, body).await
}

/// Models served anywhere this node can route: its engines' and its live peers'.
async fn models(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let tenant = match p.guard().map(|g| g.check_client(&headers)) {
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
fn mesh_models(p: &Pipeline, healthy_peers_only: bool) -> Vec<String> {
    let mut ids = p.engines.models();
    for r in p.mesh().map(|m| m.remote_engines()).unwrap_or_default() {
        if healthy_peers_only && !r.engine.healthy {
            continue;
        }
        for m in r.engine.models {
            if !ids.contains(&m) {
                ids.push(m);
            }
        }
    }
    ids
}

/// The live members of the mesh as this node sees them, itself included.
async fn peers(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Some(Err(denied)) = p.guard().map(|g| g.check_admin(&headers)) {
        return error_response(&denied);
    }
    let Some(mesh) = p.mesh() else {
        return Json(json!({"node": p.node_name, "mesh": false, "peers": []})).into_response();
    };
    let peers: Vec<_> = mesh
        .peers()
        .iter()
        .map(|peer| {
            json!({
                "node": peer.node_id,
                "self": peer.is_self,
                "generation": peer.generation,
                "role": peer.meta.role,
                "http_addr": peer.meta.http_addr,
                "quic_addr": peer.addr.to_string(),
                "engines": peer.load.engines,
                "kv_summary": peer.kv,
            })
        })
        .collect();
    Json(json!({"node": p.node_name, "mesh": true, "peers": peers})).into_response()
}

/// 200 while this node can serve something (a healthy engine of its own or, in a mesh, a
/// peer's), 503 otherwise and while it drains (so load balancers stop sending); the body lists
/// this node's engines.
async fn health(State(p): State<Arc<Pipeline>>) -> Response {
    let engines: Vec<_> = p
        .engines
        .engines
        .iter()
        .map(|e| {
            let v = e.snapshot();
            json!({"name": e.name, "url": e.url, "healthy": v.healthy, "models": v.models, "error": v.last_error})
        })
        .collect();
    let can_serve = p.engines.engines.iter().any(|e| e.is_healthy())
        || p.mesh().is_some_and(|m| m.remote_engines().iter().any(|r| r.engine.healthy));
    let (status, word) = match (p.is_draining(), can_serve) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, true) => (StatusCode::OK, "ok"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_engine"),
    };
    (status, Json(json!({"status": word, "node": p.node_name, "engines": engines}))).into_response()
}

/// Re-reads the API keys (inline and the keys file) now. Admin key required.
async fn reload_keys(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let Some(g) = p.guard() else {
        return error_response(&ApiError::not_found("API keys are not configured on this node."));
    };
    if let Err(denied) = g.check_admin(&headers) {
        return error_response(&denied);
    }
    match g.reload_keys() {
        Ok(n) => Json(json!({"keys": n})).into_response(),
        Err(e) => error_response(&ApiError::invalid(e.to_string(), None)),
    }
}

/// Re-reads the API keys (with keys configured) and the guardrails file (when there is one),
/// as SIGHUP does. What cannot be used keeps its old state; the answer is then 400 with every
/// error (file, and line or entry). Admin key required.
async fn reload(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    let Some(g) = p.guard() else {
        return error_response(&ApiError::not_found(
            "Nothing to reload: no API keys or guardrails are configured on this node.",
        ));
    };
    if let Err(denied) = g.check_admin(&headers) {
        return error_response(&denied);
    }
    let r = g.reload_all();
    if r.errors.is_empty() {
        Json(json!({"keys": r.keys, "guardrails": r.guardrails})).into_response()
    } else {
        error_response(&ApiError::invalid(r.errors.join("; "), None))
    }
}

/// This node's view of itself: engines with their index sizes, and how each model's prompts
/// are matched: `exact` (token blocks, with a tokenizer) or `approximate` (text chunks against
/// what this node routed where, without one). Admin key required when keys are configured.
async fn status(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Some(Err(denied)) = p.guard().map(|g| g.check_admin(&headers)) {
        return error_response(&denied);
    }
    let engines: Vec<_> = p
        .engines
        .engines
        .iter()
        .map(|e| {
            let v = e.snapshot();
            json!({
                "name": e.name,
                "healthy": v.healthy,
                "models": v.models,
                "running": v.load.running,
                "waiting": v.load.waiting,
                "kv_usage": v.load.kv_usage,
                "kv_events": e.kv.batches.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "indexed_blocks": e.kv.cached_blocks(),
                "routed_keys": e.routed.lock().map(|r| r.len()).unwrap_or(0),
                "index_resets": e.kv.resync_dropped.load(std::sync::atomic::Ordering::Relaxed),
                "index_replays": e.kv.resync_replayed.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let mut models = mesh_models(&p, false);
    models.sort();
    let routing: Vec<_> = models
        .iter()
        .map(|m| json!({"model": m, "prefix_matching": if p.tokenizers().has(m) { "exact" } else { "approximate" }}))
        .collect();
    // With cells: this node's cell, whether it is a gateway now (set or elected), and the
    // cells table it routes with.
    let cells = p.mesh().filter(|m| m.cell.is_some()).map(|m| {
        let table: Vec<_> = m
            .cells()
            .iter()
            .map(|c| {
                let members: Vec<&str> = c.members.iter().map(|(n, _)| n.as_str()).collect();
                json!({"name": c.report.name, "engines": c.report.engines, "load": c.report.load, "members": members})
            })
            .collect();
        json!({"cell": m.cell, "gateway": m.is_gateway(), "table": table})
    });
    Json(json!({
        "node": p.node_name,
        "draining": p.is_draining(),
        "open_requests": p.open_requests(),
        "mesh": p.mesh().is_some(),
        "peers": p.mesh().map(|m| m.peers().len()).unwrap_or(0),
        "cells": cells,
        "engines": engines,
        "models": routing,
        "tokenizers": p.tokenizers().status(),
    }))
    .into_response()
}

/// Drains this node: new requests (clients' and peers') get a retryable 503 `draining`,
/// `/health` turns 503, the node leaves gossip (answered once peers have had a few rounds to
/// hear it), and open requests run to their end. The process keeps running until stopped
/// (SIGTERM then exits at once if nothing is open); there is no undrain short of a restart.
/// Admin key required when keys are configured.
async fn drain(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Some(Err(denied)) = p.guard().map(|g| g.check_admin(&headers)) {
        return error_response(&denied);
    }
    let first = p.start_draining();
    if let Some(m) = p.mesh() {
        m.leave().await;
    }
    Json(json!({
        "node": p.node_name,
        "draining": true,
        "already_draining": !first,
        "left_mesh": p.mesh().is_some(),
        "open_requests": p.open_requests(),
    }))
    .into_response()
}

async fn metrics(State(p): State<Arc<Pipeline>>, headers: HeaderMap) -> Response {
    if let Some(Err(denied)) = p.guard().map(|g| g.check_metrics(&headers)) {
        return error_response(&denied);
    }
    p.tokenizers().observe();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        p.metrics.render(&p.engines, p.mesh().map(|m| &**m)),
    )
        .into_response()
}
