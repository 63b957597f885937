//! A typed view of an OpenAI inference request, checked the way vLLM checks it.
//!
//! The view never replaces the client's JSON: a node forwards the client's bytes to the engine
//! (vLLM extras such as `cache_salt` pass through untouched), and uses this view only to decide
//! where the request goes. The one edit at the edge (`parse_client`): fields only the node may
//! set (`ENGINE_OWNED_FIELDS`) are removed first.

use serde_json::{Map, Value};

use crate::chat::{self, ChatInputs};
use crate::openai::ApiError;

pub use crate::endpoint::Endpoint;

/// One chat message with its content flattened to text (text parts joined by newlines, as vLLM
/// does for templates that take a string).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Chat(Vec<ChatMessage>),
    Text(String),
    /// `/v1/completions` with a token-id prompt: nothing to tokenize.
    TokenIds(Vec<u32>),
    /// Nothing the router can key: `prompt_embeds`, a stored response's id, an audio file.
    /// Routed by load.
    Opaque,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub endpoint: Endpoint,
    pub model: String,
    pub prompt: Prompt,
    pub stream: bool,
    pub include_usage: bool,
    /// `max_completion_tokens` wins over `max_tokens` when both are given (OpenAI's rule).
    pub max_tokens: Option<u32>,
    pub min_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub seed: Option<u64>,
    pub n: u32,
    pub cache_salt: Option<String>,
    pub add_generation_prompt: bool,
    pub echo: bool,
    pub kv_transfer_params: Option<Value>,
    /// vLLM's scheduling `priority` (lower first; only with `--scheduling-policy priority`).
    /// A field the node owns: a client's is removed before parsing (`ENGINE_OWNED_FIELDS`), so
    /// on a node this is 0 and on an engine it is what the node set.
    pub priority: i64,
    /// For `/v1/chat/completions` (and Responses and Messages, converted as vLLM converts
    /// them, `convert`): everything the chat template is given, as vLLM gives it
    /// (`chat::ChatInputs`).
    pub chat: Option<ChatInputs>,
    /// Responses: the stored response this one continues; only the engine that stored it can
    /// serve the request.
    pub previous_response_id: Option<String>,
    /// The prompt has media parts (images, audio, video, files): the engine expands each into
    /// tokens the router does not compute, so keys hold only up to the first one, and the
    /// engine's reported prompt length is not compared with the router's.
    pub media: bool,
    /// The session the body names (`affinity::session_of_body`): a stable engine preference
    /// among near-equals.
    pub session: Option<String>,
}

impl InferenceRequest {
    /// A request on a stored response (`/v1/responses/{id}` and its cancel): no body, no
    /// prompt; `stream` when a retrieval asks for the stored events (`?stream=true`).
    pub fn stored(endpoint: Endpoint, stream: bool) -> Self {
        Self {
            endpoint,
            model: String::new(),
            prompt: Prompt::Opaque,
            stream,
            include_usage: false,
            max_tokens: None,
            min_tokens: 0,
            stop: Vec::new(),
            ignore_eos: false,
            seed: None,
            n: 1,
            cache_salt: None,
            add_generation_prompt: false,
            echo: false,
            kv_transfer_params: None,
            priority: 0,
            chat: None,
            previous_response_id: None,
            media: false,
            session: None,
        }
    }

    /// The `max_tokens` a key's cap is checked against: the request's for endpoints that
    /// generate from a body that says how much; 0 for those that generate nothing and for audio
    /// forms (the audio bounds the transcript).
    pub fn capped_max_tokens(&self) -> Option<u32> {
        match self.endpoint.work() == crate::endpoint::Work::Generate && !self.endpoint.is_multipart() {
            true => self.max_tokens,
            false => Some(0),
        }
    }

    /// Whether a prefill/decode split may serve it: chat and completions carry
    /// `kv_transfer_params` in vLLM; other endpoints would run twice.
    pub fn may_split(&self) -> bool {
        matches!(self.endpoint, Endpoint::Chat | Endpoint::Completions)
    }

    /// Whether its prompt is cached on the engine (routing by prefix, and recording the route,
    /// make sense): not for tokenizer work or a stored response's routes.
    pub fn uses_kv_cache(&self) -> bool {
        matches!(self.endpoint.work(), crate::endpoint::Work::Generate | crate::endpoint::Work::Pool)
    }

    /// The stored response this request must be served next to: the one it continues or
    /// names.
    pub fn pinned_to<'a>(&'a self, path_id: Option<&'a str>) -> Option<&'a str> {
        path_id.or(self.previous_response_id.as_deref())
    }
}

/// A multipart request (an audio transcription or translation) from its form's text fields:
/// the routing view of `model` and `stream` (the rest, and the file, are the engine's to
/// judge). `default_model` as in [`parse_client`].
pub fn from_form(
    endpoint: Endpoint,
    fields: &std::collections::BTreeMap<String, String>,
    has_file: bool,
    default_model: Option<&str>,
) -> Result<InferenceRequest, ApiError> {
    if !has_file {
        return Err(ApiError::invalid("'file' is required.", Some("file")));
    }
    let mut obj = Map::new();
    if let Some(m) = fields.get("model").map(String::as_str).or(default_model) {
        obj.insert("model".into(), Value::String(m.to_owned()));
    }
    match fields.get("stream").map(|s| s.to_ascii_lowercase()) {
        None => {}
        Some(s) if s == "true" => _ = obj.insert("stream".into(), Value::Bool(true)),
        Some(s) if s == "false" => _ = obj.insert("stream".into(), Value::Bool(false)),
        Some(_) => return Err(type_error("stream", "a boolean")),
    }
    from_object(endpoint, &obj)
}

/// Parses and validates a request body. Errors name the offending parameter.
pub fn parse(endpoint: Endpoint, body: &[u8]) -> Result<InferenceRequest, ApiError> {
    from_object(endpoint, &object(body)?)
}

fn object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!("Request body is not valid JSON: {e}"), None).with_code("invalid_json")
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ApiError::invalid("Request body must be a JSON object.", None)),
    }
}

/// Request fields vLLM reads that only the node may set, never a client:
/// - `kv_transfer_params`: where a decode engine pulls KV from (host, port, block ids); a
///   client's would point an engine at any host (vLLM itself treats it as SSRF);
/// - `priority`: the engine's scheduling order, which would let one client jump every queue;
/// - `request_id`: the engine's id for the request, which the node assigns;
/// - `chat_template`: a template the engine would render in place of the model's (vLLM refuses it
///   unless started with `--trust-request-chat-template`; the node never renders it).
pub const ENGINE_OWNED_FIELDS: &[&str] = &["kv_transfer_params", "priority", "request_id", "chat_template"];

/// A client's request as it enters the mesh.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub req: InferenceRequest,
    /// The body to forward instead of the client's, when fields were removed.
    pub body: Option<Vec<u8>>,
    /// The engine-owned fields the client sent, removed.
    pub removed: Vec<&'static str>,
}

/// Parses a client's request and removes the fields only the node may set
/// (`ENGINE_OWNED_FIELDS`); `salt` maps the client's `cache_salt` to the one the request is
/// sent with (a tenant's own, `auth::Tenant::cache_salt`). The view is of the request as
/// forwarded.
/// `default_model`: the model a request that names none is for (vLLM serves its one model
/// then; a node does so when the mesh serves exactly one). Chat, completions and Messages
/// always name theirs.
pub fn parse_client(
    endpoint: Endpoint,
    body: &[u8],
    salt: impl FnOnce(Option<&str>) -> Option<String>,
    default_model: Option<&str>,
) -> Result<ClientRequest, ApiError> {
    let mut obj = object(body)?;
    let removed: Vec<&'static str> = ENGINE_OWNED_FIELDS.iter().copied().filter(|k| obj.remove(*k).is_some()).collect();
    let mut changed = !removed.is_empty();
    if let (true, Some(m), None | Some(Value::Null)) = (endpoint.may_omit_model(), default_model, obj.get("model")) {
        obj.insert("model".into(), Value::String(m.to_owned()));
        changed = true;
    }
    // The same template override, given through the template's keyword arguments (vLLM before
    // 0.11 honoured it there).
    if let Some(Value::Object(kwargs)) = obj.get_mut("chat_template_kwargs") {
        changed |= kwargs.remove("chat_template").is_some();
    }
    // A salt of another type is left for `from_object` to refuse, as vLLM would. vLLM's
    // Messages endpoint has no `cache_salt` (it drops the field): a salt there would only make
    // the router's keys differ from the engine's, so none is set (docs/security.md).
    let salted = !matches!(endpoint, Endpoint::Messages | Endpoint::MessagesCountTokens);
    if let (true, None | Some(Value::Null) | Some(Value::String(_))) = (salted, obj.get("cache_salt")) {
        let client = obj.get("cache_salt").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
        let sent = salt(client.as_deref());
        if sent != client {
            changed = true;
            match sent {
                Some(s) => obj.insert("cache_salt".into(), Value::String(s)),
                None => obj.remove("cache_salt"),
            };
        }
    }
    let req = from_object(endpoint, &obj)?;
    let body = match changed {
        false => None,
        true => Some(
            serde_json::to_vec(&obj).map_err(|e| ApiError::internal(format!("re-encoding the request failed: {e}")))?,
        ),
    };
    Ok(ClientRequest { req, body, removed })
}

/// Keys whose strings are not text the model reads: roles, part types, ids, media locations
/// and encodings (a data URL is bytes, not words).
const NOT_PROMPT_TEXT: &[&str] = &["role", "type", "id", "tool_call_id", "url", "data", "format", "detail"];

/// Every string of a request the engine renders into the prompt, with its JSON pointer: every
/// message's strings (content and its text parts, `name`, `reasoning_content`, tool calls'
/// names and arguments), `tools`, `documents` and `chat_template_kwargs` for chat; `prompt`
/// (strings) and `suffix` for completions. Guardrails scan all of them, not only message text.
///
/// Bounded: at most `MAX_PROMPT_STRINGS` strings and `MAX_POINTER_BYTES` bytes of pointers (a
/// body of one long key over many empty strings would otherwise make pointers of gigabytes); a
/// request past either is refused.
pub fn prompt_strings(endpoint: Endpoint, body: &Value) -> Result<Vec<(String, String)>, ApiError> {
    let roots: &[&str] = match endpoint {
        Endpoint::Chat => &["messages", "tools", "documents", "chat_template_kwargs"],
        Endpoint::Completions => &["prompt", "suffix"],
        Endpoint::Responses => &["instructions", "input", "tools"],
        Endpoint::Messages | Endpoint::MessagesCountTokens => &["system", "messages", "tools"],
        Endpoint::Embeddings | Endpoint::Classify => &["input"],
        Endpoint::Pooling => &["input", "messages"],
        Endpoint::Tokenize => &["prompt", "messages", "tools", "chat_template_kwargs"],
        Endpoint::Score | Endpoint::ScoreV1 => {
            &["text_1", "text_2", "queries", "documents", "data_1", "data_2", "items"]
        }
        Endpoint::Rerank | Endpoint::RerankV1 | Endpoint::RerankV2 => &["query", "documents"],
        Endpoint::Detokenize
        | Endpoint::ResponseRetrieve
        | Endpoint::ResponseCancel
        | Endpoint::Transcriptions
        | Endpoint::Translations => &["prompt"],
    };
    let mut out = Vec::new();
    let mut budget = MAX_POINTER_BYTES;
    for root in roots {
        if let Some(v) = body.get(*root) {
            collect_strings(v, &mut format!("/{root}"), &mut out, &mut budget).map_err(|()| {
                ApiError::invalid(
                    format!(
                        "The request holds more text fields than this node's guardrails read (at most {MAX_PROMPT_STRINGS}, with {} MiB of paths).",
                        MAX_POINTER_BYTES >> 20
                    ),
                    None,
                )
            })?;
        }
    }
    Ok(out)
}

/// Most strings of one request the guardrails read.
pub const MAX_PROMPT_STRINGS: usize = 65_536;
/// Most bytes of JSON pointers to them.
pub const MAX_POINTER_BYTES: usize = 8 << 20;

fn collect_strings(
    v: &Value,
    path: &mut String,
    out: &mut Vec<(String, String)>,
    budget: &mut usize,
) -> Result<(), ()> {
    match v {
        Value::String(s) => {
            if out.len() >= MAX_PROMPT_STRINGS || path.len() > *budget {
                return Err(());
            }
            *budget -= path.len();
            out.push((path.clone(), s.clone()));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("/{i}"));
                collect_strings(item, path, out, budget)?;
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if NOT_PROMPT_TEXT.contains(&k.as_str()) {
                    continue;
                }
                let len = path.len();
                // JSON pointer escaping (RFC 6901).
                path.push('/');
                path.push_str(&k.replace('~', "~0").replace('/', "~1"));
                collect_strings(item, path, out, budget)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// A streamed request's body asking the engine for its usage chunk (`stream_options.
/// include_usage`), for a node that must charge completion tokens the client did not ask to
/// see; `None` when it asks already or is not streamed.
pub fn with_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    let mut obj = object(body).ok()?;
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return None;
    }
    let opts = obj.entry("stream_options").or_insert_with(|| Value::Object(Map::new()));
    if opts.is_null() {
        *opts = Value::Object(Map::new());
    }
    let opts = opts.as_object_mut()?;
    if opts.get("include_usage") == Some(&Value::Bool(true)) {
        return None;
    }
    opts.insert("include_usage".into(), Value::Bool(true));
    serde_json::to_vec(&obj).ok()
}

/// The `salt` of [`parse_client`] that keeps the client's own.
pub fn client_salt(s: Option<&str>) -> Option<String> {
    s.map(str::to_owned)
}

pub fn from_object(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<InferenceRequest, ApiError> {
    let model = match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(ApiError::invalid("'model' is required.", Some("model")))
        }
        Some(_) => return Err(type_error("model", "a string")),
    };
    // A model name reaches logs, errors and headers: no control characters (a newline would
    // forge a log line).
    if model.chars().any(char::is_control) {
        return Err(ApiError::invalid("'model' must not contain control characters.", Some("model")));
    }
    let (prompt, converted) = endpoint_prompt(endpoint, obj)?;
    let media = match endpoint {
        Endpoint::Chat | Endpoint::Pooling | Endpoint::Tokenize => has_media(obj.get("messages")),
        _ => converted.as_ref().is_some_and(|c| c.messages.iter().any(|m| has_media_parts(m.get("content")))),
    };
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::invalid(
                    "Stream options can only be defined when `stream=True`.",
                    Some("stream_options"),
                ));
            }
            opt_bool(o, "include_usage")?.unwrap_or(false)
        }
        Some(_) => return Err(type_error("stream_options", "an object")),
    };
    // `max_completion_tokens` is a chat field; vLLM's completions endpoint ignores it, so it
    // must not stand for the completion's length there.
    let max_tokens = match endpoint {
        Endpoint::Chat => match opt_u32(obj, "max_completion_tokens")? {
            Some(v) => Some(v),
            None => opt_u32(obj, "max_tokens")?,
        },
        Endpoint::Completions | Endpoint::Transcriptions | Endpoint::Translations => opt_u32(obj, "max_tokens")?,
        Endpoint::Responses => opt_u32(obj, "max_output_tokens")?,
        Endpoint::Messages => match opt_u32(obj, "max_tokens")? {
            Some(v) => Some(v),
            None => return Err(ApiError::invalid("'max_tokens' is required.", Some("max_tokens"))),
        },
        // No tokens are generated.
        _ => None,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid("max_tokens must be at least 1, got 0.", Some("max_tokens")));
    }
    let min_tokens = opt_u32(obj, "min_tokens")?.unwrap_or(0);
    if let Some(max) = max_tokens {
        if min_tokens > max {
            return Err(ApiError::invalid(
                format!("min_tokens must be less than or equal to max_tokens={max}, got {min_tokens}."),
                Some("min_tokens"),
            ));
        }
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| type_error("stop", "a string or an array of strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(type_error("stop", "a string or an array of strings")),
    };
    let n = opt_u32(obj, "n")?.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid("n must be at least 1, got 0.", Some("n")));
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => {
            Some(v.as_i64().map(|s| s as u64).or_else(|| v.as_u64()).ok_or_else(|| type_error("seed", "an integer"))?)
        }
    };
    let priority = match obj.get("priority") {
        None => 0,
        Some(v) => v.as_i64().ok_or_else(|| type_error("priority", "an integer"))?,
    };
    let cache_salt = match obj.get("cache_salt") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid(
                "Parameter 'cache_salt' must be a non-empty string if provided.",
                Some("cache_salt"),
            ))
        }
        Some(_) => return Err(type_error("cache_salt", "a string")),
    };
    // vLLM's own bounds (`SamplingParams`): a temperature is only non-negative.
    for (key, lo, hi) in [("temperature", 0.0, f64::INFINITY), ("top_p", 0.0, 1.0)] {
        if let Some(v) = obj.get(key) {
            if !v.is_null() {
                let x = v.as_f64().ok_or_else(|| type_error(key, "a number"))?;
                if !(lo..=hi).contains(&x) {
                    return Err(ApiError::invalid(format!("{key} must be in [{lo}, {hi}], got {x}."), Some(key)));
                }
            }
        }
    }
    let add_generation_prompt = opt_bool(obj, "add_generation_prompt")?.unwrap_or(true);
    let chat = match endpoint {
        Endpoint::Chat => Some(chat_inputs(obj, add_generation_prompt)?),
        Endpoint::Tokenize | Endpoint::Pooling if obj.get("messages").is_some_and(Value::is_array) => {
            Some(chat_inputs(obj, add_generation_prompt)?)
        }
        _ => converted,
    };
    let previous_response_id = match obj.get("previous_response_id") {
        _ if endpoint != Endpoint::Responses => None,
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if crate::endpoint::is_response_id(id) => Some(id.clone()),
        Some(Value::String(_)) => {
            return Err(ApiError::invalid("'previous_response_id' is not a response id.", Some("previous_response_id")))
        }
        Some(_) => return Err(type_error("previous_response_id", "a string")),
    };
    Ok(InferenceRequest {
        endpoint,
        model,
        prompt,
        stream,
        include_usage,
        max_tokens,
        min_tokens,
        stop,
        ignore_eos: opt_bool(obj, "ignore_eos")?.unwrap_or(false),
        seed,
        n,
        cache_salt,
        add_generation_prompt,
        echo: opt_bool(obj, "echo")?.unwrap_or(false),
        kv_transfer_params: obj.get("kv_transfer_params").filter(|v| !v.is_null()).cloned(),
        priority,
        chat,
        previous_response_id,
        media,
        session: crate::affinity::session_of_body(endpoint, obj),
    })
}

/// The prompt the router keys, per endpoint, and the chat template's inputs of the endpoints
/// vLLM serves through chat (`convert`).
fn endpoint_prompt(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<(Prompt, Option<ChatInputs>), ApiError> {
    let chat_prompt = |c: &ChatInputs| {
        Prompt::Chat(
            c.messages
                .iter()
                .map(|m| ChatMessage {
                    role: m["role"].as_str().unwrap_or_default().to_owned(),
                    content: match &m["content"] {
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        _ => String::new(),
                    },
                })
                .collect(),
        )
    };
    Ok(match endpoint {
        Endpoint::Chat => (Prompt::Chat(parse_messages(obj.get("messages"))?), None),
        Endpoint::Completions => match (obj.get("prompt"), obj.get("prompt_embeds")) {
            (None | Some(Value::Null), Some(e)) if !e.is_null() => (Prompt::Opaque, None),
            (p, _) => (parse_prompt(p, "prompt")?, None),
        },
        Endpoint::Responses => {
            match obj.get("input") {
                Some(Value::String(_) | Value::Array(_)) => {}
                None | Some(Value::Null) => return Err(ApiError::invalid("'input' is required.", Some("input"))),
                Some(_) => return Err(type_error("input", "a string or an array of input items")),
            }
            let c = crate::convert::responses(obj);
            (chat_prompt(&c), Some(c))
        }
        Endpoint::Messages | Endpoint::MessagesCountTokens => {
            match obj.get("messages") {
                Some(Value::Array(_)) => {}
                None | Some(Value::Null) => return Err(ApiError::invalid("'messages' is required.", Some("messages"))),
                Some(_) => return Err(type_error("messages", "an array of messages")),
            }
            let c = crate::convert::messages(obj);
            (chat_prompt(&c), Some(c))
        }
        Endpoint::Embeddings | Endpoint::Classify => (parse_prompt(obj.get("input"), "input")?, None),
        Endpoint::Pooling | Endpoint::Tokenize => match obj.get("messages") {
            Some(Value::Array(_)) => (Prompt::Chat(parse_messages(obj.get("messages"))?), None),
            _ => {
                let key = if endpoint == Endpoint::Tokenize { "prompt" } else { "input" };
                (parse_prompt(obj.get(key), key)?, None)
            }
        },
        Endpoint::Detokenize => (parse_prompt(obj.get("tokens"), "tokens")?, None),
        // The query (or first text) leads the prompt vLLM builds for a pair.
        Endpoint::Score | Endpoint::ScoreV1 | Endpoint::Rerank | Endpoint::RerankV1 | Endpoint::RerankV2 => {
            let first = ["query", "queries", "text_1", "data_1"].iter().find_map(|k| match obj.get(*k) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(items)) => items.first().and_then(Value::as_str).map(str::to_owned),
                _ => None,
            });
            (first.map(Prompt::Text).unwrap_or(Prompt::Opaque), None)
        }
        Endpoint::ResponseRetrieve | Endpoint::ResponseCancel | Endpoint::Transcriptions | Endpoint::Translations => {
            (Prompt::Opaque, None)
        }
    })
}

/// Whether any message has a media part.
fn has_media(messages: Option<&Value>) -> bool {
    messages.and_then(Value::as_array).is_some_and(|ms| ms.iter().any(|m| has_media_parts(m.get("content"))))
}

fn has_media_parts(content: Option<&Value>) -> bool {
    content.and_then(Value::as_array).is_some_and(|parts| {
        parts.iter().any(|p| {
            !matches!(
                p.get("type").and_then(Value::as_str),
                Some("text" | "input_text" | "output_text" | "refusal" | "thinking")
            )
        })
    })
}

/// The chat template's inputs from a chat request (messages already validated by
/// `parse_messages`): tools as vLLM dumps them, documents, `chat_template_kwargs` (with
/// `reasoning_effort`), and how the prompt ends.
fn chat_inputs(obj: &Map<String, Value>, add_generation_prompt: bool) -> Result<ChatInputs, ApiError> {
    let messages = match obj.get("messages") {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => Some(tools.iter().map(chat::tool_dump).collect()),
        Some(_) => return Err(type_error("tools", "an array of tools")),
    };
    let mut kwargs = match obj.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(k)) => k.clone(),
        Some(_) => return Err(type_error("chat_template_kwargs", "an object")),
    };
    if let Some(effort) = obj.get("reasoning_effort").filter(|v| !v.is_null()) {
        kwargs.entry("reasoning_effort").or_insert_with(|| effort.clone());
    }
    let continue_final_message = opt_bool(obj, "continue_final_message")?.unwrap_or(false);
    if continue_final_message && add_generation_prompt {
        return Err(ApiError::invalid(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            Some("continue_final_message"),
        ));
    }
    Ok(ChatInputs {
        messages,
        tools,
        documents: obj.get("documents").filter(|v| !v.is_null()).cloned(),
        kwargs,
        add_generation_prompt,
        continue_final_message,
    })
}

fn type_error(param: &str, expected: &str) -> ApiError {
    ApiError::invalid(format!("'{param}' must be {expected}."), Some(param))
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(type_error(key, "a boolean")),
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x <= u32::MAX as u64 => Ok(Some(x as u32)),
            _ => Err(type_error(key, "a non-negative integer")),
        },
    }
}

fn parse_messages(v: Option<&Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Err(ApiError::invalid("'messages' is required.", Some("messages"))),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(type_error("messages", "an array of message objects")),
    };
    if items.is_empty() {
        return Err(ApiError::invalid("'messages' must contain at least one message.", Some("messages")));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::invalid(format!("'{param}' must be an object."), Some(&param)));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                _ => {
                    let p = format!("{param}.role");
                    return Err(ApiError::invalid(format!("'{p}' is required and must be a string."), Some(&p)));
                }
            };
            let content = flatten_content(m.get("content"), &param)?;
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn flatten_content(v: Option<&Value>, param: &str) -> Result<String, ApiError> {
    let p = format!("{param}.content");
    match v {
        // An assistant turn carrying only tool calls has no content.
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t),
                    // Media (image_url, input_audio, video_url, file, ...) and other parts: the
                    // engine judges them; they hold no text.
                    (Some(other), _) if other != "text" => {}
                    _ => {
                        return Err(ApiError::invalid(
                            format!("'{p}' parts must be {{\"type\":\"text\",\"text\":...}}."),
                            Some(&p),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid(format!("'{p}' must be a string or an array of content parts."), Some(&p))),
    }
}

/// A prompt given as text, token ids, or a batch of either. A batch is keyed on its first
/// prompt (each prompt of a batch is its own sequence on the engine; they usually share their
/// start).
fn parse_prompt(v: Option<&Value>, key: &str) -> Result<Prompt, ApiError> {
    let ids = |items: &[Value]| {
        items
            .iter()
            .map(|x| x.as_u64().filter(|&t| t <= u32::MAX as u64).map(|t| t as u32))
            .collect::<Option<Vec<_>>>()
            .map(Prompt::TokenIds)
    };
    let bad = || type_error(key, "a string, an array of strings, an array of token ids or an array of such arrays");
    match v {
        None | Some(Value::Null) => Err(ApiError::invalid(format!("'{key}' is required."), Some(key))),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(ApiError::invalid(format!("'{key}' must not be empty."), Some(key)))
        }
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_u64) {
                return ids(items).ok_or_else(bad);
            }
            // A batch: every item of one kind, keyed on the first.
            if items.iter().all(Value::is_string) {
                return Ok(Prompt::Text(items[0].as_str().unwrap_or_default().to_owned()));
            }
            let batches: Option<Vec<&Vec<Value>>> = items.iter().map(Value::as_array).collect();
            match batches {
                Some(b) if b.iter().all(|x| !x.is_empty() && x.iter().all(Value::is_u64)) => ids(b[0]).ok_or_else(bad),
                _ => Err(bad()),
            }
        }
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_edge_removes_fields_only_the_node_may_set() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"priority":-100,
            "kv_transfer_params":{"do_remote_prefill":true,"remote_host":"10.9.9.9","remote_port":80},
            "request_id":"mine","chat_template":"{{ 'x' }}","cache_salt":"s"}"#;
        let c = parse_client(Endpoint::Chat, body, client_salt, None).unwrap();
        assert_eq!(c.removed, ["kv_transfer_params", "priority", "request_id", "chat_template"]);
        assert_eq!(c.req.kv_transfer_params, None);
        let forwarded: Value = serde_json::from_slice(c.body.as_deref().unwrap()).unwrap();
        for k in ENGINE_OWNED_FIELDS {
            assert!(forwarded.get(k).is_none(), "{k} reaches the engine");
        }
        assert_eq!(forwarded["cache_salt"], "s", "client fields stay");
        let plain = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let c = parse_client(Endpoint::Chat, plain, client_salt, None).unwrap();
        assert!(c.body.is_none() && c.removed.is_empty(), "an untouched request keeps its bytes");
    }

    #[test]
    fn prompt_strings_cover_every_rendered_field() {
        let body: Value = serde_json::from_str(
            r#"{"model":"m","messages":[
                {"role":"user","name":"alice","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]},
                {"role":"assistant","content":null,"reasoning_content":"think","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{\"q\":1}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"result"}],
               "tools":[{"type":"function","function":{"name":"f","description":"desc","parameters":{"a/b":{"description":"p"}}}}],
               "chat_template_kwargs":{"k":"v"},"temperature":1}"#,
        )
        .unwrap();
        let got: Vec<(String, String)> = prompt_strings(Endpoint::Chat, &body).unwrap();
        let texts: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
        for want in ["alice", "hi", "think", "f", "{\"q\":1}", "result", "desc", "p", "v"] {
            assert!(texts.contains(&want), "{want} missing from {texts:?}");
        }
        assert!(!texts.contains(&"data:x") && !texts.contains(&"user") && !texts.contains(&"c1"));
        for (ptr, text) in &got {
            assert_eq!(body.pointer(ptr).and_then(Value::as_str), Some(text.as_str()), "{ptr}");
        }
        let c: Value = serde_json::from_str(r#"{"prompt":["a",[1,2]],"suffix":"s"}"#).unwrap();
        let texts: Vec<String> =
            prompt_strings(Endpoint::Completions, &c).unwrap().into_iter().map(|(_, t)| t).collect();
        assert_eq!(texts, ["a", "s"]);
    }

    #[test]
    fn a_stream_asks_for_usage_only_when_it_did_not() {
        let b = with_stream_usage(br#"{"model":"m","prompt":"x","stream":true}"#).unwrap();
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(with_stream_usage(
            br#"{"model":"m","prompt":"x","stream":true,"stream_options":{"include_usage":true}}"#
        )
        .is_none());
        assert!(with_stream_usage(br#"{"model":"m","prompt":"x"}"#).is_none());
        let b = with_stream_usage(br#"{"model":"m","prompt":"x","stream":true,"stream_options":null}"#).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&b).unwrap()["stream_options"]["include_usage"], true);
    }

    #[test]
    fn completions_ignore_max_completion_tokens_and_models_refuse_control_characters() {
        let r =
            parse(Endpoint::Completions, br#"{"model":"m","prompt":"x","max_tokens":5000,"max_completion_tokens":1}"#)
                .unwrap();
        assert_eq!(r.max_tokens, Some(5000), "vLLM's completions read max_tokens only");
        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":5000,"max_completion_tokens":1}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(1));
        let e = parse(Endpoint::Chat, br#"{"model":"m\nFAKE log line","messages":[{"role":"user","content":"x"}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
    }

    #[test]
    fn chat_minimal() {
        let r = parse(Endpoint::Chat, br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert_eq!(r.model, "m");
        assert_eq!(r.prompt, Prompt::Chat(vec![ChatMessage { role: "user".into(), content: "hi".into() }]));
        assert!(!r.stream);
    }

    #[test]
    fn errors_name_their_param() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"{not json", None),
            (b"[1,2]", None),
            (br#"{"messages":[]}"#, Some("model")),
            (br#"{"model":"m"}"#, Some("messages")),
            (br#"{"model":"m","messages":"hi"}"#, Some("messages")),
            (br#"{"model":"m","messages":[]}"#, Some("messages")),
            (br#"{"model":"m","messages":[{"content":"x"}]}"#, Some("messages[0].role")),
            (br#"{"model":"m","messages":[{"role":"user","content":5}]}"#, Some("messages[0].content")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"5"}"#, Some("max_tokens")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#, Some("max_tokens")),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, Some("stream")),
            (
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#,
                Some("stream_options"),
            ),
            (br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":-0.5}"#, Some("temperature")),
        ];
        for (body, param) in cases {
            let e = parse(Endpoint::Chat, body).unwrap_err();
            assert_eq!(e.status, http::StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(body));
            assert_eq!(e.param.as_deref(), *param, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn completions_prompt_forms() {
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::TokenIds(vec![1, 2, 3]));
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt":["abc"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Text("abc".into()));
        // Batches, as vLLM takes them: keyed on their first prompt.
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Text("a".into()));
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt":[[4,5],[6]]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::TokenIds(vec![4, 5]));
        let r = parse(Endpoint::Completions, br#"{"model":"m","prompt_embeds":"AAAA"}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Opaque);
        assert!(parse(Endpoint::Completions, br#"{"model":"m","prompt":[-1]}"#).is_err());
        assert!(parse(Endpoint::Completions, br#"{"model":"m","prompt":[[1],"a"]}"#).is_err());
        assert!(parse(Endpoint::Completions, br#"{"model":"m","prompt":[[]]}"#).is_err());
        // Sampling values vLLM allows.
        assert!(parse(Endpoint::Completions, br#"{"model":"m","prompt":"a","temperature":3.5}"#).is_ok());
    }

    #[test]
    fn the_strings_guardrails_read_are_bounded() {
        let key = "k".repeat(100_000);
        let many = serde_json::json!({"input": [{key: vec![""; 200]}]});
        assert!(prompt_strings(Endpoint::Embeddings, &many).is_err(), "200 pointers of 100 KB each");
        let wide = serde_json::json!({"input": vec![""; MAX_PROMPT_STRINGS + 1]});
        assert!(prompt_strings(Endpoint::Embeddings, &wide).is_err());
        let fine = serde_json::json!({"input": vec!["x"; 1000]});
        assert_eq!(prompt_strings(Endpoint::Embeddings, &fine).unwrap().len(), 1000);
    }

    #[test]
    fn every_endpoint_is_parsed_with_what_it_keys_on() {
        let r = parse(
            Endpoint::Responses,
            br#"{"model":"m","instructions":"sys","input":"hi","max_output_tokens":9,"previous_response_id":"resp_1"}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(9));
        assert_eq!(r.previous_response_id.as_deref(), Some("resp_1"));
        assert!(matches!(&r.prompt, Prompt::Chat(m) if m.len() == 2 && m[1].content == "hi"));
        assert!(r.chat.is_some(), "rendered with the chat template, as vLLM renders it");
        let e = parse(Endpoint::Responses, br#"{"model":"m","input":"hi","previous_response_id":"../x"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("previous_response_id"));
        assert_eq!(parse(Endpoint::Responses, br#"{"model":"m"}"#).unwrap_err().param.as_deref(), Some("input"));

        let m = br#"{"model":"m","max_tokens":5,"system":"s","messages":[{"role":"user","content":[{"type":"text","text":"yo"},{"type":"image","source":{"type":"url","url":"http://x"}}]}]}"#;
        let r = parse(Endpoint::Messages, m).unwrap();
        assert!(r.media && r.max_tokens == Some(5));
        let e = parse(Endpoint::Messages, br#"{"model":"m","messages":[]}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"), "Anthropic's max_tokens is required");

        let r = parse(Endpoint::Embeddings, br#"{"model":"m","input":["first","second"]}"#).unwrap();
        assert_eq!((r.prompt, r.max_tokens), (Prompt::Text("first".into()), None));
        let r = parse(Endpoint::RerankV1, br#"{"model":"m","query":"q","documents":["a"]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::Text("q".into()));
        let r = parse(Endpoint::Detokenize, br#"{"model":"m","tokens":[1,2]}"#).unwrap();
        assert_eq!(r.prompt, Prompt::TokenIds(vec![1, 2]));
        let r = parse(Endpoint::Tokenize, br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert!(r.chat.is_some());

        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:a"}},{"type":"text","text":"what"}]}]}"#,
        )
        .unwrap();
        assert!(r.media, "media parts are the engine's to judge");

        // A request naming no model goes to the mesh's only one, where vLLM would serve its own.
        let c = parse_client(Endpoint::Embeddings, br#"{"input":"x"}"#, client_salt, Some("only")).unwrap();
        assert_eq!(c.req.model, "only");
        let sent: Value = serde_json::from_slice(c.body.as_deref().unwrap()).unwrap();
        assert_eq!(sent["model"], "only");
        let e = parse_client(Endpoint::Chat, br#"{"messages":[]}"#, client_salt, Some("only")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"), "chat always names its model");
    }

    #[test]
    fn content_parts_are_joined() {
        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.prompt, Prompt::Chat(vec![ChatMessage { role: "user".into(), content: "a\nb".into() }]));
    }

    #[test]
    fn max_completion_tokens_wins() {
        let r = parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":9,"max_completion_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(3));
    }

    proptest! {
        // The parser sees raw client bytes: it must answer every input without panicking.
        #[test]
        fn never_panics_on_bytes(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            for e in Endpoint::ALL {
                let _ = parse(e, &body);
            }
        }

        #[test]
        fn never_panics_on_json(v in arb_json()) {
            let body = serde_json::to_vec(&v).unwrap();
            for e in Endpoint::ALL {
                let _ = parse(e, &body);
                let _ = parse_client(e, &body, client_salt, Some("m"));
                let _ = prompt_strings(e, &v);
            }
            if let Value::Object(o) = &v {
                let _ = crate::convert::responses(o);
                let _ = crate::convert::messages(o);
            }
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "[a-z_]{0,8}".prop_map(Value::String),
            prop_oneof![
                Just("text"),
                Just("tool_use"),
                Just("tool_result"),
                Just("function_call"),
                Just("function_call_output"),
                Just("image"),
                Just("user"),
                Just("resp_abc"),
            ]
            .prop_map(|s| Value::String(s.into())),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("model".to_string()),
                        Just("messages".to_string()),
                        Just("prompt".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("stream".to_string()),
                        Just("max_tokens".to_string()),
                        Just("stop".to_string()),
                        Just("input".to_string()),
                        Just("instructions".to_string()),
                        Just("system".to_string()),
                        Just("tools".to_string()),
                        Just("type".to_string()),
                        Just("text".to_string()),
                        Just("tool_use".to_string()),
                        Just("tool_result".to_string()),
                        Just("function_call".to_string()),
                        Just("previous_response_id".to_string()),
                        Just("query".to_string()),
                        Just("tokens".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
