//! The alarm for silent misses: every answer's `usage` checked against what the router
//! predicted for the engine it chose.
//!
//! When the router's token ids are not the engine's (another chat template, another tokenizer,
//! fields the router did not render), its block keys match nothing in the engine's KV events and
//! routing quietly falls back to load. The engine's own count gives it away: its
//! `usage.prompt_tokens` differs from the router's prompt length, and its
//! `usage.prompt_tokens_details.cached_tokens` from the cached tokens the router expected. Both
//! are counted per model (`kvmesh_prompt_length_checks_total`,
//! `kvmesh_prompt_length_mismatches_total`, `kvmesh_cached_tokens_predicted_total`,
//! `kvmesh_cached_tokens_reported_total`, `kvmesh_cached_tokens_prediction_error_tokens`),
//! shown per model in `/v1/mesh/status` (`key_agreement`), and a model whose lengths disagree is
//! named in a warning (its first mismatch, then every 1,000th).
//!
//! Only prompts this node tokenized exactly and chose the engine for are checked (not a prompt a
//! peer will place among its engines: the peer checks it), never one with media parts (their
//! placeholders expand in the engine), and only answers that carry usage (every non-streamed
//! answer; a stream when the client asked for `include_usage`, and only when the usage event
//! arrives within one chunk). Cached tokens are compared only when the engine reports them
//! (vLLM's `--enable-prompt-tokens-details`).

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use crate::metrics::NodeMetrics;

/// Models tracked at most (each is a model this node has a tokenizer for; the bound is a guard).
const MAX_MODELS: usize = 256;

/// What the router expects the engine to report for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub model: String,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

/// Per model: answers checked, and those whose prompt length differed.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Agreement {
    pub checked: u64,
    pub length_mismatches: u64,
}

#[derive(Default)]
pub struct KeyAgreement {
    by_model: Mutex<HashMap<String, Agreement>>,
}

/// `prompt_tokens` and, when the engine reports it, `cached_tokens` from an answer's `usage`
/// (vLLM's shape; vLLM reports cached tokens only with `--enable-prompt-tokens-details`).
pub fn usage_of(v: &Value) -> Option<(u64, Option<u64>)> {
    let usage = v.get("usage")?;
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let cached = usage.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64);
    Some((prompt, cached))
}

/// The usage in one SSE chunk (the last data event that carries one), if any.
pub fn usage_in_chunk(chunk: &[u8]) -> Option<(u64, Option<u64>)> {
    if !chunk.windows(8).any(|w| w == b"\"usage\":") {
        return None;
    }
    let text = std::str::from_utf8(chunk).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("data:").map(str::trim))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| usage_of(&v))
        .next_back()
}

impl KeyAgreement {
    /// Compares what the engine reported with what was expected, and counts it.
    pub fn check(&self, metrics: &NodeMetrics, expected: &Expected, reported: (u64, Option<u64>)) {
        let (prompt, cached) = reported;
        let model = expected.model.as_str();
        let mismatch = prompt != expected.prompt_tokens as u64;
        metrics.prompt_length_checks.with_label_values(&[model]).inc();
        if mismatch {
            metrics.prompt_length_mismatches.with_label_values(&[model]).inc();
        }
        if let Some(cached) = cached {
            metrics.cached_predicted.with_label_values(&[model]).inc_by(expected.cached_tokens as u64);
            metrics.cached_reported.with_label_values(&[model]).inc_by(cached);
            let error = (expected.cached_tokens as f64 - cached as f64).abs();
            metrics.cached_error.with_label_values(&[model]).observe(error);
        }
        let Ok(mut m) = self.by_model.lock() else { return };
        if !m.contains_key(model) && m.len() >= MAX_MODELS {
            return;
        }
        let a = m.entry(model.to_owned()).or_default();
        a.checked += 1;
        if mismatch {
            a.length_mismatches += 1;
            if a.length_mismatches % 1000 == 1 {
                tracing::warn!(
                    model,
                    router_prompt_tokens = expected.prompt_tokens,
                    engine_prompt_tokens = prompt,
                    mismatches = a.length_mismatches,
                    checked = a.checked,
                    "this node's prompt length differs from the engine's: its block keys match nothing the engine caches, and routing for this model falls back to load (check the model's tokenizer and chat template)"
                );
            }
        }
    }

    /// Per model, as `/v1/mesh/status` shows it.
    pub fn snapshot(&self) -> Vec<(String, Agreement)> {
        let mut out: Vec<(String, Agreement)> =
            self.by_model.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect()).unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_answers_and_stream_chunks() {
        let v = serde_json::json!({"usage": {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}});
        assert_eq!(usage_of(&v), Some((40, Some(32))));
        assert_eq!(usage_of(&serde_json::json!({"usage": {"prompt_tokens": 7}})), Some((7, None)));
        assert_eq!(usage_of(&serde_json::json!({"choices": []})), None);
        let chunk = b"data: {\"choices\":[]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n";
        assert_eq!(usage_in_chunk(chunk), Some((9, Some(0))));
        assert_eq!(usage_in_chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"), None);
    }
}
