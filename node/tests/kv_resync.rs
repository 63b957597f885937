//! KV-event resync from the engine's replay socket (vLLM's `replay_endpoint`), end to end: a
//! real simulator with a replay ROUTER socket, a real node subscribed to it, and batches lost
//! between them (the subscriber's test hook discards them as ZeroMQ would drop them in
//! transit). The node's index is checked against the engine's own cache, not its event stream.

mod common;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use kvmesh_node::config::EngineEntry;
use kvmesh_node::RunningNode;
use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A small cache (64 blocks of 16 tokens), so the lost batches hold evictions as well as
/// stores: an index that missed them would claim blocks the engine no longer has.
async fn engine_with_replay(buffer_steps: usize) -> RunningEngine {
    let cfg = EngineConfig {
        time_scale: 0.02,
        num_gpu_blocks: 64,
        kv_events_buffer_steps: buffer_steps,
        ..EngineConfig::default()
    };
    let loopback = Some("tcp://127.0.0.1:0");
    EngineSim::start_with_replay(cfg, "127.0.0.1:0", loopback, loopback, &CancellationToken::new()).await.unwrap()
}

async fn node_for(e: &RunningEngine) -> RunningNode {
    node(node_config(vec![EngineEntry {
        name: Some("gpu0".into()),
        kv_events: e.kv_events_endpoint.clone(),
        kv_events_replay: e.kv_events_replay_endpoint.clone(),
        ..EngineEntry::new(e.url())
    }]))
    .await
}

/// The engine's cached blocks and the node's index of them, both as engine hashes.
async fn both_views(n: &RunningNode, e: &RunningEngine) -> (HashSet<u64>, HashSet<u64>) {
    let truth: HashSet<u64> = e.cached_block_hashes().await.unwrap().into_iter().collect();
    let index = n.engines.engines[0].kv.index.read().unwrap();
    let got: HashSet<u64> = index.engine_hashes().collect();
    assert_eq!(index.len(), got.len(), "one kvmesh key per engine block");
    (truth, got)
}

/// `kvmesh_kv_resync_total{engine="gpu0",outcome=...}` from the node's `/metrics`.
async fn resync_metric(n: &RunningNode, outcome: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", n.url())).await.unwrap().text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("kvmesh_kv_resync_total{")
                && l.contains("engine=\"gpu0\"")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .unwrap_or_else(|| panic!("no kvmesh_kv_resync_total series for {outcome} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

async fn ask(n: &RunningNode, i: usize) {
    // About 300 tokens: 18+ blocks, so four prompts overflow the 64-block cache.
    let (s, _, v) = post(&n.url(), &chat(&format!("prompt {i} ").repeat(100), json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200, "{v}");
}

/// Sends prompts until the subscriber is in step with the engine.
async fn warm_up(n: &RunningNode, e: &RunningEngine) {
    let mut i = 1000;
    eventually("the node's index matches the engine", Duration::from_secs(10), async || {
        i += 1;
        ask(n, i).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (truth, got) = both_views(n, e).await;
        !truth.is_empty() && truth == got
    })
    .await;
}

/// Makes the subscriber lose `lost` batches, then sends one more request whose batch reveals
/// the gap.
async fn lose_batches(n: &RunningNode, lost: u64) {
    let kv = &n.engines.engines[0].kv;
    kv.drop_incoming.store(lost, Ordering::Relaxed);
    let mut i = 0;
    eventually("the lost batches were published", Duration::from_secs(10), async || {
        i += 1;
        ask(n, i).await;
        kv.drop_incoming.load(Ordering::Relaxed) == 0
    })
    .await;
    ask(n, 999).await;
}

#[tokio::test]
async fn lost_batches_are_replayed_and_the_index_stays_exact() {
    let e = engine_with_replay(10_000).await;
    let n = node_for(&e).await;
    warm_up(&n, &e).await;
    let kv = &n.engines.engines[0].kv;

    lose_batches(&n, 5).await;
    eventually("the gap is replayed", Duration::from_secs(5), async || kv.resync_replayed.load(Ordering::Relaxed) == 1)
        .await;
    assert_eq!(kv.resync_dropped.load(Ordering::Relaxed), 0, "the index was not dropped");
    // Exactly the engine's cache: the stores and the evictions of the lost batches both applied.
    eventually("index equals the engine's cached set", Duration::from_secs(5), async || {
        let (truth, got) = both_views(&n, &e).await;
        truth == got
    })
    .await;
    let (truth, _) = both_views(&n, &e).await;
    assert!(truth.len() > 30, "the cache is nearly full, so evictions happened: {}", truth.len());

    // Requests keep flowing in order afterwards.
    ask(&n, 2000).await;
    eventually("still in step", Duration::from_secs(5), async || {
        let (truth, got) = both_views(&n, &e).await;
        truth == got
    })
    .await;
    assert_eq!(resync_metric(&n, "replayed").await, 1.0);
    assert_eq!(resync_metric(&n, "dropped").await, 0.0);
    assert_eq!(scrape(&n.url(), "kvmesh_kv_event_gaps_total").await, 1.0);
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn a_gap_beyond_the_replay_buffer_drops_the_index() {
    // The engine keeps 2 batches; 6 are lost, so the start of the gap is gone.
    let e = engine_with_replay(2).await;
    let n = node_for(&e).await;
    warm_up(&n, &e).await;
    let kv = &n.engines.engines[0].kv;

    lose_batches(&n, 6).await;
    eventually("the gap is dropped", Duration::from_secs(5), async || kv.resync_dropped.load(Ordering::Relaxed) == 1)
        .await;
    assert_eq!(kv.resync_replayed.load(Ordering::Relaxed), 0);
    // Rebuilt from what followed the gap: never a block the engine does not hold.
    let (truth, got) = both_views(&n, &e).await;
    assert!(got.is_subset(&truth), "the index claims blocks the engine evicted");
    assert!(got.len() < truth.len(), "blocks stored before the gap are no longer indexed");
    assert_eq!(resync_metric(&n, "dropped").await, 1.0);
    assert_eq!(resync_metric(&n, "replayed").await, 0.0);
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn an_unanswered_replay_times_out_and_drops_the_index() {
    // A replay socket that never answers: a ROUTER nobody reads.
    use zeromq::Socket;
    let mut silent = zeromq::RouterSocket::new();
    let silent_ep = silent.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let e = engine(fast_engine(), true).await;
    let mut cfg = node_config(vec![EngineEntry {
        name: Some("gpu0".into()),
        kv_events: e.kv_events_endpoint.clone(),
        kv_events_replay: Some(silent_ep),
        ..EngineEntry::new(e.url())
    }]);
    cfg.kv_events_replay_timeout_ms = 200;
    let n = node(cfg).await;
    warm_up(&n, &e).await;
    let kv = &n.engines.engines[0].kv;
    lose_batches(&n, 2).await;
    eventually("the gap is dropped after the timeout", Duration::from_secs(5), async || {
        kv.resync_dropped.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(!kv.resyncing.load(Ordering::Relaxed));
    let (truth, got) = both_views(&n, &e).await;
    assert!(got.is_subset(&truth));
    n.shutdown().await;
    e.shutdown().await;
    drop(silent);
}

/// A KV-event publisher that announces a frame of 2^61 bytes, again on every reconnect: the
/// node does not allocate it (the frame bound cuts the connection first), keeps serving, and
/// counts no events from it.
#[tokio::test]
async fn a_hostile_kv_event_publisher_cannot_abort_the_node() {
    let hostile = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hostile.local_addr().unwrap();
    let publisher = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = hostile.accept().await else { return };
            // A well-formed ZMTP 3.0 PUB peer (greeting, NULL mechanism, READY), then the frame.
            let mut bytes = vec![0xFFu8, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
            let mut mechanism = b"NULL".to_vec();
            mechanism.resize(20, 0);
            bytes.extend_from_slice(&mechanism);
            bytes.push(0);
            bytes.extend_from_slice(&[0u8; 31]);
            let mut ready = b"\x05READY".to_vec();
            ready.push(11);
            ready.extend_from_slice(b"Socket-Type");
            ready.extend_from_slice(&3u32.to_be_bytes());
            ready.extend_from_slice(b"PUB");
            bytes.push(0x04);
            bytes.push(ready.len() as u8);
            bytes.extend_from_slice(&ready);
            bytes.push(0x02);
            bytes.extend_from_slice(&(1u64 << 61).to_be_bytes());
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &bytes).await;
            // Hold the connection: the client reads what it was sent.
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink).await;
            });
        }
    });
    let e = engine(fast_engine(), false).await;
    let mut entry = entry(e.url());
    entry.name = Some("e0".into());
    entry.kv_events = Some(format!("tcp://{addr}"));
    let n = node(node_config(vec![entry])).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    for i in 0..3 {
        let (s, _, v) =
            post(&n.url(), &chat(&format!("still serving {i}"), serde_json::json!({"max_tokens": 2}))).await;
        assert_eq!(s, 200, "{v}");
    }
    publisher.abort();
    n.shutdown().await;
}
