//! Guardrail hooks: the built-in rules (`policy::guardrails`) and webhooks, run in the
//! configured order on a prompt or a whole answer, and one mapping from what a hook said to the
//! recorded [`Verdict`](crate::audit::Verdict), shared by prompts, whole answers and streams.

use std::sync::Arc;
use std::time::Duration;

use kvmesh_policy::guardrails::{self, Context, FailMode, Finding, Guardrail, GuardrailConfig, Stage, Verdict};
use serde_json::{json, Value};

use super::{Guard, MAX_RECORDED_TEXT};
use crate::audit::{HookVerdict, Verdict as AuditVerdict};
use crate::error::NodeError;

pub(super) enum Hook {
    Rule(Arc<dyn Guardrail>),
    Webhook(Webhook),
}

pub(super) struct Webhook {
    pub name: String,
    url: String,
    pub on: Vec<Stage>,
    timeout: Duration,
    pub fail: FailMode,
}

impl Hook {
    pub fn name(&self) -> &str {
        match self {
            Hook::Rule(r) => r.name(),
            Hook::Webhook(w) => &w.name,
        }
    }
}

/// The guardrail hooks in force. Swapped whole on a reload, and a streamed answer keeps the set
/// it started with, so no answer is checked by half of one set and half of another.
pub(super) struct Rules {
    pub hooks: Vec<Hook>,
    /// The built-in rules among `hooks`, which scan streamed answers as they flow.
    pub stream_rules: Vec<Arc<dyn Guardrail>>,
}

impl Rules {
    pub fn build(cfgs: &[GuardrailConfig]) -> Result<Self, NodeError> {
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

impl Rules {
    /// Whether any hook reads the text at `stage` (a webhook, or a rule such as `deny` or
    /// `pii`): then text it cannot see (token ids, log-probabilities) is refused.
    pub fn read_text(&self, stage: Stage) -> bool {
        self.hooks.iter().any(|h| match h {
            Hook::Rule(r) => r.applies(stage) && r.reads_text(),
            Hook::Webhook(w) => w.on.contains(&stage),
        })
    }

    /// The set that stands in for one lost to a poisoned lock: one rule that denies every
    /// prompt and every answer, so nothing passes unchecked.
    pub fn fail_closed() -> Self {
        let rule: Arc<dyn Guardrail> = Arc::new(DenyAll);
        Self { hooks: vec![Hook::Rule(rule.clone())], stream_rules: vec![rule] }
    }
}

/// Denies everything (see [`Rules::fail_closed`]).
struct DenyAll;

impl Guardrail for DenyAll {
    fn name(&self) -> &str {
        "guardrails-unavailable"
    }

    fn applies(&self, _: Stage) -> bool {
        true
    }

    fn scan(&self, _: &Context<'_>, _: &str) -> Vec<Finding> {
        vec![Finding::Deny { reason: "the guardrail set is unavailable; failing closed".into() }]
    }
}

impl Webhook {
    /// One verdict mapping for every stage: what a webhook's answer (or failure) records.
    /// `streamed`: the text has left already, so a rewrite can only be recorded.
    pub fn verdict(&self, outcome: Result<WebhookVerdict, String>, streamed: bool) -> (AuditVerdict, Option<String>) {
        match outcome {
            Ok(WebhookVerdict::Allow) => (AuditVerdict::Allow, None),
            Ok(WebhookVerdict::Deny(reason)) => (AuditVerdict::Deny, Some(reason)),
            Ok(WebhookVerdict::Rewrite(_)) if streamed => (AuditVerdict::RewriteTooLate, None),
            Ok(WebhookVerdict::Rewrite(_)) => (AuditVerdict::Rewrite, None),
            Err(why) => {
                tracing::warn!(hook = %self.name, error = %why, fail = ?self.fail, "guardrail webhook failed");
                match self.fail {
                    FailMode::Open => (AuditVerdict::ErrorOpen, Some(why)),
                    FailMode::Closed => (AuditVerdict::ErrorClosed, Some(why)),
                }
            }
        }
    }
}

pub(super) enum WebhookVerdict {
    Allow,
    Deny(String),
    Rewrite(Vec<String>),
}

impl Guard {
    /// Runs the hooks of `ctx.stage` in order over `texts`. `Ok(true)` when a hook rewrote
    /// them; `Err((hook, reason))` when one denied.
    pub(super) async fn run_hooks(
        &self,
        ctx: &Context<'_>,
        request_id: &str,
        texts: &mut Vec<String>,
        out: &mut Vec<HookVerdict>,
    ) -> Result<bool, (String, String)> {
        let mut changed = false;
        let rules = self.rules();
        for hook in &rules.hooks {
            let (verdict, reason): (AuditVerdict, Option<String>) = match hook {
                Hook::Rule(rule) => {
                    if !rule.applies(ctx.stage) {
                        continue;
                    }
                    let mut v: (AuditVerdict, Option<String>) = (AuditVerdict::Allow, None);
                    if texts.is_empty() {
                        // Rules that look at the request rather than its text still run on a
                        // prompt of token ids.
                        if let Verdict::Deny { reason, .. } = guardrails::check(&**rule, ctx, "") {
                            v = (AuditVerdict::Deny, Some(reason));
                        }
                    }
                    for text in texts.iter_mut() {
                        match guardrails::check(&**rule, ctx, text) {
                            Verdict::Allow => {}
                            Verdict::Deny { reason, .. } => {
                                v = (AuditVerdict::Deny, Some(reason));
                                break;
                            }
                            Verdict::Rewrite { text: new } => {
                                *text = new;
                                changed = true;
                                v = (AuditVerdict::Rewrite, None);
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
                        Ok(WebhookVerdict::Rewrite(new)) => {
                            *texts = new;
                            changed = true;
                            (AuditVerdict::Rewrite, None)
                        }
                        outcome => w.verdict(outcome, false),
                    }
                }
            };
            self.count(hook.name(), ctx.stage, verdict);
            out.push(HookVerdict {
                hook: hook.name().to_owned(),
                stage: ctx.stage.as_str().into(),
                verdict,
                reason: reason.clone(),
            });
            if verdict.blocks() {
                return Err((hook.name().to_owned(), reason.unwrap_or_default()));
            }
        }
        Ok(changed)
    }

    pub(super) fn count(&self, hook: &str, stage: Stage, verdict: AuditVerdict) {
        self.metrics.guardrail_verdicts.with_label_values(&[hook, stage.as_str(), verdict.as_str()]).inc();
    }

    /// POSTs `{"stage","request_id","tenant","model","texts"}`; expects
    /// `{"verdict":"allow"}`, `{"verdict":"deny","reason":...}` or
    /// `{"verdict":"rewrite","texts":[...]}` (as many texts as were sent) within the timeout.
    pub(super) async fn call_webhook(
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

    pub(super) fn redact_for_audit(&self, stage: Stage, text: &str) -> String {
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
}
