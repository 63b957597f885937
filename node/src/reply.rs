//! Errors turned into answers, in one place: the OpenAI error body, counted in
//! `kvmesh_requests_total` and logged like every other answer, and marked when no engine
//! accepted the request (so a peer's origin may send it elsewhere).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use kvmesh_policy::openai::ApiError;

use crate::ctx::RequestCtx;
use crate::metrics::NodeMetrics;

/// The OpenAI error body with its status.
pub fn error_response(e: &ApiError) -> Response {
    (e.status, [(header::CONTENT_TYPE, "application/json")], e.to_json()).into_response()
}

/// The error in the shape of the API the request was sent to (Anthropic's for Messages).
pub fn error_response_for(endpoint: kvmesh_policy::request::Endpoint, e: &ApiError) -> Response {
    match endpoint.error_shape() {
        kvmesh_policy::endpoint::ErrorShape::OpenAi => error_response(e),
        kvmesh_policy::endpoint::ErrorShape::Anthropic => {
            (e.status, [(header::CONTENT_TYPE, "application/json")], e.to_anthropic_json()).into_response()
        }
    }
}

/// Answers `ctx` with an error in its API's shape, counted and logged like every other answer.
pub fn reply_error(metrics: &NodeMetrics, ctx: &RequestCtx, e: &ApiError) -> Response {
    tracing::info!(status = e.status.as_u16(), error = %e.message, "request rejected");
    // A client's model name is free text until an engine has served it: `other` until then.
    let model = metrics.model_label(&ctx.model);
    let ep = ctx.endpoint.path();
    metrics.requests.with_label_values(&[ep, model, e.status.as_str()]).inc();
    metrics.duration.with_label_values(&[ep, "false"]).observe(ctx.started.elapsed().as_secs_f64());
    error_response_for(ctx.endpoint, e)
}

/// A refusal answered: its error, with `retry-after` when it says when to come back.
pub fn refusal_response(metrics: &NodeMetrics, ctx: &RequestCtx, refusal: &crate::guard::Refusal) -> Response {
    let mut resp = reply_error(metrics, ctx, &refusal.error);
    if let Some(v) = refusal.retry_after_s.and_then(|s| axum::http::HeaderValue::from_str(&s.to_string()).ok()) {
        resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    resp
}

/// Marks an error answered before any engine accepted the request (safe to send elsewhere).
#[derive(Clone, Copy)]
pub struct NotAccepted;

pub fn not_accepted(mut r: Response) -> Response {
    r.extensions_mut().insert(NotAccepted);
    r
}

pub fn is_not_accepted(r: &Response) -> bool {
    r.extensions().get::<NotAccepted>().is_some()
}
