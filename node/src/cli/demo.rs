//! `kvmesh demo`: a local mesh of nodes with simulated engines, in one process, on loopback.
//! It makes a throwaway CA and node certificates, joins every node through the first one,
//! sends a burst of requests and prints which node served each, then keeps serving until
//! Ctrl-C.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use kvmesh_node::config::Config;
use kvmesh_node::NodeError;
use kvmesh_node::{Node, RunningNode};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Nodes in the mesh.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// HTTP port of the first node; the others take the next ones.
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// QUIC port of the first node; the others take the next ones.
    #[arg(long, default_value_t = 7946)]
    pub quic_port: u16,
    /// Requests in the opening burst, all sent to the first node.
    #[arg(long, default_value_t = 6)]
    pub requests: usize,
    /// Exit after the burst instead of serving until Ctrl-C.
    #[arg(long)]
    pub once: bool,
}

pub async fn run(a: DemoArgs, cancel: CancellationToken) -> Result<(), NodeError> {
    if a.nodes == 0 {
        return Err(NodeError::Config("--nodes must be at least 1".into()));
    }
    let dir = tempfile::tempdir().map_err(|e| NodeError::Config(format!("temp dir: {e}")))?;
    let mesh_err = |e: kvmesh_transport::TransportError| NodeError::Mesh(e.to_string());
    kvmesh_transport::certs::create_ca(dir.path(), "demo").map_err(mesh_err)?;
    let mut nodes: Vec<RunningNode> = Vec::new();
    for i in 0..a.nodes {
        let name = format!("node-{i}");
        kvmesh_transport::certs::create_node(dir.path(), dir.path(), &name).map_err(mesh_err)?;
        let cfg = Config {
            node_name: name,
            http_addr: format!("127.0.0.1:{}", a.http_port as usize + i),
            quic_addr: format!("127.0.0.1:{}", a.quic_port as usize + i),
            seeds: if i == 0 { vec![] } else { vec![format!("127.0.0.1:{}", a.quic_port)] },
            tls_dir: Some(dir.path().to_path_buf()),
            cluster_id: "kvmesh-demo".into(),
            ..Config::default()
        };
        nodes.push(Node::start(cfg, &cancel).await?);
    }
    let t = Instant::now();
    while !nodes.iter().all(|n| n.mesh.as_ref().is_some_and(|m| m.peers().len() == a.nodes)) {
        if t.elapsed() > Duration::from_secs(15) {
            return Err(NodeError::Mesh("nodes did not all see each other within 15 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Engine load reaches peers with the next publish; routing across the mesh needs it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    println!(
        "\nkvmesh demo: {} nodes joined in {:.1} s (mutual TLS over QUIC, gossip via node-0)\n",
        a.nodes,
        t.elapsed().as_secs_f64()
    );
    for n in &nodes {
        println!("  {:<8} OpenAI API at {}/v1", n.node_name, n.url());
    }
    println!("\nA burst of {} concurrent requests, all sent to node-0:", a.requests);
    let client = reqwest::Client::new();
    let target = nodes[0].url();
    let burst = (0..a.requests).map(|i| {
        let (client, url) = (client.clone(), format!("{target}/v1/chat/completions"));
        async move {
            let body = json!({"model": "kvmesh-sim", "max_tokens": 64, "ignore_eos": true,
                              "messages": [{"role": "user", "content": format!("Demo question number {i}")}]});
            let t = Instant::now();
            let r = client.post(url).json(&body).send().await.map_err(|e| e.to_string())?;
            let served = r.headers().get("x-kvmesh-served-by").and_then(|v| v.to_str().ok()).unwrap_or("?").to_owned();
            let status = r.status();
            r.bytes().await.map_err(|e| e.to_string())?;
            Ok::<_, String>((i, status, served, t.elapsed()))
        }
    });
    for r in futures::future::join_all(burst).await {
        match r {
            Ok((i, status, served, took)) => {
                println!("  request {i}: {status} served by {served:<22} in {:>4} ms", took.as_millis())
            }
            Err(e) => println!("  request failed: {e}"),
        }
    }
    println!("\nTry it yourself (the x-kvmesh-served-by header names the serving node):");
    println!("  curl -si {target}/v1/chat/completions -H 'content-type: application/json' \\");
    println!("    -d '{{\"model\":\"kvmesh-sim\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'");
    println!("  cargo run --release -- peers --url {target}");
    if !a.once {
        println!("\nServing until Ctrl-C.");
        cancel.cancelled().await;
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}
