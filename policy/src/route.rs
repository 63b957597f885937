//! Choosing an engine for one request from scored candidates: the step shared by the node's
//! proxy and the cluster simulator, so that simulated routing is the product's routing.
//!
//! The caller gathers what it knows about each candidate (`score::Estimate`: matched prefix,
//! reported load, its own in-flight requests, RTT) and each candidate's P/D role; this module
//! applies the policy's view of them, picks the engine (randomized among near-equal ones), and
//! decides whether to split prefill from decode.

use crate::pd::{self, PdSettings, Role, Split};
use crate::score::{self, Choice, Estimate, ScoreWeights};

/// What a router takes into account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Predicted TTFT: cached prefix, load, KV pressure, RTT.
    Kvmesh,
    /// The same prediction blind to caches: a baseline.
    LeastLoad,
}

/// How a router weighs candidates: its mode and its settings.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub mode: Mode,
    pub weights: &'a ScoreWeights,
    pub pd: &'a PdSettings,
}

/// The pick for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    /// The engine serving it whole (or decoding it when split).
    pub choice: Choice,
    pub split: Option<Split>,
}

/// Requests this router has in flight to an engine beyond what the engine last reported
/// running: they count as waiting, since the report may predate them.
pub fn unreported(in_flight: u32, reported_running: f64) -> f64 {
    (in_flight as f64 - reported_running).max(0.0)
}

/// Picks an engine among `cands` (with their `roles`), or `None` when none is usable. `prefer`
/// (an index into `cands`) wins among near-equal candidates: a node that is a prompt's home in
/// its cell (`cells::member`) prefers its own engine, so that the prefix settles where the
/// next requests for it arrive.
///
/// Prefill-only engines take whole requests only when nothing else can. A split is considered
/// only in `Mode::Kvmesh` and when `may_split` (the prompt's blocks are known and the request
/// allows it).
pub fn pick(
    rules: Rules<'_>,
    prompt_tokens: usize,
    cands: &mut [Estimate],
    roles: &[Role],
    may_split: bool,
    prefer: Option<usize>,
    draw: impl FnMut(usize) -> usize,
) -> Option<Picked> {
    let Rules { mode, weights: w, pd: pd_settings } = rules;
    if mode == Mode::LeastLoad {
        cands.iter_mut().for_each(|c| c.matched_blocks = 0);
    }
    let mut whole = cands.to_vec();
    if whole.iter().zip(roles).any(|(c, r)| c.usable && r.serves_whole()) {
        whole.iter_mut().zip(roles).filter(|(_, r)| !r.serves_whole()).for_each(|(c, _)| c.usable = false);
    }
    let choice = score::choose(prompt_tokens, &whole, w, prefer, draw)?;
    let split = if may_split && mode == Mode::Kvmesh {
        pd::choose(prompt_tokens, cands, roles, Some((choice.index, choice.predicted_ms)), w, pd_settings)
    } else {
        None
    };
    Some(Picked { choice, split })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(waiting: f64, matched_blocks: usize) -> Estimate {
        Estimate { usable: true, rtt_ms: 0.0, running: 0.0, waiting, kv_usage: 0.2, matched_blocks, block_size: 16 }
    }

    #[test]
    fn least_load_ignores_the_cache_that_kvmesh_follows() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let rules = |mode| Rules { mode, weights: &w, pd: &pd };
        let roles = [Role::Both, Role::Both];
        let mut a = [est(0.0, 0), est(2.0, 400)];
        let kv = pick(rules(Mode::Kvmesh), 7000, &mut a.clone(), &roles, false, None, |_| 0).expect("usable");
        assert_eq!(kv.choice.index, 1);
        let ll = pick(rules(Mode::LeastLoad), 7000, &mut a, &roles, false, None, |_| 0).expect("usable");
        assert_eq!(ll.choice.index, 0);
        assert_eq!(a[1].matched_blocks, 0, "least-load sees no cache");
    }

    #[test]
    fn prefill_engines_serve_whole_only_as_a_last_resort() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let rules = Rules { mode: Mode::Kvmesh, weights: &w, pd: &pd };
        let roles = [Role::Prefill, Role::Both];
        let mut c = [est(0.0, 0), est(5.0, 0)];
        let p = pick(rules, 100, &mut c, &roles, false, None, |_| 0).expect("usable");
        assert_eq!(p.choice.index, 1);
        let mut c = [est(0.0, 0), Estimate { usable: false, ..est(0.0, 0) }];
        let p = pick(rules, 100, &mut c, &roles, false, None, |_| 0).expect("usable");
        assert_eq!(p.choice.index, 0);
    }

    #[test]
    fn unreported_counts_only_what_the_report_cannot_hold() {
        assert_eq!(unreported(3, 1.0), 2.0);
        assert_eq!(unreported(1, 4.0), 0.0);
    }
}
