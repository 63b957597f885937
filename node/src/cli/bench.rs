//! `kvmesh bench`: benchmarks that print figures and record them in BENCHMARKS.md.
//!
//! Every figure is a comparison run in the same process against a baseline (these machines are
//! shared and noisy): the node's added latency is measured against calling the same engine
//! directly, interleaving the two so drift hits both alike.

use axum::serve::ListenerExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use kvmesh_node::config::{Config, EngineEntry};
use kvmesh_node::Node;
use kvmesh_node::NodeError;
use kvmesh_sim::{EngineConfig, EngineSim};

#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCmd {
    /// The node's added latency over calling its engine directly, and its request throughput.
    Overhead(OverheadArgs),
    /// Gossip convergence time and bandwidth for meshes of several sizes.
    Gossip(crate::cli::bench_gossip::GossipArgs),
    /// KV-aware routing against round-robin, least-load and a central oracle.
    Routing(crate::cli::bench_routing::RoutingArgs),
    /// Prompt tokenizing: reference encoder, segment cache and fast encoder, cold and warm.
    Tokenize(crate::cli::bench_tokenize::TokenizeArgs),
    /// Overload with and without flow control: goodput under a TTFT objective, fairness
    /// between tenants, priority bands.
    Flow(crate::cli::bench_flow::FlowArgs),
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
    /// A production tokenizer directory for the node to tokenize with (its segment cache and
    /// fast encoder on, as by default). Without it the builtin tiny tokenizer is used.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// `sim` (the engine simulator) or `echo`: an engine that answers every request at once
    /// with a fixed completion, so that its own prompt processing (the same on both paths, and
    /// for long prompts far larger than the node's) does not drown the node's share in noise.
    #[arg(long, default_value = "sim")]
    pub engine: String,
    /// Tokens of chat history before each request's own last message, the same for every
    /// request (a conversation's earlier turns, or a shared system prompt and documents).
    #[arg(long, default_value_t = 0)]
    pub history_tokens: usize,
    /// Markdown file whose `overhead` section (`overhead-tokenizer` with --tokenizer) is
    /// replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub async fn run(cmd: BenchCmd) -> Result<(), NodeError> {
    match cmd {
        BenchCmd::Overhead(a) => overhead(a).await,
        BenchCmd::Gossip(a) => crate::cli::bench_gossip::run(a).await,
        BenchCmd::Routing(a) => crate::cli::bench_routing::run(a).await,
        BenchCmd::Tokenize(a) => crate::cli::bench_tokenize::run(a).await,
        BenchCmd::Flow(a) => crate::cli::bench_flow::run(a).await,
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
    let (engine_url, engine) = match a.engine.as_str() {
        "sim" => {
            let e = EngineSim::start(engine_cfg, "127.0.0.1:0", None, &cancel).await?;
            (e.url(), Some(e))
        }
        "echo" => (echo_engine(&cancel).await?, None),
        other => return Err(NodeError::Bench(format!("--engine {other}: give sim or echo"))),
    };
    let mut node_cfg = Config {
        node_name: "bench".into(),
        http_addr: "127.0.0.1:0".into(),
        engines: vec![EngineEntry { name: Some("sim".into()), ..EngineEntry::new(engine_url.clone()) }],
        ..Config::default()
    };
    let template_file = tempfile::NamedTempFile::new().map_err(|e| NodeError::Bench(e.to_string()))?;
    if let Some(dir) = &a.tokenizer {
        let files =
            kvmesh_policy::tokenize::TokenizerFiles::read(dir, None).map_err(|e| NodeError::Bench(e.to_string()))?;
        let has_template = kvmesh_policy::tokenize::ModelTokenizer::from_files(&files)
            .map(|t| t.has_chat_template())
            .map_err(|e| NodeError::Bench(e.to_string()))?;
        let chat_template = if has_template {
            None
        } else {
            std::fs::write(template_file.path(), crate::cli::bench_tokenize::DEEPSEEK_STYLE_TEMPLATE)
                .map_err(|e| NodeError::Bench(e.to_string()))?;
            Some(template_file.path().to_path_buf())
        };
        node_cfg.models.push(kvmesh_node::config::ModelEntry {
            name: "kvmesh-sim".into(),
            tokenizer: dir.clone(),
            chat_template,
            encoder: Default::default(),
            max_model_len: None,
        });
    }
    let node = Node::start(node_cfg, &cancel).await?;
    let paths = Paths { direct: engine_url, node: node.url() };
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .map_err(|e| NodeError::Client(e.to_string()))?;
    let history = if a.history_tokens > 0 {
        crate::cli::bench_tokenize::conversation(7, a.history_tokens, 7)
    } else {
        Vec::new()
    };
    let body = |i: usize, stream: bool| {
        let mut messages: Vec<serde_json::Value> =
            history.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        // Numbered, so each request's own message is new text to the node's segment cache.
        messages.push(json!({"role": "user", "content": format!("Question {i}: {}", prompt(a.prompt_words, i))}));
        json!({"model": "kvmesh-sim", "messages": messages, "max_tokens": a.max_tokens, "stream": stream})
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
    let metrics = client
        .get(format!("{}/metrics", paths.node))
        .send()
        .await
        .map_err(|e| NodeError::Bench(e.to_string()))?
        .text()
        .await
        .map_err(|e| NodeError::Bench(e.to_string()))?;
    let sum = |name: &str, label: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let tokenized = sum("kvmesh_tokenize_requests_total", "outcome=\"tokenized\"");
    let encoded = sum("kvmesh_tokenize_tokens_total", "source=\"encoded\"");
    let cached = sum("kvmesh_tokenize_tokens_total", "source=\"cache\"");
    node.shutdown().await;
    if let Some(e) = engine {
        e.shutdown().await;
    }
    cancel.cancel();

    let mut md = String::new();
    let tokenizer_note = match &a.tokenizer {
        Some(dir) => format!(
            " --tokenizer {} --history-tokens {}` (the node tokenizes with that tokenizer, segment cache and fast \
             encoder on; every request repeats the same {}-token, 7-message history, seen before, then its own new \
             message",
            dir.display(),
            a.history_tokens,
            a.history_tokens
        ),
        None => "` (the builtin tokenizer".into(),
    };
    let engine_note = if a.engine == "echo" {
        "an echo engine that answers at once with a fixed completion (`--engine echo`), so only the node's work differs"
    } else {
        "engine-sim with `time_scale = 0`, so only HTTP, JSON and tokenizing remain"
    };
    md.push_str(&format!(
        "Command: `kvmesh bench overhead --requests {} --concurrency {} --duration-s {}{tokenizer_note}; release build; \
         {engine_note}; {}-word last messages, max_tokens {}; client, node and engine share this machine's {} \
         cores).\n\n",
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
    md.push_str(&format!(
        "\nThe node tokenized {tokenized:.0} prompts: {:.0} tokens per prompt on average, {:.1}% of them from its \
         segment cache.\n",
        (encoded + cached) / tokenized.max(1.0),
        100.0 * cached / (encoded + cached).max(1.0)
    ));
    println!("{md}");
    if let Some(path) = &a.out {
        match a.tokenizer {
            Some(_) => write_section(
                path,
                "overhead-tokenizer",
                "Node overhead with a production tokenizer and a long chat",
                &md,
            )?,
            None => write_section(path, "overhead", "Node overhead over a direct engine call", &md)?,
        }
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
/// An empty title writes the body alone (a part of a section whose heading is outside).
pub fn write_section(path: &Path, name: &str, title: &str, body: &str) -> Result<(), NodeError> {
    let start = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let heading = if title.is_empty() { String::new() } else { format!("## {title}\n\n") };
    let section = format!("{start}\n{heading}{body}\n{end}");
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let new = match (old.find(&start), old.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{}{}", &old[..s], section, &old[e + end.len()..]),
        _ => format!("{}\n{}\n", old.trim_end(), section),
    };
    std::fs::write(path, new).map_err(|e| NodeError::Bench(format!("cannot write {}: {e}", path.display())))
}

/// An engine that answers every completion at once with the same short answer, streamed or
/// not, and passes the node's health, model and metrics probes: a baseline that isolates the
/// node's own work in `bench overhead --engine echo`.
async fn echo_engine(cancel: &CancellationToken) -> Result<String, NodeError> {
    use axum::routing::{get, post};
    let completion = |stream: bool| {
        if stream {
            let chunk = json!({"id": "echo", "object": "chat.completion.chunk", "model": "kvmesh-sim",
                               "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": null}]});
            let body = format!("data: {chunk}\n\ndata: [DONE]\n\n");
            ([(axum::http::header::CONTENT_TYPE, "text/event-stream")], body)
        } else {
            let body = json!({"id": "echo", "object": "chat.completion", "model": "kvmesh-sim",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                           "finish_reason": "stop"}],
                              "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}});
            ([(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string())
        }
    };
    let app = axum::Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "vllm:num_requests_running{engine=\"0\"} 0\n" }))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "kvmesh-sim", "object": "model"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            post(move |body: axum::body::Bytes| async move {
                let stream =
                    serde_json::from_slice::<serde_json::Value>(&body).map(|v| v["stream"] == true).unwrap_or(false);
                completion(stream)
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| NodeError::Bench(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| NodeError::Bench(e.to_string()))?;
    let stop = cancel.clone();
    tokio::spawn(async move {
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { stop.cancelled().await }).await;
    });
    Ok(format!("http://{addr}"))
}
