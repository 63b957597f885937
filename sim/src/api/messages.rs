//! `POST /v1/messages` (and `/v1/messages/count_tokens`): Anthropic's Messages API as vLLM
//! serves it (vllm/entrypoints/anthropic/{api_router,serving,protocol}.py).
//!
//! As in vLLM, the request becomes a chat completion (`_convert_anthropic_to_openai_request`)
//! and the chat answer is translated back (`messages_full_converter`,
//! `message_stream_converter`). What vLLM does and this mirrors:
//! - the message `id` is the chat completion's id (`chatcmpl-…`), not `msg_…`;
//! - `stop_reason` maps `stop` → `end_turn` (a stop sequence too: vLLM never answers
//!   `stop_sequence`), `length` → `max_tokens`; `stop_sequence` is left out (None, dumped with
//!   `exclude_none`), as are `cache_*` usage fields;
//! - the stream is `message_start`, `content_block_start`, `content_block_delta`…,
//!   `content_block_stop`, `message_delta` (stop reason and usage), `message_stop`, then a bare
//!   `data: [DONE]`; no `ping`;
//! - errors from the chat path come in Anthropic's envelope with vLLM's status; a body that fails
//!   schema validation gets vLLM's app-wide validation answer, which is OpenAI-shaped (400,
//!   type `Bad Request`).
//!
//! `count_tokens` answers `{"input_tokens": n}` for the rendered prompt, as Anthropic's API
//! does; the vLLM source read for this had no such route (see the report in the branch).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kvmesh_policy::request::{self, Endpoint};
use serde_json::{json, Map, Value};

use super::vllm::{self, VllmError};
use super::{AppState, Generation, Piece};

/// `stop_reason_map`.
fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish.unwrap_or("stop") {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        _ => "end_turn",
    }
}

/// Schema checks pydantic makes on `AnthropicMessagesRequest` (and on the count request,
/// which has no `max_tokens`).
fn validate(obj: &Map<String, Value>, needs_max_tokens: bool) -> Result<(), VllmError> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        Some(Value::String(_)) => {
            return Err(VllmError::validation(
                "[{'type': 'value_error', 'loc': ('body', 'model'), 'msg': 'Value error, Model is required'}]",
            ))
        }
        None => return Err(VllmError::missing("model")),
        Some(_) => return Err(VllmError::wrong_type("model", "a valid string")),
    }
    if needs_max_tokens {
        match obj.get("max_tokens") {
            None => return Err(VllmError::missing("max_tokens")),
            Some(v) => match v.as_i64() {
                Some(n) if n > 0 => {}
                Some(_) => {
                    return Err(VllmError::validation(
                        "[{'type': 'value_error', 'loc': ('body', 'max_tokens'), 'msg': 'Value error, max_tokens must be positive'}]",
                    ))
                }
                None => return Err(VllmError::wrong_type("max_tokens", "a valid integer")),
            },
        }
    }
    let Some(messages) = obj.get("messages") else { return Err(VllmError::missing("messages")) };
    let Some(messages) = messages.as_array() else { return Err(VllmError::wrong_type("messages", "a valid list")) };
    for m in messages {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => {
                return Err(VllmError::validation(
                    "[{'type': 'literal_error', 'loc': ('body', 'messages', 'role'), 'msg': \"Input should be 'user' or 'assistant'\"}]",
                ))
            }
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(blocks)) => {
                for b in blocks {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text" | "image" | "tool_use" | "tool_result" | "thinking") => {}
                        _ => return Err(VllmError::validation(
                            "[{'type': 'literal_error', 'loc': ('body', 'messages', 'content', 'type'), 'msg': \"Input should be 'text', 'image', 'tool_use', 'tool_result' or 'thinking'\"}]",
                        )),
                    }
                }
            }
            None => return Err(VllmError::missing("messages.content")),
            Some(_) => return Err(VllmError::wrong_type("messages.content", "a valid string or list")),
        }
    }
    if let Some(tools) = obj.get("tools").filter(|t| !t.is_null()) {
        let Some(tools) = tools.as_array() else { return Err(VllmError::wrong_type("tools", "a valid list")) };
        for t in tools {
            if !t.get("name").is_some_and(Value::is_string) {
                return Err(VllmError::missing("tools.name"));
            }
            if !t.get("input_schema").is_some_and(Value::is_object) {
                return Err(VllmError::missing("tools.input_schema"));
            }
        }
    }
    Ok(())
}

/// Python's `str()` of a tool result's content (a string stays itself).
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `_convert_anthropic_to_openai_request`: the chat messages.
fn chat_messages(obj: &Map<String, Value>) -> Vec<Value> {
    let mut out = Vec::new();
    match obj.get("system") {
        Some(Value::String(s)) if !s.is_empty() => out.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) if !blocks.is_empty() => {
            let text: String =
                blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect();
            out.push(json!({"role": "system", "content": text}));
        }
        _ => {}
    }
    for m in obj.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let role = m["role"].as_str().unwrap_or("user");
        let mut msg = Map::new();
        msg.insert("role".into(), json!(role));
        match &m["content"] {
            Value::String(s) => {
                msg.insert("content".into(), json!(s));
            }
            Value::Array(blocks) => {
                let mut parts = Vec::new();
                let mut tool_calls = Vec::new();
                let mut reasoning = String::new();
                for b in blocks {
                    match b["type"].as_str() {
                        Some("text") => {
                            if let Some(t) = b["text"].as_str().filter(|t| !t.is_empty()) {
                                parts.push(json!({"type": "text", "text": t}));
                            }
                        }
                        Some("image") if b["source"].is_object() => parts.push(json!({
                            "type": "image_url", "image_url": {"url": b["source"]["data"].as_str().unwrap_or("")}
                        })),
                        Some("thinking") => {
                            if let Some(t) = b["thinking"].as_str() {
                                reasoning.push_str(t);
                            }
                        }
                        Some("tool_use") => {
                            let args = if b["input"].is_object() { b["input"].to_string() } else { "{}".into() };
                            tool_calls.push(json!({
                                "id": b["id"].as_str().map(str::to_owned).unwrap_or_else(|| format!("call_{}", super::now_secs())),
                                "type": "function",
                                "function": {"name": b["name"].as_str().unwrap_or(""), "arguments": args},
                            }));
                        }
                        Some("tool_result") => {
                            let content = match &b["content"] {
                                Value::Null => String::new(),
                                Value::String(s) if s.is_empty() => String::new(),
                                Value::Array(a) if a.is_empty() => String::new(),
                                v => py_str(v),
                            };
                            if role == "user" {
                                // vLLM reads the block's `id` (not `tool_use_id`).
                                out.push(json!({"role": "tool", "tool_call_id": b["id"].as_str().unwrap_or(""), "content": content}));
                            } else {
                                parts.push(json!({"type": "text", "text": format!("Tool result: {content}")}));
                            }
                        }
                        _ => {}
                    }
                }
                if !reasoning.is_empty() {
                    msg.insert("reasoning".into(), json!(reasoning));
                }
                if !tool_calls.is_empty() {
                    msg.insert("tool_calls".into(), json!(tool_calls));
                }
                if parts.len() == 1 && parts[0]["type"] == "text" {
                    msg.insert("content".into(), parts[0]["text"].clone());
                } else if !parts.is_empty() {
                    msg.insert("content".into(), json!(parts));
                } else if tool_calls.is_empty() && reasoning.is_empty() {
                    continue;
                }
            }
            _ => continue,
        }
        out.push(Value::Object(msg));
    }
    out
}

/// The chat completion request vLLM builds from a Messages request.
fn chat_request(obj: &Map<String, Value>) -> Value {
    let mut chat = Map::new();
    chat.insert("model".into(), obj["model"].clone());
    chat.insert("messages".into(), json!(chat_messages(obj)));
    if let Some(m) = obj.get("max_tokens") {
        chat.insert("max_tokens".into(), m.clone());
    }
    for (from, to) in
        [("stop_sequences", "stop"), ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")]
    {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(tools) = obj.get("tools").and_then(Value::as_array) {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut schema = t["input_schema"].clone();
                if let Some(o) = schema.as_object_mut() {
                    o.entry("type").or_insert(json!("object"));
                }
                json!({"type": "function", "function": {
                    "name": t["name"], "description": t.get("description").cloned().unwrap_or(Value::Null), "parameters": schema,
                }})
            })
            .collect();
        chat.insert("tools".into(), json!(tools));
    }
    Value::Object(chat)
}

pub(crate) async fn create(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let obj = match vllm::body_object(&st, body) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = validate(&obj, true) {
        return e.into_response();
    }
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let mut g = match super::start_chat(&st, &headers, &chat_request(&obj)).await {
        Ok(g) => g,
        Err(e) => return VllmError::from(e).anthropic_response(),
    };
    if stream {
        return stream_response(g);
    }
    loop {
        match g.next().await {
            Piece::Text(_) if g.finish.is_none() => continue,
            Piece::Text(_) | Piece::Finished => break,
            Piece::Failed(e) => return VllmError::from(e).anthropic_response(),
        }
    }
    let mut content = Vec::new();
    if !g.text.is_empty() {
        content.push(json!({"type": "text", "text": g.text}));
    }
    axum::Json(json!({
        "id": g.job.id,
        "type": "message",
        "role": "assistant",
        "content": content,
        "model": g.job.model,
        "stop_reason": stop_reason(g.finish.as_ref().map(|(r, _)| *r)),
        "usage": {"input_tokens": g.prompt_tokens, "output_tokens": g.completion_tokens},
    }))
    .into_response()
}

enum Phase {
    Start,
    Tokens,
    Done,
    End,
}

struct Streamer {
    g: Generation,
    phase: Phase,
    block_open: bool,
}

impl Streamer {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        let mut out = Vec::new();
        match self.phase {
            Phase::Start | Phase::Tokens => {
                let piece = self.g.next().await;
                if let Phase::Start = self.phase {
                    self.phase = Phase::Tokens;
                    out.extend_from_slice(&vllm::named_event(
                        "message_start",
                        &json!({"type": "message_start", "message": {
                            "id": self.g.job.id, "content": [], "model": self.g.job.model,
                            "stop_reason": null, "stop_sequence": null,
                            "usage": {"input_tokens": self.g.prompt_tokens, "output_tokens": 0},
                        }}),
                    ));
                }
                match piece {
                    Piece::Text(t) => {
                        if !t.is_empty() {
                            if !self.block_open {
                                self.block_open = true;
                                out.extend_from_slice(&vllm::named_event(
                                    "content_block_start",
                                    &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                                ));
                            }
                            out.extend_from_slice(&vllm::named_event(
                                "content_block_delta",
                                &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
                            ));
                        }
                        if self.g.finish.is_some() {
                            self.finish(&mut out);
                        }
                    }
                    Piece::Finished => self.finish(&mut out),
                    Piece::Failed(e) => {
                        let e = VllmError::from(e);
                        out.extend_from_slice(&vllm::named_event(
                            "error",
                            &json!({"type": "error", "error": {"type": "internal_error", "message": e.message}}),
                        ));
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        self.phase = Phase::End;
                    }
                }
            }
            Phase::Done => {
                out.extend_from_slice(&vllm::named_event("message_stop", &json!({"type": "message_stop"})));
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.phase = Phase::End;
            }
            Phase::End => return None,
        }
        Some(Bytes::from(out))
    }

    /// The chat stream's usage chunk, translated: the open block ends, then `message_delta`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.block_open {
            self.block_open = false;
            out.extend_from_slice(&vllm::named_event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": 0}),
            ));
        }
        out.extend_from_slice(&vllm::named_event(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": stop_reason(self.g.finish.as_ref().map(|(r, _)| *r))},
                    "usage": {"input_tokens": self.g.prompt_tokens, "output_tokens": self.g.completion_tokens}}),
        ));
        self.phase = Phase::Done;
    }
}

fn stream_response(g: Generation) -> Response {
    let s = Streamer { g, phase: Phase::Start, block_open: false };
    let stream =
        futures::stream::unfold(s, |mut s| async move { s.next_chunk().await.map(|b| (Ok::<_, Infallible>(b), s)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            VllmError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", "failed to build response", None)
                .anthropic_response()
        })
}

/// `POST /v1/messages/count_tokens`: the prompt's token count, `{"input_tokens": n}`.
pub(crate) async fn count_tokens(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let obj = match vllm::body_object(&st, body) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = validate(&obj, false) {
        return e.into_response();
    }
    if let Err(e) = vllm::check_model(&st, &obj) {
        return e.anthropic_response();
    }
    let mut chat = chat_request(&obj);
    chat["max_tokens"] = json!(1);
    let count = async {
        let bytes = serde_json::to_vec(&chat).map_err(|e| kvmesh_policy::openai::ApiError::internal(e.to_string()))?;
        let req = request::parse(Endpoint::Chat, &bytes)?;
        let t = st.tokenizer.clone();
        let vocab = t.vocab_size();
        tokio::task::spawn_blocking(move || {
            super::tokenize(&t, &req.prompt, req.chat.as_ref(), req.add_generation_prompt, vocab)
        })
        .await
        .map_err(|e| kvmesh_policy::openai::ApiError::internal(e.to_string()))?
    };
    match count.await {
        Ok((ids, _)) => axum::Json(json!({"input_tokens": ids.len()})).into_response(),
        Err(e) => VllmError::from(e).anthropic_response(),
    }
}
