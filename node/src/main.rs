//! `kvmesh`: one binary per node. `serve` runs a node; `engine-sim` runs a stand-alone vLLM
//! simulator; `bench` runs the benchmarks.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use kvmesh_node::bench::{self, BenchCmd};
use std::path::PathBuf;

use kvmesh_node::config::{Config, LogFormat, ServeArgs};
use kvmesh_node::demo::DemoArgs;
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
        /// The node's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "KVMESH_NODE_URL")]
        node: String,
    },
    /// Start a local mesh of nodes with simulated engines and show requests crossing it.
    Demo(DemoArgs),
    /// Check the audit trail's hash chain.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Make API keys and the hashes that config stores.
    #[command(subcommand)]
    Keys(KeysCmd),
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
    init_tracing_with(format, "info")
}

fn init_tracing_filter(default: &str) {
    init_tracing_with(LogFormat::Text, default)
}

async fn print_peers(node: &str) -> anyhow::Result<()> {
    let url = format!("{}/v1/mesh/peers", node.trim_end_matches('/'));
    let v: serde_json::Value = reqwest::get(&url).await.with_context(|| format!("GET {url}"))?.json().await?;
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

fn init_tracing_with(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
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
            init_tracing(cfg.log_format);
            cancel_on_signal(cancel.clone());
            let node = Node::start(cfg, &cancel).await.context("node failed to start")?;
            println!("kvmesh node `{}` serving the OpenAI API at {}", node.node_name, node.url());
            if let Some(m) = &node.mesh {
                println!("  mesh: QUIC at {} (seed other nodes with --seeds {})", m.advertise, m.advertise);
            }
            println!("  try: curl {}/v1/chat/completions -H 'content-type: application/json' \\", node.url());
            println!("         -d '{{\"model\":\"kvmesh-sim\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'");
            cancel.cancelled().await;
            node.shutdown().await;
        }
        Cmd::EngineSim(args) => {
            init_tracing(LogFormat::Text);
            cancel_on_signal(cancel.clone());
            let engine = EngineSim::start(args.engine, &args.http_addr, args.kv_events_addr.as_deref(), &cancel)
                .await
                .context("engine simulator failed to start")?;
            println!("engine-sim serving `{}` at {}", engine.model, engine.url());
            if let Some(kv) = &engine.kv_events_endpoint {
                println!("  KV events on {kv}");
            }
            engine.wait().await;
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
        Cmd::Demo(args) => {
            init_tracing_filter("warn");
            cancel_on_signal(cancel.clone());
            kvmesh_node::demo::run(args, cancel).await?;
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
