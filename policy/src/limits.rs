//! Per-tenant rate and budget limits: requests per minute, tokens per minute, the largest
//! `max_tokens` and the longest prompt.
//!
//! Usage is counted in a sliding window of 60 one-second buckets. The window of a node holds
//! only what that node admitted; the mesh-wide figure adds what peers last published (`node`
//! gossips [`Limiter::snapshot`] and passes the sum of peers' figures in as `remote`). So limits
//! hold across nodes without a central counter, with this accuracy bound: a peer's figure is
//! late by at most its publish interval plus gossip propagation (`D`, about 0.5-1 s with the
//! defaults). Over `D`, nodes admit without seeing each other's last admissions: each admits
//! against its own count and its peers' stale figures, so a burst spread over N nodes within
//! `D` can be admitted up to N times the limit (no per-node share of the quota is reserved yet). A node that dies takes its part of the window
//! with it, which errs toward admitting.
//!
//! Tokens per minute counts prompt tokens at admission (from the model's tokenizer) and
//! completion tokens when the answer reports them (`charge_tokens`).
//!
//! Pure: the caller passes the time in (milliseconds on any monotonic clock; only differences
//! matter, and published `reset_ms` figures are relative, so nodes need no common clock).

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::openai::ApiError;

pub const WINDOW_MS: u64 = 60_000;
/// How long this node's admissions may go unseen by its peers: usage is published every 250 ms
/// and gossip spreads it in a few rounds of 300 ms.
pub const UNSEEN_MS: u64 = 2_000;
const BUCKET_MS: u64 = 1_000;

/// The limits of one tenant. `None` means unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSpec {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Largest `max_tokens` (or `max_completion_tokens`) a request may ask for. With this set,
    /// a request must name one: otherwise the engine's default could be the whole context.
    pub max_tokens: Option<u32>,
    pub max_prompt_tokens: Option<u64>,
}

impl LimitSpec {
    /// `self`, with each limit it leaves unset taken from `fallback`.
    pub fn or(&self, fallback: &LimitSpec) -> LimitSpec {
        LimitSpec {
            requests_per_minute: self.requests_per_minute.or(fallback.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(fallback.tokens_per_minute),
            max_tokens: self.max_tokens.or(fallback.max_tokens),
            max_prompt_tokens: self.max_prompt_tokens.or(fallback.max_prompt_tokens),
        }
    }
}

/// `[limits]`: a default for every tenant, and overrides per tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub default: LimitSpec,
    pub tenants: BTreeMap<String, LimitSpec>,
}

impl LimitsConfig {
    pub fn for_tenant(&self, tenant: &str) -> LimitSpec {
        match self.tenants.get(tenant) {
            Some(s) => s.or(&self.default),
            None => self.default.clone(),
        }
    }
}

/// A tenant's use of the window: on one node, or summed over peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub requests: u64,
    pub tokens: u64,
    /// Milliseconds until the oldest counted bucket leaves the window (0 when empty).
    pub reset_ms: u64,
}

impl Usage {
    /// Sum of several nodes' usage; `reset_ms` is the earliest moment any of it frees up.
    pub fn sum(items: impl IntoIterator<Item = Usage>) -> Usage {
        items.into_iter().fold(Usage::default(), |a, b| Usage {
            // Peers' figures come over the network: a huge one must saturate, never wrap.
            requests: a.requests.saturating_add(b.requests),
            tokens: a.tokens.saturating_add(b.tokens),
            reset_ms: match (a.reset_ms, b.reset_ms) {
                (0, r) | (r, 0) => r,
                (x, y) => x.min(y),
            },
        })
    }
}

/// A refused admission: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub what: &'static str,
    pub limit: u64,
    pub retry_after_s: u64,
}

impl Limited {
    pub fn to_api_error(&self) -> ApiError {
        ApiError::rate_limited(format!(
            "Rate limit reached: {} {} per minute. Retry after {} s.",
            self.limit, self.what, self.retry_after_s
        ))
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Start of the bucket, in ms, a multiple of `BUCKET_MS`.
    at: u64,
    requests: u64,
    tokens: u64,
}

/// This node's per-tenant windows.
#[derive(Debug, Default)]
pub struct Limiter {
    tenants: HashMap<String, VecDeque<Bucket>>,
}

/// The limits that need no counting: asked completion tokens and prompt length. 400 when
/// broken. `n` completions of `max_tokens` each may be generated, so the key's cap bounds their
/// product.
pub fn check_request(spec: &LimitSpec, max_tokens: Option<u32>, n: u32, prompt_tokens: u64) -> Result<(), ApiError> {
    if let Some(limit) = spec.max_tokens {
        match max_tokens {
            None => {
                return Err(ApiError::invalid(
                    format!("max_tokens is required for this API key and must be at most {limit}."),
                    Some("max_tokens"),
                ))
            }
            Some(m) if m > limit => {
                return Err(ApiError::invalid(
                    format!("max_tokens must be at most {limit} for this API key, got {m}."),
                    Some("max_tokens"),
                ))
            }
            Some(m) if (m as u64).saturating_mul(n.max(1) as u64) > limit as u64 => {
                return Err(ApiError::invalid(
                    format!("n × max_tokens must be at most {limit} for this API key, got {n} × {m}."),
                    Some("n"),
                ))
            }
            _ => {}
        }
    }
    if let Some(limit) = spec.max_prompt_tokens {
        if prompt_tokens > limit {
            return Err(ApiError::invalid(
                format!("The prompt has {prompt_tokens} tokens; this API key allows at most {limit}."),
                Some("messages"),
            )
            .with_code("context_length_exceeded"));
        }
    }
    if let Some(tpm) = spec.tokens_per_minute {
        if prompt_tokens > tpm {
            return Err(ApiError::invalid(
                format!("The prompt has {prompt_tokens} tokens, more than this key's {tpm} tokens per minute."),
                Some("messages"),
            ));
        }
    }
    Ok(())
}

impl Limiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn prune(window: &mut VecDeque<Bucket>, now_ms: u64) {
        while window.front().is_some_and(|b| b.at + WINDOW_MS <= now_ms) {
            window.pop_front();
        }
    }

    fn bucket<'a>(&'a mut self, tenant: &str, now_ms: u64) -> &'a mut Bucket {
        let window = self.tenants.entry(tenant.to_owned()).or_default();
        Self::prune(window, now_ms);
        let at = now_ms - now_ms % BUCKET_MS;
        if window.back().is_none_or(|b| b.at != at) {
            window.push_back(Bucket { at, requests: 0, tokens: 0 });
        }
        // Just pushed or present: the back is this bucket.
        let len = window.len();
        &mut window[len - 1]
    }

    /// This node's use by `tenant` in the last `UNSEEN_MS` (whole buckets that overlap it).
    fn recent(&mut self, tenant: &str, now_ms: u64) -> Usage {
        let Some(window) = self.tenants.get(tenant) else { return Usage::default() };
        let since = now_ms.saturating_sub(UNSEEN_MS);
        let (requests, tokens) = window
            .iter()
            .filter(|b| b.at + BUCKET_MS > since)
            .fold((0u64, 0u64), |(r, t), b| (r.saturating_add(b.requests), t.saturating_add(b.tokens)));
        Usage { requests, tokens, reset_ms: 0 }
    }

    /// This node's use of the window by `tenant`.
    pub fn usage(&mut self, tenant: &str, now_ms: u64) -> Usage {
        let Some(window) = self.tenants.get_mut(tenant) else { return Usage::default() };
        Self::prune(window, now_ms);
        usage_of(window, now_ms)
    }

    /// Admits a request of `tokens` prompt tokens if the tenant's use here plus `remote` (the
    /// peers' published use) stays within its limits, and counts it.
    ///
    /// In a mesh of `nodes` nodes admitting for the same tenant, a burst reaches every node
    /// before any hears of the others' admissions. So what this node admitted in the last
    /// `UNSEEN_MS` (not yet seen by its peers) is held to its share of what remains of the limit
    /// as everyone sees it: `ceil(remaining / nodes)`. All nodes together then admit at most the
    /// limit plus `nodes - 1` within a burst, as long as usage reports reach peers within
    /// `UNSEEN_MS`. The cost: a burst sent to one node gets its share of the remainder per
    /// `UNSEEN_MS` (the rest of the limit over the following seconds), with a 429 and
    /// `retry-after` meanwhile.
    pub fn admit(
        &mut self,
        tenant: &str,
        spec: &LimitSpec,
        tokens: u64,
        remote: Usage,
        nodes: u64,
        now_ms: u64,
    ) -> Result<(), Limited> {
        let local = self.usage(tenant, now_ms);
        let total = Usage::sum([local, remote]);
        let retry_after_s = total.reset_ms.div_ceil(1000).max(1);
        let nodes = nodes.max(1);
        if nodes > 1 {
            let recent = self.recent(tenant, now_ms);
            let share_retry = UNSEEN_MS.div_ceil(1000);
            let checks = [
                (spec.requests_per_minute, total.requests, recent.requests, 1, "requests"),
                (spec.tokens_per_minute, total.tokens, recent.tokens, tokens, "tokens"),
            ];
            for (limit, used, unseen, add, what) in checks {
                let Some(limit) = limit else { continue };
                let seen = used.saturating_sub(unseen);
                let share = limit.saturating_sub(seen).div_ceil(nodes);
                if unseen.saturating_add(add) > share {
                    return Err(Limited { what, limit, retry_after_s: share_retry });
                }
            }
        }
        if let Some(rpm) = spec.requests_per_minute {
            if total.requests.saturating_add(1) > rpm {
                return Err(Limited { what: "requests", limit: rpm, retry_after_s });
            }
        }
        if let Some(tpm) = spec.tokens_per_minute {
            if total.tokens.saturating_add(tokens) > tpm {
                return Err(Limited { what: "tokens", limit: tpm, retry_after_s });
            }
        }
        let b = self.bucket(tenant, now_ms);
        b.requests = b.requests.saturating_add(1);
        b.tokens = b.tokens.saturating_add(tokens);
        Ok(())
    }

    /// Counts tokens learnt after admission (the completion's).
    pub fn charge_tokens(&mut self, tenant: &str, tokens: u64, now_ms: u64) {
        if tokens > 0 {
            let b = self.bucket(tenant, now_ms);
            b.tokens = b.tokens.saturating_add(tokens);
        }
    }

    /// Every tenant with use in the window, for gossip. Tenants with none are forgotten.
    pub fn snapshot(&mut self, now_ms: u64) -> BTreeMap<String, Usage> {
        let mut out = BTreeMap::new();
        self.tenants.retain(|tenant, window| {
            Self::prune(window, now_ms);
            if window.is_empty() {
                return false;
            }
            out.insert(tenant.clone(), usage_of(window, now_ms));
            true
        });
        out
    }
}

fn usage_of(window: &VecDeque<Bucket>, now_ms: u64) -> Usage {
    let (requests, tokens) =
        window.iter().fold((0u64, 0u64), |(r, t), b| (r.saturating_add(b.requests), t.saturating_add(b.tokens)));
    let reset_ms = window.front().map(|b| (b.at + WINDOW_MS).saturating_sub(now_ms)).unwrap_or(0);
    Usage { requests, tokens, reset_ms }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(n: u64) -> LimitSpec {
        LimitSpec { requests_per_minute: Some(n), ..Default::default() }
    }

    #[test]
    fn a_burst_over_a_mesh_admits_at_most_the_limit_plus_nodes_less_one() {
        // 4 nodes, 60 a minute, 400 requests at once spread over them; none has heard of the
        // others' admissions.
        let spec = LimitSpec { requests_per_minute: Some(60), ..Default::default() };
        let mut nodes: Vec<Limiter> = (0..4).map(|_| Limiter::new()).collect();
        let mut admitted = 0;
        for i in 0..400 {
            if nodes[i % 4].admit("t", &spec, 0, Usage::default(), 4, 10).is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted <= 60 + 3, "{admitted}");
        assert_eq!(admitted, 60, "ceil(60 / 4) each");
        // Once its admissions are seen (reported), a node alone gets its share of the rest.
        let one = &mut nodes[0];
        let later = 10 + UNSEEN_MS + 1_000;
        let remote = Usage { requests: 45, tokens: 0, reset_ms: 50_000 };
        assert!(one.admit("t", &spec, 0, remote, 4, later).is_err(), "the limit is spent");
        let quiet = Usage::default();
        let mut alone = Limiter::new();
        let mut got = 0;
        for t in 0..60u64 {
            // A burst at one node of four: its share per UNSEEN_MS, until the limit is reached.
            for _ in 0..60 {
                if alone.admit("t", &spec, 0, quiet, 4, t * 1_000).is_ok() {
                    got += 1;
                }
            }
        }
        assert!((50..=60).contains(&got), "a lone node reaches most of the limit within the minute: {got}");
    }

    #[test]
    fn n_completions_count_against_the_max_tokens_cap() {
        let spec = LimitSpec { max_tokens: Some(100), ..Default::default() };
        assert!(check_request(&spec, Some(50), 2, 0).is_ok());
        let e = check_request(&spec, Some(50), 3, 0).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        assert!(check_request(&spec, Some(100), u32::MAX, 0).is_err(), "no overflow");
    }

    /// A peer's gossiped usage is untrusted: a figure near u64::MAX must refuse, not wrap to a
    /// small total and admit.
    #[test]
    fn huge_peer_usage_saturates_and_refuses() {
        let mut l = Limiter::new();
        let spec = LimitSpec { requests_per_minute: Some(10), tokens_per_minute: Some(1000), ..Default::default() };
        l.admit("t", &spec, 1, Usage::default(), 1, 0).unwrap();
        let hostile = Usage { requests: u64::MAX, tokens: u64::MAX, reset_ms: 1 };
        assert!(l.admit("t", &spec, 1, hostile, 1, 1).is_err());
        assert_eq!(Usage::sum([hostile, hostile]).requests, u64::MAX);
    }

    #[test]
    fn requests_per_minute_slide_out_of_the_window() {
        let mut l = Limiter::new();
        let spec = rpm(3);
        for t in [0, 10_000, 20_000] {
            l.admit("a", &spec, 0, Usage::default(), 1, t).unwrap();
        }
        let e = l.admit("a", &spec, 0, Usage::default(), 1, 30_000).unwrap_err();
        assert_eq!(e.what, "requests");
        // The first request leaves the window at 60 s: 30 s from now.
        assert_eq!(e.retry_after_s, 30);
        // Another tenant is not affected.
        l.admit("b", &spec, 0, Usage::default(), 1, 30_000).unwrap();
        l.admit("a", &spec, 0, Usage::default(), 1, 60_000).unwrap();
        assert!(l.admit("a", &spec, 0, Usage::default(), 1, 60_001).is_err());
    }

    #[test]
    fn peers_usage_counts_against_the_same_quota() {
        let mut l = Limiter::new();
        let spec = rpm(5);
        let remote = Usage::sum([
            Usage { requests: 2, tokens: 0, reset_ms: 50_000 },
            Usage { requests: 2, tokens: 0, reset_ms: 5_000 },
        ]);
        assert_eq!(remote.requests, 4);
        l.admit("a", &spec, 0, remote, 1, 0).unwrap();
        let e = l.admit("a", &spec, 0, remote, 1, 100).unwrap_err();
        // The earliest release anywhere: a peer's bucket in 5 s.
        assert_eq!(e.retry_after_s, 5);
    }

    #[test]
    fn tokens_per_minute_include_completion_tokens() {
        let mut l = Limiter::new();
        let spec = LimitSpec { tokens_per_minute: Some(100), ..Default::default() };
        l.admit("a", &spec, 40, Usage::default(), 1, 0).unwrap();
        l.charge_tokens("a", 50, 500);
        assert_eq!(l.usage("a", 600).tokens, 90);
        let e = l.admit("a", &spec, 20, Usage::default(), 1, 1_000).unwrap_err();
        assert_eq!(e.what, "tokens");
        l.admit("a", &spec, 10, Usage::default(), 1, 1_000).unwrap();
        let err = e.to_api_error();
        assert_eq!(err.status.as_u16(), 429);
        assert_eq!(err.code.as_deref(), Some("rate_limit_exceeded"));
    }

    #[test]
    fn static_limits_are_400s_naming_the_parameter() {
        let spec = LimitSpec { max_tokens: Some(100), max_prompt_tokens: Some(50), ..Default::default() };
        assert!(check_request(&spec, Some(100), 1, 50).is_ok());
        assert_eq!(check_request(&spec, Some(101), 1, 1).unwrap_err().param.as_deref(), Some("max_tokens"));
        assert_eq!(check_request(&spec, None, 1, 1).unwrap_err().param.as_deref(), Some("max_tokens"));
        let e = check_request(&spec, Some(1), 1, 51).unwrap_err();
        assert_eq!(e.code.as_deref(), Some("context_length_exceeded"));
    }

    #[test]
    fn snapshot_forgets_idle_tenants_and_tenant_overrides_merge() {
        let mut l = Limiter::new();
        l.admit("a", &rpm(9), 7, Usage::default(), 1, 1_500).unwrap();
        let s = l.snapshot(2_000);
        assert_eq!(s["a"], Usage { requests: 1, tokens: 7, reset_ms: 59_000 });
        assert!(l.snapshot(61_000).is_empty());
        let cfg = LimitsConfig {
            default: LimitSpec { requests_per_minute: Some(10), max_tokens: Some(5), ..Default::default() },
            tenants: [("big".to_owned(), rpm(1000))].into_iter().collect(),
        };
        assert_eq!(cfg.for_tenant("big").requests_per_minute, Some(1000));
        assert_eq!(cfg.for_tenant("big").max_tokens, Some(5));
        assert_eq!(cfg.for_tenant("other").requests_per_minute, Some(10));
    }
}
