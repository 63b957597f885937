//! One typed configuration: defaults, then a TOML file (`--config`), then environment variables
//! (`KVMESH_*`), then flags. Validated once at start with messages that say what to fix.
//!
//! Why one long file: every key, with its doc, default, variable and flag, sits in one place,
//! validation beside it (`tests/config_reference.rs` checks docs/configuration.md against it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::NodeError;
pub use kvmesh_gossip::NodeRole;
use kvmesh_policy::auth::{KeyEntry, KeyStore};
use kvmesh_policy::guardrails::GuardrailConfig;
use kvmesh_policy::limits::{LimitSpec, LimitsConfig};
use kvmesh_policy::prompt_encoder::EncoderChoice;
use kvmesh_policy::score::ScoreWeights;

use crate::audit::AuditConfig;
use kvmesh_sim::EngineConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's name in logs, headers and the mesh (its gossip id). Defaults to the host name.
    pub node_name: String,
    /// Address of the OpenAI API, `/health` and `/metrics`.
    pub http_addr: String,
    /// Engines beside this node. Empty: start the embedded engine simulator.
    pub engines: Vec<EngineEntry>,
    /// Start the embedded simulator when no engine is configured.
    pub embedded_engine: bool,
    /// Settings of the embedded simulator.
    pub embedded: EngineConfig,
    /// P/D role of the embedded simulator (see `[[engines]] role`); `prefill` and `decode` turn
    /// on its KV transfer (`embedded.kv_transfer`).
    pub embedded_role: kvmesh_policy::pd::Role,
    /// Prefill/decode disaggregation: when to split a request.
    pub pd: kvmesh_policy::pd::PdSettings,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// A client must send a request's headers within this long (the first request and every
    /// later one on a kept-alive connection): slow or idle connections are closed.
    pub http_header_timeout_ms: u64,
    /// ... and its body within this long once the headers are in.
    pub http_body_timeout_ms: u64,
    /// A client that accepts none of an answer's bytes for this long (a stream it stopped
    /// reading) is disconnected, which cancels its request on the engine.
    pub http_write_timeout_ms: u64,
    /// Client connections open at once; beyond it new ones are closed at once.
    pub http_max_connections: usize,
    /// How often each engine's `/health` and `/metrics` are read.
    pub engine_poll_interval_ms: u64,
    /// Connecting to an engine.
    pub engine_connect_timeout_ms: u64,
    /// From sending a request to the engine's response head (includes queueing in the engine).
    pub engine_first_byte_timeout_ms: u64,
    /// Longest silence between two chunks of a streamed response before it is cut.
    pub engine_idle_timeout_ms: u64,
    /// Longest a KV-event resync from an engine's replay socket may take before the engine's
    /// index is dropped instead.
    pub kv_events_replay_timeout_ms: u64,
    /// Engines tried for one request when the first choices fail before answering.
    pub max_attempts: u32,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// `worker` runs engines (or the embedded simulator); `edge` only routes to peers.
    pub role: NodeRole,
    /// Meshes with different ids never merge, even when their seeds overlap.
    pub cluster_id: String,
    /// UDP address of the QUIC endpoint (gossip and forwarded requests).
    pub quic_addr: String,
    /// Address peers dial for this node; defaults to `quic_addr`, with an unspecified IP
    /// replaced by the one that routes to the first seed (or loopback without seeds).
    pub advertise_addr: Option<String>,
    /// `host:port` of nodes to join through. Empty: this node starts a mesh of its own.
    pub seeds: Vec<String>,
    /// Directory with `ca.crt`, `NODE.crt` and `NODE.key` (as `kvmesh cert` writes them).
    pub tls_dir: Option<PathBuf>,
    /// Explicit certificate paths; they override `tls_dir`.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub gossip_interval_ms: u64,
    /// Phi-accrual threshold of the failure detector.
    pub phi_threshold: f64,
    /// How often engine load is published to the mesh (only when it changed).
    pub load_publish_interval_ms: u64,
    /// How long a peer that failed a forwarded request is skipped.
    pub peer_suspect_ms: u64,
    /// Tokenizers for prefix matching, per model served in the mesh.
    pub models: Vec<ModelEntry>,
    /// Block size assumed for engines that have not reported theirs.
    pub default_block_size: u32,
    /// How often this node's KV summary is checked for changes worth gossiping.
    pub summary_interval_ms: u64,
    /// Fraction of a summary shard's bits that must change before it is re-gossiped; smaller
    /// changes wait until the shard is 10 s old. 0 (the default) sends any change at the next
    /// `summary_interval_ms`, so a new prefix is visible to peers within one interval plus
    /// gossip.
    pub summary_min_change: f64,
    /// The summary holds one block key in this many (by hash), which shrinks it and its gossip
    /// by the same factor; peers' matches fall short by `stride` - 1 blocks on average
    /// (`policy::summary`). 1 publishes every key.
    pub summary_stride: u32,
    /// Weights of the predicted-TTFT score.
    pub score: ScoreWeights,
    /// The tokenizer service: encoding threads, queue and segment cache.
    pub tokenize: TokenizeSettings,
    /// How long a prefix this node routed to an engine counts as cached there, where nothing
    /// better is known: engines without KV events, peers before their summary shows it, and
    /// models without a tokenizer (approximate mode).
    pub route_history_ttl_s: u64,
    /// Bound on the block keys remembered per engine for that purpose.
    pub route_history_max_keys: usize,
    /// How engines are chosen. `kvmesh` (the default) predicts TTFT from cached prefixes and
    /// load; `kvmesh_random`, `least_load` and `round_robin` are baselines for benchmarks.
    pub routing: RoutingPolicy,
    /// A request header whose value names a client's session, besides `x-session-affinity`
    /// (and OpenAI's `user`/`safety_identifier`, a Responses `conversation`, Anthropic's
    /// `metadata.user_id`): a session prefers one engine among near-equals (`policy::affinity`).
    pub session_header: Option<String>,
    /// Cells for large meshes (`policy::cells`, ARCHITECTURE.md *Cells*). Off unless `name`
    /// is set.
    pub cells: CellsConfig,
    /// API keys. With none configured, the whole API is open, admin and mesh routes included.
    pub auth: AuthConfig,
    /// Per-tenant rate and budget limits (tenants come from `[auth]`; without keys every
    /// request is tenant `anonymous`).
    pub limits: LimitsConfig,
    /// How often this node gossips its per-tenant usage, so limits hold mesh-wide.
    pub usage_publish_interval_ms: u64,
    /// Flow control: requests held at this node while engines are saturated, priority bands,
    /// fair sharing between tenants, deadlines (`policy::flow`, docs/configuration.md).
    pub flow: kvmesh_policy::flow::FlowSettings,
    /// Guardrail hooks, run in this order on prompts and on answers.
    pub guardrails: Vec<GuardrailConfig>,
    /// More guardrail hooks (`[[guardrails]]` entries), run after the inline ones; re-read when
    /// the file changes, on `POST /admin/reload` and on SIGHUP.
    pub guardrails_file: Option<PathBuf>,
    /// How often the guardrails file is checked for changes.
    pub guardrails_reload_interval_ms: u64,
    /// Text held back from a streamed answer so rules see matches across chunks (characters,
    /// counted as UTF-8 bytes). Longer matches can slip through; text reaches clients this late.
    pub guardrail_window_chars: usize,
    /// The hash-chained audit trail.
    pub audit: AuditConfig,
    /// Trace export.
    pub observability: ObservabilityConfig,
}

/// `[observability]`: where spans go besides the log.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ObservabilityConfig {
    /// Base URL of an OpenTelemetry collector's OTLP/HTTP receiver (e.g. `http://otel:4318`);
    /// spans are POSTed as protobuf to `/v1/traces`. Unset: no export.
    pub otlp_endpoint: Option<String>,
}

/// `[auth]`: API keys inline, from a file, or both.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub keys: Vec<KeyEntry>,
    /// A TOML file of `[[keys]]` entries, re-read when it changes (no restart needed).
    pub keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    pub reload_interval_ms: u64,
    /// `/metrics` also needs an admin key (off: Prometheus scrapes without one).
    pub protect_metrics: bool,
    /// With no keys configured, admin and mesh-debug routes (`/admin/*`, `/v1/mesh/*`) answer
    /// loopback clients only; this opens them to everyone (a lab or a trusted network).
    pub open_admin: bool,
}

impl Default for AuthConfig {
    /// The defaults of an absent `[auth]` and of each key a present `[auth]` leaves out.
    fn default() -> Self {
        Self { keys: Vec::new(), keys_file: None, reload_interval_ms: 2_000, protect_metrics: false, open_admin: false }
    }
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.keys_file.is_some()
    }
}

/// The keys file: `[[keys]]` entries as in `[auth]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
}

impl KeysFile {
    pub fn read(path: &std::path::Path) -> Result<Vec<KeyEntry>, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| NodeError::ConfigFile { path: path.display().to_string(), source })?;
        let f: KeysFile = toml::from_str(&text)
            .map_err(|e| NodeError::ConfigParse { path: path.display().to_string(), message: e.to_string() })?;
        Ok(f.keys)
    }
}

/// A guardrails file: `[[guardrails]]` entries in the main config's format.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardrailsFile {
    #[serde(default)]
    pub guardrails: Vec<GuardrailConfig>,
}

impl GuardrailsFile {
    /// Reads the file and checks that every entry builds (valid regexes, required fields). A
    /// syntax or field error names its line (TOML's message); an entry that does not build is
    /// named by its position, its line and its name.
    pub fn read(path: &std::path::Path) -> Result<Vec<GuardrailConfig>, NodeError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| NodeError::ConfigFile { path: shown.clone(), source })?;
        let f: GuardrailsFile = toml::from_str(&text)
            .map_err(|e| NodeError::ConfigParse { path: shown.clone(), message: e.to_string() })?;
        // Line of each `[[guardrails]]` header, in order: entry i starts at the i-th.
        let headers: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("[[guardrails]]"))
            .map(|(i, _)| i + 1)
            .collect();
        for (i, g) in f.guardrails.iter().enumerate() {
            if let Err(e) = g.build() {
                let at = headers.get(i).map(|l| format!(" at line {l}")).unwrap_or_default();
                return Err(NodeError::ConfigParse {
                    path: shown,
                    message: format!("entry {} of [[guardrails]]{at}: {e}", i + 1),
                });
            }
        }
        Ok(f.guardrails)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RoutingPolicy {
    #[default]
    Kvmesh,
    /// kvmesh drawing at random among near-equal engines instead of ranking them by the
    /// prompt's prefix (`policy::affinity::prefix_ranks`): the baseline that measures placement.
    KvmeshRandom,
    LeastLoad,
    RoundRobin,
}

/// A model's tokenizer files (`tokenizer.json` and `tokenizer_config.json`, or their directory).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    pub tokenizer: PathBuf,
    /// A Jinja chat template that wins over the one in `tokenizer_config.json`.
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// `auto` (the fast encoder where it passes the start-up check), `reference` or `fast`.
    #[serde(default)]
    pub encoder: EncoderChoice,
    /// Context length to enforce before routing; defaults to `model_max_length` from
    /// `tokenizer_config.json`. Set it to the engines' `--max-model-len` when that is smaller.
    #[serde(default)]
    pub max_model_len: Option<u32>,
}

/// `[cells]`: this node's cell in a mesh split into cells. Nodes of one cell gossip among
/// themselves (cluster id `{cluster_id}/{name}`); gateways also join the backbone (gossip
/// channel 1, cluster id `{cluster_id}/backbone`) and carry each cell's load and members
/// between cells. A request whose prompt's home is another cell goes to its home node there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CellsConfig {
    /// This node's cell (a rack, a zone, about 16 nodes). Unset: one flat mesh.
    pub name: Option<String>,
    /// Whether this node is one of its cell's gateways (two per cell is the design).
    pub gateway: bool,
    /// `host:port` QUIC addresses of gateways in other cells (gateways only, or every node
    /// with `elected_gateways`).
    pub backbone_seeds: Vec<String>,
    /// Elect this many gateways per cell instead of setting `gateway` by hand: the live members
    /// with the smallest node ids, re-elected as members come and go (`node::cells::elect`).
    /// 0: gateways are set in config.
    pub elected_gateways: usize,
    /// Backbone gossip round, and how often a gateway republishes the cells table.
    pub backbone_interval_ms: u64,
    /// Home-cell choice: affinity depth and load slack.
    pub routing: kvmesh_policy::cells::CellSettings,
}

impl Default for CellsConfig {
    fn default() -> Self {
        Self {
            name: None,
            gateway: false,
            backbone_seeds: Vec::new(),
            elected_gateways: 0,
            backbone_interval_ms: 2_000,
            routing: Default::default(),
        }
    }
}

/// The tokenizer service (see `tokens`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TokenizeSettings {
    /// Threads that encode prompts. Default: half the cores (at least 1, at most 8).
    pub threads: usize,
    /// Prompts waiting for a thread before new ones are refused with 503.
    pub queue: usize,
    /// Bound on each model's segment cache, in MiB (0 turns it off).
    pub segment_cache_mb: u64,
}

impl Default for TokenizeSettings {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        Self { threads: (cores / 2).clamp(1, 8), queue: 1024, segment_cache_mb: 64 }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One engine: its base URL and, if it publishes them, where its KV-cache events are.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EngineEntry {
    pub url: String,
    #[serde(default)]
    pub name: Option<String>,
    /// ZeroMQ endpoint of the engine's KV events (`tcp://host:port`).
    #[serde(default)]
    pub kv_events: Option<String>,
    /// ZeroMQ endpoint of the engine's KV-event replay socket (vLLM's `kv_events_config`
    /// `replay_endpoint`): after a sequence gap the missed batches are asked for there, so the
    /// index is kept instead of dropped.
    #[serde(default)]
    pub kv_events_replay: Option<String>,
    /// `prefill`, `decode` or `both` (default): with prefill engines in the mesh, long uncached
    /// prompts are prefilled on one and decoded on a `decode`/`both` engine (NixlConnector).
    #[serde(default)]
    pub role: kvmesh_policy::pd::Role,
    /// Sent as `Authorization: Bearer` to engines started with `--api-key`.
    #[serde(default)]
    pub api_key: Option<String>,
    /// A file holding `api_key` (its first line), read at start: keeps the key out of the config
    /// and off the command line (`--engine URL,api-key-file=PATH`).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// The engine's `--data-parallel-size`: its ranks are routed to as engines of their own
    /// (`{name}-dp{rank}`), each with its rank's KV events (the endpoints' ports plus the rank,
    /// as vLLM offsets them), its rank's metrics (`engine="{rank}"`), and requests pinned to it
    /// with vLLM's `X-data-parallel-rank` header. Default 1.
    #[serde(default = "one_rank")]
    pub data_parallel_size: u32,
    /// The engine's `--scheduling-policy`: `fcfs` (vLLM's default), or `priority`, with which
    /// the node sets each request's `priority` from its flow-control band and its tenant's
    /// share (`policy::flow::engine_priority`), so the engine's own queue and its preemptions
    /// follow the same order as the node's. vLLM refuses a `priority` under `fcfs`.
    #[serde(default)]
    pub scheduling_policy: kvmesh_sim::engine::Scheduling,
}

fn one_rank() -> u32 {
    1
}

impl EngineEntry {
    /// The engine at `url` with every other setting at its default.
    pub fn new(url: String) -> Self {
        Self {
            url,
            name: None,
            kv_events: None,
            kv_events_replay: None,
            api_key: None,
            api_key_file: None,
            role: Default::default(),
            data_parallel_size: one_rank(),
            scheduling_policy: Default::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: default_node_name(),
            http_addr: "0.0.0.0:8080".into(),
            engines: Vec::new(),
            embedded_engine: true,
            embedded_role: Default::default(),
            pd: Default::default(),
            embedded: EngineConfig::default(),
            max_body_bytes: 32 * 1024 * 1024,
            http_header_timeout_ms: 30_000,
            http_body_timeout_ms: 60_000,
            http_write_timeout_ms: 60_000,
            http_max_connections: 10_000,
            engine_poll_interval_ms: 500,
            engine_connect_timeout_ms: 2_000,
            engine_first_byte_timeout_ms: 600_000,
            engine_idle_timeout_ms: 300_000,
            kv_events_replay_timeout_ms: 1_000,
            max_attempts: 3,
            log_format: LogFormat::Text,
            role: NodeRole::Worker,
            cluster_id: "kvmesh".into(),
            quic_addr: "0.0.0.0:7946".into(),
            advertise_addr: None,
            seeds: Vec::new(),
            tls_dir: None,
            ca: None,
            cert: None,
            key: None,
            gossip_interval_ms: 300,
            phi_threshold: 8.0,
            load_publish_interval_ms: 200,
            peer_suspect_ms: 3_000,
            models: Vec::new(),
            default_block_size: 16,
            summary_interval_ms: 2_000,
            summary_min_change: 0.0,
            summary_stride: kvmesh_policy::summary::DEFAULT_STRIDE,
            score: ScoreWeights::default(),
            tokenize: TokenizeSettings::default(),
            route_history_ttl_s: 120,
            route_history_max_keys: 32_768,
            routing: RoutingPolicy::Kvmesh,
            session_header: None,
            cells: CellsConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            usage_publish_interval_ms: 250,
            flow: kvmesh_policy::flow::FlowSettings::default(),
            guardrails: Vec::new(),
            guardrails_file: None,
            guardrails_reload_interval_ms: 2_000,
            guardrail_window_chars: 256,
            audit: AuditConfig::default(),
            observability: ObservabilityConfig::default(),
        }
    }
}

fn default_node_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_owned()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kvmesh".into())
}

/// `kvmesh serve` flags. Each overrides the config file; each can also come from the
/// environment variable named beside it.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "KVMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the OpenAI API (default 0.0.0.0:8080).
    #[arg(long, env = "KVMESH_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// An engine: `URL[,kv-events=tcp://HOST:PORT][,kv-events-replay=tcp://HOST:PORT][,name=NAME]
    /// [,api-key-file=PATH][,role=prefill|decode|both][,dp-size=N]`. Repeatable; replaces the
    /// file's list. (`api-key=KEY` works too, but puts the key where every user of the machine
    /// can read it.)
    #[arg(long = "engine", env = "KVMESH_ENGINES", value_delimiter = ';', hide_env_values = true)]
    pub engines: Vec<String>,
    /// This node's name.
    #[arg(long, env = "KVMESH_NODE_NAME")]
    pub node_name: Option<String>,
    /// Never start the embedded engine simulator.
    #[arg(long, env = "KVMESH_NO_EMBEDDED_ENGINE")]
    pub no_embedded_engine: bool,
    /// Log lines as text (default) or JSON objects (one per line, with the request's fields).
    #[arg(long, env = "KVMESH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// `worker` (runs engines) or `edge` (routes only).
    #[arg(long, env = "KVMESH_ROLE", value_parser = parse_role)]
    pub role: Option<NodeRole>,
    /// Seed nodes to join, `host:port,...` (DNS names allowed).
    #[arg(long, env = "KVMESH_SEEDS", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// UDP address of the QUIC endpoint (default 0.0.0.0:7946).
    #[arg(long, env = "KVMESH_QUIC_ADDR")]
    pub quic_addr: Option<String>,
    /// Address peers dial for this node, when it differs from --quic-addr.
    #[arg(long, env = "KVMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Keeps two meshes from merging.
    #[arg(long, env = "KVMESH_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Directory with ca.crt, NODE.crt, NODE.key (from `kvmesh cert`). Turns the mesh on.
    #[arg(long, env = "KVMESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The cluster CA's certificate (PEM), when not `TLS_DIR/ca.crt`.
    #[arg(long, env = "KVMESH_CA")]
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM), when not `TLS_DIR/NODE.crt`; it must name the node.
    #[arg(long, env = "KVMESH_CERT")]
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM), when not `TLS_DIR/NODE.key`. A path, never the key.
    #[arg(long, env = "KVMESH_KEY")]
    pub key: Option<PathBuf>,
    /// Routing policy: kvmesh (default), least-load or round-robin (baselines).
    #[arg(long, env = "KVMESH_ROUTING", value_enum)]
    pub routing: Option<RoutingPolicy>,
    /// A header naming a client's session (besides x-session-affinity).
    #[arg(long, env = "KVMESH_SESSION_HEADER")]
    pub session_header: Option<String>,
    /// This node's cell (`[cells] name`): turns cells on.
    #[arg(long, env = "KVMESH_CELL")]
    pub cell: Option<String>,
    /// This node is one of its cell's gateways (`[cells] gateway`).
    #[arg(long, env = "KVMESH_CELL_GATEWAY")]
    pub cell_gateway: bool,
    /// Gateways of other cells to join the backbone through (`[cells] backbone_seeds`).
    #[arg(long, env = "KVMESH_BACKBONE_SEEDS", value_delimiter = ',')]
    pub backbone_seeds: Vec<String>,
    /// A model's tokenizer, as MODEL=DIR (the directory holding tokenizer.json and
    /// tokenizer_config.json), for exact prefix matching; repeat for several models (in the
    /// variable, separate them with `;`). Models without one are looked up in the local Hugging
    /// Face cache (HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub), else routed
    /// approximately.
    #[arg(long = "tokenizer", env = "KVMESH_TOKENIZERS", value_delimiter = ';')]
    pub tokenizers: Vec<String>,
}

impl Config {
    /// Reads each engine's `api_key_file` into its `api_key`.
    pub fn read_secret_files(&mut self) -> Result<(), NodeError> {
        for (i, e) in self.engines.iter_mut().enumerate() {
            let Some(path) = &e.api_key_file else { continue };
            if e.api_key.is_some() {
                return Err(NodeError::Config(format!("engines[{i}]: set api_key or api_key_file, not both")));
            }
            let text = std::fs::read_to_string(path)
                .map_err(|err| NodeError::Config(format!("engines[{i}].api_key_file {}: {err}", path.display())))?;
            let key = text.lines().next().unwrap_or("").trim().to_owned();
            if key.is_empty() {
                return Err(NodeError::Config(format!("engines[{i}].api_key_file {} is empty", path.display())));
            }
            e.api_key = Some(key);
        }
        Ok(())
    }

    pub fn load(args: &ServeArgs) -> Result<Self, NodeError> {
        let mut cfg = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| NodeError::ConfigFile { path: path.display().to_string(), source })?;
                toml::from_str(&text)
                    .map_err(|e| NodeError::ConfigParse { path: path.display().to_string(), message: e.to_string() })?
            }
            None => Config::default(),
        };
        if let Some(a) = &args.http_addr {
            cfg.http_addr = a.clone();
        }
        if let Some(n) = &args.node_name {
            cfg.node_name = n.clone();
        }
        if !args.engines.is_empty() {
            cfg.engines = args.engines.iter().map(|s| parse_engine_flag(s)).collect::<Result<_, _>>()?;
            if std::env::args().any(|a| a.contains("api-key=")) {
                tracing::warn!("an engine API key on the command line (--engine ...,api-key=) is visible to every user of this machine; use api-key-file=PATH or KVMESH_ENGINES");
            }
        }
        cfg.read_secret_files()?;
        if args.no_embedded_engine {
            cfg.embedded_engine = false;
        }
        if let Some(f) = args.log_format {
            cfg.log_format = f;
        }
        if let Some(r) = args.role {
            cfg.role = r;
        }
        if !args.seeds.is_empty() {
            cfg.seeds = args.seeds.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        macro_rules! take {
            ($($f:ident),*) => { $(if let Some(v) = &args.$f { cfg.$f = v.clone().into(); })* };
        }
        take!(quic_addr, cluster_id);
        macro_rules! take_opt {
            ($($f:ident),*) => { $(if args.$f.is_some() { cfg.$f = args.$f.clone(); })* };
        }
        take_opt!(advertise_addr, tls_dir, ca, cert, key);
        if args.session_header.is_some() {
            cfg.session_header = args.session_header.clone();
        }
        if let Some(r) = args.routing {
            cfg.routing = r;
        }
        if let Some(c) = &args.cell {
            cfg.cells.name = Some(c.trim().to_owned());
        }
        cfg.cells.gateway |= args.cell_gateway;
        for spec in args.tokenizers.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
            let Some((model, dir)) = spec.split_once('=').filter(|(m, d)| !m.trim().is_empty() && !d.trim().is_empty())
            else {
                return Err(NodeError::Config(format!(
                    "--tokenizer `{spec}` must be MODEL=DIR, e.g. --tokenizer meta-llama/Llama-3.1-8B-Instruct=/models/llama/"
                )));
            };
            let (model, dir) = (model.trim().to_owned(), PathBuf::from(dir.trim()));
            match cfg.models.iter_mut().find(|m| m.name == model) {
                Some(m) => m.tokenizer = dir,
                None => cfg.models.push(ModelEntry {
                    name: model,
                    tokenizer: dir,
                    chat_template: None,
                    encoder: Default::default(),
                    max_model_len: None,
                }),
            }
        }
        if !args.backbone_seeds.is_empty() {
            cfg.cells.backbone_seeds =
                args.backbone_seeds.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        }
        // OpenTelemetry's own variables, where the config names no collector.
        if cfg.observability.otlp_endpoint.is_none() {
            let traces = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .ok()
                .map(|u| u.trim_end_matches('/').trim_end_matches("/v1/traces").to_owned());
            cfg.observability.otlp_endpoint =
                traces.or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()).filter(|u| !u.is_empty());
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        if let Some(h) = &self.session_header {
            if axum::http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return bad(format!("session_header `{h}` is not a valid HTTP header name"));
            }
        }
        if self.node_name.trim().is_empty() {
            return bad("node_name must not be empty (set --node-name)".into());
        }
        if self.http_addr.parse::<SocketAddr>().is_err() {
            return bad(format!("http_addr `{}` is not HOST:PORT with an IP host, e.g. 0.0.0.0:8080", self.http_addr));
        }
        for (i, e) in self.engines.iter().enumerate() {
            let url = reqwest::Url::parse(&e.url).map_err(|err| {
                NodeError::Config(format!(
                    "engines[{i}].url `{}` is not a URL ({err}); write e.g. http://127.0.0.1:8000",
                    e.url
                ))
            })?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return bad(format!("engines[{i}].url `{}` must start with http:// or https://", e.url));
            }
            if let Some(kv) = &e.kv_events {
                if !kv.starts_with("tcp://") {
                    return bad(format!(
                        "engines[{i}].kv_events `{kv}` must be a ZeroMQ endpoint like tcp://127.0.0.1:5557"
                    ));
                }
            }
            if !(1..=64).contains(&e.data_parallel_size) {
                return bad(format!("engines[{i}].data_parallel_size must be in 1..=64, got {}", e.data_parallel_size));
            }
            for (what, endpoint) in [("kv_events", &e.kv_events), ("kv_events_replay", &e.kv_events_replay)] {
                if let Some(ep) = endpoint {
                    if kvmesh_sim::kv_events::offset_endpoint_port(ep, e.data_parallel_size - 1).is_none() {
                        return bad(format!(
                            "engines[{i}].{what} `{ep}` has no port for data-parallel rank {} (the port plus the rank)",
                            e.data_parallel_size - 1
                        ));
                    }
                }
            }
            if let Some(r) = &e.kv_events_replay {
                if !r.starts_with("tcp://") {
                    return bad(format!(
                        "engines[{i}].kv_events_replay `{r}` must be a ZeroMQ endpoint like tcp://127.0.0.1:5558"
                    ));
                }
                if e.kv_events.is_none() {
                    return bad(format!("engines[{i}].kv_events_replay needs kv_events (the events it replays)"));
                }
            }
        }
        if self.role == NodeRole::Edge && !self.engines.is_empty() {
            return bad("an edge node runs no engines: remove [[engines]]/--engine or use --role worker".into());
        }
        if self.role == NodeRole::Edge && !self.mesh_enabled() {
            return bad("an edge node only routes to peers: give it certificates (--tls-dir) and --seeds".into());
        }
        if self.role == NodeRole::Worker && self.engines.is_empty() && !self.embedded_engine {
            return bad("no engine configured and the embedded simulator is off: add --engine URL".into());
        }
        if !self.seeds.is_empty() && !self.mesh_enabled() {
            return bad("--seeds needs this node's certificates: --tls-dir DIR (see `kvmesh cert --help`)".into());
        }
        match (&self.ca, &self.cert, &self.key) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => return bad("give all three of --ca, --cert and --key, or --tls-dir".into()),
        }
        if self.mesh_enabled() {
            if self.quic_addr.parse::<SocketAddr>().is_err() {
                return bad(format!("quic_addr `{}` is not IP:PORT, e.g. 0.0.0.0:7946", self.quic_addr));
            }
            if let Some(a) = &self.advertise_addr {
                if a.parse::<SocketAddr>().is_err() {
                    return bad(format!("advertise_addr `{a}` is not IP:PORT"));
                }
            }
            let unspecified = self.quic_addr.parse::<SocketAddr>().is_ok_and(|a| a.ip().is_unspecified());
            if unspecified && self.advertise_addr.is_none() && self.seeds.is_empty() {
                return bad(format!(
                    "quic_addr {} listens on every interface and there are no seeds to find the right one: \
                     set --advertise-addr IP:PORT (the address peers dial), or --seeds (it may list this node)",
                    self.quic_addr
                ));
            }
            if self.cluster_id.trim().is_empty() {
                return bad("cluster_id must not be empty".into());
            }
            // It travels in the TLS handshake's ALPN (`kvmesh/1/{id}`), at most 255 bytes.
            if self.cluster_id.len() > 200 || !self.cluster_id.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(format!(
                    "cluster_id `{}` must be at most 200 visible ASCII characters (no spaces)",
                    self.cluster_id
                ));
            }
            for s in &self.seeds {
                if !s.contains(':') {
                    return bad(format!("seed `{s}` needs a port, e.g. {s}:7946"));
                }
            }
            if !(self.phi_threshold.is_finite() && self.phi_threshold > 0.0) {
                return bad(format!("phi_threshold must be > 0, got {}", self.phi_threshold));
            }
        }
        if self.http_header_timeout_ms == 0
            || self.http_body_timeout_ms == 0
            || self.http_write_timeout_ms == 0
            || self.http_max_connections == 0
        {
            return bad("http_header_timeout_ms, http_body_timeout_ms, http_write_timeout_ms and http_max_connections must be above 0".into());
        }
        if self.max_body_bytes < 1024 {
            return bad(format!("max_body_bytes must be at least 1024, got {}", self.max_body_bytes));
        }
        if self.tokenize.threads == 0 || self.tokenize.threads > 256 {
            return bad(format!("tokenize.threads is {}; give 1 to 256", self.tokenize.threads));
        }
        let pd = &self.pd;
        let positive = pd.max_ttft_ratio.is_finite() && pd.max_ttft_ratio > 0.0;
        if !positive || pd.transfer_ms_per_token < 0.0 || pd.transfer_overhead_ms < 0.0 {
            return bad(format!(
                "[pd] max_ttft_ratio must be > 0 and the transfer costs >= 0 (got {}, {}, {})",
                pd.max_ttft_ratio, pd.transfer_ms_per_token, pd.transfer_overhead_ms
            ));
        }
        if self.route_history_max_keys == 0 {
            return bad("route_history_max_keys must be at least 1 (0 would forget every route at once)".into());
        }
        if self.tokenize.queue == 0 {
            return bad("tokenize.queue must be at least 1".into());
        }
        for m in &self.models {
            if m.max_model_len == Some(0) {
                return bad(format!("[[models]] {}: max_model_len must be at least 1", m.name));
            }
        }
        if self.default_block_size == 0 {
            return bad("default_block_size must be at least 1".into());
        }
        if !(self.score.tolerance >= 0.0 && self.score.prefill_ms_per_token >= 0.0) {
            return bad("[score] tolerance and prefill_ms_per_token must be >= 0".into());
        }
        if !(1..=kvmesh_policy::summary::MAX_STRIDE).contains(&self.summary_stride) {
            return bad(format!(
                "summary_stride must be between 1 and {} (8 is a good default)",
                kvmesh_policy::summary::MAX_STRIDE
            ));
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1".into());
        }
        self.validate_cells()?;
        for (name, v) in [
            ("engine_poll_interval_ms", self.engine_poll_interval_ms),
            ("engine_connect_timeout_ms", self.engine_connect_timeout_ms),
            ("engine_first_byte_timeout_ms", self.engine_first_byte_timeout_ms),
            ("engine_idle_timeout_ms", self.engine_idle_timeout_ms),
            ("kv_events_replay_timeout_ms", self.kv_events_replay_timeout_ms),
            ("gossip_interval_ms", self.gossip_interval_ms),
            ("load_publish_interval_ms", self.load_publish_interval_ms),
            ("summary_interval_ms", self.summary_interval_ms),
        ] {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        self.validate_guard()?;
        if self.engines.is_empty() && self.role == NodeRole::Worker {
            self.embedded.validate().map_err(|e| NodeError::Config(format!("[embedded] {e}")))?;
        }
        Ok(())
    }

    fn validate_cells(&self) -> Result<(), NodeError> {
        let c = &self.cells;
        let bad = |m: String| Err(NodeError::Config(format!("[cells] {m}")));
        let Some(name) = &c.name else {
            return if c.gateway { bad("gateway = true needs a cell name (set [cells] name)".into()) } else { Ok(()) };
        };
        if name.is_empty()
            || name.len() > 64
            || !name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return bad(format!("name `{name}`: use 1-64 letters, digits, '-', '_' or '.'"));
        }
        if c.backbone_interval_ms < 100 {
            return bad("backbone_interval_ms must be at least 100".into());
        }
        if c.elected_gateways > 0 {
            if c.gateway {
                return bad(
                    "gateway = true and elected_gateways both set: choose gateways by hand or elect them".into()
                );
            }
            if c.elected_gateways > 8 {
                return bad(format!("elected_gateways = {}: 2 per cell is the design, 8 at most", c.elected_gateways));
            }
            if c.backbone_seeds.is_empty() {
                return bad("elected_gateways needs backbone_seeds on every node: a few nodes of other cells (their \
                            smallest names, which those cells elect), so that whichever node is elected can join"
                    .into());
            }
        } else if !c.gateway && !c.backbone_seeds.is_empty() {
            return bad(
                "backbone_seeds are for gateways: set gateway = true (or elected_gateways) or remove them".into()
            );
        }
        c.routing.validate().map_err(NodeError::Config)
    }

    /// `[auth]`, `[limits]`, `[[guardrails]]` and `[audit]`.
    fn validate_guard(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        KeyStore::new(&self.auth.keys).map_err(|e| NodeError::Config(format!("[auth] {e}")))?;
        if self.auth.keys_file.is_some() && self.auth.reload_interval_ms == 0 {
            return bad("[auth] reload_interval_ms must be greater than 0".into());
        }
        let specs = std::iter::once(("default", &self.limits.default))
            .chain(self.limits.tenants.iter().map(|(t, s)| (t.as_str(), s)));
        for (who, s) in specs {
            let LimitSpec { requests_per_minute, tokens_per_minute, max_tokens, max_prompt_tokens } = s;
            if *requests_per_minute == Some(0)
                || *tokens_per_minute == Some(0)
                || *max_tokens == Some(0)
                || *max_prompt_tokens == Some(0)
            {
                return bad(format!("[limits] {who}: a limit of 0 refuses everything; leave it out for no limit"));
            }
        }
        if self.usage_publish_interval_ms == 0 {
            return bad("usage_publish_interval_ms must be greater than 0".into());
        }
        self.flow.check().map_err(|e| NodeError::Config(format!("[flow] {e}")))?;
        let mut names = std::collections::HashSet::new();
        for g in &self.guardrails {
            g.build().map_err(|e| NodeError::Config(e.to_string()))?;
            if !names.insert(g.name()) {
                return bad(format!(
                    "[[guardrails]] name `{}` is used twice; names label metrics and audit records",
                    g.name()
                ));
            }
        }
        if let Some(ep) = &self.observability.otlp_endpoint {
            if !ep.starts_with("http://") {
                return bad(format!(
                    "observability.otlp_endpoint `{ep}` must be an http:// URL like http://127.0.0.1:4318 \
                     (this build's HTTP client has no TLS)"
                ));
            }
        }
        if self.guardrails_file.is_some() && self.guardrails_reload_interval_ms == 0 {
            return bad("guardrails_reload_interval_ms must be greater than 0".into());
        }
        if self.guardrail_window_chars == 0 {
            return bad("guardrail_window_chars must be at least 1 (256 is the default)".into());
        }
        self.audit.validate().map_err(NodeError::Config)?;
        Ok(())
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// The mesh runs when this node has certificates; without them it serves alone.
    pub fn mesh_enabled(&self) -> bool {
        self.tls_dir.is_some() || self.cert.is_some()
    }

    /// (ca, cert, key) paths, when the mesh is enabled.
    pub fn tls_paths(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        match (&self.ca, &self.cert, &self.key, &self.tls_dir) {
            (Some(ca), Some(cert), Some(key), _) => Some((ca.clone(), cert.clone(), key.clone())),
            (_, _, _, Some(dir)) => Some(kvmesh_transport::TlsIdentity::paths_in(dir, &self.node_name)),
            _ => None,
        }
    }

    /// Starts the embedded simulator: a worker with no engines (an edge node never does).
    pub fn wants_embedded_engine(&self) -> bool {
        self.role == NodeRole::Worker && self.engines.is_empty() && self.embedded_engine
    }
}

fn parse_role(s: &str) -> Result<NodeRole, String> {
    match s {
        "worker" => Ok(NodeRole::Worker),
        "edge" => Ok(NodeRole::Edge),
        _ => Err(format!("`{s}` is not a role: use `worker` or `edge`")),
    }
}

/// `--engine SPEC` as shown in messages: the value of `api-key=` replaced by `***`.
fn redact_api_key(s: &str) -> String {
    s.split(',').map(|p| if p.starts_with("api-key=") { "api-key=***" } else { p }).collect::<Vec<_>>().join(",")
}

/// `URL` or `URL,kv-events=ENDPOINT,name=NAME,api-key=KEY`.
pub fn parse_engine_flag(s: &str) -> Result<EngineEntry, NodeError> {
    // Errors quote the flag with any key blanked out: they end up in logs.
    let shown = redact_api_key(s);
    let mut parts = s.split(',');
    let url = parts.next().unwrap_or_default().trim().to_owned();
    let mut e = EngineEntry::new(url);
    for p in parts {
        match p.split_once('=') {
            Some(("kv-events", v)) => e.kv_events = Some(v.to_owned()),
            Some(("kv-events-replay", v)) => e.kv_events_replay = Some(v.to_owned()),
            Some(("name", v)) => e.name = Some(v.to_owned()),
            Some(("api-key", v)) => e.api_key = Some(v.to_owned()),
            Some(("api-key-file", v)) => e.api_key_file = Some(PathBuf::from(v)),
            Some(("dp-size", v)) => {
                e.data_parallel_size = v.parse().map_err(|_| {
                    NodeError::Config(format!("--engine `{shown}`: dp-size `{v}` is not a number of ranks"))
                })?
            }
            Some(("scheduling-policy", v)) => {
                e.scheduling_policy = match v {
                    "fcfs" => kvmesh_sim::engine::Scheduling::Fcfs,
                    "priority" => kvmesh_sim::engine::Scheduling::Priority,
                    other => {
                        return Err(NodeError::Config(format!(
                            "--engine `{shown}`: scheduling-policy `{other}` is not fcfs or priority"
                        )))
                    }
                }
            }
            Some(("role", v)) => {
                e.role = match v {
                    "prefill" => kvmesh_policy::pd::Role::Prefill,
                    "decode" => kvmesh_policy::pd::Role::Decode,
                    "both" => kvmesh_policy::pd::Role::Both,
                    other => {
                        return Err(NodeError::Config(format!(
                            "--engine `{shown}`: role `{other}` is not prefill, decode or both"
                        )))
                    }
                }
            }
            _ => {
                return Err(NodeError::Config(format!(
                    "--engine `{shown}`: unknown part `{p}`; expected URL[,kv-events=tcp://HOST:PORT][,kv-events-replay=tcp://HOST:PORT][,name=NAME][,api-key-file=PATH][,role=prefill|decode|both][,dp-size=N][,scheduling-policy=fcfs|priority]"
                )))
            }
        }
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_keys_come_from_files_and_never_show_in_messages() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("engine.key");
        std::fs::write(&key, "sk-engine\n").unwrap();
        let mut cfg = Config {
            engines: vec![parse_engine_flag(&format!("http://h:1,api-key-file={}", key.display())).unwrap()],
            ..Config::default()
        };
        cfg.read_secret_files().unwrap();
        assert_eq!(cfg.engines[0].api_key.as_deref(), Some("sk-engine"));
        let err = parse_engine_flag("http://h:1,api-key=sk-secret,role=nope").unwrap_err().to_string();
        assert!(!err.contains("sk-secret") && err.contains("api-key=***"), "{err}");
    }

    #[test]
    fn file_then_flags() {
        let dir = std::env::temp_dir().join(format!("kvmesh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(
            &path,
            "node_name = \"a\"\nhttp_addr = \"127.0.0.1:9\"\n[[engines]]\nurl = \"http://127.0.0.1:8000\"\nkv_events = \"tcp://127.0.0.1:5557\"\n",
        )
        .unwrap();
        let args =
            ServeArgs { config: Some(path.clone()), http_addr: Some("127.0.0.1:10".into()), ..Default::default() };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.node_name, "a");
        assert_eq!(cfg.http_addr, "127.0.0.1:10");
        assert_eq!(cfg.engines[0].kv_events.as_deref(), Some("tcp://127.0.0.1:5557"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn errors_say_what_to_fix() {
        let c = Config { http_addr: "localhost".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("HOST:PORT"));
        let c = Config { engines: vec![parse_engine_flag("127.0.0.1:8000").unwrap()], ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("http://"));
        assert!(parse_engine_flag("http://x,bogus").unwrap_err().to_string().contains("kv-events"));
        let e = toml::from_str::<Config>("unknown_key = 1").unwrap_err().to_string();
        assert!(e.contains("unknown_key"), "{e}");
    }

    #[test]
    fn cells_settings_say_what_to_fix() {
        let ok: Config =
            toml::from_str("[cells]\nname = \"rack-a\"\ngateway = true\nbackbone_seeds = [\"10.0.1.1:7946\"]\n")
                .unwrap();
        ok.validate().expect("valid cells");
        let err = |t: &str| toml::from_str::<Config>(t).unwrap().validate().unwrap_err().to_string();
        assert!(err("[cells]\ngateway = true\n").contains("needs a cell name"));
        assert!(err("[cells]\nname = \"a b\"\n").contains("letters, digits"));
        assert!(err("[cells]\nname = \"a\"\nbackbone_seeds = [\"x:1\"]\n").contains("for gateways"));
        assert!(err("[cells]\nname = \"a\"\n[cells.routing]\nload_slack = 0\n").contains("load_slack"));
        assert!(err("[cells]\nname = \"a\"\nelected_gateways = 2\n").contains("needs backbone_seeds"));
        assert!(err("[cells]\nname = \"a\"\ngateway = true\nelected_gateways = 2\nbackbone_seeds = [\"x:1\"]\n")
            .contains("choose gateways"));
        let elected: Config =
            toml::from_str("[cells]\nname = \"a\"\nelected_gateways = 2\nbackbone_seeds = [\"10.0.1.1:7946\"]\n")
                .expect("toml");
        elected.validate().expect("elected gateways with seeds");
        let args = ServeArgs { tokenizers: vec!["org/m=/models/m".into(), " ".into()], ..Default::default() };
        let cfg = Config::load(&args).unwrap();
        assert_eq!(cfg.models.len(), 1);
        assert_eq!((cfg.models[0].name.as_str(), cfg.models[0].tokenizer.to_str()), ("org/m", Some("/models/m")));
        let bad = ServeArgs { tokenizers: vec!["no-equals-sign".into()], ..Default::default() };
        assert!(Config::load(&bad).unwrap_err().to_string().contains("MODEL=DIR"));
        let args = ServeArgs { cell: Some("z".into()), cell_gateway: true, ..Default::default() };
        let cfg = Config::load(&args).unwrap();
        assert_eq!((cfg.cells.name.as_deref(), cfg.cells.gateway), (Some("z"), true));
    }

    #[test]
    fn an_empty_section_means_its_defaults() {
        // A section written with none of its keys must read as if it were absent (an `[auth]`
        // with only `keys_file` once got a reload interval of 0 and failed validation).
        let absent = toml::from_str::<Config>("").unwrap();
        for section in
            ["embedded", "pd", "score", "tokenize", "cells", "auth", "limits", "flow", "audit", "observability"]
        {
            let empty = toml::from_str::<Config>(&format!("[{section}]\n")).unwrap();
            assert_eq!(format!("{empty:?}"), format!("{absent:?}"), "[{section}] with no keys");
        }
        let c: Config = toml::from_str("[auth]\nkeys_file = \"/etc/kvmesh/keys.toml\"\n").unwrap();
        assert_eq!(c.auth.reload_interval_ms, 2_000);
        c.validate().unwrap();
    }

    #[test]
    fn guard_sections_say_what_to_fix() {
        let c: Config = toml::from_str("[[auth.keys]]\ntenant = \"a\"\nkey_sha256 = \"abc\"\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("kvmesh keys hash"));
        let c: Config = toml::from_str("[limits.tenants.a]\nrequests_per_minute = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("leave it out"));
        let c: Config = toml::from_str("[[guardrails]]\nkind = \"deny\"\nname = \"d\"\npatterns = [\"(\"]\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("not a valid regex"));
        let twice = "[[guardrails]]\nkind = \"pii\"\nname = \"p\"\n[[guardrails]]\nkind = \"pii\"\nname = \"p\"\n";
        assert!(toml::from_str::<Config>(twice).unwrap().validate().unwrap_err().to_string().contains("used twice"));
        let e = toml::from_str::<Config>("[[guardrails]]\nkind = \"pii\"\nname = \"p\"\nbogus = 1\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c: Config = toml::from_str("[audit]\npath = \"/tmp/a\"\nqueue = 0\n").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("[audit] queue"));
    }

    #[test]
    fn engine_flag_parts() {
        let e = parse_engine_flag("http://h:1,kv-events=tcp://h:2,name=gpu0").unwrap();
        assert_eq!(e.kv_events_replay, None);
        let r = parse_engine_flag("http://h:1,kv-events=tcp://h:2,kv-events-replay=tcp://h:3").unwrap();
        assert_eq!(r.kv_events_replay.as_deref(), Some("tcp://h:3"));
        assert_eq!(e.url, "http://h:1");
        assert_eq!(e.kv_events.as_deref(), Some("tcp://h:2"));
        assert_eq!(e.name.as_deref(), Some("gpu0"));
    }
}
