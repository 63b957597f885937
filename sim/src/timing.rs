//! How long one scheduler step takes on the GPU.
//!
//! Defaults model vLLM v1 serving Llama-3.1-8B in bf16 on one H100-80GB SXM; every constant and
//! its source is in `shared/design/engine-timing.md` ("Recommended defaults"):
//! - `step_floor_ms` 6.5: streaming ~16 GB of weights at ~2.5 TB/s effective, plus launch and
//!   sampling; matches vLLM's ~6.5-7.5 ms inter-token latency at batch 1.
//! - `token_cost_ms` 0.021 above a knee of 128 tokens: the GEMM cost per token from Vidur's H100
//!   profile of Llama-2-7B scaled by FLOPs to Llama-3-8B (flat below ~128 tokens per step).
//! - `attn_pair_cost_ms` 9.5e-7 per causal (query, key) pair: attention at ~550 TFLOPS (FA3).
//!   Together with the above it reproduces vLLM's measured single-request TTFT of 263 ms at 10k
//!   tokens and 1.1 s at 30k (vLLM blog 2026-01-08, figure 1) within a few percent.
//! - `kv_read_ms_per_ctx_token` 6.6e-5: reading 128 KiB of KV per context token at ~2 TB/s.
//! - `per_seq_ms` 0.005: per-sequence bookkeeping in a step.
//! - `frontend_ms` 3.0: HTTP, tokenizing and detokenizing in vLLM's API server (estimate).
//!
//! `step = floor + token_cost*max(0, T-knee) + attn_pair*sum(q*p + q^2/2) + kv_read*sum(c) + per_seq*S`
//! with T scheduled tokens, S scheduled sequences, q new prefill tokens after p computed ones,
//! and c the context length of each decoding sequence.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct TimingModel {
    #[arg(long = "step-floor-ms", default_value_t = 6.5)]
    pub step_floor_ms: f64,
    #[arg(long = "token-cost-ms", default_value_t = 0.021)]
    pub token_cost_ms: f64,
    #[arg(long = "token-knee", default_value_t = 128)]
    pub token_knee: u32,
    #[arg(long = "attn-pair-cost-ms", default_value_t = 9.5e-7)]
    pub attn_pair_cost_ms: f64,
    #[arg(long = "kv-read-ms-per-ctx-token", default_value_t = 6.6e-5)]
    pub kv_read_ms_per_ctx_token: f64,
    #[arg(long = "per-seq-ms", default_value_t = 0.005)]
    pub per_seq_ms: f64,
    #[arg(long = "frontend-ms", default_value_t = 3.0)]
    pub frontend_ms: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        Self {
            step_floor_ms: 6.5,
            token_cost_ms: 0.021,
            token_knee: 128,
            attn_pair_cost_ms: 9.5e-7,
            kv_read_ms_per_ctx_token: 6.6e-5,
            per_seq_ms: 0.005,
            frontend_ms: 3.0,
        }
    }
}

/// The work in one step, summarized for the formula.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    pub scheduled_tokens: u64,
    pub scheduled_seqs: u64,
    /// sum over prefill chunks of q*p + q^2/2.
    pub attn_pairs: f64,
    /// sum over decoding sequences of their context length.
    pub decode_context_tokens: u64,
}

impl StepShape {
    pub fn add_prefill(&mut self, new_tokens: u64, computed_before: u64) {
        let q = new_tokens as f64;
        self.scheduled_tokens += new_tokens;
        self.scheduled_seqs += 1;
        self.attn_pairs += q * computed_before as f64 + q * q / 2.0;
    }

    pub fn add_decode(&mut self, context_tokens: u64) {
        self.scheduled_tokens += 1;
        self.scheduled_seqs += 1;
        self.decode_context_tokens += context_tokens;
    }
}

impl TimingModel {
    pub fn step_ms(&self, s: &StepShape) -> f64 {
        if s.scheduled_seqs == 0 {
            return 0.0;
        }
        self.step_floor_ms
            + self.token_cost_ms * s.scheduled_tokens.saturating_sub(self.token_knee as u64) as f64
            + self.attn_pair_cost_ms * s.attn_pairs
            + self.kv_read_ms_per_ctx_token * s.decode_context_tokens as f64
            + self.per_seq_ms * s.scheduled_seqs as f64
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("step-floor-ms", self.step_floor_ms),
            ("token-cost-ms", self.token_cost_ms),
            ("attn-pair-cost-ms", self.attn_pair_cost_ms),
            ("kv-read-ms-per-ctx-token", self.kv_read_ms_per_ctx_token),
            ("per-seq-ms", self.per_seq_ms),
            ("frontend-ms", self.frontend_ms),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("--{name} must be a finite number >= 0, got {v}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Single-request prefill as the chunked scheduler runs it (budget 8192 tokens per step).
    fn prefill_ms(m: &TimingModel, n: u64) -> f64 {
        let mut done = 0;
        let mut total = 0.0;
        while done < n {
            let q = (n - done).min(8192);
            let mut s = StepShape::default();
            s.add_prefill(q, done);
            total += m.step_ms(&s);
            done += q;
        }
        total
    }

    fn within(got: f64, want: f64, tol: f64) -> bool {
        (got - want).abs() / want <= tol
    }

    #[test]
    fn reproduces_vllm_published_prefill_within_15_percent() {
        let m = TimingModel::default();
        // vLLM blog 2026-01-08 figure 1: single-request TTFT, 8B on H100.
        for (n, measured_ms) in [(10_000, 263.0), (30_000, 1_099.0), (40_000, 1_648.0)] {
            let got = prefill_ms(&m, n) + m.frontend_ms;
            assert!(within(got, measured_ms, 0.15), "{n} tokens: model {got:.0} ms vs measured {measured_ms} ms");
        }
    }

    #[test]
    fn batched_prefill_throughput_near_measured() {
        // Same post, figure 2: ~43k tokens/s for 512-token prompts, prefix caching off.
        let m = TimingModel::default();
        let mut s = StepShape::default();
        for _ in 0..16 {
            s.add_prefill(512, 0);
        }
        let tok_per_s = 8192.0 / (m.step_ms(&s) / 1000.0);
        assert!(within(tok_per_s, 43_000.0, 0.15), "{tok_per_s:.0} tok/s");
    }

    #[test]
    fn decode_step_matches_observed_itl() {
        let m = TimingModel::default();
        let step = |batch: u64| {
            let mut s = StepShape::default();
            for _ in 0..batch {
                s.add_decode(1024);
            }
            m.step_ms(&s)
        };
        // engine-timing.md section 2: ~6.5-7.5 ms at batch 1, ~11 ms at batch 64 (1k context),
        // and vLLM's observed ~8 ms TPOT at low load.
        assert!(within(step(1), 7.0, 0.15), "{}", step(1));
        assert!(within(step(64), 11.0, 0.15), "{}", step(64));
        assert!(within(step(256), 28.3, 0.15), "{}", step(256));
        assert!(step(1) < step(8) && step(8) < step(64));
    }

    #[test]
    fn prefix_hit_cuts_prefill() {
        // Section 5: 6k cached + 1.2k new costs ~37 ms instead of ~180 ms for the full 7.2k.
        let m = TimingModel::default();
        let mut hit = StepShape::default();
        hit.add_prefill(1200, 6000);
        let full = prefill_ms(&m, 7200);
        assert!(within(m.step_ms(&hit), 37.0, 0.15), "{}", m.step_ms(&hit));
        assert!(within(full, 180.0, 0.15), "{full}");
    }
}
