//! Prompt token ids cut into KV blocks and chain-hashed, the way paged-attention engines key
//! their prefix cache: block i's key covers block i's tokens and, through the parent key, every
//! token before it. Two prompts share block i's key only if they share the whole prefix.
//!
//! Engines' own hashes depend on engine settings (hash algorithm, seed), so routers re-hash the
//! `token_ids` engines publish into these keys rather than trusting engine hashes.

use xxhash_rust::xxh3::Xxh3;

/// Seed of a hash chain: requests share cached blocks only within one model, LoRA adapter and
/// cache salt (vLLM mixes the adapter and salt into its block hashes for the same reason).
pub fn chain_seed(model: &str, lora: Option<&str>, cache_salt: Option<&str>) -> u64 {
    let mut h = Xxh3::new();
    for part in [Some(model), lora, cache_salt] {
        match part {
            Some(s) => {
                h.update(&[1]);
                h.update(&(s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            None => h.update(&[0]),
        }
    }
    h.digest()
}

/// Key of one full block, given its parent's key (or the chain seed for the first block).
pub fn block_key(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = Xxh3::with_seed(parent);
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    h.digest()
}

/// Keys of every full block of `tokens`; a trailing partial block has no key (engines do not
/// cache it either).
pub fn block_keys(seed: u64, tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut keys = Vec::with_capacity(tokens.len() / block_size.max(1));
    extend_block_keys(&mut keys, seed, tokens, block_size);
    keys
}

/// Extends `keys` (the keys of the first `keys.len()` full blocks of `tokens`) with the keys of
/// any further full blocks, so growing sequences are hashed once.
pub fn extend_block_keys(keys: &mut Vec<u64>, seed: u64, tokens: &[u32], block_size: usize) {
    if block_size == 0 {
        return;
    }
    let mut parent = keys.last().copied().unwrap_or(seed);
    for chunk in tokens.chunks_exact(block_size).skip(keys.len()) {
        parent = block_key(parent, chunk);
        keys.push(parent);
    }
}

/// Bytes of prompt text per approximate block: about 64 tokens of English at ~4 bytes a token.
pub const APPROX_CHUNK_BYTES: usize = 256;
/// The tokens an approximate block stands for, for scoring.
pub const APPROX_CHUNK_TOKENS: u32 = (APPROX_CHUNK_BYTES / 4) as u32;

/// Approximate block keys for a model with no tokenizer (as llm-d's approximate prefix scorer
/// does): the prompt's text, in order, cut into `APPROX_CHUNK_BYTES`-byte chunks and
/// chain-hashed. They say nothing about what an engine reports, only about what this node has
/// routed (`route_history`); the seed is moved to its own domain so they never equal token keys.
pub fn text_chunk_keys(seed: u64, parts: &[&str]) -> Vec<u64> {
    let total: usize = parts.iter().map(|p| p.len() + 1).sum();
    let mut text = Vec::with_capacity(total);
    for p in parts {
        text.extend_from_slice(p.as_bytes());
        // A separator, so that ["ab", "c"] and ["a", "bc"] differ.
        text.push(0);
    }
    let mut parent = seed ^ 0x7465_7874_6368_756e; // "textchun"
    text.chunks_exact(APPROX_CHUNK_BYTES)
        .map(|c| {
            parent = xxhash_rust::xxh3::xxh3_64_with_seed(c, parent);
            parent
        })
        .collect()
}

/// The chain key of block `depth` (1-based), or of the last block of a shorter chain: it stands
/// for the prefix up to there. `None` for no blocks or a depth of 0.
pub fn key_at_depth(keys: &[u64], depth: usize) -> Option<u64> {
    keys.get(keys.len().min(depth).checked_sub(1)?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn text_keys_share_exactly_the_common_prefix() {
        let doc = "shared document text ".repeat(60);
        let a = text_chunk_keys(1, &["system", &doc, "user", "question one"]);
        let b =
            text_chunk_keys(1, &["system", &doc, "user", "a different and much longer question ".repeat(9).as_str()]);
        let common = ("system".len() + 1 + doc.len() + 1) / APPROX_CHUNK_BYTES;
        assert!(common >= 4);
        assert_eq!(a[..common], b[..common]);
        assert_ne!(b.get(common + 1), a.get(common + 1));
        assert_ne!(text_chunk_keys(2, &[&doc])[0], text_chunk_keys(1, &[&doc])[0]);
        assert!(text_chunk_keys(1, &["short"]).is_empty());
    }

    #[test]
    fn partial_block_has_no_key() {
        assert_eq!(block_keys(1, &[1, 2, 3], 4).len(), 0);
        assert_eq!(block_keys(1, &[1, 2, 3, 4, 5], 4).len(), 1);
    }

    #[test]
    fn seed_separates_models_and_salts() {
        let a = chain_seed("m", None, None);
        assert_ne!(a, chain_seed("m", Some("lora"), None));
        assert_ne!(a, chain_seed("m", None, Some("salt")));
        assert_ne!(chain_seed("m", Some("x"), None), chain_seed("m", None, Some("x")));
    }

    proptest! {
        #[test]
        fn shared_prefix_shares_exactly_its_blocks(
            prefix in proptest::collection::vec(0u32..1000, 0..64),
            a in proptest::collection::vec(0u32..1000, 1..32),
            b in proptest::collection::vec(0u32..1000, 1..32),
        ) {
            prop_assume!(a[0] != b[0]);
            let bs = 4;
            let ka = block_keys(7, &[prefix.clone(), a].concat(), bs);
            let kb = block_keys(7, &[prefix.clone(), b].concat(), bs);
            let full = prefix.len() / bs;
            prop_assert_eq!(&ka[..full], &kb[..full]);
            if ka.len() > full && kb.len() > full {
                prop_assert_ne!(ka[full], kb[full]);
            }
        }

        #[test]
        fn incremental_equals_whole(tokens in proptest::collection::vec(any::<u32>(), 0..100), cut in 0usize..100) {
            let bs = 8;
            let cut = cut.min(tokens.len());
            let mut keys = block_keys(3, &tokens[..cut], bs);
            extend_block_keys(&mut keys, 3, &tokens, bs);
            prop_assert_eq!(keys, block_keys(3, &tokens, bs));
        }
    }
}
