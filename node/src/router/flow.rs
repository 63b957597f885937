//! The `hold` stage: a client's request waits at this node while every engine that serves its
//! model is saturated, and leaves in priority and fair-share order as places free up
//! (`policy::flow`). Engines' queues stay short enough that the order is still this node's to
//! choose; a request that cannot leave in time is answered 503 with `retry-after` here, never
//! left to time out inside an engine.
//!
//! Capacity is read from what the node already knows: its engines' polled load and in-flight
//! counts, and its peers' gossiped load, of which it counts the share that matches the requests
//! it holds against what peers gossip holding (`LoadReport::held`).
//!
//! One dispatcher task per node ([`run`]) lets requests go: woken when a request is held, then
//! every [`TICK`] while any is held (in-flight counts fall as answers end, and gossip updates
//! arrive, without a signal of their own).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use kvmesh_policy::flow::{self, FairQueue, FlowSettings, Priority, Rejected};
use kvmesh_policy::openai::ApiError;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use super::Router;
use crate::guard::Refusal;
use crate::metrics::NodeMetrics;

/// How often the dispatcher looks for free places while requests are held.
const TICK: Duration = Duration::from_millis(5);
/// How often the saturation gauges are refreshed (a scrape every 15 s sees them fresh).
const GAUGE_EVERY: Duration = Duration::from_millis(250);
/// Recent dispatches kept per model to estimate the dispatch rate.
const RATE_WINDOW: usize = 64;
/// Models with a queue, at most (a queue is made only for a model some engine serves).
const MAX_QUEUES: usize = 256;
/// Dispatches older than this say nothing of the current rate.
const RATE_HORIZON: Duration = Duration::from_secs(10);
/// A request let go reaches its engine's in-flight count within this (its prompt is already
/// tokenized; pick is microseconds): until then it counts against the free places, so that a
/// burst, or two dispatcher passes in a row, cannot overfill an engine.
const GRANT_MS: Duration = Duration::from_millis(25);

/// Why a held request was answered without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shed {
    /// Its tenant holds its whole share of the queue (429).
    TenantShare,
    /// The queue is full of requests of its band or higher (503).
    Full,
    /// A request of a higher band took its place (503).
    Displaced,
    /// Its deadline passed while held (503).
    Deadline,
    /// It could not have left before its deadline at the current dispatch rate (503, at once).
    CannotMeet,
    /// The node began draining (503; other nodes take it).
    Draining,
}

impl Shed {
    const ALL: [Shed; 6] =
        [Shed::TenantShare, Shed::Full, Shed::Displaced, Shed::Deadline, Shed::CannotMeet, Shed::Draining];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Shed::TenantShare => "tenant_share",
            Shed::Full => "queue_full",
            Shed::Displaced => "displaced",
            Shed::Deadline => "deadline",
            Shed::CannotMeet => "cannot_meet_deadline",
            Shed::Draining => "draining",
        }
    }

    fn refusal(self, node: &str, model: &str, retry_after_s: u64) -> Refusal {
        let error = match self {
            Shed::TenantShare => ApiError::rate_limited(format!(
                "This key's share of node {node}'s queue for `{model}` is used; retry after {retry_after_s} s."
            ))
            .with_code("flow_tenant_share"),
            Shed::Draining => {
                ApiError::unavailable(format!("Node {node} is draining; send the request to another node."))
                    .with_code("draining")
            }
            other => ApiError::unavailable(format!(
                "No capacity for `{model}` within the request's deadline ({}); retry after {retry_after_s} s.",
                other.as_str()
            ))
            .with_code("flow_no_capacity"),
        };
        Refusal { error, retry_after_s: Some(retry_after_s) }
    }
}

/// Which engines a request is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HoldAt<'a> {
    /// A client's request at its receiving node: any engine in the mesh, of whose free places
    /// this node counts its share (gossiped load, so an estimate).
    Mesh,
    /// A request a peer forwarded here: this node's own engines only (the named one, or any
    /// serving the model), whose every request passes through this node's counters, so the
    /// count is exact. The second hold that absorbs what the origins' estimates overfill.
    Local(Option<&'a str>),
}

/// What a queue holds requests for: its model, and for peers' requests the engine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum QueueKey {
    Mesh(Arc<str>),
    Local { model: Arc<str>, engine: Option<Arc<str>> },
}

impl QueueKey {
    fn model(&self) -> &str {
        match self {
            QueueKey::Mesh(m) | QueueKey::Local { model: m, .. } => m,
        }
    }
}

/// A request flow control answered without serving: why, and the answer.
pub(crate) struct Held {
    pub shed: Shed,
    pub refusal: Refusal,
}

impl Held {
    /// Whether the request's time is up (another engine could not start it in time either).
    pub(crate) fn is_final(&self) -> bool {
        self.shed == Shed::Deadline
    }
}

/// Who a held request is, for the queue.
pub(crate) struct Asking<'a> {
    pub model: &'a str,
    pub at: HoldAt<'a>,
    /// Time the origin left it (a peer's request): held no longer than this, nor than its band's
    /// objective.
    pub budget: Option<Duration>,
    pub tenant: &'a str,
    pub weight: u32,
    pub priority: Priority,
    /// Prompt tokens (the fair queue's cost), 0 when unknown.
    pub tokens: usize,
    /// When the request arrived at this node.
    pub arrived: Instant,
}

/// What the dispatcher tells a held request.
enum Verdict {
    Go,
    Shed(Shed),
}

struct Waiter {
    tx: oneshot::Sender<Verdict>,
    key: QueueKey,
    /// The gauge label it was counted under (kept: a model's label can change while held).
    label: Arc<str>,
    tenant: Arc<str>,
    priority: Priority,
}

#[derive(Default)]
struct State {
    queues: HashMap<QueueKey, FairQueue>,
    waiters: HashMap<u64, Waiter>,
    /// When each queue's recent requests left (at most `RATE_WINDOW`).
    dispatched: HashMap<QueueKey, VecDeque<Instant>>,
    /// The dispatcher stopped (shutdown): nothing more is held.
    closed: bool,
}

impl State {
    /// Dispatches per second over the recent ones (the last `RATE_WINDOW`, within
    /// `RATE_HORIZON`); 0 (unknown) with fewer than two.
    fn rate_per_s(&self, key: &QueueKey, now: Instant) -> f64 {
        let Some(times) = self.dispatched.get(key) else { return 0.0 };
        let recent: Vec<&Instant> = times.iter().filter(|t| now.duration_since(**t) <= RATE_HORIZON).collect();
        match (recent.first(), recent.last()) {
            (Some(first), Some(last)) if recent.len() >= 2 => {
                let span = last.duration_since(**first).as_secs_f64();
                if span > 0.0 {
                    (recent.len() - 1) as f64 / span
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }

    /// Requests let go from `key`'s queue within `GRANT_MS`: on their way to an engine, not
    /// yet in its in-flight count.
    ///
    /// Every queue of the model counts: a client's queue and peers' queues on this node can
    /// send to the same engine, so one's grants take places the others see as free.
    fn granted(&self, key: &QueueKey, now: Instant) -> f64 {
        self.dispatched
            .iter()
            .filter(|(k, _)| k.model() == key.model())
            .map(|(_, t)| t.iter().rev().take_while(|t| now.duration_since(**t) < GRANT_MS).count())
            .sum::<usize>() as f64
    }

    fn record_dispatch(&mut self, key: &QueueKey, now: Instant) {
        if !self.dispatched.contains_key(key) && self.dispatched.len() >= MAX_QUEUES {
            // Queues that dispatched nothing lately make room (their rate is unknown again).
            self.dispatched.retain(|_, t| t.back().is_some_and(|last| now.duration_since(*last) <= RATE_HORIZON));
            if self.dispatched.len() >= MAX_QUEUES {
                return;
            }
        }
        let times = self.dispatched.entry(key.clone()).or_default();
        if times.len() >= RATE_WINDOW {
            times.pop_front();
        }
        times.push_back(now);
    }

    /// Takes `id` out of its queue and the waiters; its sender, if it was still held.
    fn take(&mut self, id: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&id)?;
        if let Some(q) = self.queues.get_mut(&w.key) {
            q.remove(id, &w.tenant, w.priority);
        }
        Some(w)
    }
}

/// This node's flow control: the held requests and the counter peers read.
pub(crate) struct FlowControl {
    s: FlowSettings,
    state: Mutex<State>,
    wake: Arc<Notify>,
    /// Requests held now (gossiped as `LoadReport::held`).
    held: Arc<AtomicU32>,
    next_id: AtomicU64,
    metrics: Arc<NodeMetrics>,
}

/// A held request's place; leaving the queue any other way (its client went away) frees it.
struct Ticket<'a> {
    flow: &'a FlowControl,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut st = self.flow.lock();
        if let Some(w) = st.take(self.id) {
            self.flow.left(&w);
        }
    }
}

impl FlowControl {
    pub(crate) fn new(s: FlowSettings, held: Arc<AtomicU32>, metrics: Arc<NodeMetrics>) -> Self {
        // Every series exists from the start, at 0, so that rates and alerts see the first one.
        for shed in Shed::ALL {
            metrics.flow_shed.with_label_values(&[shed.as_str()]);
        }
        for p in Priority::ALL {
            metrics.flow_held.with_label_values(&[p.as_str()]);
        }
        Self { s, state: Mutex::default(), wake: Arc::new(Notify::new()), held, next_id: AtomicU64::new(1), metrics }
    }

    pub(crate) fn settings(&self) -> &FlowSettings {
        &self.s
    }

    /// The state, even after a panic elsewhere poisoned its lock: every change to it is made
    /// whole under the lock, and counters must still be released.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this node holds requests of `tenant` now: it sends more than its share of what
    /// the engines take (`policy::flow::engine_priority`).
    pub(crate) fn backlogged(&self, tenant: &str) -> bool {
        self.lock().queues.values().any(|q| q.held_by(tenant) > 0)
    }

    /// Requests held now.
    pub(crate) fn held(&self) -> u32 {
        self.held.load(Ordering::Relaxed)
    }

    fn left(&self, w: &Waiter) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.metrics.flow_queued.with_label_values(&[&w.label, w.priority.as_str()]).dec();
    }

    fn retry_after_s(&self) -> u64 {
        // A second or two is when places free up again on a busy engine; the TTL bounds it.
        (self.s.max_wait_ms / 1000).clamp(1, 5)
    }
}

impl Router {
    /// The hold stage: returns when the request may go to pick (at once when an engine has a
    /// free place and nothing is held ahead), or the refusal to answer it with.
    pub(crate) async fn hold(&self, a: Asking<'_>) -> Result<(), Held> {
        let f = &self.flow;
        // Not built for meshes split into cells: a request homed in another cell is placed
        // there (`cells`), whose engines this node's saturation does not cover. A peer's
        // request for this node's own engines is held in any mesh.
        if !f.s.enabled || (a.at == HoldAt::Mesh && self.mesh().is_some_and(|m| m.cell.is_some())) {
            return Ok(());
        }
        let (key, loads) = self.queue_of(a.model, a.at);
        if !loads.iter().any(|e| e.usable) {
            // No engine can serve it: pick answers 404 or 503 now rather than after a wait.
            return Ok(());
        }
        let free = flow::free_slots(&loads, &f.s, self.share(&key));
        let now = Instant::now();
        let mut wait = Duration::from_millis(f.s.deadline_ms(0, a.priority));
        if let Some(budget) = a.budget {
            wait = wait.min(budget);
        }
        let (id, rx) = {
            let mut st = f.lock();
            if st.closed {
                drop(st);
                return Err(self.shed(Shed::Draining, a.model));
            }
            let queued = st.queues.get(&key).map_or(0, FairQueue::len);
            if queued == 0 && free - st.granted(&key, now) > 0.0 {
                st.record_dispatch(&key, now);
                return Ok(());
            }
            let remaining = wait.saturating_sub(now.duration_since(a.arrived)).as_millis() as u64;
            let ahead = st.queues.get(&key).map_or(0, |q| q.ahead_of(a.priority, a.tenant, a.weight));
            if remaining == 0 || !flow::can_meet(ahead, st.rate_per_s(&key, now), remaining) {
                drop(st);
                return Err(self.shed(Shed::CannotMeet, a.model));
            }
            // The node-wide bound (each model's queue is bounded too).
            let full_node = f.held() as usize >= f.s.queue_capacity;
            if full_node || (!st.queues.contains_key(&key) && st.queues.len() >= MAX_QUEUES) {
                drop(st);
                return Err(self.shed(Shed::Full, a.model));
            }
            let id = f.next_id.fetch_add(1, Ordering::Relaxed);
            let q = st.queues.entry(key.clone()).or_insert_with(|| FairQueue::new(&f.s));
            let displaced = match q.push(id, a.tenant, a.weight, a.priority, a.tokens as u64) {
                Ok(d) => d,
                Err(r) => {
                    drop(st);
                    let shed = match r {
                        Rejected::TenantShare => Shed::TenantShare,
                        Rejected::Full => Shed::Full,
                    };
                    return Err(self.shed(shed, a.model));
                }
            };
            let (tx, rx) = oneshot::channel();
            let label: Arc<str> = f.metrics.model_label(a.model).into();
            f.held.fetch_add(1, Ordering::Relaxed);
            f.metrics.flow_queued.with_label_values(&[&label, a.priority.as_str()]).inc();
            st.waiters.insert(id, Waiter { tx, key, label, tenant: a.tenant.into(), priority: a.priority });
            f.metrics.flow_held.with_label_values(&[a.priority.as_str()]).inc();
            if let Some(d) = displaced {
                // Already out of the queue: only its waiter is left.
                if let Some(w) = st.waiters.remove(&d) {
                    f.left(&w);
                    let _ = w.tx.send(Verdict::Shed(Shed::Displaced));
                }
            }
            (id, rx)
        };
        f.wake.notify_one();
        let ticket = Ticket { flow: f, id };
        let remaining = wait.saturating_sub(now.duration_since(a.arrived));
        let verdict = tokio::time::timeout(remaining, rx).await;
        drop(ticket);
        f.metrics.flow_wait.with_label_values(&[a.priority.as_str()]).observe(now.elapsed().as_secs_f64());
        match verdict {
            Ok(Ok(Verdict::Go)) => Ok(()),
            Ok(Ok(Verdict::Shed(shed))) => Err(self.shed(shed, a.model)),
            // Its sender was dropped without a verdict (cannot happen while the waiter is held;
            // answered as a stop, to be safe).
            Ok(Err(_)) => Err(self.shed(Shed::Draining, a.model)),
            Err(_) => Err(self.shed(Shed::Deadline, a.model)),
        }
    }

    fn shed(&self, shed: Shed, model: &str) -> Held {
        self.metrics.flow_shed.with_label_values(&[shed.as_str()]).inc();
        Held { shed, refusal: shed.refusal(&self.node_name, model, self.flow.retry_after_s()) }
    }

    /// The queue for `model` at `at`, and its engines. A peer naming an engine this node does
    /// not have (or one that cannot take the request now) is held for the node's engines of the
    /// model, as pick then falls back to them: a peer cannot make a queue per made-up name.
    fn queue_of(&self, model: &str, at: HoldAt<'_>) -> (QueueKey, Vec<flow::EngineLoad>) {
        let local = |engine: Option<&str>| QueueKey::Local { model: model.into(), engine: engine.map(Into::into) };
        match at {
            HoldAt::Mesh => (QueueKey::Mesh(model.into()), self.flow_loads(model)),
            HoldAt::Local(Some(name)) => {
                let named = self.local_flow_loads(model, Some(name));
                match named.iter().any(|e| e.usable) {
                    true => (local(Some(name)), named),
                    false => (local(None), self.local_flow_loads(model, None)),
                }
            }
            HoldAt::Local(None) => (local(None), self.local_flow_loads(model, None)),
        }
    }

    /// The engines a queue's requests wait for.
    fn queue_loads(&self, key: &QueueKey) -> Vec<flow::EngineLoad> {
        match key {
            QueueKey::Mesh(model) => self.flow_loads(model),
            QueueKey::Local { model, engine } => self.local_flow_loads(model, engine.as_deref()),
        }
    }

    /// This node's share of the free places a queue's engines have: of every engine, its
    /// share against peers (`remote_share`); of its own engines for a peer's request, all of
    /// them (every request to them passes here).
    fn share(&self, key: &QueueKey) -> f64 {
        match key {
            QueueKey::Mesh(_) => self.remote_share(),
            QueueKey::Local { .. } => 1.0,
        }
    }

    /// This node's share of engines' free places (`policy::flow::remote_share`).
    fn remote_share(&self) -> f64 {
        let Some(mesh) = self.mesh() else { return 1.0 };
        let peers = mesh.peers();
        let by_peers: u32 = peers.iter().filter(|p| !p.is_self).map(|p| p.load.held).fold(0, u32::saturating_add);
        flow::remote_share(self.flow.held(), by_peers, peers.len().max(1))
    }

    /// Lets held requests go while their models' engines have free places, most urgent and
    /// fairest first; sheds them all when the node drains.
    fn dispatch(&self) {
        let f = &self.flow;
        let draining = self.is_draining();
        let keys: Vec<QueueKey> =
            f.lock().queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| k.clone()).collect();
        for key in keys {
            // No usable engine: they stay held (an engine may come back) until their deadline.
            let mut free =
                if draining { 0.0 } else { flow::free_slots(&self.queue_loads(&key), &f.s, self.share(&key)) };
            let mut st = f.lock();
            let now = Instant::now();
            free -= st.granted(&key, now);
            loop {
                if !draining && free <= 0.0 {
                    break;
                }
                let Some(id) = st.queues.get_mut(&key).and_then(FairQueue::pop) else { break };
                let Some(w) = st.waiters.remove(&id) else { continue };
                f.left(&w);
                let verdict = if draining { Verdict::Shed(Shed::Draining) } else { Verdict::Go };
                // A waiter that is gone (its client left) took no place.
                if w.tx.send(verdict).is_ok() && !draining {
                    free -= 1.0;
                    st.record_dispatch(&key, now);
                }
            }
            if st.queues.get(&key).is_some_and(FairQueue::is_empty) {
                st.queues.remove(&key);
            }
        }
    }

    /// Saturation per model for autoscalers: requests waiting at engines (reported, and this
    /// node's unreported ones) and held across the mesh, over the waiting places the model's
    /// usable engines have. Above 1: requests are being held.
    fn refresh_saturation(&self) {
        let f = &self.flow;
        let held_mesh = f.held().saturating_add(
            self.mesh()
                .map(|m| m.peers().iter().filter(|p| !p.is_self).map(|p| p.load.held).fold(0, u32::saturating_add))
                .unwrap_or(0),
        );
        for model in self.models_served() {
            // Only models an engine has answered for label series (`NodeMetrics::model_label`).
            if f.metrics.model_label(&model) != model {
                continue;
            }
            let loads = self.flow_loads(&model);
            let usable: Vec<_> = loads.iter().filter(|e| e.usable).collect();
            let places = usable.len() as f64 * f64::from(f.s.max_waiting_per_engine.max(1));
            let waiting: f64 = usable
                .iter()
                .map(|e| e.waiting + kvmesh_policy::route::unreported(e.in_flight, e.running))
                .sum::<f64>();
            let sat = if places > 0.0 { (waiting + f64::from(held_mesh)) / places } else { 0.0 };
            f.metrics.flow_saturation.with_label_values(&[&model]).set(sat);
            f.metrics.flow_free.with_label_values(&[&model]).set(flow::free_slots(&loads, &f.s, 1.0));
        }
    }
}

/// The dispatcher: runs until `cancel`, then answers what is still held (503, draining).
pub(crate) async fn run(router: Weak<Router>, cancel: CancellationToken) {
    let Some(wake) = router.upgrade().map(|r| r.flow.wake.clone()) else { return };
    let mut last_gauges: Option<Instant> = None;
    loop {
        if last_gauges.is_none_or(|t| t.elapsed() >= GAUGE_EVERY) {
            let Some(r) = router.upgrade() else { return };
            r.refresh_saturation();
            last_gauges = Some(Instant::now());
        }
        let held = router.upgrade().map(|r| r.flow.held()).unwrap_or(0);
        let wait = if held > 0 { TICK } else { GAUGE_EVERY };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(r) = router.upgrade() else { return };
        r.dispatch();
    }
    if let Some(r) = router.upgrade() {
        let mut st = r.flow.lock();
        // Requests arriving from now on are answered at once (`hold`).
        st.closed = true;
        let ids: Vec<u64> = st.waiters.keys().copied().collect();
        for id in ids {
            if let Some(w) = st.take(id) {
                r.flow.left(&w);
                let _ = w.tx.send(Verdict::Shed(Shed::Draining));
            }
        }
    }
}
