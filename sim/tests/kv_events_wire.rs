//! KV events read by a subscriber written here from vLLM's wire description (ZeroMQ SUB,
//! three frames, msgpack arrays), independent of the simulator's encoder and of kvmesh's
//! decoder in `node`.

use std::time::Duration;

use kvmesh_sim::{EngineConfig, EngineSim};
use rmpv::Value;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv};

struct Msg {
    topic: Vec<u8>,
    seq: u64,
    events: Vec<Value>,
}

async fn recv(sub: &mut zeromq::SubSocket) -> Msg {
    let m = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("no event within 5 s").unwrap();
    let frames = m.into_vec();
    assert_eq!(frames.len(), 3, "vLLM sends [topic, seq, payload]");
    let seq = u64::from_be_bytes(frames[1].as_ref().try_into().expect("8-byte sequence"));
    let payload = rmpv::decode::read_value(&mut frames[2].as_ref()).unwrap();
    let arr = payload.as_array().expect("payload is [ts, events, dp_rank]").clone();
    assert!(arr[0].is_f64(), "timestamp first");
    assert!(arr.len() == 3 && (arr[2].is_nil() || arr[2].is_i64() || arr[2].is_u64()));
    Msg { topic: frames[0].to_vec(), seq, events: arr[1].as_array().unwrap().clone() }
}

fn tag(ev: &Value) -> &str {
    ev.as_array().and_then(|a| a[0].as_str()).unwrap()
}

#[tokio::test]
async fn block_events_match_vllm_layout() {
    let cfg = EngineConfig {
        time_scale: 0.02,
        num_gpu_blocks: 64,
        block_size: 16,
        kv_events_topic: "kv@test@kvmesh-sim".into(),
        ..EngineConfig::default()
    };
    let e = EngineSim::start(cfg, "127.0.0.1:0", Some("tcp://127.0.0.1:0"), &CancellationToken::new()).await.unwrap();
    let mut sub = zeromq::SubSocket::new();
    sub.connect(e.kv_events_endpoint.as_deref().unwrap()).await.unwrap();
    sub.subscribe("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await; // PUB drops until the subscription lands

    let client = reqwest::Client::new();
    let send = |content: String| {
        let client = client.clone();
        let url = format!("{}/v1/chat/completions", e.url());
        async move {
            let b = json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": content}], "max_tokens": 1});
            let v: serde_json::Value = client.post(url).json(&b).send().await.unwrap().json().await.unwrap();
            v["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let prompt_tokens = send("alpha beta gamma ".repeat(40)).await;
    let m = recv(&mut sub).await;
    assert_eq!(m.topic, b"kv@test@kvmesh-sim");
    let stored = &m.events[0];
    assert_eq!(tag(stored), "BlockStored");
    let f = stored.as_array().unwrap();
    let hashes = f[1].as_array().unwrap();
    assert!(f[2].is_nil(), "first block of a prompt has no parent");
    let tokens = f[3].as_array().unwrap();
    assert_eq!(f[4].as_u64(), Some(16));
    assert_eq!(tokens.len(), hashes.len() * 16);
    assert_eq!(hashes.len() as u64, prompt_tokens / 16);
    let first_seq = m.seq;

    // Fill the 64-block cache with other prompts: old blocks are evicted and reported removed.
    let mut saw_removed = false;
    let mut last_seq = first_seq;
    for i in 0..6 {
        send(format!("other{i} ").repeat(300)).await;
        while let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_millis(300), sub.recv()).await {
            let frames = msg.into_vec();
            let seq = u64::from_be_bytes(frames[1].as_ref().try_into().unwrap());
            assert_eq!(seq, last_seq + 1, "sequence numbers increase by one per batch");
            last_seq = seq;
            let payload = rmpv::decode::read_value(&mut frames[2].as_ref()).unwrap();
            saw_removed |= payload[1].as_array().unwrap().iter().any(|ev| tag(ev) == "BlockRemoved");
        }
    }
    assert!(saw_removed, "eviction must publish BlockRemoved");

    let r = client.post(format!("{}/reset_prefix_cache", e.url())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let m = recv(&mut sub).await;
    assert_eq!(m.seq, last_seq + 1);
    assert!(m.events.iter().any(|ev| tag(ev) == "AllBlocksCleared"));
    e.shutdown().await;
}

/// Asks a replay socket for batches from `start`, as a client of vLLM's `ZmqEventPublisher`
/// does (a DEALER sending `["", start_seq]`), and reads `["", seq, payload]` frames up to the
/// `seq = -1` marker.
async fn replay(endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
    use zeromq::SocketSend;
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await.unwrap();
    let mut req = zeromq::ZmqMessage::from(bytes::Bytes::new());
    req.push_back(bytes::Bytes::copy_from_slice(&start.to_be_bytes()));
    dealer.send(req).await.unwrap();
    let mut out = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), dealer.recv()).await.expect("replay answer").unwrap();
        let frames = m.into_vec();
        assert_eq!(frames.len(), 3, "ROUTER replies [\"\", seq, payload] to a DEALER");
        assert!(frames[0].is_empty(), "empty delimiter first");
        let seq = i64::from_be_bytes(frames[1].as_ref().try_into().expect("8-byte sequence"));
        if seq == -1 {
            assert!(frames[2].is_empty(), "the end marker has an empty payload");
            return out;
        }
        out.push((seq as u64, frames[2].to_vec()));
    }
}

#[tokio::test]
async fn replay_socket_resends_buffered_batches_like_vllm() {
    let cfg =
        EngineConfig { time_scale: 0.02, num_gpu_blocks: 64, kv_events_buffer_steps: 3, ..EngineConfig::default() };
    let e = EngineSim::start_with_replay(
        cfg,
        "127.0.0.1:0",
        Some("tcp://127.0.0.1:0"),
        Some("tcp://127.0.0.1:0"),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let replay_ep = e.kv_events_replay_endpoint.clone().expect("replay endpoint bound");
    let mut sub = zeromq::SubSocket::new();
    sub.connect(e.kv_events_endpoint.as_deref().unwrap()).await.unwrap();
    sub.subscribe("").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let mut live = Vec::new();
    for i in 0..5 {
        let b = json!({"model": "kvmesh-sim", "prompt": format!("batch{i} ").repeat(40), "max_tokens": 1});
        client.post(format!("{}/v1/completions", e.url())).json(&b).send().await.unwrap();
        while let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            let f = msg.into_vec();
            live.push((u64::from_be_bytes(f[1].as_ref().try_into().unwrap()), f[2].to_vec()));
        }
    }
    assert!(live.len() >= 5, "one batch or more per request, got {}", live.len());
    // The buffer keeps the last 3 batches, byte for byte what was published.
    let all = replay(&replay_ep, 0).await;
    assert_eq!(all, live[live.len() - 3..].to_vec());
    // From a later sequence: only what follows it.
    let last = live.last().unwrap().0;
    assert_eq!(replay(&replay_ep, last).await, live[live.len() - 1..].to_vec());
    assert!(replay(&replay_ep, last + 1).await.is_empty());
    e.shutdown().await;
}
