//! `kvmesh bench gossip`: how fast a state change reaches every node, and what gossip costs per
//! node. Every node is a real QUIC endpoint with mutual TLS running the real membership code,
//! all in one process on loopback. Bandwidth counts gossip payload bytes as framed on QUIC
//! streams; QUIC/TLS headers, ACKs and keep-alives come on top.
//!
//! With `--cell-sizes`, the same mesh also runs split into cells (ARCHITECTURE.md *Cells*): each
//! cell its own chitchat cluster, its first two nodes gateways on the backbone running the
//! node's own gateway loop (`cells::gateway`), so the figures include the cells table and the
//! backbone.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kvmesh_gossip::{EngineLoad, GossipConfig, LoadReport, Membership, NodeMeta, NodeRole};
use kvmesh_transport::endpoint::EndpointConfig;
use kvmesh_transport::{certs, MeshEndpoint, TlsIdentity};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use kvmesh_node::NodeError;

#[derive(Debug, Clone, clap::Args)]
pub struct GossipArgs {
    /// Mesh sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    pub nodes: Vec<usize>,
    /// State changes timed per size.
    #[arg(long, default_value_t = 30)]
    pub updates: usize,
    #[arg(long, default_value_t = 300)]
    pub gossip_interval_ms: u64,
    /// Seconds of steady state over which bandwidth is measured.
    #[arg(long, default_value_t = 10.0)]
    pub bandwidth_s: f64,
    /// Load changes per node per second during the bandwidth measurement (a busy engine's
    /// report changes at most every `load_publish_interval_ms`, 200 ms by default).
    #[arg(long, default_value_t = 1.0)]
    pub load_updates_per_s: f64,
    /// Cell sizes to run each mesh size with; 0 is one flat mesh.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub cell_sizes: Vec<usize>,
    /// With cells: the backbone's gossip round and the gateways' publishing interval.
    #[arg(long, default_value_t = 2000)]
    pub backbone_interval_ms: u64,
    /// Markdown file whose `gossip` section is replaced with the results.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

struct BenchNode {
    endpoint: Arc<MeshEndpoint>,
    membership: Arc<Membership>,
    cell: usize,
    gateway: bool,
}

fn load(tag: u32) -> LoadReport {
    LoadReport {
        engines: vec![EngineLoad {
            name: "gpu0".into(),
            models: vec!["meta-llama/Llama-3.1-8B-Instruct".into()],
            healthy: true,
            role: Default::default(),
            running: tag,
            waiting: 0,
            kv_usage: 0.42,
            tokens_per_s: 1200.0,
            block_size: Some(16),
            cards: Vec::new(),
            max_model_len: None,
            ttft_fit: None,
        }],
        held: 0,
    }
}

fn err(e: impl std::fmt::Display) -> NodeError {
    NodeError::Bench(e.to_string())
}

pub async fn run(a: GossipArgs) -> Result<(), NodeError> {
    let mut rows = Vec::new();
    for &n in &a.nodes {
        for &c in &a.cell_sizes {
            let row = measure(n, c, &a).await?;
            println!(
                "{n} nodes, cells of {c}: joined in {:.2} s, update p50/p99 {:.0}/{:.0} ms, {:.1} KB/s per node",
                row.join_s, row.p50_ms, row.p99_ms, row.kb_per_s
            );
            rows.push(row);
        }
    }
    let mut md = format!(
        "Command: `kvmesh bench gossip --nodes {} --cell-sizes {} --updates {} --gossip-interval-ms {} --load-updates-per-s {}` \
         (release build; every node a real QUIC endpoint with mutual TLS and the real membership code, all in one process \
         on this machine's {} cores). An update is one node changing its `load` key; it has reached the mesh (with cells: \
         its cell) when every node's view there shows it. Bandwidth is gossip payload bytes sent per node per second in \
         steady state, with every node changing its load {} times a second; QUIC/TLS framing, ACKs and keep-alives are \
         not counted. With cells (size > 0), the first two nodes of each cell are gateways on the backbone (round {} ms), \
         and `join` also waits for every node's cells table to list every cell.\n\n",
        a.nodes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","),
        a.cell_sizes.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(","),
        a.updates,
        a.gossip_interval_ms,
        a.load_updates_per_s,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        a.load_updates_per_s,
        a.backbone_interval_ms,
    );
    md.push_str(
        "| nodes | cell size | join (all see all) | update p50 | update p99 | p99 in rounds | gossip KB/s per node | \
         gossip KB/s per gateway |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        md.push_str(&format!(
            "| {} | {} | {:.2} s | {:.0} ms | {:.0} ms | {:.1} | {:.1} | {} |\n",
            r.nodes,
            if r.cell_size == 0 { "flat".to_owned() } else { r.cell_size.to_string() },
            r.join_s,
            r.p50_ms,
            r.p99_ms,
            r.p99_ms / a.gossip_interval_ms as f64,
            r.kb_per_s,
            r.gateway_kb_per_s.map(|g| format!("{g:.1}")).unwrap_or_else(|| "-".into()),
        ));
    }
    println!("{md}");
    if let Some(path) = &a.out {
        crate::cli::bench::write_section(path, "gossip", "Gossip convergence and bandwidth", &md)?;
        println!("written to {}", path.display());
    }
    Ok(())
}

struct Row {
    nodes: usize,
    cell_size: usize,
    /// Mean over gateways, with cells.
    gateway_kb_per_s: Option<f64>,
    join_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    kb_per_s: f64,
}

async fn measure(n: usize, cell_size: usize, a: &GossipArgs) -> Result<Row, NodeError> {
    let dir = tempfile::tempdir().map_err(err)?;
    certs::create_ca(dir.path(), "bench").map_err(err)?;
    let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
    let mut nodes: Vec<BenchNode> = Vec::with_capacity(n);
    // Each cell's first node seeds it; the first gateway seeds the backbone.
    let mut seeds: std::collections::HashMap<usize, String> = std::collections::HashMap::new();
    let mut backbone_seed: Option<String> = None;
    let cells = if cell_size == 0 { 1 } else { n.div_ceil(cell_size) };
    for i in 0..n {
        let (cell, rank) = i.checked_div(cell_size).map_or((0, i), |c| (c, i % cell_size));
        let gateway = cell_size > 0 && rank < 2;
        let name = format!("g{i}");
        certs::create_node(dir.path(), dir.path(), &name).map_err(err)?;
        let (ca, crt, key) = TlsIdentity::paths_in(dir.path(), &name);
        let id = TlsIdentity::load(&ca, &crt, &key).map_err(err)?;
        let (endpoint, inbox) =
            MeshEndpoint::bind(&id, EndpointConfig::new("127.0.0.1:0".parse().map_err(err)?), &cancel, &tasks)
                .map_err(err)?;
        let addr = endpoint.local_addr();
        let meta = NodeMeta {
            role: NodeRole::Worker,
            models: vec![],
            http_addr: "127.0.0.1:0".into(),
            quic_addr: addr.to_string(),
        };
        let cluster = if cell_size == 0 { "bench".to_owned() } else { format!("bench/c{cell}") };
        let mut cfg = GossipConfig::new(&name, &cluster, addr, seeds.get(&cell).cloned().into_iter().collect());
        cfg.gossip_interval = Duration::from_millis(a.gossip_interval_ms);
        let membership = Membership::start(cfg, endpoint.clone(), inbox, &meta, &cancel, &tasks).await.map_err(err)?;
        membership.set_load(&load(0)).await.map_err(err)?;
        seeds.entry(cell).or_insert(addr.to_string());
        if gateway {
            let inbox = endpoint.gossip_channel(1).map_err(err)?;
            let mut b = GossipConfig::new(&name, "bench/backbone", addr, backbone_seed.clone().into_iter().collect());
            b.gossip_interval = Duration::from_millis(a.backbone_interval_ms);
            b.channel = 1;
            let backbone = Membership::start(b, endpoint.clone(), inbox, &meta, &cancel, &tasks).await.map_err(err)?;
            backbone_seed.get_or_insert(addr.to_string());
            let every = Duration::from_millis(a.backbone_interval_ms);
            tasks.spawn(kvmesh_node::cells::gateway(
                format!("c{cell}"),
                membership.clone(),
                backbone,
                every,
                cancel.clone(),
            ));
        }
        nodes.push(BenchNode { endpoint, membership, cell, gateway });
    }
    let cell_members = |c: usize| nodes.iter().filter(|x| x.cell == c).count();
    let t = Instant::now();
    while !nodes.iter().all(|x| {
        let peers = x.membership.peers();
        peers.len() == cell_members(x.cell) && (cell_size == 0 || kvmesh_node::cells::table(&peers).len() == cells)
    }) {
        if t.elapsed() > Duration::from_secs(120) {
            return Err(err(format!("{n} nodes did not converge in 120 s")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let join_s = t.elapsed().as_secs_f64();

    // Propagation: one node changes its load; time until every node's view shows it.
    let mut h = Histogram::<u64>::new_with_bounds(1, 600_000, 3).map_err(err)?;
    for u in 0..a.updates {
        let src = (u * 7919) % n;
        let tag = 1000 + u as u32;
        let want = load(tag);
        let name = format!("g{src}");
        let watchers: Vec<_> = nodes
            .iter()
            .filter(|x| x.cell == nodes[src].cell)
            .map(|x| {
                let mut rx = x.membership.watch();
                let (want, name) = (want.clone(), name.clone());
                async move {
                    loop {
                        if rx.borrow_and_update().iter().any(|p| p.node_id == name && p.load == want) {
                            return;
                        }
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
            })
            .collect();
        let t = Instant::now();
        nodes[src].membership.set_load(&want).await.map_err(err)?;
        if tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(watchers)).await.is_err() {
            return Err(err(format!("update {u} did not reach all {n} nodes in 60 s")));
        }
        let _ = h.record(t.elapsed().as_millis().max(1) as u64);
    }

    // Bandwidth: every node changes its load `load_updates_per_s` times a second.
    let sent = |x: &BenchNode| x.endpoint.stats.gossip_bytes_sent.load(Ordering::Relaxed);
    let before: Vec<u64> = nodes.iter().map(sent).collect();
    let t = Instant::now();
    let mut round = 0u32;
    let period = Duration::from_secs_f64(1.0 / a.load_updates_per_s.max(0.01));
    while t.elapsed().as_secs_f64() < a.bandwidth_s {
        for (i, x) in nodes.iter().enumerate() {
            x.membership.set_load(&load(2000 + round * n as u32 + i as u32)).await.map_err(err)?;
        }
        round += 1;
        tokio::time::sleep(period).await;
    }
    let secs = t.elapsed().as_secs_f64();
    let delta: Vec<f64> = nodes.iter().zip(&before).map(|(x, b)| (sent(x) - b) as f64 / secs / 1000.0).collect();
    let kb_per_s = delta.iter().sum::<f64>() / n as f64;
    let gateways: Vec<f64> = nodes.iter().zip(&delta).filter(|(x, _)| x.gateway).map(|(_, d)| *d).collect();
    let gateway_kb_per_s = (!gateways.is_empty()).then(|| gateways.iter().sum::<f64>() / gateways.len() as f64);

    cancel.cancel();
    futures::future::join_all(nodes.iter().map(|x| x.endpoint.close())).await;
    tasks.close();
    tasks.wait().await;
    Ok(Row {
        nodes: n,
        cell_size,
        gateway_kb_per_s,
        join_s,
        p50_ms: h.value_at_quantile(0.5) as f64,
        p99_ms: h.value_at_quantile(0.99) as f64,
        kb_per_s,
    })
}
