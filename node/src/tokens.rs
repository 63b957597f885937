//! The tokenizer service: a prompt's token ids at the node that receives the request, once.
//!
//! One [`PromptEncoder`] per model (`[[models]]` in config; the embedded simulator's model uses
//! the tokenizer compiled into kvmesh), each with its segment cache and, where the start-up check
//! passed, the fast encoder. Encoding runs on a small pool of dedicated threads fed by a bounded
//! queue, never on the async workers; when the queue is full the request is shed with a 503
//! rather than left to wait behind work the node cannot keep up with. A model without a
//! tokenizer is routed by load alone.
//!
//! The ids leave this node only as block keys in the QUIC request head (see `router`), so the
//! peer that serves a forwarded request never tokenizes it again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvmesh_policy::blocks;
use kvmesh_policy::candidates::PromptKeys;
use kvmesh_policy::models::KeySpace;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::prompt_encoder::{EncoderOptions, EncoderReport, PromptEncoder};
use kvmesh_policy::request::{Endpoint, InferenceRequest, Prompt};
use kvmesh_policy::tokenize::TokenizerFiles;
use serde::Serialize;

use crate::config::Config;
use crate::engine::EngineSet;
use crate::error::NodeError;
use crate::metrics::NodeMetrics;

type Job = Box<dyn FnOnce() + Send + 'static>;

struct ModelTokenizer {
    encoder: Arc<PromptEncoder>,
    /// Context length set in config (`[[models]] max_model_len`); without it the engines'
    /// own reports are used.
    max_model_len: Option<u32>,
    /// Resident memory the model's tokenizers added when loaded (Linux RSS delta).
    loaded_bytes: u64,
    /// Prompts of this model whose chat template did not render here (the engine's own render
    /// decides; they were routed by approximate keys), and the last reason, which names the
    /// template construct.
    render_failures: Arc<RenderFailures>,
}

/// Prompts a model's template failed to render, and the last error (bounded).
#[derive(Debug, Default)]
struct RenderFailures {
    count: std::sync::atomic::AtomicU64,
    last: Mutex<Option<String>>,
}

/// Longest render error kept for the status.
const MAX_RENDER_ERROR_CHARS: usize = 300;

pub struct Tokenizers {
    by_model: HashMap<String, ModelTokenizer>,
    jobs: Option<crossbeam_channel::Sender<Job>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    queued: Arc<AtomicUsize>,
    queue_bound: usize,
    metrics: Arc<NodeMetrics>,
    engines: Arc<EngineSet>,
}

/// What `/v1/mesh/status` says about a model's tokenizer.
#[derive(Debug, Serialize)]
pub struct TokenizerStatus {
    pub model: String,
    /// `exact`, or `exact_with_render_failures` when some prompts did not render here: those
    /// were routed by approximate keys, never by wrong exact ones.
    pub mode: &'static str,
    pub render_failures: u64,
    /// The last render error, naming the template construct that failed.
    pub last_render_error: Option<String>,
    pub encoder: EncoderReport,
    pub max_model_len: Option<u32>,
    pub loaded_bytes: u64,
    pub segment_cache_bytes: u64,
}

impl Tokenizers {
    /// Loads every configured tokenizer (off the async runtime: a production vocabulary takes
    /// about a second with its start-up checks) and starts the encoding threads.
    pub async fn load(cfg: &Config, metrics: Arc<NodeMetrics>, engines: Arc<EngineSet>) -> Result<Self, NodeError> {
        let cfg2 = cfg.clone();
        // Models the engines serve (their first `/v1/models`), for the Hugging Face cache lookup.
        let served = engines.models();
        let by_model = tokio::task::spawn_blocking(move || load_all(&cfg2, &served))
            .await
            .map_err(|e| NodeError::Config(format!("loading tokenizers: {e}")))??;
        for (model, t) in &by_model {
            metrics.tokenizer_memory.with_label_values(&[model, "loaded"]).set(t.loaded_bytes as i64);
        }
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.tokenize.queue);
        let mut workers = Vec::new();
        for i in 0..cfg.tokenize.threads {
            let rx = rx.clone();
            let w = std::thread::Builder::new()
                .name(format!("kvmesh-tokenize-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        // A panicking encode must not take the thread with it: its request
                        // falls back to load routing (its reply channel is dropped).
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                            tracing::warn!("a tokenizer job panicked; the request is routed by load");
                        }
                    }
                })
                .map_err(|e| NodeError::Config(format!("cannot start tokenizer threads: {e}")))?;
            workers.push(w);
        }
        Ok(Self {
            by_model,
            jobs: Some(tx),
            workers: Mutex::new(workers),
            queued: Arc::new(AtomicUsize::new(0)),
            queue_bound: cfg.tokenize.queue,
            metrics,
            engines,
        })
    }

    pub fn has(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    pub fn status(&self) -> Vec<TokenizerStatus> {
        let mut out: Vec<_> = self
            .by_model
            .iter()
            .map(|(model, t)| TokenizerStatus {
                model: model.clone(),
                mode: match t.render_failures.count.load(Ordering::Relaxed) {
                    0 => "exact",
                    _ => "exact_with_render_failures",
                },
                render_failures: t.render_failures.count.load(Ordering::Relaxed),
                last_render_error: t.render_failures.last.lock().ok().and_then(|l| l.clone()),
                encoder: t.encoder.report().clone(),
                max_model_len: self.max_model_len(model),
                loaded_bytes: t.loaded_bytes,
                segment_cache_bytes: t.encoder.cache_bytes(),
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Refreshes the gauges that are read rather than counted.
    pub fn observe(&self) {
        for (model, t) in &self.by_model {
            self.metrics
                .tokenizer_memory
                .with_label_values(&[model, "segment_cache"])
                .set(t.encoder.cache_bytes() as i64);
        }
        self.metrics.tokenize_queue.set(self.queued.load(Ordering::Relaxed) as i64);
    }

    /// The prompt's token ids as the engine will see them. `Ok(None)`: no tokenizer here for
    /// the model, or the prompt does not render (the engine will say why). Errors: the prompt
    /// is over the model's context (400), or the tokenizer is overloaded (503).
    /// The tokenize stage: the prompt's keys for routing. Token ids when this node has the
    /// model's tokenizer (or the client sent ids); otherwise approximate keys of its text
    /// (`blocks::text_chunk_keys`), about four bytes a token. `Err` is the answer to give (the
    /// prompt is too long for the model, or the tokenizer is overloaded: 503, retryable).
    /// `space`: how the engines serving the model key its blocks (aliases share the base
    /// model's, an adapter has its own, and is tokenized with its base model's tokenizer).
    pub async fn prompt_keys(&self, req: &InferenceRequest, space: &KeySpace) -> Result<PromptKeys, ApiError> {
        let seed = space.seed(req.cache_salt.as_deref());
        Ok(match self.prompt_ids_with(req, &space.base_name).await? {
            Some(ids) => PromptKeys::from_ids(seed, ids),
            None => approximate(req, seed),
        })
    }

    #[cfg(test)]
    pub async fn prompt_ids(&self, req: &InferenceRequest) -> Result<Option<Vec<u32>>, ApiError> {
        self.prompt_ids_with(req, &req.model).await
    }

    /// As `prompt_ids`, falling back to `base_name`'s tokenizer when the requested name has
    /// none here (a LoRA adapter, an alias).
    async fn prompt_ids_with(&self, req: &InferenceRequest, base_name: &str) -> Result<Option<Vec<u32>>, ApiError> {
        let model = if self.by_model.contains_key(req.model.as_str()) { req.model.as_str() } else { base_name };
        // Only models with a tokenizer here name a label: a client's arbitrary model names
        // must not create metric series.
        let label = if self.by_model.contains_key(model) { model } else { "other" };
        let count = |outcome: &str| self.metrics.tokenize_requests.with_label_values(&[label, outcome]).inc();
        if req.prompt == Prompt::Opaque {
            count("opaque");
            return Ok(None);
        }
        if let Prompt::TokenIds(ids) = &req.prompt {
            count("token_ids");
            self.check_length(req, ids.len())?;
            return Ok(Some(ids.clone()));
        }
        let Some(t) = self.by_model.get(model) else {
            count("no_tokenizer");
            return Ok(None);
        };
        let Some(jobs) = &self.jobs else { return Ok(None) };
        let encoder = t.encoder.clone();
        let prompt = req.prompt.clone();
        let chat = req.chat.clone();
        let add_generation_prompt = req.add_generation_prompt;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.queued.clone();
        let job: Job = Box::new(move || {
            queued.fetch_sub(1, Ordering::Relaxed);
            let started = Instant::now();
            let out = match &prompt {
                Prompt::Chat(messages) => match &chat {
                    Some(inputs) => encoder.encode_inputs(inputs),
                    None => encoder.encode_chat(messages, add_generation_prompt),
                },
                Prompt::Text(text) => encoder.encode(text, true),
                Prompt::TokenIds(ids) => {
                    Ok(kvmesh_policy::prompt_encoder::Encoded { ids: ids.clone(), ..Default::default() })
                }
                Prompt::Opaque => Ok(kvmesh_policy::prompt_encoder::Encoded::default()),
            };
            let _ = tx.send((out, started.elapsed()));
        });
        self.queued.fetch_add(1, Ordering::Relaxed);
        if jobs.try_send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            count("shed");
            return Err(ApiError::unavailable(format!(
                "The tokenizer for `{model}` is overloaded ({} prompts queued); retry shortly.",
                self.queue_bound
            ))
            .with_code("tokenizer_overloaded"));
        }
        let Ok((out, took)) = rx.await else { return Ok(None) };
        self.metrics.tokenize_seconds.with_label_values(&[model]).observe(took.as_secs_f64());
        match out {
            Ok(e) => {
                count("tokenized");
                self.metrics.tokenize_tokens.with_label_values(&[model, "encoded"]).inc_by(e.encoded as u64);
                self.metrics.tokenize_tokens.with_label_values(&[model, "cache"]).inc_by(e.cached as u64);
                self.check_length(req, e.ids.len())?;
                Ok(Some(e.ids))
            }
            Err(e) => {
                count("failed");
                let failures = &t.render_failures;
                let why: String = e.to_string().chars().take(MAX_RENDER_ERROR_CHARS).collect();
                if failures.count.fetch_add(1, Ordering::Relaxed) == 0 {
                    // Once per model: the status keeps the count and the latest reason.
                    tracing::warn!(model, error = %why, "a prompt did not render with this node's chat template; such prompts are routed by approximate keys (see /v1/mesh/status tokenizers)");
                }
                if let Ok(mut last) = failures.last.lock() {
                    *last = Some(why);
                }
                Ok(None)
            }
        }
    }

    /// vLLM's own check and wording, done here so an impossible request is refused before it
    /// is routed anywhere.
    fn check_length(&self, req: &InferenceRequest, prompt_tokens: usize) -> Result<(), ApiError> {
        let Some(max) = self.max_model_len(&req.model) else { return Ok(()) };
        let completion = req.max_tokens.unwrap_or(0) as usize;
        if prompt_tokens + completion <= max as usize && prompt_tokens < max as usize {
            return Ok(());
        }
        let what = if req.endpoint == Endpoint::Chat { "messages" } else { "prompt" };
        Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {max} tokens. However, you requested {} tokens \
                 ({prompt_tokens} in the {what}, {completion} in the completion). Please reduce the length \
                 of the {what} or completion.",
                prompt_tokens + completion
            ),
            Some(what),
        )
        .with_code("context_length_exceeded"))
    }
}

impl Tokenizers {
    /// The context length to enforce for `model`: the configured one, else the largest that
    /// this node's engines serving it report (a peer's engine with a longer context would still
    /// refuse a request too long for it itself). Not the tokenizer's `model_max_length`, which
    /// is often not the engine's limit.
    fn max_model_len(&self, model: &str) -> Option<u32> {
        if let Some(m) = self.by_model.get(model).and_then(|t| t.max_model_len) {
            return Some(m);
        }
        self.engines
            .engines
            .iter()
            .filter_map(|e| e.view.read().ok().filter(|v| v.models.iter().any(|m| m == model))?.max_model_len)
            .max()
    }
}

impl Drop for Tokenizers {
    /// Closing the queue ends the workers once they finish what they hold; they are joined so
    /// no encoding outlives the node.
    fn drop(&mut self) {
        self.jobs.take();
        if let Ok(mut workers) = self.workers.lock() {
            for w in workers.drain(..) {
                let _ = w.join();
            }
        }
    }
}

fn load_all(cfg: &Config, served: &[String]) -> Result<HashMap<String, ModelTokenizer>, NodeError> {
    let opts = |m: Option<&crate::config::ModelEntry>| EncoderOptions {
        encoder: m.map(|m| m.encoder).unwrap_or_default(),
        segment_cache_bytes: cfg.tokenize.segment_cache_mb << 20,
    };
    let mut by_model = HashMap::new();
    let before = resident_bytes();
    let builtin = PromptEncoder::new(&TokenizerFiles::builtin(), &opts(None))
        .map_err(|e| NodeError::Config(format!("builtin tokenizer: {e}")))?;
    // Expected and harmless for the tiny builtin tokenizer (see ARCHITECTURE.md, Tokenizing).
    for note in &builtin.report().notes {
        tracing::debug!(model = %cfg.embedded.model, "{note}");
    }
    let loaded_bytes = resident_bytes().saturating_sub(before);
    by_model.insert(
        cfg.embedded.model.clone(),
        ModelTokenizer {
            encoder: Arc::new(builtin),
            max_model_len: None,
            loaded_bytes,
            render_failures: Arc::default(),
        },
    );
    for m in &cfg.models {
        let before = resident_bytes();
        let files = TokenizerFiles::read(&m.tokenizer, m.chat_template.as_deref())
            .map_err(|e| NodeError::Config(format!("[[models]] {}: {e}", m.name)))?;
        let encoder = PromptEncoder::new(&files, &opts(Some(m)))
            .map_err(|e| NodeError::Config(format!("[[models]] {}: {e}", m.name)))?;
        let max_model_len = m.max_model_len;
        let loaded_bytes = resident_bytes().saturating_sub(before);
        let r = encoder.report();
        for note in &r.notes {
            tracing::warn!(model = %m.name, "{note}");
        }
        tracing::info!(model = %m.name, fast = r.fast_encoder, segment_cache = r.segment_cache, loaded_mb = loaded_bytes >> 20, "tokenizer ready");
        by_model.insert(
            m.name.clone(),
            ModelTokenizer { encoder: Arc::new(encoder), max_model_len, loaded_bytes, render_failures: Arc::default() },
        );
    }
    // Served models with no tokenizer configured: a local Hugging Face cache may hold theirs
    // (never downloaded here). One that does not load stays approximate, with a warning.
    let unconfigured: Vec<&String> = served.iter().filter(|m| !by_model.contains_key(*m)).collect();
    for model in unconfigured {
        let Some(dir) = hf_cached_tokenizer(model, &hf_hub_dirs()) else { continue };
        let loaded = TokenizerFiles::read(&dir, None).and_then(|files| PromptEncoder::new(&files, &opts(None)));
        match loaded {
            Ok(encoder) => {
                tracing::info!(model = %model, dir = %dir.display(), "tokenizer found in the Hugging Face cache");
                by_model.insert(
                    model.clone(),
                    ModelTokenizer {
                        encoder: Arc::new(encoder),
                        max_model_len: None,
                        loaded_bytes: 0,
                        render_failures: Arc::default(),
                    },
                );
            }
            Err(e) => {
                tracing::warn!(model = %model, dir = %dir.display(), error = %e, "a cached tokenizer did not load; routing this model approximately")
            }
        }
    }
    Ok(by_model)
}

/// Where a local Hugging Face hub cache may be, in the order the `huggingface_hub` library
/// looks: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`.
fn hf_hub_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        dirs.push(d.into());
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        dirs.push(std::path::PathBuf::from(d).join("hub"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(std::path::PathBuf::from(home).join(".cache/huggingface/hub"));
    }
    dirs
}

/// A model's tokenizer directory in a hub cache: `models--ORG--NAME/snapshots/REV/` holding
/// `tokenizer.json`, the revision `refs/main` names when there is one, else any snapshot with it.
/// Model names that are not a repository id find nothing.
pub fn hf_cached_tokenizer(model: &str, hub_dirs: &[std::path::PathBuf]) -> Option<std::path::PathBuf> {
    if model.is_empty() || model.contains("..") || model.starts_with('/') {
        return None;
    }
    let repo = format!("models--{}", model.replace('/', "--"));
    for hub in hub_dirs {
        let root = hub.join(&repo);
        let snapshots = root.join("snapshots");
        let main = std::fs::read_to_string(root.join("refs/main")).ok().map(|r| r.trim().to_owned());
        if let Some(rev) = main.filter(|r| !r.is_empty() && !r.contains('/')) {
            let dir = snapshots.join(rev);
            if dir.join("tokenizer.json").is_file() {
                return Some(dir);
            }
        }
        let Ok(entries) = std::fs::read_dir(&snapshots) else { continue };
        let mut found: Vec<std::path::PathBuf> =
            entries.flatten().map(|e| e.path()).filter(|p| p.join("tokenizer.json").is_file()).collect();
        found.sort();
        if let Some(dir) = found.pop() {
            return Some(dir);
        }
    }
    None
}

/// This process's resident memory, from `/proc/self/statm` (0 where there is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Approximate keys of a prompt's text (roles and contents in order), and a length of about
/// four bytes a token: for a model with no tokenizer here.
fn approximate(req: &InferenceRequest, seed: u64) -> PromptKeys {
    let parts: Vec<&str> = match &req.prompt {
        Prompt::Chat(messages) => messages.iter().flat_map(|m| [m.role.as_str(), m.content.as_str()]).collect(),
        Prompt::Text(text) => vec![text.as_str()],
        Prompt::TokenIds(_) | Prompt::Opaque => Vec::new(),
    };
    let bytes: usize = parts.iter().map(|p| p.len()).sum();
    PromptKeys::approximate(bytes / 4, blocks::text_chunk_keys(seed, &parts))
}

#[cfg(test)]
mod hf_cache_tests {
    use super::hf_cached_tokenizer;

    #[test]
    fn a_cached_snapshot_is_found_by_repository_id() {
        let hub = tempfile::tempdir().unwrap();
        let root = hub.path().join("models--org--model-7b");
        for rev in ["aaa", "bbb"] {
            std::fs::create_dir_all(root.join("snapshots").join(rev)).unwrap();
            std::fs::write(root.join("snapshots").join(rev).join("tokenizer.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "aaa\n").unwrap();
        let dirs = vec![hub.path().to_path_buf()];
        assert_eq!(hf_cached_tokenizer("org/model-7b", &dirs), Some(root.join("snapshots/aaa")), "refs/main wins");
        std::fs::remove_file(root.join("refs/main")).unwrap();
        assert_eq!(hf_cached_tokenizer("org/model-7b", &dirs), Some(root.join("snapshots/bbb")));
        assert_eq!(hf_cached_tokenizer("org/other", &dirs), None);
        assert_eq!(hf_cached_tokenizer("../etc", &dirs), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_policy::request::{self, Endpoint};

    /// A prompt the model's template refuses is routed by approximate keys, and the status says
    /// so for that model, with the template's own reason.
    #[tokio::test]
    async fn a_prompt_that_does_not_render_is_counted_and_named_in_the_status() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), kvmesh_policy::tokenize::BUILTIN_TOKENIZER_JSON).unwrap();
        let mut tc: serde_json::Value =
            serde_json::from_slice(kvmesh_policy::tokenize::BUILTIN_TOKENIZER_CONFIG).unwrap();
        tc["chat_template"] = serde_json::Value::String(
            "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}{{ messages[0].content }}"
                .into(),
        );
        std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
        let cfg = Config {
            models: vec![crate::config::ModelEntry {
                name: "strict".into(),
                tokenizer: dir.path().to_path_buf(),
                chat_template: None,
                encoder: Default::default(),
                max_model_len: None,
            }],
            ..Config::default()
        };
        let metrics = Arc::new(NodeMetrics::new("t").unwrap());
        let engines = Arc::new(EngineSet::new(&[], &cfg, reqwest::Client::new()));
        let t = Tokenizers::load(&cfg, metrics, engines).await.unwrap();
        let one = br#"{"model":"strict","messages":[{"role":"user","content":"hi"}]}"#;
        let two =
            br#"{"model":"strict","messages":[{"role":"user","content":"hi"},{"role":"user","content":"again"}]}"#;
        assert!(t.prompt_ids(&request::parse(Endpoint::Chat, one).unwrap()).await.unwrap().is_some());
        let strict = |t: &Tokenizers| t.status().into_iter().find(|s| s.model == "strict").unwrap();
        assert_eq!((strict(&t).mode, strict(&t).render_failures), ("exact", 0));
        assert!(t.prompt_ids(&request::parse(Endpoint::Chat, two).unwrap()).await.unwrap().is_none());
        let s = strict(&t);
        assert_eq!((s.mode, s.render_failures), ("exact_with_render_failures", 1));
        assert!(s.last_render_error.unwrap().contains("one message only"));
    }

    #[tokio::test]
    async fn full_queue_sheds_with_503() {
        let mut cfg = Config::default();
        cfg.tokenize.threads = 1;
        cfg.tokenize.queue = 1;
        let metrics = Arc::new(NodeMetrics::new("t").unwrap());
        let engines = Arc::new(EngineSet::new(&[], &cfg, reqwest::Client::new()));
        let t = Tokenizers::load(&cfg, metrics.clone(), engines).await.unwrap();
        // Hold the only thread, then fill the one queue slot.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let jobs = t.jobs.as_ref().unwrap();
        jobs.send(Box::new(move || {
            let _ = started_tx.send(());
            let _ = release_rx.recv();
        }))
        .unwrap();
        started_rx.recv().unwrap();
        jobs.send(Box::new(|| {})).unwrap();
        let req =
            request::parse(Endpoint::Chat, br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":"hello"}]}"#)
                .unwrap();
        let err = t.prompt_ids(&req).await.unwrap_err();
        assert_eq!(err.status.as_u16(), 503);
        assert_eq!(err.code.as_deref(), Some("tokenizer_overloaded"));
        assert_eq!(metrics.tokenize_requests.with_label_values(&["kvmesh-sim", "shed"]).get(), 1);
        release_tx.send(()).unwrap();
        while !t.jobs.as_ref().unwrap().is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // Once the thread is free, prompts are encoded again.
        let ids = t.prompt_ids(&req).await.unwrap().unwrap();
        assert!(!ids.is_empty());
    }
}
