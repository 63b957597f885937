//! `kvmesh`: one binary per node. `serve` runs a node; `engine-sim` runs a stand-alone vLLM
//! simulator; `cert` and `keys` make certificates and API keys; `audit` verifies an audit log;
//! `peers`, `status` and `drain` talk to a running node; `demo`, `simulate` and `bench` (the
//! binary's private `cli` module) run the local demo, the cluster simulator and benchmarks.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvmesh_node::telemetry::OtlpExport;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use cli::bench::{self, BenchCmd};
use std::path::PathBuf;

use cli::demo::DemoArgs;
use kvmesh_node::config::{Config, LogFormat, ServeArgs};
use kvmesh_node::Node;
use kvmesh_sim::server::EngineSimArgs;
use kvmesh_sim::EngineSim;

#[derive(Parser)]
#[command(name = "kvmesh", version, about = "KV-cache-aware routing mesh for vLLM, with no central gateway")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node: the OpenAI API in front of this node's engines.
    Serve(ServeArgs),
    /// Run a stand-alone engine simulator that speaks vLLM's HTTP API, metrics and KV events.
    EngineSim(EngineSimArgs),
    /// Run a benchmark and print (optionally record) its figures.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Make the cluster CA and node certificates for the mesh's mutual TLS.
    #[command(subcommand)]
    Cert(CertCmd),
    /// List the mesh's live members as a node sees them.
    Peers {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// A node's view of itself: peers, engines (health, load, indexed blocks), how each model's
    /// prompts are matched, tokenizers, and whether it is draining.
    Status {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Drain a node: it refuses new requests (503 `draining`), leaves the mesh and lets open
    /// requests finish. Stop the process afterwards (SIGTERM).
    Drain {
        #[command(flatten)]
        node: NodeArgs,
        /// Then wait up to this many seconds for the node's open requests to finish.
        #[arg(long, value_name = "SECONDS")]
        wait: Option<u64>,
    },
    /// Start a local mesh of nodes with simulated engines and show requests crossing it.
    Demo(DemoArgs),
    /// Simulate a cluster of any size in virtual time: the engine simulator's model, the real
    /// routing code, modelled gossip delay; figures as `bench routing` reports them.
    Simulate(cli::simulate::SimulateArgs),
    /// Check the audit trail's hash chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Make API keys and the hashes that config stores.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Check a configuration without starting a node.
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Read FILE as `serve --config FILE` would (with the `KVMESH_*` variables set here), check
    /// it, and say what it configures; exits 1 with what to fix when it is not valid.
    Check { file: PathBuf },
}

/// `serve`'s arguments as a command line of their own, for `config check`.
#[derive(Parser)]
struct ServeLine {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Which node an operator command talks to, and with what key.
#[derive(clap::Args)]
struct NodeArgs {
    /// The node's HTTP address.
    #[arg(long, alias = "node", default_value = "http://127.0.0.1:8080", env = "KVMESH_NODE_URL")]
    url: String,
    /// An admin API key (needed when the node has `[auth]` keys).
    #[arg(long, env = "KVMESH_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
}

impl NodeArgs {
    /// Sends `method path` and returns the JSON answer; a non-2xx answer is an error that
    /// carries the node's message.
    async fn call(&self, method: reqwest::Method, path: &str) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let mut rb = reqwest::Client::new().request(method.clone(), &url);
        if let Some(k) = &self.admin_key {
            rb = rb.bearer_auth(k);
        }
        let r = rb.send().await.with_context(|| format!("{method} {url}"))?;
        let status = r.status();
        let text = r.text().await.with_context(|| format!("{method} {url}: reading the answer"))?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if !status.is_success() {
            let why = v["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
            anyhow::bail!("{method} {url}: {status}: {why}");
        }
        Ok(v)
    }
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Verify the chain of FILE (with its rotated FILE.1, FILE.2, ... first, when present), or of
    /// several files given oldest first. Exits 1 at the first break, naming the line.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Print the SHA-256 to put in `key_sha256` for KEY (read from stdin when left out).
    Hash { key: Option<String> },
    /// Make a new random key for TENANT and print it with its `[[auth.keys]]` entry.
    New {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        admin: bool,
    },
}

fn audit_verify(files: Vec<PathBuf>) -> anyhow::Result<bool> {
    let files = if files.len() == 1 { kvmesh_node::audit::chain_files(&files[0]) } else { files };
    if files.is_empty() {
        anyhow::bail!("no such audit file");
    }
    match kvmesh_node::audit::verify(&files) {
        Ok(r) => {
            println!(
                "OK: {} records (seq {}..{}), {} requests, {} gap records ({} records dropped)",
                r.records,
                r.first_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                r.last_seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
                r.requests,
                r.gaps,
                r.dropped
            );
            if r.starts_mid_chain {
                println!("note: the chain starts after seq 0; earlier records are in files not given");
            }
            if r.torn_tail {
                println!("note: the last line is partial (a crash mid-write) and was not counted");
            }
            if let Some(h) = r.last_hash {
                println!("last hash: {h}");
            }
            Ok(true)
        }
        Err(b) => {
            println!("BROKEN: {b}");
            Ok(false)
        }
    }
}

#[derive(Subcommand)]
enum CertCmd {
    /// Create DIR/ca.crt and DIR/ca.key (keep ca.key off the nodes).
    Ca {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = "kvmesh")]
        cluster_id: String,
    },
    /// Create DIR/NAME.crt and DIR/NAME.key signed by the CA in --ca-dir (and copy ca.crt).
    Node {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Where ca.crt and ca.key are (default: --dir).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
    },
}

fn init_tracing(format: LogFormat) {
    init_tracing_with(format, "info", None)
}

fn init_tracing_filter(default: &str) {
    init_tracing_with(LogFormat::Text, default, None)
}

async fn print_peers(node: &NodeArgs) -> anyhow::Result<()> {
    let v = node.call(reqwest::Method::GET, "/v1/mesh/peers").await?;
    let empty = Vec::new();
    let peers = v["peers"].as_array().unwrap_or(&empty);
    println!("{:<16} {:<7} {:<22} {:<22} engines (running/waiting/kv)", "node", "role", "http", "quic");
    for p in peers {
        let engines: Vec<String> = p["engines"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|e| {
                format!(
                    "{}{} {}/{}/{:.0}%",
                    e["name"].as_str().unwrap_or("?"),
                    if e["healthy"].as_bool() == Some(true) { "" } else { "(down)" },
                    e["running"],
                    e["waiting"],
                    e["kv_usage"].as_f64().unwrap_or(0.0) * 100.0
                )
            })
            .collect();
        let name = format!(
            "{}{}",
            p["node"].as_str().unwrap_or("?"),
            if p["self"].as_bool() == Some(true) { "*" } else { "" }
        );
        println!(
            "{:<16} {:<7} {:<22} {:<22} {}",
            name,
            p["role"].as_str().unwrap_or("?"),
            p["http_addr"].as_str().unwrap_or("?"),
            p["quic_addr"].as_str().unwrap_or("?"),
            engines.join(", ")
        );
    }
    if v["mesh"].as_bool() != Some(true) {
        println!("(this node is not in a mesh: start it with --tls-dir)");
    }
    Ok(())
}

async fn print_status(node: &NodeArgs) -> anyhow::Result<()> {
    let v = node.call(reqwest::Method::GET, "/v1/mesh/status").await?;
    let empty = Vec::new();
    let mesh = if v["mesh"].as_bool() == Some(true) {
        format!("in a mesh, {} live members (itself included)", v["peers"])
    } else {
        "not in a mesh".to_owned()
    };
    println!(
        "node {}: {}; {}; {} open requests",
        v["node"].as_str().unwrap_or("?"),
        if v["draining"].as_bool() == Some(true) { "DRAINING" } else { "serving" },
        mesh,
        v["open_requests"]
    );
    println!();
    println!(
        "{:<20} {:<8} {:>7} {:>7} {:>5} {:>9} {:>14} {:>12}  models",
        "engine", "health", "running", "waiting", "kv%", "kv events", "indexed blocks", "routed keys"
    );
    for e in v["engines"].as_array().unwrap_or(&empty) {
        let models: Vec<&str> = e["models"].as_array().unwrap_or(&empty).iter().filter_map(|m| m.as_str()).collect();
        println!(
            "{:<20} {:<8} {:>7} {:>7} {:>5.0} {:>9} {:>14} {:>12}  {}",
            e["name"].as_str().unwrap_or("?"),
            if e["healthy"].as_bool() == Some(true) { "up" } else { "DOWN" },
            e["running"].as_f64().unwrap_or(0.0),
            e["waiting"].as_f64().unwrap_or(0.0),
            e["kv_usage"].as_f64().unwrap_or(0.0) * 100.0,
            if e["kv_events"].as_bool() == Some(true) { "yes" } else { "no" },
            e["indexed_blocks"].as_u64().unwrap_or(0),
            e["routed_keys"].as_u64().unwrap_or(0),
            models.join(",")
        );
    }
    println!();
    println!("{:<32} {:<18} {:>8} {:>18}", "model", "prefix matching", "checked", "length mismatches");
    for m in v["models"].as_array().unwrap_or(&empty) {
        println!(
            "{:<32} {:<18} {:>8} {:>18}",
            m["model"].as_str().unwrap_or("?"),
            m["prefix_matching"].as_str().unwrap_or("?"),
            m["engine_agreement"]["checked"].as_u64().unwrap_or(0),
            m["engine_agreement"]["length_mismatches"].as_u64().unwrap_or(0)
        );
        if m["prefix_matching"] == "exact_disagreeing" {
            println!("  ^ this node's prompt lengths differ from the engines': check the model's tokenizer and chat template");
        }
    }
    let tokenizers = v["tokenizers"].as_array().unwrap_or(&empty);
    if !tokenizers.is_empty() {
        println!();
        println!(
            "{:<32} {:<6} {:<6} {:>10} {:>14} {:>12}",
            "tokenizer", "fast", "cache", "max len", "loaded MiB", "cache MiB"
        );
        for t in tokenizers {
            let mib = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
            let yes = |x: &serde_json::Value| if x.as_bool() == Some(true) { "yes" } else { "no" };
            println!(
                "{:<32} {:<6} {:<6} {:>10} {:>14.1} {:>12.1}",
                t["model"].as_str().unwrap_or("?"),
                yes(&t["encoder"]["fast_encoder"]),
                yes(&t["encoder"]["segment_cache"]),
                t["max_model_len"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
                mib(&t["loaded_bytes"]),
                mib(&t["segment_cache_bytes"])
            );
            for note in t["encoder"]["notes"].as_array().unwrap_or(&empty) {
                println!("  note: {}", note.as_str().unwrap_or(""));
            }
        }
    }
    Ok(())
}

async fn drain(node: &NodeArgs, wait: Option<u64>) -> anyhow::Result<()> {
    let v = node.call(reqwest::Method::POST, "/admin/drain").await?;
    println!(
        "node {} is draining{}; {} open requests",
        v["node"].as_str().unwrap_or("?"),
        if v["left_mesh"].as_bool() == Some(true) { " and has left the mesh" } else { "" },
        v["open_requests"]
    );
    let Some(secs) = wait else { return Ok(()) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let s = node.call(reqwest::Method::GET, "/v1/mesh/status").await?;
        let open = s["open_requests"].as_u64().unwrap_or(0);
        if open == 0 {
            println!("no open requests: the node can be stopped");
            return Ok(());
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{open} requests still open after {secs} s");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Logs on stderr (text or JSON) and, with `otlp`, the same spans exported over OTLP; the
/// `RUST_LOG` filter applies to both.
fn init_tracing_with(format: LogFormat, default: &str, otlp: Option<&OtlpExport>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let base = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => base.with(fmt.json()).with(otlp.map(|o| o.layer())).init(),
        LogFormat::Text => base.with(fmt).with(otlp.map(|o| o.layer())).init(),
    }
}

/// Cancels `token` on Ctrl-C or SIGTERM.
fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        token.cancel();
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cancel = CancellationToken::new();
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = Config::load(&args).context("invalid configuration")?;
            let otlp = match &cfg.observability.otlp_endpoint {
                Some(ep) => Some(OtlpExport::start(ep, &cfg.node_name).context("OTLP export")?),
                None => None,
            };
            init_tracing_with(cfg.log_format, "info", otlp.as_ref());
            if let Some(ep) = &cfg.observability.otlp_endpoint {
                tracing::info!(endpoint = %ep, "exporting request spans over OTLP/HTTP");
            }
            // The signal must not cancel the node's own token: that would stop its engines,
            // watchers and gossip at once, before the drain lets open streams finish.
            // `shutdown` cancels the node's token itself, once they have.
            let signalled = CancellationToken::new();
            cancel_on_signal(signalled.clone());
            let node = Node::start(cfg, &cancel).await.context("node failed to start")?;
            println!("kvmesh node `{}` serving the OpenAI API at {}", node.node_name, node.url());
            if let Some(m) = &node.mesh {
                println!("  mesh: QUIC at {} (seed other nodes with --seeds {})", m.advertise, m.advertise);
            }
            println!("  try: curl {}/v1/chat/completions -H 'content-type: application/json' \\", node.url());
            println!("         -d '{{\"model\":\"kvmesh-sim\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'");
            signalled.cancelled().await;
            node.shutdown().await;
            if let Some(o) = otlp {
                // Sends the last batch; blocking, so off the async workers.
                let _ = tokio::task::spawn_blocking(move || o.shutdown()).await;
            }
        }
        Cmd::EngineSim(args) => {
            init_tracing(LogFormat::Text);
            cancel_on_signal(cancel.clone());
            let engine = EngineSim::start_with_replay(
                args.engine,
                &args.http_addr,
                args.kv_events_addr.as_deref(),
                args.kv_events_replay_addr.as_deref(),
                &cancel,
            )
            .await
            .context("engine simulator failed to start")?;
            println!("engine-sim serving `{}` at {}", engine.model, engine.url());
            if let Some(kv) = &engine.kv_events_endpoint {
                println!("  KV events on {kv}");
            }
            if let Some(r) = &engine.kv_events_replay_endpoint {
                println!("  KV-event replay on {r}");
            }
            engine.wait().await;
        }
        Cmd::Simulate(args) => {
            init_tracing(LogFormat::Text);
            cli::simulate::run(args)?;
        }
        Cmd::Bench(cmd) => {
            init_tracing(LogFormat::Text);
            bench::run(cmd).await?;
        }
        Cmd::Cert(CertCmd::Ca { dir, cluster_id }) => {
            let (crt, key) = kvmesh_transport::certs::create_ca(&dir, &cluster_id)?;
            println!("wrote {} and {}", crt.display(), key.display());
        }
        Cmd::Cert(CertCmd::Node { name, dir, ca_dir }) => {
            let ca_dir = ca_dir.unwrap_or_else(|| dir.clone());
            let (crt, key) = kvmesh_transport::certs::create_node(&ca_dir, &dir, &name)?;
            println!(
                "wrote {} and {} (start the node with --node-name {name} --tls-dir {})",
                crt.display(),
                key.display(),
                dir.display()
            );
        }
        Cmd::Peers { node } => print_peers(&node).await?,
        Cmd::Status { node } => print_status(&node).await?,
        Cmd::Drain { node, wait } => drain(&node, wait).await?,
        Cmd::Demo(args) => {
            init_tracing_filter("warn");
            cancel_on_signal(cancel.clone());
            cli::demo::run(args, cancel).await?;
        }
        Cmd::Config(ConfigCmd::Check { file }) => {
            let line =
                ServeLine::try_parse_from([std::ffi::OsString::from("kvmesh"), "--config".into(), file.clone().into()])
                    .context("reading the variables")?;
            match Config::load(&line.serve) {
                Ok(cfg) => {
                    let mesh = if cfg.tls_dir.is_some() || cfg.cert.is_some() { "on" } else { "off" };
                    println!(
                        "{}: valid. Node `{}`, HTTP {}, {} engine(s){}, mesh {mesh}, {} API key(s), {} guardrail(s), audit {}.",
                        file.display(),
                        cfg.node_name,
                        cfg.http_addr,
                        cfg.engines.len(),
                        if cfg.engines.is_empty() && cfg.role == kvmesh_node::config::NodeRole::Worker { " (the embedded simulator)" } else { "" },
                        cfg.auth.keys.len(),
                        cfg.guardrails.len(),
                        if cfg.audit.path.is_some() { "on" } else { "off" },
                    );
                }
                Err(e) => {
                    eprintln!("{}: not valid: {e}", file.display());
                    std::process::exit(1);
                }
            }
        }
        Cmd::Audit(AuditCmd::Verify { files }) => {
            if !audit_verify(files)? {
                std::process::exit(1);
            }
        }
        Cmd::Keys(KeysCmd::Hash { key }) => {
            let key = match key {
                Some(k) => k,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line).context("reading the key from stdin")?;
                    line.trim().to_owned()
                }
            };
            anyhow::ensure!(!key.is_empty(), "empty key");
            println!("{}", kvmesh_policy::auth::hash_key(&key));
        }
        Cmd::Keys(KeysCmd::New { tenant, admin }) => {
            let key = format!("sk-kvmesh-{:032x}{:032x}", rand::random::<u128>(), rand::random::<u128>());
            println!("key (give it to the client; it is not stored): {key}");
            println!();
            println!("[[auth.keys]]");
            println!("tenant = {tenant:?}");
            println!("key_sha256 = \"{}\"", kvmesh_policy::auth::hash_key(&key));
            if admin {
                println!("admin = true");
            }
        }
    }
    Ok(())
}
