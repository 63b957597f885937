//! The `forward` stage: the client's bytes to one engine, this node's over HTTP or a peer's
//! over QUIC, and the answer's head judged: a failure before any engine accepted the request is
//! a [`Retry`]; anything else goes on to `relay`.

use axum::body::Bytes;
use axum::http::{header, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::Endpoint;
use kvmesh_transport::{PeerRequest, RequestHead, TransportError};
use std::sync::Arc;
use std::time::Duration;

use kvmesh_sim::engine::Scheduling;

use super::check::Expected;
use super::relay::{quic_body, read_small, Answer, ByteStream};
use super::{Router, Target};
use crate::ctx::RequestCtx;
use crate::engine::{Engine, InFlight};
use crate::mesh::view::PeerEngine;
use crate::reply::reply_error;

/// A failure before the client saw anything: the pipeline may try another engine.
pub struct Retry {
    pub error: ApiError,
    pub reason: &'static str,
}

fn is_retryable(status: StatusCode) -> bool {
    matches!(status, StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT)
}

impl Router {
    /// One engine, local or a peer's, named explicitly (the hops of a split).
    pub(super) async fn forward_to(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        target: &Target,
        stream: bool,
        body: &Bytes,
        route: &str,
    ) -> Result<Response, Retry> {
        match target {
            Target::Local(e) => self.forward_local(ctx, stream, body, e.clone(), route, None).await,
            Target::Remote(r) => {
                let ask = PeerRequest::Engine(r.load.name.clone());
                let head = ctx.peer_head(ask, &self.node_name, stream);
                self.forward_remote(ctx, head, body, r, route, None).await
            }
        }
    }

    pub(super) async fn forward_local(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        stream: bool,
        body: &Bytes,
        engine: Arc<Engine>,
        route: &str,
        expect: Option<Expected>,
    ) -> Result<Response, Retry> {
        // What its TTFT is predicted from, as known now (`policy::predict`): learned from the
        // answer's first chunk.
        let learn = match (&expect, stream) {
            (Some(e), true) => {
                let v = engine.snapshot();
                // The queue as routing counted it (`candidates::Open::All`: every request to
                // this engine passes through this node).
                let open =
                    kvmesh_policy::candidates::Open::All(engine.in_flight.load(std::sync::atomic::Ordering::Relaxed));
                let (running, waiting) = open.queue(&kvmesh_policy::candidates::Load {
                    running: v.load.running,
                    waiting: v.load.waiting,
                    kv_usage: v.load.kv_usage,
                });
                Some(super::relay::Learn {
                    engine: engine.clone(),
                    features: kvmesh_policy::predict::Features {
                        waiting,
                        uncached_tokens: e.prompt_tokens.saturating_sub(e.cached_tokens) as f64,
                        running,
                    },
                    sent: std::time::Instant::now(),
                })
            }
            _ => None,
        };
        let in_flight = InFlight::new(engine.in_flight.clone());
        let url = format!("{}{}", engine.url, ctx.upstream_path());
        // A response made here is stored by this engine: its id says so (`stored`).
        let body = match ctx.endpoint {
            Endpoint::Responses => {
                match super::stored::with_response_id(body, &self.node_name, &engine.name, &ctx.tenant) {
                    Some(b) => Bytes::from(b),
                    None => body.clone(),
                }
            }
            // A cancel has no body.
            Endpoint::ResponseCancel => Bytes::new(),
            // An engine scheduling by priority orders its queue as flow control does.
            Endpoint::Chat | Endpoint::Completions if engine.scheduling == Scheduling::Priority => {
                let p = kvmesh_policy::flow::engine_priority(ctx.priority, self.flow.backlogged(&ctx.tenant));
                with_priority(body, p)
            }
            _ => body.clone(),
        };
        let rb = match ctx.endpoint.is_get() {
            true => self.client.get(url),
            false => self.client.post(url).header(header::CONTENT_TYPE, ctx.body_type()).body(body),
        };
        let mut rb = rb.header("x-request-id", &ctx.id);
        for (k, v) in ctx.trace_headers() {
            rb = rb.header(k, v);
        }
        if let Some(k) = &engine.api_key {
            rb = rb.bearer_auth(k);
        }
        if let Some(rank) = engine.dp_rank {
            // vLLM serves the request on this rank, whose cache the pick was made against.
            rb = rb.header("x-data-parallel-rank", rank.to_string());
        }
        let resp = match tokio::time::timeout(self.s.first_byte_timeout, rb.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                // A request this node could not even build says nothing of the engine.
                if !e.is_builder() {
                    engine.mark_down(&e.to_string());
                }
                return Err(Retry {
                    error: ApiError::bad_gateway(format!("Engine {} could not be reached.", engine.name)),
                    reason: if e.is_connect() { "connect" } else { "send" },
                });
            }
            Err(_) => return Ok(self.first_byte_timed_out(ctx, &engine.name)),
        };
        let status = resp.status();
        let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let upstream: ByteStream = resp.bytes_stream().map(|r| r.map_err(|e| e.to_string())).boxed();
        if is_retryable(status) {
            let text = read_small(upstream, self.s.idle_timeout).await;
            return Err(Retry {
                error: ApiError::unavailable(format!("Engine {} answered {status}: {}", engine.name, text.trim())),
                reason: "engine_unavailable",
            });
        }
        let served_by = format!("{}/{}", self.node_name, engine.name);
        let answer = Answer { status, content_type, served_by, stream, route, expect, learn, retry_after_s: None };
        self.relay_answer(ctx, answer, upstream, in_flight).await
    }

    pub(super) async fn forward_remote(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        head: RequestHead,
        body: &Bytes,
        remote: &PeerEngine,
        route: &str,
        expect: Option<Expected>,
    ) -> Result<Response, Retry> {
        let Some(mesh) = self.mesh() else {
            return Err(Retry { error: ApiError::unavailable("This node is not in a mesh."), reason: "no_mesh" });
        };
        let in_flight = InFlight::new(remote.in_flight.clone());
        let mut head = head;
        if self.s.flow.enabled {
            // Until the peer's next load report, flow control counts this one itself.
            mesh.table.record_sent(&remote.id, self.s.report_lag_ms);
            // What is left of its wait, for the peer's own hold.
            let wait = Duration::from_millis(self.s.flow.deadline_ms(0, ctx.priority));
            head.budget_ms = Some(wait.saturating_sub(ctx.started.elapsed()).as_millis() as u64);
        }
        let node = &remote.id.node;
        let (rhead, recv) = match mesh.endpoint.request(remote.addr, &head, body, self.s.first_byte_timeout).await {
            Ok(r) => r,
            Err(TransportError::Timeout { what: "response head", .. }) => {
                return Ok(self.first_byte_timed_out(ctx, &remote.id.to_string()));
            }
            Err(e) => {
                mesh.suspect(node);
                return Err(Retry {
                    error: ApiError::bad_gateway(format!("Peer {node} could not be reached: {e}")),
                    reason: "peer",
                });
            }
        };
        let status = StatusCode::from_u16(rhead.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let upstream = quic_body(recv);
        // Only failures from before any engine accepted the request: anything later might
        // have run (or still run) there, and must not run twice.
        if rhead.retryable {
            let text = read_small(upstream, self.s.idle_timeout).await;
            return Err(Retry {
                error: ApiError::unavailable(format!("Peer {node} answered {status}: {}", text.trim())),
                reason: "peer_unavailable",
            });
        }
        let answer = Answer {
            status,
            content_type: Some(rhead.content_type),
            served_by: rhead.served_by,
            stream: head.stream,
            route,
            expect,
            learn: None,
            retry_after_s: rhead.retry_after_s,
        };
        let relayed = self.relay_answer(ctx, answer, upstream, in_flight).await;
        if relayed.is_err() {
            mesh.suspect(node);
        }
        relayed
    }

    /// The engine may still be working on it; another engine would double the work, and the
    /// client has waited long enough already.
    pub(super) fn first_byte_timed_out(&self, ctx: &RequestCtx, target: &str) -> Response {
        let e = ApiError::gateway_timeout(format!(
            "{target} did not answer within {} ms.",
            self.s.first_byte_timeout.as_millis()
        ));
        reply_error(&self.metrics, ctx, &e)
    }
}

/// `body` (a JSON object, as parsed at admission, with any client `priority` already removed:
/// `policy::request::ENGINE_OWNED_FIELDS`) with `"priority": p` as its last member, so that
/// even a duplicate key left in it would lose (Python's `json` keeps the last).
fn with_priority(body: &Bytes, p: i64) -> Bytes {
    let text = body.as_ref();
    let first = text.iter().position(|b| !b.is_ascii_whitespace());
    let Some(close) = text.iter().rposition(|b| !b.is_ascii_whitespace()) else { return body.clone() };
    if first.map(|i| text[i]) != Some(b'{') || text[close] != b'}' {
        return body.clone();
    }
    let empty = text[..close].iter().rposition(|b| !b.is_ascii_whitespace()).map(|i| text[i]) == Some(b'{');
    let member = format!("{}\"priority\":{p}", if empty { "" } else { "," });
    let mut out = Vec::with_capacity(text.len() + member.len());
    out.extend_from_slice(&text[..close]);
    out.extend_from_slice(member.as_bytes());
    out.extend_from_slice(&text[close..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_goes_in_as_the_last_member() {
        let parsed = |b: Bytes| serde_json::from_slice::<serde_json::Value>(&b).unwrap();
        let v = parsed(with_priority(&Bytes::from_static(br#"  {"model":"m","messages":[]}"#), 3));
        assert_eq!((v["priority"].as_i64(), v["model"].as_str()), (Some(3), Some("m")));
        let text = with_priority(&Bytes::from_static(b"{\"model\":\"m\"}\n"), 1);
        assert_eq!(text, Bytes::from_static(b"{\"model\":\"m\",\"priority\":1}\n"));
        assert_eq!(parsed(with_priority(&Bytes::from_static(b"{ }"), -1))["priority"], -1);
        // Not an object: left as it is (the engine answers it as it would have).
        assert_eq!(with_priority(&Bytes::from_static(b"[1]"), 2), Bytes::from_static(b"[1]"));
    }
}
