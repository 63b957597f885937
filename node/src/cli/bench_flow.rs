//! `kvmesh bench flow`: overload with and without flow control, on the same simulated
//! hardware, in one process on loopback (`--entry-urls` sends to nodes already running, as
//! `scripts/bench-flow.sh` starts them as separate processes).
//!
//! Setups, each over `--engines` engine simulators whose KV cache holds a few dozen requests
//! (so that, as on a real GPU, an engine past its capacity queues requests it cannot start):
//! - `mesh-flow`: a mesh of as many nodes as engines, one embedded engine each, flow control on;
//! - `mesh-no-flow`: the same mesh with flow control off (every request goes to an engine at
//!   once, as before flow control existed);
//! - `central-flow`: one router with every engine as its own, flow control on: the same policy
//!   applied centrally, with no gossip delay.
//!
//! First the mesh's capacity is measured (a closed loop that keeps every engine full, with
//! flow control holding the excess). Then, per scenario:
//! - `load`: Poisson arrivals at each `--loads` multiple of that capacity;
//! - `fairness`: a quiet tenant at 0.2x capacity alone, then with a noisy tenant at ten times
//!   its rate;
//! - `priority`: 1.5x capacity, 30% of requests `critical` and the rest `sheddable`.
//!
//! Goodput: requests per second (of the measured window's arrivals) that completed with TTFT
//! within `--slo-ms`. Requests sent in the first quarter of the window are warm-up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use kvmesh_node::config::Config;
use kvmesh_node::NodeError;
use kvmesh_node::{Node, RunningNode};
use kvmesh_policy::auth::{hash_key, KeyEntry};
use kvmesh_policy::flow::{BandSlo, FlowSettings, Priority};
use kvmesh_policy::tokenize::ModelTokenizer;
use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};

use super::bench_routing::{engine_entries, hist, pct, streamed, text, wait_for_mesh};

#[derive(Debug, Clone, clap::Args)]
pub struct FlowArgs {
    /// Engines (and mesh nodes).
    #[arg(long, default_value_t = 8)]
    pub engines: usize,
    /// Offered load, as multiples of the measured capacity.
    #[arg(long, value_delimiter = ',', default_value = "0.8,1.2,1.5,2")]
    pub loads: Vec<f64>,
    /// Setups: mesh-flow, mesh-no-flow, central-flow.
    #[arg(long, value_delimiter = ',', default_value = "mesh-no-flow,mesh-flow,central-flow")]
    pub setups: Vec<String>,
    /// Scenarios: load, fairness, priority.
    #[arg(long, value_delimiter = ',', default_value = "load,fairness,priority")]
    pub scenarios: Vec<String>,
    /// Seconds of arrivals per point; the first quarter is warm-up.
    #[arg(long, default_value_t = 40.0)]
    pub duration_s: f64,
    /// The time-to-first-token objective, in ms: goodput counts requests within it.
    #[arg(long, default_value_t = 2000)]
    pub slo_ms: u64,
    /// Prompt tokens per request (each prompt new: no cache hits to blur the queueing).
    #[arg(long, default_value_t = 384)]
    pub prompt_tokens: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 48)]
    pub output_tokens: u32,
    /// KV blocks (16 tokens) per engine: how many requests it runs at once.
    #[arg(long, default_value_t = 800)]
    pub kv_blocks: u32,
    /// Simulated time runs this many times slower than the default H100 model (fewer events
    /// per second for the same load, so one machine's cores can play a whole mesh).
    #[arg(long, default_value_t = 4.0)]
    pub time_scale: f64,
    /// Flow control's `max_waiting_per_engine` on the nodes this benchmark starts.
    #[arg(long, default_value_t = FlowSettings::default().max_waiting_per_engine)]
    pub max_waiting: u32,
    /// Clients send to the first this many nodes only (default: every node).
    #[arg(long)]
    pub entry_nodes: Option<usize>,
    /// Capacity in requests/s, instead of measuring it.
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Send to these running nodes (`http://HOST:PORT,...`); `--setups` then only labels the
    /// run, and the nodes' own `[flow]` and keys apply (`scripts/bench-flow.sh`).
    #[arg(long, value_delimiter = ',')]
    pub entry_urls: Vec<String>,
    /// Markdown file whose `flow` section is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// BENCHMARKS.md section to write (default `flow`).
    #[arg(long)]
    pub section: Option<String>,
    /// Seed of the arrival times (each scenario adds its own offset): runs with different
    /// seeds are independent samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The engines' `--scheduling-policy` (`priority`: the nodes set each request's engine
    /// priority from its band and its tenant's backlog).
    #[arg(long, value_enum, default_value_t = kvmesh_sim::engine::Scheduling::Fcfs)]
    pub scheduling_policy: kvmesh_sim::engine::Scheduling,
    /// Appends one line per load point to this CSV file (header written when it is new):
    /// `setup,seed,load,offered,goodput,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,completed,refused_503,refused_429,failed,slowest_refusal_ms`.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Bench(e.to_string())
}

/// The two tenants' keys every setup knows.
const QUIET: &str = "sk-bench-quiet";
const NOISY: &str = "sk-bench-noisy";

fn keys() -> Vec<KeyEntry> {
    [("quiet", QUIET), ("noisy", NOISY)]
        .into_iter()
        .map(|(t, k)| KeyEntry {
            tenant: t.into(),
            key_sha256: hash_key(k),
            max_priority: Some(Priority::Critical),
            ..Default::default()
        })
        .collect()
}

/// Flow control as the benchmark runs it: a held request is answered 503 once three quarters
/// of the objective have passed, leaving a quarter for the engine's own queue and prefill.
pub fn flow_settings(enabled: bool, slo_ms: u64, max_waiting: u32) -> FlowSettings {
    let hold = slo_ms * 3 / 4;
    FlowSettings {
        enabled,
        max_waiting_per_engine: max_waiting,
        max_wait_ms: hold,
        slo_ms: BandSlo { critical: Some(hold), standard: Some(hold), sheddable: Some(hold) },
        ..FlowSettings::default()
    }
}

struct Setup {
    nodes: Vec<RunningNode>,
    engines: Vec<RunningEngine>,
    urls: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Setup {
    async fn stop(self) {
        futures::future::join_all(self.nodes.into_iter().map(|n| n.shutdown())).await;
        futures::future::join_all(self.engines.into_iter().map(|e| e.shutdown())).await;
    }
}

fn engine_config(a: &FlowArgs) -> EngineConfig {
    EngineConfig {
        num_gpu_blocks: a.kv_blocks,
        time_scale: a.time_scale,
        scheduling_policy: a.scheduling_policy,
        ..EngineConfig::default()
    }
}

async fn setup(name: &str, a: &FlowArgs, cancel: &CancellationToken) -> Result<Setup, NodeError> {
    if !a.entry_urls.is_empty() {
        return Ok(Setup { nodes: Vec::new(), engines: Vec::new(), urls: a.entry_urls.clone(), _dir: None });
    }
    let flow = match name {
        "mesh-flow" | "central-flow" => flow_settings(true, a.slo_ms, a.max_waiting),
        "mesh-no-flow" => flow_settings(false, a.slo_ms, a.max_waiting),
        other => return Err(err(format!("unknown setup `{other}` (mesh-flow, mesh-no-flow, central-flow)"))),
    };
    let mut base = Config { http_addr: "127.0.0.1:0".into(), engine_poll_interval_ms: 50, flow, ..Config::default() };
    base.auth.keys = keys();
    if name == "central-flow" {
        let mut engines = Vec::new();
        for _ in 0..a.engines {
            engines.push(EngineSim::start(engine_config(a), "127.0.0.1:0", Some("tcp://127.0.0.1:0"), cancel).await?);
        }
        let mut entries = engine_entries(&engines);
        for e in &mut entries {
            e.scheduling_policy = a.scheduling_policy;
        }
        let cfg = Config { node_name: "central".into(), engines: entries, ..base };
        let node = Node::start(cfg, cancel).await?;
        let url = node.url();
        return Ok(Setup { nodes: vec![node], engines, urls: vec![url], _dir: None });
    }
    let dir = tempfile::tempdir().map_err(err)?;
    kvmesh_transport::certs::create_ca(dir.path(), "bench").map_err(err)?;
    let mut nodes: Vec<RunningNode> = Vec::new();
    let mut seed: Option<String> = None;
    for i in 0..a.engines {
        let name = format!("n{i}");
        kvmesh_transport::certs::create_node(dir.path(), dir.path(), &name).map_err(err)?;
        let cfg = Config {
            node_name: name,
            quic_addr: "127.0.0.1:0".into(),
            seeds: seed.clone().into_iter().collect(),
            tls_dir: Some(dir.path().to_path_buf()),
            cluster_id: "bench".into(),
            embedded: engine_config(a),
            ..base.clone()
        };
        let node = Node::start(cfg, cancel).await?;
        seed.get_or_insert_with(|| node.mesh.as_ref().map(|m| m.advertise.to_string()).unwrap_or_default());
        nodes.push(node);
    }
    wait_for_mesh(&nodes).await?;
    let urls = nodes.iter().map(|x| x.url()).collect();
    Ok(Setup { nodes, engines: Vec::new(), urls, _dir: Some(dir) })
}

/// How one request ended.
enum End {
    Done {
        ttft_ms: f64,
    },
    /// Refused with this status after this long.
    Refused {
        status: u16,
        after_ms: f64,
    },
    Failed,
}

/// One request's class: tenant key and band.
#[derive(Clone, Copy)]
struct Class {
    key: &'static str,
    band: Priority,
}

struct Outcome {
    sent: Instant,
    class: usize,
    end: End,
}

/// A stream of Poisson arrivals of one class.
#[derive(Clone)]
struct Stream {
    rate: f64,
    class: Class,
}

struct Ctx<'a> {
    client: reqwest::Client,
    urls: &'a [String],
    a: &'a FlowArgs,
    tpw: f64,
}

async fn request(client: &reqwest::Client, url: &str, body: &serde_json::Value, class: Class) -> End {
    let t0 = Instant::now();
    let req = client
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(class.key)
        .header("x-kvmesh-priority", class.band.as_str())
        .timeout(Duration::from_secs(300))
        .json(body);
    match streamed(req).await {
        Ok(s) => End::Done { ttft_ms: s.ttft_ms },
        Err(e) => match e.strip_prefix("status ").and_then(|r| r.get(..3)).and_then(|c| c.parse::<u16>().ok()) {
            Some(status) => End::Refused { status, after_ms: t0.elapsed().as_secs_f64() * 1000.0 },
            None => {
                tracing::warn!(error = %e, "request failed");
                End::Failed
            }
        },
    }
}

fn body(c: &Ctx<'_>, i: u64) -> serde_json::Value {
    json!({
        "model": "kvmesh-sim", "stream": true, "stream_options": {"include_usage": true},
        "max_tokens": c.a.output_tokens, "ignore_eos": true,
        "messages": [{"role": "user", "content": text(7_000_000 + i, c.a.prompt_tokens, c.tpw)}],
    })
}

/// Poisson arrivals of every stream for `duration_s`, each to a random entry node; waits for
/// all of them.
async fn open_loop(c: &Ctx<'_>, streams: &[Stream], duration_s: f64, seed: u64) -> Vec<Outcome> {
    let out: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let total: f64 = streams.iter().map(|s| s.rate).sum();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut next = Instant::now();
    let mut tasks = Vec::new();
    let mut i = seed * 10_000_000;
    while start.elapsed().as_secs_f64() < duration_s {
        next += Duration::from_secs_f64(-(1.0 - rng.random::<f64>()).ln() / total);
        tokio::time::sleep_until(next.into()).await;
        // The arrival's stream, in proportion to the rates.
        let mut pick = rng.random::<f64>() * total;
        let class = streams.iter().position(|s| {
            pick -= s.rate;
            pick < 0.0
        });
        let class = class.unwrap_or(streams.len() - 1);
        let (client, url, out) = (c.client.clone(), c.urls[rng.random_range(0..c.urls.len())].clone(), out.clone());
        let (b, cl) = (body(c, i), streams[class].class);
        i += 1;
        let sent = Instant::now();
        tasks.push(tokio::spawn(async move {
            let end = request(&client, &url, &b, cl).await;
            out.lock().await.push(Outcome { sent, class, end });
        }));
    }
    futures::future::join_all(tasks).await;
    let all = std::mem::take(&mut *out.lock().await);
    all
}

/// Completed requests per second with every engine kept full: a closed loop of enough
/// clients to hold several requests per engine beyond what it runs.
async fn capacity(c: &Ctx<'_>) -> f64 {
    let clients = c.a.engines * 64;
    let warm = Duration::from_secs_f64(c.a.duration_s / 4.0);
    let window = Duration::from_secs_f64(c.a.duration_s / 2.0);
    let start = Instant::now();
    let done: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let mut tasks = Vec::new();
    for k in 0..clients as u64 {
        let (client, urls, done) = (c.client.clone(), c.urls.to_vec(), done.clone());
        let bodies: Vec<serde_json::Value> = (0..4).map(|j| body(c, 900_000_000 + k * 4 + j)).collect();
        tasks.push(tokio::spawn(async move {
            let mut j = 0usize;
            while start.elapsed() < warm + window {
                let url = &urls[(k as usize + j) % urls.len()];
                let class = Class { key: QUIET, band: Priority::Standard };
                let end = request(&client, url, &bodies[j % bodies.len()], class).await;
                let now = start.elapsed();
                if matches!(end, End::Done { .. }) && now > warm && now <= warm + window {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if !matches!(end, End::Done { .. }) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                j += 1;
            }
        }));
    }
    futures::future::join_all(tasks).await;
    done.load(std::sync::atomic::Ordering::Relaxed) as f64 / window.as_secs_f64()
}

#[derive(Default)]
struct Figures {
    offered: f64,
    goodput: f64,
    done: usize,
    refused_503: usize,
    refused_429: usize,
    failed: usize,
    ttft: [f64; 3],
    /// The longest a refused request waited for its answer.
    slowest_refusal_ms: f64,
    /// Mean absolute TTFT prediction error of the engines, learned and fixed (ms).
    prediction_error_ms: Option<(f64, f64)>,
}

fn figures(
    all: &[Outcome],
    class: Option<usize>,
    start: Instant,
    warm: Duration,
    window_s: f64,
    slo_ms: u64,
) -> Figures {
    let mut f = Figures::default();
    let mut h: Histogram<u64> = hist();
    let mut n = 0usize;
    for o in all.iter().filter(|o| o.sent.duration_since(start) >= warm && class.is_none_or(|c| o.class == c)) {
        n += 1;
        match o.end {
            End::Done { ttft_ms } => {
                f.done += 1;
                let _ = h.record((ttft_ms * 1000.0) as u64);
                f.goodput += (ttft_ms <= slo_ms as f64) as u8 as f64;
            }
            End::Refused { status, after_ms } => {
                match status {
                    429 => f.refused_429 += 1,
                    _ => f.refused_503 += 1,
                }
                f.slowest_refusal_ms = f.slowest_refusal_ms.max(after_ms);
            }
            End::Failed => f.failed += 1,
        }
    }
    f.offered = n as f64 / window_s;
    f.goodput /= window_s;
    f.ttft = [pct(&h, 0.5), pct(&h, 0.9), pct(&h, 0.99)];
    f
}

/// Runs `streams` on a fresh `setup`; figures per class (and all together, last).
async fn point(name: &str, streams: &[Stream], c_args: (&FlowArgs, f64), seed: u64) -> Result<Vec<Figures>, NodeError> {
    let (a, tpw) = c_args;
    let cancel = CancellationToken::new();
    let s = setup(name, a, &cancel).await?;
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(4096).build().map_err(err)?;
    let entry = a.entry_nodes.unwrap_or(s.urls.len()).clamp(1, s.urls.len().max(1));
    let c = Ctx { client, urls: &s.urls[..entry.min(s.urls.len())], a, tpw };
    let start = Instant::now();
    let all = open_loop(&c, streams, a.duration_s, seed).await;
    let errors = prediction_errors(&c.client, &s.urls).await;
    s.stop().await;
    let warm = Duration::from_secs_f64(a.duration_s / 4.0);
    let window_s = a.duration_s - warm.as_secs_f64();
    let mut out: Vec<Figures> =
        (0..streams.len()).map(|k| figures(&all, Some(k), start, warm, window_s, a.slo_ms)).collect();
    let mut total = figures(&all, None, start, warm, window_s, a.slo_ms);
    total.prediction_error_ms = errors;
    out.push(total);
    Ok(out)
}

/// Mean absolute TTFT prediction error (ms) over the nodes' engines, learned and fixed, from
/// their `kvmesh_ttft_prediction_error_seconds` sums and counts.
async fn prediction_errors(client: &reqwest::Client, urls: &[String]) -> Option<(f64, f64)> {
    let (mut sum, mut count) = ([0.0f64; 2], [0.0f64; 2]);
    for url in urls {
        let text = client.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("kvmesh_ttft_prediction_error_seconds_") else { continue };
            let m = if rest.contains("model=\"learned\"") { 0 } else { 1 };
            let v: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            if rest.starts_with("sum") {
                sum[m] += v;
            } else if rest.starts_with("count") {
                count[m] += v;
            }
        }
    }
    (count[0] > 0.0 && count[1] > 0.0).then(|| (sum[0] / count[0] * 1000.0, sum[1] / count[1] * 1000.0))
}

/// One load point as a CSV line (the header first when the file is new).
fn append_csv(path: &std::path::Path, setup: &str, seed: u64, load: f64, f: &Figures) -> Result<(), NodeError> {
    use std::io::Write as _;
    let new = !path.exists();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
    if new {
        writeln!(
            file,
            "setup,seed,load,offered,goodput,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,completed,refused_503,refused_429,failed,slowest_refusal_ms"
        )
        .map_err(err)?;
    }
    writeln!(
        file,
        "{setup},{seed},{load},{:.2},{:.2},{:.0},{:.0},{:.0},{},{},{},{},{:.0}",
        f.offered,
        f.goodput,
        f.ttft[0],
        f.ttft[1],
        f.ttft[2],
        f.done,
        f.refused_503,
        f.refused_429,
        f.failed,
        f.slowest_refusal_ms
    )
    .map_err(err)
}

fn row(label: &str, f: &Figures) -> String {
    format!(
        "| {label} | {:.1} | {:.1} | {:.0} / {:.0} / {:.0} ms | {} | {} | {} | {} | {:.0} ms |\n",
        f.offered,
        f.goodput,
        f.ttft[0],
        f.ttft[1],
        f.ttft[2],
        f.done,
        f.refused_503,
        f.refused_429,
        f.failed,
        f.slowest_refusal_ms
    )
}

/// A table's header, its first column named `first`.
fn header(first: &str) -> String {
    format!(
        "| {first} | setup | offered (req/s) | goodput (req/s) | TTFT p50 / p90 / p99 (completed) | completed | 503 | 429 | failed | slowest refusal |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
}

pub async fn run(a: FlowArgs) -> Result<(), NodeError> {
    let tok = ModelTokenizer::builtin().map_err(err)?;
    let sample = text(1, 2000, 1.0);
    let tpw = tok.encode(&sample, false).map_err(err)?.len() as f64 / sample.split(' ').count() as f64;
    let cap = match a.capacity {
        Some(c) => c,
        None => {
            let cancel = CancellationToken::new();
            let s = setup("mesh-flow", &a, &cancel).await?;
            let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(4096).build().map_err(err)?;
            let c = Ctx { client, urls: &s.urls, a: &a, tpw };
            let cap = capacity(&c).await;
            s.stop().await;
            cap
        }
    };
    println!("capacity: {cap:.1} req/s");
    let mut md = format!(
        "Command: `kvmesh bench flow --engines {} --loads {} --setups {} --scenarios {} --duration-s {} --slo-ms {} \
         --prompt-tokens {} --output-tokens {} --kv-blocks {} --time-scale {} --max-waiting {} --seed {} --scheduling-policy {}` (release build, {} cores; {}). Measured \
         capacity (closed loop, every engine full): **{cap:.1} req/s**. Goodput: requests/s completed with TTFT ≤ \
         {} ms; flow control holds a request at most {} ms (three quarters of the objective). Refused: 503 (no \
         capacity in time) and 429 (tenant over its share), with the longest any refused client waited.\n\n",
        a.engines,
        a.loads.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        a.setups.join(","),
        a.scenarios.join(","),
        a.duration_s,
        a.slo_ms,
        a.prompt_tokens,
        a.output_tokens,
        a.kv_blocks,
        a.time_scale,
        a.max_waiting,
        a.seed,
        match a.scheduling_policy {
            kvmesh_sim::engine::Scheduling::Fcfs => "fcfs",
            kvmesh_sim::engine::Scheduling::Priority => "priority",
        },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if a.entry_urls.is_empty() {
            "nodes, engines and the load generator in one process".to_owned()
        } else {
            format!("{} separate `kvmesh serve` processes", a.entry_urls.len())
        },
        a.slo_ms,
        a.slo_ms * 3 / 4,
    );
    let standard = Class { key: QUIET, band: Priority::Standard };
    if a.scenarios.iter().any(|s| s == "load") {
        md.push_str("**Load** (one tenant, standard band)\n\n");
        md.push_str(&header("load"));
        let mut errors = Vec::new();
        for &load in &a.loads {
            let mut goodputs = Vec::new();
            for name in &a.setups {
                let seed = 1 + 10 * a.seed;
                let f = point(name, &[Stream { rate: load * cap, class: standard }], (&a, tpw), seed).await?;
                let all = f.last().ok_or_else(|| err("no figures"))?;
                if let Some(path) = &a.csv {
                    append_csv(path, name, a.seed, load, all)?;
                }
                println!(
                    "load {load}x {name}: goodput {:.1} req/s, TTFT p90 {:.0} ms, {} done, {} 503, {} failed",
                    all.goodput, all.ttft[1], all.done, all.refused_503, all.failed
                );
                md.push_str(&format!("| {load}x {}", row(name, all)));
                goodputs.push((name.clone(), all.goodput));
                if let Some((learned, fixed)) = all.prediction_error_ms {
                    println!("load {load}x {name}: TTFT prediction error learned {learned:.0} ms, fixed {fixed:.0} ms");
                    errors.push(format!("| {load}x | {name} | {learned:.0} ms | {fixed:.0} ms |\n"));
                }
            }
            let of = |n: &str| goodputs.iter().find(|(x, _)| x == n).map(|(_, g)| *g);
            if let (Some(on), Some(off)) = (of("mesh-flow"), of("mesh-no-flow")) {
                let ratio = if off > 0.0 { format!("{:.2}x", on / off) } else { "∞".into() };
                println!("load {load}x: goodput with flow control / without: {ratio}");
                md.push_str(&format!("| {load}x | flow / no flow | goodput {ratio} | | | | | | | |\n"));
            }
        }
        md.push_str(
            "\nTTFT prediction error of the engines (mean absolute, over every streamed answer the nodes relayed from \
             their own engines): each engine's model fitted online (`policy::predict`, scored on each answer before \
             learning from it) against the fixed `[score]` weights.\n\n| load | setup | learned | fixed |\n|---|---|---|---|\n",
        );
        md.push_str(&errors.concat());
        md.push('\n');
    }
    if a.scenarios.iter().any(|s| s == "fairness") {
        md.push_str(
            "**Fairness**: the quiet tenant at 0.2x capacity, alone and then with a noisy tenant at ten times its \
             rate (2x capacity); the quiet tenant's figures.\n\n",
        );
        md.push_str(&header("run"));
        let quiet = Stream { rate: 0.2 * cap, class: standard };
        let noisy = Stream { rate: 2.0 * cap, class: Class { key: NOISY, band: Priority::Standard } };
        for name in a.setups.iter().filter(|s| s.as_str() != "central-flow") {
            let seed = 2 + 10 * a.seed;
            let alone = point(name, std::slice::from_ref(&quiet), (&a, tpw), seed).await?;
            let shared = point(name, &[quiet.clone(), noisy.clone()], (&a, tpw), seed).await?;
            let ratio = shared[0].ttft[1] / alone[0].ttft[1];
            println!(
                "fairness {name}: quiet TTFT p90 alone {:.0} ms, with noisy {:.0} ms ({ratio:.2}x)",
                alone[0].ttft[1], shared[0].ttft[1]
            );
            md.push_str(&format!("| alone {}", row(name, &alone[0])));
            md.push_str(&format!("| with noisy {}", row(name, &shared[0])));
            md.push_str(&format!("| | {name}: quiet TTFT p90 with noisy / alone | {ratio:.2}x | | | | | | | |\n"));
        }
        md.push('\n');
    }
    if a.scenarios.iter().any(|s| s == "priority") {
        md.push_str("**Priority** at 1.5x capacity: 30% critical, 70% sheddable.\n\n");
        md.push_str(&header("band"));
        let critical = Stream { rate: 0.45 * cap, class: Class { key: QUIET, band: Priority::Critical } };
        let sheddable = Stream { rate: 1.05 * cap, class: Class { key: NOISY, band: Priority::Sheddable } };
        for name in &a.setups {
            let f = point(name, &[critical.clone(), sheddable.clone()], (&a, tpw), 3 + 10 * a.seed).await?;
            println!(
                "priority {name}: critical TTFT p90 {:.0} ms ({} 503), sheddable TTFT p90 {:.0} ms ({} 503)",
                f[0].ttft[1], f[0].refused_503, f[1].ttft[1], f[1].refused_503
            );
            md.push_str(&format!("| critical {}", row(name, &f[0])));
            md.push_str(&format!("| sheddable {}", row(name, &f[1])));
        }
        md.push('\n');
    }
    println!("{md}");
    if let Some(p) = &a.out {
        let (section, title) = match a.section.as_deref() {
            Some(named) => (named, ""),
            None => ("flow", "Flow control under overload: goodput, fairness and priorities"),
        };
        crate::cli::bench::write_section(p, section, title, &md)?;
    }
    Ok(())
}
