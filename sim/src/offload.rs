//! A KV-offloading tier beside the GPU cache, as vLLM's `OffloadingConnector` with its CPU
//! backend keeps one (`--kv-offloading-size`): every block the GPU caches is also stored here
//! (write-through), the tier evicts least recently used blocks when full, and a request whose
//! prefix the GPU lost but this tier holds loads those blocks instead of computing them. Its
//! events carry `medium` `CPU` and, as vLLM's connector sends them, the blocks' hashes alone.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct OffloadTier {
    capacity: usize,
    /// hash -> its position in `lru`.
    by_hash: HashMap<u64, u64>,
    /// position -> hash, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
}

/// What one store did: hashes newly held, and hashes evicted to make room.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stored {
    pub stored: Vec<u64>,
    pub evicted: Vec<u64>,
}

impl OffloadTier {
    pub fn new(capacity_blocks: u32) -> Self {
        Self { capacity: capacity_blocks as usize, by_hash: HashMap::new(), lru: BTreeMap::new(), tick: 0 }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.by_hash.contains_key(&hash)
    }

    /// Marks a block as just used (a load from the tier).
    pub fn touch(&mut self, hash: u64) {
        if let Some(at) = self.by_hash.get_mut(&hash) {
            self.lru.remove(at);
            self.tick += 1;
            *at = self.tick;
            self.lru.insert(self.tick, hash);
        }
    }

    /// Stores the blocks not held yet, evicting the least recently used ones beyond capacity.
    pub fn store(&mut self, hashes: &[u64]) -> Stored {
        let mut out = Stored::default();
        if self.capacity == 0 {
            return out;
        }
        for &h in hashes {
            if self.by_hash.contains_key(&h) {
                self.touch(h);
                continue;
            }
            while self.by_hash.len() >= self.capacity {
                let Some((_, old)) = self.lru.pop_first() else { break };
                self.by_hash.remove(&old);
                out.evicted.push(old);
            }
            self.tick += 1;
            self.by_hash.insert(h, self.tick);
            self.lru.insert(self.tick, h);
            out.stored.push(h);
        }
        // A block stored and evicted again within this store was never visible: report neither.
        let fresh: std::collections::HashSet<u64> = out.stored.iter().copied().collect();
        out.stored.retain(|h| self.by_hash.contains_key(h));
        out.evicted.retain(|h| !fresh.contains(h));
        out
    }

    pub fn clear(&mut self) {
        self.by_hash.clear();
        self.lru.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_most_recently_used_within_capacity() {
        let mut t = OffloadTier::new(3);
        assert_eq!(t.store(&[1, 2, 3]).stored, vec![1, 2, 3]);
        t.touch(1);
        let s = t.store(&[4]);
        assert_eq!(s, Stored { stored: vec![4], evicted: vec![2] });
        assert!(t.contains(1) && t.contains(3) && t.contains(4) && !t.contains(2));
        assert_eq!(t.store(&[3]), Stored::default(), "a held block is only refreshed");
        assert_eq!(t.len(), 3);
    }
}
