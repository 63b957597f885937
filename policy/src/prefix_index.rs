//! An exact index of the KV blocks one engine holds, keyed by kvmesh's own block keys.
//!
//! Engines publish their own block hashes, which depend on engine settings (hash algorithm,
//! seed), so the index re-hashes each `BlockStored`'s `token_ids` into kvmesh keys (chained
//! from the parent's kvmesh key) and keeps the engine-hash → key map to apply `BlockRemoved`.
//! A gap in event sequence numbers, or a sequence that goes backwards (engine restart), means
//! events were missed: the index is emptied and rebuilt from what arrives next. It may then
//! under-report what the engine holds, but never claims a block the engine may not have. (The
//! node's subscriber first tries to fetch the missed batches from the engine's replay socket
//! and applies them in order, so that `apply_batch` never sees the gap.)
//!
//! Two tiers are kept apart: blocks in the engine's GPU KV cache, and blocks an offloading
//! connector holds elsewhere (vLLM's `medium` `CPU`). An offloaded hit saves the prefill but
//! costs a load, so routing weighs it between a GPU hit and a miss; and a block removed from
//! one tier may still be held in the other. vLLM's offloading events carry only the blocks'
//! hashes (no tokens, no parent): they are keyed through the hash the GPU tier saw first.
//!
//! Blocks are keyed per identity (`models::KeySpace`): the engine's base model, or one of its
//! LoRA adapters (the event's `lora_name`), and the request's `cache_salt` on a chain's root.

use std::collections::HashMap;

use crate::blocks;

/// Where an engine holds a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tier {
    /// The engine's own GPU KV cache: a hit costs nothing.
    #[default]
    Gpu,
    /// Moved out by an offloading connector (CPU memory, disk): a hit costs a load.
    Offloaded,
}

/// One event, as decoded from the engine's wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexEvent {
    /// `salt`: the request's `cache_salt`, which vLLM mixes into the first block's hash (the
    /// event's `extra_keys`); a root block with one chains from the salted seed. `adapter`:
    /// the LoRA adapter the blocks were computed for (`lora_name`). Offloaded blocks may come
    /// without `token_ids` (vLLM's offloading connector sends hashes only).
    Stored {
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        salt: Option<String>,
        adapter: Option<String>,
        tier: Tier,
    },
    Removed {
        block_hashes: Vec<u64>,
        tier: Tier,
    },
    Cleared,
}

/// The blocks of one tier: kvmesh key -> how many engine hashes map to it (the same block
/// stored twice counts twice; a key is held while its count is above zero), and the engine
/// hash -> key map that `BlockRemoved` needs.
#[derive(Debug, Clone, Default)]
struct Held {
    keys: HashMap<u64, u32>,
    by_engine_hash: HashMap<u64, u64>,
}

impl Held {
    fn hold(&mut self, hash: u64, key: u64) {
        match self.by_engine_hash.insert(hash, key) {
            Some(old) if old == key => return,
            Some(old) => self.release_key(old),
            None => {}
        }
        *self.keys.entry(key).or_insert(0) += 1;
    }

    fn release_key(&mut self, key: u64) {
        if let Some(n) = self.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&key);
            }
        }
    }

    fn release(&mut self, hash: u64) {
        if let Some(k) = self.by_engine_hash.remove(&hash) {
            self.release_key(k);
        }
    }

    fn clear(&mut self) {
        self.keys.clear();
        self.by_engine_hash.clear();
    }
}

/// What applying a batch did to the index's trustworthiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    InOrder,
    /// Batches were missed: the index was emptied before applying this one.
    Gap {
        expected: u64,
        got: u64,
    },
    /// The sequence went backwards: the engine restarted; the index was emptied.
    Restart {
        last: u64,
        got: u64,
    },
}

#[derive(Debug, Clone)]
pub struct EngineIndex {
    seed: u64,
    /// The model the seed is of, to seed salted chains (`blocks::chain_seed`).
    model: Option<String>,
    block_size: Option<u32>,
    gpu: Held,
    offloaded: Held,
    last_seq: Option<u64>,
    /// Blocks whose parent was unknown (stored before a gap), so no key could be derived.
    pub unresolved: u64,
    pub resets: u64,
}

impl EngineIndex {
    /// `seed` is the chain seed of the engine's model (`blocks::chain_seed(model, None, None)`).
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            model: None,
            block_size: None,
            gpu: Held::default(),
            offloaded: Held::default(),
            last_seq: None,
            unresolved: 0,
            resets: 0,
        }
    }

    /// The index of an engine whose base model is keyed as `model` (`models::KeySpace::base`):
    /// chains seeded as `blocks::chain_seed(model, adapter, salt)`, so requests by any of the
    /// engine's names, for its adapters, and salted, match the blocks stored for them.
    pub fn for_model(model: &str) -> Self {
        Self { model: Some(model.to_owned()), ..Self::new(blocks::chain_seed(model, None, None)) }
    }

    /// GPU blocks held.
    pub fn len(&self) -> usize {
        self.gpu.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gpu.keys.is_empty()
    }

    /// Blocks held offloaded (another medium than the GPU).
    pub fn offloaded_len(&self) -> usize {
        self.offloaded.keys.len()
    }

    /// Block size the engine reported in its events, once any arrived.
    pub fn block_size(&self) -> Option<u32> {
        self.block_size
    }

    pub fn contains(&self, key: u64) -> bool {
        self.gpu.keys.contains_key(&key)
    }

    /// Leading blocks of `keys` (a request's chain) the engine holds on its GPU.
    pub fn matched_blocks(&self, keys: &[u64]) -> usize {
        keys.iter().take_while(|k| self.gpu.keys.contains_key(k)).count()
    }

    /// Blocks of `keys` after the first `from` that the engine holds offloaded, in a leading
    /// run: what vLLM's offloading connector would load instead of computing, after the GPU's
    /// own prefix hit of `from` blocks.
    pub fn offloaded_after(&self, keys: &[u64], from: usize) -> usize {
        keys.iter().skip(from).take_while(|k| self.offloaded.keys.contains_key(k)).count()
    }

    /// GPU block keys held (what the node summarizes for its peers).
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.gpu.keys.keys().copied()
    }

    /// Sequence number of the last batch applied, if any since the last `forget_sequence`.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Engine hashes of the GPU blocks held (what the engine's own cache would list).
    pub fn engine_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.gpu.by_engine_hash.keys().copied()
    }

    /// Empties the index and forgets the sequence: the next batch starts a new stream (the
    /// subscription was lost or the engine was down, so what follows is not checked against
    /// what came before, and there is nothing left to resync).
    pub fn reset_stream(&mut self) {
        self.reset();
        self.last_seq = None;
    }

    /// Forgets everything (gap, restart, lost subscription).
    pub fn reset(&mut self) {
        self.gpu.clear();
        self.offloaded.clear();
        self.resets += 1;
    }

    /// Applies one batch with its sequence number, checking for gaps and restarts first.
    pub fn apply_batch(&mut self, seq: u64, events: impl IntoIterator<Item = IndexEvent>) -> BatchOutcome {
        let outcome = match self.last_seq {
            Some(last) if seq == last.wrapping_add(1) => BatchOutcome::InOrder,
            Some(last) if seq <= last => BatchOutcome::Restart { last, got: seq },
            Some(last) => BatchOutcome::Gap { expected: last + 1, got: seq },
            None => BatchOutcome::InOrder,
        };
        if outcome != BatchOutcome::InOrder {
            self.reset();
        }
        self.last_seq = Some(seq);
        for e in events {
            self.apply(e);
        }
        outcome
    }

    /// The kvmesh key an engine hash stands for, in either tier.
    fn key_of(&self, hash: u64) -> Option<u64> {
        self.gpu.by_engine_hash.get(&hash).or_else(|| self.offloaded.by_engine_hash.get(&hash)).copied()
    }

    fn tier_mut(&mut self, tier: Tier) -> &mut Held {
        match tier {
            Tier::Gpu => &mut self.gpu,
            Tier::Offloaded => &mut self.offloaded,
        }
    }

    /// The key a root block chains from: the engine's base model or adapter, salted or not.
    fn root_seed(&self, adapter: Option<&str>, salt: Option<&str>) -> Option<u64> {
        match (&self.model, adapter, salt) {
            (_, None, None) => Some(self.seed),
            (Some(model), adapter, salt) => Some(blocks::chain_seed(model, adapter, salt)),
            // An adapter's or a salted block of an engine whose model is unknown cannot be keyed.
            (None, _, _) => None,
        }
    }

    pub fn apply(&mut self, e: IndexEvent) {
        match e {
            IndexEvent::Stored { block_hashes, tier: Tier::Offloaded, token_ids, .. } if token_ids.is_empty() => {
                // Hashes only: the blocks were on the GPU first, under the same engine hashes.
                for h in block_hashes {
                    match self.key_of(h) {
                        Some(k) => self.offloaded.hold(h, k),
                        None => self.unresolved += 1,
                    }
                }
            }
            IndexEvent::Stored { block_hashes, parent, token_ids, block_size, salt, adapter, tier } => {
                let bs = block_size as usize;
                if bs == 0 || token_ids.len() < block_hashes.len() * bs {
                    self.unresolved += block_hashes.len() as u64;
                    return;
                }
                if tier == Tier::Gpu {
                    self.block_size = Some(block_size);
                }
                let parent_key = match parent {
                    None => self.root_seed(adapter.as_deref(), salt.as_deref()),
                    Some(h) => self.key_of(h),
                };
                let Some(mut parent_key) = parent_key else {
                    self.unresolved += block_hashes.len() as u64;
                    return;
                };
                for (i, h) in block_hashes.iter().enumerate() {
                    let key = blocks::block_key(parent_key, &token_ids[i * bs..(i + 1) * bs]);
                    self.tier_mut(tier).hold(*h, key);
                    parent_key = key;
                }
            }
            IndexEvent::Removed { block_hashes, tier } => {
                let held = self.tier_mut(tier);
                for h in block_hashes {
                    held.release(h);
                }
            }
            IndexEvent::Cleared => {
                // vLLM clears its GPU prefix cache; what a connector holds may go with it
                // (`reset_prefix_cache` can reset the connector too). Forgetting both can only
                // under-count.
                self.gpu.clear();
                self.offloaded.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salted_blocks_chain_from_the_salted_seed() {
        let mut idx = EngineIndex::for_model("m");
        let tokens: Vec<u32> = (0..4).collect();
        let stored = |salt: Option<&str>, hashes: Vec<u64>| IndexEvent::Stored {
            block_hashes: hashes,
            parent: None,
            token_ids: tokens.clone(),
            block_size: 2,
            salt: salt.map(str::to_owned),
            adapter: None,
            tier: Tier::Gpu,
        };
        idx.apply(stored(Some("tenant-a"), vec![1, 2]));
        let keys = |salt| blocks::block_keys(blocks::chain_seed("m", None, salt), &tokens, 2);
        assert_eq!(idx.matched_blocks(&keys(Some("tenant-a"))), 2);
        assert_eq!(idx.matched_blocks(&keys(Some("tenant-b"))), 0, "another salt shares nothing");
        assert_eq!(idx.matched_blocks(&keys(None)), 0, "nor does an unsalted request");
        let mut unknown = EngineIndex::new(7);
        unknown.apply(stored(Some("tenant-a"), vec![3, 4]));
        assert!(unknown.is_empty(), "a salted block of an unknown model is not keyed");
    }

    #[test]
    fn adapter_blocks_key_apart_from_the_base_model() {
        let mut idx = EngineIndex::for_model("base");
        let tokens: Vec<u32> = (0..4).collect();
        idx.apply(IndexEvent::Stored {
            block_hashes: vec![1, 2],
            parent: None,
            token_ids: tokens.clone(),
            block_size: 2,
            salt: None,
            adapter: Some("sql".into()),
            tier: Tier::Gpu,
        });
        let keys = |adapter| blocks::block_keys(blocks::chain_seed("base", adapter, None), &tokens, 2);
        assert_eq!(idx.matched_blocks(&keys(Some("sql"))), 2);
        assert_eq!(idx.matched_blocks(&keys(None)), 0, "the base model shares none of an adapter's blocks");
        assert_eq!(idx.matched_blocks(&keys(Some("chat"))), 0, "nor does another adapter");
    }

    /// vLLM's offloading connector reports CPU blocks by hash only; they are keyed through the
    /// GPU tier, outlive the GPU copy, and a CPU removal never releases a GPU block.
    #[test]
    fn offloaded_blocks_are_a_tier_of_their_own() {
        let mut idx = EngineIndex::for_model("m");
        let tokens: Vec<u32> = (0..6).collect();
        let keys = blocks::block_keys(blocks::chain_seed("m", None, None), &tokens, 2);
        let gpu = IndexEvent::Stored {
            block_hashes: vec![1, 2, 3],
            parent: None,
            token_ids: tokens.clone(),
            block_size: 2,
            salt: None,
            adapter: None,
            tier: Tier::Gpu,
        };
        let cpu = |hashes: Vec<u64>| IndexEvent::Stored {
            block_hashes: hashes,
            parent: None,
            token_ids: vec![],
            block_size: 0,
            salt: None,
            adapter: None,
            tier: Tier::Offloaded,
        };
        idx.apply(gpu);
        idx.apply(cpu(vec![1, 2, 3, 99]));
        assert_eq!(idx.unresolved, 1, "a hash never seen on the GPU cannot be keyed");
        assert_eq!((idx.len(), idx.offloaded_len()), (3, 3));
        idx.apply(IndexEvent::Removed { block_hashes: vec![2, 3], tier: Tier::Gpu });
        assert_eq!(idx.matched_blocks(&keys), 1);
        assert_eq!(idx.offloaded_after(&keys, 1), 2, "evicted from the GPU, still offloaded");
        idx.apply(IndexEvent::Removed { block_hashes: vec![1], tier: Tier::Offloaded });
        assert_eq!(idx.matched_blocks(&keys), 1, "a CPU removal leaves the GPU copy");
        assert_eq!(idx.offloaded_after(&keys, 0), 0);
        // Newer vLLM sends offloaded blocks with their tokens and parent: keyed directly.
        idx.apply(IndexEvent::Stored {
            block_hashes: vec![7],
            parent: Some(1),
            token_ids: tokens[2..4].to_vec(),
            block_size: 2,
            salt: None,
            adapter: None,
            tier: Tier::Offloaded,
        });
        assert_eq!(idx.offloaded_after(&keys, 1), 2);
    }
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// A toy engine: caches chains of blocks under its own (different) hashes and reports
    /// events as vLLM does; the truth is the set of kvmesh keys of the blocks it holds.
    struct ToyEngine {
        seed: u64,
        bs: usize,
        /// engine hash -> (kvmesh key, tokens of the block)
        held: HashMap<u64, u64>,
    }

    impl ToyEngine {
        fn store(&mut self, tokens: &[u32]) -> IndexEvent {
            let keys = blocks::block_keys(self.seed, tokens, self.bs);
            // Engine hashes: a different chain (other seed), as a real engine's would be.
            let engine_hashes = blocks::block_keys(self.seed ^ 0xDEAD_BEEF, tokens, self.bs);
            for (h, k) in engine_hashes.iter().zip(&keys) {
                self.held.insert(*h, *k);
            }
            IndexEvent::Stored {
                block_hashes: engine_hashes.clone(),
                parent: None,
                token_ids: tokens[..keys.len() * self.bs].to_vec(),
                block_size: self.bs as u32,
                salt: None,
                adapter: None,
                tier: Tier::Gpu,
            }
        }

        fn truth(&self) -> HashSet<u64> {
            self.held.values().copied().collect()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Store(Vec<u32>),
        /// Store blocks after a stored prefix, with the parent's engine hash.
        Extend(usize, Vec<u32>),
        Remove(usize),
        Clear,
        Gap,
        Restart,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => proptest::collection::vec(0u32..4, 4..24).prop_map(Op::Store),
            2 => (any::<usize>(), proptest::collection::vec(0u32..4, 4..12)).prop_map(|(i, t)| Op::Extend(i, t)),
            3 => any::<usize>().prop_map(Op::Remove),
            1 => Just(Op::Clear),
            1 => Just(Op::Gap),
            1 => Just(Op::Restart),
        ]
    }

    proptest! {
        /// In order, the index equals the engine's truth; after a gap or restart it never
        /// claims a block the engine does not hold.
        #[test]
        fn index_tracks_engine_exactly(ops in proptest::collection::vec(op(), 1..60)) {
            let seed = 42;
            let bs = 4;
            let mut engine = ToyEngine { seed, bs, held: HashMap::new() };
            let mut idx = EngineIndex::new(seed);
            let mut seq = 0u64;
            let mut exact = true;
            // Token paths stored so far, to extend from.
            let mut paths: Vec<Vec<u32>> = Vec::new();
            for op in ops {
                let mut skip = false;
                let events = match op {
                    Op::Store(t) => { paths.push(t.clone()); vec![engine.store(&t)] }
                    Op::Extend(i, more) if !paths.is_empty() => {
                        let base = paths[i % paths.len()].clone();
                        let full = base.len() / bs * bs;
                        if full == 0 { vec![] } else {
                            let prefix = &base[..full];
                            let parent_hash = *blocks::block_keys(seed ^ 0xDEAD_BEEF, prefix, bs).last().unwrap();
                            let whole: Vec<u32> = prefix.iter().chain(&more).copied().collect();
                            let all_hashes = blocks::block_keys(seed ^ 0xDEAD_BEEF, &whole, bs);
                            let all_keys = blocks::block_keys(seed, &whole, bs);
                            let n_prefix = full / bs;
                            // Only if the parent is still held does the engine extend it.
                            if !engine.held.contains_key(&parent_hash) || all_hashes.len() == n_prefix { vec![] } else {
                                for (h, k) in all_hashes.iter().zip(&all_keys).skip(n_prefix) {
                                    engine.held.insert(*h, *k);
                                }
                                paths.push(whole.clone());
                                vec![IndexEvent::Stored {
                                    block_hashes: all_hashes[n_prefix..].to_vec(),
                                    parent: Some(parent_hash),
                                    token_ids: whole[full..all_hashes.len() * bs].to_vec(),
                                    block_size: bs as u32,
                                    salt: None,
                adapter: None,
                tier: Tier::Gpu,
                                }]
                            }
                        }
                    }
                    Op::Extend(..) => vec![],
                    Op::Remove(i) if !engine.held.is_empty() => {
                        let mut hs: Vec<u64> = engine.held.keys().copied().collect();
                        hs.sort();
                        let h = hs[i % hs.len()];
                        engine.held.remove(&h);
                        vec![IndexEvent::Removed { block_hashes: vec![h], tier: Tier::Gpu }]
                    }
                    Op::Remove(_) => vec![],
                    Op::Clear => { engine.held.clear(); vec![IndexEvent::Cleared] }
                    // A jump no run of ops can reach in order, so it is always a visible gap.
                    Op::Gap => { seq += 1000; skip = true; exact = false; vec![] }
                    Op::Restart => { seq = 0; engine.held.clear(); skip = true; exact = false; vec![] }
                };
                if skip { continue; }
                seq += 1;
                idx.apply_batch(seq, events);
                let truth = engine.truth();
                let got: HashSet<u64> = idx.keys().collect();
                prop_assert!(got.is_subset(&truth), "index claims blocks the engine does not hold");
                if exact {
                    prop_assert_eq!(got, truth);
                }
            }
        }
    }

    #[test]
    fn gap_and_restart_empty_the_index() {
        let mut idx = EngineIndex::new(1);
        let stored = IndexEvent::Stored {
            block_hashes: vec![9],
            parent: None,
            token_ids: vec![1, 2],
            block_size: 2,
            salt: None,
            adapter: None,
            tier: Tier::Gpu,
        };
        assert_eq!(idx.apply_batch(1, [stored.clone()]), BatchOutcome::InOrder);
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.apply_batch(5, []), BatchOutcome::Gap { expected: 2, got: 5 });
        assert!(idx.is_empty());
        idx.apply_batch(6, [stored]);
        assert_eq!(idx.apply_batch(1, []), BatchOutcome::Restart { last: 6, got: 1 });
        assert!(idx.is_empty());
        assert_eq!(idx.resets, 2);
    }

    #[test]
    fn unknown_parent_is_not_guessed() {
        let mut idx = EngineIndex::new(1);
        idx.apply(IndexEvent::Stored {
            block_hashes: vec![9],
            parent: Some(77),
            token_ids: vec![1, 2],
            block_size: 2,
            salt: None,
            adapter: None,
            tier: Tier::Gpu,
        });
        assert!(idx.is_empty());
        assert_eq!(idx.unresolved, 1);
    }

    #[test]
    fn matched_blocks_is_the_leading_run() {
        let mut idx = EngineIndex::new(5);
        let tokens: Vec<u32> = (0..8).collect();
        let keys = blocks::block_keys(5, &tokens, 2);
        idx.apply(IndexEvent::Stored {
            block_hashes: vec![1, 2, 3, 4],
            parent: None,
            token_ids: tokens.clone(),
            block_size: 2,
            salt: None,
            adapter: None,
            tier: Tier::Gpu,
        });
        assert_eq!(idx.matched_blocks(&keys), 4);
        idx.apply(IndexEvent::Removed { block_hashes: vec![2], tier: Tier::Gpu });
        assert_eq!(idx.matched_blocks(&keys), 1);
    }
}
