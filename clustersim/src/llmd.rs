//! llm-d's router policy "sticky until saturated", as a central baseline (`llm-d` policy): one
//! router in front of every engine, as llm-d's endpoint picker (EPP) is. Reimplemented from
//! llm-d's public description and its plugins' behaviour (llm-d blog, *Sticky Until Saturated:
//! Token-Aware Routing in llm-d*, 2026-08; llm-d/llm-d-router's `approx-prefix-cache-producer`,
//! `inflight-load-producer`, `prefix-cache-affinity-filter`, `token-load-scorer` and
//! `max-score-picker` with their default parameters), not from its code:
//!
//! - **Prefix match, approximate**: the router indexes what it routed. A prompt is cut into
//!   blocks of 64 tokens (its last, partial block counts too), chained by hash; after routing,
//!   the chosen engine's LRU index takes all of the prompt's blocks (lookups do not refresh
//!   them). Capacity: the engine's `num_gpu_blocks` entries, so the index holds about four
//!   times the tokens the engine's cache does (llm-d auto-tunes it from vLLM's block count while
//!   indexing 64-token blocks). A match walks the prompt's blocks in order until no engine holds
//!   one; each engine counts the blocks it held along the way.
//! - **Affinity filter**: engines whose match covers at least 80% of the prompt's blocks are
//!   sticky; with none, every engine passes. The gate: each engine's TTFT is estimated as its
//!   in-flight uncached tokens over the peak prefill throughput; when the best sticky engine's
//!   is more than 18 s worse than the best other engine's, every engine passes, else only the
//!   sticky ones. The peak prefill throughput is calibrated as llm-d's recipe does it: a
//!   cache-miss prompt of `max_num_batched_tokens` tokens over its TTFT on an idle engine.
//! - **Token-load scorer**: `1 - min(1, (in-flight uncached tokens + this request's uncached
//!   tokens) / 4,194,304)`; the highest score wins, ties broken at random. In-flight uncached
//!   tokens are charged at dispatch and released at the request's first token.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use kvmesh_policy::blocks;

/// llm-d's smallest block for its approximate index (tokens).
pub const BLOCK_TOKENS: usize = 64;
/// `prefix-cache-affinity-filter`'s `affinityThreshold`.
pub const AFFINITY_THRESHOLD: f64 = 0.80;
/// Its `maxTTFTPenaltyMs`: how much worse a sticky engine may look before the filter opens.
pub const MAX_TTFT_PENALTY_MS: f64 = 18_000.0;
/// `token-load-scorer`'s `queueThresholdTokens`.
pub const QUEUE_THRESHOLD_TOKENS: f64 = 4_194_304.0;

pub struct LlmD {
    index: Vec<lru::LruCache<u64, ()>>,
    in_flight: Vec<u64>,
    peak_prefill_tokens_per_s: f64,
    /// Open requests' charges: request → (engine, uncached tokens), released at first token.
    charges: HashMap<usize, (usize, u64)>,
    seed: u64,
}

impl LlmD {
    /// A router over `engines` engines of `num_gpu_blocks` blocks each, calibrated at
    /// `peak_prefill_tokens_per_s`.
    pub fn new(engines: usize, num_gpu_blocks: u32, peak_prefill_tokens_per_s: f64, seed: u64) -> Self {
        let cap = NonZeroUsize::new(num_gpu_blocks.max(1) as usize).unwrap_or(NonZeroUsize::MIN);
        Self {
            index: (0..engines).map(|_| lru::LruCache::new(cap)).collect(),
            in_flight: vec![0; engines],
            peak_prefill_tokens_per_s: peak_prefill_tokens_per_s.max(1.0),
            charges: HashMap::new(),
            seed,
        }
    }

    /// The prompt's 64-token block hashes, chained; a partial last block is one more.
    pub fn hashes(&self, prompt: &[u32]) -> Vec<u64> {
        let mut keys = blocks::block_keys(self.seed, prompt, BLOCK_TOKENS);
        let tail = &prompt[keys.len() * BLOCK_TOKENS..];
        if !tail.is_empty() {
            let parent = keys.last().copied().unwrap_or(self.seed);
            keys.push(blocks::block_keys(parent, tail, tail.len()).first().copied().unwrap_or(parent));
        }
        keys
    }

    /// The engine for a prompt of `prompt_tokens` tokens with `hashes`, and the uncached
    /// tokens it is charged there. `draw(k)` is uniform in `0..k` (ties).
    pub fn pick(&mut self, hashes: &[u64], prompt_tokens: usize, mut draw: impl FnMut(usize) -> usize) -> (usize, u64) {
        let n = self.index.len();
        let mut matched = vec![0usize; n];
        for h in hashes {
            let mut any = false;
            for (e, idx) in self.index.iter().enumerate() {
                if idx.contains(h) {
                    matched[e] += 1;
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
        let total = hashes.len().max(1);
        let uncached = |e: usize| {
            let covered = (matched[e] * BLOCK_TOKENS).min(prompt_tokens);
            (prompt_tokens - covered) as u64
        };
        let ttft_ms = |e: usize| self.in_flight[e] as f64 / self.peak_prefill_tokens_per_s * 1000.0;
        let sticky: Vec<bool> = (0..n).map(|e| matched[e] as f64 / total as f64 >= AFFINITY_THRESHOLD).collect();
        let best = |want: bool| (0..n).filter(|&e| sticky[e] == want).map(ttft_ms).reduce(f64::min);
        let keep: Vec<usize> = match (best(true), best(false)) {
            (None, _) => (0..n).collect(),
            (Some(s), Some(o)) if s - o > MAX_TTFT_PENALTY_MS => (0..n).collect(),
            _ => (0..n).filter(|&e| sticky[e]).collect(),
        };
        let score = |e: usize| 1.0 - ((self.in_flight[e] + uncached(e)) as f64 / QUEUE_THRESHOLD_TOKENS).min(1.0);
        let top = keep.iter().map(|&e| score(e)).fold(f64::NEG_INFINITY, f64::max);
        let ties: Vec<usize> = keep.into_iter().filter(|&e| score(e) >= top).collect();
        let e = ties[draw(ties.len())];
        (e, uncached(e))
    }

    /// After routing request `r` to `engine`: its blocks join the engine's index and its
    /// uncached tokens its in-flight load.
    pub fn dispatched(&mut self, r: usize, engine: usize, hashes: &[u64], uncached: u64) {
        for &h in hashes {
            self.index[engine].put(h, ());
        }
        self.in_flight[engine] += uncached;
        self.charges.insert(r, (engine, uncached));
    }

    /// Request `r`'s first token: its charge is released.
    pub fn first_token(&mut self, r: usize) {
        if let Some((e, t)) = self.charges.remove(&r) {
            self.in_flight[e] = self.in_flight[e].saturating_sub(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(stream: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| stream * 100_000 + i).collect()
    }

    #[test]
    fn a_prompt_sticks_to_the_engine_that_was_sent_its_prefix_until_it_is_saturated() {
        let mut r = LlmD::new(3, 1_000, 40_000.0, 1);
        let a = r.hashes(&prompt(1, 1000)); // 15 full blocks and a partial one
        assert_eq!(a.len(), 16);
        let (first, uncached) = r.pick(&a, 1000, |_| 1);
        assert_eq!((first, uncached), (1, 1000), "nothing indexed: a tie, drawn");
        r.dispatched(0, first, &a, uncached);
        // The same prompt again: the engine holding it is sticky, though it is the busiest.
        let (again, uncached) = r.pick(&a, 1000, |_| 0);
        assert_eq!((again, uncached), (1, 0));
        // A prompt sharing 60% of its blocks is not sticky anywhere: least token load wins.
        let mut b = prompt(1, 600);
        b.extend(prompt(2, 400));
        let hb = r.hashes(&b);
        assert_eq!(r.pick(&hb, 1000, |_| 0).0, 0);
        // Past 18 s of estimated prefill on the sticky engine, the filter opens.
        r.in_flight[1] = 40_000 * 19;
        let (e, _) = r.pick(&a, 1000, |_| 0);
        assert_ne!(e, 1, "saturated: another engine");
        r.first_token(0);
        assert_eq!(r.in_flight[1], 40_000 * 19 - 1000, "the charge is released at the first token");
    }

    #[test]
    fn the_index_forgets_the_least_recently_routed_blocks() {
        let mut r = LlmD::new(1, 20, 40_000.0, 1);
        let a = r.hashes(&prompt(1, 64 * 16));
        r.dispatched(0, 0, &a, 0);
        let b = r.hashes(&prompt(2, 64 * 16));
        r.dispatched(1, 0, &b, 0);
        // 20 entries: a's first 12 blocks are gone, and a match stops at the first block no
        // engine holds.
        let (_, uncached) = r.pick(&a, 64 * 16, |_| 0);
        assert_eq!(uncached, 64 * 16);
        let (_, uncached) = r.pick(&b, 64 * 16, |_| 0);
        assert_eq!(uncached, 0);
    }
}
