//! The `pick` stage: this node's engines and the routing view of its peers' engines turned into
//! plain facts (`policy::candidates::EngineFacts`), scored and chosen by `policy`, and the
//! decision explained (`policy::route::RouteDecision`). Also where a served prompt is
//! remembered, for engines whose caches this node cannot see exactly.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvmesh_policy::candidates::{self, Cache, EngineFacts, Load, PromptKeys, Rules};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::prefix_index::EngineIndex;
use kvmesh_policy::route::{Mode, RouteDecision};
use kvmesh_policy::route_history::RoutedKeys;

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

        let mut targets: Vec<Target> = Vec::with_capacity(snaps.len() + remote.len());
        let mut facts: Vec<EngineFacts<'_>> = Vec::with_capacity(snaps.len() + remote.len());
        let mut known = false;
        for s in &snaps {
            let serves = s.view.models.iter().any(|m| m == model);
            known |= serves;
            let t = Target::Local(s.engine.clone());
            let (cache, block_size) = match &s.index {
                Some(_) if s.resyncing => (Cache::Resyncing, s.index.as_ref().and_then(|i| i.block_size())),
                Some(index) => (Cache::Index(index), index.block_size()),
                None if s.engine.kv_events.is_some() => (Cache::Resyncing, None),
                None => (Cache::Unobserved, None),
            };
            facts.push(EngineFacts {
                usable: s.view.healthy && serves && !tried.contains(&t.key()),
                rtt_ms: 0.0,
                load: Load {
                    running: s.view.load.running,
                    waiting: s.view.load.waiting,
                    kv_usage: s.view.load.kv_usage,
                },
                in_flight: Some(s.engine.in_flight.load(Ordering::Relaxed)),
                cache,
                history: s.history.as_deref(),
                block_size: block_size.or(s.view.load.block_size).unwrap_or(default_bs),
                role: s.engine.role,
            });
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
            let in_flight = r.in_flight.load(Ordering::Relaxed) + placed.get(&r.id).copied().unwrap_or(0);
            facts.push(EngineFacts {
                usable: r.load.healthy && serves && !tried.contains(&t.key()),
                rtt_ms: rtt,
                load: Load {
                    running: f64::from(r.load.running),
                    waiting: f64::from(r.load.waiting),
                    kv_usage: f64::from(r.load.kv_usage),
                },
                in_flight: Some(in_flight),
                // The peer's summary covers all its engines (a union): the match is the node's,
                // and the node itself picks the engine when it has several.
                cache: Cache::Summary { shards: &r.summary, stride: r.summary_stride },
                history: ledger_of(&r.id).map(|l| &l.routed),
                block_size: r.load.block_size.unwrap_or(default_bs),
                role: r.load.role,
            });
            targets.push(t);
        }
        if !known {
            return Err(ApiError::model_not_found(model));
        }
        let none_healthy =
            || ApiError::unavailable(format!("No healthy engine serves `{model}` right now; retry later."));
        let mode = match self.s.routing {
            RoutingPolicy::Kvmesh => Mode::Kvmesh,
            RoutingPolicy::LeastLoad => Mode::LeastLoad,
            RoutingPolicy::RoundRobin => {
                // Baseline: the next usable engine in a fixed order, blind to load and cache.
                let usable: Vec<bool> = facts.iter().map(|f| f.usable).collect();
                let labels: Vec<String> = targets.iter().map(|t| t.label(&self.node_name)).collect();
                let i = candidates::round_robin(&usable, &labels, self.rr_next.fetch_add(1, Ordering::Relaxed))
                    .ok_or_else(none_healthy)?;
                let decision = RouteDecision::RoundRobin { engine: labels[i].clone() };
                return Ok(Picked { target: targets.swap_remove(i), decision, split: None });
            }
        };
        // The home node of a relayed prompt keeps it on its own engine when no other is
        // clearly better, so that the prefix settles where the prompt's next requests arrive.
        let prefer = matches!(scope, Scope::Cell)
            .then(|| (0..facts.len()).find(|&i| facts[i].usable && matches!(targets[i], Target::Local(_))))
            .flatten();
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
        Ok(Picked { target: targets.swap_remove(d.index), decision, split })
    }

    /// Records where a served prompt went, for engines and peers whose caches this node cannot
    /// see exactly (engines with KV events are indexed exactly and need no record).
    pub(crate) fn remember_route(&self, target: &Target, prompt: &mut PromptKeys) {
        match target {
            Target::Local(e) => {
                let keys = match prompt.approx_keys() {
                    Some(approx) => approx.to_vec(),
                    None if e.kv_events.is_none() => {
                        prompt.keys(e.snapshot().load.block_size.unwrap_or(self.s.default_block_size)).to_vec()
                    }
                    None => return,
                };
                if let Ok(mut r) = e.routed.lock() {
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
