//! Meshes of real nodes in one process on loopback: real QUIC, mutual TLS, gossip and engine
//! simulators.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmesh_netsim_tests::Cluster;
use serde_json::json;

fn chat(i: usize, stream: bool, max_tokens: u32) -> serde_json::Value {
    json!({"model": "kvmesh-sim", "stream": stream, "max_tokens": max_tokens, "ignore_eos": true,
           "messages": [{"role": "user", "content": format!("mesh request {i}")}]})
}

/// Outcome of one request as the client saw it.
#[derive(Debug)]
struct Seen {
    status: u16,
    served_by: String,
    /// Data events received before any error event.
    data_events: usize,
    error: Option<String>,
}

async fn send(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Seen {
    let r = match client.post(format!("{url}/v1/chat/completions")).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Seen { status: 0, served_by: String::new(), data_events: 0, error: Some(e.to_string()) },
    };
    let status = r.status().as_u16();
    let served_by = r.headers().get("x-kvmesh-served-by").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let text = match r.text().await {
        Ok(t) => t,
        Err(e) => return Seen { status, served_by, data_events: 0, error: Some(format!("body: {e}")) },
    };
    if body["stream"] == true {
        let mut data_events = 0;
        for ev in text.split("\n\n").filter_map(|e| e.trim_start_matches('\n').strip_prefix("data: ")) {
            if ev.contains("\"error\"") {
                return Seen { status, served_by, data_events, error: Some(ev.to_owned()) };
            }
            if ev != "[DONE]" {
                data_events += 1;
            }
        }
        Seen { status, served_by, data_events, error: None }
    } else {
        let error = (status != 200).then_some(text);
        Seen { status, served_by, data_events: 0, error }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_and_ten_nodes_converge_and_share_load() {
    for n in [3usize, 10] {
        let cluster = Cluster::with_nodes(&format!("converge-{n}"), n).await;
        let took = cluster.converge(Duration::from_secs(3)).await;
        eprintln!("{n} nodes: full membership after {took:?}");
        // Every node sees every other node's engine and its load report.
        let t = Instant::now();
        loop {
            let complete = cluster.live().all(|node| {
                let peers = node.mesh.as_ref().unwrap().peers();
                peers.len() == n && peers.iter().all(|p| p.load.engines.len() == 1 && p.load.engines[0].healthy)
            });
            if complete {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(3), "load reports did not reach every node");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_across_the_mesh_and_edges_only_route() {
    let mut cluster = Cluster::with_nodes("serve", 3).await;
    let mut edge = cluster.config("edge");
    edge.role = kvmesh_node::config::NodeRole::Edge;
    let e = cluster.start(edge).await;
    assert!(cluster.node(e).embedded.is_none(), "an edge node never starts the embedded engine");
    cluster.converge(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // load reports with healthy engines

    let client = reqwest::Client::new();
    for entry in [0, e] {
        let url = cluster.node(entry).url();
        let burst: Vec<_> = (0..9).map(|i| chat(i, i % 2 == 0, 40)).collect();
        let seen = futures::future::join_all(burst.iter().map(|b| send(&client, &url, b))).await;
        let mut servers = HashSet::new();
        for s in &seen {
            assert_eq!(s.status, 200, "{s:?}");
            assert!(s.error.is_none(), "{s:?}");
            servers.insert(s.served_by.split('/').next().unwrap().to_owned());
        }
        assert!(!servers.contains("edge"), "edge nodes run no engine: {servers:?}");
        assert!(servers.len() >= 2, "a burst into {} stayed on {servers:?}", cluster.node(entry).node_name);
    }
    let models: serde_json::Value =
        client.get(format!("{}/v1/models", cluster.node(e).url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "kvmesh-sim", "an edge node lists its peers' models");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_loses_no_request_that_had_not_started_streaming() {
    let mut cluster = kvmesh_netsim_tests::Cluster::new("kill");
    for i in 0..3 {
        let mut cfg = cluster.config(&format!("n{i}"));
        cfg.embedded.time_scale = 0.2; // ~70 ms per request: some are in flight on n2 when it dies
        cluster.start(cfg).await;
    }
    cluster.converge(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let urls = [cluster.node(0).url(), cluster.node(1).url()];
    let clients: Vec<_> = (0..6)
        .map(|w| {
            let (stop, url) = (stop.clone(), urls[w % 2].clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut seen = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    seen.push(send(&client, &url, &chat(w * 1000 + i, i % 2 == 0, 50)).await);
                    i += 1;
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    cluster.kill(2).await;
    let killed_at = Instant::now();
    let gone = cluster.converge(Duration::from_secs(3)).await;
    eprintln!("killed node left every view after {:?}", killed_at.elapsed().max(gone));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut on_n2 = 0;
    for c in clients {
        for s in c.await.unwrap() {
            total += 1;
            on_n2 += s.served_by.starts_with("n2/") as usize;
            if s.error.is_some() {
                assert!(s.data_events > 0, "a request failed before it started streaming: {s:?}");
            }
        }
    }
    eprintln!("{total} requests, {on_n2} served by n2");
    assert!(total > 30 && on_n2 > 0, "traffic must have reached the node that died");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificate_cannot_join_nor_send() {
    let cluster = Cluster::with_nodes("home", 2).await;
    cluster.converge(Duration::from_secs(3)).await;
    // Same cluster id and a seed pointing at the mesh, but certificates from another CA.
    let mut foreign = Cluster::new("home");
    let mut cfg = foreign.config("intruder");
    cfg.seeds = vec![cluster.node(0).mesh.as_ref().unwrap().advertise.to_string()];
    let i = foreign.start(cfg).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(cluster.views(), vec![vec!["n0".to_string(), "n1".into()]; 2]);
    assert_eq!(foreign.views(), vec![vec!["intruder".to_string()]]);
    let head = kvmesh_transport::RequestHead {
        path: "/v1/chat/completions".into(),
        request_id: "x".into(),
        origin: "intruder".into(),
        engine: "embedded-sim".into(),
        stream: false,
        prompt: None,
        ..Default::default()
    };
    let target = cluster.node(0).mesh.as_ref().unwrap().advertise;
    let body = serde_json::to_vec(&chat(0, false, 2)).unwrap();
    let endpoint = &foreign.node(i).mesh.as_ref().unwrap().endpoint;
    assert!(endpoint.request(target, &head, &body, Duration::from_secs(2)).await.is_err());
    let refused = cluster.node(0).mesh.as_ref().unwrap().endpoint.stats.refused_connections.load(Ordering::Relaxed);
    assert!(refused > 0, "the refusal is counted (and logged)");
    foreign.shutdown().await;
    cluster.shutdown().await;
}

/// A member speaks only for itself: a forwarded request naming another origin than the node its
/// certificate names is refused (403), and a node whose certificate is for another name does not
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_speak_for_another_node() {
    let cluster = Cluster::with_nodes("identity", 2).await;
    cluster.converge(Duration::from_secs(3)).await;
    let head = |origin: &str| kvmesh_transport::RequestHead {
        path: "/v1/chat/completions".into(),
        request_id: "x".into(),
        origin: origin.into(),
        engine: "embedded-sim".into(),
        stream: false,
        prompt: None,
        ..Default::default()
    };
    let target = cluster.node(0).mesh.as_ref().unwrap().advertise;
    let body = serde_json::to_vec(&chat(0, false, 2)).unwrap();
    let n1 = &cluster.node(1).mesh.as_ref().unwrap().endpoint;
    let (h, _) = n1.request(target, &head("n1"), &body, Duration::from_secs(5)).await.unwrap();
    assert_eq!(h.status, 200, "n1 speaking as itself");
    let (h, _) = n1.request(target, &head("n0"), &body, Duration::from_secs(5)).await.unwrap();
    assert_eq!(h.status, 403, "n1 claiming to be another node");
    // n1's certificate under another node name: refused at start, with what to do.
    let mut cfg = cluster.config("n1");
    let (ca, cert, key) = cfg.tls_paths().unwrap();
    (cfg.ca, cfg.cert, cfg.key, cfg.tls_dir) = (Some(ca), Some(cert), Some(key), None);
    cfg.node_name = "impostor".into();
    let err = kvmesh_node::Node::start(cfg, &tokio_util::sync::CancellationToken::new()).await.err().expect("refused");
    assert!(err.to_string().contains("is for node `n1`, but node_name is `impostor`"), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_rejoins_with_a_new_generation() {
    let mut cluster = Cluster::with_nodes("restart", 3).await;
    cluster.converge(Duration::from_secs(3)).await;
    let old = cluster.node(2).mesh.as_ref().unwrap().membership.generation();
    cluster.kill(2).await;
    cluster.converge(Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_millis(5)).await; // generations are start times in ms
    let cfg = cluster.config("n2");
    cluster.start(cfg).await;
    cluster.converge(Duration::from_secs(3)).await;
    for node in cluster.live() {
        let peers = node.mesh.as_ref().unwrap().peers();
        let n2: Vec<_> = peers.iter().filter(|p| p.node_id == "n2").collect();
        assert_eq!(n2.len(), 1);
        assert!(n2[0].generation > old, "stale generation still visible on {}", node.node_name);
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_prefix_on_a_peer_draws_its_requests() {
    let cluster = Cluster::with_nodes("prefix", 3).await;
    cluster.converge(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let client = reqwest::Client::new();
    for doc in 0..3 {
        let body = json!({"model": "kvmesh-sim", "max_tokens": 1,
                          "messages": [{"role": "user", "content": format!("shared document {doc} ").repeat(150)}]});
        let first = send(&client, &cluster.node(doc % 3).url(), &body).await;
        assert_eq!(first.status, 200, "{first:?}");
        let holder = first.served_by.split('/').next().unwrap().to_owned();
        // Every other node learns of the holder's new blocks through its gossiped summary
        // (published within 200 ms here, then spread by gossip).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        for entry in 0..3 {
            let r = client
                .post(format!("{}/v1/chat/completions", cluster.node(entry).url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            let route = r.headers()["x-kvmesh-route"].to_str().unwrap().to_owned();
            let served = r.headers()["x-kvmesh-served-by"].to_str().unwrap().to_owned();
            r.bytes().await.unwrap();
            assert!(
                served.starts_with(&format!("{holder}/")),
                "n{entry} sent doc {doc} to {served}, not {holder}: {route}"
            );
            assert!(route.contains("reason=prefix") && !route.contains("matched_blocks=0"), "{route}");
        }
    }
    cluster.shutdown().await;
}

/// Sum of a metric's samples whose labels contain `label`, from a node's `/metrics`.
async fn metric(url: &str, name: &str, label: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_prompt_is_not_tokenized_again() {
    // n1 runs two engines, so a request routed to it for a cached prefix leaves the engine
    // choice to n1's exact indexes: n0 sends the block keys along instead of n1 re-tokenizing.
    let mut cluster = Cluster::new("once");
    // n0 is an edge node: every request it takes goes to n1's engines.
    let mut edge = cluster.config("n0");
    edge.role = kvmesh_node::config::NodeRole::Edge;
    edge.embedded_engine = false;
    cluster.start(edge).await;
    let mut cfg = cluster.config("n1");
    let mut engines = Vec::new();
    for name in ["first", "second"] {
        let e = kvmesh_sim::EngineSim::start(
            kvmesh_netsim_tests::fast_engine(),
            "127.0.0.1:0",
            Some("tcp://127.0.0.1:0"),
            &tokio_util::sync::CancellationToken::new(),
        )
        .await
        .unwrap();
        cfg.engines.push(kvmesh_node::config::EngineEntry {
            name: Some(name.into()),
            kv_events: e.kv_events_endpoint.clone(),
            ..kvmesh_node::config::EngineEntry::new(e.url())
        });
        engines.push(e);
    }
    cluster.start(cfg).await;
    cluster.converge(Duration::from_secs(3)).await;
    let client = reqwest::Client::new();
    let (n0, n1) = (cluster.node(0).url(), cluster.node(1).url());
    let body = json!({"model": "kvmesh-sim", "max_tokens": 1,
                      "messages": [{"role": "user", "content": "a long shared document ".repeat(200)}]});
    let warm = send(&client, &n1, &body).await;
    assert_eq!(warm.status, 200, "{warm:?}");
    assert!(warm.served_by.starts_with("n1/"), "{warm:?}");
    let tokenized = |url: String| async move { metric(&url, "kvmesh_tokenize_requests_total", "tokenized").await };
    let (n0_before, n1_before) = (tokenized(n0.clone()).await, tokenized(n1.clone()).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = client.post(format!("{n0}/v1/chat/completions")).json(&body).send().await.unwrap();
    let route = r.headers()["x-kvmesh-route"].to_str().unwrap().to_owned();
    let served = r.headers()["x-kvmesh-served-by"].to_str().unwrap().to_owned();
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    assert!(route.contains("reason=prefix"), "{route}");
    // n1 chose, from n0's keys, the engine that holds the prefix.
    assert_eq!(served, warm.served_by, "{route}");
    assert_eq!(tokenized(n0.clone()).await, n0_before + 1.0);
    assert_eq!(tokenized(n1.clone()).await, n1_before, "n1 tokenized a forwarded prompt again");
    let text = reqwest::get(format!("{n1}/metrics")).await.unwrap().text().await.unwrap();
    let lines: Vec<_> = text.lines().filter(|l| l.starts_with("kvmesh_tokenize_requests_total")).collect();
    assert_eq!(metric(&n1, "kvmesh_tokenize_requests_total", "from_peer").await, 1.0, "{route} {lines:?}");
    cluster.shutdown().await;
    for e in engines {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_is_prefilled_on_one_peer_and_decoded_on_another() {
    // Three nodes: an edge that takes the request, a prefill node and a decode node. Both hops
    // cross the mesh over QUIC.
    let mut cluster = Cluster::new("pd");
    let mut edge = cluster.config("edge");
    edge.role = kvmesh_node::config::NodeRole::Edge;
    edge.embedded_engine = false;
    edge.pd.min_uncached_tokens = 256;
    cluster.start(edge).await;
    for (name, role) in [("p", kvmesh_policy::pd::Role::Prefill), ("d", kvmesh_policy::pd::Role::Decode)] {
        let mut cfg = cluster.config(name);
        cfg.embedded_role = role;
        cluster.start(cfg).await;
    }
    cluster.converge(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_millis(600)).await; // roles and load in gossip
    let client = reqwest::Client::new();
    let body = |stream: bool| {
        json!({"model": "kvmesh-sim", "max_tokens": 10, "ignore_eos": true, "seed": 5, "stream": stream,
               "messages": [{"role": "user", "content": "an uncached report to summarise ".repeat(80)}]})
    };
    let r =
        client.post(format!("{}/v1/chat/completions", cluster.node(0).url())).json(&body(false)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let route = r.headers()["x-kvmesh-route"].to_str().unwrap().to_owned();
    let served = r.headers()["x-kvmesh-served-by"].to_str().unwrap().to_owned();
    let split: serde_json::Value = r.json().await.unwrap();
    assert!(route.contains("reason=pd") && route.contains("prefill=p/"), "{route}");
    assert!(served.starts_with("d/"), "{served}");
    assert_eq!(split["usage"]["completion_tokens"], 10, "{split}");
    // Served whole by the decode node's engine, the same request gives the same answer.
    let whole: serde_json::Value = client
        .post(format!("{}/v1/chat/completions", cluster.node(2).embedded.as_ref().unwrap().url()))
        .json(&body(false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(split["choices"][0]["message"]["content"], whole["choices"][0]["message"]["content"]);
    // Streamed across the mesh, to the end.
    let seen = send(&client, &cluster.node(0).url(), &body(true)).await;
    assert_eq!((seen.status, seen.error.as_deref()), (200, None), "{seen:?}");
    assert!(seen.data_events >= 10, "{seen:?}"); // at least one event per token
    cluster.shutdown().await;
}
