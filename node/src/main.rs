//! `kvmesh`: one binary per node. `serve` runs a node; `engine-sim` runs a stand-alone vLLM
//! simulator; `bench` runs the benchmarks.

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use kvmesh_node::bench::{self, BenchCmd};
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
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
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
    }
    Ok(())
}
