//! Admin and mesh-debug routes (`/admin/*`, `/v1/mesh/*`), behind one layer that checks the
//! admin key (when keys are configured) before any handler runs.

use std::sync::Arc;

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kvmesh_policy::openai::ApiError;
use serde_json::json;

use super::mesh_models;
use crate::reply::error_response;
use crate::request::{AdminAccess, Pipeline};

pub(super) fn router(p: Arc<Pipeline>) -> Router<Arc<Pipeline>> {
    Router::new()
        .route("/v1/mesh/peers", get(peers))
        .route("/v1/mesh/status", get(status))
        .route("/admin/keys/reload", post(reload_keys))
        .route("/admin/reload", post(reload))
        .route("/admin/drain", post(drain).delete(undrain))
        .route_layer(middleware::from_fn_with_state(p, require_admin))
}

/// The one authorization check for every route here: the admin key when keys are configured;
/// without keys, the client's address (loopback only, unless `[auth] open_admin`).
async fn require_admin(State(p): State<Arc<Pipeline>>, req: Request, next: Next) -> Response {
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    if !admin_allowed(p.admin_access, client) {
        return error_response(&admin_closed());
    }
    if let Some(Err(denied)) = p.guard.as_ref().map(|g| g.check_admin(req.headers())) {
        return error_response(&denied);
    }
    next.run(req).await
}

/// Whether a client at `client` may pass the address check (the admin key is checked after).
fn admin_allowed(access: AdminAccess, client: Option<IpAddr>) -> bool {
    match access {
        AdminAccess::AdminKey | AdminAccess::Open => true,
        // `::ffff:127.0.0.1` (a dual-stack listener) is loopback too.
        AdminAccess::Loopback => client.is_some_and(|ip| ip.to_canonical().is_loopback()),
    }
}

fn admin_closed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::FORBIDDEN,
        "permission_error",
        "Admin routes answer only loopback clients while no API keys are configured: configure an admin key \
         ([auth] keys with admin = true) or set [auth] open_admin = true.",
    )
    .with_code("admin_disabled")
}

/// The live members of the mesh as this node sees them, itself included.
async fn peers(State(p): State<Arc<Pipeline>>) -> Response {
    let p = &p.router;
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

/// Re-reads the API keys (inline and the keys file) now.
async fn reload_keys(State(p): State<Arc<Pipeline>>) -> Response {
    let Some(g) = &p.guard else {
        return error_response(&ApiError::not_found("API keys are not configured on this node."));
    };
    match g.reload_keys() {
        Ok(n) => Json(json!({"keys": n})).into_response(),
        Err(e) => error_response(&ApiError::invalid(e.to_string(), None)),
    }
}

/// Re-reads the API keys (with keys configured) and the guardrails file (when there is one),
/// as SIGHUP does. What cannot be used keeps its old state; the answer is then 400 with every
/// error (file, and line or entry).
async fn reload(State(p): State<Arc<Pipeline>>) -> Response {
    let Some(g) = &p.guard else {
        return error_response(&ApiError::not_found(
            "Nothing to reload: no API keys or guardrails are configured on this node.",
        ));
    };
    let r = g.reload_all();
    if r.errors.is_empty() {
        Json(json!({"keys": r.keys, "guardrails": r.guardrails})).into_response()
    } else {
        error_response(&ApiError::invalid(r.errors.join("; "), None))
    }
}

/// This node's view of itself: engines with their index sizes, and how each model's prompts
/// are matched: `exact` (token blocks, with a tokenizer) or `approximate` (text chunks against
/// what this node routed where, without one).
async fn status(State(pipeline): State<Arc<Pipeline>>) -> Response {
    let p = &pipeline.router;
    let engines: Vec<_> = p
        .engines
        .engines
        .iter()
        .map(|e| {
            let v = e.snapshot();
            json!({
                "name": e.name,
                "url": e.url,
                "healthy": v.healthy,
                "error": v.last_error,
                "models": v.models,
                "running": v.load.running,
                "waiting": v.load.waiting,
                "kv_usage": v.load.kv_usage,
                "block_size": v.load.block_size,
                "block_size_is_default": v.load.block_size.is_none_or(|bs| bs == p.default_block_size()),
                "kv_events": e.kv.batches.load(std::sync::atomic::Ordering::Relaxed) > 0,
                "indexed_blocks": e.kv.cached_blocks(),
                "routed_keys": e.routed.lock().map(|r| r.len()).unwrap_or(0),
                "index_resets": e.kv.resync_dropped.load(std::sync::atomic::Ordering::Relaxed),
                "index_replays": e.kv.resync_replayed.load(std::sync::atomic::Ordering::Relaxed),
            })
        })
        .collect();
    let mut models = mesh_models(&pipeline, false);
    models.sort();
    // Exact matching is only as good as the keys: the engines' reported prompt lengths say
    // whether this node's tokenizer and template agree with theirs (`router::check`).
    let agreement: std::collections::HashMap<String, _> = p.agreement.snapshot().into_iter().collect();
    let routing: Vec<_> = models
        .iter()
        .map(|m| {
            let a = agreement.get(m).copied().unwrap_or_default();
            // An adapter or alias is tokenized with its base model's tokenizer.
            let tokenized = p.tokenizers().has(m) || p.tokenizers().has(&p.key_space(m).base_name);
            let matching = match (tokenized, a.length_mismatches) {
                (false, _) => "approximate",
                (true, 0) => "exact",
                (true, _) => "exact_disagreeing",
            };
            json!({"model": m, "prefix_matching": matching, "engine_agreement": a})
        })
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
/// (SIGTERM then exits at once if nothing is open). `DELETE /admin/drain` undoes it on a node
/// outside a mesh; a meshed node left gossip and is restarted to rejoin.
async fn drain(State(p): State<Arc<Pipeline>>) -> Response {
    let p = &p.router;
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

/// Ends a drain: the node takes requests again. A node that left its mesh when it drained
/// cannot rejoin gossip in place (409: restart it).
async fn undrain(State(p): State<Arc<Pipeline>>) -> Response {
    let p = &p.router;
    if p.mesh().is_some() && p.is_draining() {
        return error_response(
            &ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "invalid_request_error",
                "This node left its mesh when it drained; restart it to rejoin.",
            )
            .with_code("left_mesh"),
        );
    }
    let was = p.stop_draining();
    Json(json!({"node": p.node_name, "draining": false, "was_draining": was})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_keys_admin_routes_answer_loopback_only() {
        let (lo, far) = (Some("127.0.0.1".parse().unwrap()), Some("10.0.0.1".parse().unwrap()));
        assert!(admin_allowed(AdminAccess::Loopback, lo));
        assert!(admin_allowed(AdminAccess::Loopback, Some("::1".parse().unwrap())));
        assert!(admin_allowed(AdminAccess::Loopback, Some("::ffff:127.0.0.1".parse().unwrap())));
        assert!(!admin_allowed(AdminAccess::Loopback, far));
        assert!(!admin_allowed(AdminAccess::Loopback, None), "an unknown client is not loopback");
        assert!(admin_allowed(AdminAccess::Open, far));
        assert!(admin_allowed(AdminAccess::AdminKey, far), "the admin key decides then");
    }
}
