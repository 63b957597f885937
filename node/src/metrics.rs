//! The node's own Prometheus metrics (`kvmesh_*`), one registry per node so several nodes can
//! run in one process (tests, benchmarks).

use std::sync::atomic::Ordering;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::audit::AuditMetrics;

use crate::engine::EngineSet;
use crate::error::NodeError;

pub struct NodeMetrics {
    registry: Registry,
    /// Requests answered, by endpoint, model and HTTP status.
    pub requests: IntCounterVec,
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
    kv_batches: IntGaugeVec,
    kv_gaps: IntGaugeVec,
    kv_cached_blocks: IntGaugeVec,
}

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

impl NodeMetrics {
    pub fn new(node: &str) -> Result<Self, NodeError> {
        let registry = Registry::new_custom(None, Some([("node".to_owned(), node.to_owned())].into_iter().collect()))?;
        let engine = &["engine"];
        let m = Self {
            requests: IntCounterVec::new(
                Opts::new("kvmesh_requests_total", "Requests answered, by endpoint, model and HTTP status."),
                &["endpoint", "model", "status"],
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
            tokenize_requests: IntCounterVec::new(
                Opts::new("kvmesh_tokenize_requests_total", "Prompts through the tokenizer service, by outcome."),
                &["model", "outcome"],
            )?,
            tokenize_tokens: IntCounterVec::new(
                Opts::new("kvmesh_tokenize_tokens_total", "Prompt tokens by source of their ids (encoded, cache)."),
                &["model", "source"],
            )?,
            tokenize_seconds: HistogramVec::new(
                HistogramOpts::new("kvmesh_tokenize_seconds", "Time to tokenize a prompt on a tokenizer thread.")
                    .buckets(vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]),
                &["model"],
            )?,
            tokenize_queue: prometheus::IntGauge::new(
                "kvmesh_tokenize_queue",
                "Prompts waiting for a tokenizer thread.",
            )?,
            tokenizer_memory: IntGaugeVec::new(
                Opts::new("kvmesh_tokenizer_memory_bytes", "Tokenizer memory per model (loaded, segment_cache)."),
                &["model", "part"],
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
            kv_batches: IntGaugeVec::new(Opts::new("kvmesh_kv_event_batches", "KV-event batches received."), engine)?,
            kv_gaps: IntGaugeVec::new(
                Opts::new("kvmesh_kv_event_gaps", "Sequence gaps or restarts seen in KV events (view dropped)."),
                engine,
            )?,
            kv_cached_blocks: IntGaugeVec::new(
                Opts::new("kvmesh_kv_cached_blocks", "Blocks the engine holds, per its KV events."),
                engine,
            )?,
            registry,
        };
        for c in [
            Box::new(m.requests.clone()) as Box<dyn prometheus::core::Collector>,
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
            Box::new(m.kv_cached_blocks.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// Prometheus text; engine gauges are read from the engine views at scrape time.
    pub fn render(&self, engines: &EngineSet) -> String {
        for e in &engines.engines {
            let v = e.snapshot();
            let l = [e.name.as_str()];
            self.engine_up.with_label_values(&l).set(v.healthy as i64);
            self.engine_in_flight.with_label_values(&l).set(e.in_flight.load(Ordering::Relaxed) as i64);
            self.engine_running.with_label_values(&l).set(v.load.running);
            self.engine_waiting.with_label_values(&l).set(v.load.waiting);
            self.engine_kv_usage.with_label_values(&l).set(v.load.kv_usage);
            self.kv_batches.with_label_values(&l).set(e.kv.batches.load(Ordering::Relaxed) as i64);
            self.kv_gaps.with_label_values(&l).set(e.kv.gaps.load(Ordering::Relaxed) as i64);
            let cached = e.kv.cached_blocks();
            self.kv_cached_blocks.with_label_values(&l).set(cached as i64);
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
