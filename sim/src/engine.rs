//! The engine core: vLLM v1's continuous-batching scheduler over the paged KV cache.
//!
//! Pure logic with no clock: `schedule` picks a step's work and says how long it takes;
//! `complete` applies it once that time has passed. The real-time runner and the cluster
//! simulator drive the same code.
//!
//! One step, as vLLM v1 schedules it (engine-timing.md section 4): running sequences first (a
//! decode takes one token, an unfinished prefill a chunk of the remaining budget), then waiting
//! ones first-come first-served, skipping cached prefix blocks, until the token budget, the
//! sequence limit or the free blocks run out. A running sequence that cannot get a block
//! preempts the most recently admitted one, which is recomputed later.
//!
//! With vLLM's `--scheduling-policy priority` (`Scheduling::Priority`) the waiting queue is
//! ordered by each request's `priority` (lower first), then arrival, and the running sequence
//! preempted for blocks is the one last in that order; a waiting request never preempts a
//! running one (vLLM v1's scheduler does the same: only running requests' allocations do).

use std::collections::{HashMap, VecDeque};

use kvmesh_policy::blocks;

use crate::kv_cache::{BlockId, BlockPool, KvEvent, Medium};
use crate::offload::OffloadTier;
use crate::timing::{StepShape, TimingModel};

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub max_num_seqs: u32,
    pub max_num_batched_tokens: u32,
    pub enable_prefix_caching: bool,
    pub hash_seed: u64,
    pub timing: TimingModel,
    /// Blocks of the offloading tier (vLLM's CPU offloading connector); 0: none.
    pub num_cpu_blocks: u32,
    /// Time to load one token's KV from the offloading tier, ms.
    pub cpu_load_ms_per_token: f64,
    /// The order of the waiting queue and of preemption (vLLM's `--scheduling-policy`).
    pub scheduling: Scheduling,
}

/// vLLM's `--scheduling-policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scheduling {
    /// First come, first served; requests must leave `priority` at 0.
    #[default]
    Fcfs,
    /// By each request's `priority` (lower first), then arrival.
    Priority,
}

/// A request as the core sees it: token ids in, a number of tokens out.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    /// Output tokens to produce before finishing.
    pub output_len: usize,
    /// Output token generator: `output_token(i)` is the i-th token.
    pub output_seed: u64,
    /// Leading prompt tokens whose KV arrived from another engine (P/D): admitted as computed,
    /// with no prefill cost (`nixl`).
    pub external_kv_tokens: usize,
    /// The request's `cache_salt`: mixed into the first block's hash, as vLLM does, so
    /// requests share cached blocks only under the same salt.
    pub cache_salt: Option<String>,
    /// The LoRA adapter the request runs with: mixed into every block's hash, as vLLM does, so
    /// an adapter's blocks are its own.
    pub lora: Option<String>,
    /// The request's `priority` (lower runs first; used with `Scheduling::Priority` only).
    pub priority: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Reached `output_len`.
    Done,
    Aborted,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenOut {
    pub seq: SeqId,
    /// Index among the sequence's output tokens (0 = first token).
    pub index: usize,
    pub token: u32,
    pub finished: bool,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_prompt_tokens: usize,
    pub prompt_tokens: usize,
}

#[derive(Debug, Default)]
pub struct StepOutcome {
    pub tokens: Vec<TokenOut>,
    pub kv_events: Vec<KvEvent>,
}

/// The work chosen for one step.
#[derive(Debug, Default)]
pub struct ScheduledStep {
    work: Vec<(SeqId, usize)>,
    pub shape: StepShape,
    pub duration_ms: f64,
}

impl ScheduledStep {
    pub fn is_empty(&self) -> bool {
        self.work.is_empty()
    }
}

#[derive(Debug)]
struct Sequence {
    id: SeqId,
    /// Prompt followed by the output so far.
    tokens: Vec<u32>,
    prompt_len: usize,
    output_len: usize,
    output_seed: u64,
    /// Tokens whose KV is in `blocks`.
    num_computed: usize,
    blocks: Vec<BlockId>,
    /// Engine hashes of the full blocks of `tokens` (hashed once, extended as blocks fill).
    block_hashes: Vec<u64>,
    /// Blocks of this sequence already registered in the prefix cache.
    num_cached_blocks: usize,
    cached_prompt_tokens: Option<usize>,
    /// See `NewSequence::external_kv_tokens`; dropped on preemption (the KV is gone then).
    external_kv_tokens: usize,
    cache_salt: Option<String>,
    lora: Option<String>,
    /// The chain seed of this sequence's block hashes: the engine's, mixed with the adapter's
    /// name and `cache_salt`.
    hash_seed: u64,
    /// Scheduling order under `Scheduling::Priority`: (priority, arrival), lower first.
    order: (i64, u64),
}

impl Sequence {
    fn num_output(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// Cumulative counters, exported as vLLM's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoreCounters {
    pub prefix_queries_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

pub struct EngineCore {
    cfg: CoreConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    counters: CoreCounters,
    output_token: Box<dyn Fn(u64, usize) -> u32 + Send>,
    offload: Option<OffloadTier>,
    /// Tokens loaded from the offloading tier by the step being scheduled.
    loading_tokens: usize,
    /// Sequences added so far (their arrival order).
    arrivals: u64,
}

impl EngineCore {
    pub fn new(cfg: CoreConfig, output_token: impl Fn(u64, usize) -> u32 + Send + 'static) -> Self {
        Self {
            offload: (cfg.num_cpu_blocks > 0).then(|| OffloadTier::new(cfg.num_cpu_blocks)),
            pool: BlockPool::new(cfg.num_gpu_blocks),
            cfg,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: CoreCounters::default(),
            output_token: Box::new(output_token),
            loading_tokens: 0,
            arrivals: 0,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.cfg
    }

    /// Blocks a sequence of `tokens` tokens needs at most; more than the cache holds can never run.
    pub fn fits(&self, tokens: usize) -> bool {
        tokens.div_ceil(self.cfg.block_size as usize) <= self.cfg.num_gpu_blocks as usize
    }

    pub fn add(&mut self, s: NewSequence) {
        let seq = Sequence {
            id: s.id,
            prompt_len: s.prompt.len(),
            tokens: s.prompt,
            output_len: s.output_len.max(1),
            output_seed: s.output_seed,
            num_computed: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            num_cached_blocks: 0,
            cached_prompt_tokens: None,
            external_kv_tokens: s.external_kv_tokens,
            hash_seed: [s.lora.as_deref(), s.cache_salt.as_deref()]
                .into_iter()
                .flatten()
                .fold(self.cfg.hash_seed, |seed, key| xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), seed ^ 1)),
            cache_salt: s.cache_salt,
            lora: s.lora,
            order: (s.priority, self.arrivals),
        };
        self.arrivals += 1;
        let id = seq.id;
        self.seqs.insert(id, seq);
        match self.cfg.scheduling {
            Scheduling::Fcfs => self.waiting.push_back(id),
            Scheduling::Priority => self.enqueue_in_order(id),
        }
    }

    /// Puts `id` in the waiting queue at its place in (priority, arrival) order.
    fn enqueue_in_order(&mut self, id: SeqId) {
        let key = self.seqs.get(&id).map_or((i64::MAX, u64::MAX), |s| s.order);
        let at = self.waiting.partition_point(|w| self.seqs.get(w).is_some_and(|s| s.order <= key));
        self.waiting.insert(at, id);
    }

    /// The running sequence to preempt for blocks: the most recently admitted (FCFS), or the
    /// last in (priority, arrival) order. Its index in `running`.
    fn victim(&self) -> Option<usize> {
        match self.cfg.scheduling {
            Scheduling::Fcfs => self.running.len().checked_sub(1),
            Scheduling::Priority => (0..self.running.len())
                .max_by_key(|&i| self.seqs.get(&self.running[i]).map_or((i64::MAX, u64::MAX), |s| s.order)),
        }
    }

    /// Removes a sequence wherever it is and frees its blocks. Returns whether it existed.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
        self.pool.release(&seq.blocks);
        true
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn kv_usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn counters(&self) -> CoreCounters {
        self.counters
    }

    pub fn num_cached_blocks(&self) -> usize {
        self.pool.num_cached()
    }

    /// Engine hashes of the cached blocks (what a subscriber's index should hold).
    pub fn cached_block_hashes(&self) -> Vec<u64> {
        self.pool.cached_hashes()
    }

    /// vLLM's `/reset_prefix_cache`: refused while any sequence holds blocks.
    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset()
    }

    /// Blocks held in the offloading tier.
    pub fn num_offloaded_blocks(&self) -> usize {
        self.offload.as_ref().map_or(0, OffloadTier::len)
    }

    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    pub fn schedule(&mut self) -> ScheduledStep {
        let bs = self.cfg.block_size as usize;
        let mut budget = self.cfg.max_num_batched_tokens as usize;
        let mut step = ScheduledStep::default();
        let mut preempted = false;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (num_computed, remaining) = {
                let s = &self.seqs[&id];
                (s.num_computed, s.tokens.len() - s.num_computed)
            };
            let num_new = remaining.min(budget);
            if num_new == 0 {
                i += 1;
                continue;
            }
            let need = (num_computed + num_new).div_ceil(bs).saturating_sub(self.seqs[&id].blocks.len());
            // Make room by preempting the victim (`victim`); if that is this sequence, it waits.
            let mut scheduled = true;
            while self.pool.num_free() < need {
                preempted = true;
                let Some(at) = self.victim() else {
                    break;
                };
                let victim = self.running.remove(at);
                if at < i {
                    // Already scheduled this step: its work is undone with its blocks.
                    if let Some(w) = step.work.iter().position(|(s, _)| *s == victim) {
                        budget += step.work.remove(w).1;
                    }
                    i -= 1;
                }
                self.preempt(victim);
                if victim == id {
                    scheduled = false;
                    break;
                }
            }
            if !scheduled || self.pool.num_free() < need {
                break;
            }
            for _ in 0..need {
                let Some(b) = self.pool.allocate() else { break };
                if let Some(s) = self.seqs.get_mut(&id) {
                    s.blocks.push(b);
                }
            }
            step.work.push((id, num_new));
            budget -= num_new;
            i += 1;
        }

        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs as usize {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(num_new) = self.admit(id, budget) else {
                break;
            };
            self.waiting.pop_front();
            self.running.push(id);
            step.work.push((id, num_new));
            budget -= num_new;
        }

        for &(id, q) in &step.work {
            let s = &self.seqs[&id];
            if s.num_computed >= s.prompt_len && q == 1 {
                step.shape.add_decode((s.num_computed + 1) as u64);
            } else {
                step.shape.add_prefill(q as u64, s.num_computed as u64);
            }
        }
        // Blocks found offloaded are loaded before the step computes past them.
        step.duration_ms = self.cfg.timing.step_ms(&step.shape)
            + std::mem::take(&mut self.loading_tokens) as f64 * self.cfg.cpu_load_ms_per_token;
        step
    }

    /// Tries to admit a waiting sequence: prefix hit, then blocks for one chunk. Returns the
    /// chunk size, or `None` if its blocks do not fit now.
    fn admit(&mut self, id: SeqId, budget: usize) -> Option<usize> {
        let bs = self.cfg.block_size as usize;
        let caching = self.cfg.enable_prefix_caching;
        let s = self.seqs.get_mut(&id)?;
        blocks::extend_block_keys(&mut s.block_hashes, s.hash_seed, &s.tokens, bs);
        // The hit is capped so at least one token is computed: the engine needs its logits.
        let max_hit_blocks = (s.tokens.len() - 1) / bs;
        let hits: Vec<BlockId> = if caching {
            s.block_hashes.iter().take(max_hit_blocks).map_while(|h| self.pool.lookup(*h)).collect()
        } else {
            Vec::new()
        };
        // Then the offloading tier, from the first block the GPU lacks: those blocks are loaded
        // into new GPU blocks, and count as cached (vLLM reports connector hits in
        // `cached_tokens` too).
        let offloaded = match &self.offload {
            Some(tier) if caching => {
                s.block_hashes.iter().take(max_hit_blocks).skip(hits.len()).take_while(|h| tier.contains(**h)).count()
            }
            _ => 0,
        };
        // Transferred KV counts as computed; its blocks are new here, like any miss.
        let cache_hit_tokens = (hits.len() + offloaded) * bs;
        let hit_tokens = cache_hit_tokens.max(s.external_kv_tokens.min(s.tokens.len() - 1));
        let num_new = (s.tokens.len() - hit_tokens).min(budget);
        let need = (hit_tokens + num_new).div_ceil(bs) - hits.len();
        let hits_on_free_list = hits.iter().filter(|&&b| self.pool.is_free(b)).count();
        if self.pool.num_free() < need + hits_on_free_list {
            return None;
        }
        for &b in &hits {
            self.pool.touch(b);
        }
        if let Some(tier) = self.offload.as_mut().filter(|_| offloaded > 0) {
            for &h in &s.block_hashes[hits.len()..hits.len() + offloaded] {
                tier.touch(h);
            }
            self.loading_tokens += offloaded * bs;
        }
        let mut new_blocks = Vec::with_capacity(need);
        for _ in 0..need {
            new_blocks.push(self.pool.allocate()?);
        }
        s.blocks = hits;
        s.num_cached_blocks = s.blocks.len();
        s.blocks.extend(new_blocks);
        s.num_computed = hit_tokens;
        if caching {
            self.counters.prefix_queries_tokens += s.tokens.len() as u64;
            self.counters.prefix_hit_tokens += hit_tokens as u64;
        }
        if s.cached_prompt_tokens.is_none() {
            s.cached_prompt_tokens = Some(cache_hit_tokens.min(s.prompt_len));
            self.counters.prompt_tokens += s.prompt_len as u64;
        }
        Some(num_new)
    }

    fn preempt(&mut self, id: SeqId) {
        self.counters.preemptions += 1;
        if let Some(s) = self.seqs.get_mut(&id) {
            let blocks = std::mem::take(&mut s.blocks);
            s.num_computed = 0;
            s.external_kv_tokens = 0;
            s.num_cached_blocks = 0;
            self.pool.release(&blocks);
        }
        match self.cfg.scheduling {
            Scheduling::Fcfs => self.waiting.push_front(id),
            Scheduling::Priority => self.enqueue_in_order(id),
        }
    }

    /// Applies a step whose time has passed: advances computed tokens, caches full blocks,
    /// samples a token for every sequence that consumed all its input, finishes sequences.
    pub fn complete(&mut self, step: ScheduledStep) -> StepOutcome {
        let bs = self.cfg.block_size as usize;
        let mut out = StepOutcome::default();
        for (id, q) in step.work {
            // Preemption only takes sequences not yet scheduled in the pass, so every scheduled
            // one is still running; an abort between schedule and complete removes it entirely.
            let Some(s) = self.seqs.get_mut(&id) else {
                continue;
            };
            s.num_computed += q;
            if self.cfg.enable_prefix_caching {
                let full = s.num_computed / bs;
                if full > s.num_cached_blocks {
                    blocks::extend_block_keys(&mut s.block_hashes, s.hash_seed, &s.tokens[..full * bs], bs);
                    let first = s.num_cached_blocks;
                    let mut stored = Vec::new();
                    for i in first..full {
                        if self.pool.cache(s.blocks[i], s.block_hashes[i]) {
                            stored.push(i);
                        }
                    }
                    // vLLM publishes one BlockStored per request per step, for consecutive blocks.
                    if let (Some(&lo), Some(&hi)) = (stored.first(), stored.last()) {
                        if hi - lo + 1 == stored.len() {
                            self.pool.publish(KvEvent::BlockStored {
                                block_hashes: s.block_hashes[lo..=hi].to_vec(),
                                parent_block_hash: lo.checked_sub(1).map(|p| s.block_hashes[p]),
                                token_ids: s.tokens[lo * bs..(hi + 1) * bs].to_vec(),
                                block_size: bs as u32,
                                cache_salt: s.cache_salt.clone().filter(|_| lo == 0),
                                lora: s.lora.clone(),
                                medium: Medium::Gpu,
                            });
                        } else {
                            for &b in &stored {
                                self.pool.publish(KvEvent::BlockStored {
                                    block_hashes: vec![s.block_hashes[b]],
                                    parent_block_hash: b.checked_sub(1).map(|p| s.block_hashes[p]),
                                    token_ids: s.tokens[b * bs..(b + 1) * bs].to_vec(),
                                    block_size: bs as u32,
                                    cache_salt: s.cache_salt.clone().filter(|_| b == 0),
                                    lora: s.lora.clone(),
                                    medium: Medium::Gpu,
                                });
                            }
                        }
                    }
                    // Write-through to the offloading tier, reported by hash alone.
                    if let Some(tier) = self.offload.as_mut().filter(|_| !stored.is_empty()) {
                        let hashes: Vec<u64> = stored.iter().map(|&b| s.block_hashes[b]).collect();
                        let done = tier.store(&hashes);
                        if !done.evicted.is_empty() {
                            self.pool
                                .publish(KvEvent::BlockRemoved { block_hashes: done.evicted, medium: Medium::Cpu });
                        }
                        if !done.stored.is_empty() {
                            self.pool.publish(KvEvent::BlockStored {
                                block_hashes: done.stored,
                                parent_block_hash: None,
                                token_ids: Vec::new(),
                                block_size: bs as u32,
                                cache_salt: None,
                                lora: None,
                                medium: Medium::Cpu,
                            });
                        }
                    }
                    s.num_cached_blocks = full;
                }
            }
            if s.num_computed < s.tokens.len() {
                continue; // a prefill chunk that is not the last
            }
            let index = s.num_output();
            let token = (self.output_token)(s.output_seed, index);
            s.tokens.push(token);
            let finished = s.num_output() >= s.output_len;
            self.counters.generation_tokens += 1;
            out.tokens.push(TokenOut {
                seq: id,
                index,
                token,
                finished,
                cached_prompt_tokens: s.cached_prompt_tokens.unwrap_or(0),
                prompt_tokens: s.prompt_len,
            });
            if finished {
                self.abort(id);
            }
        }
        out.kv_events = self.pool.take_events();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn core(blocks: u32) -> EngineCore {
        core_with_offload(blocks, 0)
    }

    fn core_with_offload(blocks: u32, cpu_blocks: u32) -> EngineCore {
        EngineCore::new(
            CoreConfig {
                block_size: 4,
                num_gpu_blocks: blocks,
                max_num_seqs: 8,
                max_num_batched_tokens: 32,
                enable_prefix_caching: true,
                hash_seed: 1,
                timing: TimingModel::default(),
                num_cpu_blocks: cpu_blocks,
                cpu_load_ms_per_token: 0.01,
                scheduling: Scheduling::Fcfs,
            },
            |seed, i| (seed as u32).wrapping_add(i as u32) % 100 + 1000,
        )
    }

    fn seq(id: SeqId, prompt: Vec<u32>, lora: Option<&str>) -> NewSequence {
        NewSequence {
            id,
            prompt,
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: lora.map(str::to_owned),
            priority: 0,
        }
    }

    /// A prefix the GPU evicted is loaded back from the offloading tier: reported cached, and
    /// its CPU copy announced by hash alone.
    #[test]
    fn offloaded_prefix_is_loaded_not_recomputed() {
        let mut c = core_with_offload(6, 64);
        let a: Vec<u32> = (0..17).collect();
        c.add(seq(1, a.clone(), None));
        let (_, evs, _) = run_to_end(&mut c);
        assert!(evs
            .iter()
            .any(|e| matches!(e, KvEvent::BlockStored { medium: Medium::Cpu, token_ids, .. } if token_ids.is_empty())));
        // Other prompts push A's blocks off the 6-block GPU.
        for i in 0..3 {
            c.add(seq(10 + i, (100 * (i as u32 + 1)..100 * (i as u32 + 1) + 17).collect(), None));
            run_to_end(&mut c);
        }
        c.add(seq(2, a.clone(), None));
        let (toks, _, _) = run_to_end(&mut c);
        assert_eq!(toks[0].cached_prompt_tokens, 16, "four blocks loaded from the offloading tier");
        let mut no_tier = core(6);
        no_tier.add(seq(1, a.clone(), None));
        run_to_end(&mut no_tier);
        for i in 0..3 {
            no_tier.add(seq(10 + i, (100 * (i as u32 + 1)..100 * (i as u32 + 1) + 17).collect(), None));
            run_to_end(&mut no_tier);
        }
        no_tier.add(seq(2, a, None));
        assert_eq!(run_to_end(&mut no_tier).0[0].cached_prompt_tokens, 0, "without the tier it is recomputed");
    }

    #[test]
    fn an_adapters_blocks_are_its_own() {
        let mut c = core(64);
        let p: Vec<u32> = (0..17).collect();
        c.add(seq(1, p.clone(), Some("sql")));
        let (_, evs, _) = run_to_end(&mut c);
        assert!(evs.iter().all(|e| matches!(e, KvEvent::BlockStored { lora: Some(l), .. } if l == "sql")));
        c.add(seq(2, p.clone(), None));
        assert_eq!(run_to_end(&mut c).0[0].cached_prompt_tokens, 0, "the base model shares none");
        c.add(seq(3, p, Some("sql")));
        assert_eq!(run_to_end(&mut c).0[0].cached_prompt_tokens, 16);
    }

    fn run_to_end(c: &mut EngineCore) -> (Vec<TokenOut>, Vec<KvEvent>, f64) {
        let (mut toks, mut evs, mut t) = (Vec::new(), Vec::new(), 0.0);
        for _ in 0..10_000 {
            if !c.has_work() {
                break;
            }
            let s = c.schedule();
            t += s.duration_ms;
            let o = c.complete(s);
            toks.extend(o.tokens);
            evs.extend(o.kv_events);
        }
        (toks, evs, t)
    }

    #[test]
    fn generates_exactly_output_len_and_frees_blocks() {
        let mut c = core(64);
        c.add(NewSequence {
            id: 1,
            prompt: (0..10).collect(),
            output_len: 5,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let (toks, evs, _) = run_to_end(&mut c);
        assert_eq!(toks.len(), 5);
        assert!(toks.last().unwrap().finished);
        assert_eq!(c.kv_usage(), 0.0);
        // 10 prompt + 4 fed outputs = 14 tokens computed: 3 full blocks stored.
        let stored: usize = evs
            .iter()
            .map(|e| match e {
                KvEvent::BlockStored { block_hashes, token_ids, .. } => {
                    assert_eq!(token_ids.len(), block_hashes.len() * 4);
                    block_hashes.len()
                }
                _ => 0,
            })
            .sum();
        assert_eq!(stored, 3);
    }

    #[test]
    fn repeated_prompt_hits_prefix_cache() {
        let mut c = core(64);
        let prompt: Vec<u32> = (0..30).collect();
        c.add(NewSequence {
            id: 1,
            prompt: prompt.clone(),
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let (_, _, cold) = run_to_end(&mut c);
        c.add(NewSequence {
            id: 2,
            prompt,
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let (toks, _, warm) = run_to_end(&mut c);
        assert_eq!(toks[0].cached_prompt_tokens, 28, "7 full blocks of 4 hit; the last token is recomputed");
        assert!(warm < cold, "warm {warm} cold {cold}");
        assert_eq!(c.counters().prefix_hit_tokens, 28);
    }

    #[test]
    fn chunked_prefill_respects_budget() {
        let mut c = core(64);
        c.add(NewSequence {
            id: 1,
            prompt: (0..100).collect(),
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let s = c.schedule();
        assert_eq!(s.shape.scheduled_tokens, 32);
    }

    #[test]
    fn preemption_under_memory_pressure_still_finishes_all() {
        let mut c = core(12); // 48 tokens of KV for two 20-token prompts growing to 40 each
        c.add(NewSequence {
            id: 1,
            prompt: (0..20).collect(),
            output_len: 20,
            output_seed: 1,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        c.add(NewSequence {
            id: 2,
            prompt: (100..120).collect(),
            output_len: 20,
            output_seed: 2,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let (toks, _, _) = run_to_end(&mut c);
        for id in [1, 2] {
            let mine: Vec<_> = toks.iter().filter(|t| t.seq == id).collect();
            assert_eq!(mine.len(), 20, "seq {id}");
            assert!(mine.iter().enumerate().all(|(i, t)| t.index == i), "outputs in order after recompute");
        }
        assert!(c.counters().preemptions > 0);
        assert_eq!(c.kv_usage(), 0.0);
    }

    fn priority_core(blocks: u32) -> EngineCore {
        let mut c = core(blocks);
        c.cfg.scheduling = Scheduling::Priority;
        c
    }

    fn with_priority(id: SeqId, prompt: Vec<u32>, output_len: usize, priority: i64) -> NewSequence {
        NewSequence { output_len, priority, ..seq(id, prompt, None) }
    }

    /// The order first tokens come out in.
    fn first_tokens(c: &mut EngineCore) -> Vec<SeqId> {
        let (toks, _, _) = run_to_end(c);
        toks.iter().filter(|t| t.index == 0).map(|t| t.seq).collect()
    }

    #[test]
    fn priority_scheduling_orders_the_waiting_queue() {
        // Room for one 8-token sequence at a time (2 blocks of 4 tokens, plus its output).
        let mut c = priority_core(3);
        c.add(with_priority(1, (0..8).collect(), 2, 5));
        c.add(with_priority(2, (10..18).collect(), 2, 5));
        c.add(with_priority(3, (20..28).collect(), 2, -1));
        c.add(with_priority(4, (30..38).collect(), 2, 0));
        // Lower priority values first, arrival order among equals.
        assert_eq!(first_tokens(&mut c), [3, 4, 1, 2]);
        // FCFS ignores the values.
        let mut c = core(3);
        for (id, p) in [(1, 5), (2, 5), (3, -1), (4, 0)] {
            c.add(with_priority(id, (id as u32 * 10..id as u32 * 10 + 8).collect(), 2, p));
        }
        assert_eq!(first_tokens(&mut c), [1, 2, 3, 4]);
    }

    #[test]
    fn priority_scheduling_preempts_the_last_in_order() {
        // Two sequences running, the cache full: when one needs a block, the one with the
        // higher value is preempted, whichever was admitted last.
        let mut c = priority_core(6);
        c.add(with_priority(1, (0..8).collect(), 8, 9));
        let s = c.schedule();
        c.complete(s);
        c.add(with_priority(2, (20..28).collect(), 8, 0));
        let (toks, _, _) = run_to_end(&mut c);
        let last = |id| toks.iter().rposition(|t| t.seq == id && t.finished).unwrap();
        assert!(c.counters().preemptions > 0, "the cache was too small for both");
        assert!(last(2) < last(1), "the urgent one finished first");
        assert_eq!(c.kv_usage(), 0.0);
    }

    #[test]
    fn eviction_publishes_removed_blocks() {
        let mut c = core(4);
        c.add(NewSequence {
            id: 1,
            prompt: (0..9).collect(),
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        run_to_end(&mut c);
        c.add(NewSequence {
            id: 2,
            prompt: (50..66).collect(),
            output_len: 1,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let (_, evs, _) = run_to_end(&mut c);
        assert!(evs.iter().any(|e| matches!(e, KvEvent::BlockRemoved { .. })), "{evs:?}");
    }

    #[test]
    fn abort_frees_everything() {
        let mut c = core(16);
        c.add(NewSequence {
            id: 1,
            prompt: (0..20).collect(),
            output_len: 50,
            output_seed: 0,
            external_kv_tokens: 0,
            cache_salt: None,
            lora: None,
            priority: 0,
        });
        let s = c.schedule();
        c.complete(s);
        assert!(c.kv_usage() > 0.0);
        assert!(c.abort(1));
        assert!(!c.has_work());
        assert_eq!(c.kv_usage(), 0.0);
    }
}
