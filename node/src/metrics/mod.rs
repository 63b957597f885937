//! The node's own Prometheus metrics (`kvmesh_*`), one registry per node so several nodes can
//! run in one process (tests, benchmarks).

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

mod summary;

use summary::LatencySummary;
pub use summary::Recent;

use crate::audit::AuditMetrics;

use crate::engine::EngineSet;
use crate::error::NodeError;
use crate::mesh::Mesh;

pub struct NodeMetrics {
    registry: Registry,
    /// Model names an engine has served (at most `MAX_MODEL_LABELS`): the only ones a `model`
    /// label may carry. A client's free text never becomes a series.
    served_models: Mutex<std::collections::HashSet<String>>,
    /// Requests answered, by endpoint, model and HTTP status.
    pub requests: IntCounterVec,
    /// Client connections closed at once because `http_max_connections` were open.
    pub http_connections_refused: IntCounter,
    /// Time from request arrival to the first response byte sent, by endpoint and stream mode.
    pub ttfb: HistogramVec,
    /// Whole request, to the last byte.
    pub duration: HistogramVec,
    /// Engines tried again after a failure before the response started, by reason.
    pub retries: IntCounterVec,
    /// Streams that ended with an error event after they had started, by cause.
    pub stream_errors: IntCounterVec,
    /// Routing decisions by reason: `prefix` (a cached prefix decided), `load`,
    /// `load_no_tokenizer`, `retry`.
    pub route_decisions: IntCounterVec,
    /// Disaggregated requests served whole after all, by what failed (`prefill_failed`,
    /// `prefill_no_transfer_params`, `decode_failed`).
    pub pd_fallbacks: IntCounterVec,
    /// Guardrail verdicts by hook, stage (`prompt`/`response`) and verdict (`allow`, `deny`,
    /// `rewrite`, `error_open`, `error_closed`).
    pub guardrail_verdicts: IntCounterVec,
    /// Requests refused for a missing or wrong API key.
    pub auth_failures: IntCounter,
    /// Requests refused by a rate or budget limit, by limit.
    pub rate_limited: IntCounterVec,
    pub audit: AuditMetrics,
    /// Prompts through the tokenizer service by model and outcome: `tokenized`, `token_ids`
    /// (none needed), `no_tokenizer`, `shed` (queue full), `failed`.
    pub tokenize_requests: IntCounterVec,
    /// Answers whose `usage.prompt_tokens` was compared with this node's prompt length, and
    /// those that differed (`router::check`), by model.
    pub prompt_length_checks: IntCounterVec,
    pub prompt_length_mismatches: IntCounterVec,
    /// Cached prompt tokens this node predicted for the engines it chose, and what they reported.
    pub cached_predicted: IntCounterVec,
    pub cached_reported: IntCounterVec,
    /// |predicted - reported| cached tokens per answer.
    pub cached_error: HistogramVec,
    /// Prompt tokens by where their ids came from: `encoded` now or the segment `cache`.
    pub tokenize_tokens: IntCounterVec,
    pub tokenize_seconds: HistogramVec,
    pub tokenize_queue: prometheus::IntGauge,
    /// Memory per model's tokenizer: `loaded` (at start) and `segment_cache` (now).
    pub tokenizer_memory: IntGaugeVec,
    engine_up: IntGaugeVec,
    engine_in_flight: IntGaugeVec,
    engine_running: GaugeVec,
    engine_waiting: GaugeVec,
    engine_kv_usage: GaugeVec,
    kv_batches: IntCounterVec,
    kv_gaps: IntCounterVec,
    kv_resync: IntCounterVec,
    kv_cached_blocks: IntGaugeVec,
    route_history_keys: IntGaugeVec,
    /// Time between two chunks of a relayed stream, by endpoint (about one decode step each).
    pub inter_token: HistogramVec,
    /// Streamed requests' time to first token, inter-chunk gaps and whole requests: exact
    /// quantiles over the last one to two minutes, with lifetime count and sum, exported as the
    /// Prometheus summary `kvmesh_latency_summary_seconds`.
    pub recent_ttft: Arc<Recent>,
    pub recent_itl: Arc<Recent>,
    pub recent_e2e: Arc<Recent>,
    /// 1 while the node refuses new requests (drain or shutdown).
    pub draining: IntGauge,
    /// |predicted - actual| TTFT of this node's engines' streamed answers, by model (`learned`:
    /// the fitted one, scored before it learns from the answer; `fixed`: the score weights).
    pub ttft_prediction_error: HistogramVec,
    /// Flow control: requests held now, by model and band.
    pub flow_queued: IntGaugeVec,
    /// Requests that were held (not sent at once), by band.
    pub flow_held: IntCounterVec,
    /// Requests flow control answered without serving, by reason.
    pub flow_shed: IntCounterVec,
    /// How long held requests waited, by band.
    pub flow_wait: HistogramVec,
    /// Saturation per model (autoscaling signal; above 1 requests are held).
    pub flow_saturation: GaugeVec,
    /// Free waiting places per model on engines this node sees.
    pub flow_free: GaugeVec,
    gossip_peers: IntGauge,
    gossip_bytes: IntCounterVec,
    gossip_dropped: IntCounter,
    gossip_rejected: IntCounter,
    refused_connections: IntCounter,
    heartbeat_age: GaugeVec,
    max_heartbeat_age: Gauge,
    /// Serializes scrapes: counters mirrored from the transport's atomics are advanced by the
    /// difference, which two concurrent scrapes would both add.
    scrape: Mutex<()>,
}

const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Most distinct model names kept as label values.
pub const MAX_MODEL_LABELS: usize = 256;

impl NodeMetrics {
    /// Notes that an engine served `model` (its answer came back): the name may label series.
    pub fn note_served_model(&self, model: &str) {
        if let Ok(mut s) = self.served_models.lock() {
            if s.len() < MAX_MODEL_LABELS && !s.contains(model) {
                s.insert(model.to_owned());
            }
        }
    }

    /// The `model` label for a request's model: itself once an engine served it, else `other`.
    pub fn model_label<'a>(&self, model: &'a str) -> &'a str {
        match self.served_models.lock() {
            Ok(s) if s.contains(model) => model,
            _ => "other",
        }
    }

    pub fn new(node: &str) -> Result<Self, NodeError> {
        let registry =
            Registry::new_custom(None, Some([("kvmesh_node".to_owned(), node.to_owned())].into_iter().collect()))?;
        let engine = &["engine"];
        let m = Self {
            http_connections_refused: IntCounter::new(
                "kvmesh_http_connections_refused_total",
                "Client connections closed at once because http_max_connections were open.",
            )?,
            requests: IntCounterVec::new(
                Opts::new("kvmesh_requests_total", "Requests answered, by endpoint, model and HTTP status."),
                &["endpoint", "model_name", "status"],
            )?,
            ttfb: HistogramVec::new(
                HistogramOpts::new("kvmesh_time_to_first_byte_seconds", "Request arrival to first response byte.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint", "stream"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new("kvmesh_request_duration_seconds", "Request arrival to last response byte.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint", "stream"],
            )?,
            retries: IntCounterVec::new(
                Opts::new("kvmesh_engine_retries_total", "Requests sent to another engine after a failure, by reason."),
                &["reason"],
            )?,
            stream_errors: IntCounterVec::new(
                Opts::new("kvmesh_stream_errors_total", "Started streams ended with an error event, by cause."),
                &["cause"],
            )?,
            pd_fallbacks: IntCounterVec::new(
                Opts::new("kvmesh_pd_fallbacks_total", "Split requests served whole after a failed hop, by reason."),
                &["reason"],
            )?,
            route_decisions: IntCounterVec::new(
                Opts::new("kvmesh_route_decisions_total", "Routing decisions by reason."),
                &["reason"],
            )?,
            guardrail_verdicts: IntCounterVec::new(
                Opts::new("kvmesh_guardrail_verdicts_total", "Guardrail verdicts by hook, stage and verdict."),
                &["hook", "stage", "verdict"],
            )?,
            auth_failures: IntCounter::new(
                "kvmesh_auth_failures_total",
                "Requests refused for a missing or wrong API key.",
            )?,
            rate_limited: IntCounterVec::new(
                Opts::new("kvmesh_rate_limited_total", "Requests refused by a tenant limit, by limit."),
                &["limit"],
            )?,
            audit: AuditMetrics {
                queue_depth: IntGauge::new(
                    "kvmesh_audit_queue_depth",
                    "Audit slots held: records waiting for the writer plus, in reject mode, requests in flight.",
                )?,
                written: IntCounter::new(
                    "kvmesh_audit_records_written_total",
                    "Audit records written (gap records included).",
                )?,
                dropped: IntCounter::new(
                    "kvmesh_audit_records_dropped_total",
                    "Audit records dropped on a full queue.",
                )?,
                write_errors: IntCounter::new(
                    "kvmesh_audit_write_errors_total",
                    "Failed audit writes, fsyncs or rotations.",
                )?,
            },
            prompt_length_checks: IntCounterVec::new(
                Opts::new(
                    "kvmesh_prompt_length_checks_total",
                    "Answers whose usage.prompt_tokens was compared with this node's prompt length, by model.",
                ),
                &["model_name"],
            )?,
            prompt_length_mismatches: IntCounterVec::new(
                Opts::new(
                    "kvmesh_prompt_length_mismatches_total",
                    "Answers whose usage.prompt_tokens differed from this node's prompt length: its block keys are not the engine's, by model.",
                ),
                &["model_name"],
            )?,
            cached_predicted: IntCounterVec::new(
                Opts::new(
                    "kvmesh_cached_tokens_predicted_total",
                    "Cached prompt tokens this node predicted for the engines it chose, by model.",
                ),
                &["model_name"],
            )?,
            cached_reported: IntCounterVec::new(
                Opts::new(
                    "kvmesh_cached_tokens_reported_total",
                    "Cached prompt tokens the engines reported (usage.prompt_tokens_details.cached_tokens) for checked answers, by model.",
                ),
                &["model_name"],
            )?,
            cached_error: HistogramVec::new(
                HistogramOpts::new(
                    "kvmesh_cached_tokens_prediction_error_tokens",
                    "Absolute difference between predicted and reported cached prompt tokens per checked answer, by model.",
                )
                .buckets(vec![0.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0]),
                &["model_name"],
            )?,
            tokenize_requests: IntCounterVec::new(
                Opts::new("kvmesh_tokenize_requests_total", "Prompts through the tokenizer service, by outcome."),
                &["model_name", "outcome"],
            )?,
            tokenize_tokens: IntCounterVec::new(
                Opts::new("kvmesh_tokenize_tokens_total", "Prompt tokens by source of their ids (encoded, cache)."),
                &["model_name", "source"],
            )?,
            tokenize_seconds: HistogramVec::new(
                HistogramOpts::new("kvmesh_tokenize_seconds", "Time to tokenize a prompt on a tokenizer thread.")
                    .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
                &["model_name"],
            )?,
            tokenize_queue: prometheus::IntGauge::new(
                "kvmesh_tokenize_queue",
                "Prompts waiting for a tokenizer thread.",
            )?,
            tokenizer_memory: IntGaugeVec::new(
                Opts::new("kvmesh_tokenizer_memory_bytes", "Tokenizer memory per model (loaded, segment_cache)."),
                &["model_name", "part"],
            )?,
            engine_up: IntGaugeVec::new(Opts::new("kvmesh_engine_up", "1 if the engine is healthy."), engine)?,
            engine_in_flight: IntGaugeVec::new(
                Opts::new("kvmesh_engine_in_flight", "Requests this node has open on the engine."),
                engine,
            )?,
            engine_running: GaugeVec::new(
                Opts::new("kvmesh_engine_running", "Engine's running requests (scraped)."),
                engine,
            )?,
            engine_waiting: GaugeVec::new(
                Opts::new("kvmesh_engine_waiting", "Engine's waiting requests (scraped)."),
                engine,
            )?,
            engine_kv_usage: GaugeVec::new(
                Opts::new("kvmesh_engine_kv_usage", "Engine's KV-cache usage 0..1 (scraped)."),
                engine,
            )?,
            kv_batches: IntCounterVec::new(
                Opts::new("kvmesh_kv_event_batches_total", "KV-event batches received."),
                engine,
            )?,
            kv_gaps: IntCounterVec::new(
                Opts::new(
                    "kvmesh_kv_event_gaps_total",
                    "Sequence gaps or restarts seen in KV events (replayed, or view dropped).",
                ),
                engine,
            )?,
            kv_resync: IntCounterVec::new(
                Opts::new(
                    "kvmesh_kv_resync_total",
                    "KV-event gaps and restarts by outcome: replayed (index kept) or dropped (index emptied).",
                ),
                &["engine", "outcome"],
            )?,
            kv_cached_blocks: IntGaugeVec::new(
                Opts::new("kvmesh_kv_cached_blocks", "Blocks the engine holds, per its KV events."),
                engine,
            )?,
            route_history_keys: IntGaugeVec::new(
                Opts::new("kvmesh_route_history_keys", "Block keys this node remembers routing to the engine."),
                engine,
            )?,
            inter_token: HistogramVec::new(
                HistogramOpts::new(
                    "kvmesh_inter_token_seconds",
                    "Time between two relayed chunks of a streamed answer (about one decode step).",
                )
                .buckets(INTER_TOKEN_BUCKETS.to_vec()),
                &["endpoint"],
            )?,
            recent_ttft: Arc::new(Recent::new()?),
            recent_itl: Arc::new(Recent::new()?),
            recent_e2e: Arc::new(Recent::new()?),
            draining: IntGauge::new("kvmesh_draining", "1 while the node refuses new requests (drain or shutdown).")?,
            ttft_prediction_error: HistogramVec::new(
                HistogramOpts::new(
                    "kvmesh_ttft_prediction_error_seconds",
                    "Absolute error of the predicted TTFT of this node's engines' streamed answers, by model: learned (fitted online, scored before learning from the answer) or fixed (the score weights).",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
                &["model"],
            )?,
            flow_queued: IntGaugeVec::new(
                Opts::new("kvmesh_flow_queued_requests", "Requests held by flow control now, by model and priority band."),
                &["model_name", "priority"],
            )?,
            flow_held: IntCounterVec::new(
                Opts::new("kvmesh_flow_held_total", "Requests held by flow control (not sent to an engine at once), by band."),
                &["priority"],
            )?,
            flow_shed: IntCounterVec::new(
                Opts::new("kvmesh_flow_shed_total", "Requests flow control answered 429 or 503 without serving, by reason."),
                &["reason"],
            )?,
            flow_wait: HistogramVec::new(
                HistogramOpts::new("kvmesh_flow_wait_seconds", "Time requests were held by flow control, by band.")
                    .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["priority"],
            )?,
            flow_saturation: GaugeVec::new(
                Opts::new(
                    "kvmesh_flow_saturation",
                    "Requests waiting at engines and held across the mesh over the waiting places of usable engines, per model (1: saturated; autoscale on it).",
                ),
                &["model_name"],
            )?,
            flow_free: GaugeVec::new(
                Opts::new("kvmesh_flow_free_slots", "Waiting places free on the engines that serve a model, as this node sees them."),
                &["model_name"],
            )?,
            gossip_peers: IntGauge::new("kvmesh_gossip_peers", "Live peers in this node's view (itself not counted).")?,
            gossip_bytes: IntCounterVec::new(
                Opts::new("kvmesh_gossip_bytes_total", "Gossip payload bytes on QUIC, by direction (sent, received)."),
                &["direction"],
            )?,
            gossip_dropped: IntCounter::new(
                "kvmesh_gossip_dropped_total",
                "Gossip messages lost: failed sends and arrivals on a full inbox (gossip repeats them).",
            )?,
            gossip_rejected: IntCounter::new(
                "kvmesh_gossip_rejected_states_total",
                "Gossip refused by the signature checks: node sections left out of messages, messages over the bound, states left out of the view.",
            )?,
            refused_connections: IntCounter::new(
                "kvmesh_mesh_refused_connections_total",
                "Mesh connections refused (no certificate, another CA, wrong ALPN).",
            )?,
            heartbeat_age: GaugeVec::new(
                Opts::new(
                    "kvmesh_gossip_heartbeat_age_seconds",
                    "Time since the peer's heartbeat last advanced in this node's view (to within a gossip round).",
                ),
                &["peer"],
            )?,
            max_heartbeat_age: Gauge::new(
                "kvmesh_gossip_max_heartbeat_age_seconds",
                "The largest kvmesh_gossip_heartbeat_age_seconds: how stale this node's view of the mesh is.",
            )?,
            scrape: Mutex::new(()),
            served_models: Mutex::default(),
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.http_connections_refused.clone()),
            Box::new(m.ttfb.clone()),
            Box::new(m.duration.clone()),
            Box::new(m.retries.clone()),
            Box::new(m.stream_errors.clone()),
            Box::new(m.route_decisions.clone()),
            Box::new(m.pd_fallbacks.clone()),
            Box::new(m.guardrail_verdicts.clone()),
            Box::new(m.auth_failures.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.audit.queue_depth.clone()),
            Box::new(m.audit.written.clone()),
            Box::new(m.audit.dropped.clone()),
            Box::new(m.audit.write_errors.clone()),
            Box::new(m.tokenize_requests.clone()),
            Box::new(m.prompt_length_checks.clone()),
            Box::new(m.prompt_length_mismatches.clone()),
            Box::new(m.cached_predicted.clone()),
            Box::new(m.cached_reported.clone()),
            Box::new(m.cached_error.clone()),
            Box::new(m.tokenize_tokens.clone()),
            Box::new(m.tokenize_seconds.clone()),
            Box::new(m.tokenize_queue.clone()),
            Box::new(m.tokenizer_memory.clone()),
            Box::new(m.engine_up.clone()),
            Box::new(m.engine_in_flight.clone()),
            Box::new(m.engine_running.clone()),
            Box::new(m.engine_waiting.clone()),
            Box::new(m.engine_kv_usage.clone()),
            Box::new(m.kv_batches.clone()),
            Box::new(m.kv_gaps.clone()),
            Box::new(m.kv_resync.clone()),
            Box::new(m.kv_cached_blocks.clone()),
            Box::new(m.route_history_keys.clone()),
            Box::new(m.inter_token.clone()),
            Box::new(LatencySummary::new([
                ("ttft", m.recent_ttft.clone()),
                ("inter_token", m.recent_itl.clone()),
                ("e2e", m.recent_e2e.clone()),
            ])?),
            Box::new(m.draining.clone()),
            Box::new(m.ttft_prediction_error.clone()),
            Box::new(m.flow_queued.clone()),
            Box::new(m.flow_held.clone()),
            Box::new(m.flow_shed.clone()),
            Box::new(m.flow_wait.clone()),
            Box::new(m.flow_saturation.clone()),
            Box::new(m.flow_free.clone()),
            Box::new(m.gossip_peers.clone()),
            Box::new(m.gossip_bytes.clone()),
            Box::new(m.gossip_dropped.clone()),
            Box::new(m.gossip_rejected.clone()),
            Box::new(m.refused_connections.clone()),
            Box::new(m.heartbeat_age.clone()),
            Box::new(m.max_heartbeat_age.clone()),
        ] {
            m.registry.register(c)?;
        }
        // Which build is running, as Prometheus exporters conventionally say it.
        let build = prometheus::IntGaugeVec::new(
            Opts::new("kvmesh_build_info", "The running build: always 1, labelled with its version."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m.registry.register(Box::new(build))?;
        // The process's CPU, memory and file descriptors (`process_*`, Linux only).
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(m)
    }

    /// Prometheus text; engine and mesh figures are read from their sources at scrape time.
    pub fn render(&self, engines: &EngineSet, mesh: Option<&Mesh>) -> String {
        let _one_at_a_time = self.scrape.lock();
        for e in &engines.engines {
            let v = e.snapshot();
            let l = [e.name.as_str()];
            self.engine_up.with_label_values(&l).set(v.healthy as i64);
            self.engine_in_flight.with_label_values(&l).set(e.in_flight.load(Ordering::Relaxed) as i64);
            self.engine_running.with_label_values(&l).set(v.load.running);
            self.engine_waiting.with_label_values(&l).set(v.load.waiting);
            self.engine_kv_usage.with_label_values(&l).set(v.load.kv_usage);
            // The engine's own counts only rise: each counter catches up with its count.
            for (counter, count) in [(&self.kv_batches, &e.kv.batches), (&self.kv_gaps, &e.kv.gaps)] {
                let c = counter.with_label_values(&l);
                c.inc_by(count.load(Ordering::Relaxed).saturating_sub(c.get()));
            }
            // The subscriber counts in atomics; the counter catches up at scrape time.
            for (outcome, n) in [("replayed", &e.kv.resync_replayed), ("dropped", &e.kv.resync_dropped)] {
                let c = self.kv_resync.with_label_values(&[e.name.as_str(), outcome]);
                c.inc_by(n.load(Ordering::Relaxed).saturating_sub(c.get()));
            }
            let cached = e.kv.cached_blocks();
            self.kv_cached_blocks.with_label_values(&l).set(cached as i64);
            let routed = e.routed.lock().map(|r| r.len()).unwrap_or(0);
            self.route_history_keys.with_label_values(&l).set(routed as i64);
        }
        if let Some(mesh) = mesh {
            self.observe_mesh(mesh);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn observe_mesh(&self, mesh: &Mesh) {
        let peers = mesh.peers();
        self.gossip_peers.set(peers.iter().filter(|p| !p.is_self).count() as i64);
        let stats = &mesh.endpoint.stats;
        let mirror = |c: &IntCounter, now: u64| {
            let seen = c.get();
            if now > seen {
                c.inc_by(now - seen);
            }
        };
        mirror(&self.gossip_bytes.with_label_values(&["sent"]), stats.gossip_bytes_sent.load(Ordering::Relaxed));
        mirror(
            &self.gossip_bytes.with_label_values(&["received"]),
            stats.gossip_bytes_received.load(Ordering::Relaxed),
        );
        mirror(&self.gossip_dropped, stats.gossip_dropped.load(Ordering::Relaxed));
        mirror(&self.gossip_rejected, mesh.membership.rejected_states());
        mirror(&self.refused_connections, stats.refused_connections.load(Ordering::Relaxed));
        // Peers that left must not keep reporting their last age.
        self.heartbeat_age.reset();
        let ages = mesh.membership.heartbeat_ages();
        for (peer, age) in &ages {
            self.heartbeat_age.with_label_values(&[peer]).set(age.as_secs_f64());
        }
        self.max_heartbeat_age.set(ages.iter().map(|(_, a)| a.as_secs_f64()).fold(0.0, f64::max));
    }
}
