//! `kvmesh bench`: benchmarks that print figures and record them in BENCHMARKS.md.
//!
//! Every figure is a comparison run in the same process against a baseline (these machines are
//! shared and noisy): the node's added latency is measured against calling the same engine
//! directly, interleaving the two so drift hits both alike.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EngineEntry};
use crate::error::NodeError;
use crate::node::Node;
use kvmesh_sim::{EngineConfig, EngineSim};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCmd {
    /// The node's added latency over calling its engine directly, and its request throughput.
    Overhead(OverheadArgs),
    /// Gossip convergence time and bandwidth for meshes of several sizes.
    Gossip(crate::bench_gossip::GossipArgs),
    /// KV-aware routing against round-robin, least-load and a central oracle.
    Routing(crate::bench_routing::RoutingArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct OverheadArgs {
    /// Sequential requests per path and mode for the latency figures.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Concurrent clients for the throughput figure.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds of load per path for the throughput figure.
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Words in each prompt.
    #[arg(long, default_value_t = 200)]
    pub prompt_words: usize,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Markdown file whose `overhead` section is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub async fn run(cmd: BenchCmd) -> Result<(), NodeError> {
    match cmd {
        BenchCmd::Overhead(a) => overhead(a).await,
        BenchCmd::Gossip(a) => crate::bench_gossip::run(a).await,
        BenchCmd::Routing(a) => crate::bench_routing::run(a).await,
    }
}

fn hist() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; cannot fail for these bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("valid sigfig"))
}

struct Paths {
    direct: String,
    node: String,
}

async fn one(
    client: &reqwest::Client,
    base: &str,
    body: &serde_json::Value,
    stream: bool,
) -> Result<Duration, NodeError> {
    let t = Instant::now();
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .map_err(|e| NodeError::Bench(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(NodeError::Bench(format!("{base} answered {}", resp.status())));
    }
    if stream {
        // Time to the first content byte, then drain so the connection is reusable.
        let mut s = resp.bytes_stream();
        let mut first = None;
        while let Some(c) = s.next().await {
            c.map_err(|e| NodeError::Bench(e.to_string()))?;
            first.get_or_insert_with(|| t.elapsed());
        }
        first.ok_or_else(|| NodeError::Bench("empty stream".into()))
    } else {
        resp.bytes().await.map_err(|e| NodeError::Bench(e.to_string()))?;
        Ok(t.elapsed())
    }
}

fn prompt(words: usize, i: usize) -> String {
    const W: &[&str] = &["route", "cache", "prefix", "token", "engine", "mesh", "node", "block", "decode", "prefill"];
    (0..words).map(|k| W[(k * 7 + i) % W.len()]).collect::<Vec<_>>().join(" ")
}

async fn overhead(a: OverheadArgs) -> Result<(), NodeError> {
    let cancel = CancellationToken::new();
    // No modelled GPU time: what remains is HTTP, JSON and tokenizing, so the node's share shows.
    let engine_cfg = EngineConfig { time_scale: 0.0, ..EngineConfig::default() };
    let engine = EngineSim::start(engine_cfg, "127.0.0.1:0", None, &cancel).await?;
    let node_cfg = Config {
        node_name: "bench".into(),
        http_addr: "127.0.0.1:0".into(),
        engines: vec![EngineEntry { url: engine.url(), name: Some("sim".into()), kv_events: None, api_key: None }],
        ..Config::default()
    };
    let node = Node::start(node_cfg, &cancel).await?;
    let paths = Paths { direct: engine.url(), node: node.url() };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| NodeError::Client(e.to_string()))?;
    let body = |i: usize, stream: bool| {
        json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": prompt(a.prompt_words, i)}],
               "max_tokens": a.max_tokens, "stream": stream})
    };
    for i in 0..100 {
        one(&client, &paths.direct, &body(i, false), false).await?;
        one(&client, &paths.node, &body(i, false), false).await?;
    }
    let mut rows = Vec::new();
    for stream in [false, true] {
        let (mut hd, mut hn) = (hist(), hist());
        for i in 0..a.requests {
            // Alternate which path goes first so neither always runs on a warmer cache.
            let b = body(i, stream);
            let order = if i % 2 == 0 { [&paths.direct, &paths.node] } else { [&paths.node, &paths.direct] };
            for base in order {
                let d = one(&client, base, &b, stream).await?;
                let h = if base == &paths.direct { &mut hd } else { &mut hn };
                let _ = h.record(d.as_micros().max(1) as u64);
            }
        }
        rows.push((stream, hd, hn));
    }
    let tput_direct = throughput(&client, &paths.direct, &a, &body).await?;
    let tput_node = throughput(&client, &paths.node, &a, &body).await?;
    node.shutdown().await;
    engine.shutdown().await;

    let mut md = String::new();
    md.push_str(&format!(
        "Command: `kvmesh bench overhead --requests {} --concurrency {} --duration-s {}` (release build; engine-sim with \
         `time_scale = 0`, so only HTTP, JSON and tokenizing remain; {}-word prompts, max_tokens {}; client, node and \
         engine share this machine's {} cores).\n\n",
        a.requests, a.concurrency, a.duration_s, a.prompt_words, a.max_tokens,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    md.push_str("| mode | direct p50 | via node p50 | added p50 | direct p99 | via node p99 | added p99 |\n|---|---|---|---|---|---|---|\n");
    for (stream, hd, hn) in &rows {
        let ms = |v: u64| format!("{:.3} ms", v as f64 / 1000.0);
        let added =
            |q: f64| format!("{:+.3} ms", (hn.value_at_quantile(q) as f64 - hd.value_at_quantile(q) as f64) / 1000.0);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            if *stream { "streaming, time to first byte" } else { "non-streaming, whole response" },
            ms(hd.value_at_quantile(0.5)),
            ms(hn.value_at_quantile(0.5)),
            added(0.5),
            ms(hd.value_at_quantile(0.99)),
            ms(hn.value_at_quantile(0.99)),
            added(0.99),
        ));
    }
    md.push_str(&format!(
        "\nThroughput, non-streaming, {} concurrent clients: direct {:.0} req/s, via node {:.0} req/s (ratio {:.2}).\n",
        a.concurrency,
        tput_direct,
        tput_node,
        tput_node / tput_direct.max(1e-9)
    ));
    println!("{md}");
    if let Some(path) = &a.out {
        write_section(path, "overhead", "Node overhead over a direct engine call", &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

async fn throughput(
    client: &reqwest::Client,
    base: &str,
    a: &OverheadArgs,
    body: &(dyn Fn(usize, bool) -> serde_json::Value + Sync),
) -> Result<f64, NodeError> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(a.duration_s);
    let workers = (0..a.concurrency).map(|w| {
        let (client, done) = (client.clone(), done.clone());
        let base = base.to_owned();
        let bodies: Vec<_> = (0..16).map(|i| body(w * 16 + i, false)).collect();
        async move {
            let mut i = 0;
            while Instant::now() < deadline {
                one(&client, &base, &bodies[i % bodies.len()], false).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, NodeError>(())
        }
    });
    let t = Instant::now();
    for r in futures::future::join_all(workers).await {
        r?;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64())
}

/// Replaces (or appends) the section between `<!-- bench:NAME -->` markers in a Markdown file.
pub fn write_section(path: &Path, name: &str, title: &str, body: &str) -> Result<(), NodeError> {
    let start = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let section = format!("{start}\n## {title}\n\n{body}\n{end}");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &old[..s], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    std::fs::write(path, new).map_err(|e| NodeError::Bench(format!("cannot write {}: {e}", path.display())))
}
