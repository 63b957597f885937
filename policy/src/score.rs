//! Scoring a candidate engine by predicted time to first token (TTFT), and choosing among
//! near-equal candidates without herding.
//!
//! `ttft = rtt + queue wait + prefill of the uncached prompt + KV-pressure penalty`
//!
//! - The uncached prompt is what the engine's cached prefix does not cover. The match is capped
//!   at n-1 tokens, as engines always recompute the last token.
//! - The queue wait counts requests ahead of this one. Waiting ones weigh a prefill each;
//!   running ones little, because under chunked prefill decodes share each step with the new
//!   prefill. This node's own in-flight requests beyond what the engine reported running count
//!   as waiting, since the report may predate them.
//! - The penalty grows as KV memory fills: a nearly full cache evicts the very prefixes that
//!   made it attractive, and preempts running requests.
//!
//! Defaults model one H100 with an 8B model (the engine simulator's timing); every weight is
//! configurable.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreWeights {
    /// Cost per uncached prompt token. An 8B model on an H100 prefills in ~24 µs/token, and the
    /// default counts that twice: a cache miss delays this request, and the same prefill takes
    /// step budget from everything else on that engine. Weighing only the first half let
    /// requests spill off cache holders under load until the cluster collapsed (BENCHMARKS.md,
    /// routing at 55 req/s).
    pub prefill_ms_per_token: f64,
    /// Fixed cost of the step that produces the first token.
    pub first_step_ms: f64,
    /// Added wait per request waiting ahead (each must prefill first; ~a mid-size prefill).
    pub queue_ms_per_waiting: f64,
    /// Added wait per running request: decodes share each step with the new prefill, which
    /// costs little under chunked prefill.
    pub queue_ms_per_running: f64,
    /// Penalty per unit of KV usage above `kv_pressure_knee`, in ms.
    pub kv_pressure_ms: f64,
    pub kv_pressure_knee: f64,
    /// Cost per prompt token found offloaded (vLLM's offloading connector, `medium` `CPU`):
    /// loaded back over PCIe instead of computed. 8B model: 128 KiB of KV per token at ~25 GB/s
    /// is ~5 µs, counted twice as prefill is (the load holds the step too).
    pub offload_ms_per_token: f64,
    /// Candidates within this fraction of the best predicted TTFT count as equal; the choice
    /// among them is randomized (power of two choices) so that nodes acting on the same
    /// gossip do not all pick the same engine.
    pub tolerance: f64,
}

impl Default for ScoreWeights {
    fn default() -> Self {
        Self {
            prefill_ms_per_token: 0.048,
            first_step_ms: 7.0,
            queue_ms_per_waiting: 40.0,
            queue_ms_per_running: 0.5,
            kv_pressure_ms: 200.0,
            kv_pressure_knee: 0.85,
            offload_ms_per_token: 0.010,
            tolerance: 0.10,
        }
    }
}

/// What is known about one candidate for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub usable: bool,
    pub rtt_ms: f64,
    /// Requests the engine is running (reported).
    pub running: f64,
    /// Requests waiting ahead: reported waiting, plus this node's in-flight requests the
    /// report cannot include yet.
    pub waiting: f64,
    pub kv_usage: f64,
    /// Leading prompt blocks the engine holds.
    pub matched_blocks: usize,
    /// Blocks after those the engine holds offloaded: loaded, not computed.
    pub offloaded_blocks: usize,
    pub block_size: u32,
    /// The engine's own fitted TTFT model (`predict`), in place of the fixed weights' first
    /// step, queue and prefill costs; `None`: the fixed weights.
    pub fit: Option<crate::predict::Fit>,
}

/// Predicted TTFT of a `prompt_tokens`-token prompt on this candidate, in ms: the network, the
/// engine's own time (its fitted model, or the fixed weights), offloaded blocks' loading and
/// the KV-pressure penalty.
pub fn predicted_ttft_ms(prompt_tokens: usize, e: &Estimate, w: &ScoreWeights) -> f64 {
    let cap = prompt_tokens.saturating_sub(1);
    let cached = (e.matched_blocks * e.block_size as usize).min(cap);
    let offloaded = (e.offloaded_blocks * e.block_size as usize).min(cap - cached);
    let uncached = (prompt_tokens - cached - offloaded) as f64;
    let pressure = (e.kv_usage - w.kv_pressure_knee).max(0.0) / (1.0 - w.kv_pressure_knee).max(1e-6);
    let fit = e.fit.unwrap_or_else(|| crate::predict::Fit::of(w));
    let engine = crate::predict::Features { waiting: e.waiting, uncached_tokens: uncached, running: e.running };
    e.rtt_ms + fit.predict(&engine) + offloaded as f64 * w.offload_ms_per_token + pressure * w.kv_pressure_ms
}

/// The choice for one request, with what explains it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub predicted_ms: f64,
    /// The best other candidate and its prediction.
    pub runner_up: Option<(usize, f64)>,
}

/// What wins among near-equal candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefer<'a> {
    /// Two are drawn and the better one wins (spreading load).
    #[default]
    Nothing,
    /// This candidate (a cell's home node keeping a prompt on its own engine).
    Candidate(usize),
    /// The highest-ranked (a session's rendezvous rank per candidate, `affinity::ranks`).
    Ranked(&'a [u64]),
    /// The highest-ranked for a prompt's prefix (`affinity::prefix_ranks`), ranked as a
    /// session is; `candidates::decide` keeps it only while no candidate is believed to hold
    /// the prefix (a cold prefix), and draws otherwise.
    Placed(&'a [u64]),
}

/// Picks among usable candidates: all within `tolerance` of the best prediction are
/// near-equal; `prefer` decides among them, else two are drawn with `draw` and the better one
/// wins.
pub fn choose(
    prompt_tokens: usize,
    cands: &[Estimate],
    w: &ScoreWeights,
    prefer: Prefer<'_>,
    mut draw: impl FnMut(usize) -> usize,
) -> Option<Choice> {
    let mut scored: Vec<(usize, f64)> = cands
        .iter()
        .enumerate()
        .filter(|(_, e)| e.usable)
        .map(|(i, e)| (i, predicted_ttft_ms(prompt_tokens, e, w)))
        .collect();
    if scored.is_empty() {
        return None;
    }
    scored.sort_by(|a, b| a.1.total_cmp(&b.1));
    let best = scored[0].1;
    let near = scored.iter().take_while(|(_, s)| *s <= best * (1.0 + w.tolerance)).count();
    let preferred = match prefer {
        Prefer::Nothing => None,
        Prefer::Candidate(p) => scored[..near].iter().position(|(i, _)| *i == p),
        Prefer::Ranked(ranks) | Prefer::Placed(ranks) => {
            // A session's engine may also be up to `SESSION_SLACK_MS` slower than the best: a
            // network hop or a short queue costs less than the cache the session keeps there.
            let slack = best * (1.0 + w.tolerance) + crate::affinity::SESSION_SLACK_MS;
            let near = scored.iter().take_while(|(_, s)| *s <= slack).count();
            (0..near).max_by_key(|&pos| ranks.get(scored[pos].0).copied().unwrap_or(0))
        }
    };
    let pick = if let Some(p) = preferred {
        p
    } else if near >= 2 {
        let (a, b) = (draw(near), draw(near));
        a.min(b) // sorted: the lower index is the better prediction
    } else {
        0
    };
    let (index, predicted_ms) = scored[pick];
    let runner_up = scored.iter().find(|(i, _)| *i != index).copied();
    Some(Choice { index, predicted_ms, runner_up })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(waiting: f64, matched: usize) -> Estimate {
        Estimate {
            usable: true,
            rtt_ms: 0.0,
            running: 0.0,
            waiting,
            kv_usage: 0.3,
            matched_blocks: matched,
            offloaded_blocks: 0,
            block_size: 16,
            fit: None,
        }
    }

    #[test]
    fn an_offloaded_hit_costs_between_a_gpu_hit_and_a_miss() {
        let w = ScoreWeights::default();
        let gpu = predicted_ttft_ms(4096, &e(0.0, 256), &w);
        let cpu = predicted_ttft_ms(4096, &Estimate { offloaded_blocks: 256, ..e(0.0, 0) }, &w);
        let miss = predicted_ttft_ms(4096, &e(0.0, 0), &w);
        assert!(gpu < cpu && cpu < miss, "gpu {gpu} < offloaded {cpu} < miss {miss}");
        let both = predicted_ttft_ms(4096, &Estimate { offloaded_blocks: 1000, ..e(0.0, 200) }, &w);
        assert!(both >= gpu, "offloaded blocks never count beyond the prompt");
    }

    #[test]
    fn cached_prefix_beats_light_load_when_the_prompt_is_long() {
        let w = ScoreWeights::default();
        // 6,000 cached tokens on a busier engine vs an idle engine with nothing cached.
        let c = choose(7_200, &[e(0.0, 0), e(3.0, 375)], &w, Prefer::Nothing, |_| 0).unwrap();
        assert_eq!(c.index, 1);
        assert!(c.runner_up.unwrap().1 > c.predicted_ms);
    }

    #[test]
    fn load_wins_when_nothing_is_cached() {
        let w = ScoreWeights::default();
        assert_eq!(choose(500, &[e(8.0, 0), e(1.0, 0)], &w, Prefer::Nothing, |_| 0).unwrap().index, 1);
    }

    #[test]
    fn full_hit_still_recomputes_one_token() {
        let w = ScoreWeights::default();
        let t = predicted_ttft_ms(32, &e(0.0, 2), &w);
        assert!((t - (w.first_step_ms + w.prefill_ms_per_token)).abs() < 1e-9, "{t}");
    }

    #[test]
    fn near_equal_candidates_are_spread() {
        let w = ScoreWeights::default();
        let cands = [e(1.0, 0), e(1.0, 0), e(1.0, 0), e(9.0, 0)];
        let mut seen = std::collections::HashSet::new();
        let mut k = 0usize;
        for _ in 0..50 {
            let c = choose(100, &cands, &w, Prefer::Nothing, |n| {
                k = k.wrapping_mul(31).wrapping_add(7);
                k % n
            })
            .unwrap();
            assert_ne!(c.index, 3, "the loaded engine is never near-equal");
            seen.insert(c.index);
        }
        assert!(seen.len() >= 2, "{seen:?}");
    }

    #[test]
    fn a_preferred_candidate_wins_only_among_near_equals() {
        let w = ScoreWeights::default();
        let cands = [e(1.0, 0), e(1.0, 0), e(9.0, 0)];
        assert_eq!(choose(100, &cands, &w, Prefer::Candidate(1), |_| 0).unwrap().index, 1);
        assert_eq!(choose(100, &cands, &w, Prefer::Candidate(2), |_| 0).unwrap().index, 0, "too slow to prefer");
    }

    #[test]
    fn a_session_ranks_only_near_equals() {
        let w = ScoreWeights::default();
        let cands = [e(1.0, 0), e(1.0, 0), e(9.0, 0)];
        assert_eq!(choose(100, &cands, &w, Prefer::Ranked(&[1, 5, 0]), |_| 0).unwrap().index, 1);
        assert_eq!(choose(100, &cands, &w, Prefer::Ranked(&[1, 0, 9]), |_| 0).unwrap().index, 0, "load is the limit");
        // Within the slack (a network hop), the session's engine still wins.
        let near = [Estimate { rtt_ms: 0.0, ..e(0.0, 0) }, Estimate { rtt_ms: 2.0, ..e(0.0, 0) }];
        assert_eq!(choose(100, &near, &w, Prefer::Ranked(&[0, 1]), |_| 0).unwrap().index, 1);
    }

    #[test]
    fn kv_pressure_penalizes_a_full_cache() {
        let w = ScoreWeights::default();
        let full = Estimate { kv_usage: 0.99, ..e(0.0, 0) };
        assert_eq!(choose(100, &[full, e(0.0, 0)], &w, Prefer::Nothing, |_| 0).unwrap().index, 1);
    }
}
