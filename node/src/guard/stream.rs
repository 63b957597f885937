//! Answer guardrails on a streamed answer, as it flows: the built-in rules scan each choice's
//! text with a held-back window (`policy::guardrails::StreamScanner`), webhooks run once on the
//! whole answer at its end (where a deny replaces the final `[DONE]` with an error event), and
//! the audit record is written before the stream's last bytes go out.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use futures::{Stream, StreamExt};
use kvmesh_policy::guardrails::{self, Context, Stage, StreamScanner};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{Endpoint, InferenceRequest};
use serde_json::{json, Value};

use super::answer::audit_unavailable;
use super::hooks::{Hook, Rules, WebhookVerdict};
use super::{Flow, Guard, MAX_CHECKED_BODY};
use crate::audit::{HookVerdict, Outcome, Verdict};
use sha2::{Digest, Sha256};

impl Guard {
    pub(super) fn stream_answer(self: Arc<Self>, flow: Flow, req: &InferenceRequest, resp: Response) -> Response {
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let state = StreamState {
            rw: Rewriter::new(self.rules(), self.window, req.endpoint, req.model.clone()),
            upstream: body.into_data_stream().boxed(),
            finished: false,
            flow: Some(flow),
            sent: Sha256::new(),
            guard: self,
        };
        Response::from_parts(parts, Body::from_stream(guarded_stream(state)))
    }
}

/// The stream events of Responses and Messages that carry about one generated token each.
const OTHER_API_DELTAS: &[&str] = &[
    "response.output_text.delta",
    "response.reasoning_text.delta",
    "response.function_call_arguments.delta",
    "content_block_delta",
];

type DataStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>;

struct StreamState {
    guard: Arc<Guard>,
    upstream: DataStream,
    /// The engine's events read and rewritten.
    rw: Rewriter,
    finished: bool,
    flow: Option<Flow>,
    /// The bytes sent to the client so far, for the record's `response_sha256`.
    sent: Sha256,
}

/// The rewriting half of a guarded stream, with no I/O: the engine's SSE bytes in, the bytes
/// for the client out, the built-in rules' scanners run on every text field as it flows. The
/// audit side (`Flow`) is passed in where there is one.
pub(crate) struct Rewriter {
    /// The hooks in force when the answer started; a reload mid-stream does not change them.
    rules: Arc<Rules>,
    /// The scanners' held-back window, in bytes.
    window: usize,
    /// Bytes of an SSE event not complete yet.
    buf: Vec<u8>,
    /// Per choice index and field: its scanner, and whether it has finished.
    scanners: BTreeMap<(u64, Field), (StreamScanner, bool)>,
    chat: bool,
    endpoint: Endpoint,
    model: String,
    /// The last data event with choices, to shape events that flush held-back text.
    template: Option<Value>,
    saw_done: bool,
    /// The last byte taken was a CR: a LF right after it ends the same line.
    after_cr: bool,
}

impl StreamState {
    /// The digest of what was sent, followed by `pending` (not sent yet).
    fn digest_with(&self, pending: &[u8]) -> String {
        let mut h = self.sent.clone();
        h.update(pending);
        hex::encode(h.finalize())
    }
}

fn push_text(flow: &mut Option<Flow>, released: &str) {
    if let Some(f) = flow {
        if f.text.len() < MAX_CHECKED_BODY {
            f.text.push_str(released);
        }
    }
}

impl Rewriter {
    pub(crate) fn new(rules: Arc<Rules>, window: usize, endpoint: Endpoint, model: String) -> Self {
        Self {
            rules,
            window,
            buf: Vec::new(),
            scanners: BTreeMap::new(),
            chat: endpoint == Endpoint::Chat,
            endpoint,
            model,
            template: None,
            saw_done: false,
            after_cr: false,
        }
    }

    fn ctx(&self, flow: &Option<Flow>) -> (String, String) {
        (self.model.clone(), flow.as_ref().map(|f| f.tenant.clone()).unwrap_or_default())
    }

    /// Takes a chunk of the engine's stream: handles every event it completes, appending what
    /// to send to `out`; stops at the first event a rule denies.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        flow: &mut Option<Flow>,
        out: &mut Vec<u8>,
    ) -> Result<(), guardrails::Denied> {
        // Lines as an SSE client splits them: CRLF, LF and a lone CR each end one. Kept as LF,
        // so the events below are found, and sent on, as the client reads them.
        for &b in chunk {
            match (b, self.after_cr) {
                (b'\n', true) => {}
                (b'\r', _) => self.buf.push(b'\n'),
                _ => self.buf.push(b),
            }
            self.after_cr = b == b'\r';
        }
        while let Some(pos) = find_event_end(&self.buf) {
            let ev_bytes: Vec<u8> = self.buf.drain(..pos + 2).collect();
            let ev = String::from_utf8_lossy(&ev_bytes[..pos]).into_owned();
            self.on_event(&ev, flow, out)?;
        }
        Ok(())
    }

    /// The engine's stream ended: the last, unterminated event, then whatever the scanners
    /// still hold back.
    pub(crate) fn end(&mut self, flow: &mut Option<Flow>, out: &mut Vec<u8>) -> Result<(), guardrails::Denied> {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            let rest = rest.trim_end_matches('\n').to_owned();
            self.on_event(&rest, flow, out)?;
        }
        self.flush(flow, out)
    }

    /// Whether the engine's `[DONE]` arrived.
    pub(crate) fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Handles one complete event (without its blank line); appends what to send to `out`.
    fn on_event(&mut self, ev: &str, flow: &mut Option<Flow>, out: &mut Vec<u8>) -> Result<(), guardrails::Denied> {
        // The event's data as a client reads it: every `data:` line, joined by newlines (an
        // event split over several lines is one JSON value to the client, and must be to the
        // rules too).
        let lines: Vec<&str> = ev.lines().filter_map(|l| l.strip_prefix("data:")).collect();
        if lines.is_empty() {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
            return Ok(());
        }
        let data = lines.iter().map(|l| l.strip_prefix(' ').unwrap_or(l)).collect::<Vec<_>>().join("\n");
        let data = data.trim_start();
        if data == "[DONE]" {
            self.flush(flow, out)?;
            self.saw_done = true;
            return Ok(());
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
            return Ok(());
        };
        if v.get("error").is_some() {
            if let Some(f) = flow.as_mut() {
                f.rec.outcome = Outcome::StreamError;
                f.rec.error = v["error"]["message"].as_str().map(str::to_owned);
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            let mut hidden = false;
            if let Some(f) = flow.as_mut() {
                f.rec.completion_tokens = Some(n);
                hidden = f.hidden_usage;
            }
            // The usage chunk the node asked for on the client's behalf: read, not sent.
            if hidden && v["choices"].as_array().is_none_or(Vec::is_empty) {
                return Ok(());
            }
        }
        // Responses (`response.completed`) and Messages (`message_delta`) report usage in their
        // own events; their text is not scanned here (admit refuses such streams when answer
        // rules read text), but their deltas are counted for a stream cut before its usage.
        let stored = self.endpoint.work() == kvmesh_policy::endpoint::Work::Stored;
        if let Some(n) =
            v.pointer("/response/usage/output_tokens").or(v.pointer("/usage/output_tokens")).filter(|_| !stored)
        {
            if let (Some(f), Some(n)) = (flow.as_mut(), n.as_u64()) {
                f.rec.completion_tokens = Some(n);
            }
        }
        if let (Some(f), Some(kind)) = (flow.as_mut(), v["type"].as_str()) {
            if OTHER_API_DELTAS.contains(&kind) {
                f.streamed_chunks = f.streamed_chunks.saturating_add(1);
            }
        }
        let (model, tenant) = self.ctx(flow);
        let ctx = Context { stage: Stage::Response, model: &model, tenant: &tenant, prompt_chars: 0 };
        let mut changed = false;
        let mut released_all = String::new();
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices.iter_mut() {
                let idx = c["index"].as_u64().unwrap_or(0);
                let finishing = !c["finish_reason"].is_null();
                // Every string the client reads of this chunk: the text, the reasoning, each
                // tool call's arguments; and, as the choice finishes, whatever its scanners
                // still hold.
                let mut fields = match self.chat {
                    true => vec![Field::Content, Field::ReasoningContent, Field::Reasoning],
                    false => vec![Field::Text],
                };
                if let Some(calls) = c.pointer("/delta/tool_calls").and_then(Value::as_array) {
                    fields.extend(calls.iter().filter_map(|t| t["index"].as_u64()).map(Field::ToolArguments));
                }
                if finishing {
                    let held =
                        self.scanners.iter().filter(|((i, _), (_, done))| *i == idx && !done).map(|((_, f), _)| *f);
                    let held: Vec<Field> = held.filter(|f| !fields.contains(f)).collect();
                    fields.extend(held);
                }
                for field in fields {
                    let text = field.get(c).map(str::to_owned);
                    let main = matches!(field, Field::Content | Field::Text);
                    if text.is_none() && !(finishing && (main || self.scanners.contains_key(&(idx, field)))) {
                        continue;
                    }
                    let (scanner, done) = self
                        .scanners
                        .entry((idx, field))
                        .or_insert_with(|| (StreamScanner::new(&self.rules.stream_rules, self.window), false));
                    if *done {
                        // Text for a choice after it finished (or after `[DONE]`): no engine
                        // sends it, and its scanner has released everything, so the rules could
                        // not read it together with the text before it. Withheld, not passed
                        // unread.
                        if !scanner.is_empty() && text.as_deref().is_some_and(|t| !t.is_empty()) {
                            field.set(c, String::new());
                            changed = true;
                        }
                        continue;
                    }
                    let mut released = scanner.push(&ctx, text.as_deref().unwrap_or(""))?;
                    if finishing {
                        released.push_str(&scanner.finish(&ctx)?);
                        *done = true;
                    }
                    if text.as_deref() != Some(released.as_str()) && !(text.is_none() && released.is_empty()) {
                        field.set(c, released.clone());
                        changed = true;
                    }
                    released_all.push_str(&released);
                }
            }
            self.template = Some(v.clone());
        }
        if let Some(f) = flow.as_mut() {
            // A chunk of text, reasoning or a tool call's arguments is about one token.
            let field = if self.chat { "/delta/content" } else { "/text" };
            let chunks = v["choices"].as_array().map_or(0, |cs| {
                cs.iter()
                    .filter(|c| {
                        let text = |p: &str| c.pointer(p).and_then(Value::as_str).is_some_and(|t| !t.is_empty());
                        text(field)
                            || text("/delta/reasoning_content")
                            || text("/delta/reasoning")
                            || c.pointer("/delta/tool_calls").is_some_and(|t| !t.is_null())
                    })
                    .count()
            });
            f.streamed_chunks = f.streamed_chunks.saturating_add(chunks as u64);
        }
        push_text(flow, &released_all);
        if changed {
            out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
        } else {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        Ok(())
    }

    /// Releases what unfinished choices still hold back, as events of their own.
    fn flush(&mut self, flow: &mut Option<Flow>, out: &mut Vec<u8>) -> Result<(), guardrails::Denied> {
        let (model, tenant) = self.ctx(flow);
        let ctx = Context { stage: Stage::Response, model: &model, tenant: &tenant, prompt_chars: 0 };
        let mut texts = Vec::new();
        for (key, (scanner, done)) in self.scanners.iter_mut() {
            if *done {
                continue;
            }
            *done = true;
            let rest = scanner.finish(&ctx)?;
            if !rest.is_empty() {
                texts.push((*key, rest));
            }
        }
        for ((idx, field), rest) in texts {
            let mut ev = self.template.clone().unwrap_or_else(|| json!({"object": "chat.completion.chunk"}));
            if let Some(o) = ev.as_object_mut() {
                o.remove("usage");
            }
            let mut choice = json!({"index": idx, "finish_reason": null});
            field.set(&mut choice, rest.clone());
            ev["choices"] = json!([choice]);
            out.extend_from_slice(format!("data: {ev}\n\n").as_bytes());
            push_text(flow, &rest);
        }
        Ok(())
    }
}

impl StreamState {
    fn record_stream_verdicts(&mut self, denied: Option<&guardrails::Denied>) {
        let mut by_rule: BTreeMap<String, Verdict> = BTreeMap::new();
        for (scanner, _) in self.rw.scanners.values() {
            for (name, v) in scanner.verdicts() {
                let e = by_rule.entry(name).or_insert(Verdict::Allow);
                if v == "rewrite" {
                    *e = Verdict::Rewrite;
                }
            }
        }
        if self.rw.scanners.is_empty() {
            for r in self.rw.rules.stream_rules.iter() {
                by_rule.insert(r.name().to_owned(), Verdict::Allow);
            }
        }
        let mut ordered = Vec::new();
        for r in &self.rw.rules.stream_rules {
            if let Some(d) = denied.filter(|d| d.rule == r.name()) {
                ordered.push((r.name().to_owned(), Verdict::Deny, Some(d.reason.clone())));
                break;
            }
            if let Some(v) = by_rule.get(r.name()) {
                ordered.push((r.name().to_owned(), *v, None));
            }
        }
        for (name, verdict, reason) in ordered {
            self.guard.count(&name, Stage::Response, verdict);
            if let Some(f) = &mut self.flow {
                f.rec.guardrails.push(HookVerdict { hook: name, stage: "response".into(), verdict, reason });
            }
        }
    }

    /// The end of a stream stopped by a rule: the error event, `[DONE]`, the record.
    async fn stop(&mut self, denied: &guardrails::Denied, out: &mut Vec<u8>) {
        self.record_stream_verdicts(Some(denied));
        let err = ApiError::content_filter(format!("The answer was stopped by guardrail `{}`.", denied.rule));
        out.extend_from_slice(err.to_sse_event().as_bytes());
        out.extend_from_slice(b"data: [DONE]\n\n");
        if let Some(mut f) = self.flow.take() {
            f.rec.response_sha256 = Some(self.digest_with(out));
            f.rec.outcome = Outcome::GuardrailStopped;
            f.rec.error = Some(err.message.clone());
            // Stopped either way; an unrecorded stop is logged by `finish`.
            let _recorded = f.finish().await;
        }
        self.finished = true;
    }

    /// The upstream ended: flush, run response webhooks on the whole answer, record, close.
    async fn end(&mut self, out: &mut Vec<u8>) {
        if let Err(d) = self.rw.end(&mut self.flow, out) {
            return self.stop(&d, out).await;
        }
        self.record_stream_verdicts(None);
        let mut denied_by_webhook = None;
        if let Some(mut f) = self.flow.take() {
            let guard = self.guard.clone();
            let rules = self.rw.rules.clone();
            let has_webhooks =
                rules.hooks.iter().any(|h| matches!(h, Hook::Webhook(w) if w.on.contains(&Stage::Response)));
            if has_webhooks {
                let ctx = Context { stage: Stage::Response, model: &self.rw.model, tenant: &f.tenant, prompt_chars: 0 };
                let mut texts = vec![f.text.clone()];
                let mut verdicts = Vec::new();
                // Built-in rules already ran on the stream: only the webhooks run here.
                for h in rules.hooks.iter() {
                    if let Hook::Webhook(w) = h {
                        if !w.on.contains(&Stage::Response) {
                            continue;
                        }
                        let outcome = guard.call_webhook(w, &ctx, &f.rec.request_id, &texts).await;
                        if let Ok(WebhookVerdict::Rewrite(new)) = &outcome {
                            texts = new.clone();
                        }
                        // The text is out already: a rewrite can only be recorded.
                        let verdict = w.verdict(outcome, true);
                        guard.count(&w.name, Stage::Response, verdict.0);
                        verdicts.push(HookVerdict {
                            hook: w.name.clone(),
                            stage: "response".into(),
                            verdict: verdict.0,
                            reason: verdict.1.clone(),
                        });
                        if verdict.0.blocks() {
                            denied_by_webhook = Some(w.name.clone());
                            break;
                        }
                    }
                }
                f.rec.guardrails.extend(verdicts);
            }
            if let Some(rule) = &denied_by_webhook {
                let err = ApiError::content_filter(format!("The answer was stopped by guardrail `{rule}`."));
                out.extend_from_slice(err.to_sse_event().as_bytes());
                f.rec.outcome = Outcome::GuardrailStopped;
                f.rec.error = Some(err.message.clone());
            }
            f.rec.response_sha256 = Some(self.digest_with(out));
            // The end of the answer waits for its record: a stream whose record is not on file
            // ends with an error, not `[DONE]`.
            if !f.finish().await {
                out.extend_from_slice(audit_unavailable().to_sse_event().as_bytes());
            } else if self.rw.saw_done() || denied_by_webhook.is_some() {
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
        } else if self.rw.saw_done() {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        self.finished = true;
    }
}

/// A string of a streamed choice that answer rules read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    /// A chat delta's `content`.
    Content,
    /// A completion's `text`.
    Text,
    ReasoningContent,
    Reasoning,
    /// The arguments of the tool call with this `index`.
    ToolArguments(u64),
}

impl Field {
    fn get(self, choice: &Value) -> Option<&str> {
        match self {
            Field::Content => choice.pointer("/delta/content"),
            Field::Text => choice.get("text"),
            Field::ReasoningContent => choice.pointer("/delta/reasoning_content"),
            Field::Reasoning => choice.pointer("/delta/reasoning"),
            Field::ToolArguments(j) => choice
                .pointer("/delta/tool_calls")?
                .as_array()?
                .iter()
                .find(|t| t["index"].as_u64() == Some(j))?
                .pointer("/function/arguments"),
        }
        .and_then(Value::as_str)
    }

    fn set(self, choice: &mut Value, text: String) {
        if self == Field::Text {
            choice["text"] = Value::String(text);
            return;
        }
        if !choice["delta"].is_object() {
            choice["delta"] = json!({});
        }
        let delta = &mut choice["delta"];
        let key = match self {
            Field::Content | Field::Text => "content",
            Field::ReasoningContent => "reasoning_content",
            Field::Reasoning => "reasoning",
            Field::ToolArguments(j) => {
                if !delta["tool_calls"].is_array() {
                    delta["tool_calls"] = json!([]);
                }
                if let Some(calls) = delta["tool_calls"].as_array_mut() {
                    match calls.iter_mut().find(|t| t["index"].as_u64() == Some(j)) {
                        Some(call) => {
                            if !call["function"].is_object() {
                                call["function"] = json!({});
                            }
                            call["function"]["arguments"] = Value::String(text);
                        }
                        None => calls.push(json!({"index": j, "function": {"arguments": text}})),
                    }
                }
                return;
            }
        };
        delta[key] = Value::String(text);
    }
}

fn guarded_stream(state: StreamState) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    futures::stream::unfold(state, |mut s| async move {
        let mut out = Vec::new();
        while out.is_empty() && !s.finished {
            match s.upstream.next().await {
                Some(Ok(chunk)) => {
                    if let Err(d) = s.rw.feed(&chunk, &mut s.flow, &mut out) {
                        s.stop(&d, &mut out).await;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "answer stream failed inside the guard");
                    if let Some(f) = &mut s.flow {
                        f.rec.outcome = Outcome::StreamError;
                        f.rec.error = Some(e.to_string());
                    }
                    s.end(&mut out).await;
                }
                None => s.end(&mut out).await,
            }
        }
        if out.is_empty() {
            None
        } else {
            if s.flow.is_some() {
                s.sent.update(&out);
            }
            Some((Ok(Bytes::from(out)), s))
        }
    })
}

/// The engine's stream `chunks`, as this node's guard rewrites it with `guardrails` (built-in
/// rules; webhooks are not called) and a held-back window of `window` bytes, with no audit
/// record: the bytes for the client, and the rule that stopped the stream, if one did (the
/// error event that follows then is not included). For the fuzz targets (`crate::fuzzing`).
pub(crate) fn rewrite_for_fuzzing(
    guardrails: &[kvmesh_policy::guardrails::GuardrailConfig],
    window: usize,
    endpoint: Endpoint,
    chunks: &[&[u8]],
) -> Result<(Vec<u8>, Option<guardrails::Denied>), String> {
    let rules = Rules::build(guardrails).map_err(|e| e.to_string())?;
    let mut rw = Rewriter::new(Arc::new(rules), window, endpoint, "model".into());
    let mut out = Vec::new();
    let mut flow = None;
    for chunk in chunks {
        if let Err(d) = rw.feed(chunk, &mut flow, &mut out) {
            return Ok((out, Some(d)));
        }
    }
    match rw.end(&mut flow, &mut out) {
        Ok(()) => {
            if rw.saw_done() {
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            Ok((out, None))
        }
        Err(d) => Ok((out, Some(d))),
    }
}

/// Index of the `\n\n` that ends the first complete event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny_secret() -> Vec<kvmesh_policy::guardrails::GuardrailConfig> {
        vec![kvmesh_policy::guardrails::GuardrailConfig::Deny {
            name: "no-secret".into(),
            on: vec![Stage::Response],
            patterns: vec!["secret".into()],
            words: Vec::new(),
        }]
    }

    /// Found by the `sse` fuzz target: a choice's text after its `finish_reason` passed
    /// unscanned, so a word split around the finish reached the client.
    #[test]
    fn text_after_a_choice_finished_is_withheld() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"text\":\"se\",\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"cret secret\"}]}\n\n",
            "data: [DONE]\n\n",
            "data: {\"choices\":[{\"index\":0,\"text\":\"secret\"}]}\n\n",
        );
        let (out, denied) =
            rewrite_for_fuzzing(&deny_secret(), 64, Endpoint::Completions, &[stream.as_bytes()]).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(denied, None);
        assert!(!out.contains("cret") && !out.contains("secret"), "{out}");
        assert!(out.contains("\"text\":\"se\""), "the text before the finish is sent: {out}");
    }

    /// Found by the `sse` fuzz target: only an event's first `data:` line was read, so an event
    /// whose JSON went on over a second line (one value to an SSE client) passed unscanned.
    #[test]
    fn an_event_over_several_data_lines_is_scanned_whole() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":\n",
            "data: {\"content\":\"a secret\"}}]}\n\n",
            "data: [DONE]\n\n",
        );
        let (out, denied) = rewrite_for_fuzzing(&deny_secret(), 64, Endpoint::Chat, &[stream.as_bytes()]).unwrap();
        assert_eq!(denied.map(|d| d.rule), Some("no-secret".to_owned()), "{}", String::from_utf8_lossy(&out));
        assert!(!String::from_utf8_lossy(&out).contains("secret"));
    }

    /// Found by the `sse` fuzz target's author: events framed with CRLF or a lone CR (which SSE
    /// clients split on) were one unterminated event to the guard.
    #[test]
    fn events_framed_with_cr_are_read_as_a_client_reads_them() {
        for eol in ["\r\n", "\r"] {
            let ev = |text: &str| format!("data: {{\"choices\":[{{\"index\":0,\"text\":\"{text}\"}}]}}{eol}{eol}");
            let stream = [ev("a se"), ev("cret"), format!("data: [DONE]{eol}{eol}")].concat();
            // Cut between a CR and its LF too.
            let bytes = stream.as_bytes();
            let (head, tail) = bytes.split_at(bytes.iter().position(|b| *b == b'\r').unwrap() + 1);
            let (out, denied) = rewrite_for_fuzzing(&deny_secret(), 64, Endpoint::Completions, &[head, tail]).unwrap();
            let out = String::from_utf8_lossy(&out);
            assert_eq!(denied.map(|d| d.rule), Some("no-secret".to_owned()), "{eol:?}: {out}");
            assert!(!out.contains("cret"), "{eol:?}: {out}");
        }
    }

    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some(7));
        assert_eq!(find_event_end(b"data: x\n"), None);
    }
}
