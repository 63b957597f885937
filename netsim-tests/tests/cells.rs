//! A mesh split into two cells (`policy::cells`): each cell gossips on its own, the gateways
//! carry the cells table between them, and a prompt is served in its home cell whichever cell
//! received it.

use std::time::{Duration, Instant};

use kvmesh_netsim_tests::Cluster;
use serde_json::json;

/// A prompt of a few hundred tokens: several KV blocks, so it has an affinity key.
fn prompt(i: usize) -> serde_json::Value {
    let text: String = (0..120).map(|w| format!("doc{i} word{w} ")).collect();
    json!({"model": "kvmesh-sim", "max_tokens": 2, "messages": [{"role": "user", "content": text}]})
}

/// (cell that served it, `x-kvmesh-route`).
async fn serve(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> (String, String) {
    let r = client.post(format!("{url}/v1/chat/completions")).json(body).send().await.expect("request");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let served_by = header("x-kvmesh-served-by");
    let route = header("x-kvmesh-route");
    let cell = served_by.chars().next().map(String::from).unwrap_or_default();
    (cell, route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_cell_gossips_alone_and_prompts_are_served_in_their_home_cell() {
    let mut c = Cluster::new("cells");
    let with_cell = |mut cfg: kvmesh_node::Config, cell: &str, gateway: bool| {
        cfg.cells.name = Some(cell.into());
        cfg.cells.gateway = gateway;
        cfg.cells.backbone_interval_ms = 200;
        cfg
    };
    let cfg = with_cell(c.config("a0"), "a", true);
    let a0 = c.start(cfg).await;
    let a0_addr = c.node(a0).mesh.as_ref().expect("mesh").advertise.to_string();
    let cfg = with_cell(c.config("a1"), "a", false);
    c.start(cfg).await;
    let mut cfg = with_cell(c.config("b0"), "b", true);
    cfg.seeds = Vec::new();
    cfg.cells.backbone_seeds = vec![a0_addr];
    let b0 = c.start(cfg).await;
    let b0_addr = c.node(b0).mesh.as_ref().expect("mesh").advertise.to_string();
    let mut cfg = with_cell(c.config("b1"), "b", false);
    cfg.seeds = vec![b0_addr];
    c.start(cfg).await;

    // Each cell sees only itself; every node, gateway or not, has both cells in its table.
    let t = Instant::now();
    loop {
        let views = c.views();
        let tables: Vec<usize> = c.live().map(|n| n.mesh.as_ref().map_or(0, |m| m.cells().len())).collect();
        let members_known = c.live().all(|n| {
            n.mesh
                .as_ref()
                .is_some_and(|m| m.cells().iter().all(|cell| cell.members.len() == 2 && cell.report.engines == 2))
        });
        if views == [vec!["a0", "a1"], vec!["a0", "a1"], vec!["b0", "b1"], vec!["b0", "b1"]]
            && tables == [2; 4]
            && members_known
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "views {views:?}, tables {tables:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = reqwest::Client::new();
    let url = |i: usize| format!("http://{}", c.node(i).http_addr);
    let (mut here, mut relayed) = (0, 0);
    for i in 0..24 {
        // Sent to a plain member of cell a, then to one of cell b: the same home either way.
        let (from_a, route_a) = serve(&client, &url(1), &prompt(i)).await;
        let (from_b, route_b) = serve(&client, &url(3), &prompt(i)).await;
        assert_eq!(from_a, from_b, "prompt {i}: served in cell {from_a} from a, {from_b} from b");
        if from_a == "b" {
            relayed += 1;
            assert!(route_a.contains("cell=b") && route_a.contains("reason=cell_home"), "{route_a}");
            assert!(!route_b.contains("cell_home"), "served at home without a relay: {route_b}");
        } else {
            here += 1;
            assert!(route_b.contains("cell=a") && route_b.contains("reason=cell_home"), "{route_b}");
        }
    }
    eprintln!("{here} prompts at home in cell a, {relayed} in cell b");
    // Rendezvous hashing spreads homes over both cells (24 all in one: 2^-23).
    assert!(here > 0 && relayed > 0, "{here} served in a, {relayed} in b");
    c.shutdown().await;
}
