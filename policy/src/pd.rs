//! Whether to split a request's prefill from its decode (vLLM's NixlConnector), and where.
//!
//! Disaggregation only happens among engines that declared a role: `prefill` engines take the
//! prefill of long uncached prompts, `decode` (and `both`) engines everything else. A request is
//! split when
//! 1. the prompt's part not cached on the engine that would serve it whole is at least
//!    `min_uncached_tokens` (short prefills barely disturb decodes, and the transfer is not free),
//!    and
//! 2. prefill there, plus the KV transfer, plus the decode engine's first step, is predicted to
//!    start the answer no later than `max_ttft_ratio` × serving it whole would.
//!
//! The prefill engine is the one with the lowest predicted TTFT among `prefill` engines (prefix
//! hit and compute queue, `score`); the decode engine the one with the least decode load and KV
//! pressure among `decode`/`both` engines (its prompt costs it only the transfer).

use serde::{Deserialize, Serialize};

use crate::score::{self, Estimate, ScoreWeights};

/// Which phase of a request an engine takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Prefill,
    Decode,
    #[default]
    Both,
}

impl Role {
    pub fn prefills_for_others(self) -> bool {
        self == Role::Prefill
    }

    pub fn serves_whole(self) -> bool {
        self != Role::Prefill
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PdSettings {
    /// Uncached prompt tokens from which a request may be split.
    pub min_uncached_tokens: usize,
    /// A split must not predict a TTFT beyond this multiple of serving it whole.
    pub max_ttft_ratio: f64,
    /// KV transfer cost per prompt token, ms (8B over 400G RDMA: ~3.3 µs; engine-timing.md §7).
    pub transfer_ms_per_token: f64,
    /// Fixed cost of one transfer, ms.
    pub transfer_overhead_ms: f64,
}

impl Default for PdSettings {
    fn default() -> Self {
        Self {
            min_uncached_tokens: 2048,
            max_ttft_ratio: 1.5,
            transfer_ms_per_token: 0.0033,
            transfer_overhead_ms: 2.0,
        }
    }
}

/// A split: indexes into the candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub prefill: usize,
    pub decode: usize,
    pub predicted_ms: f64,
    /// Predicted TTFT of serving it whole on `whole`'s engine, for the route header.
    pub whole_ms: f64,
}

/// Decides a split for a `prompt_tokens`-token prompt, given the candidates, their roles and
/// the engine `whole` (with its prediction) that would serve it undivided. `None`: serve it whole.
pub fn choose(
    prompt_tokens: usize,
    cands: &[Estimate],
    roles: &[Role],
    whole: Option<(usize, f64)>,
    w: &ScoreWeights,
    pd: &PdSettings,
) -> Option<Split> {
    let (whole_index, whole_ms) = whole?;
    let at_whole = &cands[whole_index];
    let cached = (at_whole.matched_blocks * at_whole.block_size as usize).min(prompt_tokens.saturating_sub(1));
    if prompt_tokens - cached < pd.min_uncached_tokens {
        return None;
    }
    let best = |ok: &dyn Fn(usize) -> bool, tokens: usize| {
        cands
            .iter()
            .enumerate()
            .filter(|(i, e)| e.usable && ok(*i))
            .map(|(i, e)| (i, score::predicted_ttft_ms(tokens, e, w)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let (prefill, prefill_ms) = best(&|i| roles[i].prefills_for_others(), prompt_tokens)?;
    // The decode engine computes no prompt: rank it as for a one-token prompt.
    let (decode, decode_ms) = best(&|i| roles[i].serves_whole(), 1)?;
    let transfer = pd.transfer_overhead_ms + prompt_tokens as f64 * pd.transfer_ms_per_token;
    let predicted_ms = prefill_ms + transfer + decode_ms;
    (predicted_ms <= whole_ms * pd.max_ttft_ratio).then_some(Split { prefill, decode, predicted_ms, whole_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(running: f64, waiting: f64, matched_blocks: usize) -> Estimate {
        Estimate {
            usable: true,
            rtt_ms: 0.0,
            running,
            waiting,
            kv_usage: 0.2,
            matched_blocks,
            offloaded_blocks: 0,
            block_size: 16,
            fit: None,
        }
    }

    #[test]
    fn long_uncached_prompts_split_short_or_cached_ones_do_not() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let roles = [Role::Prefill, Role::Decode, Role::Decode];
        let cands = [est(2.0, 0.0, 0), est(40.0, 0.0, 0), est(10.0, 0.0, 0)];
        let whole = |tokens| {
            let ms = score::predicted_ttft_ms(tokens, &cands[2], &w);
            Some((2, ms))
        };
        let s = choose(8000, &cands, &roles, whole(8000), &w, &pd).expect("split");
        assert_eq!((s.prefill, s.decode), (0, 2), "least-loaded decode engine");
        assert!(choose(1000, &cands, &roles, whole(1000), &w, &pd).is_none(), "short prompt served whole");
        let cached = [est(2.0, 0.0, 0), est(40.0, 0.0, 0), est(10.0, 0.0, 480)];
        assert!(choose(8000, &cached, &roles, whole(8000), &w, &pd).is_none(), "cached on the decode engine");
    }

    #[test]
    fn no_split_without_prefill_engines_or_when_prefill_is_swamped() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let cands = [est(2.0, 0.0, 0), est(10.0, 0.0, 0)];
        let whole = Some((1, score::predicted_ttft_ms(8000, &cands[1], &w)));
        assert!(choose(8000, &cands, &[Role::Both, Role::Both], whole, &w, &pd).is_none());
        let swamped = [est(2.0, 30.0, 0), est(10.0, 0.0, 0)];
        let whole = Some((1, score::predicted_ttft_ms(8000, &swamped[1], &w)));
        assert!(choose(8000, &swamped, &[Role::Prefill, Role::Decode], whole, &w, &pd).is_none());
    }
}
