//! `kvmesh bench routing`: KV-cache-aware routing against baselines on the same simulated
//! hardware, in one process on loopback.
//!
//! Each policy gets the same 8 engine simulators in real time (the default 8B/H100 model):
//! - `round-robin`, `least-load` and `kvmesh`: 8 nodes in a mesh, one embedded engine each;
//!   clients send each request to a node picked at random, as behind a plain DNS or L4
//!   balancer.
//! - `oracle`: one central router that has all 8 engines as its own, with their exact KV
//!   indexes and load and no gossip delay. That is the information llm-d's precise-prefix
//!   scheduler has.
//!
//! Arrivals are Poisson at each rate. Workloads (`shared/workloads/`, copies in
//! `examples/workloads/`):
//! - `shared-prefix`: groups sharing a long prefix, each request a new question;
//! - `multi-turn-chat`: conversations start as a Poisson process at rate / turns; each turn
//!   resends the whole history (shared system prompt, earlier turns and the engine's actual
//!   replies) after a think time, to a node picked at random each turn;
//! - `agentic`: agent runs start at rate / steps; each round sends the agent's `tools` and the
//!   run so far (assistant `tool_calls` carrying the engine's actual replies, `tool` results),
//!   rendered on the nodes and the engines alike by a real model's chat template
//!   (`--chat-template`, Qwen3-Coder's by default) over the built-in vocabulary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use kvmesh_node::config::{Config, EngineEntry, ModelEntry, RoutingPolicy};
use kvmesh_node::NodeError;
use kvmesh_node::{Node, RunningNode};
use kvmesh_policy::tokenize::ModelTokenizer;
use kvmesh_sim::workload::{Agentic, LongPrompt, MultiTurn, SharedPrefix, Slo, Workload};
use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};

#[derive(Debug, Clone, clap::Args)]
pub struct RoutingArgs {
    /// Workload file (shared-prefix shape).
    #[arg(long, default_value = "examples/workloads/shared-prefix.toml")]
    pub workload: PathBuf,
    /// Request rates to test, requests per second.
    #[arg(long, value_delimiter = ',', default_value = "10,20,30")]
    pub rates: Vec<f64>,
    /// Seconds of arrivals per (policy, rate); the first quarter is warm-up and not counted.
    #[arg(long, default_value_t = 40.0)]
    pub duration_s: f64,
    #[arg(long, value_delimiter = ',', default_value = "round-robin,least-load,kvmesh,oracle")]
    pub policies: Vec<String>,
    #[arg(long, default_value_t = 8)]
    pub engines: usize,
    /// Markdown file whose `routing` section is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// CSV of the results (for `scripts/plot-routing.py`).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Send to these already running nodes (`http://HOST:PORT,...`) instead of starting nodes in
    /// this process; `--policies` then only labels the run (`scripts/bench-processes.sh`).
    #[arg(long, value_delimiter = ',')]
    pub entry_urls: Vec<String>,
    /// BENCHMARKS.md section to write (default: by workload).
    #[arg(long)]
    pub section: Option<String>,
    /// Chat template the nodes and engines render prompts with (a model's Jinja file), over
    /// the built-in vocabulary. Default: the built-in template, except for the agentic workload,
    /// which uses Qwen3-Coder's tool-calling template from the parity fixtures.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Seed of the arrivals and of which group, conversation or agent each request belongs to.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// KV cache blocks of each engine this command starts (default: the engine simulator's,
    /// 28,000); fewer makes caches contended. Ignored with `--entry-urls`.
    #[arg(long)]
    pub num_gpu_blocks: Option<u32>,
}

/// Qwen3-Coder's tool-calling chat template (the tools' schemas in the system turn, calls as
/// `<tool_call>` blocks with each argument, results as `<tool_response>`), from the parity
/// fixtures (`policy/tests/fixtures/templates/SOURCES.md` gives its source and license).
const AGENTIC_TEMPLATE: &str = "policy/tests/fixtures/templates/qwen3-coder.jinja";

/// A tokenizer directory: the built-in vocabulary with `template` as its chat template.
fn tokenizer_with_template(template: &std::path::Path) -> Result<tempfile::TempDir, NodeError> {
    let jinja = std::fs::read_to_string(template)
        .map_err(|e| err(format!("chat template {}: {e} (run from the repository root)", template.display())))?;
    let mut config: serde_json::Value =
        serde_json::from_slice(kvmesh_policy::tokenize::BUILTIN_TOKENIZER_CONFIG).map_err(err)?;
    config["chat_template"] = serde_json::Value::String(jinja);
    let dir = tempfile::tempdir().map_err(err)?;
    std::fs::write(dir.path().join("tokenizer.json"), kvmesh_policy::tokenize::BUILTIN_TOKENIZER_JSON).map_err(err)?;
    std::fs::write(dir.path().join("tokenizer_config.json"), serde_json::to_vec(&config).map_err(err)?).map_err(err)?;
    Ok(dir)
}

/// The node's model entry for a tokenizer directory, under the embedded engine's model name.
fn model_entry(dir: &std::path::Path) -> ModelEntry {
    ModelEntry {
        name: EngineConfig::default().model,
        tokenizer: dir.to_path_buf(),
        chat_template: None,
        encoder: Default::default(),
        max_model_len: None,
    }
}

fn err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Bench(e.to_string())
}

/// Text of about `tokens` tokens for the built-in tokenizer, seeded.
pub(super) fn text(seed: u64, tokens: usize, tokens_per_word: f64) -> String {
    const SYL: &[&str] =
        &["ka", "lo", "mi", "ren", "to", "sa", "vel", "nor", "di", "pan", "ux", "el", "tri", "go", "fen"];
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let words = (tokens as f64 / tokens_per_word) as usize;
    (0..words)
        .map(|_| (0..rng.random_range(1..4)).map(|_| SYL[rng.random_range(0..SYL.len())]).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) struct Sample {
    /// The reply's text, for the next turn of a conversation.
    reply: String,
    pub(super) ttft_ms: f64,
    itls_ms: Vec<f64>,
    e2e_ms: f64,
    prompt_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
}

/// When a request was sent, and how it went.
type Outcome = (Instant, Result<Sample, String>);

struct Row {
    policy: String,
    rate: f64,
    done: usize,
    failed: usize,
    ttft: [f64; 3],
    itl: [f64; 2],
    e2e: [f64; 2],
    out_tok_s: f64,
    hit_rate: f64,
    goodput: f64,
}

async fn one(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Result<Sample, String> {
    streamed(client.post(format!("{url}/v1/chat/completions")).json(body)).await
}

/// Sends a streamed request and reads its answer: time to first token, inter-token gaps, usage.
/// An error names the HTTP status first (`status 503 Service Unavailable: ...`).
pub(super) async fn streamed(req: reqwest::RequestBuilder) -> Result<Sample, String> {
    let t0 = Instant::now();
    let r = req.send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        let status = r.status();
        let body: String = r.text().await.unwrap_or_default().chars().take(300).collect();
        return Err(format!("status {status}: {body}"));
    }
    let mut s = r.bytes_stream();
    let mut buf = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    let mut itls = Vec::new();
    let mut usage = (0, 0, 0);
    let mut reply = String::new();
    while let Some(chunk) = s.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..pos + 2).collect();
            let line = String::from_utf8_lossy(&ev);
            let Some(data) = line.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if v.get("error").is_some() {
                return Err(data.to_owned());
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                usage = (
                    u["prompt_tokens"].as_u64().unwrap_or(0),
                    u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
                    u["completion_tokens"].as_u64().unwrap_or(0),
                );
            }
            let content = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            reply.push_str(content);
            if !content.is_empty() {
                let now = Instant::now();
                match last {
                    None => first = Some(now),
                    Some(prev) => itls.push(now.duration_since(prev).as_secs_f64() * 1000.0),
                }
                last = Some(now);
            }
        }
    }
    let first = first.ok_or("no tokens")?;
    Ok(Sample {
        reply,
        ttft_ms: first.duration_since(t0).as_secs_f64() * 1000.0,
        itls_ms: itls,
        e2e_ms: t0.elapsed().as_secs_f64() * 1000.0,
        prompt_tokens: usage.0,
        cached_tokens: usage.1,
        output_tokens: usage.2,
    })
}

/// Engines and the URLs clients send to, for one policy.
struct Setup {
    nodes: Vec<RunningNode>,
    engines: Vec<RunningEngine>,
    entry_urls: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Setup {
    async fn stop(self) {
        futures::future::join_all(self.nodes.into_iter().map(|n| n.shutdown())).await;
        futures::future::join_all(self.engines.into_iter().map(|e| e.shutdown())).await;
    }
}

/// `tokenizer`: a tokenizer directory every node and engine uses instead of the built-in one.
async fn setup(
    policy: &str,
    n: usize,
    tokenizer: Option<&std::path::Path>,
    num_gpu_blocks: Option<u32>,
    cancel: &CancellationToken,
) -> Result<Setup, NodeError> {
    let defaults = EngineConfig::default();
    let engine_cfg = EngineConfig {
        tokenizer: tokenizer.map(|t| t.to_path_buf()),
        num_gpu_blocks: num_gpu_blocks.unwrap_or(defaults.num_gpu_blocks),
        ..defaults
    };
    let models: Vec<ModelEntry> = tokenizer.map(model_entry).into_iter().collect();
    if policy == "oracle" {
        let mut engines = Vec::new();
        for _ in 0..n {
            engines.push(EngineSim::start(engine_cfg.clone(), "127.0.0.1:0", Some("tcp://127.0.0.1:0"), cancel).await?);
        }
        let cfg = Config {
            node_name: "oracle".into(),
            http_addr: "127.0.0.1:0".into(),
            engine_poll_interval_ms: 100,
            engines: engine_entries(&engines),
            models: models.clone(),
            ..Config::default()
        };
        let node = Node::start(cfg, cancel).await?;
        let url = node.url();
        return Ok(Setup { nodes: vec![node], engines, entry_urls: vec![url], _dir: None });
    }
    let routing = match policy {
        "round-robin" => RoutingPolicy::RoundRobin,
        "least-load" => RoutingPolicy::LeastLoad,
        "kvmesh" | "pd" => RoutingPolicy::Kvmesh,
        "kvmesh-random" => RoutingPolicy::KvmeshRandom,
        other => return Err(err(format!("unknown policy `{other}`"))),
    };
    // `pd`: the first half of the nodes prefill, the rest decode; the same hardware otherwise.
    let role = |i: usize| match policy {
        "pd" if i < n / 2 => kvmesh_policy::pd::Role::Prefill,
        "pd" => kvmesh_policy::pd::Role::Decode,
        _ => kvmesh_policy::pd::Role::Both,
    };
    let dir = tempfile::tempdir().map_err(err)?;
    kvmesh_transport::certs::create_ca(dir.path(), "bench").map_err(err)?;
    let mut nodes: Vec<RunningNode> = Vec::new();
    let mut seed: Option<String> = None;
    for i in 0..n {
        let name = format!("n{i}");
        kvmesh_transport::certs::create_node(dir.path(), dir.path(), &name).map_err(err)?;
        let cfg = Config {
            node_name: name,
            http_addr: "127.0.0.1:0".into(),
            quic_addr: "127.0.0.1:0".into(),
            seeds: seed.clone().into_iter().collect(),
            tls_dir: Some(dir.path().to_path_buf()),
            cluster_id: "bench".into(),
            routing,
            embedded_role: role(i),
            embedded: engine_cfg.clone(),
            models: models.clone(),
            ..Config::default()
        };
        let node = Node::start(cfg, cancel).await?;
        seed.get_or_insert_with(|| node.mesh.as_ref().map(|m| m.advertise.to_string()).unwrap_or_default());
        nodes.push(node);
    }
    wait_for_mesh(&nodes).await?;
    let entry_urls = nodes.iter().map(|x| x.url()).collect();
    Ok(Setup { nodes, engines: Vec::new(), entry_urls, _dir: Some(dir) })
}

/// Waits (at most 30 s) until every node sees every other and its engine.
pub(super) async fn wait_for_mesh(nodes: &[RunningNode]) -> Result<(), NodeError> {
    let n = nodes.len();
    let t = Instant::now();
    while !nodes
        .iter()
        .all(|x| x.mesh.as_ref().is_some_and(|m| m.peers().len() == n && m.view().engines.len() == n - 1))
    {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(err("mesh did not form in 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A central router's engines: the simulators as `e0`, `e1`, ... with their KV events.
pub(super) fn engine_entries(engines: &[RunningEngine]) -> Vec<EngineEntry> {
    engines
        .iter()
        .enumerate()
        .map(|(i, e)| EngineEntry {
            name: Some(format!("e{i}")),
            kv_events: e.kv_events_endpoint.clone(),
            ..EngineEntry::new(e.url())
        })
        .collect()
}

pub(super) fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        f64::NAN
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

async fn run_one(
    policy: &str,
    rate: f64,
    a: &RoutingArgs,
    w: &Workload,
    tpw: f64,
    tokenizer: Option<&std::path::Path>,
) -> Result<Row, NodeError> {
    let cancel = CancellationToken::new();
    let s = if a.entry_urls.is_empty() {
        setup(policy, a.engines, tokenizer, a.num_gpu_blocks, &cancel).await?
    } else {
        Setup { nodes: Vec::new(), engines: Vec::new(), entry_urls: a.entry_urls.clone(), _dir: None }
    };
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build().map_err(err)?;
    let samples: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let warmup = Duration::from_secs_f64(a.duration_s / 4.0);
    match w {
        Workload::SharedPrefix(w) => shared_prefix(&s, &client, &samples, rate, a, w, tpw).await,
        Workload::MultiTurn(w) => multi_turn(&s, &client, &samples, rate, a, w, tpw).await,
        Workload::LongPrompt(w) => long_prompt(&s, &client, &samples, rate, a, w, tpw).await,
        Workload::Agentic(w) => agentic(&s, &client, &samples, rate, a, w, tpw).await,
    }
    // Conversations run past the arrival window; throughput is over the time actually taken.
    let measured_s = start.elapsed().as_secs_f64() - warmup.as_secs_f64();
    s.stop().await;
    let w = w.slo();
    let all = std::mem::take(&mut *samples.lock().await);
    summarize(policy, rate, all, start, warmup, measured_s, w)
}

async fn shared_prefix(
    s: &Setup,
    client: &reqwest::Client,
    samples: &Arc<Mutex<Vec<Outcome>>>,
    rate: f64,
    a: &RoutingArgs,
    w: &SharedPrefix,
    tpw: f64,
) {
    let prefixes: Vec<String> = (0..w.groups).map(|g| text(1000 + g as u64, w.prefix_tokens, tpw)).collect();
    // A burst's requests share their group (`burst`, drawn by its first request).
    let mut group = 0;
    open_loop(s, client, samples, rate, a, w.burst, |rng, i| {
        if i % w.burst as u64 == 0 {
            group = w.draw_group(rng, w.groups as u64) as usize;
        }
        json!({
            "model": "kvmesh-sim", "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": w.output_tokens, "ignore_eos": true,
            "messages": [{"role": "system", "content": prefixes[group]},
                         {"role": "user", "content": text(1_000_000 + i, w.question_tokens, tpw)}],
        })
    })
    .await
}

/// Poisson arrivals at `rate` requests/s for `duration_s`, `burst` requests at each (made by
/// `body` from the request's number), each sent to a random entry node; waits for all of them.
async fn open_loop(
    s: &Setup,
    client: &reqwest::Client,
    samples: &Arc<Mutex<Vec<Outcome>>>,
    rate: f64,
    a: &RoutingArgs,
    burst: usize,
    mut body: impl FnMut(&mut rand::rngs::SmallRng, u64) -> serde_json::Value,
) {
    let burst = burst.max(1);
    let duration_s = a.duration_s;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let start = Instant::now();
    let mut next = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while start.elapsed().as_secs_f64() < duration_s {
        // Exponential gaps between arrivals.
        let gap = -(1.0 - rng.random::<f64>()).ln() * burst as f64 / rate;
        next += Duration::from_secs_f64(gap);
        tokio::time::sleep_until(next.into()).await;
        for _ in 0..burst {
            let body = body(&mut rng, i);
            let url = s.entry_urls[rng.random_range(0..s.entry_urls.len())].clone();
            i += 1;
            let (client, samples) = (client.clone(), samples.clone());
            let sent = Instant::now();
            tasks.push(tokio::spawn(async move {
                let r = one(&client, &url, &body).await;
                samples.lock().await.push((sent, r));
            }));
        }
    }
    futures::future::join_all(tasks).await;
}

async fn multi_turn(
    s: &Setup,
    client: &reqwest::Client,
    samples: &Arc<Mutex<Vec<Outcome>>>,
    rate: f64,
    a: &RoutingArgs,
    w: &MultiTurn,
    tpw: f64,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let system = Arc::new(text(999, w.system_prompt_tokens, tpw));
    let start = Instant::now();
    let mut next = Instant::now();
    let mut tasks = Vec::new();
    let conv_rate = rate / w.turns.max(1) as f64;
    for c in 0..w.conversations as u64 {
        let gap = -(1.0 - rng.random::<f64>()).ln() / conv_rate;
        next += Duration::from_secs_f64(gap);
        if next.duration_since(start).as_secs_f64() >= a.duration_s {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let (client, samples, system, w) = (client.clone(), samples.clone(), system.clone(), w.clone());
        let urls = s.entry_urls.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(10_000 + c);
            let mut history = vec![json!({"role": "system", "content": *system})];
            for turn in 0..w.turns as u64 {
                let user = text(1_000_000 + c * 100 + turn, w.user_tokens.sample(&mut rng, 1.0) as usize, tpw);
                history.push(json!({"role": "user", "content": user}));
                let body = json!({
                    "model": "kvmesh-sim", "stream": true, "stream_options": {"include_usage": true},
                    "max_tokens": w.output_tokens.sample(&mut rng, 1.0) as u32, "ignore_eos": true,
                    "messages": history,
                });
                let url = &urls[rng.random_range(0..urls.len())];
                let sent = Instant::now();
                let r = one(&client, url, &body).await;
                let reply = r.as_ref().map(|x| x.reply.clone()).map_err(|_| ());
                samples.lock().await.push((sent, r));
                let Ok(reply) = reply else { break };
                history.push(json!({"role": "assistant", "content": reply}));
                tokio::time::sleep(Duration::from_secs_f64(w.think_time_s.sample(&mut rng, 0.0))).await;
            }
        }));
    }
    futures::future::join_all(tasks).await;
}

/// One tool set: `tools_per_set` functions with descriptions of about
/// `tool_description_tokens` tokens and a small JSON schema each.
fn toolset(set: usize, w: &Agentic, tpw: f64) -> serde_json::Value {
    let tools: Vec<serde_json::Value> = (0..w.tools_per_set)
        .map(|t| {
            let seed = 5_000_000 + (set * 100 + t) as u64;
            json!({"type": "function", "function": {
                "name": format!("tool_{set}_{t}"),
                "description": text(seed, w.tool_description_tokens, tpw),
                "parameters": {"type": "object",
                               "properties": {"query": {"type": "string", "description": "What to look for."},
                                              "path": {"type": "string", "description": "Where to look."}},
                               "required": ["query"]},
            }})
        })
        .collect();
    serde_json::Value::Array(tools)
}

async fn agentic(
    s: &Setup,
    client: &reqwest::Client,
    samples: &Arc<Mutex<Vec<Outcome>>>,
    rate: f64,
    a: &RoutingArgs,
    w: &Agentic,
    tpw: f64,
) {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let system = Arc::new(text(997, w.system_prompt_tokens, tpw));
    let toolsets: Arc<Vec<serde_json::Value>> = Arc::new((0..w.toolsets.max(1)).map(|k| toolset(k, w, tpw)).collect());
    let start = Instant::now();
    let mut next = Instant::now();
    let mut tasks = Vec::new();
    let run_rate = rate / w.steps.max(1) as f64;
    for agent in 0..w.agents as u64 {
        let gap = -(1.0 - rng.random::<f64>()).ln() / run_rate;
        next += Duration::from_secs_f64(gap);
        if next.duration_since(start).as_secs_f64() >= a.duration_s {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        let (client, samples, system, toolsets, w) =
            (client.clone(), samples.clone(), system.clone(), toolsets.clone(), w.clone());
        let urls = s.entry_urls.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(20_000 + agent);
            let set = agent as usize % toolsets.len();
            let task = text(3_000_000 + agent, w.task_tokens.sample(&mut rng, 1.0) as usize, tpw);
            let mut history = vec![json!({"role": "system", "content": *system}), json!({"role": "user", "content": task})];
            for step in 0..w.steps as u64 {
                let body = json!({
                    "model": "kvmesh-sim", "stream": true, "stream_options": {"include_usage": true},
                    "max_tokens": w.output_tokens.sample(&mut rng, 1.0) as u32, "ignore_eos": true,
                    "tools": toolsets[set], "messages": history,
                });
                let url = &urls[rng.random_range(0..urls.len())];
                let sent = Instant::now();
                let r = one(&client, url, &body).await;
                let reply = r.as_ref().map(|x| x.reply.clone()).map_err(|_| ());
                samples.lock().await.push((sent, r));
                let Ok(reply) = reply else { break };
                // The engine's reply stands in for the call's arguments; the tool answers.
                let id = format!("call_{agent}_{step}");
                let tool = rng.random_range(0..w.tools_per_set.max(1));
                history.push(json!({"role": "assistant", "content": "", "tool_calls": [{
                    "id": id, "type": "function",
                    "function": {"name": format!("tool_{set}_{tool}"), "arguments": json!({"query": reply}).to_string()},
                }]}));
                let result = text(4_000_000 + agent * 100 + step, w.tool_result_tokens.sample(&mut rng, 1.0) as usize, tpw);
                history.push(json!({"role": "tool", "tool_call_id": id, "name": format!("tool_{set}_{tool}"), "content": result}));
                tokio::time::sleep(Duration::from_secs_f64(w.tool_time_s.sample(&mut rng, 0.0))).await;
            }
        }));
    }
    futures::future::join_all(tasks).await;
}

async fn long_prompt(
    s: &Setup,
    client: &reqwest::Client,
    samples: &Arc<Mutex<Vec<Outcome>>>,
    rate: f64,
    a: &RoutingArgs,
    w: &LongPrompt,
    tpw: f64,
) {
    let shared = text(998, w.shared_prefix_tokens, tpw);
    open_loop(s, client, samples, rate, a, 1, |rng, i| {
        let tokens = w.prompt_tokens.sample(rng, 1.0) as usize;
        json!({
            "model": "kvmesh-sim", "stream": true, "stream_options": {"include_usage": true},
            "max_tokens": w.output_tokens, "ignore_eos": true,
            "messages": [{"role": "system", "content": shared},
                         {"role": "user", "content": text(2_000_000 + i, tokens.saturating_sub(w.shared_prefix_tokens), tpw)}],
        })
    })
    .await
}

fn summarize(
    policy: &str,
    rate: f64,
    all: Vec<Outcome>,
    start: Instant,
    warmup: Duration,
    measured_s: f64,
    w: &Slo,
) -> Result<Row, NodeError> {
    let (mut ttft, mut itl, mut e2e) = (hist(), hist(), hist());
    let (mut done, mut failed, mut good, mut out_tok, mut prompt, mut cached) = (0, 0, 0, 0u64, 0u64, 0u64);
    for (_, r) in all.into_iter().filter(|(sent, _)| sent.duration_since(start) >= warmup) {
        match r {
            Ok(x) => {
                done += 1;
                let _ = ttft.record((x.ttft_ms * 1000.0) as u64);
                let _ = e2e.record((x.e2e_ms * 1000.0) as u64);
                for v in &x.itls_ms {
                    let _ = itl.record((v * 1000.0).max(1.0) as u64);
                }
                let own_itl_p99 = {
                    let mut v = x.itls_ms.clone();
                    v.sort_by(f64::total_cmp);
                    v.get(((v.len() as f64) * 0.99) as usize).or(v.last()).copied().unwrap_or(0.0)
                };
                let itl_ok = w.itl_p99_ms.is_none_or(|slo| own_itl_p99 <= slo);
                good += (x.ttft_ms <= w.ttft_p90_s * 1000.0 && itl_ok) as usize;
                out_tok += x.output_tokens;
                prompt += x.prompt_tokens;
                cached += x.cached_tokens;
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, "request failed");
            }
        }
    }
    Ok(Row {
        policy: policy.to_owned(),
        rate,
        done,
        failed,
        ttft: [pct(&ttft, 0.5), pct(&ttft, 0.9), pct(&ttft, 0.99)],
        itl: [pct(&itl, 0.5), pct(&itl, 0.99)],
        e2e: [pct(&e2e, 0.5), pct(&e2e, 0.99)],
        out_tok_s: out_tok as f64 / measured_s,
        hit_rate: if prompt > 0 { cached as f64 / prompt as f64 } else { 0.0 },
        goodput: good as f64 / measured_s,
    })
}

pub(super) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("valid sigfig"))
}

pub async fn run(a: RoutingArgs) -> Result<(), NodeError> {
    let w = Workload::load(&a.workload).map_err(err)?;
    // Calibrate words per token for the built-in tokenizer on this generator's text.
    let tok = ModelTokenizer::builtin().map_err(err)?;
    let sample = text(1, 2000, 1.0);
    let tpw = tok.encode(&sample, false).map_err(err)?.len() as f64 / sample.split(' ').count() as f64;
    let template = match (&a.chat_template, &w) {
        (Some(t), _) => Some(t.clone()),
        (None, Workload::Agentic(_)) => Some(PathBuf::from(AGENTIC_TEMPLATE)),
        (None, _) => None,
    };
    let tokenizer = template.as_deref().map(tokenizer_with_template).transpose()?;
    let mut rows = Vec::new();
    for rate in &a.rates {
        for p in &a.policies {
            let r = run_one(p, *rate, &a, &w, tpw, tokenizer.as_ref().map(|d| d.path())).await?;
            println!(
                "{:>12} @ {:>5.1} req/s: TTFT p50/p90/p99 {:.0}/{:.0}/{:.0} ms, hit {:.0}%, goodput {:.1} req/s, {} done, {} failed",
                r.policy, r.rate, r.ttft[0], r.ttft[1], r.ttft[2], r.hit_rate * 100.0, r.goodput, r.done, r.failed
            );
            rows.push(r);
        }
    }
    let setup_note = if a.entry_urls.is_empty() {
        format!(
            "{} engine simulators in real time with the default 8B/H100 model, all nodes and the load generator in one \
             process",
            a.engines
        )
    } else {
        format!(
            "{} separate `kvmesh serve` processes (`--entry-urls`), each with its embedded engine simulator in real time, \
             and the load generator in another",
            a.entry_urls.len()
        )
    };
    let setup_note = match &template {
        Some(t) => format!(
            "{setup_note}; prompts rendered by nodes and engines alike with the chat template `{}` over the built-in \
             vocabulary",
            t.display()
        ),
        None => setup_note,
    };
    let itl_slo = w.slo().itl_p99_ms.map(|ms| format!(" and their own inter-token p99 ≤ {ms} ms")).unwrap_or_default();
    let mut md = format!(
        "Command: `kvmesh bench routing --workload {} --policies {} --rates {} --duration-s {} --engines {}` (release \
         build; {setup_note}, on this machine's {} cores). Workload {}; each request to a random node (the oracle: its \
         one router). Requests sent in the first quarter of the arrival window are warm-up and not counted. Goodput: \
         requests/s with TTFT ≤ {} s{itl_slo}.\n\n",
        a.workload.display(),
        a.policies.join(","),
        a.rates.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
        a.duration_s,
        a.engines,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        w.describe(),
        w.slo().ttft_p90_s,
    );
    md.push_str("| rate (req/s) | policy | TTFT p50 | TTFT p90 | TTFT p99 | ITL p50 | ITL p99 | e2e p50 | output tok/s | cache hit | goodput (req/s) | failed |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let mut csv = String::from("rate,policy,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,itl_p50_ms,itl_p99_ms,e2e_p50_ms,out_tok_s,hit_rate,goodput,done,failed,seed\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} ms | {:.1} ms | {:.0} ms | {:.0} | {:.0}% | {:.1} | {} |\n",
            r.rate, r.policy, r.ttft[0], r.ttft[1], r.ttft[2], r.itl[0], r.itl[1], r.e2e[0], r.out_tok_s, r.hit_rate * 100.0, r.goodput, r.failed
        ));
        csv.push_str(&format!(
            "{},{},{:.1},{:.1},{:.1},{:.2},{:.2},{:.1},{:.1},{:.4},{:.2},{},{},{}\n",
            r.rate,
            r.policy,
            r.ttft[0],
            r.ttft[1],
            r.ttft[2],
            r.itl[0],
            r.itl[1],
            r.e2e[0],
            r.out_tok_s,
            r.hit_rate,
            r.goodput,
            r.done,
            r.failed,
            a.seed
        ));
    }
    println!("{md}");
    if let Some(p) = &a.csv {
        std::fs::write(p, csv).map_err(err)?;
    }
    if let Some(p) = &a.out {
        // One section per workload, so runs of each keep the other's results.
        let (section, title) = match w {
            Workload::SharedPrefix(_) => {
                ("routing", "KV-aware routing vs round-robin, least-load and a central oracle (shared prefix)")
            }
            Workload::MultiTurn(_) => ("routing-multi-turn", "KV-aware routing on multi-turn chat"),
            Workload::LongPrompt(_) => ("pd", "Prefill/decode disaggregation on long prompts"),
            Workload::Agentic(_) => ("routing-agentic", "KV-aware routing on tool-using agents"),
        };
        // A named section is one part of a heading written by hand (`scripts/bench-processes.sh`).
        let (section, title) = match a.section.as_deref() {
            Some(named) => (named, ""),
            None => (section, title),
        };
        crate::cli::bench::write_section(p, section, title, &md)?;
    }
    Ok(())
}
