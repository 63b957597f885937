//! KV-cache events on the wire, exactly as vLLM publishes them with `--kv-events-config`:
//! a ZeroMQ PUB socket sending three frames per batch, `[topic, sequence (u64 big-endian),
//! payload]`, where payload is msgpack `[timestamp, [event, ...], data_parallel_rank]` and each
//! event is a tagged array (msgspec `array_like` with the tag first).

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketSend, ZmqMessage};

use crate::error::SimError;
use crate::kv_cache::KvEvent;

/// One step's events with the sequence number they will carry.
#[derive(Debug, Clone)]
pub struct EventBatch {
    pub seq: u64,
    pub timestamp: f64,
    pub events: Vec<KvEvent>,
}

fn event_value(e: &KvEvent) -> Value {
    let hashes = |hs: &[u64]| Value::Array(hs.iter().map(|&h| Value::from(h)).collect());
    match e {
        KvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size } => Value::Array(vec![
            Value::from("BlockStored"),
            hashes(block_hashes),
            parent_block_hash.map(Value::from).unwrap_or(Value::Nil),
            Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(*block_size),
            Value::Nil,         // lora_id
            Value::from("GPU"), // medium
        ]),
        KvEvent::BlockRemoved { block_hashes } => {
            Value::Array(vec![Value::from("BlockRemoved"), hashes(block_hashes), Value::from("GPU")])
        }
        KvEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    }
}

/// The msgpack payload frame of one batch.
pub fn encode_payload(batch: &EventBatch) -> Vec<u8> {
    let v = Value::Array(vec![
        Value::F64(batch.timestamp),
        Value::Array(batch.events.iter().map(event_value).collect()),
        Value::Nil, // data_parallel_rank: a single-rank engine
    ]);
    let mut buf = Vec::with_capacity(64 + batch.events.len() * 64);
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &v);
    buf
}

/// A bound PUB socket; `run` sends batches until cancelled or the sender side closes.
pub struct KvPublisher {
    socket: zeromq::PubSocket,
    topic: Bytes,
    pub endpoint: String,
}

impl KvPublisher {
    /// Binds `endpoint` (e.g. `tcp://127.0.0.1:5557`; port 0 picks a free one).
    pub async fn bind(endpoint: &str, topic: &str) -> Result<Self, SimError> {
        let mut socket = zeromq::PubSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|e| SimError::BindKvEvents { endpoint: endpoint.to_owned(), message: e.to_string() })?;
        Ok(Self { socket, topic: Bytes::copy_from_slice(topic.as_bytes()), endpoint: bound.to_string() })
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<EventBatch>, cancel: CancellationToken) {
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                b = rx.recv() => match b { Some(b) => b, None => break },
            };
            let frames = vec![
                self.topic.clone(),
                Bytes::copy_from_slice(&batch.seq.to_be_bytes()),
                Bytes::from(encode_payload(&batch)),
            ];
            let Ok(msg) = ZmqMessage::try_from(frames) else {
                continue;
            };
            // PUB drops for slow or absent subscribers, as ZeroMQ does for vLLM; a subscriber
            // sees the gap in sequence numbers.
            if let Err(e) = self.socket.send(msg).await {
                tracing::warn!(error = %e, "kv events: send failed");
            }
        }
        let _ = self.socket.close().await;
    }
}
