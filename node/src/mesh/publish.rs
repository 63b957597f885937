//! What this node gossips about its own engines: their load, and a Bloom summary of the KV
//! blocks they hold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_gossip::{EngineLoad, KvSummarySlot, LoadReport};
use kvmesh_policy::candidates::{reported_queue, Load};
use kvmesh_policy::summary::{self, BloomShard};
use tokio_util::sync::CancellationToken;

use super::Mesh;
use crate::engine::EngineSet;

/// Publishes this node's engine load whenever it changes (checked every `every`).
pub(super) async fn publish_load(mesh: Arc<Mesh>, engines: Arc<EngineSet>, every: Duration, cancel: CancellationToken) {
    let mut last_tokens: HashMap<String, (f64, Instant)> = HashMap::new();
    let mut tick = ticker(every);
    while next_tick(&mut tick, &cancel).await {
        let report = LoadReport {
            engines: engines
                .engines
                .iter()
                .map(|e| {
                    let v = e.snapshot();
                    let now = Instant::now();
                    // The queue as of now: every request to this engine passes through this
                    // node, so its open count is fresher than the last poll's.
                    let open = e.in_flight.load(std::sync::atomic::Ordering::Relaxed);
                    let (running, waiting) = reported_queue(
                        open,
                        &Load { running: v.load.running, waiting: v.load.waiting, kv_usage: v.load.kv_usage },
                    );
                    let tps = match last_tokens.insert(e.name.clone(), (v.load.generation_tokens, now)) {
                        Some((prev, at)) if v.load.generation_tokens >= prev => {
                            ((v.load.generation_tokens - prev) / now.duration_since(at).as_secs_f64().max(1e-3)) as f32
                        }
                        _ => 0.0,
                    };
                    EngineLoad {
                        name: e.name.clone(),
                        models: v.models.clone(),
                        healthy: v.healthy,
                        role: e.role,
                        running: running as u32,
                        waiting: waiting as u32,
                        kv_usage: ((v.load.kv_usage * 100.0).round() / 100.0) as f32,
                        // Rounded so that noise does not re-gossip an unchanged engine.
                        tokens_per_s: (tps / 10.0).round() * 10.0,
                        block_size: v.load.block_size,
                        cards: v.cards.gossip_cards(),
                        max_model_len: v.max_model_len,
                        ttft_fit: e.ttft_fit(),
                    }
                })
                .collect(),
            held: mesh.held.load(std::sync::atomic::Ordering::Relaxed),
        };
        if let Err(e) = mesh.membership.set_load(&report).await {
            tracing::warn!(error = %e, "publishing load failed");
        }
    }
}

/// Publishes the KV summary of this node's engines: a Bloom filter of the union of their exact
/// indexes, in 16 shards. Every `every`, a shard is re-gossiped if at least `min_change` of its
/// bits changed, or if any changed and it was last sent over `STALE_AFTER` ago. A long new
/// prefix shows up at the next tick, and steady churn costs at most one summary per tick.
pub(super) async fn publish_summary(
    mesh: Arc<Mesh>,
    engines: Arc<EngineSet>,
    every: Duration,
    min_change: f64,
    stride: u32,
    cancel: CancellationToken,
) {
    const STALE_AFTER: Duration = Duration::from_secs(10);
    let mut last: Vec<Option<(BloomShard, Instant)>> = vec![None; summary::SHARDS];
    let mut version = 0u64;
    let mut tick = ticker(every);
    while next_tick(&mut tick, &cancel).await {
        let mut keys: Vec<u64> = Vec::new();
        let mut capacity = 0usize;
        let now = engines.now_ms();
        let mut routed_keys: Vec<u64> = Vec::new();
        for e in &engines.engines {
            if let Ok(index) = e.kv.index.read() {
                keys.extend(index.keys());
            }
            // What this node routed to the engine within the TTL: the only evidence for an
            // engine without KV events, and for approximate-mode (text) keys.
            if let Ok(routed) = e.routed.lock() {
                routed_keys.extend(routed.live_keys(now));
            }
            capacity += e.snapshot().load.num_gpu_blocks.unwrap_or(28_000) as usize;
        }
        // The filter is sized for every key it holds (so its false-positive rate stays at its
        // bound), up to the summary's cap; over the cap, exact keys go in before routed ones.
        routed_keys.truncate(summary::MAX_CAPACITY_KEYS.saturating_sub(keys.len()));
        keys.extend(routed_keys);
        let capacity = capacity.max(keys.len());
        let shards = summary::build(keys.into_iter(), capacity, stride);
        let mut sent = false;
        for (i, shard) in shards.into_iter().enumerate() {
            let due = match &last[i] {
                None => true,
                Some((prev, at)) => {
                    let d = shard.difference(prev);
                    d > 0.0 && (d >= min_change || at.elapsed() >= STALE_AFTER)
                }
            };
            if due {
                mesh.membership.set_kv_shard(i, shard.encode()).await;
                last[i] = Some((shard, Instant::now()));
                sent = true;
            }
        }
        if sent {
            version += 1;
            let slot = KvSummarySlot { format: "bloom-v1".into(), version, stride };
            if let Err(e) = mesh.membership.set_kv_summary(&slot).await {
                tracing::warn!(error = %e, "publishing the KV summary failed");
            }
        }
    }
}

/// An interval that skips missed ticks instead of bursting after a stall.
fn ticker(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick; false once the node is shutting down.
async fn next_tick(tick: &mut tokio::time::Interval, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tick.tick() => true,
    }
}
