//! Deterministic output text: the same prompt and seed give the same tokens on every engine,
//! so aggregated and disaggregated serving (or a retry elsewhere) can be compared byte for byte.

use std::collections::HashMap;

use kvmesh_policy::tokenize::ModelTokenizer;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Vocabulary entries that decode on their own to plain lowercase words, used as output tokens.
#[derive(Debug, Clone)]
pub struct Filler {
    ids: Vec<u32>,
    texts: HashMap<u32, String>,
    seed: u64,
}

impl Filler {
    pub fn new(tokenizer: &ModelTokenizer, seed: u64) -> Self {
        let mut ids = Vec::new();
        let mut texts = HashMap::new();
        for id in 0..tokenizer.vocab_size() {
            if let Some(t) = tokenizer.plain_token_text(id) {
                if t.starts_with(" ") && t.len() >= 4 && t[1..].chars().all(|c| c.is_ascii_lowercase()) {
                    ids.push(id);
                    texts.insert(id, t);
                }
            }
        }
        if ids.is_empty() {
            // A vocabulary with no word-like entries still needs output: use whatever decodes.
            for id in 0..tokenizer.vocab_size() {
                if let Ok(t) = tokenizer.decode(&[id]) {
                    if !t.is_empty() {
                        ids.push(id);
                        texts.insert(id, t);
                    }
                }
            }
        }
        Self { ids, texts, seed }
    }

    /// Seed of one sequence's output, from its prompt and the request's `seed`.
    pub fn sequence_seed(&self, prompt: &[u32], request_seed: Option<u64>) -> u64 {
        let bytes: Vec<u8> = prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, self.seed ^ request_seed.unwrap_or(0))
    }

    /// The `index`-th output token of a sequence.
    pub fn token(&self, sequence_seed: u64, index: usize) -> u32 {
        if self.ids.is_empty() {
            return 0;
        }
        let h = xxh3_64_with_seed(&(index as u64).to_le_bytes(), sequence_seed);
        self.ids[(h % self.ids.len() as u64) as usize]
    }

    /// Text of a token this filler produced.
    pub fn text(&self, token: u32) -> &str {
        self.texts.get(&token).map(String::as_str).unwrap_or("")
    }

    /// How many tokens the model "wants" to say before its end-of-sequence, when the client
    /// sets no `max_tokens`: a real model stops on EOS; the simulator draws a length in 32..512.
    pub fn natural_length(&self, sequence_seed: u64) -> usize {
        32 + (xxh3_64_with_seed(b"len", sequence_seed) % 480) as usize
    }
}
