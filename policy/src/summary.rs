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

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub const SHARDS: usize = 16;
pub const BITS_PER_KEY: usize = 10;
pub const HASHES: u32 = 7;
/// Upper bound on keys a summary is sized for (8 engines of 16k blocks).
pub const MAX_CAPACITY_KEYS: usize = 131_072;

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

/// All shards of a summary built from a set of keys.
pub fn build(keys: impl Iterator<Item = u64>, capacity: usize) -> Vec<BloomShard> {
    let mut shards = vec![BloomShard::with_capacity(capacity); SHARDS];
    for k in keys {
        shards[shard_of(k)].insert(k);
    }
    shards
}

/// Leading keys of a request's chain that a peer's summary says it holds.
pub fn matched_blocks(shards: &[Option<std::sync::Arc<BloomShard>>], keys: &[u64]) -> usize {
    keys.iter()
        .take_while(|&&k| shards.get(shard_of(k)).and_then(|s| s.as_ref()).is_some_and(|s| s.contains(k)))
        .count()
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
        let shards = build((0..capacity as u64).map(key), capacity);
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
        let shards = build(keys[..30].iter().copied(), 1000);
        let decoded: Vec<Option<Arc<BloomShard>>> =
            shards.iter().map(|s| BloomShard::decode(&s.encode()).map(Arc::new)).collect();
        assert_eq!(decoded.iter().flatten().count(), SHARDS);
        let m = matched_blocks(&decoded, &keys);
        assert!((30..=31).contains(&m), "{m}");
        assert_eq!(matched_blocks(&vec![None; SHARDS], &keys), 0);
    }

    #[test]
    fn difference_measures_change() {
        let a = build((0..100).map(key), 1000);
        let b = build((0..110).map(key), 1000);
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
