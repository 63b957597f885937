//! Subscribes to one engine's KV-cache events and keeps its exact block index
//! (`policy::prefix_index`), keyed by kvmesh's own block keys.
//!
//! A gap in sequence numbers, a sequence that goes backwards (engine restart), a lost
//! subscription or an engine outage means events were missed: the index is emptied and rebuilt
//! from what arrives next, never trusted stale. Replaying missed batches from vLLM's replay
//! socket is not implemented yet.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv};

use kvmesh_policy::prefix_index::{BatchOutcome, EngineIndex, IndexEvent};

use super::kv_events::{decode_payload, decode_seq, DecodeError, EngineKvEvent};
use super::Engine;

pub async fn run(engine: Arc<Engine>, endpoint: String, cancel: CancellationToken) {
    // Index keys chain from the model's seed, so the model must be known first.
    let Some(seed) = wait_for_seed(&engine, &cancel).await else { return };
    if let Ok(mut index) = engine.kv.index.write() {
        *index = EngineIndex::new(seed);
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut socket = zeromq::SubSocket::new();
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), socket.connect(&endpoint)) => r,
        };
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(engine = %engine.name, %endpoint, error = %e, "kv events: connect failed");
                wait(&cancel, &mut backoff).await;
                continue;
            }
            Err(_) => {
                wait(&cancel, &mut backoff).await;
                continue;
            }
        }
        if let Err(e) = socket.subscribe("").await {
            tracing::warn!(engine = %engine.name, error = %e, "kv events: subscribe failed");
            wait(&cancel, &mut backoff).await;
            continue;
        }
        tracing::info!(engine = %engine.name, %endpoint, "kv events: subscribed");
        backoff = Duration::from_millis(100);
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = socket.recv() => m,
            };
            match msg {
                Ok(m) => {
                    let frames: Vec<_> = m.into_vec();
                    if let Err(e) = apply(&engine, &frames) {
                        engine.kv.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(engine = %engine.name, error = %e, "kv events: undecodable message");
                    }
                }
                Err(e) => {
                    tracing::warn!(engine = %engine.name, error = %e, "kv events: receive failed; reconnecting");
                    reset(&engine);
                    break;
                }
            }
        }
    }
}

async fn wait(cancel: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

fn reset(engine: &Engine) {
    engine.kv.reset_index();
}

/// Applies one multipart message; public for tests that feed frames directly.
pub fn apply(engine: &Engine, frames: &[bytes::Bytes]) -> Result<(), DecodeError> {
    if frames.len() != 3 {
        return Err(DecodeError::Frames(frames.len()));
    }
    let seq = decode_seq(&frames[1])?;
    let batch = decode_payload(&frames[2])?;
    engine.kv.last_seq.store(seq, Ordering::Relaxed);
    engine.kv.batches.fetch_add(1, Ordering::Relaxed);
    engine.kv.events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    let events = batch.events.into_iter().filter_map(|ev| match ev {
        EngineKvEvent::BlockStored { block_hashes, parent_block_hash, token_ids, block_size, .. } => {
            Some(IndexEvent::Stored { block_hashes, parent: parent_block_hash, token_ids, block_size })
        }
        EngineKvEvent::BlockRemoved { block_hashes } => Some(IndexEvent::Removed { block_hashes }),
        EngineKvEvent::AllBlocksCleared => Some(IndexEvent::Cleared),
        EngineKvEvent::Unknown(_) => None,
    });
    let Ok(mut index) = engine.kv.index.write() else { return Ok(()) };
    match index.apply_batch(seq, events) {
        BatchOutcome::InOrder => {}
        other => {
            engine.kv.gaps.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(engine = %engine.name, ?other, "kv events: missed batches; the engine's index was emptied and rebuilds from here");
        }
    }
    Ok(())
}

/// The chain seed of the engine's first model, once the poller has read its models.
async fn wait_for_seed(engine: &Engine, cancel: &CancellationToken) -> Option<u64> {
    loop {
        if let Some(m) = engine.snapshot().models.first() {
            return Some(kvmesh_policy::blocks::chain_seed(m, None, None));
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
