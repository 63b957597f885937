//! `kvmesh simulate`: the cluster simulator (`kvmesh_clustersim`) from the command line, with
//! its results as a table (and optionally a `BENCHMARKS.md` section and a CSV for plotting).

use std::path::PathBuf;

use kvmesh_clustersim::{self as cluster, ClusterConfig, Row};

use kvmesh_node::NodeError;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// TOML file of `ClusterConfig` (see `examples/simulate/`); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Workload file (default: the config's, else examples/workloads/shared-prefix.toml).
    #[arg(long)]
    pub workload: Option<PathBuf>,
    /// Cluster sizes (nodes, one engine each).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<usize>,
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Arrival rates per engine, requests/s.
    #[arg(long, value_delimiter = ',')]
    pub rates_per_engine: Vec<f64>,
    /// Virtual seconds of arrivals per run.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// Seeds: every point runs once with each (default: the config's `seed`).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// KV cache blocks per engine (`[engine] num_gpu_blocks`): fewer makes caches contended.
    #[arg(long)]
    pub num_gpu_blocks: Option<u32>,
    /// Stretch gossip intervals to keep each node's gossip within this many KB/s.
    #[arg(long)]
    pub gossip_budget_kb_s: Option<f64>,
    /// Nodes per cell for the `kvmesh-cells` policy (`[cells] size`).
    #[arg(long)]
    pub cell_size: Option<usize>,
    /// Markdown file whose section (`--section`, default `simulate`) is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "simulate")]
    pub section: String,
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

fn err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Bench(e.to_string())
}

pub fn config(a: &SimulateArgs) -> Result<ClusterConfig, NodeError> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| err(format!("{}: {e}", p.display())))?;
            toml::from_str::<ClusterConfig>(&text).map_err(|e| err(format!("{}: {e}", p.display())))?
        }
        None => ClusterConfig::default(),
    };
    if let Some(w) = &a.workload {
        cfg.workload = w.clone();
    }
    if !a.nodes.is_empty() {
        cfg.nodes = a.nodes.clone();
    }
    if !a.policies.is_empty() {
        cfg.policies = a.policies.clone();
    }
    if !a.rates_per_engine.is_empty() {
        cfg.rates_per_engine = a.rates_per_engine.clone();
    }
    if let Some(d) = a.duration_s {
        cfg.duration_s = d;
    }
    if !a.seeds.is_empty() {
        cfg.seeds = a.seeds.clone();
    }
    if let Some(b) = a.num_gpu_blocks {
        cfg.engine.num_gpu_blocks = b;
    }
    if let Some(c) = a.cell_size {
        cfg.cells.size = c;
    }
    if a.gossip_budget_kb_s.is_some() {
        cfg.gossip_budget_kb_s = a.gossip_budget_kb_s;
    }
    cfg.validate().map_err(err)?;
    Ok(cfg)
}

pub fn run(a: SimulateArgs) -> Result<(), NodeError> {
    let cfg = config(&a)?;
    let rows = cluster::run_all(&cfg, |r| {
        println!(
            "{:>5} nodes {:>13} @ {:>7.1} req/s seed {}: TTFT p50/p90/p99 {:.0}/{:.0}/{:.0} ms, hit {:.0}%, goodput {:.1} req/s, \
             load CoV {:.3}, lost {:.1}%, gossip {:.1} KB/s/node ({:.1} s wall)",
            r.nodes,
            r.policy,
            r.rate,
            r.seed,
            r.ttft_ms[0],
            r.ttft_ms[1],
            r.ttft_ms[2],
            r.hit_rate * 100.0,
            r.goodput,
            r.load_cov,
            r.lost * 100.0,
            r.gossip_kb_s,
            r.wall_s
        )
    })
    .map_err(err)?;
    let md = table(&cfg, &rows);
    println!("{md}");
    if let Some(p) = &a.csv {
        std::fs::write(p, csv(&rows)).map_err(err)?;
    }
    if let Some(p) = &a.out {
        crate::cli::bench::write_section(p, &a.section, "", &md)?;
    }
    Ok(())
}

/// The oracle's run at the same size, rate and seed, when it ran.
fn oracle_of<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    rows.iter().find(|o| o.policy == "oracle" && o.nodes == r.nodes && o.rate == r.rate && o.seed == r.seed)
}

fn table(cfg: &ClusterConfig, rows: &[Row]) -> String {
    let mut md = format!(
        "Command: `kvmesh simulate{}` (workload `{}`, {} virtual s of arrivals per run, the first {:.0}% warm-up; \
         summaries sampled 1 key in {}; {}). Gossip intervals: chitchat round / load / summary, in s.\n\n",
        std::env::args().skip(2).map(|s| format!(" {s}")).collect::<String>(),
        cfg.workload.display(),
        cfg.duration_s,
        cfg.warmup_fraction * 100.0,
        cfg.gossip.summary_stride,
        match cfg.gossip_budget_kb_s {
            Some(b) => format!("intervals stretched to keep gossip within {b} KB/s per node"),
            None => "the node's default intervals".into(),
        },
    );
    md.push_str(
        "| nodes | rate (req/s) | seed | policy | TTFT p50 | TTFT p90 | TTFT p99 | p90 / oracle | ITL p99 | output tok/s | cache hit | \
         hit / oracle | load CoV | lost cache | goodput (req/s) | gossip KB/s/node (summaries) | gateway KB/s | cells (relayed) | gossip intervals | wall s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let oracle = oracle_of(rows, r);
        let vs = oracle.map(|o| format!("{:.2}", r.ttft_ms[1] / o.ttft_ms[1])).unwrap_or_else(|| "-".into());
        let hit_vs = oracle
            .filter(|o| o.hit_rate > 0.0)
            .map(|o| format!("{:.2}", r.hit_rate / o.hit_rate))
            .unwrap_or_else(|| "-".into());
        let gossip =
            if r.policy == "oracle" { "-".to_owned() } else { format!("{:.1} ({:.1})", r.gossip_kb_s, r.summary_kb_s) };
        let gateway = r.gateway_kb_s.map(|k| format!("{k:.1}")).unwrap_or_else(|| "-".into());
        let cells = if r.cells > 1 { format!("{} ({:.0}%)", r.cells, r.relayed * 100.0) } else { "1".into() };
        let g = &r.gossip;
        let intervals = format!(
            "{:.1} / {:.1} / {:.1}",
            g.gossip_interval_ms / 1000.0,
            g.load_publish_interval_ms / 1000.0,
            g.summary_interval_ms / 1000.0
        );
        md.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {vs} | {:.1} ms | {:.0} | {:.0}% | {hit_vs} | {:.3} | {:.1}% | {:.1} | {gossip} | {gateway} | {cells} | {intervals} | {:.0} |\n",
            r.nodes,
            r.rate,
            r.seed,
            r.policy,
            r.ttft_ms[0],
            r.ttft_ms[1],
            r.ttft_ms[2],
            r.itl_ms[1],
            r.out_tok_s,
            r.hit_rate * 100.0,
            r.load_cov,
            r.lost * 100.0,
            r.goodput,
            r.wall_s
        ));
    }
    let edge: Vec<&Row> = rows.iter().filter(|r| !r.edge.is_empty()).collect();
    if !edge.is_empty() {
        md.push_str(
            "\nRequests received at edge nodes. Right or wrong is judged with the truth when each request was routed \
             (every engine's exact cache and queue, scored with the router's own TTFT prediction, within its \
             tolerance):\n\n| nodes | policy | site RTT | edge requests | sent far | far, and truly no worse than the \
             best engine in the site | kept in the site though a far engine was truly better | mean cached prefix \
             used |\n|---|---|---|---|---|---|---|---|\n",
        );
        for (r, (rtt, e)) in edge.iter().flat_map(|r| r.edge.iter().map(move |x| (r, x))) {
            let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
            md.push_str(&format!(
                "| {} | {} | {rtt} ms | {} | {:.0}% | {:.0}% of far | {:.1}% of kept | {:.0} tokens |\n",
                r.nodes,
                r.policy,
                e.requests,
                pct(e.sent_far, e.requests),
                pct(e.far_paid, e.sent_far),
                pct(e.near_missed, e.requests - e.sent_far),
                e.mean_matched_tokens
            ));
        }
    }
    md
}

fn csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "nodes,rate,seed,policy,ttft_p50_ms,ttft_p90_ms,ttft_p99_ms,itl_p50_ms,itl_p99_ms,out_tok_s,hit_rate,goodput,gossip_kb_s,summary_kb_s,gateway_kb_s,cells,relayed,done,load_cov,lost\n",
    );
    for r in rows {
        s.push_str(&format!(
            "{},{:.2},{},{},{:.1},{:.1},{:.1},{:.2},{:.2},{:.1},{:.4},{:.2},{:.2},{:.2},{:.2},{},{:.4},{},{:.4},{:.4}\n",
            r.nodes,
            r.rate,
            r.seed,
            r.policy,
            r.ttft_ms[0],
            r.ttft_ms[1],
            r.ttft_ms[2],
            r.itl_ms[0],
            r.itl_ms[1],
            r.out_tok_s,
            r.hit_rate,
            r.goodput,
            r.gossip_kb_s,
            r.summary_kb_s,
            r.gateway_kb_s.unwrap_or(0.0),
            r.cells,
            r.relayed,
            r.done,
            r.load_cov,
            r.lost
        ));
    }
    s
}
