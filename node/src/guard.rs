//! Admission and answer control on the node that receives a client's request: API keys,
//! per-tenant limits (mesh-wide through gossip), guardrail hooks on the prompt and on the answer
//! (streamed or not), webhooks, and the audit record of every request.
//!
//! Order for a client request: audit slot (503 when the log is behind, in reject mode) → API key
//! (401) → parse (400) → the key's model list (404) → `max_tokens` limit (400) → prompt hooks
//! (400 `content_filter`, or the prompt rewritten) → tokenize → prompt length and tokens-per-
//! minute (400) → rate limits with peers' usage (429 + `retry-after`) → route and forward → answer
//! hooks → audit record written → the answer completes.
//!
//! Requests forwarded by a peer skip all of it: the origin node admitted them and records them.
//!
//! Hooks run in the configured order. On streamed answers the built-in rules run on the text as
//! it flows (see `policy::guardrails::StreamScanner`); webhooks run once on the whole answer at
//! its end, where a deny replaces the final `[DONE]` with an error event (the text has already
//! been sent, so a webhook cannot rewrite a streamed answer). A prompt rewrite (redaction)
//! re-serializes the request body: the one case where an engine does not get the client's bytes.
//!
//! Limits not built: per-tenant concurrency, and counting tokens of a streamed answer that does
//! not report usage (only `usage.completion_tokens` is charged).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use futures::{Stream, StreamExt};
use kvmesh_gossip::{TenantUsage, UsageReport};
use kvmesh_policy::auth::{KeyEntry, KeyStore, Tenant};
use kvmesh_policy::guardrails::{
    self, Context, FailMode, Guardrail, GuardrailConfig, PiiAction, PiiKind, Stage, StreamScanner, Verdict,
};
use kvmesh_policy::limits::{self, Limiter, LimitsConfig, Usage};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint, InferenceRequest, Prompt};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::audit::{unix_ms, AuditLog, AuditRecord, HookVerdict, Slot};
use crate::config::{Config, GuardrailsFile, KeysFile};
use crate::error::NodeError;
use crate::mesh::Mesh;
use crate::metrics::NodeMetrics;
use crate::proxy::{error_response, Pipeline};

/// Tenant of every request when no API keys are configured.
pub const ANONYMOUS: &str = "anonymous";
/// Recorded prompt or answer text is cut here.
const MAX_RECORDED_TEXT: usize = 64 * 1024;
/// Longest wait for the audit writer's acknowledgement before answering anyway.
const AUDIT_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest answer body the guard buffers to check (non-streamed answers are buffered already).
const MAX_CHECKED_BODY: usize = 64 * 1024 * 1024;

enum Hook {
    Rule(Arc<dyn Guardrail>),
    Webhook(Webhook),
}

struct Webhook {
    name: String,
    url: String,
    on: Vec<Stage>,
    timeout: Duration,
    fail: FailMode,
}

impl Hook {
    fn name(&self) -> &str {
        match self {
            Hook::Rule(r) => r.name(),
            Hook::Webhook(w) => &w.name,
        }
    }
}

/// The guardrail hooks in force. Swapped whole on a reload, and a streamed answer keeps the set
/// it started with, so no answer is checked by half of one set and half of another.
struct Rules {
    hooks: Vec<Hook>,
    /// The built-in rules among `hooks`, which scan streamed answers as they flow.
    stream_rules: Vec<Arc<dyn Guardrail>>,
}

impl Rules {
    fn build(cfgs: &[GuardrailConfig]) -> Result<Self, NodeError> {
        let mut hooks = Vec::new();
        let mut stream_rules = Vec::new();
        let mut names = std::collections::HashSet::new();
        for g in cfgs {
            if !names.insert(g.name()) {
                return Err(NodeError::Config(format!(
                    "[[guardrails]] name `{}` is used twice (inline and file entries share one namespace); \
                     names label metrics and audit records",
                    g.name()
                )));
            }
            match g.build().map_err(|e| NodeError::Config(e.to_string()))? {
                Some(rule) => {
                    stream_rules.push(rule.clone());
                    hooks.push(Hook::Rule(rule));
                }
                None => {
                    if let GuardrailConfig::Webhook { name, url, on, timeout_ms, fail } = g {
                        hooks.push(Hook::Webhook(Webhook {
                            name: name.clone(),
                            url: url.clone(),
                            on: on.clone(),
                            timeout: Duration::from_millis(*timeout_ms),
                            fail: *fail,
                        }));
                    }
                }
            }
        }
        Ok(Self { hooks, stream_rules })
    }
}

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
struct Refusal {
    error: ApiError,
    retry_after_s: Option<u64>,
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self { error, retry_after_s: None }
    }
}

impl Guard {
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

    fn rules(&self) -> Arc<Rules> {
        self.rules
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|_| Arc::new(Rules { hooks: Vec::new(), stream_rules: Vec::new() }))
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
            tasks.spawn(watch_file(self.clone(), path, Watched::Keys, self.reload_every, cancel.clone()));
        }
        if let Some(path) = self.rules_file.clone() {
            tasks.spawn(watch_file(self.clone(), path, Watched::Guardrails, self.rules_reload_every, cancel.clone()));
        }
        if let (Some(mesh), true) = (mesh, self.limits_enabled) {
            tasks.spawn(publish_usage(self.clone(), mesh, cancel.clone()));
        }
    }

    /// Writes what the audit queue holds and stops its writer.
    pub async fn close(&self) {
        if let Some(a) = &self.audit {
            a.close().await;
        }
    }

    fn authorization(headers: &HeaderMap) -> Option<&str> {
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
    }

    /// For admin and mesh-debug endpoints: `Err` is the 401 to answer.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.auth_enabled {
            return Ok(());
        }
        self.keys().verify_admin(Self::authorization(headers)).map(|_| ()).inspect_err(|_| {
            self.metrics.auth_failures.inc();
        })
    }

    /// For `/metrics`: admin-only when `protect_metrics` is set.
    pub fn check_metrics(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.protect_metrics {
            self.check_admin(headers)
        } else {
            Ok(())
        }
    }

    /// For client endpoints other than inference (`/v1/models`): the caller's tenant, if keys
    /// are on.
    pub fn check_client(&self, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, ApiError> {
        if !self.auth_enabled {
            return Ok(None);
        }
        self.keys().verify(Self::authorization(headers)).map(Some).inspect_err(|_| {
            self.metrics.auth_failures.inc();
        })
    }

    /// This tenant's use of the window on every other live node, as last gossiped.
    fn remote_usage(&self, p: &Pipeline, tenant: &str) -> Usage {
        let Some(mesh) = p.mesh() else { return Usage::default() };
        Usage::sum(mesh.peers().iter().filter(|peer| !peer.is_self).filter_map(|peer| {
            peer.usage.tenants.get(tenant).map(|u| Usage {
                requests: u.requests,
                tokens: u.tokens,
                reset_ms: u.reset_ms,
            })
        }))
    }

    /// A client's request, from the first byte to the audit record.
    pub async fn serve(
        self: &Arc<Self>,
        p: &Arc<Pipeline>,
        endpoint: Endpoint,
        headers: &HeaderMap,
        request_id: &str,
        body: Bytes,
    ) -> Response {
        let started = Instant::now();
        let slot = match &self.audit {
            Some(log) => match log.reserve() {
                Some(s) => Some(s),
                None => {
                    let e = ApiError::unavailable("The audit log is behind; retry shortly.");
                    return p.reply_error(endpoint, "", &e, started);
                }
            },
            None => None,
        };
        let rec = AuditRecord {
            time_ms: unix_ms(),
            request_id: request_id.to_owned(),
            node: self.node.clone(),
            endpoint: endpoint.path().to_owned(),
            outcome: "ok".into(),
            ..Default::default()
        };
        let mut flow =
            Flow { guard: self.clone(), slot, rec, started, tenant: ANONYMOUS.to_owned(), text: String::new() };
        match self.admit(p, endpoint, headers, body, &mut flow).await {
            Err(r) => {
                let model = flow.rec.model.clone().unwrap_or_default();
                let mut resp = p.reply_error(endpoint, &model, &r.error, started);
                if let Some(s) = r.retry_after_s {
                    if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                        resp.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                }
                flow.rec.status = r.error.status.as_u16();
                flow.rec.outcome = "rejected".into();
                flow.rec.error = Some(r.error.message.clone());
                flow.finish().await;
                resp
            }
            Ok((req, body, ids)) => {
                let resp = p.route_client(endpoint, request_id, &req, &body, ids).await;
                self.answer(flow, &req, resp).await
            }
        }
    }

    async fn admit(
        &self,
        p: &Arc<Pipeline>,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: Bytes,
        flow: &mut Flow,
    ) -> Result<(InferenceRequest, Bytes, Option<Option<Vec<u32>>>), Refusal> {
        let tenant = if self.auth_enabled {
            match self.keys().verify(Self::authorization(headers)) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.metrics.auth_failures.inc();
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        if let Some(t) = &tenant {
            flow.tenant = t.name.clone();
            flow.rec.tenant = Some(t.name.clone());
        }
        let mut req = request::parse(endpoint, &body)?;
        let mut body = body;
        flow.rec.model = Some(req.model.clone());
        flow.rec.stream = req.stream;
        tracing::Span::current().record("model", req.model.as_str());
        if tenant.as_ref().is_some_and(|t| !t.may_use(&req.model)) {
            return Err(ApiError::model_not_found(&req.model).into());
        }
        let spec = self.limits.for_tenant(&flow.tenant);
        limits::check_request(&spec, req.max_tokens, 0)?;

        let mut texts = prompt_texts(&req.prompt);
        let prompt_chars = texts.iter().map(|t| t.chars().count()).sum();
        let ctx = Context { stage: Stage::Prompt, model: &req.model, tenant: &flow.tenant, prompt_chars };
        let changed = match self.run_hooks(&ctx, &flow.rec.request_id, &mut texts, &mut flow.rec.guardrails).await {
            Ok(changed) => changed,
            Err((rule, _)) => {
                return Err(ApiError::content_filter(format!("The request was blocked by guardrail `{rule}`.")).into())
            }
        };
        if changed {
            body = rewrite_prompt(endpoint, &body, &texts)
                .ok_or_else(|| ApiError::internal("a guardrail rewrite could not be applied"))?;
            req = request::parse(endpoint, &body)?;
        }
        if self.audit.as_ref().is_some_and(|a| a.record_text) {
            flow.rec.prompt = Some(self.redact_for_audit(Stage::Prompt, &texts.join("\n")));
        }

        // Tokenized here only when limits count tokens; `Some` tells the router it was tried.
        let ids = if self.limits_enabled { Some(p.tokenizers().prompt_ids(&req).await?) } else { None };
        let prompt_tokens = match (ids.as_ref().and_then(Option::as_ref), self.limits_enabled) {
            (Some(ids), _) => Some(ids.len() as u64),
            // No tokenizer for this model here: about four characters a token.
            (None, true) => Some((prompt_chars as u64).div_ceil(4)),
            (None, false) => None,
        };
        flow.rec.prompt_tokens = prompt_tokens;
        if self.limits_enabled {
            let n = prompt_tokens.unwrap_or(0);
            limits::check_request(&spec, req.max_tokens, n)?;
            let remote = self.remote_usage(p, &flow.tenant);
            let now = self.now_ms();
            let admitted = self.limiter.lock().map(|mut l| l.admit(&flow.tenant, &spec, n, remote, now));
            match admitted {
                Ok(Ok(())) => {}
                Ok(Err(limited)) => {
                    self.metrics.rate_limited.with_label_values(&[limited.what]).inc();
                    return Err(Refusal { error: limited.to_api_error(), retry_after_s: Some(limited.retry_after_s) });
                }
                Err(_) => return Err(ApiError::internal("rate limiter unavailable").into()),
            }
        }
        Ok((req, body, ids))
    }

    /// Runs the hooks of `ctx.stage` in order over `texts`. `Ok(true)` when a hook rewrote
    /// them; `Err((hook, reason))` when one denied.
    async fn run_hooks(
        &self,
        ctx: &Context<'_>,
        request_id: &str,
        texts: &mut Vec<String>,
        out: &mut Vec<HookVerdict>,
    ) -> Result<bool, (String, String)> {
        let mut changed = false;
        let rules = self.rules();
        for hook in &rules.hooks {
            let (verdict, reason): (&'static str, Option<String>) = match hook {
                Hook::Rule(rule) => {
                    if !rule.applies(ctx.stage) {
                        continue;
                    }
                    let mut v: (&'static str, Option<String>) = ("allow", None);
                    if texts.is_empty() {
                        // Rules that look at the request rather than its text still run on a
                        // prompt of token ids.
                        if let Verdict::Deny { reason, .. } = guardrails::check(&**rule, ctx, "") {
                            v = ("deny", Some(reason));
                        }
                    }
                    for text in texts.iter_mut() {
                        match guardrails::check(&**rule, ctx, text) {
                            Verdict::Allow => {}
                            Verdict::Deny { reason, .. } => {
                                v = ("deny", Some(reason));
                                break;
                            }
                            Verdict::Rewrite { text: new } => {
                                *text = new;
                                changed = true;
                                v = ("rewrite", None);
                            }
                        }
                    }
                    v
                }
                Hook::Webhook(w) => {
                    if !w.on.contains(&ctx.stage) {
                        continue;
                    }
                    match self.call_webhook(w, ctx, request_id, texts).await {
                        Ok(WebhookVerdict::Allow) => ("allow", None),
                        Ok(WebhookVerdict::Deny(reason)) => ("deny", Some(reason)),
                        Ok(WebhookVerdict::Rewrite(new)) => {
                            *texts = new;
                            changed = true;
                            ("rewrite", None)
                        }
                        Err(why) => {
                            tracing::warn!(hook = %w.name, error = %why, fail = ?w.fail, "guardrail webhook failed");
                            match w.fail {
                                FailMode::Open => ("error_open", Some(why)),
                                FailMode::Closed => ("error_closed", Some(why)),
                            }
                        }
                    }
                }
            };
            self.count(hook.name(), ctx.stage, verdict);
            out.push(HookVerdict {
                hook: hook.name().to_owned(),
                stage: ctx.stage.as_str().into(),
                verdict: verdict.into(),
                reason: reason.clone(),
            });
            if verdict == "deny" || verdict == "error_closed" {
                return Err((hook.name().to_owned(), reason.unwrap_or_default()));
            }
        }
        Ok(changed)
    }

    fn count(&self, hook: &str, stage: Stage, verdict: &str) {
        self.metrics.guardrail_verdicts.with_label_values(&[hook, stage.as_str(), verdict]).inc();
    }

    /// POSTs `{"stage","request_id","tenant","model","texts"}`; expects
    /// `{"verdict":"allow"}`, `{"verdict":"deny","reason":...}` or
    /// `{"verdict":"rewrite","texts":[...]}` (as many texts as were sent) within the timeout.
    async fn call_webhook(
        &self,
        w: &Webhook,
        ctx: &Context<'_>,
        request_id: &str,
        texts: &[String],
    ) -> Result<WebhookVerdict, String> {
        let payload = json!({
            "hook": w.name,
            "stage": ctx.stage.as_str(),
            "request_id": request_id,
            "tenant": ctx.tenant,
            "model": ctx.model,
            "texts": texts,
        });
        let call = async {
            let r = self.client.post(&w.url).json(&payload).send().await.map_err(|e| format!("request failed: {e}"))?;
            if !r.status().is_success() {
                return Err(format!("answered {}", r.status()));
            }
            r.json::<Value>().await.map_err(|e| format!("answer is not JSON: {e}"))
        };
        let v = tokio::time::timeout(w.timeout, call)
            .await
            .map_err(|_| format!("no answer within {} ms", w.timeout.as_millis()))??;
        match v["verdict"].as_str() {
            Some("allow") => Ok(WebhookVerdict::Allow),
            Some("deny") => Ok(WebhookVerdict::Deny(v["reason"].as_str().unwrap_or("denied by webhook").to_owned())),
            Some("rewrite") => {
                let new: Option<Vec<String>> =
                    v["texts"].as_array().and_then(|a| a.iter().map(|t| t.as_str().map(str::to_owned)).collect());
                match new {
                    Some(new) if new.len() == texts.len() => Ok(WebhookVerdict::Rewrite(new)),
                    _ => Err(format!("rewrite needs `texts` with {} strings", texts.len())),
                }
            }
            other => Err(format!("unknown verdict {other:?}")),
        }
    }

    fn redact_for_audit(&self, stage: Stage, text: &str) -> String {
        let ctx = Context { stage, model: "", tenant: "", prompt_chars: 0 };
        let mut t = match guardrails::check(&*self.audit_redactor, &ctx, text) {
            Verdict::Rewrite { text } => text,
            _ => text.to_owned(),
        };
        if t.len() > MAX_RECORDED_TEXT {
            let mut cut = MAX_RECORDED_TEXT;
            while !t.is_char_boundary(cut) {
                cut -= 1;
            }
            t.truncate(cut);
        }
        t
    }

    /// The routed answer: checked (streamed or whole), recorded, then handed to the client.
    async fn answer(self: &Arc<Self>, mut flow: Flow, req: &InferenceRequest, resp: Response) -> Response {
        let status = resp.status();
        flow.rec.status = status.as_u16();
        flow.rec.served_by = header_string(resp.headers(), "x-kvmesh-served-by");
        flow.rec.route = header_string(resp.headers(), "x-kvmesh-route");
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
                flow.rec.outcome = "stream_error".into();
                flow.rec.error = Some(err.message.clone());
                flow.finish().await;
                return error_response(&err);
            }
        };
        if !status.is_success() {
            flow.rec.outcome = "rejected".into();
            flow.rec.error = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned));
            flow.finish().await;
            return Response::from_parts(parts, Body::from(bytes));
        }
        let mut out = bytes;
        if let Ok(mut v) = serde_json::from_slice::<Value>(&out) {
            flow.rec.completion_tokens = v["usage"]["completion_tokens"].as_u64();
            let field = if req.endpoint == Endpoint::Chat { "/message/content" } else { "/text" };
            let n = v["choices"].as_array().map(Vec::len).unwrap_or(0);
            let mut texts: Vec<String> = (0..n)
                .map(|i| v["choices"][i].pointer(field).and_then(Value::as_str).unwrap_or("").to_owned())
                .collect();
            let ctx = Context { stage: Stage::Response, model: &req.model, tenant: &flow.tenant, prompt_chars: 0 };
            match self.run_hooks(&ctx, &flow.rec.request_id, &mut texts, &mut flow.rec.guardrails).await {
                Err((rule, _)) => {
                    let err = ApiError::content_filter(format!("The answer was blocked by guardrail `{rule}`."));
                    flow.rec.status = err.status.as_u16();
                    flow.rec.outcome = "rejected".into();
                    flow.rec.error = Some(err.message.clone());
                    flow.finish().await;
                    let mut r = error_response(&err);
                    copy_kvmesh_headers(&parts.headers, r.headers_mut());
                    return r;
                }
                Ok(changed) => {
                    if changed {
                        for (i, t) in texts.iter().enumerate() {
                            if let Some(slot) = v["choices"][i].pointer_mut(field) {
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
        flow.finish().await;
        Response::from_parts(parts, Body::from(out))
    }

    fn stream_answer(self: Arc<Self>, flow: Flow, req: &InferenceRequest, resp: Response) -> Response {
        let (mut parts, body) = resp.into_parts();
        parts.headers.remove(header::CONTENT_LENGTH);
        let state = StreamState {
            rules: self.rules(),
            upstream: body.into_data_stream().boxed(),
            buf: Vec::new(),
            scanners: BTreeMap::new(),
            chat: req.endpoint == Endpoint::Chat,
            model: req.model.clone(),
            template: None,
            saw_done: false,
            finished: false,
            flow: Some(flow),
            guard: self,
        };
        Response::from_parts(parts, Body::from_stream(guarded_stream(state)))
    }
}

enum WebhookVerdict {
    Allow,
    Deny(String),
    Rewrite(Vec<String>),
}

/// One request's audit record on its way to the writer. Dropped unfinished (the client left
/// mid-stream), it is still recorded, as `client_gone`.
struct Flow {
    guard: Arc<Guard>,
    slot: Option<Slot>,
    rec: AuditRecord,
    started: Instant,
    tenant: String,
    /// The answer's text as released to the client (for webhooks and `record_text`).
    text: String,
}

impl Flow {
    fn close(&mut self) -> Option<tokio::sync::oneshot::Receiver<()>> {
        self.rec.latency_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        if let (Some(n), true) = (self.rec.completion_tokens, self.guard.limits_enabled) {
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
    /// (in the OS) before the client sees the end of its answer.
    async fn finish(&mut self) {
        if let Some(ack) = self.close() {
            if tokio::time::timeout(AUDIT_ACK_TIMEOUT, ack).await.is_err() {
                tracing::warn!("audit writer did not confirm a record in time; answering anyway");
            }
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        if self.slot.is_some() {
            self.rec.outcome = "client_gone".into();
            let _ = self.close();
        }
    }
}

fn header_string(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn copy_kvmesh_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for name in ["x-kvmesh-served-by", "x-kvmesh-route", "x-request-id"] {
        if let Some(v) = from.get(name) {
            to.insert(name, v.clone());
        }
    }
}

/// The prompt's texts, one per chat message (or the completion prompt).
fn prompt_texts(p: &Prompt) -> Vec<String> {
    match p {
        Prompt::Chat(msgs) => msgs.iter().map(|m| m.content.clone()).collect(),
        Prompt::Text(t) => vec![t.clone()],
        Prompt::TokenIds(_) => Vec::new(),
    }
}

/// The body with the prompt's texts replaced (a message's content parts become one string).
fn rewrite_prompt(endpoint: Endpoint, body: &[u8], texts: &[String]) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    match endpoint {
        Endpoint::Chat => {
            let msgs = v.get_mut("messages")?.as_array_mut()?;
            if msgs.len() != texts.len() {
                return None;
            }
            for (m, t) in msgs.iter_mut().zip(texts) {
                m.as_object_mut()?.insert("content".into(), Value::String(t.clone()));
            }
        }
        Endpoint::Completions => {
            v.as_object_mut()?.insert("prompt".into(), Value::String(texts.first()?.clone()));
        }
    }
    serde_json::to_vec(&v).ok().map(Bytes::from)
}

type DataStream = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, axum::Error>> + Send>>;

struct StreamState {
    guard: Arc<Guard>,
    /// The hooks in force when the answer started; a reload mid-stream does not change them.
    rules: Arc<Rules>,
    upstream: DataStream,
    /// Bytes of an SSE event not complete yet.
    buf: Vec<u8>,
    /// Per choice index: its scanner, and whether that choice has finished.
    scanners: BTreeMap<u64, (StreamScanner, bool)>,
    chat: bool,
    model: String,
    /// The last data event with choices, to shape events that flush held-back text.
    template: Option<Value>,
    saw_done: bool,
    finished: bool,
    flow: Option<Flow>,
}

impl StreamState {
    fn ctx(&self) -> (String, String) {
        (self.model.clone(), self.flow.as_ref().map(|f| f.tenant.clone()).unwrap_or_default())
    }

    fn push_text(&mut self, released: &str) {
        if let Some(f) = &mut self.flow {
            if f.text.len() < MAX_CHECKED_BODY {
                f.text.push_str(released);
            }
        }
    }

    /// Handles one complete event (without its blank line); appends what to send to `out`.
    fn on_event(&mut self, ev: &str, out: &mut Vec<u8>) -> Result<(), guardrails::Denied> {
        let data = ev.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim_start);
        let Some(data) = data else {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
            return Ok(());
        };
        if data == "[DONE]" {
            self.flush(out)?;
            self.saw_done = true;
            return Ok(());
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
            return Ok(());
        };
        if v.get("error").is_some() {
            if let Some(f) = &mut self.flow {
                f.rec.outcome = "stream_error".into();
                f.rec.error = v["error"]["message"].as_str().map(str::to_owned);
            }
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            if let Some(f) = &mut self.flow {
                f.rec.completion_tokens = Some(n);
            }
        }
        let (model, tenant) = self.ctx();
        let ctx = Context { stage: Stage::Response, model: &model, tenant: &tenant, prompt_chars: 0 };
        let field = if self.chat { "/delta/content" } else { "/text" };
        let mut changed = false;
        let mut released_all = String::new();
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices.iter_mut() {
                let idx = c["index"].as_u64().unwrap_or(0);
                let text = c.pointer(field).and_then(Value::as_str).map(str::to_owned);
                let finishing = !c["finish_reason"].is_null();
                if text.is_none() && !finishing {
                    continue;
                }
                let (scanner, done) = self
                    .scanners
                    .entry(idx)
                    .or_insert_with(|| (StreamScanner::new(&self.rules.stream_rules, self.guard.window), false));
                let mut released = scanner.push(&ctx, text.as_deref().unwrap_or(""))?;
                if finishing {
                    released.push_str(&scanner.finish(&ctx)?);
                    *done = true;
                }
                if text.as_deref() != Some(released.as_str()) && !(text.is_none() && released.is_empty()) {
                    set_text(c, self.chat, released.clone());
                    changed = true;
                }
                released_all.push_str(&released);
            }
            self.template = Some(v.clone());
        }
        self.push_text(&released_all);
        if changed {
            out.extend_from_slice(format!("data: {v}\n\n").as_bytes());
        } else {
            out.extend_from_slice(ev.as_bytes());
            out.extend_from_slice(b"\n\n");
        }
        Ok(())
    }

    /// Releases what unfinished choices still hold back, as events of their own.
    fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), guardrails::Denied> {
        let (model, tenant) = self.ctx();
        let ctx = Context { stage: Stage::Response, model: &model, tenant: &tenant, prompt_chars: 0 };
        let mut texts = Vec::new();
        for (idx, (scanner, done)) in self.scanners.iter_mut() {
            if *done {
                continue;
            }
            *done = true;
            let rest = scanner.finish(&ctx)?;
            if !rest.is_empty() {
                texts.push((*idx, rest));
            }
        }
        for (idx, rest) in texts {
            let mut ev = self.template.clone().unwrap_or_else(|| json!({"object": "chat.completion.chunk"}));
            if let Some(o) = ev.as_object_mut() {
                o.remove("usage");
            }
            let mut choice = json!({"index": idx, "finish_reason": null});
            set_text(&mut choice, self.chat, rest.clone());
            ev["choices"] = json!([choice]);
            out.extend_from_slice(format!("data: {ev}\n\n").as_bytes());
            self.push_text(&rest);
        }
        Ok(())
    }

    fn record_stream_verdicts(&mut self, denied: Option<&guardrails::Denied>) {
        let mut by_rule: BTreeMap<String, &'static str> = BTreeMap::new();
        for (scanner, _) in self.scanners.values() {
            for (name, v) in scanner.verdicts() {
                let e = by_rule.entry(name).or_insert("allow");
                if v == "rewrite" {
                    *e = "rewrite";
                }
            }
        }
        if self.scanners.is_empty() {
            for r in self.rules.stream_rules.iter() {
                by_rule.insert(r.name().to_owned(), "allow");
            }
        }
        let mut ordered = Vec::new();
        for r in &self.rules.stream_rules {
            if let Some(d) = denied.filter(|d| d.rule == r.name()) {
                ordered.push((r.name().to_owned(), "deny", Some(d.reason.clone())));
                break;
            }
            if let Some(v) = by_rule.get(r.name()) {
                ordered.push((r.name().to_owned(), *v, None));
            }
        }
        for (name, verdict, reason) in ordered {
            self.guard.count(&name, Stage::Response, verdict);
            if let Some(f) = &mut self.flow {
                f.rec.guardrails.push(HookVerdict {
                    hook: name,
                    stage: "response".into(),
                    verdict: verdict.into(),
                    reason,
                });
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
            f.rec.outcome = "guardrail_stopped".into();
            f.rec.error = Some(err.message.clone());
            f.finish().await;
        }
        self.finished = true;
    }

    /// The upstream ended: flush, run response webhooks on the whole answer, record, close.
    async fn end(&mut self, out: &mut Vec<u8>) {
        if !self.buf.is_empty() {
            let rest = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
            let rest = rest.trim_end_matches('\n').to_owned();
            if let Err(d) = self.on_event(&rest, out) {
                return self.stop(&d, out).await;
            }
        }
        if let Err(d) = self.flush(out) {
            return self.stop(&d, out).await;
        }
        self.record_stream_verdicts(None);
        let mut denied_by_webhook = None;
        if let Some(mut f) = self.flow.take() {
            let guard = self.guard.clone();
            let rules = self.rules.clone();
            let has_webhooks =
                rules.hooks.iter().any(|h| matches!(h, Hook::Webhook(w) if w.on.contains(&Stage::Response)));
            if has_webhooks {
                let ctx = Context { stage: Stage::Response, model: &self.model, tenant: &f.tenant, prompt_chars: 0 };
                let mut texts = vec![f.text.clone()];
                let mut verdicts = Vec::new();
                // Built-in rules already ran on the stream: only the webhooks run here.
                for h in rules.hooks.iter() {
                    if let Hook::Webhook(w) = h {
                        if !w.on.contains(&Stage::Response) {
                            continue;
                        }
                        let verdict = match guard.call_webhook(w, &ctx, &f.rec.request_id, &texts).await {
                            Ok(WebhookVerdict::Allow) => ("allow", None),
                            // The text is out already: a rewrite can only be recorded.
                            Ok(WebhookVerdict::Rewrite(new)) => {
                                texts = new;
                                ("rewrite_too_late", None)
                            }
                            Ok(WebhookVerdict::Deny(reason)) => ("deny", Some(reason)),
                            Err(why) => match w.fail {
                                FailMode::Open => ("error_open", Some(why)),
                                FailMode::Closed => ("error_closed", Some(why)),
                            },
                        };
                        guard.count(&w.name, Stage::Response, verdict.0);
                        verdicts.push(HookVerdict {
                            hook: w.name.clone(),
                            stage: "response".into(),
                            verdict: verdict.0.into(),
                            reason: verdict.1.clone(),
                        });
                        if verdict.0 == "deny" || verdict.0 == "error_closed" {
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
                f.rec.outcome = "guardrail_stopped".into();
                f.rec.error = Some(err.message.clone());
            }
            if self.saw_done || denied_by_webhook.is_some() {
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            f.finish().await;
        } else if self.saw_done {
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
        self.finished = true;
    }
}

fn set_text(choice: &mut Value, chat: bool, text: String) {
    if chat {
        if !choice["delta"].is_object() {
            choice["delta"] = json!({});
        }
        choice["delta"]["content"] = Value::String(text);
    } else {
        choice["text"] = Value::String(text);
    }
}

fn guarded_stream(state: StreamState) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    futures::stream::unfold(state, |mut s| async move {
        let mut out = Vec::new();
        while out.is_empty() && !s.finished {
            match s.upstream.next().await {
                Some(Ok(chunk)) => {
                    s.buf.extend_from_slice(&chunk);
                    while let Some(pos) = find_event_end(&s.buf) {
                        let ev_bytes: Vec<u8> = s.buf.drain(..pos + 2).collect();
                        let ev = String::from_utf8_lossy(&ev_bytes[..pos]).into_owned();
                        if let Err(d) = s.on_event(&ev, &mut out) {
                            s.stop(&d, &mut out).await;
                            break;
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "answer stream failed inside the guard");
                    if let Some(f) = &mut s.flow {
                        f.rec.outcome = "stream_error".into();
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
            Some((Ok(Bytes::from(out)), s))
        }
    })
}

/// Index of the `\n\n` that ends the first complete event in `buf`.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\n\n")
}

#[derive(Clone, Copy)]
enum Watched {
    Keys,
    Guardrails,
}

/// Re-reads a watched file whenever its modification time or size changes.
async fn watch_file(guard: Arc<Guard>, path: PathBuf, what: Watched, every: Duration, cancel: CancellationToken) {
    let stamp = |p: &PathBuf| -> Option<(SystemTime, u64)> {
        let m = std::fs::metadata(p).ok()?;
        Some((m.modified().ok()?, m.len()))
    };
    let mut last = stamp(&path);
    // The first check one period from now: an interval's "immediate" first tick still waits for
    // the timer, and a change in between would be taken for one made before `last` was read.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match what {
            Watched::Keys => match guard.reload_keys() {
                Ok(n) => tracing::info!(keys = n, path = %path.display(), "API keys reloaded"),
                Err(e) => tracing::error!(error = %e, "keys file changed but cannot be used; keeping the keys in use"),
            },
            Watched::Guardrails => match guard.reload_rules() {
                Ok(n) => tracing::info!(hooks = n, path = %path.display(), "guardrails reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "guardrails file changed but cannot be used; keeping the rules in use")
                }
            },
        }
    }
}

/// Gossips this node's per-tenant usage so peers count it against the same limits.
async fn publish_usage(guard: Arc<Guard>, mesh: Arc<Mesh>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(guard.usage_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = guard.now_ms();
        let Ok(snapshot) = guard.limiter.lock().map(|mut l| l.snapshot(now)) else { continue };
        let report = UsageReport {
            tenants: snapshot
                .into_iter()
                .map(|(t, u)| {
                    // Whole seconds: a ticking countdown would re-gossip an unchanged window.
                    let reset_ms = u.reset_ms.div_ceil(1000) * 1000;
                    (t, TenantUsage { requests: u.requests, tokens: u.tokens, reset_ms })
                })
                .collect(),
        };
        if let Err(e) = mesh.membership.set_usage(&report).await {
            tracing::warn!(error = %e, "publishing tenant usage failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_rewrite_replaces_each_message_and_the_completion_prompt() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"a"},{"role":"user","content":[{"type":"text","text":"b"}]}],"max_tokens":3}"#;
        let out = rewrite_prompt(Endpoint::Chat, body, &["A".into(), "B".into()]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["messages"][0]["content"], "A");
        assert_eq!(v["messages"][1]["content"], "B");
        assert_eq!(v["max_tokens"], 3);
        let out = rewrite_prompt(Endpoint::Completions, br#"{"model":"m","prompt":["x"]}"#, &["y".into()]).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&out).unwrap()["prompt"], "y");
        assert!(rewrite_prompt(Endpoint::Chat, body, &["only one".into()]).is_none());
    }

    #[test]
    fn events_end_at_a_blank_line() {
        assert_eq!(find_event_end(b"data: x\n\ndata: y"), Some(7));
        assert_eq!(find_event_end(b"data: x\n"), None);
    }
}
