//! vLLM's Prometheus metrics, with vLLM's names, labels and histogram buckets.

use prometheus::{Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

pub struct EngineMetrics {
    registry: Registry,
    pub running: Gauge,
    pub waiting: Gauge,
    pub kv_usage: Gauge,
    pub prefix_queries: IntCounter,
    pub prefix_hits: IntCounter,
    pub preemptions: IntCounter,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
    pub request_success: IntCounterVec,
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
];
const ITL_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
];

impl EngineMetrics {
    pub fn new(model: &str, block_size: u32, num_gpu_blocks: u32) -> Result<Self, prometheus::Error> {
        Self::for_rank(&Registry::new(), 0, model, block_size, num_gpu_blocks)
    }

    /// One data-parallel rank's series in a registry the ranks share: vLLM labels each rank's
    /// with `engine="{rank}"`.
    pub fn for_rank(
        registry: &Registry,
        rank: u32,
        model: &str,
        block_size: u32,
        num_gpu_blocks: u32,
    ) -> Result<Self, prometheus::Error> {
        let labels = || {
            let mut m = std::collections::HashMap::new();
            m.insert("model_name".to_owned(), model.to_owned());
            m.insert("engine".to_owned(), rank.to_string());
            m
        };
        let registry = registry.clone();
        let gauge = |name: &str, help: &str| Gauge::with_opts(Opts::new(name, help).const_labels(labels()));
        let counter = |name: &str, help: &str| IntCounter::with_opts(Opts::new(name, help).const_labels(labels()));
        let hist = |name: &str, help: &str, b: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).const_labels(labels()).buckets(b.to_vec()))
        };
        let m = Self {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches.")?,
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")?,
            kv_usage: gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")?,
            prefix_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
            )?,
            prefix_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
            )?,
            preemptions: counter("vllm:num_preemptions_total", "Cumulative number of preemption from the engine.")?,
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.")?,
            generation_tokens: counter("vllm:generation_tokens_total", "Number of generation tokens processed.")?,
            ttft: hist(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            )?,
            itl: hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)?,
            e2e: hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", E2E_BUCKETS)?,
            request_success: IntCounterVec::new(
                Opts::new("vllm:request_success_total", "Count of successfully processed requests.")
                    .const_labels(labels()),
                &["finished_reason"],
            )?,
            registry,
        };
        let info = Gauge::with_opts(
            Opts::new("vllm:cache_config_info", "Information of the LLMEngine CacheConfig")
                .const_label("block_size", block_size.to_string())
                .const_label("num_gpu_blocks", num_gpu_blocks.to_string())
                .const_label("enable_prefix_caching", "True")
                .const_label("engine", rank.to_string()),
        )?;
        info.set(1.0);
        m.registry.register(Box::new(info))?;
        for c in [
            Box::new(m.running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.waiting.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.prefix_queries.clone()),
            Box::new(m.prefix_hits.clone()),
            Box::new(m.preemptions.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.e2e.clone()),
            Box::new(m.request_success.clone()),
        ] {
            m.registry.register(c)?;
        }
        Ok(m)
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}
