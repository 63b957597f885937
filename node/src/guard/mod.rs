//! Admission and answer control on the node that receives a client's request: API keys,
//! per-tenant limits (mesh-wide through gossip), guardrail hooks on the prompt and on the answer
//! (streamed or not), webhooks, and the audit record of every request.
//!
//! The guard's stages, as `request::Pipeline` runs them for a client's request:
//! - `admit` (this module's `admit`): audit slot (503 when the log is behind, in reject mode) →
//!   API key (401) → parse (400) → the key's model list (404) → `max_tokens` limit (400) →
//!   prompt hooks (400 `content_filter`, or the prompt rewritten);
//! - `limit` (after the pipeline's tokenize stage, since limits count tokens): prompt length and
//!   tokens-per-minute (400) → rate limits with peers' usage (429 + `retry-after`);
//! - `answer`: answer hooks on the routed answer (whole, or as it streams, `stream`) → audit
//!   record written → the answer completes.
//!
//! Requests forwarded by a peer skip all of it: the origin node admitted them and records them.
//! The guard never routes: it neither imports nor calls the router.
//!
//! Rooms: `auth` (API keys), `limits` (rates and token budgets, mesh-wide through gossip),
//! `hooks` (built-in rules and webhooks, one verdict mapping for prompt and answer), `admit`,
//! `answer` (with the audit flow), `stream` (rewriting an SSE answer as it flows), `tasks`
//! (file watchers, usage publisher).
//!
//! Hooks run in the configured order. On streamed answers the built-in rules run on the text as
//! it flows (see `policy::guardrails::StreamScanner`); webhooks run once on the whole answer at
//! its end, where a deny replaces the final `[DONE]` with an error event (the text has already
//! been sent, so a webhook cannot rewrite a streamed answer). A prompt rewrite (redaction)
//! re-serializes the request body: the one case where an engine does not get the client's bytes.
//!
//! Limits not built: per-tenant concurrency, and counting tokens of a streamed answer that does
//! not report usage (only `usage.completion_tokens` is charged).

mod admit;
mod answer;
mod auth;
mod hooks;
mod limits;
mod stream;
mod tasks;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use kvmesh_policy::auth::{KeyEntry, KeyStore};
use kvmesh_policy::guardrails::{Guardrail, GuardrailConfig, PiiAction, PiiKind, Stage};
use kvmesh_policy::limits::{Limiter, LimitsConfig};
use kvmesh_policy::openai::ApiError;
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::config::{Config, GuardrailsFile, KeysFile};
use crate::error::NodeError;
use crate::mesh::Mesh;
use crate::metrics::NodeMetrics;

pub use answer::Flow;
use hooks::Rules;
pub(crate) use stream::rewrite_for_fuzzing;

/// Recorded prompt or answer text is cut here.
const MAX_RECORDED_TEXT: usize = 64 * 1024;
/// Longest wait for the audit writer's acknowledgement before answering anyway.
const AUDIT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer body the guard buffers to check (non-streamed answers are buffered already).
const MAX_CHECKED_BODY: usize = 64 * 1024 * 1024;

/// What a reload touched: counts of what is now in force, and the errors of what was kept.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub keys: Option<usize>,
    pub guardrails: Option<usize>,
    pub errors: Vec<String>,
}

pub struct Guard {
    node: String,
    auth_enabled: bool,
    keys: RwLock<Arc<KeyStore>>,
    inline_keys: Vec<KeyEntry>,
    keys_file: Option<PathBuf>,
    reload_every: Duration,
    protect_metrics: bool,
    limits: LimitsConfig,
    limits_enabled: bool,
    limiter: Mutex<Limiter>,
    epoch: Instant,
    usage_every: Duration,
    rules: RwLock<Arc<Rules>>,
    inline_rules: Vec<GuardrailConfig>,
    rules_file: Option<PathBuf>,
    rules_reload_every: Duration,
    window: usize,
    /// Redacts recorded text, whatever rules are configured.
    audit_redactor: Arc<dyn Guardrail>,
    audit: Option<Arc<AuditLog>>,
    metrics: Arc<NodeMetrics>,
    client: reqwest::Client,
}

/// A refusal before routing: the error, and for 429 how long to wait.
pub struct Refusal {
    pub error: ApiError,
    pub retry_after_s: Option<u64>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self { error, retry_after_s: None }
    }
}

impl Guard {
    /// The audit log, when one is configured (the router records forwarded requests in it).
    pub fn audit_log(&self) -> Option<&Arc<crate::audit::AuditLog>> {
        self.audit.as_ref()
    }

    /// The guard for `cfg`, or `None` when nothing is configured (the node then serves exactly
    /// as without this module).
    pub fn new(cfg: &Config, metrics: Arc<NodeMetrics>) -> Result<Option<Arc<Self>>, NodeError> {
        let limits_enabled = cfg.limits != LimitsConfig::default();
        if !cfg.auth.enabled()
            && !limits_enabled
            && cfg.guardrails.is_empty()
            && cfg.guardrails_file.is_none()
            && cfg.audit.path.is_none()
        {
            return Ok(None);
        }
        let rules = Rules::build(&cfg.guardrails)?;
        let audit_redactor = GuardrailConfig::Pii {
            name: "audit-redaction".into(),
            on: vec![Stage::Prompt, Stage::Response],
            types: vec![PiiKind::Card, PiiKind::Ssn, PiiKind::Email, PiiKind::Phone],
            action: PiiAction::Redact,
        }
        .build()
        .map_err(|e| NodeError::Config(e.to_string()))?
        .ok_or_else(|| NodeError::Config("audit redaction rule".into()))?;
        let audit = AuditLog::open(&cfg.audit, metrics.audit.clone())?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| NodeError::Client(format!("webhook client: {e}")))?;
        let guard = Self {
            node: cfg.node_name.clone(),
            auth_enabled: cfg.auth.enabled(),
            keys: RwLock::new(Arc::new(KeyStore::default())),
            inline_keys: cfg.auth.keys.clone(),
            keys_file: cfg.auth.keys_file.clone(),
            reload_every: Config::ms(cfg.auth.reload_interval_ms.max(1)),
            protect_metrics: cfg.auth.protect_metrics,
            limits: cfg.limits.clone(),
            limits_enabled,
            limiter: Mutex::new(Limiter::new()),
            epoch: Instant::now(),
            usage_every: Config::ms(cfg.usage_publish_interval_ms),
            rules: RwLock::new(Arc::new(rules)),
            inline_rules: cfg.guardrails.clone(),
            rules_file: cfg.guardrails_file.clone(),
            rules_reload_every: Config::ms(cfg.guardrails_reload_interval_ms.max(1)),
            window: cfg.guardrail_window_chars,
            audit_redactor,
            audit,
            metrics,
            client,
        };
        if guard.auth_enabled {
            let n = guard.reload_keys()?;
            tracing::info!(keys = n, file = ?guard.keys_file, "API keys required");
        }
        if guard.rules_file.is_some() {
            // A file that cannot be used stops the node at start; later, it keeps the old rules.
            let n = guard.reload_rules()?;
            tracing::info!(hooks = n, file = ?guard.rules_file, "guardrails loaded");
        }
        Ok(Some(Arc::new(guard)))
    }

    /// Re-reads the guardrail hooks (inline plus the guardrails file) and swaps them in whole.
    /// On an error (the message names the file, and the line or entry) the hooks in use stay.
    pub fn reload_rules(&self) -> Result<usize, NodeError> {
        let mut entries = self.inline_rules.clone();
        if let Some(path) = &self.rules_file {
            entries.extend(GuardrailsFile::read(path)?);
        }
        let rules = Rules::build(&entries)?;
        let n = rules.hooks.len();
        if let Ok(mut r) = self.rules.write() {
            *r = Arc::new(rules);
        }
        Ok(n)
    }

    /// The hooks in force. A poisoned lock (a panic while swapping) fails closed: every
    /// request is then denied by a rule standing in for the lost set, never let through
    /// unchecked.
    fn rules(&self) -> Arc<Rules> {
        self.rules.read().map(|r| r.clone()).unwrap_or_else(|_| Arc::new(Rules::fail_closed()))
    }

    /// Everything reloadable (`POST /admin/reload`, SIGHUP): the API keys when keys are
    /// configured, the guardrails when a guardrails file is. What fails keeps its old state and
    /// is reported and logged; the rest is swapped in.
    pub fn reload_all(&self) -> Reloaded {
        let mut out = Reloaded::default();
        if self.auth_enabled {
            match self.reload_keys() {
                Ok(n) => out.keys = Some(n),
                Err(e) => out.errors.push(format!("API keys kept: {e}")),
            }
        }
        if self.rules_file.is_some() {
            match self.reload_rules() {
                Ok(n) => out.guardrails = Some(n),
                Err(e) => out.errors.push(format!("guardrails kept: {e}")),
            }
        }
        for e in &out.errors {
            tracing::error!(error = %e, "reload failed");
        }
        if out.errors.is_empty() {
            tracing::info!(keys = ?out.keys, guardrails = ?out.guardrails, "configuration reloaded");
        }
        out
    }

    /// Re-reads the keys (inline plus the keys file) and swaps them in whole. On an error the
    /// keys in use stay.
    pub fn reload_keys(&self) -> Result<usize, NodeError> {
        let mut entries = self.inline_keys.clone();
        if let Some(path) = &self.keys_file {
            entries.extend(KeysFile::read(path)?);
        }
        let store = KeyStore::new(&entries).map_err(|e| NodeError::Config(e.to_string()))?;
        let n = store.len();
        if let Ok(mut k) = self.keys.write() {
            *k = Arc::new(store);
        }
        Ok(n)
    }

    /// The keys in force. A poisoned lock fails closed: an empty store admits nobody.
    fn keys(&self) -> Arc<KeyStore> {
        self.keys.read().map(|k| k.clone()).unwrap_or_default()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts the keys-file watcher and the usage publisher (with a mesh) on `tasks`.
    pub fn spawn_tasks(
        self: &Arc<Self>,
        mesh: Option<Arc<Mesh>>,
        tasks: &tokio_util::task::TaskTracker,
        cancel: &CancellationToken,
    ) {
        if let Some(path) = self.keys_file.clone() {
            tasks.spawn(tasks::watch_file(self.clone(), path, tasks::Watched::Keys, self.reload_every, cancel.clone()));
        }
        if let Some(path) = self.rules_file.clone() {
            tasks.spawn(tasks::watch_file(
                self.clone(),
                path,
                tasks::Watched::Guardrails,
                self.rules_reload_every,
                cancel.clone(),
            ));
        }
        if let (Some(mesh), true) = (mesh, self.limits_enabled) {
            tasks.spawn(tasks::publish_usage(self.clone(), mesh, cancel.clone()));
        }
    }

    /// Writes what the audit queue holds and stops its writer.
    pub async fn close(&self) {
        if let Some(a) = &self.audit {
            a.close().await;
        }
    }
}
