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

use std::collections::HashMap;

use crate::blocks;

/// One event, as decoded from the engine's wire format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexEvent {
    /// `salt`: the request's `cache_salt`, which vLLM mixes into the first block's hash (the
    /// event's `extra_keys`); a root block with one chains from the salted seed.
    Stored {
        block_hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        salt: Option<String>,
    },
    Removed {
        block_hashes: Vec<u64>,
    },
    Cleared,
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
    /// kvmesh key -> how many engine hashes map to it (the same block stored twice counts
    /// twice); a key is held while its count is above zero.
    keys: HashMap<u64, u32>,
    by_engine_hash: HashMap<u64, u64>,
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
            keys: HashMap::new(),
            by_engine_hash: HashMap::new(),
            last_seq: None,
            unresolved: 0,
            resets: 0,
        }
    }

    /// The index of an engine serving `model`: chains seeded as `blocks::chain_seed(model, None,
    /// salt)`, so salted requests' keys match the blocks stored for them.
    pub fn for_model(model: &str) -> Self {
        Self { model: Some(model.to_owned()), ..Self::new(blocks::chain_seed(model, None, None)) }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Block size the engine reported in its events, once any arrived.
    pub fn block_size(&self) -> Option<u32> {
        self.block_size
    }

    pub fn contains(&self, key: u64) -> bool {
        self.keys.contains_key(&key)
    }

    /// Leading blocks of `keys` (a request's chain) the engine holds.
    pub fn matched_blocks(&self, keys: &[u64]) -> usize {
        keys.iter().take_while(|k| self.keys.contains_key(k)).count()
    }

    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.keys().copied()
    }

    fn hold(&mut self, key: u64) {
        *self.keys.entry(key).or_insert(0) += 1;
    }

    fn release(&mut self, key: u64) {
        if let Some(n) = self.keys.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(&key);
            }
        }
    }

    /// Sequence number of the last batch applied, if any since the last `forget_sequence`.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Engine hashes of the blocks held (what the engine's own cache would list).
    pub fn engine_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_engine_hash.keys().copied()
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
        self.keys.clear();
        self.by_engine_hash.clear();
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

    pub fn apply(&mut self, e: IndexEvent) {
        match e {
            IndexEvent::Stored { block_hashes, parent, token_ids, block_size, salt } => {
                let bs = block_size as usize;
                if bs == 0 || token_ids.len() < block_hashes.len() * bs {
                    self.unresolved += block_hashes.len() as u64;
                    return;
                }
                self.block_size = Some(block_size);
                let mut parent_key = match parent {
                    None => match (&salt, &self.model) {
                        (Some(salt), Some(model)) => blocks::chain_seed(model, None, Some(salt)),
                        // A salted block of an engine whose model is unknown cannot be keyed.
                        (Some(_), None) => {
                            self.unresolved += block_hashes.len() as u64;
                            return;
                        }
                        (None, _) => self.seed,
                    },
                    Some(h) => match self.by_engine_hash.get(&h) {
                        Some(&k) => k,
                        None => {
                            self.unresolved += block_hashes.len() as u64;
                            return;
                        }
                    },
                };
                for (i, h) in block_hashes.iter().enumerate() {
                    let key = blocks::block_key(parent_key, &token_ids[i * bs..(i + 1) * bs]);
                    match self.by_engine_hash.insert(*h, key) {
                        Some(old) if old == key => {}
                        Some(old) => {
                            self.release(old);
                            self.hold(key);
                        }
                        None => self.hold(key),
                    }
                    parent_key = key;
                }
            }
            IndexEvent::Removed { block_hashes } => {
                for h in block_hashes {
                    if let Some(k) = self.by_engine_hash.remove(&h) {
                        self.release(k);
                    }
                }
            }
            IndexEvent::Cleared => {
                self.keys.clear();
                self.by_engine_hash.clear();
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
                        vec![IndexEvent::Removed { block_hashes: vec![h] }]
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
        });
        assert_eq!(idx.matched_blocks(&keys), 4);
        idx.apply(IndexEvent::Removed { block_hashes: vec![2] });
        assert_eq!(idx.matched_blocks(&keys), 1);
    }
}
