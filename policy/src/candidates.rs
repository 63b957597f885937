//! Scored candidates for one request: what a router knows of each engine turned into the
//! `score::Estimate`s that `route::pick` weighs, and the pick turned into a decision with its
//! reason.
//!
//! The evidence rules live here, once, for the node's router and the cluster simulator alike:
//! - **Which prefix match applies** ([`Cache`]): an engine beside the router is matched against
//!   its exact index (from its KV events), or counts no prefix while that index is being
//!   resynced (plus what this router sent there within `route_history::PENDING_MS`, which
//!   its events may not show yet); a peer's engine against the peer's gossiped summary; an engine nobody observes
//!   only against what this router sent there ([`RoutedKeys`]). Route history also counts for a
//!   peer, until its summary catches up, and is the only evidence for approximate (text-chunk)
//!   keys on an engine beside the router.
//! - **Unreported load**: this router's requests open on an engine (and placements it made
//!   within their lease) beyond what the engine last reported running count as waiting, since
//!   the report may predate them (`route::unreported`). A central oracle, which reads the
//!   engines' true queues, has none.
//! - **Distance**: the caller's RTT to the engine's node (0 for its own engines).
//! - **Cell preference and round-robin order**: `prefer` in [`decide`]; [`round_robin`].

use std::sync::Arc;

use crate::blocks;
use crate::pd::{PdSettings, Role, Split};
use crate::prefix_index::EngineIndex;
use crate::route::{self, Mode, RouteReason};
use crate::route_history::RoutedKeys;
use crate::score::{Estimate, ScoreWeights};
use crate::summary::{self, BloomShard};

/// What a router can see of one engine's cache.
#[derive(Clone, Copy)]
pub enum Cache<'a> {
    /// The engine's blocks, exactly, from its KV events (an engine beside this router, or a
    /// central index).
    Index(&'a EngineIndex),
    /// The exact index missed events and is being resynced: no cached prefix is counted until
    /// the missed batches are applied (or the index is dropped).
    Resyncing,
    /// A peer's gossiped summary: the union of its engines' blocks, sampled at `stride`.
    Summary { shards: &'a [Option<Arc<BloomShard>>], stride: u32 },
    /// Nothing observed (an engine without KV events): only route history tells.
    Unobserved,
}

/// An engine's load as last reported (or, for a central oracle, as it is).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
}

/// Everything a router knows of one engine for one request: plain facts, no I/O.
#[derive(Clone, Copy)]
pub struct EngineFacts<'a> {
    /// Healthy, serves the request's model, and not tried already for this request.
    pub usable: bool,
    /// Round trip to the engine's node (0 for the router's own engines).
    pub rtt_ms: f64,
    pub load: Load,
    /// Requests this router has open there, which the load report may predate.
    pub open: Open,
    pub cache: Cache<'a>,
    /// Block keys this router sent there recently.
    pub history: Option<&'a RoutedKeys>,
    /// Block keys this router sent there within `route_history::PENDING_MS`, for an engine
    /// whose exact index (`Cache::Index`) may not show them yet: counted as held with it.
    pub pending: Option<&'a RoutedKeys>,
    /// The engine's KV block size (the prompt's keys are cut at it).
    pub block_size: u32,
    pub role: Role,
    /// The engine's fitted TTFT model (`predict`), when one is known (its node's, gossiped).
    pub fit: Option<crate::predict::Fit>,
}

/// The requests a router has open on an engine, which its last load report may predate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// `load` is the truth (a central oracle reading every engine's queue): nothing is
    /// unreported.
    Known,
    /// This router's own requests (and placements it made within their lease) on a peer's
    /// engine; other routers' may be open there too. Those beyond the reported running count
    /// as waiting.
    Mine(u32),
    /// Every request open on the engine passes through this router (the engines beside it):
    /// the count is the engine's whole queue. Of it, up to the reported running count runs and
    /// the rest waits: the reported waiting, already in the count, is not added again, and
    /// requests that arrived since the report count as waiting, so that a burst spreads at once.
    All(u32),
}

/// The queue a node reports (gossips) for an engine beside it, from its `open` requests there
/// (every request to it passes through the node) and the engine's last scraped `load`: the
/// reported waiting, bounded by what is open; requests that arrived since the scrape count as
/// waiting only if the engine was queueing then, since an engine with room runs them at once.
/// Peers add their own unreported requests to it (`Open::Mine`). Counting every arrival as
/// waiting here, as routing does beside the engine, made a busy engine look queued to the
/// whole mesh for a gossip round and pushed conversations off the engine holding them
/// (BENCHMARKS.md, *Routers that agree when caches are full*).
pub fn reported_queue(open: u32, load: &Load) -> (f64, f64) {
    let n = open as f64;
    let reported = load.waiting.min(n);
    let arrived = (n - load.running - load.waiting).max(0.0);
    let waiting = if load.waiting > 0.0 { reported + arrived } else { reported };
    (n - waiting, waiting)
}

impl Open {
    /// The engine's running and waiting requests as this router should count them.
    pub fn queue(self, load: &Load) -> (f64, f64) {
        match self {
            Open::Known => (load.running, load.waiting),
            Open::Mine(n) => (load.running, load.waiting + route::unreported(n, load.running)),
            Open::All(n) => {
                let running = load.running.min(n as f64);
                (running, n as f64 - running)
            }
        }
    }
}

/// What a router knows of a prompt: its token ids, the block keys a peer sent, approximate keys
/// of its text (a model with no tokenizer), or nothing. Keys per block size are computed once
/// and kept for the request's candidates.
#[derive(Debug, Clone, Default)]
pub struct PromptKeys {
    /// Prompt length in tokens (an estimate for approximate keys).
    pub tokens: usize,
    seed: u64,
    ids: Option<Vec<u32>>,
    given: Option<(u32, Vec<u64>)>,
    approx: Option<Vec<u64>>,
    computed: Vec<(u32, Vec<u64>)>,
}

impl PromptKeys {
    /// A prompt tokenized here, keyed under `seed` (`blocks::chain_seed`).
    pub fn from_ids(seed: u64, ids: Vec<u32>) -> Self {
        Self { tokens: ids.len(), seed, ids: Some(ids), ..Self::default() }
    }

    /// A prompt known by its block keys at `block_size` (sent by a peer, or a simulator's).
    pub fn from_keys(tokens: usize, block_size: u32, keys: Vec<u64>) -> Self {
        Self { tokens, given: Some((block_size, keys)), ..Self::default() }
    }

    /// A prompt known only by its text: keys of its text chunks (`blocks::text_chunk_keys`),
    /// and a length estimated from its bytes.
    pub fn approximate(tokens: usize, keys: Vec<u64>) -> Self {
        Self { tokens, approx: Some(keys), ..Self::default() }
    }

    /// Token blocks are known (ids, or keys from a peer).
    pub fn known(&self) -> bool {
        self.ids.is_some() || self.given.is_some()
    }

    pub fn is_approximate(&self) -> bool {
        self.approx.is_some()
    }

    /// The approximate keys, for a prompt known only by its text.
    pub fn approx_keys(&self) -> Option<&[u64]> {
        self.approx.as_deref()
    }

    /// Chained block keys at block size `bs` (empty when unknown at that size: keys a peer sent
    /// at another size cannot be recut).
    pub fn keys(&mut self, bs: u32) -> &[u64] {
        if matches!(&self.given, Some((b, _)) if *b == bs) {
            return self.given.as_ref().map(|(_, k)| k.as_slice()).unwrap_or_default();
        }
        let Some(ids) = &self.ids else { return &[] };
        let at = match self.computed.iter().position(|(b, _)| *b == bs) {
            Some(at) => at,
            None => {
                self.computed.push((bs, blocks::block_keys(self.seed, ids, bs as usize)));
                self.computed.len() - 1
            }
        };
        &self.computed[at].1
    }

    /// Each of `labels`' engines' rank for this prompt's prefix (`affinity::prefix_ranks` of its
    /// `affinity::placement_key` at block size `bs`, or of its approximate keys), or `None` when
    /// the prompt has no full block.
    pub fn placement_ranks(&mut self, bs: u32, labels: &[String]) -> Option<Vec<u64>> {
        let key = match &self.approx {
            Some(approx) => crate::affinity::placement_key(approx, blocks::APPROX_CHUNK_TOKENS),
            None => crate::affinity::placement_key(self.keys(bs), bs),
        }?;
        Some(crate::affinity::prefix_ranks(key, labels))
    }

    /// Keys at `bs` owned, and kept as the prompt's given keys from now on (a placement query
    /// and the cells' affinity key need the mesh-wide block size).
    pub fn pin(&mut self, bs: u32) -> &[u64] {
        if !matches!(&self.given, Some((b, _)) if *b == bs) {
            let keys = self.keys(bs).to_vec();
            self.given = Some((bs, keys));
        }
        self.given.as_ref().map(|(_, k)| k.as_slice()).unwrap_or_default()
    }
}

/// What an engine is believed to hold of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    /// Leading blocks in its GPU KV cache.
    pub blocks: usize,
    /// Blocks after those held offloaded (only an exact index knows).
    pub offloaded: usize,
    /// The block size both are counted in.
    pub block_size: u32,
}

/// Leading blocks of the prompt the engine is believed to hold, and the block size they are
/// counted in.
pub fn matched_blocks(prompt: &mut PromptKeys, f: &EngineFacts<'_>, now_ms: u64) -> (usize, u32) {
    let m = prompt_match(prompt, f, now_ms);
    (m.blocks, m.block_size)
}

/// What the engine is believed to hold of the prompt, on its GPU and offloaded.
pub fn prompt_match(prompt: &mut PromptKeys, f: &EngineFacts<'_>, now_ms: u64) -> Match {
    let history = |keys: &[u64]| f.history.map_or(0, |h| h.matched_blocks(keys, now_ms));
    if let Some(approx) = &prompt.approx {
        let matched = match f.cache {
            Cache::Summary { shards, stride } => summary::matched_blocks(shards, approx, stride).max(history(approx)),
            _ => history(approx),
        };
        return Match { blocks: matched, offloaded: 0, block_size: blocks::APPROX_CHUNK_TOKENS };
    }
    if !prompt.known() {
        return Match { blocks: 0, offloaded: 0, block_size: f.block_size };
    }
    let keys = prompt.keys(f.block_size);
    let (matched, offloaded) = match f.cache {
        Cache::Index(index) => {
            let on_gpu = index.matched_blocks(keys);
            let offloaded = index.offloaded_after(keys, on_gpu);
            // Being prefilled there now: held as soon as its events arrive.
            let pending = f.pending.map_or(0, |p| p.matched_blocks(keys, now_ms));
            if pending > on_gpu + offloaded {
                (pending, 0)
            } else {
                (on_gpu, offloaded)
            }
        }
        Cache::Resyncing => (0, 0),
        Cache::Summary { shards, stride } => (summary::matched_blocks(shards, keys, stride).max(history(keys)), 0),
        Cache::Unobserved => (history(keys), 0),
    };
    Match { blocks: matched, offloaded, block_size: f.block_size }
}

/// One engine's candidate for `prompt`.
pub fn estimate(prompt: &mut PromptKeys, f: &EngineFacts<'_>, now_ms: u64) -> Estimate {
    let m = prompt_match(prompt, f, now_ms);
    let (running, waiting) = f.open.queue(&f.load);
    Estimate {
        usable: f.usable,
        rtt_ms: f.rtt_ms,
        running,
        waiting,
        kv_usage: f.load.kv_usage,
        matched_blocks: m.blocks,
        offloaded_blocks: m.offloaded,
        block_size: m.block_size,
        fit: f.fit,
    }
}

/// The decision for one request, by index into the facts it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub index: usize,
    pub reason: RouteReason,
    pub predicted_ms: f64,
    pub runner_up: Option<(usize, f64)>,
    /// Leading prompt blocks the chosen engine is believed to hold, counted in `block_size`.
    pub matched_blocks: usize,
    /// Blocks after those it holds offloaded (its engine reports them as cached too).
    pub offloaded_blocks: usize,
    pub block_size: u32,
    /// Prefill elsewhere, decode on `index`, when splitting is predicted faster.
    pub split: Option<Split>,
}

/// How a router weighs its candidates.
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    pub mode: Mode,
    pub weights: &'a ScoreWeights,
    pub pd: &'a PdSettings,
}

/// Scores every engine in `facts` for `prompt` and picks one (`route::pick`), or `None` when
/// none is usable. A split is considered only when `may_split` and the prompt's blocks are
/// known. `prefer` (an index into `facts`) wins among near-equals.
pub fn decide(
    rules: Rules<'_>,
    prompt: &mut PromptKeys,
    facts: &[EngineFacts<'_>],
    now_ms: u64,
    may_split: bool,
    prefer: crate::score::Prefer<'_>,
    draw: impl FnMut(usize) -> usize,
) -> Option<Decision> {
    let mut cands: Vec<Estimate> = facts.iter().map(|f| estimate(prompt, f, now_ms)).collect();
    // A prefix some engine is believed to hold settles by its cache: placement ranks would send
    // all of a hot prefix's requests to one engine of those holding it, from every node at once.
    let prefer = match prefer {
        crate::score::Prefer::Placed(_)
            if cands.iter().any(|c| c.usable && holds_placement_prefix(prompt.tokens, c)) =>
        {
            crate::score::Prefer::Nothing
        }
        p => p,
    };
    let roles: Vec<Role> = facts.iter().map(|f| f.role).collect();
    let rules = route::Rules { mode: rules.mode, weights: rules.weights, pd: rules.pd };
    let may_split = may_split && prompt.known();
    let picked = route::pick(rules, prompt.tokens, &mut cands, &roles, may_split, prefer, draw)?;
    let matched = cands[picked.choice.index].matched_blocks;
    let offloaded_blocks = cands[picked.choice.index].offloaded_blocks;
    let block_size = cands[picked.choice.index].block_size;
    let reason = RouteReason::of_match(matched, prompt.is_approximate(), prompt.known());
    Some(Decision {
        index: picked.choice.index,
        reason,
        predicted_ms: picked.choice.predicted_ms,
        runner_up: picked.choice.runner_up,
        matched_blocks: matched,
        offloaded_blocks,
        block_size,
        split: picked.split,
    })
}

/// Whether a candidate is believed to hold a prompt's prefix to its placement depth
/// (`affinity::PLACEMENT_DEPTH_TOKENS`, or all of a shorter prompt's full blocks).
fn holds_placement_prefix(prompt_tokens: usize, c: &Estimate) -> bool {
    let bs = c.block_size.max(1) as usize;
    let want = crate::affinity::PLACEMENT_DEPTH_TOKENS.min(prompt_tokens / bs * bs);
    want > 0 && c.matched_blocks * bs >= want
}

/// The cached prompt tokens an engine reports (`usage.prompt_tokens_details.cached_tokens`)
/// when it holds `matched_blocks` leading blocks of a `prompt_tokens`-token prompt: whole blocks,
/// and never the last token (vLLM recomputes it, so a fully cached prompt reports one block
/// less when its length is a multiple of the block size).
pub fn expected_cached_tokens(prompt_tokens: usize, matched_blocks: usize, block_size: u32) -> usize {
    let bs = block_size.max(1) as usize;
    matched_blocks.min(prompt_tokens.saturating_sub(1) / bs) * bs
}

/// The round-robin baseline: among usable candidates ordered by `labels`, the `ticket`-th
/// (modulo how many there are), blind to load and cache.
pub fn round_robin(usable: &[bool], labels: &[String], ticket: u32) -> Option<usize> {
    let mut order: Vec<usize> = (0..usable.len()).filter(|&i| usable[i]).collect();
    if order.is_empty() {
        return None;
    }
    order.sort_by(|a, b| labels[*a].cmp(&labels[*b]));
    Some(order[ticket as usize % order.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix_index::IndexEvent;
    use crate::score::Prefer;

    const BS: u32 = 16;

    fn facts<'a>(cache: Cache<'a>, history: Option<&'a RoutedKeys>) -> EngineFacts<'a> {
        EngineFacts {
            usable: true,
            rtt_ms: 0.0,
            load: Load { running: 0.0, waiting: 0.0, kv_usage: 0.2 },
            open: Open::Mine(0),
            cache,
            history,
            pending: None,
            block_size: BS,
            role: Role::Both,
            fit: None,
        }
    }

    fn prompt(blocks_n: usize) -> PromptKeys {
        let ids: Vec<u32> = (0..(blocks_n as u32 * BS)).collect();
        PromptKeys::from_ids(blocks::chain_seed("m", None, None), ids)
    }

    fn index_holding(keys: &[u64]) -> EngineIndex {
        let seed = blocks::chain_seed("m", None, None);
        let mut index = EngineIndex::new(seed);
        let ids: Vec<u32> = (0..(keys.len() as u32 * BS)).collect();
        let block_hashes = (0..keys.len() as u64).collect();
        index.apply(IndexEvent::Stored {
            block_hashes,
            parent: None,
            token_ids: ids,
            block_size: BS,
            salt: None,
            adapter: None,
            tier: crate::prefix_index::Tier::Gpu,
        });
        index
    }

    #[test]
    fn each_cache_view_counts_its_own_evidence() {
        let mut p = prompt(8);
        let keys = p.keys(BS).to_vec();
        let index = index_holding(&keys[..5]);
        let mut history = RoutedKeys::new(60_000, 1_000);
        history.record(&keys[..3], 0);
        let shards: Vec<Option<Arc<BloomShard>>> =
            summary::build(keys[..6].iter().copied(), 100, 1).into_iter().map(|s| Some(Arc::new(s))).collect();
        let summary = Cache::Summary { shards: &shards, stride: 1 };
        // (cache, history, expected): the exact index ignores history; a summary takes the
        // larger of the two; resyncing counts nothing; unobserved counts only history.
        let table: [(Cache<'_>, Option<&RoutedKeys>, usize); 6] = [
            (Cache::Index(&index), Some(&history), 5),
            (Cache::Resyncing, Some(&history), 0),
            (summary, None, 6),
            (summary, Some(&history), 6),
            (Cache::Unobserved, Some(&history), 3),
            (Cache::Unobserved, None, 0),
        ];
        for (i, (cache, h, want)) in table.into_iter().enumerate() {
            assert_eq!(matched_blocks(&mut p, &facts(cache, h), 10), (want, BS), "row {i}");
        }
    }

    #[test]
    fn a_prompt_being_prefilled_counts_as_held_until_its_events_can_show_it() {
        let mut p = prompt(8);
        let keys = p.keys(BS).to_vec();
        let index = index_holding(&keys[..2]);
        let mut pending = RoutedKeys::new(crate::route_history::PENDING_MS, 100);
        pending.record(&keys[..6], 1_000);
        let f = EngineFacts { pending: Some(&pending), ..facts(Cache::Index(&index), None) };
        assert_eq!(matched_blocks(&mut p, &f, 1_500).0, 6, "routed here half a second ago");
        let later = 1_000 + crate::route_history::PENDING_MS;
        assert_eq!(matched_blocks(&mut p, &f, later).0, 2, "after that, only the index tells");
        // A resyncing index counts nothing, pending or not.
        let f = EngineFacts { pending: Some(&pending), ..facts(Cache::Resyncing, None) };
        assert_eq!(matched_blocks(&mut p, &f, 1_500).0, 0);
    }

    #[test]
    fn expired_history_is_no_evidence() {
        let mut p = prompt(4);
        let keys = p.keys(BS).to_vec();
        let mut history = RoutedKeys::new(1_000, 1_000);
        history.record(&keys, 0);
        assert_eq!(matched_blocks(&mut p, &facts(Cache::Unobserved, Some(&history)), 500).0, 4);
        assert_eq!(matched_blocks(&mut p, &facts(Cache::Unobserved, Some(&history)), 5_000).0, 0);
    }

    #[test]
    fn approximate_keys_match_history_beside_and_summaries_of_peers() {
        let approx = blocks::text_chunk_keys(1, &["user", &"x".repeat(4096)]);
        let mut p = PromptKeys::approximate(1024, approx.clone());
        let mut history = RoutedKeys::new(60_000, 1_000);
        history.record(&approx, 0);
        let index = index_holding(&approx);
        let got = matched_blocks(&mut p, &facts(Cache::Index(&index), Some(&history)), 1);
        assert_eq!(got, (approx.len(), blocks::APPROX_CHUNK_TOKENS), "approximate keys never meet an exact index");
        assert_eq!(matched_blocks(&mut p, &facts(Cache::Index(&index), None), 1).0, 0);
        let shards: Vec<Option<Arc<BloomShard>>> =
            summary::build(approx.iter().copied(), 100, 1).into_iter().map(|s| Some(Arc::new(s))).collect();
        let peer = facts(Cache::Summary { shards: &shards, stride: 1 }, None);
        assert_eq!(matched_blocks(&mut p, &peer, 1).0, approx.len());
    }

    #[test]
    fn keys_from_a_peer_cannot_be_recut_at_another_block_size() {
        let mut p = PromptKeys::from_keys(64, 16, vec![1, 2, 3, 4]);
        assert_eq!(p.keys(16), &[1, 2, 3, 4]);
        assert!(p.keys(32).is_empty());
        let mut q = prompt(4);
        assert_eq!(q.keys(32).len(), 2);
        assert_eq!(q.pin(32).len(), 2);
        assert_eq!(q.keys(16).len(), 4, "ids still cut at any size");
    }

    #[test]
    fn unreported_in_flight_counts_as_waiting_except_for_an_oracle() {
        let mut p = prompt(1);
        let mut f = facts(Cache::Unobserved, None);
        f.load = Load { running: 2.0, waiting: 1.0, kv_usage: 0.1 };
        // (open requests, expected running and waiting)
        let table = [
            // A peer's engine: this router's 5 beyond the 2 reported running may be unreported.
            (Open::Mine(5), 2.0, 4.0),
            (Open::Mine(1), 2.0, 1.0),
            // An oracle reads the truth.
            (Open::Known, 2.0, 1.0),
            // An engine beside the router: its 3 open requests are the 2 running and 1 waiting
            // reported, not one more waiting (it was counted twice before).
            (Open::All(3), 2.0, 1.0),
            // Two more arrived since the report; one finished: 4 open.
            (Open::All(4), 2.0, 2.0),
            // The report predates completions: fewer open than it says run.
            (Open::All(1), 1.0, 0.0),
        ];
        for (open, running, waiting) in table {
            f.open = open;
            let e = estimate(&mut p, &f, 0);
            assert_eq!((e.running, e.waiting), (running, waiting), "{open:?}");
        }
    }

    #[test]
    fn a_node_reports_arrivals_as_waiting_only_where_its_engine_was_queueing() {
        let queueing = Load { running: 2.0, waiting: 1.0, kv_usage: 0.1 };
        let with_room = Load { running: 2.0, waiting: 0.0, kv_usage: 0.1 };
        // (open requests, last scrape, reported running and waiting)
        let table = [
            (3, queueing, 2.0, 1.0),
            (5, queueing, 2.0, 3.0),
            (1, queueing, 0.0, 1.0),
            (5, with_room, 5.0, 0.0),
            (1, with_room, 1.0, 0.0),
        ];
        for (open, load, running, waiting) in table {
            assert_eq!(reported_queue(open, &load), (running, waiting), "{open} open, {load:?}");
        }
    }

    fn rules<'a>(mode: Mode, w: &'a ScoreWeights, pd: &'a PdSettings) -> Rules<'a> {
        Rules { mode, weights: w, pd }
    }

    #[test]
    fn decisions_name_their_reason() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let mut p = prompt(400);
        let keys = p.keys(BS).to_vec();
        let index = index_holding(&keys[..300]);
        let mut busy = facts(Cache::Index(&index), None);
        busy.load.waiting = 1.0;
        let idle = facts(Cache::Unobserved, None);
        let table: [(Mode, RouteReason, usize); 2] =
            [(Mode::Kvmesh, RouteReason::Prefix, 0), (Mode::LeastLoad, RouteReason::Load, 1)];
        for (mode, reason, index) in table {
            let d = decide(rules(mode, &w, &pd), &mut p, &[busy, idle], 0, false, crate::score::Prefer::Nothing, |_| 0)
                .expect("usable");
            assert_eq!((d.reason, d.index), (reason, index), "{mode:?}");
        }
        let mut unknown = PromptKeys::default();
        let d =
            decide(rules(Mode::Kvmesh, &w, &pd), &mut unknown, &[idle], 0, false, crate::score::Prefer::Nothing, |_| 0)
                .expect("usable");
        assert_eq!(d.reason, RouteReason::LoadNoTokenizer);
        let mut approx = PromptKeys::approximate(100, vec![7, 8]);
        let mut history = RoutedKeys::new(60_000, 100);
        history.record(&[7, 8], 0);
        let held = facts(Cache::Unobserved, Some(&history));
        let d =
            decide(rules(Mode::Kvmesh, &w, &pd), &mut approx, &[held], 0, false, crate::score::Prefer::Nothing, |_| 0)
                .expect("usable");
        assert_eq!(d.reason, RouteReason::PrefixApprox);
    }

    #[test]
    fn placement_ranks_a_cold_prefix_and_a_held_one_settles_by_its_cache() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let mut p = prompt(64);
        let keys = p.keys(BS).to_vec();
        let cold = facts(Cache::Unobserved, None);
        // Nobody holds it: the highest-ranked of the near-equals wins, whatever the draw.
        for ranks in [[1, 9, 5], [9, 1, 5], [1, 5, 9]] {
            let d = decide(rules(Mode::Kvmesh, &w, &pd), &mut p, &[cold; 3], 0, false, Prefer::Placed(&ranks), |_| 0)
                .expect("usable");
            assert_eq!(d.index, ranks.iter().position(|&r| r == 9).unwrap());
        }
        // Two engines hold it past the placement depth: the draw decides between them, not
        // the ranks (which favour the third, cold one, and the first holder).
        let held = index_holding(&keys[..40]);
        let warm = facts(Cache::Index(&held), None);
        let mut draws = [1usize, 1].into_iter();
        let d = decide(
            rules(Mode::Kvmesh, &w, &pd),
            &mut p,
            &[warm, warm, cold],
            0,
            false,
            Prefer::Placed(&[5, 1, 9]),
            |_| draws.next().unwrap_or(0),
        )
        .expect("usable");
        assert_eq!(d.index, 1, "drawn among the holders");
    }

    #[test]
    fn nothing_usable_is_no_decision() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let mut f = facts(Cache::Unobserved, None);
        f.usable = false;
        assert!(decide(
            rules(Mode::Kvmesh, &w, &pd),
            &mut prompt(1),
            &[f],
            0,
            true,
            crate::score::Prefer::Nothing,
            |_| 0
        )
        .is_none());
    }

    #[test]
    fn a_nearer_engine_wins_among_equals_and_a_preferred_one_wins_ties() {
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let near = facts(Cache::Unobserved, None);
        let far = EngineFacts { rtt_ms: 30.0, ..near };
        let d = decide(
            rules(Mode::Kvmesh, &w, &pd),
            &mut prompt(2),
            &[far, near],
            0,
            false,
            crate::score::Prefer::Nothing,
            |_| 0,
        )
        .expect("usable");
        assert_eq!(d.index, 1);
        let d = decide(
            rules(Mode::Kvmesh, &w, &pd),
            &mut prompt(2),
            &[near, near],
            0,
            false,
            crate::score::Prefer::Candidate(1),
            |_| 0,
        )
        .expect("usable");
        assert_eq!(d.index, 1);
    }

    #[test]
    fn cached_tokens_are_whole_blocks_short_of_the_last_token() {
        assert_eq!(expected_cached_tokens(100, 3, 16), 48);
        assert_eq!(expected_cached_tokens(64, 4, 16), 48, "a full hit recomputes the last block");
        assert_eq!(expected_cached_tokens(65, 4, 16), 64);
        assert_eq!(expected_cached_tokens(0, 2, 16), 0);
    }

    #[test]
    fn round_robin_cycles_usable_engines_in_label_order() {
        let labels: Vec<String> = ["b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let usable = [true, true, false];
        let picks: Vec<usize> = (0..4).filter_map(|t| round_robin(&usable, &labels, t)).collect();
        assert_eq!(picks, vec![1, 0, 1, 0]);
        assert_eq!(round_robin(&[false], &labels[..1], 0), None);
    }
}
