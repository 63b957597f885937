//! What a node has itself sent to one engine, as block keys with the time each was last sent:
//! the prefix evidence for engines that publish no KV events, and for prompts routed in
//! approximate mode (text-chunk keys of models with no tokenizer). An engine keeps a prefix for
//! a while after serving it, so a key counts as cached for `ttl_ms` after it was last routed
//! there; the set is bounded, dropping the least recently routed keys first.
//!
//! Time is passed in (milliseconds on any monotonic clock), like everything in `policy`.

use std::collections::{HashMap, VecDeque};

/// How long a prompt routed to an engine with KV events counts as held there before its
/// events can show it (`candidates::EngineFacts::pending`): its prefill, a step's events and
/// their delivery, with room for a queue. A prefix's next requests that arrive meanwhile (a
/// burst) follow it instead of computing it again elsewhere.
pub const PENDING_MS: u64 = 3_000;

/// Prompts kept for `PENDING_MS` per engine: a burst's worth.
pub const PENDING_MAX_KEYS: usize = 16_384;

#[derive(Debug, Clone)]
pub struct RoutedKeys {
    ttl_ms: u64,
    max_keys: usize,
    /// Key -> (when it was last routed, sequence number of that routing).
    last: HashMap<u64, (u64, u64)>,
    /// (key, sequence number) in routing order, oldest first; an entry whose number is not the
    /// key's latest is stale and skipped when it reaches the front.
    order: VecDeque<(u64, u64)>,
    seq: u64,
}

impl RoutedKeys {
    pub fn new(ttl_ms: u64, max_keys: usize) -> Self {
        Self { ttl_ms, max_keys: max_keys.max(1), last: HashMap::new(), order: VecDeque::new(), seq: 0 }
    }

    pub fn record(&mut self, keys: &[u64], now_ms: u64) {
        // Tail first: under the bound, a chain then loses its tail before its head, and what
        // is left still matches as a leading run.
        for &k in keys.iter().rev() {
            self.seq += 1;
            self.last.insert(k, (now_ms, self.seq));
            self.order.push_back((k, self.seq));
        }
        self.prune(now_ms);
    }

    /// Blocks of `keys` routed here within the TTL, counted as the leading run (a chain key
    /// stands for its whole prefix, as in the exact index).
    pub fn matched_blocks(&self, keys: &[u64], now_ms: u64) -> usize {
        keys.iter().take_while(|k| self.last.get(k).is_some_and(|&(t, _)| self.live(t, now_ms))).count()
    }

    /// Keys still within the TTL, for the node's gossiped summary.
    pub fn live_keys(&self, now_ms: u64) -> impl Iterator<Item = u64> + '_ {
        self.last.iter().filter(move |(_, &(t, _))| self.live(t, now_ms)).map(|(&k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    fn live(&self, t: u64, now_ms: u64) -> bool {
        now_ms.saturating_sub(t) < self.ttl_ms
    }

    /// Drops expired keys and, over the bound, the least recently routed ones.
    pub fn prune(&mut self, now_ms: u64) {
        while let Some(&(k, seq)) = self.order.front() {
            let Some((t, _)) = self.last.get(&k).copied().filter(|&(_, latest)| latest == seq) else {
                self.order.pop_front();
                continue;
            };
            if self.live(t, now_ms) && self.last.len() <= self.max_keys {
                break;
            }
            self.order.pop_front();
            self.last.remove(&k);
        }
        // Stale order entries of keys routed again pile up; compact when they dominate.
        if self.order.len() > 4 * self.last.len() + 1024 {
            let last = &self.last;
            self.order.retain(|(k, seq)| last.get(k).is_some_and(|(_, latest)| latest == seq));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn leading_run_within_ttl() {
        let mut r = RoutedKeys::new(1_000, 100);
        r.record(&[1, 2, 3], 0);
        assert_eq!(r.matched_blocks(&[1, 2, 3, 4], 500), 3);
        assert_eq!(r.matched_blocks(&[1, 9, 3], 500), 1);
        assert_eq!(r.matched_blocks(&[2, 3], 500), 2);
        // Routed again: its clock restarts.
        r.record(&[1], 800);
        assert_eq!(r.matched_blocks(&[1, 2], 1_200), 1);
        r.prune(1_200);
        assert_eq!(r.len(), 1);
        assert_eq!(r.matched_blocks(&[1], 1_900), 0);
    }

    #[test]
    fn bound_drops_least_recently_routed() {
        let mut r = RoutedKeys::new(u64::MAX, 3);
        r.record(&[1, 2, 3], 0);
        r.record(&[1], 1);
        r.record(&[4], 2);
        assert_eq!(r.len(), 3);
        // A chain's tail goes before its head: [1, 2] still matches as a leading run.
        assert_eq!(r.matched_blocks(&[3], 3), 0);
        assert_eq!(r.matched_blocks(&[1, 2, 3], 3), 2);
        assert_eq!(r.matched_blocks(&[4], 3), 1);
    }

    proptest! {
        /// Against a naive model: a key matches iff its latest routing is within the TTL and
        /// it is among the `max` most recently routed live keys (a call's keys routed tail first).
        #[test]
        fn agrees_with_naive_model(ops in prop::collection::vec((prop::collection::vec(0u64..20, 0..5), 0u64..50), 1..60)) {
            let (ttl, max) = (120u64, 8usize);
            let mut r = RoutedKeys::new(ttl, max);
            let mut log: Vec<(u64, u64)> = Vec::new();
            let mut now = 0;
            for (keys, dt) in ops {
                now += dt;
                r.record(&keys, now);
                log.extend(keys.iter().rev().map(|&k| (k, now)));
                let mut latest: HashMap<u64, (u64, usize)> = HashMap::new();
                for (i, &(k, t)) in log.iter().enumerate() {
                    latest.insert(k, (t, i));
                }
                let mut live: Vec<_> = latest.iter().filter(|(_, &(t, _))| now - t < ttl).map(|(&k, &(_, i))| (i, k)).collect();
                live.sort_unstable_by(|a, b| b.cmp(a));
                let kept: std::collections::HashSet<u64> = live.iter().take(max).map(|&(_, k)| k).collect();
                for k in 0..20 {
                    prop_assert_eq!(r.matched_blocks(&[k], now) == 1, kept.contains(&k), "key {}", k);
                }
            }
        }
    }
}
