//! The `relay` stage, transport half: an engine's (or a peer's) answer turned into the client's
//! response. A stream is held until its first chunk arrives, so a stream that dies before
//! sending anything can still be retried elsewhere; then it passes through chunk by chunk.
//! Anything else is buffered, so a failure inside it still becomes a clean error. (The answer
//! guardrails and the audit record are the guard's half, in `guard::answer`.)

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use futures::{Stream, StreamExt};
use kvmesh_policy::openai::ApiError;

use super::check::{self, Expected};
use super::{Retry, Router};
use crate::ctx::RequestCtx;
use crate::engine::InFlight;
use crate::metrics::NodeMetrics;
use crate::reply::error_response;

/// Largest non-streamed answer relayed; a completion JSON is far smaller.
pub const MAX_BUFFERED_RESPONSE: usize = 64 * 1024 * 1024;

pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// An answer's head, wherever it came from.
pub(super) struct Answer<'a> {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub served_by: String,
    pub stream: bool,
    /// `x-kvmesh-route`: the decision and what explains it (empty for peer-served requests).
    pub route: &'a str,
    /// What the engine should report in `usage` (`check`).
    pub expect: Option<Expected>,
    /// `retry-after` of a peer's refusal, in seconds (at most an hour is passed on).
    pub retry_after_s: Option<u64>,
    /// A streamed answer of this node's engine: its TTFT is learned from (`policy::predict`).
    pub learn: Option<Learn>,
}

/// What a local engine's TTFT was predicted from, and when the request was sent.
pub(super) struct Learn {
    pub engine: Arc<crate::engine::Engine>,
    pub features: kvmesh_policy::predict::Features,
    pub sent: std::time::Instant,
}

impl Router {
    /// Scores both TTFT models on this answer before the learned one learns from it
    /// (`kvmesh_ttft_prediction_error_seconds`), then teaches it.
    fn learn_ttft(&self, l: Learn) {
        let actual_ms = l.sent.elapsed().as_secs_f64() * 1000.0;
        let fixed = kvmesh_policy::predict::Fit::of(&self.s.weights).predict(&l.features);
        let Ok(mut model) = l.engine.ttft.lock() else { return };
        let learned = model.predict(&l.features);
        model.observe(&l.features, actual_ms);
        drop(model);
        let err = &self.metrics.ttft_prediction_error;
        err.with_label_values(&["learned"]).observe((learned - actual_ms).abs() / 1000.0);
        err.with_label_values(&["fixed"]).observe((fixed - actual_ms).abs() / 1000.0);
    }
}

impl Router {
    pub(super) async fn relay_answer(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        a: Answer<'_>,
        mut upstream: ByteStream,
        in_flight: InFlight,
    ) -> Result<Response, Retry> {
        let ep = ctx.endpoint.path();
        let streaming = a.stream && a.status.is_success();
        let first = if streaming {
            match tokio::time::timeout(self.s.first_byte_timeout, upstream.next()).await {
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
                Err(_) => return Ok(self.first_byte_timed_out(ctx, &a.served_by)),
            }
        } else {
            None
        };
        // An engine answered for this model: it is a real one, and may label series.
        self.metrics.note_served_model(&ctx.model);
        self.metrics.requests.with_label_values(&[ep, &ctx.model, a.status.as_str()]).inc();
        let served_by = HeaderValue::from_str(&a.served_by).unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let content_type = a.content_type.unwrap_or_else(|| "application/json".into());
        let builder = Response::builder()
            .status(a.status)
            .header(header::CONTENT_TYPE, content_type)
            .header("x-kvmesh-served-by", served_by)
            .header("x-request-id", &ctx.id);
        let builder = match HeaderValue::from_str(a.route) {
            Ok(v) if !a.route.is_empty() => builder.header("x-kvmesh-route", v),
            _ => builder,
        };
        let builder = match a.retry_after_s {
            Some(s) => builder.header(header::RETRY_AFTER, s.min(3600)),
            None => builder,
        };
        if let Some(first) = first {
            if let Some(l) = a.learn {
                self.learn_ttft(l);
            }
            let ttft = ctx.started.elapsed().as_secs_f64();
            self.metrics.ttfb.with_label_values(&[ep, "true"]).observe(ttft);
            self.metrics.recent_ttft.record(ttft);
            let upstream = futures::stream::iter([Ok(first)]).chain(upstream).boxed();
            let checked = a.expect.map(|e| (self.clone(), e));
            let relay = relay(RelayState {
                metrics: self.metrics.clone(),
                checked,
                upstream,
                _in_flight: in_flight,
                started: ctx.started,
                endpoint: ep,
                idle: self.s.idle_timeout,
                finished: false,
                clean: true,
                last_chunk: None,
                span: ctx.span.clone(),
                ttft,
            });
            return Ok(builder
                .header(header::CACHE_CONTROL, "no-cache")
                .body(Body::from_stream(relay))
                .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))));
        }
        let body = match read_limited(upstream, self.s.idle_timeout, MAX_BUFFERED_RESPONSE).await {
            Ok(b) => b,
            Err(why) => {
                return Ok(error_response(&ApiError::bad_gateway(format!(
                    "{} failed while answering: {why}",
                    a.served_by
                ))))
            }
        };
        drop(in_flight);
        if let Some(expected) = &a.expect {
            if let Some(reported) = serde_json::from_slice(&body).ok().as_ref().and_then(check::usage_of) {
                self.agreement.check(&self.metrics, expected, reported);
            }
        }
        let label = if a.stream { "true" } else { "false" };
        let took = ctx.started.elapsed().as_secs_f64();
        self.metrics.ttfb.with_label_values(&[ep, label]).observe(took);
        self.metrics.duration.with_label_values(&[ep, label]).observe(took);
        self.metrics.recent_e2e.record(took);
        access_log(&ctx.span, a.status.as_u16(), false, took, took);
        Ok(builder
            .body(Body::from(body))
            .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))))
    }
}

/// A QUIC response body as a byte stream; a reset or lost connection is an error item.
pub(super) fn quic_body(recv: quinn::RecvStream) -> ByteStream {
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

pub(super) async fn read_small(s: ByteStream, timeout: Duration) -> String {
    match read_limited(s, timeout.min(Duration::from_secs(5)), 4096).await {
        Ok(b) => String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned(),
        Err(_) => String::new(),
    }
}

pub(super) async fn read_limited(mut s: ByteStream, idle: Duration, limit: usize) -> Result<Bytes, String> {
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
    metrics: Arc<NodeMetrics>,
    /// The router (for its agreement table) and what the engine should report, until a chunk
    /// with `usage` arrives.
    checked: Option<(Arc<Router>, Expected)>,
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
    /// The request's span, for the access log line at the end.
    span: tracing::Span,
    ttft: f64,
}

/// Relays an SSE stream chunk by chunk. Dropping it (client gone) drops the upstream, which
/// makes the engine (or the peer, then its engine) abort the request.
fn relay(state: RelayState) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
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
                    s.metrics.inter_token.with_label_values(&[s.endpoint]).observe(gap);
                    s.metrics.recent_itl.record(gap);
                }
                s.last_chunk = Some(now);
                if s.checked.is_some() {
                    if let Some(reported) = check::usage_in_chunk(&chunk) {
                        if let Some((router, expected)) = s.checked.take() {
                            router.agreement.check(&s.metrics, &expected, reported);
                        }
                    }
                }
                chunk
            }
            Ok(None) => {
                let e2e = s.started.elapsed().as_secs_f64();
                s.metrics.duration.with_label_values(&[s.endpoint, "true"]).observe(e2e);
                s.metrics.recent_e2e.record(e2e);
                access_log(&s.span, 200, true, s.ttft, e2e);
                return None;
            }
            Ok(Some(Err(e))) => {
                s.finished = true;
                s.metrics.stream_errors.with_label_values(&["upstream"]).inc();
                tracing::warn!(error = %e, "stream failed mid-response");
                stream_error(&format!("The engine failed mid-stream: {e}"), s.clean)
            }
            Err(_) => {
                s.finished = true;
                s.metrics.stream_errors.with_label_values(&["idle_timeout"]).inc();
                stream_error(&format!("The engine sent nothing for {} ms.", s.idle.as_millis()), s.clean)
            }
        };
        s.clean = item.ends_with(b"\n\n");
        Some((Ok(item), s))
    })
}

/// The access log line of an answered request: in its span (so with its id, origin, endpoint,
/// model, route and reason), its status, whether streamed, time to first byte and in all. No
/// prompt or answer text. (Tokens and the tenant are in the audit record.)
fn access_log(span: &tracing::Span, status: u16, stream: bool, ttft_s: f64, e2e_s: f64) {
    tracing::info!(parent: span, status, stream, ttft_ms = (ttft_s * 1000.0).round(), e2e_ms = (e2e_s * 1000.0).round(), "request served");
}

/// The end of a stream that failed after it started: an error event, then `[DONE]`.
fn stream_error(message: &str, clean: bool) -> Bytes {
    let e = ApiError::bad_gateway(message);
    // A cut inside an event is closed first so the error arrives as an event of its own.
    let sep = if clean { "" } else { "\n\n" };
    Bytes::from(format!("{sep}{}data: [DONE]\n\n", e.to_sse_event()))
}
