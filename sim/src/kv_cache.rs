//! Paged KV cache with prefix reuse, as vLLM v1's block pool keeps it.
//!
//! A fixed number of blocks. A full block whose contents are known gets its chain hash and can be
//! found again by later requests (prefix caching). Blocks nobody references stay cached on a free
//! list in LRU order and are evicted (their hash forgotten, a `BlockRemoved` published) only when
//! a new block is needed. Sequences free their blocks tail-first, so a prefix's last blocks are
//! evicted before its first ones, as in vLLM.

use std::collections::{BTreeMap, HashMap};

/// Where a block is held (vLLM's `medium`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Medium {
    #[default]
    Gpu,
    /// The offloading tier (`offload`).
    Cpu,
}

impl Medium {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gpu => "GPU",
            Self::Cpu => "CPU",
        }
    }
}

/// What an engine publishes about its cache (vLLM's `kv_cache_events`), with engine hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// `cache_salt`: on the event that starts a salted chain (vLLM's first-block `extra_keys`).
    /// `lora`: the adapter the blocks were computed for (`lora_name`, and in every block's
    /// `extra_keys`). Offloaded blocks carry their hashes alone, as vLLM's connector sends them.
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        cache_salt: Option<String>,
        lora: Option<String>,
        medium: Medium,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Medium,
    },
    AllBlocksCleared,
}

pub type BlockId = u32;

#[derive(Debug, Clone, Default)]
struct Block {
    hash: Option<u64>,
    ref_cnt: u32,
    /// Position on the free list while `ref_cnt == 0`.
    free_tick: u64,
}

#[derive(Debug)]
pub struct BlockPool {
    blocks: Vec<Block>,
    cached: HashMap<u64, BlockId>,
    free: BTreeMap<u64, BlockId>,
    tick: u64,
    events: Vec<KvEvent>,
}

impl BlockPool {
    pub fn new(num_blocks: u32) -> Self {
        let mut pool = Self {
            blocks: vec![Block::default(); num_blocks as usize],
            cached: HashMap::new(),
            free: BTreeMap::new(),
            tick: 0,
            events: Vec::new(),
        };
        for id in 0..num_blocks {
            pool.push_free(id);
        }
        pool
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Hashes of every cached block: the set the engine's KV events describe.
    pub fn cached_hashes(&self) -> Vec<u64> {
        self.cached.keys().copied().collect()
    }

    /// vLLM's `kv_cache_usage_perc`: the fraction of blocks held by running sequences.
    pub fn usage(&self) -> f64 {
        1.0 - self.free.len() as f64 / self.blocks.len() as f64
    }

    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id as usize].ref_cnt == 0
    }

    /// Takes a reference on a cached block found by `lookup`.
    pub fn touch(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        if b.ref_cnt == 0 {
            self.free.remove(&b.free_tick);
        }
        b.ref_cnt += 1;
    }

    /// A fresh block, evicting the least recently freed one if it was cached.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, id) = self.free.pop_first()?;
        let b = &mut self.blocks[id as usize];
        if let Some(h) = b.hash.take() {
            self.cached.remove(&h);
            self.events.push(KvEvent::BlockRemoved { block_hashes: vec![h], medium: Medium::Gpu });
        }
        b.ref_cnt = 1;
        Some(id)
    }

    /// Drops one reference on each block; blocks reaching zero go to the free list tail-first.
    pub fn release(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.ref_cnt > 0, "double free of block {id}");
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 {
                self.push_free(id);
            }
        }
    }

    /// Registers a now-full block under its hash. A hash already cached by another block (two
    /// sequences computed the same prefix at once) keeps the first; this block stays uncached.
    pub fn cache(&mut self, id: BlockId, hash: u64) -> bool {
        if self.cached.contains_key(&hash) || self.blocks[id as usize].hash.is_some() {
            return false;
        }
        self.blocks[id as usize].hash = Some(hash);
        self.cached.insert(hash, id);
        true
    }

    pub fn publish(&mut self, event: KvEvent) {
        self.events.push(event);
    }

    /// Forgets every cached hash (vLLM's `reset_prefix_cache`); only allowed when no block is in
    /// use, as in vLLM.
    pub fn reset(&mut self) -> bool {
        if self.free.len() != self.blocks.len() {
            return false;
        }
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        self.events.push(KvEvent::AllBlocksCleared);
        true
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    fn push_free(&mut self, id: BlockId) {
        self.tick += 1;
        self.blocks[id as usize].free_tick = self.tick;
        self.free.insert(self.tick, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_lru_and_reports_removal() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert!(p.cache(a, 10));
        assert!(p.cache(b, 20));
        assert!(p.allocate().is_none());
        p.release(&[a, b]); // tail first: b goes on the free list before a
        assert_eq!(p.usage(), 0.0);
        assert_eq!(p.lookup(10), Some(a));
        let c = p.allocate().unwrap();
        assert_eq!(c, b, "the tail block is evicted first");
        assert_eq!(p.lookup(20), None);
        assert_eq!(p.take_events(), vec![KvEvent::BlockRemoved { block_hashes: vec![20], medium: Medium::Gpu }]);
        // A hit on a free block takes it off the free list.
        p.touch(a);
        assert_eq!(p.num_free(), 0);
    }

    #[test]
    fn duplicate_hash_stays_uncached() {
        let mut p = BlockPool::new(3);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        assert!(p.cache(a, 1));
        assert!(!p.cache(b, 1));
        assert_eq!(p.num_cached(), 1);
    }

    #[test]
    fn reset_needs_idle_pool() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        p.cache(a, 5);
        assert!(!p.reset());
        p.release(&[a]);
        assert!(p.reset());
        assert_eq!(p.lookup(5), None);
        assert_eq!(p.take_events(), vec![KvEvent::AllBlocksCleared]);
    }
}
