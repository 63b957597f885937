//! The `admit` stage: audit slot, API key, parse, the key's model list, the `max_tokens` cap
//! and the prompt hooks (which may rewrite the prompt: the one case where an engine does not
//! get the client's bytes).

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderMap;
use kvmesh_policy::endpoint::Work;
use kvmesh_policy::guardrails::{Context, Stage};
use kvmesh_policy::limits;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, InferenceRequest, Prompt};
use serde_json::Value;
use sha2::Digest as _;

use super::{Flow, Guard, Refusal};
use crate::audit::{unix_ms, AuditRecord, Outcome};
use crate::ctx::RequestCtx;

impl Guard {
    /// Opens the request's audit flow: its slot in the audit queue (a 503 refusal when the log
    /// is behind, in reject mode) and its record.
    pub fn open(self: &Arc<Self>, ctx: &RequestCtx) -> Result<Flow, Refusal> {
        let slot = match &self.audit {
            Some(log) => match log.reserve() {
                Some(s) => Some(s),
                None => return Err(ApiError::unavailable("The audit log is behind; retry shortly.").into()),
            },
            None => None,
        };
        let rec = AuditRecord {
            time_ms: unix_ms(),
            request_id: ctx.id.clone(),
            node: self.node.clone(),
            endpoint: ctx.endpoint.path().to_owned(),
            outcome: Outcome::Ok,
            ..Default::default()
        };
        Ok(Flow::new(self.clone(), slot, rec, ctx))
    }

    /// Admits a client's request: its tenant (401 without a valid key), the parsed request
    /// (400), the model the key may use (404), its `max_tokens` (400) and the prompt hooks (400
    /// `content_filter`, or the body rewritten). Returns the request and the body to forward.
    pub async fn admit(
        &self,
        flow: &mut Flow,
        ctx: &mut RequestCtx,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<(InferenceRequest, Bytes), Refusal> {
        flow.rec.request_sha256 = Some(hex::encode(sha2::Sha256::digest(&body)));
        let tenant = self.check_client(headers)?;
        if let Some(t) = &tenant {
            ctx.tenant = t.name.clone();
            ctx.set_priority(t.priority, t.max_priority, t.weight);
            flow.tenant = t.name.clone();
            flow.hide_route = !t.admin;
            flow.rec.tenant = Some(t.name.clone());
        }
        let endpoint = ctx.endpoint;
        if endpoint.work() == Work::Stored {
            // No body: the id in the path names the engine (unguessable, and known only to whoever
            // created the response).
            let req = InferenceRequest::stored(endpoint, ctx.stream_query());
            if let Some(id) = ctx.response_id.as_deref() {
                check_owner(id, tenant.as_ref(), "response_id")?;
            }
            if req.stream && self.rules().read_text(Stage::Response) {
                return Err(ApiError::invalid(
                    "This node's guardrails read answers, which they cannot do in a stored response's event stream: retrieve it without stream=true.",
                    Some("stream"),
                )
                .into());
            }
            return Ok((req, body));
        }
        if endpoint.is_multipart() {
            // An audio file: no prompt text to scan (its transcript is scanned as the answer),
            // no `max_tokens` (the audio bounds the transcript).
            let req = crate::request::form::parse(
                endpoint,
                ctx.content_type.as_deref(),
                body.clone(),
                ctx.default_model.as_deref(),
            )
            .await?;
            ctx.set_model(&req.model);
            flow.rec.model = Some(req.model.clone());
            flow.rec.stream = req.stream;
            if tenant.as_ref().is_some_and(|t| !t.may_use(&req.model)) {
                return Err(ApiError::model_not_found(&req.model).into());
            }
            if req.stream && self.rules().read_text(Stage::Response) {
                return Err(ApiError::invalid(
                    "This node's guardrails read answers, which they cannot do in this endpoint's stream: send stream=false.",
                    Some("stream"),
                )
                .into());
            }
            limits::check_request(&self.limits.for_tenant(&flow.tenant), req.capped_max_tokens(), 1, 0)?;
            return Ok((req, body));
        }
        // Fields only the node may set never reach an engine from a client.
        // With keys, each tenant's prompts are cached under its own salt (unless it shares).
        let parsed = request::parse_client(
            endpoint,
            &body,
            |client| match &tenant {
                Some(t) => t.cache_salt(client),
                None => client.map(str::to_owned),
            },
            ctx.default_model.as_deref(),
        )?;
        let mut req = parsed.req;
        let mut body = parsed.body.map(Bytes::from).unwrap_or(body);
        ctx.set_model(&req.model);
        flow.rec.model = Some(req.model.clone());
        flow.rec.stream = req.stream;
        if tenant.as_ref().is_some_and(|t| !t.may_use(&req.model)) {
            return Err(ApiError::model_not_found(&req.model).into());
        }
        if let Some(id) = req.previous_response_id.as_deref() {
            check_owner(id, tenant.as_ref(), "previous_response_id")?;
        }
        // Completion tokens are charged from the engine's usage: a stream that did not ask for it
        // asks now, and `stream` keeps the usage chunk from the client.
        if self.limits_enabled && req.stream && !req.include_usage && endpoint.reports_usage_on_request() {
            if let Some(b) = request::with_stream_usage(&body) {
                body = Bytes::from(b);
                flow.hidden_usage = true;
            }
        }
        let spec = self.limits.for_tenant(&flow.tenant);
        limits::check_request(&spec, req.capped_max_tokens(), req.n, 0)?;

        // Every string the engine will render, not only message text (`request::prompt_strings`).
        let mut doc: Value =
            serde_json::from_slice(&body).map_err(|e| ApiError::internal(format!("re-reading the request: {e}")))?;
        let (pointers, mut texts): (Vec<String>, Vec<String>) =
            request::prompt_strings(endpoint, &doc)?.into_iter().unzip();
        if matches!(req.prompt, Prompt::TokenIds(_)) && self.rules().read_text(Stage::Prompt) {
            return Err(ApiError::invalid(
                "This node's guardrails read prompt text: send the prompt as text, not token ids.",
                Some("prompt"),
            )
            .into());
        }
        // Log-probabilities spell out the answer's tokens, which the answer rules could not
        // redact consistently.
        // The same holds for the answer's token ids, which spell it out as well.
        let wants_logprobs = ["logprobs", "top_logprobs", "prompt_logprobs", "return_token_ids", "return_tokens_as_token_ids"]
                .iter()
                .any(|k| doc.get(*k).is_some_and(|v| !v.is_null() && *v != Value::Bool(false)))
                // Responses asks for them through `include`.
                || doc["include"].as_array().is_some_and(|i| i.iter().any(|x| x.as_str().is_some_and(|x| x.contains("logprobs"))));
        if wants_logprobs && self.rules().read_text(Stage::Response) {
            return Err(ApiError::invalid(
                "This node's guardrails read answers: log-probabilities cannot be returned.",
                Some("logprobs"),
            )
            .into());
        }
        // Streamed Responses and Messages events are relayed as they come, unscanned: with
        // answer rules that read text, only their whole answers are served.
        if req.stream && !endpoint.reports_usage_on_request() && self.rules().read_text(Stage::Response) {
            return Err(ApiError::invalid(
                "This node's guardrails read answers, which they cannot do in this endpoint's stream: send stream=false.",
                Some("stream"),
            )
            .into());
        }
        flow.prompt_chars = texts.iter().map(|t| t.chars().count()).sum();
        let hook_ctx =
            Context { stage: Stage::Prompt, model: &req.model, tenant: &flow.tenant, prompt_chars: flow.prompt_chars };
        let changed = match self.run_hooks(&hook_ctx, &flow.rec.request_id, &mut texts, &mut flow.rec.guardrails).await
        {
            Ok(changed) => changed,
            Err((rule, _)) => {
                return Err(ApiError::content_filter(format!("The request was blocked by guardrail `{rule}`.")).into())
            }
        };
        if changed {
            if texts.len() != pointers.len() {
                return Err(ApiError::internal("a guardrail rewrite changed the number of texts").into());
            }
            for (p, t) in pointers.iter().zip(&texts) {
                if let Some(slot) = doc.pointer_mut(p) {
                    *slot = Value::String(t.clone());
                }
            }
            body = Bytes::from(serde_json::to_vec(&doc).map_err(|e| ApiError::internal(e.to_string()))?);
            req = request::parse(endpoint, &body)?;
        }
        if self.audit.as_ref().is_some_and(|a| a.record_text) {
            flow.rec.prompt = Some(self.redact_for_audit(Stage::Prompt, &texts.join("\n")));
        }
        Ok((req, body))
    }

    /// Records a refusal (from any stage before routing) as the request's outcome.
    pub async fn refuse(&self, mut flow: Flow, refusal: &Refusal) {
        flow.rec.status = refusal.error.status.as_u16();
        flow.rec.outcome = Outcome::Rejected;
        flow.rec.error = Some(refusal.error.message.clone());
        // A refusal either way; an unrecorded one is logged by `finish`.
        let _recorded = flow.finish().await;
    }
}

/// With API keys, a stored response is the tenant's that made it: another tenant's id is
/// answered as unknown (vLLM's 404), so it learns nothing of it.
fn check_owner(id: &str, tenant: Option<&Arc<kvmesh_policy::auth::Tenant>>, param: &str) -> Result<(), Refusal> {
    match tenant {
        Some(t) if !crate::router::stored::belongs_to(id, &t.name) => {
            let mut e = ApiError::not_found(format!("Response with id '{id}' not found."));
            e.param = Some(param.to_owned());
            Err(e.into())
        }
        _ => Ok(()),
    }
}
