//! Cells: how a large mesh stays cheap to gossip and still sends each prefix where it is cached.
//!
//! Flat gossip costs every node O(N): chitchat's digests name every member each round, and every
//! node must hear every other node's load and KV summary. Beyond a few dozen nodes that either
//! exceeds a sane bandwidth or, with intervals stretched to fit, goes stale enough that routing
//! falls to least-load's level (BENCHMARKS.md, *Cluster simulator*). So a large mesh is split
//! into cells (a rack, a zone, ~16 nodes): within a cell, full gossip and the usual scoring;
//! between cells, only each cell's aggregate load.
//!
//! A request's prefix has a **home cell**, chosen by rendezvous hashing of its affinity key (the
//! chain key of the block at depth `affinity_blocks`, or the last full block of a shorter
//! prompt) over the cells' names. Every node computes the same home from the same table, so all
//! requests sharing their first `affinity_blocks` blocks meet in one cell and its caches, with no
//! prefix directory at all. What two requests share beyond that depth they share in the home;
//! what they share below it and no further is the only cache a mis-placed request can lose.
//!
//! Load is bounded as in consistent hashing with bounded loads: a cell whose load per engine is
//! above `1 + load_slack` times the mesh's mean (plus one request of headroom) passes a share of
//! its requests on to the next cell in that prefix's rendezvous order, a share that grows with
//! the excess. The order is the same everywhere, so a spilled prefix warms one second cell, not
//! all of them; the share is random rather than all-or-nothing because every node acts on the
//! same gossiped aggregate, and a hard threshold would make them all switch at once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CellSettings {
    /// Depth, in blocks, of the key that picks a prefix's home cell. Deeper keeps requests
    /// that share less apart; shallower piles unrelated prompts that share a short preamble
    /// (a chat template, a common system prompt) onto one cell, which only load spilling then
    /// spreads. 32 blocks of 16 tokens: at most 512 tokens of prefix lost by a mis-placement.
    pub affinity_blocks: usize,
    /// How far above the mean load per engine a cell may run before it passes requests on.
    /// Generous by default: under a uniform load, cells of 16 engines swing 50% around the mean
    /// within seconds (prefill bursts), and spilling on such swings sends prefixes to cells
    /// that must compute them again (the cluster simulator lost 5 points of hit rate and a
    /// fifth of its TTFT p90 at 0.25). The spill is for sustained skew: a hot tenant.
    pub load_slack: f64,
    /// How long a home node counts a request it placed for another cell's origin as in flight
    /// on the engine it chose. The origin, not the home node, proxies that request, so the home
    /// node never sees it end; what it needs is to not send the next prompts to the same engine
    /// before that engine's gossiped load shows the request (a load round and a few gossip
    /// rounds, well under a second on the defaults).
    pub placement_lease_ms: u64,
}

impl Default for CellSettings {
    fn default() -> Self {
        Self { affinity_blocks: 32, load_slack: 1.0, placement_lease_ms: 1_000 }
    }
}

impl CellSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.affinity_blocks == 0 {
            return Err("cells.affinity_blocks must be at least 1".into());
        }
        if !(self.load_slack.is_finite() && self.load_slack > 0.0) {
            return Err("cells.load_slack must be above 0 (1.0: a cell may run at twice the mean)".into());
        }
        Ok(())
    }
}

/// When a home node placed requests on one engine for origins in other cells, so it can count
/// them as in flight for a lease (`CellSettings::placement_lease_ms`). Times are milliseconds on
/// any monotonic clock.
#[derive(Debug, Default, Clone)]
pub struct Placements {
    at: std::collections::VecDeque<u64>,
}

impl Placements {
    pub fn record(&mut self, now_ms: u64) {
        self.at.push_back(now_ms);
    }

    /// Placements younger than `lease_ms`; older ones are forgotten.
    pub fn live(&mut self, now_ms: u64, lease_ms: u64) -> u32 {
        while self.at.front().is_some_and(|&t| now_ms.saturating_sub(t) >= lease_ms) {
            self.at.pop_front();
        }
        self.at.len() as u32
    }
}

/// What a router knows of one cell: from the cells table its gateways gossip.
#[derive(Debug, Clone, PartialEq)]
pub struct CellLoad<'a> {
    pub name: &'a str,
    /// Engines that serve whole requests.
    pub engines: u32,
    /// Requests running and waiting on those engines, summed.
    pub load: f64,
}

/// The key that decides a prompt's home: the chain key of block `affinity_blocks` (1-based), or
/// of the last full block of a shorter prompt; `None` for a prompt shorter than one block.
pub fn affinity_key(keys: &[u64], settings: &CellSettings) -> Option<u64> {
    crate::blocks::key_at_depth(keys, settings.affinity_blocks)
}

/// Rendezvous weight of `cell` for `key`: stable across processes, versions and platforms, as
/// every node must agree on it.
pub fn weight(key: u64, cell: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(cell.as_bytes(), key)
}

/// The cell that should serve a prompt with affinity key `key`, as an index into `cells`;
/// `None` when no cell has engines. `draw` returns a uniform number in [0, 1) for the load
/// spill.
pub fn home(key: u64, cells: &[CellLoad<'_>], settings: &CellSettings, mut draw: impl FnMut() -> f64) -> Option<usize> {
    let engines: u32 = cells.iter().map(|c| c.engines).sum();
    if engines == 0 {
        return None;
    }
    let mean = cells.iter().map(|c| c.load.max(0.0)).sum::<f64>() / engines as f64;
    let bound = (1.0 + settings.load_slack) * mean + 1.0;
    let mut order: Vec<usize> = (0..cells.len()).filter(|&i| cells[i].engines > 0).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(weight(key, cells[i].name)));
    let last = *order.last()?;
    order
        .into_iter()
        .find(|&i| {
            let per_engine = cells[i].load.max(0.0) / cells[i].engines as f64;
            let excess = per_engine / bound - 1.0;
            excess <= 0.0 || draw() >= (excess / settings.load_slack).min(1.0)
        })
        .or(Some(last))
}

/// The member of the home cell that a prompt with affinity key `key` is sent to: the highest
/// rendezvous weight among `members` (`(id, name)`). Every request of a prefix from outside the
/// cell reaches the same node, which then routes all of them with its own exact in-flight
/// counts and usually serves them from its own engine's cache.
pub fn member<'a, T>(key: u64, members: impl IntoIterator<Item = (T, &'a str)>) -> Option<T> {
    members.into_iter().max_by_key(|(_, name)| weight(key, name)).map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells(loads: &[f64]) -> (Vec<String>, Vec<f64>) {
        ((0..loads.len()).map(|i| format!("cell-{i}")).collect(), loads.to_vec())
    }

    fn table<'a>(names: &'a [String], loads: &[f64]) -> Vec<CellLoad<'a>> {
        names.iter().zip(loads).map(|(n, l)| CellLoad { name: n, engines: 16, load: *l }).collect()
    }

    #[test]
    fn affinity_key_is_the_block_at_depth_or_the_last_one() {
        let s = CellSettings { affinity_blocks: 3, ..Default::default() };
        assert_eq!(affinity_key(&[1, 2, 3, 4, 5], &s), Some(3));
        assert_eq!(affinity_key(&[1, 2], &s), Some(2));
        assert_eq!(affinity_key(&[], &s), None);
    }

    #[test]
    fn homes_spread_evenly_and_agree_everywhere() {
        let (names, loads) = cells(&[10.0; 8]);
        let t = table(&names, &loads);
        let s = CellSettings::default();
        let mut counts = [0usize; 8];
        for key in 0..8000u64 {
            let h = home(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), &t, &s, || 0.5).expect("cells");
            counts[h] += 1;
            // A router with the table in another order agrees on the cell.
            let mut rev = t.clone();
            rev.reverse();
            let r = home(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), &rev, &s, || 0.5).expect("cells");
            assert_eq!(rev[r].name, t[h].name);
        }
        assert!(counts.iter().all(|&c| (850..1150).contains(&c)), "{counts:?}");
    }

    #[test]
    fn removing_a_cell_moves_only_its_own_prefixes() {
        let (names, loads) = cells(&[10.0; 8]);
        let all = table(&names, &loads);
        let fewer: Vec<_> = all.iter().filter(|c| c.name != "cell-3").cloned().collect();
        let s = CellSettings::default();
        for key in 0..2000u64 {
            let a = all[home(key, &all, &s, || 0.5).expect("cells")].name;
            let b = fewer[home(key, &fewer, &s, || 0.5).expect("cells")].name;
            assert!(a == b || a == "cell-3", "{key}: {a} -> {b}");
        }
    }

    #[test]
    fn an_overloaded_cell_spills_a_share_growing_with_its_excess_to_one_next_cell() {
        let s = CellSettings { load_slack: 0.25, ..Default::default() };
        let key = 42;
        // 5 requests per engine everywhere.
        let (names, loads) = cells(&[80.0; 4]);
        let first = home(key, &table(&names, &loads), &s, || 0.0).expect("cells");
        let spill_share = |overload: f64| {
            let mut l = loads.clone();
            l[first] = overload;
            let t = table(&names, &l);
            let mut seconds = std::collections::HashSet::new();
            let mut spilled = 0;
            for i in 0..1000 {
                let h = home(key, &t, &s, || (i as f64 + 0.5) / 1000.0).expect("cells");
                if h != first {
                    spilled += 1;
                    seconds.insert(h);
                }
            }
            assert!(seconds.len() <= 1, "a spilled prefix goes to one next cell");
            spilled
        };
        // The first cell at 7 per engine: mean 5.5, bound 7.9, no spill. At 9: bound 8.5, a
        // quarter spills; at 10 about half; at 20 all.
        assert_eq!(spill_share(80.0), 0, "at the mean nothing spills");
        assert_eq!(spill_share(16.0 * 7.0), 0, "within the slack nothing spills");
        let some = spill_share(16.0 * 9.0);
        let more = spill_share(16.0 * 10.0);
        assert!((150..350).contains(&some) && (450..650).contains(&more), "{some} {more}");
        assert_eq!(spill_share(16.0 * 20.0), 1000);
    }

    #[test]
    fn placements_count_while_their_lease_runs() {
        let mut p = Placements::default();
        p.record(1_000);
        p.record(1_400);
        assert_eq!(p.live(1_500, 1_000), 2);
        assert_eq!(p.live(2_000, 1_000), 1, "the first one's lease ended at 2,000 ms");
        assert_eq!(p.live(2_400, 1_000), 0);
        p.record(3_000);
        assert_eq!(p.live(3_000, 0), 0, "a lease of 0 counts nothing");
    }

    #[test]
    fn cells_without_engines_are_never_home() {
        let names = ["edge".to_string(), "gpu".to_string()];
        let t = vec![
            CellLoad { name: &names[0], engines: 0, load: 0.0 },
            CellLoad { name: &names[1], engines: 4, load: 1e6 },
        ];
        for key in 0..100 {
            assert_eq!(home(key, &t, &CellSettings::default(), || 0.0), Some(1));
        }
        assert_eq!(home(1, &t[..1], &CellSettings::default(), || 0.0), None);
    }
}
