//! Subscribes to one engine's KV-cache events and keeps the engine's cached-block set.
//!
//! A gap in sequence numbers or a sequence that goes backwards (engine restart) means events
//! were missed: the set is dropped and rebuilt from what arrives next, never trusted stale.
//! (Replaying missed batches from vLLM's replay socket is not implemented yet.)

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv};

use super::kv_events::{decode_payload, decode_seq, DecodeError, EngineKvEvent};
use super::Engine;

pub async fn run(engine: Arc<Engine>, endpoint: String, cancel: CancellationToken) {
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
    if let Ok(mut set) = engine.kv.cached_blocks.write() {
        set.clear();
    }
}

/// Applies one multipart message; public for tests that feed frames directly.
pub fn apply(engine: &Engine, frames: &[bytes::Bytes]) -> Result<(), DecodeError> {
    if frames.len() != 3 {
        return Err(DecodeError::Frames(frames.len()));
    }
    let seq = decode_seq(&frames[1])?;
    let batch = decode_payload(&frames[2])?;
    let last = engine.kv.last_seq.swap(seq, Ordering::Relaxed);
    if last != 0 && seq != last + 1 {
        engine.kv.gaps.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(engine = %engine.name, last, seq, "kv events: sequence gap or engine restart; dropping cached-block view");
        reset(engine);
    }
    engine.kv.batches.fetch_add(1, Ordering::Relaxed);
    engine.kv.events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    let Ok(mut set) = engine.kv.cached_blocks.write() else {
        return Ok(());
    };
    for ev in batch.events {
        match ev {
            EngineKvEvent::BlockStored { block_hashes, .. } => set.extend(block_hashes),
            EngineKvEvent::BlockRemoved { block_hashes } => {
                for h in block_hashes {
                    set.remove(&h);
                }
            }
            EngineKvEvent::AllBlocksCleared => set.clear(),
            EngineKvEvent::Unknown(_) => {}
        }
    }
    Ok(())
}
