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

async fn models(State(p): State<Arc<Pipeline>>) -> Response {
    let data: Vec<_> = p
        .engines
        .models()
        .into_iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "kvmesh"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// 200 while at least one engine is healthy, 503 otherwise; the body lists every engine.
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
    let ok = p.engines.engines.iter().any(|e| e.is_healthy());
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (
        status,
        Json(json!({"status": if ok { "ok" } else { "no_healthy_engine" }, "node": p.node_name, "engines": engines})),
    )
        .into_response()
}

async fn metrics(State(p): State<Arc<Pipeline>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], p.metrics.render(&p.engines)).into_response()
}
