//! The `pick` stage: this node's engines and the routing view of its peers' engines turned into
//! plain facts (`policy::candidates::EngineFacts`), scored and chosen by `policy`, and the
//! decision explained (`policy::route::RouteDecision`). Also where a served prompt is
//! remembered, for engines whose caches this node cannot see exactly.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvmesh_policy::candidates::{self, Cache, EngineFacts, Load, Open, PromptKeys, Rules};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::prefix_index::EngineIndex;
use kvmesh_policy::route::{Mode, RouteDecision};
use kvmesh_policy::route_history::RoutedKeys;
use kvmesh_policy::score::Prefer;

use super::{Router, Scope, Target};
use crate::config::RoutingPolicy;
use crate::engine::{Engine, EngineView};
use crate::mesh::view::{EngineId, Ledger, PeerEngine};

/// RTT assumed for a peer with no open connection yet (QUIC has not measured it).
const UNMEASURED_PEER_RTT_MS: f64 = 1.0;

/// A pick: the engine, why, and the split when prefill goes elsewhere.
pub(crate) struct Picked {
    pub target: Target,
    pub decision: RouteDecision,
    pub split: Option<SplitTargets>,
    /// The block size the decision's matched blocks are counted in.
    pub block_size: u32,
    /// Blocks after the matched ones the engine holds offloaded (it loads them, and reports
    /// them as cached).
    pub offloaded_blocks: usize,
}

/// A request split between a prefill and a decode engine (`policy::pd`).
pub(crate) struct SplitTargets {
    pub prefill: Target,
    pub decode: Target,
    pub decision: RouteDecision,
}

/// What one of this node's engines shows the router, read once per pick.
struct LocalSnapshot<'a> {
    engine: &'a Arc<Engine>,
    view: EngineView,
    index: Option<std::sync::RwLockReadGuard<'a, EngineIndex>>,
    resyncing: bool,
    history: Option<std::sync::MutexGuard<'a, RoutedKeys>>,
    pending: Option<std::sync::MutexGuard<'a, RoutedKeys>>,
}

/// What this node knows of one of its own engines: its poller's view, its exact index (when it
/// publishes KV events, and not mid-resync), what this node sent there, its in-flight count.
fn local_facts<'a>(s: &'a LocalSnapshot<'a>, usable: bool, default_bs: u32) -> EngineFacts<'a> {
    let (cache, block_size) = match &s.index {
        Some(index) if s.resyncing => (Cache::Resyncing, index.block_size()),
        Some(index) => (Cache::Index(index), index.block_size()),
        // KV events, but the index could not be read: count on no cached prefix.
        None if s.engine.kv_events.is_some() => (Cache::Resyncing, None),
        None => (Cache::Unobserved, None),
    };
    EngineFacts {
        usable,
        rtt_ms: 0.0,
        load: Load { running: s.view.load.running, waiting: s.view.load.waiting, kv_usage: s.view.load.kv_usage },
        // Every request to an engine beside this node passes through it (its own and its
        // peers'), so the open count is the engine's queue.
        open: Open::All(s.engine.in_flight.load(Ordering::Relaxed)),
        cache,
        history: s.history.as_deref(),
        pending: s.pending.as_deref(),
        block_size: block_size.or(s.view.load.block_size).unwrap_or(default_bs),
        role: s.engine.role,
        fit: s.engine.ttft_fit(),
    }
}

/// What this node knows of a peer's engine: its gossiped load and its node's summary (a union
/// over the node's engines: the match is the node's, and the node itself picks among its
/// engines when it has several), plus what this node sent and placed there.
pub(crate) fn peer_facts<'a>(
    r: &'a PeerEngine,
    usable: bool,
    rtt_ms: f64,
    placed: u32,
    history: Option<&'a RoutedKeys>,
    default_bs: u32,
    reference: &kvmesh_policy::predict::Fit,
) -> EngineFacts<'a> {
    EngineFacts {
        usable,
        rtt_ms,
        load: Load {
            running: f64::from(r.load.running),
            waiting: f64::from(r.load.waiting),
            kv_usage: f64::from(r.load.kv_usage),
        },
        open: Open::Mine(r.in_flight.load(Ordering::Relaxed) + placed),
        cache: Cache::Summary { shards: &r.summary, stride: r.summary_stride },
        history,
        pending: None,
        block_size: r.load.block_size.unwrap_or(default_bs),
        role: r.load.role,
        // A fit a peer gossips is used when sane, within a factor of this node's weights.
        fit: r.load.ttft_fit.and_then(|f| f.bounded_by(reference)),
    }
}

impl Router {
    /// This node's engines serving `model` (only the one named `engine`, when one is named), as
    /// flow control sees them.
    pub(crate) fn local_flow_loads(&self, model: &str, engine: Option<&str>) -> Vec<kvmesh_policy::flow::EngineLoad> {
        let mut out = Vec::new();
        for e in self.engines.engines.iter().filter(|e| engine.is_none_or(|n| e.name == n)) {
            let v = e.snapshot();
            if !v.models.iter().any(|m| m == model) {
                continue;
            }
            out.push(kvmesh_policy::flow::EngineLoad {
                usable: v.healthy && e.role != kvmesh_policy::pd::Role::Prefill,
                local: true,
                running: v.load.running,
                waiting: v.load.waiting,
                in_flight: e.in_flight.load(Ordering::Relaxed),
                recent: 0,
                kv_usage: v.load.kv_usage,
            });
        }
        out
    }

    /// Flow control's view of the engines that serve `model`: this node's, and its peers'
    /// not suspected (`policy::flow::free_slots`).
    pub(crate) fn flow_loads(&self, model: &str) -> Vec<kvmesh_policy::flow::EngineLoad> {
        let mut out = self.local_flow_loads(model, None);
        if let Some(mesh) = self.mesh() {
            let view = mesh.view();
            let now = self.engines.now_ms();
            let lease = self.s.cells.placement_lease_ms;
            let mut ledgers = mesh.table.ledgers();
            let lag = self.s.report_lag_ms;
            for r in view.engines.iter().filter(|r| r.serves(model) && !mesh.table.suspected(r)) {
                let ledger = ledgers.as_mut().and_then(|l| l.get_mut(&r.id));
                let (placed, recent) = ledger.map_or((0, 0), |l| (l.placed.live(now, lease), l.sent.live(now, lag)));
                out.push(kvmesh_policy::flow::EngineLoad {
                    usable: r.load.healthy && r.load.role != kvmesh_policy::pd::Role::Prefill,
                    local: false,
                    running: f64::from(r.load.running),
                    waiting: f64::from(r.load.waiting),
                    in_flight: r.in_flight.load(Ordering::Relaxed) + placed,
                    recent: recent + placed,
                    kv_usage: f64::from(r.load.kv_usage),
                });
            }
        }
        out
    }

    /// The models this node's engines and its peers' serve (the saturation gauges' labels).
    pub(crate) fn models_served(&self) -> Vec<String> {
        let mut models = self.engines.models();
        if let Some(mesh) = self.mesh() {
            for r in mesh.view().engines.iter() {
                for m in &r.load.models {
                    if !models.contains(m) {
                        models.push(m.clone());
                    }
                }
            }
        }
        models
    }

    pub(crate) fn flow_settings(&self) -> &kvmesh_policy::flow::FlowSettings {
        self.flow.settings()
    }
}

impl Router {
    /// The engine with the lowest predicted time to first token for this request, among those
    /// not `tried` yet: cached prefix (exact index for this node's engines), queue, KV pressure
    /// and network distance (`policy::score`).
    pub(crate) fn pick(
        &self,
        model: &str,
        prompt: &mut PromptKeys,
        scope: Scope<'_>,
        tried: &[String],
        may_split: bool,
        session: Option<&str>,
    ) -> Result<Picked, ApiError> {
        let default_bs = self.s.default_block_size;
        let local: Vec<&Arc<Engine>> = match scope {
            Scope::Local(Some(name)) => {
                let named: Vec<_> = self
                    .engines
                    .engines
                    .iter()
                    .filter(|e| e.name == name && e.is_healthy() && e.serves(model))
                    .collect();
                if named.is_empty() {
                    self.engines.engines.iter().collect()
                } else {
                    named
                }
            }
            Scope::Local(None) | Scope::Mesh | Scope::Cell => self.engines.engines.iter().collect(),
        };
        let snaps: Vec<LocalSnapshot<'_>> = local
            .into_iter()
            .map(|engine| LocalSnapshot {
                engine,
                view: engine.snapshot(),
                index: engine.kv_events.as_ref().and_then(|_| engine.kv.index.read().ok()),
                resyncing: engine.kv.resyncing.load(Ordering::Relaxed),
                history: engine.routed.lock().ok(),
                pending: engine.kv_events.as_ref().and_then(|_| engine.pending.lock().ok()),
            })
            .collect();
        let mesh = self.mesh().filter(|_| matches!(scope, Scope::Mesh | Scope::Cell));
        let view = mesh.map(|m| m.view());
        let table = mesh.map(|m| &m.table);
        let remote: Vec<&PeerEngine> = match (&view, table) {
            (Some(v), Some(t)) => v.engines.iter().filter(|e| !t.suspected(e)).collect(),
            _ => Vec::new(),
        };
        // One clock for this node's route histories and the peer table's (`EngineSet::now_ms`).
        let now = self.engines.now_ms();
        let lease = self.s.cells.placement_lease_ms;
        // One lock for every peer engine's ledger: placements live now, then route histories.
        let mut ledgers = table.and_then(|t| t.ledgers());
        let placed: HashMap<EngineId, u32> = match ledgers.as_mut() {
            Some(l) => remote
                .iter()
                .filter_map(|r| l.get_mut(&r.id).map(|x| (r.id.clone(), x.placed.live(now, lease))))
                .collect(),
            None => HashMap::new(),
        };
        let ledger_of = |id: &EngineId| -> Option<&Ledger> { ledgers.as_ref().and_then(|l| l.get(id)) };

        let reference = kvmesh_policy::predict::Fit::of(&self.s.weights);
        let mut targets: Vec<Target> = Vec::with_capacity(snaps.len() + remote.len());
        let mut facts: Vec<EngineFacts<'_>> = Vec::with_capacity(snaps.len() + remote.len());
        let mut known = false;
        for s in &snaps {
            let serves = s.view.models.iter().any(|m| m == model);
            known |= serves;
            let t = Target::Local(s.engine.clone());
            let usable = s.view.healthy && serves && !tried.contains(&t.key());
            facts.push(local_facts(s, usable, default_bs));
            targets.push(t);
        }
        for r in &remote {
            let serves = r.serves(model);
            known |= serves;
            let rtt = mesh
                .and_then(|m| m.endpoint.rtt(r.addr))
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(UNMEASURED_PEER_RTT_MS);
            let t = Target::Remote((*r).clone());
            let usable = r.load.healthy && serves && !tried.contains(&t.key());
            let placed = placed.get(&r.id).copied().unwrap_or(0);
            let history = ledger_of(&r.id).map(|l| &l.routed);
            facts.push(peer_facts(r, usable, rtt, placed, history, default_bs, &reference));
            targets.push(t);
        }
        if !known {
            return Err(ApiError::model_not_found(model));
        }
        let none_healthy =
            || ApiError::unavailable(format!("No healthy engine serves `{model}` right now; retry later."));
        let mode = match self.s.routing {
            RoutingPolicy::Kvmesh | RoutingPolicy::KvmeshRandom => Mode::Kvmesh,
            RoutingPolicy::LeastLoad => Mode::LeastLoad,
            RoutingPolicy::RoundRobin => {
                // Baseline: the next usable engine in a fixed order, blind to load and cache.
                let usable: Vec<bool> = facts.iter().map(|f| f.usable).collect();
                let labels: Vec<String> = targets.iter().map(|t| t.label(&self.node_name)).collect();
                let i = candidates::round_robin(&usable, &labels, self.rr_next.fetch_add(1, Ordering::Relaxed))
                    .ok_or_else(none_healthy)?;
                let decision = RouteDecision::RoundRobin { engine: labels[i].clone() };
                let block_size = facts[i].block_size;
                return Ok(Picked {
                    target: targets.swap_remove(i),
                    decision,
                    split: None,
                    block_size,
                    offloaded_blocks: 0,
                });
            }
        };
        // The home node of a relayed prompt keeps it on its own engine when no other is
        // clearly better, so that the prefix settles where the prompt's next requests arrive.
        let home = matches!(scope, Scope::Cell)
            .then(|| (0..facts.len()).find(|&i| facts[i].usable && matches!(targets[i], Target::Local(_))))
            .flatten();
        // A client's session prefers one engine among near-equals, the same from every node;
        // without one, so does the prompt's prefix (`affinity::prefix_ranks`), so that a prefix
        // nobody is known to hold yet lands on one engine whichever node it reaches.
        let labels = || targets.iter().map(|t| t.label(&self.node_name)).collect::<Vec<String>>();
        let ranks = match session {
            Some(s) => Some(kvmesh_policy::affinity::ranks(s, &labels())),
            None if home.is_none() && self.s.routing == RoutingPolicy::Kvmesh => {
                prompt.placement_ranks(default_bs, &labels())
            }
            None => None,
        };
        let prefer = match (&ranks, home) {
            (Some(r), _) if session.is_some() => Prefer::Ranked(r),
            (Some(r), _) => Prefer::Placed(r),
            (None, Some(i)) => Prefer::Candidate(i),
            (None, None) => Prefer::Nothing,
        };
        let rules = Rules { mode, weights: &self.s.weights, pd: &self.s.pd };
        let d = candidates::decide(rules, prompt, &facts, now, may_split, prefer, |n| rand::random_range(0..n))
            .ok_or_else(none_healthy)?;
        let label = |i: usize| targets[i].label(&self.node_name);
        let split = d.split.as_ref().map(|s| SplitTargets {
            prefill: targets[s.prefill].clone(),
            decode: targets[s.decode].clone(),
            decision: RouteDecision::Split {
                decode: label(s.decode),
                prefill: label(s.prefill),
                prompt_tokens: prompt.tokens,
                predicted_ms: s.predicted_ms,
                whole_ms: s.whole_ms,
            },
        });
        let decision = RouteDecision::Whole {
            engine: label(d.index),
            matched_blocks: d.matched_blocks,
            prompt_tokens: prompt.tokens,
            predicted_ms: d.predicted_ms,
            runner_up: d.runner_up.map(|(i, ms)| (label(i), ms)),
            reason: d.reason,
        };
        Ok(Picked {
            target: targets.swap_remove(d.index),
            decision,
            split,
            block_size: d.block_size,
            offloaded_blocks: d.offloaded_blocks,
        })
    }

    /// Records where a served prompt went, for engines and peers whose caches this node cannot
    /// see exactly; for an engine indexed exactly from its KV events, only until its events
    /// can show the prompt (`pending`).
    pub(crate) fn remember_route(&self, target: &Target, prompt: &mut PromptKeys) {
        match target {
            Target::Local(e) => {
                // The block size routing cuts its keys at (`local_facts`).
                let indexed = e.kv.index.read().ok().and_then(|i| i.block_size());
                let bs = indexed.or(e.snapshot().load.block_size).unwrap_or(self.s.default_block_size);
                let (keys, record) = match prompt.approx_keys() {
                    Some(approx) => (approx.to_vec(), &e.routed),
                    None if e.kv_events.is_none() => (prompt.keys(bs).to_vec(), &e.routed),
                    None => (prompt.keys(bs).to_vec(), &e.pending),
                };
                if let Ok(mut r) = record.lock() {
                    r.record(&keys, self.engines.now_ms());
                }
            }
            Target::Remote(r) => {
                let Some(mesh) = self.mesh() else { return };
                let keys = match prompt.approx_keys() {
                    Some(approx) => approx.to_vec(),
                    None => prompt.keys(r.load.block_size.unwrap_or(self.s.default_block_size)).to_vec(),
                };
                if !keys.is_empty() {
                    mesh.table.record(&r.id, &keys, false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvmesh_clustersim::{engine_facts, Seen};
    use kvmesh_policy::blocks;
    use kvmesh_policy::candidates::{self, PromptKeys, Rules};
    use kvmesh_policy::pd::PdSettings;
    use kvmesh_policy::route::Mode;
    use kvmesh_policy::route_history::RoutedKeys;
    use kvmesh_policy::score::ScoreWeights;
    use kvmesh_policy::summary::{self, BloomShard};

    use super::peer_facts;
    use crate::mesh::view::PeerEngine;

    const BS: u32 = 16;

    /// A peer's engine as the node's routing view holds it.
    fn peer(name: &str, running: u32, waiting: u32, kv_usage: f32, held: &[u64], in_flight: u32) -> PeerEngine {
        let mut e = PeerEngine::named(name, "127.0.0.1:7000".parse().expect("addr"), "e0", "m", BS);
        e.load.running = running;
        e.load.waiting = waiting;
        e.load.kv_usage = kv_usage;
        e.summary =
            Arc::new(summary::build(held.iter().copied(), 1_000, 1).into_iter().map(|s| Some(Arc::new(s))).collect());
        e.in_flight.store(in_flight, std::sync::atomic::Ordering::Relaxed);
        e
    }

    /// The node's router and the cluster simulator, fed the same per-engine facts (gossiped
    /// load, node summary, route history, in-flight and placed counts, RTT), build the same
    /// candidates and make the same choice, for several mixes of cache and load.
    #[test]
    fn node_and_simulator_agree() {
        let ids: Vec<u32> = (0..(40 * BS)).collect();
        let seed = blocks::chain_seed("m", None, None);
        let keys = blocks::block_keys(seed, &ids, BS as usize);
        let mut history = RoutedKeys::new(60_000, 1_000);
        history.record(&keys[..30], 0);
        let (w, pd) = (ScoreWeights::default(), PdSettings::default());
        let reference = kvmesh_policy::predict::Fit::of(&w);
        // (engines: running, waiting, kv usage, blocks held, in flight; placed; rtt; history)
        type Engine = (u32, u32, f32, usize, u32, u32, f64, bool);
        let scenarios: Vec<Vec<Engine>> = vec![
            vec![(2, 0, 0.3, 40, 0, 0, 1.0, false), (0, 0, 0.1, 0, 0, 0, 1.0, false)],
            vec![
                (2, 3, 0.3, 10, 4, 1, 0.5, false),
                (1, 0, 0.2, 0, 0, 0, 2.0, true),
                (0, 1, 0.95, 40, 0, 0, 9.0, false),
            ],
            vec![
                (8, 6, 0.5, 40, 2, 2, 1.0, false),
                (0, 0, 0.1, 0, 0, 0, 30.0, false),
                (1, 1, 0.4, 20, 1, 0, 1.0, true),
            ],
        ];
        for (n, engines) in scenarios.into_iter().enumerate() {
            let peers: Vec<PeerEngine> = engines
                .iter()
                .enumerate()
                .map(|(i, (r, q, kv, held, inf, _, _, _))| peer(&format!("n{i}"), *r, *q, *kv, &keys[..*held], *inf))
                .collect();
            let node: Vec<_> = peers
                .iter()
                .zip(&engines)
                .map(|(p, (.., placed, rtt, h))| {
                    peer_facts(p, true, *rtt, *placed, h.then_some(&history), BS, &reference)
                })
                .collect();
            let shards: Vec<Vec<Option<Arc<BloomShard>>>> = peers.iter().map(|p| (*p.summary).clone()).collect();
            let sim: Vec<_> = engines
                .iter()
                .zip(&shards)
                .map(|((r, q, kv, _, inf, placed, rtt, h), shards)| {
                    let load = candidates::Load { running: *r as f64, waiting: *q as f64, kv_usage: f64::from(*kv) };
                    let seen = Seen::Peer {
                        load: Some(load),
                        shards,
                        stride: 1,
                        rtt_ms: *rtt,
                        in_flight: inf + placed,
                        history: h.then_some(&history),
                    };
                    engine_facts(seen, BS)
                })
                .collect();
            let prompt = || PromptKeys::from_ids(seed, ids.clone());
            let est = |facts: &[candidates::EngineFacts<'_>]| -> Vec<_> {
                let mut p = prompt();
                facts.iter().map(|f| candidates::estimate(&mut p, f, 1)).collect()
            };
            assert_eq!(est(&node), est(&sim), "scenario {n}: candidates differ");
            let rules = Rules { mode: Mode::Kvmesh, weights: &w, pd: &pd };
            let pick = |facts: &[candidates::EngineFacts<'_>]| {
                candidates::decide(rules, &mut prompt(), facts, 1, false, kvmesh_policy::score::Prefer::Nothing, |_| 0)
                    .map(|d| (d.index, d.reason))
            };
            assert!(pick(&node).is_some(), "scenario {n}");
            assert_eq!(pick(&node), pick(&sim), "scenario {n}: choices differ");
        }
    }
}
