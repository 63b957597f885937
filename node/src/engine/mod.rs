//! Adapters to the engines beside this node: each engine is watched by a poller (`/health`,
//! `/metrics`, `/v1/models`) and, when it publishes them, a KV-event subscriber. The request
//! path reads their latest view without waiting on them.

pub mod kv_events;
pub mod metrics_text;
pub mod subscriber;
pub mod zmtp_guard;

use kvmesh_policy::predict::TtftModel;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, EngineEntry};
use kvmesh_policy::models::{self as model_cards, EngineModels};
use kvmesh_policy::prefix_index::EngineIndex;
use kvmesh_policy::route_history::RoutedKeys;
use metrics_text::EngineLoad;

/// What the poller last saw of an engine.
#[derive(Debug, Clone, Default)]
pub struct EngineView {
    pub healthy: bool,
    /// Models the engine listed at its last successful `/v1/models`; kept while it is down so a
    /// request for a known model gets 503 (retry later), not 404.
    pub models: Vec<String>,
    /// The same answer's cards (aliases, LoRA adapters): how each name's blocks are keyed.
    pub cards: EngineModels,
    /// Context length the engine reports in `/v1/models` (vLLM's `max_model_len`).
    pub max_model_len: Option<u32>,
    pub load: EngineLoad,
    pub consecutive_failures: u32,
    pub last_ok: Option<Instant>,
    pub last_error: Option<String>,
}

/// KV-event stream health, counted by the subscriber.
#[derive(Debug)]
pub struct KvEventStats {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub gaps: AtomicU64,
    pub decode_errors: AtomicU64,
    pub last_seq: AtomicU64,
    /// Gaps whose missed batches the engine's replay socket supplied (index kept).
    pub resync_replayed: AtomicU64,
    /// Gaps and restarts that emptied the index (no replay socket, range no longer buffered,
    /// engine restarted, replay failed or timed out).
    pub resync_dropped: AtomicU64,
    /// Set while missed batches are being fetched: the index lacks them, so routing must not
    /// count on it until the resync ends (at most `kv_events_replay_timeout_ms`).
    pub resyncing: AtomicBool,
    /// Whether the subscriber holds a live subscription (ZeroMQ drops what a publisher sends
    /// before a subscription arrives, so a node waits a moment for it at start).
    pub subscribed: AtomicBool,
    /// Test hook (feature `testsuite`): the subscriber discards this many incoming batches, as
    /// if ZeroMQ had lost them in transit, so tests can make real gaps.
    #[cfg(feature = "testsuite")]
    pub drop_incoming: AtomicU64,
    /// The blocks the engine holds, under kvmesh's block keys (emptied on gaps, restarts and
    /// engine outages unless the missed batches could be replayed: a view that may have missed
    /// events is not trusted).
    pub index: RwLock<EngineIndex>,
}

impl KvEventStats {
    fn new() -> Self {
        Self {
            batches: AtomicU64::new(0),
            events: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            decode_errors: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            resync_replayed: AtomicU64::new(0),
            resync_dropped: AtomicU64::new(0),
            resyncing: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            #[cfg(feature = "testsuite")]
            drop_incoming: AtomicU64::new(0),
            // Seeded for real once the engine's model is known (subscriber).
            index: RwLock::new(EngineIndex::new(0)),
        }
    }

    pub fn cached_blocks(&self) -> usize {
        self.index.read().map(|i| i.len()).unwrap_or(0)
    }

    /// Empties the index and starts a new stream (lost subscription, engine outage): the next
    /// batch is not a gap to resync, since nothing before it is kept.
    pub fn reset_index(&self) {
        if let Ok(mut i) = self.index.write() {
            i.reset_stream();
        }
    }
}

pub struct Engine {
    pub index: usize,
    pub name: String,
    /// Base URL without a trailing slash.
    pub url: String,
    pub kv_events: Option<String>,
    /// The engine's KV-event replay socket, if it has one.
    pub kv_events_replay: Option<String>,
    pub api_key: Option<String>,
    pub role: kvmesh_policy::pd::Role,
    /// Its `--scheduling-policy`: with `priority` the node sets each request's `priority`.
    pub scheduling: kvmesh_sim::engine::Scheduling,
    /// The data-parallel rank this engine is, of an engine with several
    /// (`EngineEntry::data_parallel_size`).
    pub dp_rank: Option<u32>,
    /// Requests this node has open on the engine.
    pub in_flight: Arc<AtomicU32>,
    pub view: RwLock<EngineView>,
    pub kv: KvEventStats,
    /// Block keys this node routed here (see `policy::route_history`): the prefix evidence
    /// when the engine publishes no KV events, and for approximate-mode prompts.
    pub routed: std::sync::Mutex<RoutedKeys>,
    /// Block keys this node routed here within `route_history::PENDING_MS`, for an engine with
    /// KV events: held before its events show them (`candidates::EngineFacts::pending`).
    pub pending: std::sync::Mutex<RoutedKeys>,
    /// Its TTFT model, fitted from the streamed answers this node relays from it
    /// (`policy::predict`); routing and peers use its fit.
    pub ttft: std::sync::Mutex<TtftModel>,
}

impl Engine {
    /// The fitted TTFT model routing uses, once it has learned enough.
    pub fn ttft_fit(&self) -> Option<kvmesh_policy::predict::Fit> {
        self.ttft.lock().ok().and_then(|m| m.fit())
    }

    pub fn snapshot(&self) -> EngineView {
        self.view.read().map(|v| v.clone()).unwrap_or_default()
    }

    pub fn is_healthy(&self) -> bool {
        self.view.read().map(|v| v.healthy).unwrap_or(false)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.view.read().map(|v| v.models.iter().any(|m| m == model)).unwrap_or(false)
    }

    /// A request failed to reach the engine: stop routing to it until the poller sees it again.
    pub fn mark_down(&self, why: &str) {
        if let Ok(mut v) = self.view.write() {
            if v.healthy {
                tracing::warn!(engine = %self.name, reason = why, "engine marked down");
            }
            v.healthy = false;
            v.last_error = Some(why.to_owned());
        }
    }
}

pub struct EngineSet {
    pub engines: Vec<Arc<Engine>>,
    /// Start of this node's millisecond clock for route histories.
    epoch: Instant,
    client: reqwest::Client,
    poll_interval: Duration,
    replay_timeout: Duration,
}

/// Failures in a row before a polled engine counts as down; one slow scrape should not take an
/// engine out of rotation, a dead one should leave within about a second.
const DOWN_AFTER_FAILURES: u32 = 2;

impl EngineSet {
    /// Waits, at most `limit`, until every healthy engine with KV events has a live
    /// subscription: events the engine publishes before it would be lost to the index.
    pub async fn wait_for_subscriptions(&self, limit: Duration) {
        let pending = || {
            self.engines.iter().any(|e| {
                e.kv_events.is_some() && e.is_healthy() && !e.kv.subscribed.load(std::sync::atomic::Ordering::Relaxed)
            })
        };
        let started = tokio::time::Instant::now();
        while pending() && started.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if pending() {
            tracing::warn!("KV-event subscriptions not up within {} ms; serving anyway", limit.as_millis());
        }
    }

    /// Milliseconds since the node started, the clock of route histories.
    /// The start of this node's millisecond clock, shared with the peer table so that every
    /// route history reads one clock.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// One engine per entry, and per data-parallel rank of an entry with several.
    pub fn new(entries: &[EngineEntry], cfg: &Config, client: reqwest::Client) -> Self {
        let ranks = entries.iter().enumerate().flat_map(|(i, e)| {
            let n = e.data_parallel_size.max(1);
            (0..n).map(move |r| (i, e, (n > 1).then_some(r)))
        });
        let engines = ranks
            .enumerate()
            .map(|(index, (i, e, dp_rank))| {
                let name = e.name.clone().unwrap_or_else(|| format!("engine-{i}"));
                let offset = |ep: &Option<String>| match dp_rank {
                    // Validated at start: every rank has its endpoint.
                    Some(r) => ep.as_deref().and_then(|ep| kvmesh_sim::kv_events::offset_endpoint_port(ep, r)),
                    None => ep.clone(),
                };
                Arc::new(Engine {
                    index,
                    name: match dp_rank {
                        Some(r) => format!("{name}-dp{r}"),
                        None => name,
                    },
                    url: e.url.trim_end_matches('/').to_owned(),
                    kv_events: offset(&e.kv_events),
                    kv_events_replay: offset(&e.kv_events_replay),
                    api_key: e.api_key.clone(),
                    role: e.role,
                    scheduling: e.scheduling_policy,
                    dp_rank,
                    in_flight: Arc::new(AtomicU32::new(0)),
                    view: RwLock::new(EngineView::default()),
                    kv: KvEventStats::new(),
                    routed: std::sync::Mutex::new(RoutedKeys::new(
                        cfg.route_history_ttl_s * 1000,
                        cfg.route_history_max_keys,
                    )),
                    pending: std::sync::Mutex::new(RoutedKeys::new(
                        kvmesh_policy::route_history::PENDING_MS,
                        kvmesh_policy::route_history::PENDING_MAX_KEYS,
                    )),
                    ttft: std::sync::Mutex::new(TtftModel::new(&cfg.score)),
                })
            })
            .collect();
        Self {
            engines,
            client,
            poll_interval: Config::ms(cfg.engine_poll_interval_ms),
            replay_timeout: Config::ms(cfg.kv_events_replay_timeout_ms),
            epoch: Instant::now(),
        }
    }

    /// One poll of every engine, awaited: the node knows its engines' models before serving.
    pub async fn probe_all(&self) {
        futures::future::join_all(self.engines.iter().map(|e| poll_once(&self.client, e, self.poll_interval))).await;
    }

    pub fn spawn_watchers(&self, tasks: &TaskTracker, cancel: &CancellationToken) {
        for e in &self.engines {
            let (client, engine, cancel2, every) = (self.client.clone(), e.clone(), cancel.clone(), self.poll_interval);
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = cancel2.cancelled() => break,
                        _ = tick.tick() => poll_once(&client, &engine, every).await,
                    }
                }
            });
            if let Some(endpoint) = e.kv_events.clone() {
                let replay = e
                    .kv_events_replay
                    .clone()
                    .map(|endpoint| subscriber::ReplaySource { endpoint, timeout: self.replay_timeout });
                tasks.spawn(subscriber::run(e.clone(), endpoint, replay, cancel.clone()));
            }
        }
    }

    /// How this node's engines key `model`'s blocks, if one of them serves it.
    pub fn key_space(&self, model: &str) -> Option<kvmesh_policy::models::KeySpace> {
        self.engines.iter().find_map(|e| e.view.read().ok().and_then(|v| v.cards.key_space(model)))
    }

    /// Union of the models healthy engines serve (all known ones if none is healthy).
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let any_healthy = self.engines.iter().any(|e| e.is_healthy());
        for e in &self.engines {
            let v = e.snapshot();
            if v.healthy || !any_healthy {
                for m in v.models {
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
            }
        }
        out
    }
}

async fn poll_once(client: &reqwest::Client, e: &Engine, timeout: Duration) {
    let timeout = timeout.max(Duration::from_millis(500)) * 2;
    let get = |path: &str| {
        let mut rb = client.get(format!("{}{path}", e.url)).timeout(timeout);
        if let Some(k) = &e.api_key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    let health = async {
        let r = get("/health").await.map_err(|err| err.to_string())?;
        if !r.status().is_success() {
            return Err(format!("/health answered {}", r.status()));
        }
        let m = get("/metrics").await.map_err(|err| err.to_string())?;
        let text = m.text().await.map_err(|err| err.to_string())?;
        Ok::<_, String>(metrics_text::parse_rank(&text, e.dp_rank))
    };
    let result = health.await;
    // Models rarely change; read them until known, then on every tenth poll.
    let need_models = e.view.read().map(|v| v.models.is_empty()).unwrap_or(true) || rand::random::<u8>() < 26;
    let models = if result.is_ok() && need_models {
        match get("/v1/models").await {
            Ok(r) if r.status().is_success() => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .map(|v| (EngineModels::new(model_cards::cards_from_models_answer(&v)), max_model_len(&v))),
            _ => None,
        }
    } else {
        None
    };
    let Ok(mut v) = e.view.write() else { return };
    match result {
        Ok(load) => {
            if !v.healthy {
                tracing::info!(engine = %e.name, url = %e.url, "engine up");
                // It may have restarted while down: what the index says of it is stale.
                if v.last_ok.is_some() {
                    e.kv.reset_index();
                }
            }
            v.healthy = true;
            v.load = load;
            v.consecutive_failures = 0;
            v.last_ok = Some(Instant::now());
            v.last_error = None;
            if let Some((cards, max_len)) = models {
                v.models = cards.names();
                v.cards = cards;
                v.max_model_len = max_len;
            }
        }
        Err(err) => {
            v.consecutive_failures += 1;
            if v.consecutive_failures >= DOWN_AFTER_FAILURES && v.healthy {
                tracing::warn!(engine = %e.name, url = %e.url, error = %err, "engine down");
                v.healthy = false;
            }
            v.last_error = Some(err);
        }
    }
}

/// The largest `max_model_len` a vLLM `/v1/models` answer lists (an engine serves one model).
fn max_model_len(v: &serde_json::Value) -> Option<u32> {
    v.get("data")?
        .as_array()?
        .iter()
        .filter_map(|m| m.get("max_model_len")?.as_u64())
        .filter_map(|n| u32::try_from(n).ok())
        .max()
}

/// In-flight accounting that cannot leak: the count drops when the guard does, however the
/// request ends (finished, failed, client gone).
pub struct InFlight(Arc<AtomicU32>);

impl InFlight {
    pub fn new(counter: Arc<AtomicU32>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
