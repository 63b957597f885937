//! Choosing an engine for a request.
//!
//! So far: least load among healthy engines that serve the model. Prefix- and latency-aware
//! scoring across the mesh replaces this in the routing work (see ARCHITECTURE.md).

/// What the router knows about one candidate engine.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Requests this node has sent to the engine and not yet seen finish.
    pub in_flight: u32,
    /// `vllm:num_requests_waiting` from the engine's last scrape (0 if unknown).
    pub waiting: u32,
    pub healthy: bool,
    pub serves_model: bool,
}

/// Index of the least-loaded usable candidate, or `None` if none is usable. Ties go to the
/// lowest `tie_break` value so callers can rotate among equals instead of piling on index 0.
pub fn least_loaded(candidates: &[Candidate], tie_break: impl Fn(usize) -> u64) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.healthy && c.serves_model)
        .min_by_key(|(i, c)| (c.in_flight + c.waiting, tie_break(*i)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(in_flight: u32, healthy: bool, serves_model: bool) -> Candidate {
        Candidate { in_flight, waiting: 0, healthy, serves_model }
    }

    #[test]
    fn skips_unusable_and_picks_least() {
        let cs = [c(0, false, true), c(5, true, true), c(2, true, true), c(0, true, false)];
        assert_eq!(least_loaded(&cs, |i| i as u64), Some(2));
        assert_eq!(least_loaded(&[c(0, false, true)], |i| i as u64), None);
    }

    #[test]
    fn ties_follow_tie_break() {
        let cs = [c(1, true, true), c(1, true, true)];
        assert_eq!(least_loaded(&cs, |i| if i == 1 { 0 } else { 1 }), Some(1));
    }
}
