//! Choosing an engine for a request, among this node's engines and its peers'.
//!
//! So far: least load among healthy engines that serve the model. Prefix- and latency-aware
//! scoring replaces this in the routing work (see ARCHITECTURE.md).

/// What the router knows about one candidate engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Requests the engine reported running and waiting (a scrape for local engines, gossip
    /// for peers'), plus requests this node has sent it and not seen finish. This node's own
    /// recent requests are counted at once, before gossip catches up, which keeps a burst from
    /// herding onto one engine whose reported load is stale.
    pub load: f64,
    /// Extra cost of reaching the engine (a network hop to a peer). Breaks ties toward local
    /// engines without outweighing a real load difference.
    pub distance: f64,
    pub healthy: bool,
    pub serves_model: bool,
}

/// Index of the least-loaded usable candidate, or `None` if none is usable. Exact ties go to the
/// lowest `tie_break` value so callers can rotate among equals instead of piling on index 0.
pub fn least_loaded(candidates: &[Candidate], tie_break: impl Fn(usize) -> u64) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy && c.serves_model)
        .min_by(|(i, a), (j, b)| {
            (a.load + a.distance).total_cmp(&(b.load + b.distance)).then_with(|| tie_break(*i).cmp(&tie_break(*j)))
        })
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(load: f64, healthy: bool, serves_model: bool) -> Candidate {
        Candidate { load, distance: 0.0, healthy, serves_model }
    }

    #[test]
    fn skips_unusable_and_picks_least() {
        let cs = [c(0.0, false, true), c(5.0, true, true), c(2.0, true, true), c(0.0, true, false)];
        assert_eq!(least_loaded(&cs, |i| i as u64), Some(2));
        assert_eq!(least_loaded(&[c(0.0, false, true)], |i| i as u64), None);
    }

    #[test]
    fn ties_follow_tie_break() {
        let cs = [c(1.0, true, true), c(1.0, true, true)];
        assert_eq!(least_loaded(&cs, |i| if i == 1 { 0 } else { 1 }), Some(1));
    }

    #[test]
    fn distance_breaks_ties_but_not_load() {
        let local = c(3.0, true, true);
        let remote = Candidate { distance: 0.5, ..c(3.0, true, true) };
        assert_eq!(least_loaded(&[remote.clone(), local.clone()], |i| i as u64), Some(1));
        let idle_remote = Candidate { load: 1.0, ..remote };
        assert_eq!(least_loaded(&[local, idle_remote], |i| i as u64), Some(1));
    }
}
