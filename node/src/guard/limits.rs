//! The `limit` stage: the prompt's length and the tenant's token budget (400), then its rates
//! against this node's count plus what peers last gossiped of their own (429 with
//! `retry-after`). Runs after the pipeline's tokenize stage, since limits count tokens.

use kvmesh_gossip::Peer;
use kvmesh_policy::limits::{self, Usage};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::InferenceRequest;

use super::{Flow, Guard, Refusal};

impl Guard {
    /// `prompt_tokens`: the prompt's length from the tokenize stage, `None` for a model with no
    /// tokenizer here (then about four characters a token). `peers`: the mesh's live members
    /// as gossip shows them (empty without a mesh).
    pub fn limit(
        &self,
        flow: &mut Flow,
        req: &InferenceRequest,
        prompt_tokens: Option<usize>,
        peers: &[Peer],
    ) -> Result<(), Refusal> {
        if !self.limits_enabled {
            return Ok(());
        }
        let n = match prompt_tokens {
            Some(n) => n as u64,
            None => (flow.prompt_chars as u64).div_ceil(4),
        };
        flow.rec.prompt_tokens = Some(n);
        let spec = self.limits.for_tenant(&flow.tenant);
        limits::check_request(&spec, req.capped_max_tokens(), req.n, n)?;
        let remote = remote_usage(peers, &flow.tenant);
        let now = self.now_ms();
        // Every live node of the mesh (this one included) admits for the tenant.
        let nodes = peers.len().max(1) as u64;
        let admitted = self.limiter.lock().map(|mut l| l.admit(&flow.tenant, &spec, n, remote, nodes, now));
        match admitted {
            Ok(Ok(())) => Ok(()),
            Ok(Err(limited)) => {
                self.metrics.rate_limited.with_label_values(&[limited.what]).inc();
                Err(Refusal { error: limited.to_api_error(), retry_after_s: Some(limited.retry_after_s) })
            }
            Err(_) => Err(ApiError::internal("rate limiter unavailable").into()),
        }
    }
}

/// This tenant's use of the window on every other live node, as last gossiped.
fn remote_usage(peers: &[Peer], tenant: &str) -> Usage {
    Usage::sum(peers.iter().filter(|peer| !peer.is_self).filter_map(|peer| {
        peer.usage.tenants.get(tenant).map(|u| Usage { requests: u.requests, tokens: u.tokens, reset_ms: u.reset_ms })
    }))
}
