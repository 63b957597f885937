//! Flow control: which requests wait at the node that received them, in what order they leave,
//! and which are refused, so that overload queues where it can be ordered, shed and prioritised
//! instead of inside vLLM.
//!
//! - **Saturation** ([`free_slots`]): an engine is saturated when its waiting queue (reported,
//!   plus this node's requests its report cannot include yet) has reached
//!   [`FlowSettings::max_waiting_per_engine`], or its KV cache is past
//!   [`FlowSettings::kv_usage_threshold`] (llm-d's saturation detector uses the same two
//!   signals). Every engine is fed by every node: this node counts only its share of the free
//!   places ([`remote_share`]), in proportion to the requests it holds against what the other
//!   nodes gossip holding.
//! - **Order** ([`FairQueue`]): strict priority between [`Priority`] bands; within a band,
//!   deficit round robin over tenants (one turn per request, more for long prompts, times the
//!   tenant's weight), so a tenant sending ten times its share waits behind itself, not in
//!   front of a quiet tenant.
//! - **Refusals** ([`Rejected`]): a tenant over its place in the queue gets 429; a full queue
//!   with no lower band to displace gets 503; a request displaced by a higher band, or whose
//!   deadline can no longer be met ([`can_meet`]), gets 503 early, never a timeout inside an
//!   engine.
//!
//! Pure: the node owns the clock, the waiting and the wake-ups.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

/// A request's priority band (llm-d's criticality levels). Higher bands always leave the queue
/// first and may displace lower ones from a full queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Shed first under overload.
    Sheddable,
    #[default]
    Standard,
    /// Never displaced; leaves the queue before every other band.
    Critical,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Standard, Priority::Sheddable];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Sheddable => "sheddable",
        }
    }

    /// A client's `x-kvmesh-priority` header value; `None` when it names no band.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "critical" | "high" => Some(Priority::Critical),
            "standard" | "normal" | "default" => Some(Priority::Standard),
            "sheddable" | "low" => Some(Priority::Sheddable),
            _ => None,
        }
    }

    /// What the client asked for, bounded by what its key allows.
    pub fn bounded(asked: Option<Self>, default: Self, max: Self) -> Self {
        asked.unwrap_or(default).min(max)
    }

    fn index(self) -> usize {
        match self {
            Priority::Critical => 0,
            Priority::Standard => 1,
            Priority::Sheddable => 2,
        }
    }
}

/// Time-to-first-token objectives per band, in ms. A held request whose objective has passed
/// is answered 503 at once: it could no longer meet it anyway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BandSlo {
    pub critical: Option<u64>,
    pub standard: Option<u64>,
    pub sheddable: Option<u64>,
}

impl BandSlo {
    pub fn of(&self, p: Priority) -> Option<u64> {
        match p {
            Priority::Critical => self.critical,
            Priority::Standard => self.standard,
            Priority::Sheddable => self.sheddable,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlowSettings {
    /// Hold requests at this node while every engine is saturated. Off: every request goes to
    /// an engine at once, and queues inside it.
    pub enabled: bool,
    /// An engine with this many requests waiting (reported, plus this node's unreported ones) is
    /// saturated. vLLM starts a waiting request as soon as a running one ends, so a few waiting
    /// keep its batch full; more only lengthen a queue nobody can reorder.
    pub max_waiting_per_engine: u32,
    /// An engine whose KV cache is this full (0..1) is saturated: more requests would preempt
    /// running ones.
    pub kv_usage_threshold: f64,
    /// Requests this node may hold, all bands and tenants together.
    pub queue_capacity: usize,
    /// Requests one tenant may hold at this node.
    pub tenant_queue_capacity: usize,
    /// The longest a request is held before it is answered 503 (its time to live), in ms.
    pub max_wait_ms: u64,
    /// Per-band TTFT objectives (a held request is shed once its band's objective has passed).
    pub slo_ms: BandSlo,
    /// In the fair queue a request costs one turn, plus one per this many prompt tokens (so a
    /// tenant of long prompts gets fewer requests per round than one of short prompts).
    pub tokens_per_turn: u64,
    /// The highest band a request may ask for (`x-kvmesh-priority`) when no API keys are
    /// configured; a key's own `max_priority` bounds it otherwise.
    pub unkeyed_max_priority: Priority,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_waiting_per_engine: 4,
            kv_usage_threshold: 0.95,
            queue_capacity: 1024,
            tenant_queue_capacity: 256,
            max_wait_ms: 30_000,
            slo_ms: BandSlo::default(),
            tokens_per_turn: 2048,
            unkeyed_max_priority: Priority::Standard,
        }
    }
}

impl FlowSettings {
    /// What is wrong with these settings, said so that an operator can fix it.
    pub fn check(&self) -> Result<(), String> {
        if self.max_waiting_per_engine == 0 {
            return Err(
                "flow.max_waiting_per_engine must be at least 1 (with 0 no request could ever leave the queue)".into(),
            );
        }
        if !(self.kv_usage_threshold > 0.0 && self.kv_usage_threshold <= 1.0) {
            return Err("flow.kv_usage_threshold must be in (0, 1]".into());
        }
        if self.queue_capacity == 0 || self.tenant_queue_capacity == 0 {
            return Err("flow.queue_capacity and flow.tenant_queue_capacity must be at least 1".into());
        }
        if self.max_wait_ms == 0 {
            return Err("flow.max_wait_ms must be at least 1".into());
        }
        if self.tokens_per_turn == 0 {
            return Err("flow.tokens_per_turn must be at least 1".into());
        }
        Ok(())
    }

    /// When a request that arrived at `arrived_ms` must have left the queue.
    pub fn deadline_ms(&self, arrived_ms: u64, p: Priority) -> u64 {
        let wait = self.slo_ms.of(p).map_or(self.max_wait_ms, |slo| slo.min(self.max_wait_ms));
        arrived_ms.saturating_add(wait)
    }
}

/// One candidate engine, as flow control sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLoad {
    pub usable: bool,
    /// One of this node's engines (its every request passes through this node's counters).
    pub local: bool,
    pub running: f64,
    pub waiting: f64,
    /// This node's requests in flight there.
    pub in_flight: u32,
    /// A peer's engine: this node's requests sent there within the last report's lag (its
    /// gossiped load cannot count them yet). 0 for this node's own engines.
    pub recent: u32,
    pub kv_usage: f64,
}

/// Places free across `engines` before they are saturated. Every engine is fed by every node
/// of the mesh, so this node counts `share` of the places an engine's report leaves, less its
/// own requests the report cannot hold yet: for its own engines, those in flight beyond what
/// the engine reports running (`route::unreported`; their reports are a poll old); for a
/// peer's, those it sent there since (`recent`; the report comes by gossip).
pub fn free_slots(engines: &[EngineLoad], s: &FlowSettings, share: f64) -> f64 {
    engines
        .iter()
        .filter(|e| e.usable && e.kv_usage < s.kv_usage_threshold)
        .map(|e| {
            let reported_free = (f64::from(s.max_waiting_per_engine) - e.waiting).max(0.0);
            let unreported = crate::route::unreported(e.in_flight, e.running);
            // An engine beside this node: its open requests past the reported running ones are
            // waiting now, the reported waiting among them (counted once, as
            // `candidates::Open::All`). A peer's engine: this node's requests it cannot have
            // reported yet.
            let mine = if e.local { (unreported - e.waiting).max(0.0) } else { unreported.max(f64::from(e.recent)) };
            (reported_free * share - mine).max(0.0)
        })
        .sum()
}

/// The `priority` an engine started with vLLM's `--scheduling-policy priority` is sent for a
/// request (lower runs first): by band, and within a band a tenant whose requests this node is
/// holding (more than its share arrives) after one whose are not. The engine then orders its
/// own waiting queue, and chooses whom to preempt, as the node orders its queue. `standard`
/// is vLLM's default 0, so a request the node did not set a priority on (another endpoint, or
/// another client of the engine) counts as standard.
pub fn engine_priority(band: Priority, backlogged: bool) -> i64 {
    let base = match band {
        Priority::Critical => -2,
        Priority::Standard => 0,
        Priority::Sheddable => 2,
    };
    base + i64::from(backlogged)
}

/// This node's share of an engine's free places: all of them when no other node holds
/// requests, else in proportion to what each holds (what peers gossip they hold). A node that
/// holds nothing still gets a small share, so that its first request is not stuck.
pub fn remote_share(held_here: u32, held_by_peers: u32, nodes: usize) -> f64 {
    if held_by_peers == 0 {
        return 1.0;
    }
    let floor = 1.0 / nodes.max(1) as f64;
    (f64::from(held_here) / f64::from(held_here + held_by_peers)).max(floor)
}

/// Whether a request `ahead` places from the front of the queue can still leave it within
/// `remaining_ms`, at the recent dispatch rate. Unknown rate: assume it can.
pub fn can_meet(ahead: usize, dispatch_per_s: f64, remaining_ms: u64) -> bool {
    if dispatch_per_s <= 0.0 || !dispatch_per_s.is_finite() {
        return true;
    }
    (ahead as f64 / dispatch_per_s) * 1000.0 <= remaining_ms as f64
}

/// Why a request was not let into the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The tenant holds its whole share of the queue: 429, its own traffic is the problem.
    TenantShare,
    /// The queue is full of requests of this band or higher: 503, no capacity.
    Full,
}

/// A request displaced from a full queue by one of a higher band: answer it 503.
pub type Displaced = u64;

#[derive(Debug)]
struct Entry {
    id: u64,
    cost: u64,
}

#[derive(Debug)]
struct TenantQueue {
    entries: VecDeque<Entry>,
    deficit: u64,
    weight: u64,
}

/// One band's tenants in deficit round robin.
#[derive(Debug, Default)]
struct Band {
    /// Tenants with held requests, in turn order (the front's turn is now).
    turn: VecDeque<String>,
    tenants: HashMap<String, TenantQueue>,
    len: usize,
}

/// The requests a node holds: bounded overall and per tenant, strict priority between bands,
/// deficit round robin over tenants within a band. Holds ids; the node keeps what they stand
/// for.
#[derive(Debug)]
pub struct FairQueue {
    bands: [Band; 3],
    capacity: usize,
    tenant_capacity: usize,
    tokens_per_turn: u64,
    held_by: HashMap<String, usize>,
}

/// A request costs at most this many turns, so that one huge prompt cannot stall its band's
/// round.
const MAX_COST_TURNS: u64 = 16;

impl FairQueue {
    pub fn new(s: &FlowSettings) -> Self {
        Self {
            bands: Default::default(),
            capacity: s.queue_capacity.max(1),
            tenant_capacity: s.tenant_queue_capacity.max(1),
            tokens_per_turn: s.tokens_per_turn.max(1),
            held_by: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.bands.iter().map(|b| b.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len_of(&self, p: Priority) -> usize {
        self.bands[p.index()].len
    }

    /// Requests `tenant` holds here.
    pub fn held_by(&self, tenant: &str) -> usize {
        self.held_by.get(tenant).copied().unwrap_or(0)
    }

    /// About how many requests leave before a new one of `tenant` (fair-share `weight`) in
    /// band `p` would: every higher band's, the tenant's own already held in `p`, and of each
    /// other tenant in `p` what its turns give it meanwhile (round robin: as many requests as
    /// the new one's tenant gets turns, scaled by their weights). A quiet tenant's request
    /// behind a noisy one's backlog is one turn away, not the whole backlog.
    pub fn ahead_of(&self, p: Priority, tenant: &str, weight: u32) -> usize {
        let higher: usize = Priority::ALL.iter().filter(|b| **b > p).map(|b| self.len_of(*b)).sum();
        let band = &self.bands[p.index()];
        let mine = band.tenants.get(tenant).map_or(0, |q| q.entries.len());
        let turns = (mine + 1) as u64;
        let w = u64::from(weight.max(1));
        let others: usize = band
            .tenants
            .iter()
            .filter(|(t, _)| t.as_str() != tenant)
            .map(|(_, q)| q.entries.len().min((turns * q.weight).div_ceil(w) as usize))
            .sum();
        higher + mine + others
    }

    /// Holds request `id` of `tenant` (fair-share `weight`, at least 1) in band `p`, with
    /// `tokens` prompt tokens. When the queue is full, the newest request of the lowest band below
    /// `p` makes room and is returned, to be answered 503.
    pub fn push(
        &mut self,
        id: u64,
        tenant: &str,
        weight: u32,
        p: Priority,
        tokens: u64,
    ) -> Result<Option<Displaced>, Rejected> {
        let mine = self.held_by(tenant);
        if mine >= self.tenant_capacity {
            return Err(Rejected::TenantShare);
        }
        let mut displaced = None;
        if self.len() >= self.capacity {
            // Over its fair part of a full queue: the tenant's own traffic is the problem.
            let tenants = self.held_by.len().max(1);
            if mine >= self.capacity.div_ceil(tenants) {
                return Err(Rejected::TenantShare);
            }
            let lowest = Priority::ALL.iter().rev().copied().find(|b| *b < p && self.len_of(*b) > 0);
            match lowest.and_then(|b| self.pop_newest(b)) {
                Some(id) => displaced = Some(id),
                None => return Err(Rejected::Full),
            }
        }
        let cost = (1 + tokens / self.tokens_per_turn).min(MAX_COST_TURNS);
        let band = &mut self.bands[p.index()];
        let weight = u64::from(weight.max(1));
        let q = band.tenants.entry(tenant.to_owned()).or_insert_with(|| {
            band.turn.push_back(tenant.to_owned());
            TenantQueue { entries: VecDeque::new(), deficit: weight, weight }
        });
        q.entries.push_back(Entry { id, cost });
        band.len += 1;
        *self.held_by.entry(tenant.to_owned()).or_insert(0) += 1;
        Ok(displaced)
    }

    /// The request that leaves next, removed from the queue: the highest band's, and within it
    /// the tenant whose turn it is, while its deficit covers its request's cost.
    pub fn pop(&mut self) -> Option<u64> {
        let p = Priority::ALL.iter().copied().find(|p| self.len_of(*p) > 0)?;
        let band = &mut self.bands[p.index()];
        // Terminates: every pass credits the tenant at the front, and costs are capped.
        loop {
            let name = band.turn.front()?.clone();
            let q = band.tenants.get_mut(&name)?;
            match q.entries.front() {
                Some(e) if q.deficit >= e.cost => {
                    let e = q.entries.pop_front()?;
                    q.deficit -= e.cost;
                    band.len -= 1;
                    if q.entries.is_empty() {
                        band.tenants.remove(&name);
                        band.turn.pop_front();
                    }
                    self.release(&name);
                    return Some(e.id);
                }
                Some(_) => {
                    q.deficit = q.deficit.saturating_add(q.weight);
                    band.turn.rotate_left(1);
                }
                None => {
                    band.tenants.remove(&name);
                    band.turn.pop_front();
                }
            }
        }
    }

    /// Takes request `id` out (its deadline passed, or its client left). False when it was not
    /// held (it already left).
    pub fn remove(&mut self, id: u64, tenant: &str, p: Priority) -> bool {
        let band = &mut self.bands[p.index()];
        let Some(q) = band.tenants.get_mut(tenant) else { return false };
        let Some(at) = q.entries.iter().position(|e| e.id == id) else { return false };
        q.entries.remove(at);
        band.len -= 1;
        if q.entries.is_empty() {
            band.tenants.remove(tenant);
            band.turn.retain(|t| t != tenant);
        }
        self.release(tenant);
        true
    }

    fn pop_newest(&mut self, p: Priority) -> Option<u64> {
        let band = &mut self.bands[p.index()];
        // The tenant holding the most in this band gives up its newest request.
        let name = band.tenants.iter().max_by_key(|(_, q)| q.entries.len()).map(|(n, _)| n.clone())?;
        let q = band.tenants.get_mut(&name)?;
        let e = q.entries.pop_back()?;
        band.len -= 1;
        if q.entries.is_empty() {
            band.tenants.remove(&name);
            band.turn.retain(|t| *t != name);
        }
        self.release(&name);
        Some(e.id)
    }

    fn release(&mut self, tenant: &str) {
        if let Some(n) = self.held_by.get_mut(tenant) {
            *n -= 1;
            if *n == 0 {
                self.held_by.remove(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(capacity: usize, tenant_capacity: usize) -> FlowSettings {
        FlowSettings { queue_capacity: capacity, tenant_queue_capacity: tenant_capacity, ..FlowSettings::default() }
    }

    #[test]
    fn a_priority_header_is_bounded_by_the_key() {
        assert_eq!(Priority::parse(" Critical "), Some(Priority::Critical));
        assert_eq!(Priority::parse("urgent!!"), None);
        let asked = Priority::parse("critical");
        assert_eq!(Priority::bounded(asked, Priority::Standard, Priority::Standard), Priority::Standard);
        assert_eq!(Priority::bounded(asked, Priority::Standard, Priority::Critical), Priority::Critical);
        assert_eq!(Priority::bounded(None, Priority::Sheddable, Priority::Critical), Priority::Sheddable);
    }

    #[test]
    fn higher_bands_leave_first() {
        let mut q = FairQueue::new(&settings(10, 10));
        q.push(1, "a", 1, Priority::Sheddable, 10).unwrap();
        q.push(2, "a", 1, Priority::Standard, 10).unwrap();
        q.push(3, "b", 1, Priority::Critical, 10).unwrap();
        assert_eq!((q.pop(), q.pop(), q.pop(), q.pop()), (Some(3), Some(2), Some(1), None));
        assert!(q.is_empty());
    }

    #[test]
    fn a_noisy_tenant_waits_behind_itself() {
        // Tenant "noisy" holds 100 requests; "quiet" arrives after them and leaves second.
        let mut q = FairQueue::new(&settings(1000, 1000));
        for id in 0..100 {
            q.push(id, "noisy", 1, Priority::Standard, 500).unwrap();
        }
        q.push(1000, "quiet", 1, Priority::Standard, 500).unwrap();
        let order: Vec<u64> = std::iter::from_fn(|| q.pop()).collect();
        let at = order.iter().position(|&id| id == 1000).unwrap();
        // One noisy request per turn: quiet leaves second.
        assert!(at <= 1, "quiet left at {at}");
        assert_eq!(order.len(), 101);
    }

    #[test]
    fn the_estimate_of_requests_ahead_follows_the_turns() {
        // Requests of one turn each: the estimate made before a request is held is where it
        // then leaves, for a quiet tenant behind a backlog, a tenant behind itself, a heavier
        // tenant, and a request of a lower band.
        type Held<'a> = &'a [(&'a str, u32, Priority, u64)];
        let cases: [(Held, (&str, u32, Priority)); 4] = [
            (&[("noisy", 1, Priority::Standard, 100)], ("quiet", 1, Priority::Standard)),
            (
                &[("noisy", 1, Priority::Standard, 100), ("quiet", 1, Priority::Standard, 3)],
                ("quiet", 1, Priority::Standard),
            ),
            (&[("heavy", 3, Priority::Standard, 50), ("b", 1, Priority::Standard, 2)], ("b", 1, Priority::Standard)),
            (&[("a", 1, Priority::Critical, 5), ("b", 1, Priority::Standard, 7)], ("c", 1, Priority::Standard)),
        ];
        for (held, (tenant, weight, band)) in cases {
            let mut q = FairQueue::new(&settings(1000, 1000));
            let mut id = 0;
            for &(t, w, p, n) in held {
                for _ in 0..n {
                    q.push(id, t, w, p, 10).unwrap();
                    id += 1;
                }
            }
            let estimate = q.ahead_of(band, tenant, weight);
            q.push(9_999, tenant, weight, band, 10).unwrap();
            let order: Vec<u64> = std::iter::from_fn(|| q.pop()).collect();
            let at = order.iter().position(|&i| i == 9_999).unwrap();
            assert!(estimate.abs_diff(at) <= 1, "{held:?} then {tenant}: estimated {estimate}, left at {at}");
        }
    }

    #[test]
    fn engine_priorities_keep_bands_apart_and_order_tenants_within() {
        let all: Vec<i64> = [Priority::Critical, Priority::Standard, Priority::Sheddable]
            .iter()
            .flat_map(|&b| [engine_priority(b, false), engine_priority(b, true)])
            .collect();
        // Strictly increasing: a backlogged tenant's critical request still runs before any
        // standard one.
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    }

    #[test]
    fn weights_share_a_band_in_proportion() {
        let mut q = FairQueue::new(&settings(1000, 1000));
        for id in 0..300 {
            q.push(id, "heavy", 3, Priority::Standard, 3000).unwrap();
            q.push(10_000 + id, "light", 1, Priority::Standard, 3000).unwrap();
        }
        let first: Vec<u64> = (0..200).filter_map(|_| q.pop()).collect();
        let heavy = first.iter().filter(|&&id| id < 10_000).count();
        assert!((145..=155).contains(&heavy), "heavy got {heavy} of 200 (weight 3 of 4)");
    }

    #[test]
    fn full_queues_refuse_by_cause() {
        let mut q = FairQueue::new(&settings(4, 3));
        for id in 0..3 {
            q.push(id, "a", 1, Priority::Standard, 1).unwrap();
        }
        assert_eq!(q.push(9, "a", 1, Priority::Standard, 1), Err(Rejected::TenantShare));
        q.push(3, "b", 1, Priority::Standard, 1).unwrap();
        // Full: "b" holds less than its part, but nothing lower to displace → 503.
        assert_eq!(q.push(4, "b", 1, Priority::Standard, 1), Err(Rejected::Full));
        // "a" holds more than its part of a full queue → 429, whatever its band.
        assert_eq!(q.push(5, "a", 1, Priority::Critical, 1), Err(Rejected::TenantShare));
    }

    #[test]
    fn a_higher_band_displaces_the_newest_lowest() {
        let mut q = FairQueue::new(&settings(3, 3));
        q.push(1, "a", 1, Priority::Sheddable, 1).unwrap();
        q.push(2, "a", 1, Priority::Sheddable, 1).unwrap();
        q.push(3, "b", 1, Priority::Standard, 1).unwrap();
        assert_eq!(q.push(4, "c", 1, Priority::Critical, 1), Ok(Some(2)));
        assert_eq!(q.push(5, "d", 1, Priority::Sheddable, 1), Err(Rejected::Full));
        assert_eq!((q.pop(), q.pop(), q.pop(), q.pop()), (Some(4), Some(3), Some(1), None));
    }

    #[test]
    fn removal_frees_the_place() {
        let mut q = FairQueue::new(&settings(2, 2));
        q.push(1, "a", 1, Priority::Standard, 1).unwrap();
        q.push(2, "a", 1, Priority::Standard, 1).unwrap();
        assert!(q.remove(1, "a", Priority::Standard));
        assert!(!q.remove(1, "a", Priority::Standard), "already gone");
        assert_eq!(q.held_by("a"), 1);
        assert_eq!(q.pop(), Some(2));
        assert_eq!(q.held_by("a"), 0);
    }

    #[test]
    fn saturation_counts_unreported_requests_and_a_share_of_peers() {
        let s = FlowSettings::default(); // 4 waiting, KV 0.95
        let e = |local, waiting, in_flight, kv| EngineLoad {
            usable: true,
            local,
            running: 8.0,
            waiting,
            in_flight,
            recent: 0,
            kv_usage: kv,
        };
        // 10 open, 8 running: 2 waiting now, the 1 reported among them → 2 free.
        assert_eq!(free_slots(&[e(true, 1.0, 10, 0.5)], &s, 1.0), 2.0);
        // More reported waiting than open here (another client of the engine): the report.
        assert_eq!(free_slots(&[e(true, 3.0, 9, 0.5)], &s, 1.0), 1.0);
        assert_eq!(free_slots(&[e(true, 0.0, 0, 0.96)], &s, 1.0), 0.0, "KV full");
        assert_eq!(free_slots(&[e(false, 0.0, 0, 0.5)], &s, 0.25), 1.0, "a quarter of 4");
        assert_eq!(free_slots(&[e(true, 0.0, 0, 0.5)], &s, 0.25), 1.0, "its own engine too");
        // Sent there since its report: counted against this node's share.
        assert_eq!(free_slots(&[EngineLoad { recent: 1, ..e(false, 0.0, 3, 0.5) }], &s, 0.5), 1.0);
        assert_eq!(free_slots(&[EngineLoad { recent: 3, ..e(false, 0.0, 3, 0.5) }], &s, 0.5), 0.0);
        assert_eq!(remote_share(0, 0, 8), 1.0);
        assert_eq!(remote_share(30, 10, 8), 0.75);
        assert_eq!(remote_share(0, 10, 8), 0.125);
    }

    #[test]
    fn deadlines_take_the_bands_objective() {
        let s = FlowSettings { slo_ms: BandSlo { critical: Some(500), ..Default::default() }, ..Default::default() };
        assert_eq!(s.deadline_ms(1000, Priority::Critical), 1500);
        assert_eq!(s.deadline_ms(1000, Priority::Standard), 31_000);
        assert!(can_meet(10, 20.0, 500));
        assert!(!can_meet(11, 20.0, 500));
        assert!(can_meet(1000, 0.0, 1));
    }

    proptest! {
        /// Whatever is pushed, popped and removed: the queue never exceeds its bounds, its
        /// counts agree with what it holds, and every id leaves exactly once.
        #[test]
        fn bounds_and_counts_hold(ops in proptest::collection::vec((0u8..4, 0u8..5, 0u8..3, 1u64..5000), 1..400)) {
            let s = settings(16, 6);
            let mut q = FairQueue::new(&s);
            let mut held: HashMap<u64, (String, Priority)> = HashMap::new();
            let mut next = 0u64;
            for (op, tenant, band, cost) in ops {
                let tenant = format!("t{tenant}");
                let p = Priority::ALL[band as usize];
                match op {
                    0 | 1 => {
                        next += 1;
                        if let Ok(displaced) = q.push(next, &tenant, u32::from(band) + 1, p, cost) {
                            if let Some(d) = displaced {
                                let (_, dp) = held.remove(&d).expect("displaced a held id");
                                prop_assert!(dp < p);
                            }
                            held.insert(next, (tenant.clone(), p));
                        }
                    }
                    2 => {
                        if let Some(id) = q.pop() {
                            let (_, pp) = held.remove(&id).expect("popped a held id");
                            prop_assert!(held.values().all(|(_, b)| *b <= pp), "a higher band was left behind");
                        }
                    }
                    _ => {
                        let victim = held.iter().next().map(|(id, (t, p))| (*id, t.clone(), *p));
                        if let Some((id, t, p)) = victim {
                            prop_assert!(q.remove(id, &t, p));
                            held.remove(&id);
                        }
                    }
                }
                prop_assert!(q.len() <= 16);
                prop_assert_eq!(q.len(), held.len());
                for t in 0..5 {
                    let name = format!("t{t}");
                    let n = held.values().filter(|(x, _)| *x == name).count();
                    prop_assert!(n <= 6);
                    prop_assert_eq!(q.held_by(&name), n);
                }
            }
            while let Some(id) = q.pop() {
                prop_assert!(held.remove(&id).is_some());
            }
            prop_assert!(held.is_empty());
        }
    }
}
