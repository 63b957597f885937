//! Drives the engine core in real time: one task owns the core, takes new and aborted requests
//! between steps (as vLLM's engine loop does), sleeps each step's modelled duration, then hands
//! sampled tokens to their requests and KV events to the publisher.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::{CoreCounters, EngineCore, NewSequence, SeqId, TokenOut};
use crate::kv_events::EventBatch;
use crate::metrics::EngineMetrics;

enum Control {
    Add(NewSequence, mpsc::UnboundedSender<TokenOut>),
    ResetPrefixCache(oneshot::Sender<bool>),
    CachedBlockHashes(oneshot::Sender<Vec<u64>>),
}

/// Cheap to clone; submits work to the engine loop.
#[derive(Clone)]
pub struct EngineHandle {
    control: mpsc::Sender<Control>,
    // Aborts must never be lost or wait behind a full queue (a lost abort leaks KV blocks), and
    // there is at most one per submitted request, so this channel is bounded by the control one.
    aborts: mpsc::UnboundedSender<SeqId>,
    next_id: Arc<AtomicU64>,
}

/// Aborts its sequence when dropped (client gone, stop string hit, handler cancelled).
pub struct AbortOnDrop {
    id: SeqId,
    aborts: mpsc::UnboundedSender<SeqId>,
    armed: bool,
}

impl AbortOnDrop {
    /// The sequence finished on its own: nothing to abort.
    pub fn disarm(&mut self) {
        self.armed = false;
    }

    /// Stop the sequence now (a stop string matched) rather than when the response is dropped.
    pub fn abort_now(&mut self) {
        if self.armed {
            let _ = self.aborts.send(self.id);
            self.armed = false;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.aborts.send(self.id);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the engine's request queue is full")]
    QueueFull,
    #[error("the engine is shutting down")]
    Closed,
}

impl EngineHandle {
    pub fn next_id(&self) -> SeqId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn submit(&self, seq: NewSequence) -> Result<(mpsc::UnboundedReceiver<TokenOut>, AbortOnDrop), SubmitError> {
        let id = seq.id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.control.try_send(Control::Add(seq, tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })?;
        Ok((rx, AbortOnDrop { id, aborts: self.aborts.clone(), armed: true }))
    }

    pub async fn reset_prefix_cache(&self) -> Result<bool, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::ResetPrefixCache(tx)).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)
    }

    /// Engine hashes of the blocks cached right now. Not part of vLLM's surface: tests compare
    /// a subscriber's index with it, the engine's own state rather than its event stream.
    pub async fn cached_block_hashes(&self) -> Result<Vec<u64>, SubmitError> {
        let (tx, rx) = oneshot::channel();
        self.control.send(Control::CachedBlockHashes(tx)).await.map_err(|_| SubmitError::Closed)?;
        rx.await.map_err(|_| SubmitError::Closed)
    }
}

pub struct Runner {
    core: EngineCore,
    control: mpsc::Receiver<Control>,
    aborts: mpsc::UnboundedReceiver<SeqId>,
    subscribers: HashMap<SeqId, mpsc::UnboundedSender<TokenOut>>,
    kv_tx: Option<mpsc::Sender<EventBatch>>,
    kv_seq: u64,
    metrics: Arc<EngineMetrics>,
    last_counters: CoreCounters,
    time_scale: f64,
}

/// Pending submissions beyond this get a 503 from the API instead of piling up.
const CONTROL_QUEUE: usize = 4096;
/// Event batches buffered for the publisher; beyond it batches are dropped (a visible gap).
const KV_QUEUE: usize = 1024;

impl Runner {
    pub fn new(
        core: EngineCore,
        metrics: Arc<EngineMetrics>,
        time_scale: f64,
        kv_enabled: bool,
    ) -> (Self, EngineHandle, Option<mpsc::Receiver<EventBatch>>) {
        let (ctx, crx) = mpsc::channel(CONTROL_QUEUE);
        let (atx, arx) = mpsc::unbounded_channel();
        let (kv_tx, kv_rx) = if kv_enabled {
            let (t, r) = mpsc::channel(KV_QUEUE);
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let runner = Self {
            core,
            control: crx,
            aborts: arx,
            subscribers: HashMap::new(),
            kv_tx,
            kv_seq: 0,
            metrics,
            last_counters: CoreCounters::default(),
            time_scale,
        };
        (runner, EngineHandle { control: ctx, aborts: atx, next_id: Arc::new(AtomicU64::new(1)) }, kv_rx)
    }

    fn handle(&mut self, c: Control) {
        match c {
            Control::Add(seq, tx) => {
                self.subscribers.insert(seq.id, tx);
                self.core.add(seq);
            }
            Control::ResetPrefixCache(reply) => {
                let ok = self.core.reset_prefix_cache();
                let _ = reply.send(ok);
                self.flush_kv_events(Vec::new());
            }
            Control::CachedBlockHashes(reply) => {
                // Events of the last step are flushed before a step ends, so this set and the
                // batches published so far describe the same cache.
                let _ = reply.send(self.core.cached_block_hashes());
            }
        }
    }

    fn abort(&mut self, id: SeqId) {
        self.core.abort(id);
        self.subscribers.remove(&id);
    }

    pub async fn run(mut self, cancel: CancellationToken) {
        let mut deadline = Instant::now();
        loop {
            while let Ok(c) = self.control.try_recv() {
                self.handle(c);
            }
            while let Ok(id) = self.aborts.try_recv() {
                self.abort(id);
            }
            self.update_gauges();
            if !self.core.has_work() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    c = self.control.recv() => match c { Some(c) => self.handle(c), None => break },
                    Some(id) = self.aborts.recv() => self.abort(id),
                }
                deadline = Instant::now();
                continue;
            }
            let step = self.core.schedule();
            self.update_gauges();
            if step.is_empty() {
                // Waiting work that cannot be admitted with nothing running cannot happen for
                // requests the API accepted (it checks they fit); wait for a change anyway.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    c = self.control.recv() => match c { Some(c) => self.handle(c), None => break },
                    Some(id) = self.aborts.recv() => self.abort(id),
                }
                continue;
            }
            let dur = Duration::from_secs_f64((step.duration_ms * self.time_scale / 1000.0).max(0.0));
            // Steps run back to back: the next starts when the last ended, or now if idle/late.
            deadline = deadline.max(Instant::now() - Duration::from_millis(1)) + dur;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => {}
            }
            let out = self.core.complete(step);
            for t in out.tokens {
                let finished = t.finished;
                let seq = t.seq;
                if let Some(tx) = self.subscribers.get(&seq) {
                    if tx.send(t).is_err() {
                        // The request went away without an abort reaching us yet.
                        self.abort(seq);
                        continue;
                    }
                }
                if finished {
                    self.subscribers.remove(&seq);
                }
            }
            self.flush_kv_events(out.kv_events);
            self.update_counters();
        }
        // Dropping subscribers ends every open response with an error on the API side.
        self.subscribers.clear();
    }

    fn flush_kv_events(&mut self, mut events: Vec<crate::kv_cache::KvEvent>) {
        events.extend(self.core.take_kv_events());
        let Some(tx) = &self.kv_tx else { return };
        if events.is_empty() {
            return;
        }
        self.kv_seq += 1;
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        if tx.try_send(EventBatch { seq: self.kv_seq, timestamp, events }).is_err() {
            tracing::warn!(seq = self.kv_seq, "kv events: publisher queue full, batch dropped");
        }
    }

    fn update_gauges(&self) {
        self.metrics.running.set(self.core.num_running() as f64);
        self.metrics.waiting.set(self.core.num_waiting() as f64);
        self.metrics.kv_usage.set(self.core.kv_usage());
    }

    fn update_counters(&mut self) {
        let c = self.core.counters();
        let l = self.last_counters;
        self.metrics.prefix_queries.inc_by(c.prefix_queries_tokens - l.prefix_queries_tokens);
        self.metrics.prefix_hits.inc_by(c.prefix_hit_tokens - l.prefix_hit_tokens);
        self.metrics.preemptions.inc_by(c.preemptions - l.preemptions);
        self.metrics.prompt_tokens.inc_by(c.prompt_tokens - l.prompt_tokens);
        self.metrics.generation_tokens.inc_by(c.generation_tokens - l.generation_tokens);
        self.last_counters = c;
        self.update_gauges();
    }
}
