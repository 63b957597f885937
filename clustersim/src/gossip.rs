//! How the cluster simulator models gossip: when a published value reaches the other nodes, and
//! what it costs in bytes.
//!
//! kvmesh gossips with chitchat: every `interval` each node exchanges digests and deltas with
//! `fanout` peers. Two figures from `kvmesh bench gossip` (real QUIC endpoints and the real
//! membership code, BENCHMARKS.md "Gossip convergence and bandwidth", 300 ms interval) calibrate
//! the model:
//! - Delay: an update reached every node in 2.0, 2.1 and 2.6 rounds at p50 for 10, 50 and 100
//!   nodes. `rounds = 1 + 0.6 × log_{fanout+1}(N)` gives 2.0, 2.7 and 3.0: the same growth, a
//!   little pessimistic. Each publication's delay is that times a uniform factor in 0.75..1.25;
//!   every observer sees a publication at the same moment (a simplification: in reality the
//!   first peers learn it a round or two before the last).
//! - Bytes: with one load change per node per second the mesh sent 10.9, 49.1 and 94.2 KB/s per
//!   node at 10, 50 and 100 nodes. Digests are `DIGEST_BYTES_PER_MEMBER` per known member per
//!   round (fitted: 222 B), and every change must reach every node once, so a node receives
//!   (and, on average, sends) the sum of everyone else's published bytes. That gives 9.4, 47
//!   and 94 KB/s for the calibration runs.
//!
//! Not modelled: chitchat's per-message MTU, which caps how much delta one round can carry and so
//! delays large summaries further when many change at once; failures and rejoins.

use rand::Rng;

/// Digest bytes per known member per gossip round (fit to `bench gossip`). It is what six
/// digests of ~37 bytes per member cost: a node sends a digest in each of its three Syns and
/// in its SynAck to each of the ~three Syns it receives per round.
pub const DIGEST_BYTES_PER_MEMBER: f64 = 222.0;

/// Intervals that keep a node's gossip within `budget_kb_s` at `nodes` members: half the budget
/// for digests, 15% for load, 35% for KV summaries; never faster than `base`. Everything a
/// node publishes reaches every other node, so each publisher's share is the budget over the
/// number of peers: the cost of flat gossip grows with the mesh, and only slower publication
/// (staler load and summaries) keeps it bounded.
pub fn budgeted(base: &crate::Gossip, nodes: usize, budget_kb_s: f64, summary_bytes: f64) -> super::Gossip {
    let budget = budget_kb_s * 1000.0;
    let peers = nodes.saturating_sub(1).max(1) as f64;
    let gossip_interval_ms =
        base.gossip_interval_ms.max(DIGEST_BYTES_PER_MEMBER * nodes as f64 / (0.5 * budget) * 1000.0);
    // Chitchat carries a key's latest value once per round at most.
    let load_publish_interval_ms =
        base.load_publish_interval_ms.max(LOAD_BYTES * peers / (0.15 * budget) * 1000.0).max(gossip_interval_ms);
    let summary_interval_ms = base.summary_interval_ms.max(summary_bytes * peers / (0.35 * budget) * 1000.0);
    crate::Gossip { gossip_interval_ms, load_publish_interval_ms, summary_interval_ms, ..base.clone() }
}

/// Bytes of one node's gossiped `load` value with one engine (its JSON, as the node writes it).
pub const LOAD_BYTES: f64 = 180.0;

#[derive(Debug, Clone)]
pub struct GossipModel {
    pub nodes: usize,
    pub interval_ms: f64,
    pub fanout: usize,
}

impl GossipModel {
    /// Mean rounds for a publication to reach every node.
    pub fn rounds(&self) -> f64 {
        let n = self.nodes.max(2) as f64;
        1.0 + 0.6 * n.ln() / ((self.fanout + 1) as f64).ln()
    }

    /// Delay of one publication until the other nodes see it, ms.
    pub fn delay_ms(&self, rng: &mut impl Rng) -> f64 {
        self.interval_ms * self.rounds() * rng.random_range(0.75..1.25)
    }

    /// The longest `delay_ms` draws.
    pub fn max_delay_ms(&self) -> f64 {
        self.interval_ms * self.rounds() * 1.25
    }

    /// Digest bytes per node per second.
    pub fn digest_bytes_per_s(&self) -> f64 {
        DIGEST_BYTES_PER_MEMBER * self.nodes as f64 / (self.interval_ms / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_reproduces_its_calibration_runs() {
        // BENCHMARKS.md, `bench gossip`: (nodes, KB/s per node) with one ~200-byte load change
        // per node per second.
        for (n, measured) in [(10usize, 10.9), (50, 49.1), (100, 94.2)] {
            let g = GossipModel { nodes: n, interval_ms: 300.0, fanout: 3 };
            let modelled = (g.digest_bytes_per_s() + (n - 1) as f64 * 200.0) / 1000.0;
            assert!((modelled / measured - 1.0).abs() < 0.2, "{n} nodes: {modelled:.1} vs {measured}");
        }
        let g = GossipModel { nodes: 126, interval_ms: 2_000.0, fanout: 3 };
        let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(7);
        assert!((0..1000).all(|_| g.delay_ms(&mut rng) <= g.max_delay_ms()), "max_delay_ms bounds every draw");
        let small = GossipModel { nodes: 10, interval_ms: 300.0, fanout: 3 }.rounds();
        let large = GossipModel { nodes: 1000, interval_ms: 300.0, fanout: 3 }.rounds();
        assert!((1.5..2.5).contains(&small) && large > small && large < 5.0, "{small} {large}");
    }
}
