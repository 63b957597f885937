//! A mesh split into two cells (`policy::cells`): each cell gossips on its own, the gateways
//! carry the cells table between them, and a prompt is served in its home cell whichever cell
//! received it: the origin asks the prompt's home node there for a placement and forwards the
//! request straight to the engine it names.

use std::time::{Duration, Instant};

use kvmesh_netsim_tests::Cluster;
use kvmesh_transport::{PlaceQuery, Placement, PromptDigest, RequestHead};
use serde_json::json;

/// A prompt of a few hundred tokens: several KV blocks, so it has an affinity key.
fn prompt(i: usize) -> serde_json::Value {
    let text: String = (0..120).map(|w| format!("doc{i} word{w} ")).collect();
    json!({"model": "kvmesh-sim", "max_tokens": 2, "messages": [{"role": "user", "content": text}]})
}

/// (`node/engine` that served it, `x-kvmesh-route`).
async fn serve(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> (String, String) {
    let r = client.post(format!("{url}/v1/chat/completions")).json(body).send().await.expect("request");
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let header = |n: &str| r.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    (header("x-kvmesh-served-by"), header("x-kvmesh-route"))
}

/// The sum of a counter's series that start with `series` in a node's `/metrics`.
async fn counter(client: &reqwest::Client, url: &str, series: &str) -> f64 {
    let text = client.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// `field=value` out of an `x-kvmesh-route` header.
fn field<'a>(route: &'a str, name: &str) -> Option<&'a str> {
    route.split("; ").find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
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
    let urls: Vec<String> = (0..4).map(|i| format!("http://{}", c.node(i).http_addr)).collect();
    let url = |i: usize| urls[i].clone();
    let placed = r#"kvmesh_route_decisions_total{reason="cell_place""#;
    let placed_before = counter(&client, &url(0), placed).await
        + counter(&client, &url(1), placed).await
        + counter(&client, &url(2), placed).await
        + counter(&client, &url(3), placed).await;
    let (mut here, mut there) = (0, 0);
    // Prompts of cell b whose home node is b1, as a1 sees them.
    let mut homed_at_b1 = Vec::new();
    for i in 0..24 {
        // Sent to a plain member of cell a, then to one of cell b: the same home either way.
        let (by_a, route_a) = serve(&client, &url(1), &prompt(i)).await;
        let (by_b, route_b) = serve(&client, &url(3), &prompt(i)).await;
        let (cell_a, cell_b) = (&by_a[..1], &by_b[..1]);
        assert_eq!(cell_a, cell_b, "prompt {i}: served in cell {cell_a} from a, {cell_b} from b");
        // The request from the other cell carries the home node's placement in its route, and
        // went straight to the engine that placement named.
        let (away, home_route) = if cell_a == "b" { (&route_a, &route_b) } else { (&route_b, &route_a) };
        let served = if cell_a == "b" { &by_a } else { &by_b };
        assert_eq!(field(away, "cell"), Some(cell_a), "{away}");
        assert_eq!(field(away, "reason"), Some("cell_home"), "{away}");
        let home = field(away, "home").unwrap_or_else(|| panic!("no home node in {away}"));
        assert!(home.starts_with(cell_a), "{away}");
        assert_eq!(field(away, "engine"), Some(served.as_str()), "placed engine serves: {away}");
        assert!(!home_route.contains("cell_home"), "served at home without the home cell's detour: {home_route}");
        if cell_a == "b" && home == "b1" {
            homed_at_b1.push(i);
        }
        if cell_a == "a" {
            here += 1;
        } else {
            there += 1;
        }
    }
    eprintln!("{here} prompts at home in cell a, {there} in cell b");
    // Rendezvous hashing spreads homes over both cells (24 all in one: 2^-23).
    assert!(here > 0 && there > 0, "{here} served in a, {there} in b");
    let placed_after = counter(&client, &url(0), placed).await
        + counter(&client, &url(1), placed).await
        + counter(&client, &url(2), placed).await
        + counter(&client, &url(3), placed).await;
    assert_eq!(placed_after - placed_before, 24.0, "one placement per request sent to the other cell");

    // A placement query the home node cannot answer is refused as retryable: nothing ran.
    let b0_mesh = c.node(2).mesh.as_ref().expect("mesh");
    let a1_mesh = c.node(1).mesh.as_ref().expect("mesh");
    let query = RequestHead {
        path: "/v1/chat/completions".into(),
        request_id: "bad-placement".into(),
        origin: "a1".into(),
        place: Some(PlaceQuery { model: "kvmesh-sim".into() }),
        ..Default::default()
    };
    let (head, _) =
        a1_mesh.endpoint.request(b0_mesh.advertise, &query, &[], Duration::from_secs(5)).await.expect("answered");
    assert_eq!((head.status, head.retryable), (400, true), "no block keys: {head:?}");
    let query = RequestHead { prompt: PromptDigest::new(300, 16, &[1, 2, 3]), ..query };
    let (head, mut recv) =
        a1_mesh.endpoint.request(b0_mesh.advertise, &query, &[], Duration::from_secs(5)).await.expect("answered");
    assert_eq!(head.status, 200, "{head:?}");
    let answer: Placement = serde_json::from_slice(&recv.read_to_end(4096).await.expect("body")).expect("placement");
    match answer {
        Placement::Engine { node, engine, .. } => {
            assert!(node.starts_with('b') && !engine.is_empty(), "placed in cell b: {node}/{engine}")
        }
        Placement::Relay => panic!("no P/D engines here, so no split"),
    }

    // b1, home node of some prompts, dies without a word. Each of them is still served: the
    // first placement asked of b1 fails (its dial times out after 2 s, the endpoint's connect
    // timeout) and that request is routed in cell a; from then on a1 suspects b1 and asks
    // b1's successor in rendezvous order, b0 (measured: 2.0 s, then 4-5 ms each).
    assert!(!homed_at_b1.is_empty(), "rendezvous over 2 members left b1 no prompt of 15");
    c.kill(3).await;
    let t = Instant::now();
    let mut routes = Vec::new();
    for &i in &homed_at_b1 {
        routes.push(serve(&client, &url(1), &prompt(i)).await.1);
    }
    assert!(t.elapsed() < Duration::from_secs(10), "{:?} for {} prompts", t.elapsed(), routes.len());
    assert!(routes.iter().all(|r| field(r, "home") != Some("b1")), "placed by a dead node: {routes:?}");
    if routes.len() > 1 {
        assert!(routes[1..].iter().any(|r| field(r, "home") == Some("b0")), "b0 took over: {routes:?}");
    }
    c.shutdown().await;
}

/// Polls `done` every 50 ms until it holds; panics with `what()` after `limit`.
async fn until(limit: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "after {limit:?}: {}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elected_gateways_follow_their_cells_members() {
    let mut c = Cluster::new("cells-elect");
    // No gateway set by hand: each cell elects one, its smallest node id. Every node carries
    // backbone seeds; the first node's point to nothing yet (it is alone on the backbone until
    // cell b's gateway joins through it).
    let node = |c: &Cluster, name: &str, seeds: Vec<String>, backbone: Vec<String>| {
        let mut cfg = c.config(name);
        cfg.cells.name = Some(name[..1].into());
        cfg.cells.elected_gateways = 1;
        cfg.cells.backbone_interval_ms = 200;
        cfg.cells.backbone_seeds = backbone;
        if !seeds.is_empty() {
            cfg.seeds = seeds;
        }
        cfg
    };
    let cfg = node(&c, "a0", vec![], vec!["127.0.0.1:9".into()]);
    let a0 = c.start(cfg).await;
    let a0_addr = c.node(a0).mesh.as_ref().expect("mesh").advertise.to_string();
    for name in ["a1", "a2"] {
        let cfg = node(&c, name, vec![], vec![a0_addr.clone()]);
        c.start(cfg).await;
    }
    let cfg = node(&c, "b0", vec!["127.0.0.1:9".into()], vec![a0_addr.clone()]);
    let b0 = c.start(cfg).await;
    let b0_addr = c.node(b0).mesh.as_ref().expect("mesh").advertise.to_string();
    for name in ["b1", "b2"] {
        let cfg = node(&c, name, vec![b0_addr.clone()], vec![a0_addr.clone()]);
        c.start(cfg).await;
    }
    let gateways = |c: &Cluster| -> Vec<String> {
        c.live().filter(|n| n.mesh.as_ref().is_some_and(|m| m.is_gateway())).map(|n| n.node_name.clone()).collect()
    };
    // Every live node's table lists both cells with the given members of cell b.
    let tables_show = |c: &Cluster, b_members: &[&str]| {
        c.live().all(|n| {
            let t = n.mesh.as_ref().map(|m| m.cells()).unwrap_or_default();
            t.len() == 2
                && t.iter().any(|cell| {
                    cell.report.name == "b"
                        && cell.members.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>() == b_members
                })
        })
    };
    let state = |c: &Cluster| format!("gateways {:?}, views {:?}", gateways(c), c.views());
    until(
        Duration::from_secs(15),
        || gateways(&c) == ["a0", "b0"] && tables_show(&c, &["b0", "b1", "b2"]),
        || state(&c),
    )
    .await;

    // b0, cell b's gateway, dies: b1 is elected, joins the backbone (through a0), and cell a's
    // tables follow: cell b without b0.
    let killed = Instant::now();
    c.kill(b0).await;
    until(Duration::from_secs(15), || gateways(&c) == ["a0", "b1"] && tables_show(&c, &["b1", "b2"]), || state(&c))
        .await;
    let took = killed.elapsed();
    eprintln!("b1 took over as cell b's gateway, and every table showed it, {took:?} after b0 died");
    // The status API says so too.
    let status: serde_json::Value = reqwest::get(format!("http://{}/v1/mesh/status", c.node(4).http_addr))
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!((&status["cells"]["cell"], &status["cells"]["gateway"]), (&json!("b"), &json!(true)), "{status}");
    assert_eq!(status["cells"]["table"].as_array().map(Vec::len), Some(2), "{status}");
    // A prompt homed in cell b, sent to cell a, is still served there.
    let client = reqwest::Client::new();
    let url = format!("http://{}", c.node(1).http_addr);
    let mut served_in_b = 0;
    for i in 0..12 {
        let (by, route) = serve(&client, &url, &prompt(i)).await;
        if route.contains("cell=b") {
            assert!(by.starts_with('b'), "{by}: {route}");
            served_in_b += 1;
        }
    }
    assert!(served_in_b > 0, "no prompt of 12 homed in cell b");

    // b0 comes back (a new process): elected again, and b1 steps down from the backbone.
    let cfg = node(&c, "b0", vec![c.node(4).mesh.as_ref().expect("mesh").advertise.to_string()], vec![a0_addr]);
    c.restart(b0, cfg).await;
    until(
        Duration::from_secs(15),
        || gateways(&c) == ["a0", "b0"] && tables_show(&c, &["b0", "b1", "b2"]),
        || state(&c),
    )
    .await;
    c.shutdown().await;
}
