//! The request pipeline: validate, choose an engine, forward the client's bytes, and relay the
//! answer, streaming chunks through as they arrive.
//!
//! Failure rules: anything that fails before the client has seen a byte may be retried on
//! another engine (bounded by `max_attempts`); once a stream has started, a failure ends it with
//! an OpenAI error event and `[DONE]`, never a silent cut or a hang (every wait has a timeout).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint};
use kvmesh_policy::route::{self, Candidate};
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{Engine, EngineSet, InFlight};
use crate::metrics::NodeMetrics;

pub struct Pipeline {
    pub node_name: String,
    pub engines: Arc<EngineSet>,
    pub metrics: Arc<NodeMetrics>,
    client: reqwest::Client,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    max_attempts: u32,
    max_body_bytes: usize,
}

pub fn error_response(e: &ApiError) -> Response {
    (e.status, [(header::CONTENT_TYPE, "application/json")], e.to_json()).into_response()
}

/// Largest non-streamed engine answer relayed; a completion JSON is far smaller.
const MAX_BUFFERED_RESPONSE: usize = 64 * 1024 * 1024;

impl Pipeline {
    pub fn new(cfg: &Config, engines: Arc<EngineSet>, metrics: Arc<NodeMetrics>, client: reqwest::Client) -> Self {
        Self {
            node_name: cfg.node_name.clone(),
            engines,
            metrics,
            client,
            first_byte_timeout: Config::ms(cfg.engine_first_byte_timeout_ms),
            idle_timeout: Config::ms(cfg.engine_idle_timeout_ms),
            max_attempts: cfg.max_attempts,
            max_body_bytes: cfg.max_body_bytes,
        }
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub async fn handle(self: &Arc<Self>, endpoint: Endpoint, headers: &HeaderMap, body: Bytes) -> Response {
        let started = Instant::now();
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            origin = %self.node_name,
            endpoint = endpoint.path(),
            model = tracing::field::Empty,
            engine = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        async move {
            let req = match request::parse(endpoint, &body) {
                Ok(r) => r,
                Err(e) => return self.reply_error(endpoint, "", &e, started),
            };
            tracing::Span::current().record("model", req.model.as_str());
            let mut tried: Vec<usize> = Vec::new();
            let mut last_error: Option<ApiError> = None;
            for attempt in 0..self.max_attempts {
                let engine = match self.pick(&req.model, &tried) {
                    Ok(e) => e,
                    Err(e) => {
                        // After a failed attempt, the failure says more than "nothing left".
                        let e = if attempt > 0 { last_error.take().unwrap_or(e) } else { e };
                        return self.reply_error(endpoint, &req.model, &e, started);
                    }
                };
                tried.push(engine.index);
                tracing::Span::current().record("engine", engine.name.as_str());
                tracing::Span::current().record("reason", if attempt == 0 { "least_loaded" } else { "retry" });
                match self.forward(endpoint, &req.model, req.stream, &request_id, &body, engine.clone(), started).await {
                    Ok(resp) => return resp,
                    Err(Retry { error, reason }) => {
                        tracing::warn!(engine = %engine.name, %reason, error = %error, "engine failed before answering; trying another");
                        self.metrics.retries.with_label_values(&[reason]).inc();
                        last_error = Some(error);
                    }
                }
            }
            let e = last_error.unwrap_or_else(|| ApiError::unavailable("No engine could take the request."));
            self.reply_error(endpoint, &req.model, &e, started)
        }
        .instrument(span)
        .await
    }

    /// Answers with an OpenAI error, counted and logged like every other answer.
    pub fn reply_error(&self, endpoint: Endpoint, model: &str, e: &ApiError, started: Instant) -> Response {
        tracing::info!(status = e.status.as_u16(), error = %e.message, "request rejected");
        self.metrics.requests.with_label_values(&[endpoint.path(), model, e.status.as_str()]).inc();
        self.metrics.duration.with_label_values(&[endpoint.path(), "false"]).observe(started.elapsed().as_secs_f64());
        error_response(e)
    }

    /// The least-loaded healthy engine serving `model` that was not tried yet.
    fn pick(&self, model: &str, tried: &[usize]) -> Result<Arc<Engine>, ApiError> {
        let engines = &self.engines.engines;
        if !engines.iter().any(|e| e.serves(model)) {
            return Err(ApiError::model_not_found(model));
        }
        let candidates: Vec<Candidate> = engines
            .iter()
            .map(|e| {
                let v = e.snapshot();
                Candidate {
                    in_flight: e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    waiting: v.load.waiting as u32,
                    healthy: v.healthy && !tried.contains(&e.index),
                    serves_model: v.models.iter().any(|m| m == model),
                }
            })
            .collect();
        let salt: u64 = rand::random();
        route::least_loaded(&candidates, |i| xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), salt))
            .map(|i| engines[i].clone())
            .ok_or_else(|| ApiError::unavailable(format!("No healthy engine serves `{model}` right now; retry later.")))
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        self: &Arc<Self>,
        endpoint: Endpoint,
        model: &str,
        stream: bool,
        request_id: &str,
        body: &Bytes,
        engine: Arc<Engine>,
        started: Instant,
    ) -> Result<Response, Retry> {
        let in_flight = InFlight::new(engine.clone());
        let mut rb = self
            .client
            .post(format!("{}{}", engine.url, endpoint.path()))
            .header(header::CONTENT_TYPE, "application/json")
            .header("x-request-id", request_id)
            .body(body.clone());
        if let Some(k) = &engine.api_key {
            rb = rb.bearer_auth(k);
        }
        let resp = match tokio::time::timeout(self.first_byte_timeout, rb.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                engine.mark_down(&e.to_string());
                return Err(Retry {
                    error: ApiError::bad_gateway(format!("Engine {} could not be reached.", engine.name)),
                    reason: if e.is_connect() { "connect" } else { "send" },
                });
            }
            Err(_) => {
                // The engine may still be working on it; another engine would double the work
                // and the client has waited long enough already.
                let e = ApiError::gateway_timeout(format!(
                    "Engine {} did not answer within {} ms.",
                    engine.name,
                    self.first_byte_timeout.as_millis()
                ));
                return Ok(self.reply_error(endpoint, model, &e, started));
            }
        };
        let status = resp.status();
        if matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT) {
            let text = read_small(resp, self.idle_timeout).await;
            return Err(Retry {
                error: ApiError::unavailable(format!("Engine {} answered {status}: {}", engine.name, text.trim())),
                reason: "engine_unavailable",
            });
        }
        let served_by = HeaderValue::from_str(&format!("{}/{}", self.node_name, engine.name))
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/json"));
        let ep = endpoint.path();
        self.metrics.requests.with_label_values(&[ep, model, status.as_str()]).inc();
        let stream_label = if stream { "true" } else { "false" };
        if stream && status.is_success() {
            let relay = relay(self.clone(), resp.bytes_stream().boxed(), in_flight, started, ep, self.idle_timeout);
            return Ok(Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, content_type)
                .header(header::CACHE_CONTROL, "no-cache")
                .header("x-kvmesh-served-by", served_by)
                .header("x-request-id", request_id)
                .body(Body::from_stream(relay))
                .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))));
        }
        // Non-streamed answers are buffered so a failure mid-body still becomes a clean error.
        let body = match read_limited(resp, self.idle_timeout, MAX_BUFFERED_RESPONSE).await {
            Ok(b) => b,
            Err(why) => {
                let e = ApiError::bad_gateway(format!("Engine {} failed while answering: {why}", engine.name));
                return Ok(error_response(&e));
            }
        };
        drop(in_flight);
        self.metrics.ttfb.with_label_values(&[ep, stream_label]).observe(started.elapsed().as_secs_f64());
        self.metrics.duration.with_label_values(&[ep, stream_label]).observe(started.elapsed().as_secs_f64());
        Ok(Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .header("x-kvmesh-served-by", served_by)
            .header("x-request-id", request_id)
            .body(Body::from(body))
            .unwrap_or_else(|_| error_response(&ApiError::internal("failed to build response"))))
    }
}

/// A failure before the client saw anything: the pipeline may try another engine.
struct Retry {
    error: ApiError,
    reason: &'static str,
}

async fn read_small(resp: reqwest::Response, timeout: Duration) -> String {
    match tokio::time::timeout(timeout.min(Duration::from_secs(5)), resp.bytes()).await {
        Ok(Ok(b)) => String::from_utf8_lossy(&b[..b.len().min(512)]).into_owned(),
        _ => String::new(),
    }
}

async fn read_limited(resp: reqwest::Response, idle: Duration, limit: usize) -> Result<Bytes, String> {
    let mut out = Vec::new();
    let mut s = resp.bytes_stream();
    loop {
        match tokio::time::timeout(idle, s.next()).await {
            Err(_) => return Err(format!("no data for {} ms", idle.as_millis())),
            Ok(None) => return Ok(Bytes::from(out)),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(chunk))) => {
                if out.len() + chunk.len() > limit {
                    return Err(format!("answer larger than {limit} bytes"));
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

struct RelayState {
    pipeline: Arc<Pipeline>,
    upstream: ByteStream,
    _in_flight: InFlight,
    started: Instant,
    first_sent: bool,
    endpoint: &'static str,
    idle: Duration,
    finished: bool,
    /// Whether what was sent so far ends on an event boundary (`\n\n`).
    clean: bool,
}

/// Relays an engine's SSE stream chunk by chunk. Dropping it (client gone) drops the upstream
/// connection, which makes the engine abort the request.
fn relay(
    pipeline: Arc<Pipeline>,
    upstream: ByteStream,
    in_flight: InFlight,
    started: Instant,
    endpoint: &'static str,
    idle: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let state = RelayState {
        pipeline,
        upstream,
        _in_flight: in_flight,
        started,
        first_sent: false,
        endpoint,
        idle,
        finished: false,
        clean: true,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.finished {
            return None;
        }
        let item = match tokio::time::timeout(s.idle, s.upstream.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => {
                s.pipeline
                    .metrics
                    .duration
                    .with_label_values(&[s.endpoint, "true"])
                    .observe(s.started.elapsed().as_secs_f64());
                return None;
            }
            Ok(Some(Err(e))) => {
                s.finished = true;
                s.pipeline.metrics.stream_errors.with_label_values(&["engine"]).inc();
                tracing::warn!(error = %e, "engine stream failed mid-response");
                stream_error(&format!("The engine failed mid-stream: {e}"), s.clean)
            }
            Err(_) => {
                s.finished = true;
                s.pipeline.metrics.stream_errors.with_label_values(&["idle_timeout"]).inc();
                stream_error(&format!("The engine sent nothing for {} ms.", s.idle.as_millis()), s.clean)
            }
        };
        s.clean = item.ends_with(b"\n\n");
        if !s.first_sent {
            s.first_sent = true;
            s.pipeline.metrics.ttfb.with_label_values(&[s.endpoint, "true"]).observe(s.started.elapsed().as_secs_f64());
        }
        Some((Ok(item), s))
    })
}

/// The end of a stream that failed after it started: an error event, then `[DONE]`.
fn stream_error(message: &str, clean: bool) -> Bytes {
    let e = ApiError::bad_gateway(message);
    // A cut inside an event is closed first so the error arrives as an event of its own.
    let sep = if clean { "" } else { "\n\n" };
    Bytes::from(format!("{sep}{}data: [DONE]\n\n", e.to_sse_event()))
}
