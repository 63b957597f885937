//! Compact, sharded summaries of the KV blocks a node holds, for gossip.
//!
//! A node publishes a Bloom filter of the kvmesh block keys its engines hold (the union of
//! their exact indexes). Keys are split into 16 shards by their top 4 bits, one Bloom filter
//! each, so a change re-gossips only the shards it touched. A peer counts a request's leading
//! blocks found in the filter as cached there.
//!
//! Sizing:
//! - 10 bits per key and 7 hash functions give a false-positive rate of about 0.8% per block
//!   lookup at capacity (the `fpr_at_capacity_is_within_bound` test measures it).
//! - Capacity is the node's total GPU blocks, capped at `MAX_CAPACITY_KEYS`. That bounds a
//!   node's summary to 16 shards of at most 10 KB each (160 KB at the cap).
//! - A false positive can only extend a match, by one block with probability ~0.8%, two with
//!   ~0.006%, and so on. It never hides a real match.
//!
//! Sampling (`stride`): a summary holds only the keys whose hash is 0 modulo the stride, one
//! block in `stride` on average. A chain key stands for its whole prefix, so the deepest
//! sampled key of a request that the summary holds gives the match, short of the true one by
//! the blocks after it (`stride` - 1 on average; 7 blocks, 112 tokens, at the default 8: a few
//! ms of prefill, small beside the thousands of tokens a useful match saves). The filter is
//! sized for the sampled keys, so the summary, its churn and its gossip shrink by the stride.
//! The stride travels with the summary (`KvSummarySlot::stride`); a node that predates it
//! matches with stride 1 and so only under-counts.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const SHARDS: usize = 16;
pub const BITS_PER_KEY: usize = 10;
pub const HASHES: u32 = 7;
/// Upper bound on keys a summary is sized for (8 engines of 16k blocks).
pub const MAX_CAPACITY_KEYS: usize = 131_072;
/// Default sampling stride of a published summary.
pub const DEFAULT_STRIDE: u32 = 8;
/// Largest stride accepted from a peer (a bigger one would make matches meaningless).
pub const MAX_STRIDE: u32 = 64;

/// Whether a key belongs to a summary sampled with `stride`.
pub fn in_sample(key: u64, stride: u32) -> bool {
    stride <= 1 || key.is_multiple_of(stride as u64)
}

pub fn shard_of(key: u64) -> usize {
    (key >> 60) as usize
}

/// One shard's Bloom filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BloomShard {
    bits: Vec<u64>,
}

impl BloomShard {
    /// Sized for `capacity` keys in the whole summary (this shard gets 1/16 of them).
    pub fn with_capacity(capacity: usize) -> Self {
        let per_shard = capacity.clamp(SHARDS, MAX_CAPACITY_KEYS) / SHARDS;
        let words = (per_shard * BITS_PER_KEY).div_ceil(64).max(1);
        Self { bits: vec![0; words] }
    }

    fn m(&self) -> u64 {
        self.bits.len() as u64 * 64
    }

    /// Bit positions of a key: double hashing from the key itself (already a 64-bit hash),
    /// after dropping the top bits that chose the shard.
    fn positions(&self, key: u64) -> impl Iterator<Item = u64> + '_ {
        let h1 = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let h2 = key.rotate_left(29).wrapping_mul(0xC2B2_AE3D_27D4_EB4F) | 1;
        let m = self.m();
        (0..HASHES as u64).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
    }

    pub fn insert(&mut self, key: u64) {
        let pos: Vec<u64> = self.positions(key).collect();
        for p in pos {
            self.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    pub fn contains(&self, key: u64) -> bool {
        self.positions(key).all(|p| self.bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
    }

    /// Fraction of bits that differ from `other` (1.0 if the sizes differ).
    pub fn difference(&self, other: &BloomShard) -> f64 {
        if self.bits.len() != other.bits.len() {
            return 1.0;
        }
        let diff: u32 = self.bits.iter().zip(&other.bits).map(|(a, b)| (a ^ b).count_ones()).sum();
        diff as f64 / self.m() as f64
    }

    pub fn encode(&self) -> String {
        let bytes: Vec<u8> = self.bits.iter().flat_map(|w| w.to_le_bytes()).collect();
        serde_json::to_string(&WireShard { v: 1, b: base64::engine::general_purpose::STANDARD.encode(bytes) })
            .unwrap_or_default()
    }

    /// Parses a gossiped shard; `None` for anything malformed or oversized (a peer's bad
    /// summary then counts as "nothing cached", never as a panic).
    pub fn decode(s: &str) -> Option<Self> {
        let w: WireShard = serde_json::from_str(s).ok()?;
        if w.v != 1 {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD.decode(w.b.as_bytes()).ok()?;
        let max_bytes = (MAX_CAPACITY_KEYS / SHARDS * BITS_PER_KEY).div_ceil(64) * 8;
        if bytes.is_empty() || bytes.len() % 8 != 0 || bytes.len() > max_bytes {
            return None;
        }
        Some(Self { bits: bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect() })
    }
}

#[derive(Serialize, Deserialize)]
struct WireShard {
    v: u32,
    b: String,
}

/// All shards of a summary of `keys` sampled with `stride`; `capacity` is the number of keys
/// the node can hold before sampling.
pub fn build(keys: impl Iterator<Item = u64>, capacity: usize, stride: u32) -> Vec<BloomShard> {
    let stride = stride.max(1);
    let mut shards = vec![BloomShard::with_capacity(capacity.div_ceil(stride as usize)); SHARDS];
    for k in keys.filter(|&k| in_sample(k, stride)) {
        shards[shard_of(k)].insert(k);
    }
    shards
}

/// Leading blocks of a request's chain that a peer's summary, sampled with `stride`, says it
/// holds: up to and including the deepest sampled key found before the first sampled miss.
pub fn matched_blocks(shards: &[Option<std::sync::Arc<BloomShard>>], keys: &[u64], stride: u32) -> usize {
    let held = |k: u64| shards.get(shard_of(k)).and_then(|s| s.as_ref()).is_some_and(|s| s.contains(k));
    let mut matched = 0;
    for (i, &k) in keys.iter().enumerate().filter(|(_, &k)| in_sample(k, stride)) {
        if !held(k) {
            break;
        }
        matched = i + 1;
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn key(i: u64) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())
    }

    #[test]
    fn fpr_at_capacity_is_within_bound() {
        let capacity = 28_000;
        let shards = build((0..capacity as u64).map(key), capacity, 1);
        for i in 0..capacity as u64 {
            assert!(shards[shard_of(key(i))].contains(key(i)), "no false negatives");
        }
        let trials = 200_000u64;
        let fp = (0..trials).map(|i| key(10_000_000 + i)).filter(|&k| shards[shard_of(k)].contains(k)).count();
        let rate = fp as f64 / trials as f64;
        // 10 bits/key, 7 hashes: theory 0.82%; allow for shard imbalance.
        assert!(rate < 0.012, "false-positive rate {rate}");
        let bytes: usize = shards.iter().map(|s| s.encode().len()).sum();
        assert!(bytes < 50_000, "28k-block summary is {bytes} bytes on the wire");
    }

    #[test]
    fn wire_roundtrip_and_matching() {
        let keys: Vec<u64> = (0..50).map(key).collect();
        let shards = build(keys[..30].iter().copied(), 1000, 1);
        let decoded: Vec<Option<Arc<BloomShard>>> =
            shards.iter().map(|s| BloomShard::decode(&s.encode()).map(Arc::new)).collect();
        assert_eq!(decoded.iter().flatten().count(), SHARDS);
        let m = matched_blocks(&decoded, &keys, 1);
        assert!((30..=31).contains(&m), "{m}");
        assert_eq!(matched_blocks(&vec![None; SHARDS], &keys, 1), 0);
    }

    #[test]
    fn sampled_summaries_match_to_the_last_sampled_key_and_shrink_by_the_stride() {
        let stride = DEFAULT_STRIDE;
        let chain: Vec<u64> = (0..400).map(key).collect();
        let held = 300;
        let full = build(chain[..held].iter().copied(), 28_000, 1);
        let sampled = build(chain[..held].iter().copied(), 28_000, stride);
        let wrap =
            |v: Vec<BloomShard>| -> Vec<Option<Arc<BloomShard>>> { v.into_iter().map(|s| Some(Arc::new(s))).collect() };
        let m = matched_blocks(&wrap(sampled.clone()), &chain, stride);
        let last_sampled = chain[..held].iter().rposition(|&k| in_sample(k, stride)).map_or(0, |i| i + 1);
        assert!(m >= last_sampled && m <= held + 8, "match {m}, last sampled key at {last_sampled}");
        assert!(held - last_sampled < 8 * stride as usize, "a 300-block chain has a sampled key near its end");
        let bytes = |v: &[BloomShard]| v.iter().map(|s| s.encode().len()).sum::<usize>();
        assert!(bytes(&sampled) * (stride as usize) / 2 < bytes(&full), "{} vs {}", bytes(&sampled), bytes(&full));
        // A node that predates sampling reads it with stride 1: it can only under-count.
        assert!(matched_blocks(&wrap(sampled), &chain, 1) <= m);
    }

    #[test]
    fn difference_measures_change() {
        let a = build((0..100).map(key), 1000, 1);
        let b = build((0..110).map(key), 1000, 1);
        let d: f64 = a.iter().zip(&b).map(|(x, y)| x.difference(y)).sum();
        assert!(d > 0.0);
        assert_eq!(a[0].difference(&a[0]), 0.0);
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in "\\PC{0,300}") {
            let _ = BloomShard::decode(&s);
        }

        #[test]
        fn decode_of_random_base64_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let b = base64::engine::general_purpose::STANDARD.encode(bytes);
            let _ = BloomShard::decode(&format!("{{\"v\":1,\"b\":\"{b}\"}}"));
        }
    }
}
