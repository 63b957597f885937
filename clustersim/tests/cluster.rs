//! The cluster simulator end to end, on small clusters (debug builds are slow; the sizes that
//! matter run from `kvmesh simulate`, see BENCHMARKS.md).

use std::path::PathBuf;

use kvmesh_clustersim::{simulate, ClusterConfig, EdgeSite, Row};
use kvmesh_sim::workload::Workload;

fn shared_prefix() -> (ClusterConfig, Workload) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/workloads/shared-prefix.toml");
    let workload = Workload::load(&path).expect("workload");
    let cfg = ClusterConfig { workload: path, duration_s: 16.0, ..ClusterConfig::default() };
    cfg.validate().expect("valid");
    (cfg, workload)
}

fn run(cfg: &ClusterConfig, w: &Workload, nodes: usize, policy: &str, rate: f64) -> Row {
    simulate(cfg, w, nodes, policy, rate).expect("runs")
}

#[test]
fn a_run_is_reproducible_from_its_seed() {
    let (cfg, w) = shared_prefix();
    let cfg = ClusterConfig { duration_s: 6.0, ..cfg };
    let (a, b) = (run(&cfg, &w, 3, "kvmesh", 2.0), run(&cfg, &w, 3, "kvmesh", 2.0));
    assert!(a.done > 10, "{a:?}");
    assert_eq!((a.done, a.ttft_ms, a.hit_rate.to_bits()), (b.done, b.ttft_ms, b.hit_rate.to_bits()));
    let other = run(&ClusterConfig { seed: 99, ..cfg }, &w, 3, "kvmesh", 2.0);
    assert_ne!((a.done, a.ttft_ms), (other.done, other.ttft_ms), "another seed, another run");
}

#[test]
fn kvmesh_follows_caches_like_the_oracle_and_round_robin_does_not() {
    let (cfg, w) = shared_prefix();
    let rr = run(&cfg, &w, 4, "round-robin", 4.0);
    let kv = run(&cfg, &w, 4, "kvmesh", 4.0);
    let oracle = run(&cfg, &w, 4, "oracle", 4.0);
    assert!(rr.done > 100 && kv.done > 100 && oracle.done > 100);
    assert!(kv.hit_rate > rr.hit_rate + 0.25, "kvmesh hit {:.2} vs round-robin {:.2}", kv.hit_rate, rr.hit_rate);
    assert!((kv.hit_rate - oracle.hit_rate).abs() < 0.1, "kvmesh {:.2} vs oracle {:.2}", kv.hit_rate, oracle.hit_rate);
    assert!(kv.ttft_ms[1] < rr.ttft_ms[1], "TTFT p90 kvmesh {:.0} vs round-robin {:.0}", kv.ttft_ms[1], rr.ttft_ms[1]);
    assert!(kv.gossip_kb_s > 0.0 && kv.summary_kb_s > 0.0 && oracle.gossip_kb_s == 0.0);
}

#[test]
fn an_edge_node_goes_far_only_when_the_cache_there_is_worth_the_distance() {
    let (mut cfg, w) = shared_prefix();
    // One site 20 ms from the cluster, one 2 s away: a cached 6,000-token prefix saves ~290 ms
    // of predicted prefill, worth the first trip and not the second.
    cfg.network.edge =
        vec![EdgeSite { nodes: 1, rtt_ms: 20.0, engines: true }, EdgeSite { nodes: 1, rtt_ms: 2000.0, engines: true }];
    cfg.network.edge_share = 1.0;
    cfg.duration_s = 20.0;
    let r = run(&cfg, &w, 4, "kvmesh", 0.5);
    let site = |rtt: f64| r.edge.iter().find(|(x, _)| *x == rtt).map(|(_, e)| e.clone()).expect("site stats");
    let (near, far) = (site(20.0), site(2000.0));
    assert!(near.requests > 5 && far.requests > 5, "{r:?}");
    assert!(near.sent_far > 0, "20 ms away, cached prefixes in the cluster are worth the trip: {near:?}");
    assert!(near.far_paid * 10 >= near.sent_far * 8, "most far trips paid off: {near:?}");
    assert_eq!(far.sent_far, 0, "2 s away, nothing is worth the trip: {far:?}");
}

#[test]
fn a_gossip_budget_stretches_intervals_and_bounds_the_bytes() {
    let (cfg, w) = shared_prefix();
    let free = run(&ClusterConfig { duration_s: 8.0, ..cfg.clone() }, &w, 12, "kvmesh", 2.0);
    let tight = run(&ClusterConfig { duration_s: 8.0, gossip_budget_kb_s: Some(10.0), ..cfg }, &w, 12, "kvmesh", 2.0);
    assert!(tight.gossip.summary_interval_ms > free.gossip.summary_interval_ms);
    assert!(tight.gossip_kb_s < free.gossip_kb_s, "{} vs {}", tight.gossip_kb_s, free.gossip_kb_s);
    assert!(tight.gossip_kb_s <= 10.0 * 1.2, "within the budget (model): {}", tight.gossip_kb_s);
}

#[test]
fn cells_cut_each_nodes_gossip_and_keep_prefixes_together() {
    let (mut cfg, w) = shared_prefix();
    // Cells are measured from when every cell's first report can have reached every node (about
    // 7.6 s here), so the run is long enough to leave as many measured requests after that.
    cfg.duration_s = 16.0;
    cfg.cells.size = 4;
    let flat = run(&cfg, &w, 16, "kvmesh", 2.0);
    let cells = run(&cfg, &w, 16, "kvmesh-cells", 2.0);
    assert!(flat.done > 150 && cells.done > 150, "{flat:?} {cells:?}");
    assert_eq!((flat.cells, cells.cells), (1, 4));
    // A request's home is another cell three times in four.
    assert!((0.6..0.9).contains(&cells.relayed), "relayed {:.2}", cells.relayed);
    // Each node hears 3 peers instead of 15, plus a small cells table.
    assert!(cells.gossip_kb_s < flat.gossip_kb_s / 2.0, "{:.1} vs {:.1} KB/s", cells.gossip_kb_s, flat.gossip_kb_s);
    assert!(cells.gateway_kb_s.is_some_and(|g| g > cells.gossip_kb_s) && flat.gateway_kb_s.is_none());
    // Homes keep each prefix in one cell: the hit rate holds.
    assert!(cells.hit_rate > flat.hit_rate - 0.05, "hit {:.2} vs flat {:.2}", cells.hit_rate, flat.hit_rate);
}

#[test]
fn placing_a_prefix_alike_everywhere_keeps_contended_caches_useful() {
    let (mut cfg, w) = shared_prefix();
    // Caches hold about 0.8 of the workload's prefixes (with its questions, less): nodes that
    // draw among near-equal engines copy a new prefix onto several, evicting prefixes in use.
    cfg.engine.num_gpu_blocks = 6_000;
    cfg.duration_s = 20.0;
    let random = run(&cfg, &w, 8, "kvmesh-random", 3.0);
    let placed = run(&cfg, &w, 8, "kvmesh", 3.0);
    assert!(random.done > 300 && placed.done > 300, "{random:?} {placed:?}");
    assert!(
        placed.hit_rate > random.hit_rate + 0.04,
        "hit {:.2} placed vs {:.2} drawn",
        placed.hit_rate,
        random.hit_rate
    );
    assert!(placed.lost < random.lost, "lost cache {:.3} placed vs {:.3} drawn", placed.lost, random.lost);
    assert!(placed.load_cov > 0.0 && placed.load_cov < 0.5, "requests per engine spread: CoV {:.3}", placed.load_cov);
}
