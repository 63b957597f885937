//! The `relay` stage's guard half: answer hooks on a whole answer, and the request's audit
//! flow, which ends with its record written before the client sees the end of the answer.
//! (Streamed answers are checked as they flow: `stream`.)

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use kvmesh_policy::guardrails::{Context, Stage};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint, InferenceRequest};
use serde_json::Value;
use sha2::Digest as _;

use super::{Guard, AUDIT_ACK_TIMEOUT, MAX_CHECKED_BODY};
use crate::audit::{AuditRecord, Outcome, Slot};
use crate::ctx::RequestCtx;
use crate::reply::error_response;

impl Guard {
    /// The `relay` stage's guard half: the routed answer checked (streamed or whole),
    /// recorded, then handed to the client.
    pub async fn answer(self: &Arc<Self>, mut flow: Flow, req: &InferenceRequest, resp: Response) -> Response {
        let status = resp.status();
        flow.rec.status = status.as_u16();
        flow.rec.served_by = header_string(resp.headers(), "x-kvmesh-served-by");
        flow.rec.route = header_string(resp.headers(), "x-kvmesh-route");
        flow.rec.pd = split_of(flow.rec.route.as_deref(), flow.rec.served_by.as_deref());
        let mut resp = resp;
        if flow.hide_route {
            // Recorded for the audit; not shown to a tenant, who could probe others' prompts.
            resp.headers_mut().remove("x-kvmesh-route");
        }
        let sse = header_string(resp.headers(), header::CONTENT_TYPE.as_str())
            .is_some_and(|c| c.starts_with("text/event-stream"));
        if status.is_success() && req.stream && sse {
            return self.clone().stream_answer(flow, req, resp);
        }
        let (mut parts, body) = resp.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_CHECKED_BODY).await {
            Ok(b) => b,
            Err(e) => {
                let err = ApiError::bad_gateway(format!("The answer could not be read: {e}"));
                flow.rec.status = err.status.as_u16();
                flow.rec.outcome = Outcome::StreamError;
                flow.rec.error = Some(err.message.clone());
                // An error either way; an unrecorded one is logged by `finish`.
                let _recorded = flow.finish().await;
                return error_response(&err);
            }
        };
        if !status.is_success() {
            flow.rec.response_sha256 = Some(hex::encode(sha2::Sha256::digest(&bytes)));
            flow.rec.outcome = Outcome::Rejected;
            flow.rec.error = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned));
            if !flow.finish().await {
                return error_response(&audit_unavailable());
            }
            return Response::from_parts(parts, Body::from(bytes));
        }
        let mut out = bytes;
        let parsed = serde_json::from_slice::<Value>(&out);
        // Every string the client reads of each choice: the text, the reasoning, and the tool
        // calls' names and arguments (collected once, for the check and for the rules).
        let strings = parsed.as_ref().ok().map(|v| answer_strings(req.endpoint, v));
        let unreadable = strings.as_ref().is_none_or(|s| s.iter().any(|(p, _)| p == UNREADABLE));
        if unreadable && self.rules().read_text(Stage::Response) {
            // Answer rules must read what the client reads: an answer they cannot read (not
            // JSON, or past their bounds) is withheld, not passed unread.
            let err = ApiError::bad_gateway(
                "The answer could not be read by this node's answer guardrails (not JSON, or too many fields), so it is withheld.",
            );
            flow.rec.status = err.status.as_u16();
            flow.rec.outcome = Outcome::Rejected;
            flow.rec.error = Some(err.message.clone());
            let _recorded = flow.finish().await;
            return error_response(&err);
        }
        if let (Ok(mut v), Some(strings)) = (parsed, strings) {
            // A stored response's retrieval or cancel generates nothing: its usage was charged
            // when it was made.
            if req.endpoint.work() != kvmesh_policy::endpoint::Work::Stored {
                flow.rec.completion_tokens =
                    v["usage"]["completion_tokens"].as_u64().or_else(|| v["usage"]["output_tokens"].as_u64());
            }
            let (pointers, mut texts): (Vec<String>, Vec<String>) = strings.into_iter().unzip();
            let original = texts.clone();
            let ctx = Context { stage: Stage::Response, model: &req.model, tenant: &flow.tenant, prompt_chars: 0 };
            match self.run_hooks(&ctx, &flow.rec.request_id, &mut texts, &mut flow.rec.guardrails).await {
                Err((rule, _)) => {
                    let err = ApiError::content_filter(format!("The answer was blocked by guardrail `{rule}`."));
                    flow.rec.status = err.status.as_u16();
                    flow.rec.outcome = Outcome::Rejected;
                    flow.rec.error = Some(err.message.clone());
                    let _recorded = flow.finish().await;
                    let mut r = error_response(&err);
                    copy_kvmesh_headers(&parts.headers, r.headers_mut());
                    return r;
                }
                Ok(changed) => {
                    if changed {
                        for ((p, t), was) in pointers.iter().zip(&texts).zip(&original) {
                            if t == was {
                                continue;
                            }
                            if let Some(slot) = v.pointer_mut(p) {
                                *slot = Value::String(t.clone());
                            }
                        }
                        out = Bytes::from(v.to_string());
                        parts.headers.remove(header::CONTENT_LENGTH);
                    }
                }
            }
            flow.text = texts.join("\n");
        }
        flow.rec.response_sha256 = Some(hex::encode(sha2::Sha256::digest(&out)));
        if !flow.finish().await {
            return error_response(&audit_unavailable());
        }
        Response::from_parts(parts, Body::from(out))
    }
}

/// `prefill=...; decode=...` of a split request, from its route (`reason=pd; prefill=...`) and
/// the engine that decoded it.
fn split_of(route: Option<&str>, served_by: Option<&str>) -> Option<String> {
    let route = route?;
    if !route.split("; ").any(|kv| kv == "reason=pd") {
        return None;
    }
    let prefill = route.split("; ").find_map(|kv| kv.strip_prefix("prefill="))?;
    Some(format!("prefill={prefill}; decode={}", served_by.unwrap_or("unknown")))
}

/// The strings of a whole answer a client reads, with their JSON pointers: each choice's text
/// (`message.content` or `text`), `reasoning_content`/`reasoning`, and tool calls' names and
/// arguments; a Responses answer's output texts, reasoning and function calls; a Messages
/// answer's text, thinking and every string of its tool inputs; a detokenized prompt; a
/// transcription's text. Embeddings and scores hold no text.
fn answer_strings(endpoint: Endpoint, v: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut take = |p: String, always: bool| match v.pointer(&p) {
        Some(Value::String(t)) => out.push((p, t.clone())),
        // A choice without text still counts as one (rules that look at the answer's
        // existence, and webhooks, see every choice).
        _ if always => out.push((p, String::new())),
        Some(other) => collect_leaves(other, &p, &mut out),
        None => {}
    };
    let len = |p: &str| v.pointer(p).and_then(Value::as_array).map_or(0, Vec::len);
    match endpoint {
        Endpoint::Chat | Endpoint::Completions => {
            for i in 0..len("/choices") {
                if endpoint == Endpoint::Completions {
                    take(format!("/choices/{i}/text"), true);
                    continue;
                }
                take(format!("/choices/{i}/message/content"), true);
                for f in ["reasoning_content", "reasoning"] {
                    take(format!("/choices/{i}/message/{f}"), false);
                }
                for j in 0..len(&format!("/choices/{i}/message/tool_calls")) {
                    for f in ["name", "arguments"] {
                        take(format!("/choices/{i}/message/tool_calls/{j}/function/{f}"), false);
                    }
                }
            }
        }
        Endpoint::Responses | Endpoint::ResponseRetrieve | Endpoint::ResponseCancel => {
            for i in 0..len("/output") {
                for f in ["name", "arguments"] {
                    take(format!("/output/{i}/{f}"), false);
                }
                for part in ["content", "summary"] {
                    for j in 0..len(&format!("/output/{i}/{part}")) {
                        for f in ["text", "refusal"] {
                            take(format!("/output/{i}/{part}/{j}/{f}"), false);
                        }
                    }
                }
            }
        }
        Endpoint::Messages => {
            for i in 0..len("/content") {
                for f in ["text", "thinking", "input"] {
                    take(format!("/content/{i}/{f}"), false);
                }
            }
        }
        Endpoint::Detokenize => take("/prompt".into(), false),
        Endpoint::Transcriptions | Endpoint::Translations => take("/text".into(), false),
        Endpoint::MessagesCountTokens
        | Endpoint::Embeddings
        | Endpoint::Pooling
        | Endpoint::Classify
        | Endpoint::Score
        | Endpoint::ScoreV1
        | Endpoint::Rerank
        | Endpoint::RerankV1
        | Endpoint::RerankV2
        | Endpoint::Tokenize => {}
    }
    out
}

/// Every string under `v` (a tool call's input object), with its pointer; bounded as the
/// prompt's strings are (`policy::request::MAX_PROMPT_STRINGS`, `MAX_POINTER_BYTES`): past
/// either, the `UNREADABLE` marker is pushed so that the
/// answer is withheld rather than passed unread.
fn collect_leaves(v: &Value, path: &str, out: &mut Vec<(String, String)>) {
    let mut budget = request::MAX_POINTER_BYTES;
    if leaves(v, path, out, &mut budget).is_err() {
        out.push((UNREADABLE.to_owned(), String::new()));
    }
}

fn leaves(v: &Value, path: &str, out: &mut Vec<(String, String)>, budget: &mut usize) -> Result<(), ()> {
    if out.len() >= request::MAX_PROMPT_STRINGS || path.len() > *budget {
        return Err(());
    }
    *budget -= path.len();
    match v {
        Value::String(s) => out.push((path.to_owned(), s.clone())),
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                leaves(x, &format!("{path}/{i}"), out, budget)?;
            }
        }
        Value::Object(map) => {
            for (k, x) in map {
                leaves(x, &format!("{path}/{}", k.replace('~', "~0").replace('/', "~1")), out, budget)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The pointer marking an answer with more strings than the guardrails read.
const UNREADABLE: &str = "\u{0}unreadable";

/// The answer to a request whose audit record could not be written (`on_full = "reject"`):
/// retryable, like a full audit queue.
pub(super) fn audit_unavailable() -> ApiError {
    ApiError::unavailable("The audit log could not record this request, so its answer is withheld; retry shortly.")
        .with_code("audit_unavailable")
}

/// One request's audit record on its way to the writer. Dropped unfinished (the client left
/// mid-stream), it is still recorded, as `client_gone`.
pub struct Flow {
    guard: Arc<Guard>,
    slot: Option<Slot>,
    pub(super) rec: AuditRecord,
    started: Instant,
    pub(super) tenant: String,
    /// The client's key is not an admin key: routing details (`x-kvmesh-route`, which tells
    /// how much of a prompt was cached) are not for it.
    pub(super) hide_route: bool,
    /// The answer's text as released to the client (for webhooks and `record_text`).
    pub(super) text: String,
    /// Characters of the prompt's texts (a length estimate for models without a tokenizer).
    pub(super) prompt_chars: usize,
    /// The node asked the engine for a stream's usage chunk the client did not ask for: it is
    /// read for limits and not passed on.
    pub(super) hidden_usage: bool,
    /// Streamed content chunks seen: the completion tokens charged when the engine's usage
    /// never arrived (a stream cut short), about one token a chunk.
    pub(super) streamed_chunks: u64,
}

impl Flow {
    pub(super) fn new(guard: Arc<Guard>, slot: Option<Slot>, rec: AuditRecord, ctx: &RequestCtx) -> Self {
        Self {
            guard,
            slot,
            rec,
            started: ctx.started,
            tenant: ctx.tenant.clone(),
            hide_route: false,
            text: String::new(),
            prompt_chars: 0,
            hidden_usage: false,
            streamed_chunks: 0,
        }
    }

    fn close(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.rec.latency_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let charged = self.rec.completion_tokens.or((self.streamed_chunks > 0).then_some(self.streamed_chunks));
        if let (Some(n), true) = (charged, self.guard.limits_enabled) {
            let now = self.guard.now_ms();
            if let Ok(mut l) = self.guard.limiter.lock() {
                l.charge_tokens(&self.tenant, n, now);
            }
        }
        let slot = self.slot.take()?;
        if self.guard.audit.as_ref().is_some_and(|a| a.record_text) && !self.text.is_empty() {
            self.rec.response = Some(self.guard.redact_for_audit(Stage::Response, &self.text));
        }
        slot.submit(std::mem::take(&mut self.rec))
    }

    /// Queues the record and waits until it is written, so an answered request is on disk
    /// (in the OS) before the client sees the end of its answer. False when the record is not
    /// on file (the write failed, or the writer did not confirm it in time) and the audit
    /// refuses to serve unrecorded (`on_full = "reject"`): the caller then withholds the answer.
    #[must_use]
    pub(super) async fn finish(&mut self) -> bool {
        let must_record = self.guard.audit.as_ref().is_some_and(|a| a.on_full == crate::audit::OnFull::Reject);
        let had_slot = self.slot.is_some();
        let Some(ack) = self.close() else {
            // No audit trail, or (drop mode) a record dropped and marked by a gap; in reject mode
            // a record that could not be queued (the writer is gone) withholds the answer.
            return !(had_slot && must_record);
        };
        match tokio::time::timeout(AUDIT_ACK_TIMEOUT, ack).await {
            Ok(Ok(())) => true,
            Ok(Err(_)) => {
                tracing::error!(
                    "audit record not written; {}",
                    if must_record { "answer withheld" } else { "answering anyway (on_full = drop)" }
                );
                !must_record
            }
            Err(_) => {
                tracing::error!(
                    "audit writer did not confirm a record in time; {}",
                    if must_record { "answer withheld" } else { "answering anyway (on_full = drop)" }
                );
                !must_record
            }
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        if self.slot.is_some() {
            self.rec.outcome = Outcome::ClientGone;
            let _ = self.close();
        }
    }
}

pub(super) fn header_string(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn copy_kvmesh_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in ["x-kvmesh-served-by", "x-kvmesh-route", "x-request-id"] {
        if let Some(v) = from.get(name) {
            to.insert(name, v.clone());
        }
    }
}
