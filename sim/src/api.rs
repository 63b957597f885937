//! vLLM's OpenAI-compatible HTTP surface over the simulated engine.
//!
//! Why one long file: every endpoint shape the simulator serves is here, in one place, so it
//! can be read against vLLM's `entrypoints/openai` side by side. The APIs vLLM builds on top of
//! chat (Responses, Anthropic Messages) and the pooling, tokenize and audio routes live in the
//! submodules, which answer errors in vLLM's own envelope (`vllm::VllmError`: integer `code`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint, InferenceRequest, Prompt};
use kvmesh_policy::tokenize::ModelTokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::{NewSequence, TokenOut};
use crate::filler::Filler;
use crate::metrics::EngineMetrics;
use crate::runner::{AbortOnDrop, EngineHandle, SubmitError};
use crate::EngineConfig;

mod audio;
mod messages;
mod pooling;
mod responses;
mod tokens;
mod vllm;

pub use responses::ResponseStore;

/// One data-parallel rank: its scheduler and its metrics.
pub struct Rank {
    pub engine: EngineHandle,
    pub metrics: Arc<EngineMetrics>,
}

pub struct AppState {
    pub cfg: EngineConfig,
    pub tokenizer: ModelTokenizer,
    pub filler: Filler,
    /// One per data-parallel rank (one without data parallelism).
    pub ranks: Vec<Rank>,
    /// The rank a request without `X-data-parallel-rank` goes to next.
    pub next_rank: std::sync::atomic::AtomicUsize,
    pub max_model_len: u32,
    pub kv_capacity_tokens: u64,
    pub created: u64,
    /// This engine's HTTP address, named in the KV-transfer params it offers.
    pub http_addr: std::net::SocketAddr,
    pub engine_id: String,
    pub offers: crate::nixl::Offers,
    /// For pulling KV from prefill engines.
    pub client: reqwest::Client,
    /// Responses API objects kept for `GET /v1/responses/{id}` and `previous_response_id`.
    pub responses: ResponseStore,
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/ping", get(|| async { StatusCode::OK }))
        .route(
            "/version",
            get(|| async { axum::Json(json!({"version": concat!("kvmesh-sim-", env!("CARGO_PKG_VERSION"))})) }),
        )
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/kvmesh/nixl/pull", post(nixl_pull))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{response_id}", get(responses::retrieve))
        .route("/v1/responses/{response_id}/cancel", post(responses::cancel))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/embeddings", post(pooling::embeddings))
        .route("/pooling", post(pooling::pooling))
        .route("/classify", post(pooling::classify))
        .route("/score", post(pooling::score))
        .route("/v1/score", post(pooling::score))
        .route("/rerank", post(pooling::rerank))
        .route("/v1/rerank", post(pooling::rerank))
        .route("/v2/rerank", post(pooling::rerank))
        .route("/tokenize", post(tokens::tokenize))
        .route("/detokenize", post(tokens::detokenize))
        .route("/v1/audio/transcriptions", post(audio::transcriptions))
        .route("/v1/audio/translations", post(audio::translations))
        .fallback(|| async { error_response(ApiError::not_found("Not Found")) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

pub fn error_response(e: ApiError) -> Response {
    (e.status, [(header::CONTENT_TYPE, "application/json")], e.to_json()).into_response()
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// vLLM's `OpenAIServingModels.show_available_models`: one card per served name (same `root`,
/// no `parent`), then one per LoRA adapter (`root` its path, `parent` the model's first name).
async fn models(State(st): State<Arc<AppState>>) -> Response {
    let card = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": st.created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": st.max_model_len,
            "permission": [],
        })
    };
    let names = std::iter::once(&st.cfg.model).chain(&st.cfg.model_aliases);
    let mut data: Vec<Value> = names.map(|n| card(n, &st.cfg.model, None)).collect();
    data.extend(st.cfg.adapters().map(|(name, path)| card(name, path, Some(&st.cfg.model))));
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], st.ranks[0].metrics.render()).into_response()
}

/// The side channel a decode engine pulls offered KV through (NIXL's, simulated).
async fn nixl_pull(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    let id = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("remote_request_id").and_then(Value::as_str).map(str::to_owned));
    match id.and_then(|id| st.offers.take(&id)) {
        Some(tokens) => axum::Json(json!({"tokens": tokens})).into_response(),
        None => error_response(ApiError::not_found("No such KV offer (pulled already, expired or unknown).")),
    }
}

async fn reset_prefix_cache(State(st): State<Arc<AppState>>) -> Response {
    let mut all = Ok(true);
    for r in &st.ranks {
        match r.engine.reset_prefix_cache().await {
            Ok(true) => {}
            other => all = other,
        }
    }
    match all {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => error_response(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            "Cannot reset the prefix cache while requests hold KV blocks.",
        )),
        Err(e) => error_response(ApiError::unavailable(e.to_string())),
    }
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    serve(st, Endpoint::Chat, headers, body).await
}

async fn completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    serve(st, Endpoint::Completions, headers, body).await
}

/// The rank a request runs on: the one its `X-data-parallel-rank` header names (vLLM's
/// `_get_data_parallel_rank`; not an integer, or not a rank of this engine: 400), else the
/// next in turn.
pub(crate) fn data_parallel_rank(st: &AppState, headers: &HeaderMap) -> Result<usize, ApiError> {
    let Some(v) = headers.get("x-data-parallel-rank") else {
        return Ok(st.next_rank.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % st.ranks.len());
    };
    v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).filter(|&r| r < st.ranks.len()).ok_or_else(|| {
        ApiError::invalid(
            format!("Invalid X-data-parallel-rank header: this engine has ranks 0..{}.", st.ranks.len()),
            None,
        )
    })
}

/// Everything a response needs besides the tokens.
pub(crate) struct Job {
    endpoint: Endpoint,
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) created: u64,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
    /// `kv_transfer_params` of the answer (a prefill for a remote decode).
    transfer_params: Option<Value>,
    /// Finish reason when the sequence reaches its planned length.
    length_reason: &'static str,
    echo_prefix: String,
    started: Instant,
    /// The data-parallel rank serving it.
    rank: usize,
}

async fn serve(
    st: Arc<AppState>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let body = match body {
        Ok(b) => b,
        Err(BytesRejection::FailedToBufferBody(_)) => {
            return error_response(ApiError::too_large(st.cfg.max_body_bytes))
        }
        Err(e) => return error_response(ApiError::invalid(e.body_text(), None)),
    };
    match prepare(&st, endpoint, &headers, &body, started).await {
        Ok((job, rx, guard)) => {
            if job.stream {
                stream_response(st, job, rx, guard)
            } else {
                full_response(st, job, rx, guard).await
            }
        }
        Err(e) => error_response(e),
    }
}

pub(crate) async fn prepare(
    st: &Arc<AppState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Result<(Job, mpsc::UnboundedReceiver<TokenOut>, AbortOnDrop), ApiError> {
    let req = request::parse(endpoint, body)?;
    let lora = st.cfg.adapters().find(|(name, _)| *name == req.model).map(|(name, _)| name.to_owned());
    if req.model != st.cfg.model && !st.cfg.model_aliases.contains(&req.model) && lora.is_none() {
        return Err(ApiError::model_not_found(&req.model));
    }
    let rank = data_parallel_rank(st, headers)?;
    if req.priority != 0 && st.cfg.scheduling_policy == crate::engine::Scheduling::Fcfs {
        // vLLM's words, from its input processor.
        return Err(ApiError::invalid(
            format!("Got priority {} but Priority scheduling is not enabled.", req.priority),
            Some("priority"),
        ));
    }
    if req.n != 1 {
        return Err(ApiError::invalid("The engine simulator supports only n=1.", Some("n")));
    }
    let tokenizer = st.tokenizer.clone();
    let prompt = req.prompt.clone();
    let chat = req.chat.clone();
    let add_generation_prompt = req.add_generation_prompt;
    let vocab = tokenizer.vocab_size();
    // Tokenizing is CPU work of milliseconds for long prompts: keep it off the async workers.
    let (ids, echo_prefix) =
        tokio::task::spawn_blocking(move || tokenize(&tokenizer, &prompt, chat.as_ref(), add_generation_prompt, vocab))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))??;
    let (output_len, length_reason) = output_plan(st, &req, &ids)?;
    if (ids.len() + output_len) as u64 > st.kv_capacity_tokens {
        return Err(ApiError::invalid(
            format!(
                "The request needs {} tokens of KV cache but the engine holds only {}.",
                ids.len() + output_len,
                st.kv_capacity_tokens
            ),
            None,
        ));
    }
    let transfer = if st.cfg.kv_transfer {
        crate::nixl::parse(req.kv_transfer_params.as_ref())?
    } else {
        crate::nixl::Transfer::None
    };
    let frontend = std::time::Duration::from_secs_f64(st.cfg.timing.frontend_ms * st.cfg.time_scale / 1000.0);
    tokio::time::sleep(frontend.saturating_sub(started.elapsed())).await;
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let bs = st.cfg.block_size as usize;
    let mut external_kv_tokens = 0;
    let mut transfer_params = None;
    match &transfer {
        crate::nixl::Transfer::None => {}
        crate::nixl::Transfer::Offer => {
            let offer_id = format!("{}-{request_id}", st.engine_id);
            st.offers.offer(&offer_id, ids.len(), std::time::Duration::from_secs(st.cfg.kv_transfer_ttl_s));
            transfer_params = Some(crate::nixl::offer_params(
                &st.engine_id,
                &st.http_addr.ip().to_string(),
                st.http_addr.port(),
                &offer_id,
                ids.len().div_ceil(bs),
            ));
        }
        crate::nixl::Transfer::Pull { host, port, request_id: offer, blocks } => {
            let tokens = crate::nixl::pull(&st.client, host, *port, offer).await?;
            if tokens != ids.len() || *blocks != tokens.div_ceil(bs) {
                return Err(ApiError::invalid(
                    format!(
                        "kv_transfer_params name {tokens} tokens in {blocks} blocks; this prompt has {}.",
                        ids.len()
                    ),
                    Some("kv_transfer_params"),
                )
                .with_code("invalid_kv_transfer_params"));
            }
            let t = crate::nixl::transfer_time(
                tokens,
                st.cfg.kv_bytes_per_token,
                st.cfg.kv_link_gb_per_s,
                st.cfg.kv_transfer_overhead_ms,
            );
            tokio::time::sleep(t.mul_f64(st.cfg.time_scale)).await;
            external_kv_tokens = tokens;
        }
    }
    let seq = NewSequence {
        id: st.ranks[rank].engine.next_id(),
        output_seed: st.filler.sequence_seed(&ids, req.seed),
        prompt: ids,
        output_len,
        external_kv_tokens,
        cache_salt: req.cache_salt.clone(),
        lora,
        priority: req.priority,
    };
    let (rx, guard) = st.ranks[rank].engine.submit(seq).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::unavailable("The engine's request queue is full; retry later."),
        SubmitError::Closed => ApiError::unavailable("The engine is shutting down."),
    })?;
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        _ => "cmpl",
    };
    let job = Job {
        endpoint,
        id: format!("{prefix}-{request_id}"),
        model: req.model.clone(),
        created: now_secs(),
        stream: req.stream,
        include_usage: req.include_usage,
        stop: req.stop.into_iter().filter(|s| !s.is_empty()).collect(),
        transfer_params,
        length_reason,
        echo_prefix: if req.echo { echo_prefix } else { String::new() },
        started,
        rank,
    };
    Ok((job, rx, guard))
}

/// Whether `model` names what this engine serves: its name, an alias or a LoRA adapter.
pub(crate) fn serves(st: &AppState, model: &str) -> bool {
    model == st.cfg.model
        || st.cfg.model_aliases.iter().any(|a| a == model)
        || st.cfg.adapters().any(|(n, _)| n == model)
}

/// Starts a chat completion built by another endpoint (Responses, Messages) on the same path
/// `/v1/chat/completions` takes, as vLLM runs those APIs through its chat serving.
pub(crate) async fn start_chat(st: &Arc<AppState>, headers: &HeaderMap, body: &Value) -> Result<Generation, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::internal(e.to_string()))?;
    let (job, rx, guard) = prepare(st, Endpoint::Chat, headers, &bytes, Instant::now()).await?;
    Ok(Generation::new(st.clone(), job, rx, guard))
}

/// Token counts of one prompt run as prefill-only work.
pub(crate) struct Prefilled {
    pub prompt_tokens: usize,
}

/// Runs `ids` through the simulated scheduler as prefill work, as a pooling model's request
/// is: the prompt is scheduled, takes KV blocks (so it loads the engine, shows in metrics and
/// publishes KV events like any prompt), and the one token the scheduler produces is dropped.
pub(crate) async fn prefill(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    ids: Vec<u32>,
    cache_salt: Option<String>,
) -> Result<Prefilled, ApiError> {
    let rank = data_parallel_rank(st, headers)?;
    if ids.len() as u64 + 1 > st.kv_capacity_tokens {
        return Err(ApiError::invalid(
            format!(
                "The request needs {} tokens of KV cache but the engine holds only {}.",
                ids.len() + 1,
                st.kv_capacity_tokens
            ),
            None,
        ));
    }
    let seq = NewSequence {
        id: st.ranks[rank].engine.next_id(),
        output_seed: st.filler.sequence_seed(&ids, None),
        prompt: ids,
        output_len: 1,
        external_kv_tokens: 0,
        cache_salt,
        lora: None,
        priority: 0,
    };
    let (mut rx, mut guard) = st.ranks[rank].engine.submit(seq).map_err(|e| match e {
        SubmitError::QueueFull => ApiError::unavailable("The engine's request queue is full; retry later."),
        SubmitError::Closed => ApiError::unavailable("The engine is shutting down."),
    })?;
    while let Some(t) = rx.recv().await {
        if t.finished {
            guard.disarm();
            return Ok(Prefilled { prompt_tokens: t.prompt_tokens });
        }
    }
    Err(ApiError::unavailable("The engine stopped before the request finished."))
}

/// A prompt's ids as vLLM computes them: a chat request rendered with everything vLLM gives
/// its chat template (`policy::chat`: tools, tool calls, `chat_template_kwargs`, ...).
pub(crate) fn tokenize(
    t: &ModelTokenizer,
    prompt: &Prompt,
    chat: Option<&kvmesh_policy::chat::ChatInputs>,
    add_generation_prompt: bool,
    vocab: u32,
) -> Result<(Vec<u32>, String), ApiError> {
    let (ids, text) = match prompt {
        Prompt::Chat(messages) => {
            let rendered = match chat {
                Some(inputs) => t.render(inputs),
                None => t.render_chat(messages, add_generation_prompt),
            };
            let text = rendered.map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
            (t.encode(&text, false).map_err(|e| ApiError::internal(e.to_string()))?, text)
        }
        Prompt::Text(text) => (t.encode(text, true).map_err(|e| ApiError::internal(e.to_string()))?, text.clone()),
        Prompt::TokenIds(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                return Err(ApiError::invalid(
                    format!("Token id {bad} is out of vocabulary (size {vocab})."),
                    Some("prompt"),
                ));
            }
            (ids.clone(), t.decode(ids).unwrap_or_default())
        }
        Prompt::Opaque => {
            return Err(ApiError::invalid("The engine simulator needs a prompt (text or token ids).", Some("prompt")))
        }
    };
    if ids.is_empty() {
        return Err(ApiError::invalid("The prompt cannot be empty.", Some("prompt")));
    }
    Ok((ids, text))
}

/// How many tokens to generate, and the finish reason when that many are out. Checks the context
/// length as vLLM does, with vLLM's message.
fn output_plan(st: &AppState, req: &InferenceRequest, ids: &[u32]) -> Result<(usize, &'static str), ApiError> {
    let max_len = st.max_model_len as usize;
    let prompt = ids.len();
    if prompt >= max_len {
        return Err(ApiError::invalid(
            format!("This model's maximum context length is {max_len} tokens. However, your request has {prompt} input tokens. Please reduce the length of the input messages."),
            Some("messages"),
        ));
    }
    let room = max_len - prompt;
    match req.max_tokens {
        Some(m) if m as usize > room => Err(ApiError::invalid(
            format!("This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({prompt} in the messages, {m} in the completion). Please reduce the length of the messages or completion.", prompt + m as usize),
            Some("max_tokens"),
        )),
        Some(m) => {
            // Without ignore_eos the model may stop early; the filler "wants" a drawn length.
            let natural = st.filler.natural_length(st.filler.sequence_seed(ids, req.seed)).max(req.min_tokens as usize);
            if req.ignore_eos || natural >= m as usize {
                Ok((m as usize, "length"))
            } else {
                Ok((natural, "stop"))
            }
        }
        None if req.ignore_eos => Ok((room, "length")),
        None => {
            let natural = st.filler.natural_length(st.filler.sequence_seed(ids, req.seed)).max(req.min_tokens as usize);
            Ok((natural.min(room), if natural <= room { "stop" } else { "length" }))
        }
    }
}

/// Turns the token stream into text with stop-string handling, and records latency metrics.
pub(crate) struct Generation {
    st: Arc<AppState>,
    pub(crate) job: Job,
    rx: mpsc::UnboundedReceiver<TokenOut>,
    guard: AbortOnDrop,
    /// Bytes of `text` already handed to the client.
    text_len: usize,
    pub(crate) text: String,
    hold: usize,
    last_token_at: Option<Instant>,
    pub(crate) prompt_tokens: usize,
    pub(crate) cached_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) finish: Option<(&'static str, Option<String>)>,
}

/// One step of a generation as the client will see it.
pub(crate) enum Piece {
    Text(String),
    Finished,
    Failed(ApiError),
}

impl Generation {
    pub(crate) fn new(st: Arc<AppState>, job: Job, rx: mpsc::UnboundedReceiver<TokenOut>, guard: AbortOnDrop) -> Self {
        Self {
            hold: job.stop.iter().map(String::len).max().unwrap_or(1).saturating_sub(1),
            st,
            job,
            rx,
            guard,
            text_len: 0,
            text: String::new(),
            last_token_at: None,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            finish: None,
        }
    }

    pub(crate) async fn next(&mut self) -> Piece {
        if self.finish.is_some() {
            return Piece::Finished;
        }
        let Some(t) = self.rx.recv().await else {
            return Piece::Failed(ApiError::unavailable("The engine stopped before the request finished."));
        };
        let now = Instant::now();
        match self.last_token_at {
            None => {
                self.st.ranks[self.job.rank].metrics.ttft.observe(now.duration_since(self.job.started).as_secs_f64())
            }
            Some(prev) => self.st.ranks[self.job.rank].metrics.itl.observe(now.duration_since(prev).as_secs_f64()),
        }
        self.last_token_at = Some(now);
        self.prompt_tokens = t.prompt_tokens;
        self.cached_tokens = t.cached_prompt_tokens;
        self.completion_tokens = t.index + 1;
        let checked = self.text.len();
        self.text.push_str(self.st.filler.text(t.token));
        if let Some((pos, stop)) = find_stop(&self.text, checked, &self.job.stop) {
            self.text.truncate(pos);
            self.guard.abort_now();
            self.finish = Some(("stop", Some(stop)));
        } else if t.finished {
            self.guard.disarm();
            self.finish = Some((self.job.length_reason, None));
        }
        // While streaming, hold back what could still turn out to be the start of a stop string.
        let mut end = if self.finish.is_some() { self.text.len() } else { self.text.len().saturating_sub(self.hold) };
        while end > self.text_len && !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let end = end.max(self.text_len);
        let piece = self.text[self.text_len..end].to_owned();
        self.text_len = end;
        if let Some((reason, _)) = &self.finish {
            self.st.ranks[self.job.rank].metrics.e2e.observe(self.job.started.elapsed().as_secs_f64());
            self.st.ranks[self.job.rank].metrics.request_success.with_label_values(&[reason]).inc();
        }
        Piece::Text(piece)
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "completion_tokens": self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }

    fn finish_reason(&self) -> Value {
        self.finish.as_ref().map(|(r, _)| json!(r)).unwrap_or(Value::Null)
    }

    fn stop_reason(&self) -> Value {
        self.finish.as_ref().and_then(|(_, s)| s.clone()).map(Value::String).unwrap_or(Value::Null)
    }
}

/// The earliest stop string in `text` that ends after `from` (text before `from` was checked
/// already, so only matches reaching into the new piece count).
fn find_stop(text: &str, from: usize, stops: &[String]) -> Option<(usize, String)> {
    stops
        .iter()
        .filter_map(|s| {
            let start = from.saturating_sub(s.len().saturating_sub(1));
            let start = (start..=from).find(|&i| text.is_char_boundary(i)).unwrap_or(from);
            text[start..].find(s.as_str()).map(|p| (start + p, s.clone()))
        })
        .min_by_key(|(p, _)| *p)
}

async fn full_response(
    st: Arc<AppState>,
    job: Job,
    rx: mpsc::UnboundedReceiver<TokenOut>,
    guard: AbortOnDrop,
) -> Response {
    let mut g = Generation::new(st, job, rx, guard);
    loop {
        match g.next().await {
            Piece::Text(_) if g.finish.is_none() => continue,
            Piece::Text(_) | Piece::Finished => break,
            Piece::Failed(e) => return error_response(e),
        }
    }
    let text = format!("{}{}", g.job.echo_prefix, g.text);
    let body = match g.job.endpoint {
        Endpoint::Chat => json!({
            "id": g.job.id, "object": "chat.completion", "created": g.job.created, "model": g.job.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "reasoning_content": null, "tool_calls": []},
                "logprobs": null, "finish_reason": g.finish_reason(), "stop_reason": g.stop_reason(),
            }],
            "usage": g.usage(), "prompt_logprobs": null, "kv_transfer_params": g.job.transfer_params,
        }),
        _ => json!({
            "id": g.job.id, "object": "text_completion", "created": g.job.created, "model": g.job.model,
            "choices": [{
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": g.finish_reason(), "stop_reason": g.stop_reason(), "prompt_logprobs": null,
            }],
            "usage": g.usage(), "kv_transfer_params": g.job.transfer_params,
        }),
    };
    axum::Json(body).into_response()
}

/// State of an SSE response between chunks.
enum SseState {
    Start(Box<Generation>),
    Tokens(Box<Generation>),
    Usage(Box<Generation>),
    Done,
    End,
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn chunk(g: &Generation, text: Option<&str>, role: bool, finish: bool) -> Value {
    let finish_reason = if finish { g.finish_reason() } else { Value::Null };
    match g.job.endpoint {
        Endpoint::Chat => {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({
                "id": g.job.id, "object": "chat.completion.chunk", "created": g.job.created, "model": g.job.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason,
                             "stop_reason": if finish { g.stop_reason() } else { Value::Null }}],
            })
        }
        _ => json!({
            "id": g.job.id, "object": "text_completion", "created": g.job.created, "model": g.job.model,
            "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish_reason,
                         "stop_reason": if finish { g.stop_reason() } else { Value::Null }}],
        }),
    }
}

fn stream_response(st: Arc<AppState>, job: Job, rx: mpsc::UnboundedReceiver<TokenOut>, guard: AbortOnDrop) -> Response {
    let g = Box::new(Generation::new(st, job, rx, guard));
    // The body owns the generation: if the client disconnects, the body is dropped, the guard
    // fires and the engine frees the sequence's blocks.
    let stream = futures::stream::unfold(SseState::Start(g), |state| async move {
        match state {
            SseState::Start(g) => {
                let first = match g.job.endpoint {
                    // vLLM sends the role chunk when the engine's first output arrives, with the
                    // first token after it: a stream's first byte is its first token.
                    Endpoint::Chat => {
                        let role = sse(&chunk(&g, Some(""), true, false));
                        return match next_token(g).await {
                            Some((Ok(token), next)) => Some((Ok([role, token].concat().into()), next)),
                            other => other,
                        };
                    }
                    Endpoint::Completions if !g.job.echo_prefix.is_empty() => {
                        sse(&chunk(&g, Some(&g.job.echo_prefix.clone()), false, false))
                    }
                    _ => return next_token(g).await,
                };
                Some((Ok::<_, Infallible>(first), SseState::Tokens(g)))
            }
            SseState::Tokens(g) => next_token(g).await,
            SseState::Usage(g) => Some((
                Ok(sse(&json!({
                    "id": g.job.id,
                    "object": match g.job.endpoint { Endpoint::Chat => "chat.completion.chunk", _ => "text_completion" },
                    "created": g.job.created, "model": g.job.model, "choices": [], "usage": g.usage(),
                }))),
                SseState::Done,
            )),
            SseState::Done => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), SseState::End)),
            SseState::End => None,
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_response(ApiError::internal("failed to build response")))
}

async fn next_token(mut g: Box<Generation>) -> Option<(Result<Bytes, Infallible>, SseState)> {
    match g.next().await {
        Piece::Text(t) => {
            let done = g.finish.is_some();
            let bytes = sse(&chunk(&g, Some(&t), false, done));
            let next = match (done, g.job.include_usage) {
                (false, _) => SseState::Tokens(g),
                (true, true) => SseState::Usage(g),
                (true, false) => SseState::Done,
            };
            Some((Ok(bytes), next))
        }
        Piece::Finished => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), SseState::End)),
        // A failure after the stream started ends it with an error event, as vLLM does.
        Piece::Failed(e) => Some((Ok(Bytes::from(e.to_sse_event())), SseState::Done)),
    }
}

#[cfg(test)]
mod tests {
    use super::find_stop;

    #[test]
    fn stop_found_across_pieces() {
        let stops = vec!["lo wo".to_string()];
        // "hel" was checked; "lo world" arrived.
        assert_eq!(find_stop("hello world", 3, &stops), Some((3, "lo wo".into())));
        assert_eq!(find_stop("hello world", 11, &stops), None);
        assert_eq!(find_stop("héllo", 2, &["llo".to_string()]), Some((3, "llo".into())));
    }
}
