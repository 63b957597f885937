//! What each node publishes, as chitchat key-values. Every value is JSON, sealed with the node's
//! signature as `{signature}.{index}.{json}` (`signed`). The key `v` holds
//! the schema version: a node ignores peers on a different major version instead of misreading
//! them.
//!
//! | key | value | changes |
//! |---|---|---|
//! | `cert` | the node's certificate chain (base64url DER, comma-separated), signed by itself | at start |
//! | `v` | schema version (`2`) | never |
//! | `node` | [`NodeMeta`]: role, models, HTTP and QUIC addresses | at start |
//! | `load` | [`LoadReport`]: per-engine running, waiting, KV usage, throughput | at most every `load_interval` and only when changed |
//! | `kv` | [`KvSummarySlot`]: the KV-prefix summary's format and version | with the summary |
//! | `kv.0` .. `kv.15` | one Bloom-filter shard each (`policy::summary`), opaque here | a shard only when it changed enough |
//! | `usage` | [`UsageReport`]: per-tenant requests and tokens in the current minute window | while a tenant is active, when changed |
//! | `cell.{name}` | [`CellReport`] of cell `name`, republished by its own cell's gateways (cells only) | every backbone interval, when changed |
//! | `cellm.{name}` | [`CellMember`]s of cell `name` (cells only) | when that cell's members change |
//!
//! On the cells backbone (gossip channel 1, gateways only) a gateway publishes the same two
//! values for its own cell under `cell` and `cellm`.

use serde::{Deserialize, Serialize};

/// 2: every value sealed with its node's signature (`signed`), and the certificate under `cert`.
pub const SCHEMA_VERSION: u32 = 2;
pub const KEY_VERSION: &str = "v";
pub const KEY_NODE: &str = "node";
pub const KEY_LOAD: &str = "load";
pub const KEY_KV: &str = "kv";
pub const KEY_USAGE: &str = "usage";
/// Shard `i` of the KV summary is under `kv.{i}` (an opaque string to this crate).
pub const KV_SHARDS: usize = 16;

pub const KEY_CELL: &str = "cell";
pub const KEY_CELL_MEMBERS: &str = "cellm";

/// A cell's report, republished inside every cell: `cell.{name}`.
pub fn cell_key(name: &str) -> String {
    format!("{KEY_CELL}.{name}")
}

/// A cell's members, republished inside every cell: `cellm.{name}`.
pub fn cell_members_key(name: &str) -> String {
    format!("{KEY_CELL_MEMBERS}.{name}")
}

/// What the rest of the mesh knows of a cell (`policy::cells::CellLoad`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellReport {
    pub name: String,
    /// Healthy engines that serve whole requests.
    pub engines: u32,
    /// Requests running and waiting on them, summed.
    pub load: f64,
}

/// A node of a cell with engines, where requests homed in the cell may be sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellMember {
    pub name: String,
    /// Its QUIC address.
    pub addr: String,
}

pub fn kv_shard_key(i: usize) -> String {
    format!("kv.{i}")
}

/// Whether a node runs engines or only routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Routes only: no engines, never an embedded simulator.
    Edge,
    #[default]
    Worker,
}

/// Which phase of a request an engine takes (prefill/decode disaggregation): `policy` decides
/// with it, gossip carries it (`"prefill"`, `"decode"` or `"both"`).
pub use kvmesh_policy::pd::Role as EngineRole;

pub use kvmesh_policy::models::ModelCard;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeMeta {
    pub role: NodeRole,
    pub models: Vec<String>,
    /// Where clients reach this node's OpenAI API.
    pub http_addr: String,
    /// Where peers reach this node (QUIC, also the gossip address).
    pub quic_addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineLoad {
    pub name: String,
    pub models: Vec<String>,
    pub healthy: bool,
    #[serde(default)]
    pub role: EngineRole,
    pub running: u32,
    pub waiting: u32,
    /// 0..1.
    pub kv_usage: f32,
    /// Output tokens per second over the last report interval.
    pub tokens_per_s: f32,
    pub block_size: Option<u32>,
    /// The engine's `/v1/models` cards (id, root, parent), so that every node keys a request
    /// for an alias or a LoRA adapter as the engine does (`policy::models`). Absent from nodes
    /// that predate it: their models are then keyed under their own names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cards: Vec<ModelCard>,
    /// The context length the engine reports (`/v1/models` `max_model_len`), shown in every
    /// node's `/v1/models`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<u32>,
    /// The engine's TTFT model as its node fitted it from the answers it relayed
    /// (`policy::predict`); peers route on it when it is sane. Absent until fitted, and from
    /// nodes that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_fit: Option<kvmesh_policy::predict::Fit>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LoadReport {
    pub engines: Vec<EngineLoad>,
    /// Client requests the node holds in its flow-control queue: peers count their share of
    /// free engine places in proportion (`policy::flow::remote_share`). Absent from nodes that
    /// predate it: they hold none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: u32,
}

/// Held requests a peer may claim: a node holds at most its `flow.queue_capacity` (1,024 by
/// default); more is a peer's mistake or lie, and would shrink every other node's share of
/// engines' free places toward its floor.
pub const MAX_HELD: u32 = 1 << 16;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Describes the KV-prefix summary a node publishes in the `kv.{0..15}` keys: `format` is
/// `"none"` (no summary: peers treat every prefix as uncached) or `"bloom-v1"` (see
/// `policy::summary`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvSummarySlot {
    pub format: String,
    pub version: u64,
    /// Sampling stride of the summary's keys (`policy::summary`); 1 (every key) when absent.
    #[serde(default = "one")]
    pub stride: u32,
}

fn one() -> u32 {
    1
}

impl Default for KvSummarySlot {
    fn default() -> Self {
        Self { format: "none".into(), version: 0, stride: 1 }
    }
}

/// One tenant's use of the rate-limit window on the publishing node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TenantUsage {
    #[serde(rename = "r")]
    pub requests: u64,
    #[serde(rename = "t")]
    pub tokens: u64,
    /// Milliseconds (at publishing) until the oldest counted part leaves the window.
    #[serde(rename = "reset")]
    pub reset_ms: u64,
}

/// Per-tenant usage a node admitted in the last minute, so every node enforces the same
/// limits mesh-wide (`policy::limits`). Tenants with no use are left out.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageReport {
    pub tenants: std::collections::BTreeMap<String, TenantUsage>,
}

/// Bounds on what a peer's gossiped state may hold once decoded: a member (or a bug) must not
/// make every node keep, or score on each request, unbounded lists (the message itself is at
/// most 4 MiB). Past a bound the rest is dropped.
pub const MAX_ENGINES_PER_NODE: usize = 256;
pub const MAX_MODELS: usize = 256;
pub const MAX_NAME_BYTES: usize = 512;
pub const MAX_TENANTS: usize = 4096;
/// Cell keys (`cell.*`) read from one node: a gateway republishes one per cell.
pub const MAX_CELL_KEYS: usize = 4096;

fn short(s: &str) -> bool {
    s.len() <= MAX_NAME_BYTES
}

/// A peer's gossiped value, decoded (`None` when it is not the type's JSON) and bounded (the
/// types' `bounded`): a peer's state is input like any other. `membership` reads every value
/// of a peer's state through these.
fn decode_bounded<T: for<'de> Deserialize<'de>>(value: &str, bounded: fn(T) -> T) -> Option<T> {
    serde_json::from_str::<T>(value).ok().map(bounded)
}

impl KvSummarySlot {
    /// A peer's `kv` value. Nothing to bound: its stride is clamped where it is used
    /// (`policy::summary::MAX_STRIDE`).
    pub fn decode(value: &str) -> Option<Self> {
        decode_bounded(value, |s| s)
    }
}

impl NodeMeta {
    /// A peer's `node` value, decoded and bounded.
    pub fn decode(value: &str) -> Option<Self> {
        decode_bounded(value, Self::bounded)
    }

    pub fn bounded(mut self) -> Self {
        self.models.retain(|m| short(m));
        self.models.truncate(MAX_MODELS);
        self
    }
}

impl LoadReport {
    /// A peer's `load` value, decoded and bounded.
    pub fn decode(value: &str) -> Option<Self> {
        decode_bounded(value, Self::bounded)
    }

    pub fn bounded(mut self) -> Self {
        self.engines.retain(|e| short(&e.name));
        self.engines.truncate(MAX_ENGINES_PER_NODE);
        self.held = self.held.min(MAX_HELD);
        for e in &mut self.engines {
            // JSON holds no infinity, but an f32 read from a number past its range is one:
            // such a report would not survive gossip again, and routing would score on it.
            e.kv_usage = if e.kv_usage.is_finite() { e.kv_usage.clamp(0.0, 1.0) } else { 0.0 };
            e.tokens_per_s = if e.tokens_per_s.is_finite() { e.tokens_per_s.max(0.0) } else { 0.0 };
            if let Some(f) = e.ttft_fit {
                let coefficients = [f.first_step_ms, f.per_waiting_ms, f.per_uncached_token_ms, f.per_running_ms];
                if !coefficients.iter().all(|c| c.is_finite()) {
                    e.ttft_fit = None;
                }
            }
            e.models.retain(|m| short(m));
            e.models.truncate(MAX_MODELS);
            e.cards.truncate(kvmesh_policy::models::MAX_CARDS_PER_ENGINE);
        }
        self
    }
}

impl UsageReport {
    /// A peer's `usage` value, decoded and bounded.
    pub fn decode(value: &str) -> Option<Self> {
        decode_bounded(value, Self::bounded)
    }

    pub fn bounded(mut self) -> Self {
        self.tenants.retain(|t, _| short(t));
        while self.tenants.len() > MAX_TENANTS {
            self.tenants.pop_last();
        }
        self
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    /// Found by the `gossip` fuzz target: an f32 field given a number past f32's range decoded
    /// as infinity (a `kv_usage` of 1e39 routed on as infinite pressure), and such a report
    /// did not decode again once republished (infinity encodes as `null`).
    #[test]
    fn a_peers_load_figures_are_finite_once_decoded() {
        let engine = r#"{"name":"e","models":[],"healthy":true,"running":0,"waiting":0,"block_size":null"#;
        let fit =
            r#""ttft_fit":{"first_step_ms":1e39,"per_waiting_ms":1,"per_uncached_token_ms":1,"per_running_ms":1}"#;
        let wire = format!(
            r#"{{"engines":[{engine},"kv_usage":1e39,"tokens_per_s":-1e39,{fit}}},{engine},"kv_usage":-0.5,"tokens_per_s":2}}]}}"#
        );
        let load = LoadReport::decode(&wire).unwrap();
        assert_eq!((load.engines[0].kv_usage, load.engines[0].tokens_per_s), (0.0, 0.0));
        assert_eq!(load.engines[0].ttft_fit, None);
        assert_eq!((load.engines[1].kv_usage, load.engines[1].tokens_per_s), (0.0, 2.0));
        assert_eq!(LoadReport::decode(&serde_json::to_string(&load).unwrap()), Some(load));
    }

    #[test]
    fn a_peers_state_is_bounded_once_decoded() {
        let engine = |i: usize| EngineLoad {
            name: format!("e{i}"),
            models: (0..1000).map(|m| format!("m{m}")).collect(),
            healthy: true,
            role: Default::default(),
            running: 0,
            waiting: 0,
            kv_usage: 0.0,
            tokens_per_s: 0.0,
            block_size: None,
            cards: Vec::new(),
            max_model_len: None,
            ttft_fit: None,
        };
        let mut load = LoadReport { engines: (0..1000).map(engine).collect(), ..Default::default() };
        load.engines.insert(0, EngineLoad { name: "x".repeat(10_000), ..engine(0) });
        let load = load.bounded();
        assert_eq!(load.engines.len(), MAX_ENGINES_PER_NODE);
        assert!(load.engines.iter().all(|e| e.models.len() == MAX_MODELS && e.name.len() < 10));
        let usage =
            UsageReport { tenants: (0..10_000).map(|i| (format!("t{i}"), TenantUsage::default())).collect() }.bounded();
        assert_eq!(usage.tenants.len(), MAX_TENANTS);
    }
}
