//! `POST /v1/responses`, `GET /v1/responses/{id}`, `POST /v1/responses/{id}/cancel`: the
//! OpenAI Responses API as vLLM serves it for a non-harmony model
//! (vllm/entrypoints/openai/responses/{api_router,serving,protocol,utils}.py).
//!
//! As in vLLM, a request is turned into chat messages (`construct_input_messages`:
//! `instructions` as a system message, then the previous response's stored messages and its
//! output messages, then the new input) and generated on the chat path.
//!
//! Differences from vLLM, on purpose:
//! - The store is on (vLLM needs `VLLM_ENABLE_RESPONSES_API_STORE=1`; without it `store` is
//!   silently ignored and `background` refused). It is bounded: at most `STORE_CAP` responses,
//!   the oldest dropped first (vLLM's grows without bound).
//! - `background` with `stream` streams the events directly (vLLM keeps them in an event store
//!   for `GET ?stream=true`); `GET ?stream=true` is answered as vLLM answers it for a response
//!   that has no stored events (400, `Unknown response_id`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::vllm::{self, VllmError};
use super::{AppState, Generation, Piece};

/// The most responses one engine keeps.
pub const STORE_CAP: usize = 10_000;

/// A stored response and the chat messages its request turned into (vLLM's `response_store`
/// and `msg_store`, together).
#[derive(Clone)]
struct Stored {
    response: Value,
    messages: Vec<Value>,
}

/// Stored responses of one engine, oldest evicted past `STORE_CAP`, plus the background
/// generations still running (bounded by the same cap).
#[derive(Default)]
pub struct ResponseStore {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Stored>,
    order: VecDeque<String>,
    running: HashMap<String, tokio::task::AbortHandle>,
}

impl ResponseStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Option<Stored> {
        self.lock().map.get(id).cloned()
    }

    fn put(&self, id: &str, stored: Stored) {
        let mut g = self.lock();
        if g.map.insert(id.to_owned(), stored).is_none() {
            g.order.push_back(id.to_owned());
        }
        while g.map.len() > STORE_CAP {
            let Some(old) = g.order.pop_front() else { break };
            g.map.remove(&old);
            if let Some(h) = g.running.remove(&old) {
                h.abort();
            }
        }
    }

    /// Stores a finished response unless it was cancelled meanwhile (vLLM keeps a cancelled one).
    fn finish(&self, id: &str, stored: Stored) {
        let cancelled = self.lock().map.get(id).is_some_and(|s| s.response["status"] == "cancelled");
        if !cancelled {
            self.put(id, stored);
        }
        self.lock().running.remove(id);
    }

    /// How many responses are kept (for tests of the bound).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the response object repeats from the request (`ResponsesResponse.from_request`).
#[derive(Clone)]
struct Echo {
    id: String,
    model: String,
    instructions: Value,
    metadata: Value,
    parallel_tool_calls: Value,
    temperature: Value,
    top_p: Value,
    tool_choice: Value,
    tools: Value,
    background: bool,
    max_output_tokens: Option<u64>,
    max_tool_calls: Value,
    previous_response_id: Value,
    reasoning: Value,
    service_tier: Value,
    text: Value,
    truncation: Value,
    user: Value,
    store: bool,
}

impl Echo {
    fn response(&self, created_at: u64, status: &str, output: Vec<Value>, usage: Value, max_tokens: u64) -> Value {
        let incomplete = if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null };
        json!({
            "id": self.id,
            "created_at": created_at,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "metadata": self.metadata,
            "model": self.model,
            "object": "response",
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "temperature": self.temperature,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "background": self.background,
            "max_output_tokens": max_tokens,
            "max_tool_calls": self.max_tool_calls,
            "previous_response_id": self.previous_response_id,
            "prompt": null,
            "reasoning": self.reasoning,
            "service_tier": self.service_tier,
            "status": status,
            "text": self.text,
            "top_logprobs": null,
            "truncation": self.truncation,
            "usage": usage,
            "user": self.user,
            "input_messages": null,
            "output_messages": null,
        })
    }
}

fn opt_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, VllmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(VllmError::wrong_type(k, "a valid string")),
    }
}

fn opt_bool(o: &Map<String, Value>, k: &str, default: bool) -> Result<bool, VllmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(VllmError::wrong_type(k, "a valid boolean")),
    }
}

fn opt_u64(o: &Map<String, Value>, k: &str) -> Result<Option<u64>, VllmError> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| VllmError::wrong_type(k, "a valid integer")),
    }
}

/// One input item as a chat message (`_construct_single_message_from_response_item`).
fn item_message(item: &Value) -> Result<Value, VllmError> {
    let Some(o) = item.as_object() else {
        return Err(VllmError::wrong_type("input", "a valid list of input items"));
    };
    let field = |k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
    match o.get("type").and_then(Value::as_str) {
        Some("function_call") => {
            let (Some(call_id), Some(name), Some(arguments)) = (field("call_id"), field("name"), field("arguments"))
            else {
                return Err(VllmError::validation(
                    "[{'loc': ('body', 'input', 'function_call'), 'msg': 'call_id, name and arguments are required'}]",
                ));
            };
            Ok(json!({"role": "assistant", "tool_calls": [
                {"id": call_id, "function": {"name": name, "arguments": arguments}, "type": "function"}
            ]}))
        }
        Some("function_call_output") => Ok(json!({
            "role": "tool", "content": o.get("output").cloned().unwrap_or(Value::Null),
            "tool_call_id": o.get("call_id").cloned().unwrap_or(Value::Null),
        })),
        Some("reasoning") => {
            if o.get("encrypted_content").is_some_and(|v| !v.is_null()) {
                return Err(VllmError::bad_request("Encrypted content is not supported.", None));
            }
            let text = |k: &str| {
                o.get(k).and_then(Value::as_array).filter(|a| a.len() == 1).and_then(|a| a[0]["text"].as_str())
            };
            let reasoning = text("summary").or_else(|| text("content")).unwrap_or("");
            Ok(json!({"role": "assistant", "reasoning": reasoning}))
        }
        None | Some("message") => {
            let role = o.get("role").and_then(Value::as_str);
            let content = o.get("content");
            match (role, content) {
                (Some(role), Some(c)) if c.is_string() || c.is_array() => {
                    // An output message (assistant, with an id and status) becomes its first text.
                    if role == "assistant" && o.contains_key("id") && c.is_array() {
                        let text = c.get(0).and_then(|p| p.get("text")).cloned().unwrap_or(json!(""));
                        return Ok(json!({"role": "assistant", "content": text}));
                    }
                    Ok(json!({"role": role, "content": text_parts(c)}))
                }
                _ => Err(VllmError::validation(
                    "[{'loc': ('body', 'input', 'message'), 'msg': 'a message needs a role and a content'}]",
                )),
            }
        }
        Some(other) => Err(VllmError::bad_request(
            format!("Input items of type `{other}` are not supported by this engine."),
            Some("input"),
        )),
    }
}

/// Content with `input_text`/`output_text` parts as `text` parts: vLLM's chat parsing reads all
/// three the same way (`_parse_chat_message_content_part`), the chat request parser here only
/// the last.
fn text_parts(content: &Value) -> Value {
    match content {
        Value::Array(parts) => Value::Array(
            parts
                .iter()
                .map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text") => json!({"type": "text", "text": p["text"]}),
                    _ => p.clone(),
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `construct_input_messages`.
fn input_messages(instructions: Option<&str>, input: &Value, prev: Option<&Stored>) -> Result<Vec<Value>, VllmError> {
    let mut messages = Vec::new();
    if let Some(i) = instructions.filter(|i| !i.is_empty()) {
        messages.push(json!({"role": "system", "content": i}));
    }
    if let Some(p) = prev {
        messages.extend(p.messages.iter().cloned());
        for item in p.response["output"].as_array().into_iter().flatten() {
            if item["type"] == "message" {
                for c in item["content"].as_array().into_iter().flatten() {
                    messages.push(json!({"role": "assistant", "content": c["text"]}));
                }
            }
        }
    }
    match input {
        Value::String(s) => messages.push(json!({"role": "user", "content": s})),
        Value::Array(items) => {
            for item in items {
                messages.push(item_message(item)?);
            }
        }
        _ => return Err(VllmError::wrong_type("input", "a valid string or a list of input items")),
    }
    Ok(messages)
}

/// `tools` in chat form (`construct_tool_dicts`), or none when `tool_choice` is "none".
fn chat_tools(tools: &[Value], tool_choice: &Value) -> Result<Option<Vec<Value>>, VllmError> {
    if tools.is_empty() || tool_choice == "none" {
        return Ok(None);
    }
    tools
        .iter()
        .map(|t| match t.get("type").and_then(Value::as_str) {
            Some("function") if t.get("name").is_some_and(Value::is_string) => {
                let mut f = t.clone();
                if let Some(o) = f.as_object_mut() {
                    o.remove("type");
                    o.remove("strict");
                }
                Ok(json!({"type": "function", "function": f}))
            }
            Some("function") => Err(VllmError::missing("tools.function.name")),
            _ => Err(VllmError::bad_request("Only function tools are supported by this engine.", Some("tools"))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Everything a create request decided before generation starts.
struct Plan {
    echo: Echo,
    messages: Vec<Value>,
    chat: Value,
    stream: bool,
}

fn plan(st: &AppState, obj: &Map<String, Value>) -> Result<Plan, VllmError> {
    // Pydantic validation first (these fail before vLLM's handler runs).
    let input = obj.get("input").ok_or_else(|| VllmError::missing("input"))?;
    if obj.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(VllmError::validation("prompt template is not supported (parameter=prompt)"));
    }
    let background = opt_bool(obj, "background", false)?;
    let store = opt_bool(obj, "store", true)?;
    if background && !store {
        return Err(VllmError::validation(
            "[{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, background can only be used when `store` is true'}]",
        ));
    }
    if let Some(Value::String(s)) = obj.get("cache_salt") {
        if s.is_empty() {
            return Err(VllmError::validation("Parameter 'cache_salt' must be a non-empty string if provided."));
        }
    }
    let stream = opt_bool(obj, "stream", false)?;
    let instructions = opt_str(obj, "instructions")?;
    let previous = opt_str(obj, "previous_response_id")?;
    let max_output_tokens = opt_u64(obj, "max_output_tokens")?;
    let tools: Vec<Value> = match obj.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(VllmError::wrong_type("tools", "a valid list")),
    };
    let tool_choice = obj.get("tool_choice").cloned().unwrap_or(json!("auto"));
    let id = match opt_str(obj, "request_id")? {
        Some(id) => id.to_owned(),
        None => format!("resp_{}", vllm::random_uuid()),
    };

    // Then `create_responses`.
    let model = vllm::check_model(st, obj)?;
    let prev = match previous {
        Some(p) => Some(st.responses.get(p).ok_or_else(|| not_found(p))?),
        None => None,
    };
    let messages = input_messages(instructions, input, prev.as_ref())?;
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), json!(messages));
    if let Some(t) = chat_tools(&tools, &tool_choice)? {
        chat.insert("tools".into(), json!(t));
    }
    if let Some(m) = max_output_tokens {
        chat.insert("max_tokens".into(), json!(m));
    }
    for k in ["stop", "seed", "ignore_eos", "cache_salt", "temperature", "top_p", "top_k"] {
        if let Some(v) = obj.get(k).filter(|v| !v.is_null()) {
            chat.insert(k.into(), v.clone());
        }
    }
    let echo = Echo {
        id,
        model,
        instructions: obj.get("instructions").cloned().unwrap_or(Value::Null),
        metadata: obj.get("metadata").cloned().unwrap_or(Value::Null),
        parallel_tool_calls: obj.get("parallel_tool_calls").cloned().filter(|v| !v.is_null()).unwrap_or(json!(true)),
        temperature: obj.get("temperature").cloned().filter(|v| !v.is_null()).unwrap_or(json!(1.0)),
        top_p: obj.get("top_p").cloned().filter(|v| !v.is_null()).unwrap_or(json!(1.0)),
        tool_choice,
        tools: json!(tools),
        background,
        max_output_tokens,
        max_tool_calls: obj.get("max_tool_calls").cloned().unwrap_or(Value::Null),
        previous_response_id: obj.get("previous_response_id").cloned().unwrap_or(Value::Null),
        reasoning: obj.get("reasoning").cloned().unwrap_or(Value::Null),
        service_tier: obj.get("service_tier").cloned().filter(|v| !v.is_null()).unwrap_or(json!("auto")),
        text: obj.get("text").cloned().unwrap_or(Value::Null),
        truncation: obj.get("truncation").cloned().filter(|v| !v.is_null()).unwrap_or(json!("disabled")),
        user: obj.get("user").cloned().unwrap_or(Value::Null),
        store,
    };
    Ok(Plan { echo, messages, chat: Value::Object(chat), stream })
}

/// `_make_not_found_error`.
fn not_found(id: &str) -> VllmError {
    VllmError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("Response with id '{id}' not found."),
        Some("response_id"),
    )
}

/// `max_output_tokens` as the response reports it: the sampling `max_tokens`, which is the
/// request's value or, without one, what the context leaves after the prompt.
fn max_tokens(st: &AppState, echo: &Echo, prompt_tokens: usize) -> u64 {
    let room = (st.max_model_len as u64).saturating_sub(prompt_tokens as u64);
    echo.max_output_tokens.map_or(room, |m| m.min(room))
}

fn usage(g: &Generation) -> Value {
    json!({
        "input_tokens": g.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": g.cached_tokens,
            "input_tokens_per_turn": [g.prompt_tokens],
            "cached_tokens_per_turn": [g.cached_tokens],
        },
        "output_tokens": g.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [g.completion_tokens],
            "tool_output_tokens_per_turn": [0],
        },
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    })
}

/// The final response object of a finished generation (`responses_full_generator`).
fn final_response(st: &AppState, echo: &Echo, g: &Generation) -> Value {
    let status = match g.finish.as_ref().map(|(r, _)| *r) {
        Some("length") => "incomplete",
        _ => "completed",
    };
    let mut output = Vec::new();
    if !g.text.is_empty() {
        output.push(json!({
            "id": format!("msg_{}", vllm::random_uuid()),
            "content": [{"annotations": [], "text": g.text, "type": "output_text", "logprobs": null}],
            "role": "assistant",
            "status": "completed",
            "type": "message",
        }));
    }
    echo.response(g.job.created, status, output, usage(g), max_tokens(st, echo, g.prompt_tokens))
}

fn store_final(st: &AppState, plan_echo: &Echo, messages: Vec<Value>, response: &Value) {
    if plan_echo.store {
        st.responses.finish(&plan_echo.id, Stored { response: response.clone(), messages });
    }
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
    let plan = match plan(&st, &obj) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let mut g = match super::start_chat(&st, &headers, &plan.chat).await {
        Ok(g) => g,
        Err(e) => return VllmError::from(e).into_response(),
    };
    let Plan { echo, messages, stream, .. } = plan;
    if stream {
        return stream_response(st, echo, messages, g);
    }
    if echo.background {
        // Stored as queued at once; the generation runs on and replaces it when done.
        let queued =
            echo.response(g.job.created, "queued", Vec::new(), Value::Null, echo.max_output_tokens.unwrap_or(0));
        st.responses.put(&echo.id, Stored { response: queued.clone(), messages: messages.clone() });
        let st2 = st.clone();
        let echo2 = echo.clone();
        let task = tokio::spawn(async move {
            if drive(&mut g).await.is_ok() {
                let done = final_response(&st2, &echo2, &g);
                store_final(&st2, &echo2, messages, &done);
            } else {
                let mut g2 = st2.responses.lock();
                if let Some(s) = g2.map.get_mut(&echo2.id) {
                    if s.response["status"] != "cancelled" {
                        s.response["status"] = json!("failed");
                    }
                }
                g2.running.remove(&echo2.id);
            }
        });
        {
            let mut inner = st.responses.lock();
            if inner.running.len() < STORE_CAP {
                inner.running.insert(echo.id.clone(), task.abort_handle());
            }
        }
        return axum::Json(queued).into_response();
    }
    if let Err(e) = drive(&mut g).await {
        return VllmError::from(e).into_response();
    }
    let response = final_response(&st, &echo, &g);
    store_final(&st, &echo, messages, &response);
    axum::Json(response).into_response()
}

/// Runs a generation to its end.
async fn drive(g: &mut Generation) -> Result<(), kvmesh_policy::openai::ApiError> {
    loop {
        match g.next().await {
            Piece::Text(_) if g.finish.is_none() => continue,
            Piece::Text(_) | Piece::Finished => return Ok(()),
            Piece::Failed(e) => return Err(e),
        }
    }
}

/// Where a Responses stream is (`_process_simple_streaming_events` and the events around it).
struct Streamer {
    st: Arc<AppState>,
    echo: Echo,
    messages: Option<Vec<Value>>,
    g: Generation,
    seq: u64,
    item_id: String,
    content_index: u64,
    started_item: bool,
    text: String,
    phase: Phase,
}

#[derive(PartialEq)]
enum Phase {
    Start,
    Tokens,
    End,
    Done,
}

impl Streamer {
    fn event(&mut self, kind: &str, mut data: Value) -> Bytes {
        if let Some(o) = data.as_object_mut() {
            o.insert("type".into(), json!(kind));
            o.insert("sequence_number".into(), json!(self.seq));
        }
        self.seq += 1;
        vllm::named_event(kind, &data)
    }

    /// The next batch of SSE bytes, or `None` at the end.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        match self.phase {
            Phase::Start => {
                self.phase = Phase::Tokens;
                let initial = self.echo.response(
                    self.g.job.created,
                    "in_progress",
                    Vec::new(),
                    Value::Null,
                    self.echo.max_output_tokens.unwrap_or(self.st.max_model_len as u64),
                );
                let mut out = self.event("response.created", json!({"response": initial})).to_vec();
                out.extend_from_slice(&self.event("response.in_progress", json!({"response": initial})));
                Some(Bytes::from(out))
            }
            Phase::Tokens => {
                let mut out = Vec::new();
                match self.g.next().await {
                    Piece::Text(t) => {
                        if !t.is_empty() {
                            self.delta(&t, &mut out);
                        }
                        if self.g.finish.is_some() {
                            self.phase = Phase::End;
                        }
                    }
                    Piece::Finished => self.phase = Phase::End,
                    Piece::Failed(e) => {
                        self.phase = Phase::Done;
                        let err = VllmError::from(e).body();
                        out.extend_from_slice(&self.event("error", err));
                    }
                }
                Some(Bytes::from(out))
            }
            Phase::End => {
                self.phase = Phase::Done;
                let mut out = Vec::new();
                if self.started_item {
                    let part = json!({"text": self.text, "type": "output_text", "annotations": []});
                    let (item_id, ci) = (self.item_id.clone(), self.content_index);
                    out.extend_from_slice(&self.event(
                        "response.output_text.done",
                        json!({"output_index": 0, "content_index": ci, "text": self.text, "logprobs": [], "item_id": item_id}),
                    ));
                    self.content_index += 1;
                    let ci = self.content_index;
                    out.extend_from_slice(&self.event(
                        "response.content_part.done",
                        json!({"item_id": item_id, "output_index": 0, "content_index": ci, "part": part}),
                    ));
                    self.content_index += 1;
                    out.extend_from_slice(&self.event(
                        "response.output_item.done",
                        json!({"output_index": 0, "item": {
                            "type": "message", "role": "assistant", "content": [part],
                            "status": "completed", "id": item_id, "summary": [],
                        }}),
                    ));
                }
                let done = final_response(&self.st, &self.echo, &self.g);
                if let Some(m) = self.messages.take() {
                    store_final(&self.st, &self.echo, m, &done);
                }
                out.extend_from_slice(&self.event("response.completed", json!({"response": done})));
                Some(Bytes::from(out))
            }
            Phase::Done => None,
        }
    }

    fn delta(&mut self, t: &str, out: &mut Vec<u8>) {
        if !self.started_item {
            self.started_item = true;
            self.item_id = vllm::dashed_uuid();
            let item_id = self.item_id.clone();
            out.extend_from_slice(&self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": {
                    "id": item_id, "type": "message", "role": "assistant", "content": [], "status": "in_progress",
                }}),
            ));
            out.extend_from_slice(&self.event(
                "response.content_part.added",
                json!({"output_index": 0, "item_id": item_id, "content_index": self.content_index,
                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            ));
            self.content_index += 1;
        }
        self.text.push_str(t);
        let (item_id, ci) = (self.item_id.clone(), self.content_index);
        out.extend_from_slice(&self.event(
            "response.output_text.delta",
            json!({"content_index": ci, "output_index": 0, "item_id": item_id, "delta": t, "logprobs": []}),
        ));
        self.content_index += 1;
    }
}

fn stream_response(st: Arc<AppState>, echo: Echo, messages: Vec<Value>, g: Generation) -> Response {
    let s = Streamer {
        st,
        echo,
        messages: Some(messages),
        g,
        seq: 0,
        item_id: String::new(),
        content_index: 0,
        started_item: false,
        text: String::new(),
        phase: Phase::Start,
    };
    let stream =
        futures::stream::unfold(s, |mut s| async move { s.next_chunk().await.map(|b| (Ok::<_, Infallible>(b), s)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            VllmError::new(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "failed to build response", None)
                .into_response()
        })
}

#[derive(serde::Deserialize)]
pub(crate) struct RetrieveQuery {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    starting_after: Option<i64>,
}

/// `retrieve_responses`.
pub(crate) async fn retrieve(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<Query<RetrieveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(q)) = query else {
        return VllmError::validation("[{'loc': ('query',), 'msg': 'Input should be a valid boolean or integer'}]")
            .into_response();
    };
    let _ = q.starting_after;
    match st.responses.get(&id) {
        None => not_found(&id).into_response(),
        Some(_) if q.stream == Some(true) => VllmError::bad_request(
            format!("Unknown response_id: {id} (parameter=response_id, value={id})"),
            Some("response_id"),
        )
        .into_response(),
        Some(s) => axum::Json(s.response).into_response(),
    }
}

/// `cancel_responses`.
pub(crate) async fn cancel(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let mut inner = st.responses.lock();
    let Some(s) = inner.map.get_mut(&id) else {
        return not_found(&id).into_response();
    };
    let status = s.response["status"].as_str().unwrap_or("");
    if status != "queued" && status != "in_progress" {
        return VllmError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Cannot cancel a synchronous response.",
            Some("response_id"),
        )
        .into_response();
    }
    s.response["status"] = json!("cancelled");
    let response = s.response.clone();
    if let Some(h) = inner.running.remove(&id) {
        h.abort();
    }
    axum::Json(response).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_bounded_oldest_first() {
        let s = ResponseStore::default();
        for i in 0..STORE_CAP + 5 {
            s.put(&format!("r{i}"), Stored { response: json!({"id": i}), messages: Vec::new() });
        }
        assert_eq!(s.len(), STORE_CAP);
        assert!(s.get("r0").is_none());
        assert!(s.get(&format!("r{}", STORE_CAP + 4)).is_some());
    }

    #[test]
    fn continuation_prepends_stored_messages_and_output() {
        let prev = Stored {
            response: json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": "hi there"}]}]}),
            messages: vec![json!({"role": "user", "content": "hello"})],
        };
        let m = input_messages(Some("be brief"), &json!("and now?"), Some(&prev)).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[1]["content"], "hello");
        assert_eq!(m[2], json!({"role": "assistant", "content": "hi there"}));
        assert_eq!(m[3], json!({"role": "user", "content": "and now?"}));
    }

    #[test]
    fn function_items_become_tool_messages() {
        let m = input_messages(
            None,
            &json!([
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
            ]),
            None,
        )
        .unwrap();
        assert_eq!(m[0]["tool_calls"][0]["id"], "c1");
        assert_eq!(m[1], json!({"role": "tool", "content": "42", "tool_call_id": "c1"}));
    }
}
