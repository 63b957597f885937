//! Engine-simulator settings: what vLLM would take as flags, plus the timing constants.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::Scheduling;
use crate::error::SimError;
use crate::timing::TimingModel;

/// One simulated engine. Field names follow vLLM's flags where one exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Model name the engine serves (vLLM's `--served-model-name`).
    #[arg(long = "model", default_value = "kvmesh-sim")]
    pub model: String,
    /// Hugging Face `tokenizer.json` (or a directory holding it and `tokenizer_config.json`).
    /// Without it, the small tokenizer compiled into kvmesh is used.
    #[arg(long = "tokenizer")]
    pub tokenizer: Option<PathBuf>,
    /// Context length; defaults to the tokenizer config's `model_max_length`.
    #[arg(long = "max-model-len")]
    pub max_model_len: Option<u32>,
    /// Tokens per KV block (vLLM default 16).
    #[arg(long = "block-size", default_value_t = 16)]
    pub block_size: u32,
    /// KV blocks on the GPU: 28,000 x 16 tokens is what an 8B model leaves on an 80 GB H100 at
    /// `gpu_memory_utilization` 0.90 (shared/design/engine-timing.md section 3).
    #[arg(long = "num-gpu-blocks", default_value_t = 28_000)]
    pub num_gpu_blocks: u32,
    /// vLLM's default for `vllm serve` on a >= 70 GiB GPU other than A100.
    #[arg(long = "max-num-seqs", default_value_t = 1024)]
    pub max_num_seqs: u32,
    /// Token budget of one scheduler step (chunked prefill); same source as `max_num_seqs`.
    #[arg(long = "max-num-batched-tokens", default_value_t = 8192)]
    pub max_num_batched_tokens: u32,
    #[arg(long = "enable-prefix-caching", default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_prefix_caching: bool,
    /// Seed of the engine's own block hashes. vLLM's hashes change with its hash settings and
    /// seed; by default this one changes per start too, so nothing downstream can rely on them.
    #[arg(long = "hash-seed")]
    pub hash_seed: Option<u64>,
    /// Seed of the generated filler text.
    #[arg(long = "seed", default_value_t = 0)]
    pub seed: u64,
    /// ZeroMQ topic of KV events (vLLM's `kv_events_config.topic`).
    #[arg(long = "kv-events-topic", default_value = "")]
    pub kv_events_topic: String,
    /// Batches kept for the KV-event replay socket (vLLM's `kv_events_config.buffer_steps`);
    /// used only when replay is on (`--kv-events-replay-addr`).
    #[arg(long = "kv-events-buffer-steps", default_value_t = 10_000)]
    pub kv_events_buffer_steps: usize,
    /// Multiplies every simulated duration: 1.0 is real time; tests use less to run faster.
    #[arg(long = "time-scale", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Largest request body accepted, in bytes.
    #[arg(long = "max-body-bytes", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Act as vLLM with NixlConnector: honour `kv_transfer_params` (prefill for a remote decode,
    /// or pull a remote prefill's KV instead of computing it). See `nixl`.
    #[arg(long = "kv-transfer")]
    pub kv_transfer: bool,
    /// KV bytes per token moved in a transfer (8B model, bf16: 32 layers x 8 KV heads x 128 x 2 x 2).
    #[arg(long = "kv-bytes-per-token", default_value_t = 131_072)]
    pub kv_bytes_per_token: u64,
    /// Link bandwidth of a KV transfer, GB/s (400G RDMA: ~40; engine-timing.md section 7).
    #[arg(long = "kv-link-gb-per-s", default_value_t = 40.0)]
    pub kv_link_gb_per_s: f64,
    /// Fixed cost of one KV transfer, ms.
    #[arg(long = "kv-transfer-overhead-ms", default_value_t = 2.0)]
    pub kv_transfer_overhead_ms: f64,
    /// How long offered blocks wait for a decode engine (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT).
    #[arg(long = "kv-transfer-ttl-s", default_value_t = 480)]
    pub kv_transfer_ttl_s: u64,
    /// More names for the model (vLLM's `--served-model-name` after the first): listed in
    /// `/v1/models` with the same `root`, and sharing its cached blocks.
    #[arg(long = "model-alias")]
    pub model_aliases: Vec<String>,
    /// LoRA adapters served beside the model, `NAME=PATH` (vLLM's `--lora-modules`): listed in
    /// `/v1/models` with `parent` the model; a request naming one runs with it, and its blocks
    /// are hashed with the adapter's name, as in vLLM.
    #[arg(long = "lora-modules")]
    pub lora_modules: Vec<String>,
    /// Blocks of a CPU offloading tier (vLLM's `--kv-offloading-size`, counted in blocks);
    /// 0: none. Every cached block is also stored there, and a prefix the GPU evicted is loaded
    /// back instead of recomputed; its events carry `medium` `CPU`.
    #[arg(long = "cpu-offload-blocks", default_value_t = 0)]
    pub cpu_offload_blocks: u32,
    /// Data-parallel ranks behind the one HTTP server (vLLM's `--data-parallel-size`): each rank
    /// has its own scheduler and KV cache, publishes KV events on the endpoint's port plus its
    /// rank, and labels its metrics `engine="{rank}"`. A request's `X-data-parallel-rank`
    /// header picks its rank; without one, ranks take requests in turn.
    #[arg(long = "data-parallel-size", default_value_t = 1)]
    pub data_parallel_size: u32,
    /// Bandwidth of loads from the offloading tier, GB/s (PCIe 5 x16 in practice: ~25).
    #[arg(long = "cpu-load-gb-per-s", default_value_t = 25.0)]
    pub cpu_load_gb_per_s: f64,
    /// vLLM's `--scheduling-policy`: `fcfs`, or `priority` (waiting requests by their
    /// `priority`, lower first, then arrival; preemption takes the last in that order). With
    /// `fcfs` a request whose `priority` is not 0 is refused, as vLLM refuses it.
    #[arg(long = "scheduling-policy", value_enum, default_value_t = Scheduling::Fcfs)]
    pub scheduling_policy: Scheduling,
    /// Step-time constants (TOML: an `[embedded.timing]` table).
    #[command(flatten)]
    pub timing: TimingModel,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            model: "kvmesh-sim".into(),
            tokenizer: None,
            max_model_len: None,
            block_size: 16,
            num_gpu_blocks: 28_000,
            max_num_seqs: 1024,
            max_num_batched_tokens: 8192,
            enable_prefix_caching: true,
            hash_seed: None,
            seed: 0,
            kv_events_topic: String::new(),
            kv_events_buffer_steps: 10_000,
            time_scale: 1.0,
            max_body_bytes: 32 * 1024 * 1024,
            kv_transfer: false,
            kv_bytes_per_token: 131_072,
            kv_link_gb_per_s: 40.0,
            kv_transfer_overhead_ms: 2.0,
            kv_transfer_ttl_s: 480,
            model_aliases: Vec::new(),
            lora_modules: Vec::new(),
            cpu_offload_blocks: 0,
            data_parallel_size: 1,
            cpu_load_gb_per_s: 25.0,
            scheduling_policy: Scheduling::Fcfs,
            timing: TimingModel::default(),
        }
    }
}

impl EngineConfig {
    /// Checks what the scheduler relies on; messages say what to change.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Config(m));
        if self.model.trim().is_empty() {
            return bad("--model must not be empty".into());
        }
        if self.block_size == 0 || self.block_size > 1024 {
            return bad(format!("--block-size must be in 1..=1024, got {}", self.block_size));
        }
        if self.num_gpu_blocks < 2 {
            return bad(format!("--num-gpu-blocks must be at least 2, got {}", self.num_gpu_blocks));
        }
        if self.max_num_seqs == 0 {
            return bad("--max-num-seqs must be at least 1".into());
        }
        if self.max_num_batched_tokens < self.block_size {
            return bad(format!(
                "--max-num-batched-tokens ({}) must be at least --block-size ({})",
                self.max_num_batched_tokens, self.block_size
            ));
        }
        let mut names = vec![self.model.as_str()];
        for a in &self.model_aliases {
            if a.trim().is_empty() || names.contains(&a.as_str()) {
                return bad(format!("--model-alias `{a}` must be a new, non-empty name"));
            }
            names.push(a);
        }
        for m in &self.lora_modules {
            match m.split_once('=') {
                Some((name, path)) if !name.trim().is_empty() && !path.trim().is_empty() && !names.contains(&name) => {
                    names.push(name)
                }
                _ => return bad(format!("--lora-modules `{m}`: expected NAME=PATH with a new, non-empty NAME")),
            }
        }
        if !(1..=64).contains(&self.data_parallel_size) {
            return bad(format!("--data-parallel-size must be in 1..=64, got {}", self.data_parallel_size));
        }
        if !(self.cpu_load_gb_per_s.is_finite() && self.cpu_load_gb_per_s > 0.0) {
            return bad(format!("--cpu-load-gb-per-s must be a positive number, got {}", self.cpu_load_gb_per_s));
        }
        if !(self.time_scale.is_finite() && self.time_scale >= 0.0) {
            return bad(format!("--time-scale must be a finite number >= 0, got {}", self.time_scale));
        }
        self.timing.validate().map_err(SimError::Config)
    }

    /// The LoRA adapters, `(name, path)`.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lora_modules.iter().filter_map(|m| m.split_once('='))
    }

    /// Time to load one token's KV from the offloading tier, ms.
    pub fn cpu_load_ms_per_token(&self) -> f64 {
        self.kv_bytes_per_token as f64 / (self.cpu_load_gb_per_s * 1e9) * 1e3
    }
}
