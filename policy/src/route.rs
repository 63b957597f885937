//! Choosing an engine for one request from scored candidates: the step shared by the node's
//! proxy and the cluster simulator, so that simulated routing is the product's routing.
//!
//! The caller gathers what it knows about each candidate (`score::Estimate`: matched prefix,
//! reported load, its own in-flight requests, RTT) and each candidate's P/D role; this module
//! applies the policy's view of them, picks the engine (randomized among near-equal ones), and
//! decides whether to split prefill from decode.

use crate::pd::{self, PdSettings, Role, Split};
use crate::score::{self, Choice, Estimate, Prefer, ScoreWeights};

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

/// Why a request went where it went: the `reason` of `x-kvmesh-route`, the span and the
/// `kvmesh_route_decisions_total` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteReason {
    /// The chosen engine holds a cached prefix of the prompt's token blocks.
    Prefix,
    /// The chosen engine was sent this prompt's text before (no tokenizer: approximate keys).
    PrefixApprox,
    /// No engine holds a prefix: the least loaded (predicted soonest) one.
    Load,
    /// No tokenizer for the model and no text match: load only.
    LoadNoTokenizer,
    /// The round-robin baseline.
    RoundRobin,
    /// Sent again after the first engine failed before answering.
    Retry,
    /// Split between a prefill and a decode engine.
    Pd,
    /// The prompt's home is another cell: placed (or relayed) through its home node there.
    CellHome,
    /// This node placed another cell's prompt on an engine in its own cell.
    CellPlace,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::Prefix => "prefix",
            RouteReason::PrefixApprox => "prefix_approx",
            RouteReason::Load => "load",
            RouteReason::LoadNoTokenizer => "load_no_tokenizer",
            RouteReason::RoundRobin => "round_robin",
            RouteReason::Retry => "retry",
            RouteReason::Pd => "pd",
            RouteReason::CellHome => "cell_home",
            RouteReason::CellPlace => "cell_place",
        }
    }

    /// The reason of a pick that matched `matched` blocks of a prompt whose keys are
    /// approximate (`approx`) or known (`known`: token blocks).
    pub fn of_match(matched: usize, approx: bool, known: bool) -> Self {
        match (matched > 0, approx, known) {
            (true, true, _) => RouteReason::PrefixApprox,
            (true, false, _) => RouteReason::Prefix,
            (false, _, true) => RouteReason::Load,
            (false, _, false) => RouteReason::LoadNoTokenizer,
        }
    }
}

impl std::fmt::Display for RouteReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A routing decision as the client sees it: its `Display` is the `x-kvmesh-route` header.
/// Engines are named `node/engine`, as in `x-kvmesh-served-by`.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteDecision {
    /// One engine serves the request whole.
    Whole {
        engine: String,
        matched_blocks: usize,
        prompt_tokens: usize,
        predicted_ms: f64,
        runner_up: Option<(String, f64)>,
        reason: RouteReason,
    },
    /// The round-robin baseline's pick.
    RoundRobin { engine: String },
    /// Prefill on one engine, decode on another.
    Split { decode: String, prefill: String, prompt_tokens: usize, predicted_ms: f64, whole_ms: f64 },
    /// Placed by the prompt's home node in another cell: `placed` is that node's own decision
    /// as it explained it (its reason renamed `home_reason`).
    CellPlaced { cell: String, home: String, placed: String },
    /// Relayed whole to the prompt's home node in another cell (it splits, or cannot place).
    CellRelayed { cell: String, home: String },
}

impl RouteDecision {
    pub fn reason(&self) -> RouteReason {
        match self {
            RouteDecision::Whole { reason, .. } => *reason,
            RouteDecision::RoundRobin { .. } => RouteReason::RoundRobin,
            RouteDecision::Split { .. } => RouteReason::Pd,
            RouteDecision::CellPlaced { .. } | RouteDecision::CellRelayed { .. } => RouteReason::CellHome,
        }
    }
}

impl std::fmt::Display for RouteDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteDecision::Whole { engine, matched_blocks, prompt_tokens, predicted_ms, runner_up, reason } => {
                write!(
                    f,
                    "engine={engine}; matched_blocks={matched_blocks}; prompt_tokens={prompt_tokens}; predicted_ms={predicted_ms:.1}"
                )?;
                if let Some((ru, ms)) = runner_up {
                    write!(f, "; runner_up={ru}@{ms:.1}")?;
                }
                write!(f, "; reason={reason}")
            }
            RouteDecision::RoundRobin { engine } => write!(f, "engine={engine}; reason=round_robin"),
            RouteDecision::Split { decode, prefill, prompt_tokens, predicted_ms, whole_ms } => write!(
                f,
                "engine={decode}; prefill={prefill}; prompt_tokens={prompt_tokens}; predicted_ms={predicted_ms:.1}; whole_ms={whole_ms:.1}; reason=pd"
            ),
            RouteDecision::CellPlaced { cell, home, placed } => {
                let placed = placed.replacen("reason=", "home_reason=", 1);
                write!(f, "cell={cell}; home={home}; {placed}; reason=cell_home")
            }
            RouteDecision::CellRelayed { cell, home } => write!(f, "cell={cell}; node={home}; reason=cell_home"),
        }
    }
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
    prefer: Prefer<'_>,
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
        Estimate {
            usable: true,
            rtt_ms: 0.0,
            running: 0.0,
            waiting,
            kv_usage: 0.2,
            matched_blocks,
            offloaded_blocks: 0,
            block_size: 16,
            fit: None,
        }
    }

    #[test]
    fn least_load_ignores_the_cache_that_kvmesh_follows() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let rules = |mode| Rules { mode, weights: &w, pd: &pd };
        let roles = [Role::Both, Role::Both];
        let mut a = [est(0.0, 0), est(2.0, 400)];
        let kv =
            pick(rules(Mode::Kvmesh), 7000, &mut a.clone(), &roles, false, Prefer::Nothing, |_| 0).expect("usable");
        assert_eq!(kv.choice.index, 1);
        let ll = pick(rules(Mode::LeastLoad), 7000, &mut a, &roles, false, Prefer::Nothing, |_| 0).expect("usable");
        assert_eq!(ll.choice.index, 0);
        assert_eq!(a[1].matched_blocks, 0, "least-load sees no cache");
    }

    #[test]
    fn prefill_engines_serve_whole_only_as_a_last_resort() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let rules = Rules { mode: Mode::Kvmesh, weights: &w, pd: &pd };
        let roles = [Role::Prefill, Role::Both];
        let mut c = [est(0.0, 0), est(5.0, 0)];
        let p = pick(rules, 100, &mut c, &roles, false, Prefer::Nothing, |_| 0).expect("usable");
        assert_eq!(p.choice.index, 1);
        let mut c = [est(0.0, 0), Estimate { usable: false, ..est(0.0, 0) }];
        let p = pick(rules, 100, &mut c, &roles, false, Prefer::Nothing, |_| 0).expect("usable");
        assert_eq!(p.choice.index, 0);
    }

    #[test]
    fn the_route_header_reads_as_before() {
        let whole = RouteDecision::Whole {
            engine: "n1/e0".into(),
            matched_blocks: 3,
            prompt_tokens: 70,
            predicted_ms: 12.345,
            runner_up: Some(("n2/e0".into(), 20.0)),
            reason: RouteReason::Prefix,
        };
        assert_eq!(
            whole.to_string(),
            "engine=n1/e0; matched_blocks=3; prompt_tokens=70; predicted_ms=12.3; runner_up=n2/e0@20.0; reason=prefix"
        );
        let placed = RouteDecision::CellPlaced { cell: "b".into(), home: "b1".into(), placed: whole.to_string() };
        assert!(placed.to_string().starts_with("cell=b; home=b1; engine=n1/e0;"), "{placed}");
        assert!(placed.to_string().ends_with("home_reason=prefix; reason=cell_home"), "{placed}");
        assert_eq!(placed.reason(), RouteReason::CellHome);
        assert_eq!(RouteDecision::RoundRobin { engine: "a/b".into() }.to_string(), "engine=a/b; reason=round_robin");
    }

    #[test]
    fn unreported_counts_only_what_the_report_cannot_hold() {
        assert_eq!(unreported(3, 1.0), 2.0);
        assert_eq!(unreported(1, 4.0), 0.0);
    }
}
