//! KV-cache events on the wire, exactly as vLLM publishes them with `--kv-events-config`:
//! a ZeroMQ PUB socket sending three frames per batch, `[topic, sequence (u64 big-endian),
//! payload]`, where payload is msgpack `[timestamp, [event, ...], data_parallel_rank]` and each
//! event is a tagged array (msgspec `array_like` with the tag first).
//!
//! With a replay endpoint (vLLM's `KVEventsConfig.replay_endpoint`), a ROUTER socket also
//! answers replay requests from the last `buffer_steps` batches, framed as vLLM's
//! `ZmqEventPublisher._service_replay` does: a request is `[identity, "", start_seq (8 bytes
//! BE)]` (what a REQ client, or a DEALER sending `["", seq]`, produces); the answer is one
//! `[identity, "", seq (8 bytes BE), payload]` per buffered batch from `start_seq` on, then
//! `[identity, "", -1 (8 bytes BE, signed), ""]`.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

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
        KvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size, cache_salt, lora, medium } => {
            let mut fields = vec![
                Value::from("BlockStored"),
                hashes(block_hashes),
                parent_block_hash.map(Value::from).unwrap_or(Value::Nil),
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                Value::from(*block_size),
                // lora_id: vLLM's adapter number, which a router cannot map to a name.
                lora.as_ref().map(|_| Value::from(1)).unwrap_or(Value::Nil),
                Value::from(medium.as_str()),
                lora.as_deref().map(Value::from).unwrap_or(Value::Nil),
            ];
            // extra_keys, one tuple per block as vLLM's `generate_block_hash_extra_keys` makes
            // them: the adapter's name in every block's, then the salt in the first block's;
            // `None` for a block with neither. Omitted (the default) when no block has any, as
            // are group_idx and the cache-spec fields.
            if cache_salt.is_some() || lora.is_some() {
                let per_block = (0..block_hashes.len().max(1))
                    .map(|i| {
                        let keys: Vec<Value> = lora
                            .iter()
                            .chain(cache_salt.iter().filter(|_| i == 0))
                            .map(|k| Value::from(k.as_str()))
                            .collect();
                        if keys.is_empty() {
                            Value::Nil
                        } else {
                            Value::Array(keys)
                        }
                    })
                    .collect();
                fields.push(Value::Array(per_block));
            }
            Value::Array(fields)
        }
        KvEvent::BlockRemoved { block_hashes, medium } => {
            Value::Array(vec![Value::from("BlockRemoved"), hashes(block_hashes), Value::from(medium.as_str())])
        }
        KvEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    }
}

/// The msgpack payload frame of one batch.
/// `rank`: the data-parallel rank of a multi-rank engine (`None` for a single-rank one).
pub fn encode_payload(batch: &EventBatch, rank: Option<u32>) -> Vec<u8> {
    let v = Value::Array(vec![
        Value::F64(batch.timestamp),
        Value::Array(batch.events.iter().map(event_value).collect()),
        rank.map(Value::from).unwrap_or(Value::Nil),
    ]);
    let mut buf = Vec::with_capacity(64 + batch.events.len() * 64);
    // Writing to a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &v);
    buf
}

/// The endpoint data-parallel rank `rank` publishes on, by vLLM's convention
/// (`ZmqEventPublisher.offset_endpoint_port`): a TCP endpoint's port plus the rank, an `ipc` or
/// `inproc` endpoint with `_dp{rank}` appended; rank 0 keeps the endpoint. `None` for a TCP
/// endpoint without a numeric port, or one past 65535.
pub fn offset_endpoint_port(endpoint: &str, rank: u32) -> Option<String> {
    if rank == 0 {
        return Some(endpoint.to_owned());
    }
    if endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://") {
        return Some(format!("{endpoint}_dp{rank}"));
    }
    let (base, port) = endpoint.rsplit_once(':')?;
    let port: u32 = port.parse().ok()?;
    let port = port.checked_add(rank).filter(|&p| p <= 65_535)?;
    Some(format!("{base}:{port}"))
}

/// vLLM's end-of-replay marker: sequence -1 as a signed 8-byte big-endian integer.
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// Longest one replay answer may take to hand to ZeroMQ. Replay runs on the publishing task
/// (as in vLLM), so a client that stops reading must not stall live events for long.
const REPLAY_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The replay side: a bound ROUTER socket and the last `capacity` published batches.
struct Replay {
    socket: zeromq::RouterSocket,
    buffer: VecDeque<(u64, Bytes)>,
    capacity: usize,
}

/// A bound PUB socket (and, optionally, a replay ROUTER socket); `run` sends batches until
/// cancelled or the sender side closes.
pub struct KvPublisher {
    socket: zeromq::PubSocket,
    topic: Bytes,
    pub endpoint: String,
    /// The bound replay endpoint, when replay is on.
    pub replay_endpoint: Option<String>,
    replay: Option<Replay>,
    rank: Option<u32>,
}

impl KvPublisher {
    /// Binds `endpoint` (e.g. `tcp://127.0.0.1:5557`; port 0 picks a free one).
    pub async fn bind(endpoint: &str, topic: &str) -> Result<Self, SimError> {
        let mut socket = zeromq::PubSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|e| SimError::BindKvEvents { endpoint: endpoint.to_owned(), message: e.to_string() })?;
        Ok(Self {
            socket,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            endpoint: bound.to_string(),
            replay_endpoint: None,
            rank: None,
            replay: None,
        })
    }

    /// Also binds a replay ROUTER socket on `endpoint`, keeping the last `buffer_steps` batches.
    /// Names the data-parallel rank in every batch, when the engine has more than one.
    pub fn with_rank(mut self, rank: u32, ranks: u32) -> Self {
        self.rank = (ranks > 1).then_some(rank);
        self
    }

    pub async fn with_replay(mut self, endpoint: &str, buffer_steps: usize) -> Result<Self, SimError> {
        let mut socket = zeromq::RouterSocket::new();
        let bound = socket
            .bind(endpoint)
            .await
            .map_err(|e| SimError::BindKvEvents { endpoint: endpoint.to_owned(), message: e.to_string() })?;
        self.replay_endpoint = Some(bound.to_string());
        self.replay =
            Some(Replay { socket, buffer: VecDeque::with_capacity(buffer_steps.min(1024)), capacity: buffer_steps });
        Ok(self)
    }

    pub async fn run(self, mut rx: mpsc::Receiver<EventBatch>, cancel: CancellationToken) {
        let Self { mut socket, topic, mut replay, rank, .. } = self;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                b = rx.recv() => match b {
                    Some(b) => publish(&mut socket, &topic, replay.as_mut(), rank, b).await,
                    None => break,
                },
                req = next_request(replay.as_mut()) => {
                    if let (Some(r), Ok(req)) = (replay.as_mut(), req) {
                        serve_replay(r, req).await;
                    }
                }
            }
        }
        let _ = socket.close().await;
        if let Some(r) = replay {
            let _ = r.socket.close().await;
        }
    }
}

async fn publish(
    socket: &mut zeromq::PubSocket,
    topic: &Bytes,
    replay: Option<&mut Replay>,
    rank: Option<u32>,
    batch: EventBatch,
) {
    let seq = Bytes::copy_from_slice(&batch.seq.to_be_bytes());
    let payload = Bytes::from(encode_payload(&batch, rank));
    if let Some(r) = replay {
        if r.capacity > 0 {
            if r.buffer.len() == r.capacity {
                r.buffer.pop_front();
            }
            r.buffer.push_back((batch.seq, payload.clone()));
        }
    }
    let mut msg = ZmqMessage::from(topic.clone());
    msg.push_back(seq);
    msg.push_back(payload);
    // PUB drops for slow or absent subscribers, as ZeroMQ does for vLLM; a subscriber
    // sees the gap in sequence numbers (and may ask the replay socket for what it missed).
    if let Err(e) = socket.send(msg).await {
        tracing::warn!(error = %e, "kv events: send failed");
    }
}

/// The next replay request, or never when replay is off.
async fn next_request(replay: Option<&mut Replay>) -> zeromq::ZmqResult<ZmqMessage> {
    match replay {
        Some(r) => r.socket.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers one request as vLLM's `_service_replay` does; malformed requests are logged and
/// ignored (vLLM answers nothing to them either).
async fn serve_replay(r: &mut Replay, req: ZmqMessage) {
    let frames = req.into_vec();
    let [identity, delimiter, start] = frames.as_slice() else {
        tracing::warn!(frames = frames.len(), "kv events: replay request is not [identity, \"\", start_seq]");
        return;
    };
    let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
        tracing::warn!(len = start.len(), "kv events: replay start sequence is not 8 bytes");
        return;
    };
    let start = u64::from_be_bytes(start);
    let reply = |a: Bytes, b: Bytes| {
        let mut m = ZmqMessage::from(identity.clone());
        m.push_back(delimiter.clone());
        m.push_back(a);
        m.push_back(b);
        m
    };
    let socket = &mut r.socket;
    let buffer = &r.buffer;
    let sent = tokio::time::timeout(REPLAY_SEND_TIMEOUT, async {
        let mut n = 0usize;
        for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
            socket.send(reply(Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone())).await?;
            n += 1;
        }
        socket.send(reply(Bytes::from_static(&END_SEQ), Bytes::new())).await?;
        Ok::<_, zeromq::ZmqError>(n)
    })
    .await;
    match sent {
        Ok(Ok(n)) => tracing::debug!(start, batches = n, "kv events: replay served"),
        Ok(Err(e)) => tracing::warn!(start, error = %e, "kv events: replay failed"),
        Err(_) => tracing::warn!(start, "kv events: replay timed out (client not reading)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The examples of vLLM's `offset_endpoint_port` docstring.
    #[test]
    fn ranks_publish_on_vllms_offset_endpoints() {
        assert_eq!(offset_endpoint_port("tcp://*:5557", 0).as_deref(), Some("tcp://*:5557"));
        assert_eq!(offset_endpoint_port("tcp://*:5557", 2).as_deref(), Some("tcp://*:5559"));
        assert_eq!(offset_endpoint_port("inproc://cache", 1).as_deref(), Some("inproc://cache_dp1"));
        assert_eq!(offset_endpoint_port("tcp://h:65535", 1), None);
        assert_eq!(offset_endpoint_port("tcp://h", 1), None);
    }
}
