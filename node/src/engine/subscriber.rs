//! Subscribes to one engine's KV-cache events and keeps its exact block index
//! (`policy::prefix_index`), keyed by kvmesh's own block keys.
//!
//! A gap in sequence numbers means batches were lost in transit (ZeroMQ's PUB socket drops for
//! slow subscribers). When the engine has a replay socket (vLLM's `replay_endpoint`), the
//! missed range is asked for there, with a timeout; if it comes back whole, it is applied in
//! order before the batch that revealed the gap, and the index is kept. Otherwise (no replay
//! socket, the range no longer buffered, a timeout or a bad answer), and always after a
//! sequence that goes backwards (engine restart), a lost subscription or an engine outage, the
//! index is emptied and rebuilt from what arrives next: never trusted stale.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use kvmesh_policy::prefix_index::{BatchOutcome, EngineIndex, IndexEvent, Tier};

use super::kv_events::{decode_payload, decode_seq, DecodeError, EngineKvEvent, EventBatch};
use super::Engine;

/// An engine's replay socket and how long a resync from it may take.
#[derive(Debug, Clone)]
pub struct ReplaySource {
    pub endpoint: String,
    pub timeout: Duration,
}

/// Most batches one resync asks for: vLLM's default replay buffer (`buffer_steps`). A larger
/// gap would hold that many decoded batches in memory, and the engine is unlikely to still
/// have them; the index is dropped instead.
pub const MAX_REPLAY_BATCHES: u64 = 10_000;

/// Why a gap could not be filled from the replay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayMiss {
    /// The gap is larger than `MAX_REPLAY_BATCHES`.
    TooLarge(u64),
    /// The engine's buffer starts after the first missed batch (or is empty).
    NotBuffered {
        oldest: Option<u64>,
    },
    /// The answer skipped a sequence number or ended before the gap was filled.
    Incomplete {
        expected: u64,
        got: Option<u64>,
    },
    TimedOut,
    Connect(String),
    Transport(String),
    Undecodable(String),
}

impl std::fmt::Display for ReplayMiss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "gap of {n} batches is over the replay limit of {MAX_REPLAY_BATCHES}"),
            Self::NotBuffered { oldest: Some(o) } => write!(f, "no longer buffered (oldest replayed batch is {o})"),
            Self::NotBuffered { oldest: None } => write!(f, "no longer buffered (replay returned nothing)"),
            Self::Incomplete { expected, got: Some(g) } => write!(f, "replay skipped from {expected} to {g}"),
            Self::Incomplete { expected, got: None } => write!(f, "replay ended before batch {expected}"),
            Self::TimedOut => write!(f, "replay timed out"),
            Self::Connect(e) => write!(f, "cannot connect to the replay socket: {e}"),
            Self::Transport(e) => write!(f, "replay socket failed: {e}"),
            Self::Undecodable(e) => write!(f, "undecodable replayed batch: {e}"),
        }
    }
}

pub async fn run(engine: Arc<Engine>, endpoint: String, replay: Option<ReplaySource>, cancel: CancellationToken) {
    // Index keys chain from the model's seed, so the model must be known first.
    let Some(model) = wait_for_model(&engine, &cancel).await else { return };
    if let Ok(mut index) = engine.kv.index.write() {
        *index = EngineIndex::for_model(&model);
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut socket = zeromq::SubSocket::new();
        // Through the frame bound (`zmtp_guard`), which lives as long as this connection.
        let guard = match super::zmtp_guard::relay(&endpoint, Duration::from_secs(5)).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(engine = %engine.name, error = %e, "kv events: no loopback port for the frame bound");
                wait(&cancel, &mut backoff).await;
                continue;
            }
        };
        let target = guard.as_ref().map_or(endpoint.as_str(), |g| g.endpoint.as_str()).to_owned();
        let connected = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(5), socket.connect(&target)) => r,
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
        tracing::info!(engine = %engine.name, %endpoint, replay = ?replay.as_ref().map(|r| &r.endpoint), "kv events: subscribed");
        // The subscription travels to the publisher behind the handshake: a moment's grace.
        tokio::time::sleep(Duration::from_millis(20)).await;
        engine.kv.subscribed.store(true, Ordering::Relaxed);
        backoff = Duration::from_millis(100);
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = socket.recv() => m,
            };
            match msg {
                Ok(m) => {
                    if take_test_drop(&engine) {
                        continue;
                    }
                    let frames: Vec<_> = m.into_vec();
                    let handled = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = handle(&engine, &frames, replay.as_ref()) => r,
                    };
                    if let Err(e) = handled {
                        engine.kv.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(engine = %engine.name, error = %e, "kv events: undecodable message");
                    }
                }
                Err(e) => {
                    engine.kv.subscribed.store(false, Ordering::Relaxed);
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

/// Consumes one unit of the test hook `drop_incoming`, if any is left.
#[cfg(feature = "testsuite")]
fn take_test_drop(engine: &Engine) -> bool {
    engine.kv.drop_incoming.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
}

/// Without the `testsuite` feature there is no test hook: nothing is dropped.
#[cfg(not(feature = "testsuite"))]
fn take_test_drop(_: &Engine) -> bool {
    false
}

/// Clears `resyncing` however the resync ends (replayed, dropped, or the task cancelled).
struct Resyncing<'a>(&'a Engine);

impl<'a> Resyncing<'a> {
    fn start(engine: &'a Engine) -> Self {
        engine.kv.resyncing.store(true, Ordering::Relaxed);
        Self(engine)
    }
}

impl Drop for Resyncing<'_> {
    fn drop(&mut self) {
        self.0.kv.resyncing.store(false, Ordering::Relaxed);
    }
}

/// Applies one multipart message from the SUB socket, first fetching the batches before it
/// from the replay socket when it reveals a gap.
async fn handle(engine: &Engine, frames: &[Bytes], replay: Option<&ReplaySource>) -> Result<(), DecodeError> {
    let (seq, batch) = decode_message(frames)?;
    let last = engine.kv.index.read().ok().and_then(|i| i.last_seq());
    let gap_from = last.and_then(|l| l.checked_add(1)).filter(|&expected| seq > expected);
    let (Some(expected), Some(replay)) = (gap_from, replay) else {
        apply_batch(engine, seq, batch);
        return Ok(());
    };
    engine.kv.gaps.fetch_add(1, Ordering::Relaxed);
    let fetched = {
        let _resyncing = Resyncing::start(engine);
        match tokio::time::timeout(replay.timeout, fetch_replay(&replay.endpoint, expected, seq)).await {
            Ok(r) => r,
            Err(_) => Err(ReplayMiss::TimedOut),
        }
    };
    match fetched {
        Ok(batches) => {
            let n = batches.len();
            // Replayed batches pass through the same in-order check: if the index moved on
            // meanwhile (the poller reset it), they start a new stream and can only add what
            // the engine reported, never claim more.
            for (s, b) in batches {
                apply_replayed(engine, s, b);
            }
            apply_replayed(engine, seq, batch);
            engine.kv.resync_replayed.fetch_add(1, Ordering::Relaxed);
            tracing::info!(engine = %engine.name, from = expected, to = seq - 1, batches = n, "kv events: missed batches replayed; index kept");
        }
        Err(why) => {
            // The gap is still there, so applying the batch empties the index first.
            apply_replayed(engine, seq, batch);
            engine.kv.resync_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(engine = %engine.name, from = expected, to = seq - 1, reason = %why, "kv events: missed batches could not be replayed; the engine's index was emptied and rebuilds from here");
        }
    }
    Ok(())
}

/// Asks the replay socket for batches `from..to` (vLLM's framing: a DEALER sends
/// `["", start_seq]`; the ROUTER answers `["", seq, payload]` per buffered batch from
/// `start_seq` on, then `["", -1, ""]`). The caller bounds the time it takes.
async fn fetch_replay(endpoint: &str, from: u64, to: u64) -> Result<Vec<(u64, EventBatch)>, ReplayMiss> {
    let wanted = to - from;
    if wanted > MAX_REPLAY_BATCHES {
        return Err(ReplayMiss::TooLarge(wanted));
    }
    // A socket per resync: gaps are rare, and a fresh socket cannot hold a late answer to an
    // earlier request that timed out.
    let mut socket = zeromq::DealerSocket::new();
    let guard = super::zmtp_guard::relay(endpoint, Duration::from_secs(5))
        .await
        .map_err(|e| ReplayMiss::Connect(e.to_string()))?;
    let target = guard.as_ref().map_or(endpoint, |g| g.endpoint.as_str());
    socket.connect(target).await.map_err(|e| ReplayMiss::Connect(e.to_string()))?;
    let mut req = ZmqMessage::from(Bytes::new());
    req.push_back(Bytes::copy_from_slice(&from.to_be_bytes()));
    socket.send(req).await.map_err(|e| ReplayMiss::Transport(e.to_string()))?;
    let mut out: Vec<(u64, EventBatch)> = Vec::with_capacity(wanted as usize);
    let mut next = from;
    while next < to {
        let msg = socket.recv().await.map_err(|e| ReplayMiss::Transport(e.to_string()))?;
        let frames = msg.into_vec();
        // A DEALER keeps the ROUTER's empty delimiter.
        let frames = match frames.as_slice() {
            [d, rest @ ..] if d.is_empty() && rest.len() == 2 => rest,
            other => other,
        };
        let [seq, payload] = frames else {
            return Err(ReplayMiss::Undecodable(format!("expected [seq, payload], got {} frames", frames.len())));
        };
        let seq = decode_seq(seq).map_err(|e| ReplayMiss::Undecodable(e.to_string()))?;
        if seq == u64::MAX {
            // The end marker (-1): the buffer ran out before the gap was filled.
            return Err(if next == from {
                ReplayMiss::NotBuffered { oldest: None }
            } else {
                ReplayMiss::Incomplete { expected: next, got: None }
            });
        }
        if seq != next {
            return Err(if next == from && seq > from {
                ReplayMiss::NotBuffered { oldest: Some(seq) }
            } else {
                ReplayMiss::Incomplete { expected: next, got: Some(seq) }
            });
        }
        let batch = decode_payload(payload).map_err(|e| ReplayMiss::Undecodable(e.to_string()))?;
        out.push((seq, batch));
        next += 1;
    }
    // The rest of the answer (batches from `to` on, already here live, and the end marker) is
    // discarded with the socket.
    let _ = socket.close().await;
    Ok(out)
}

fn decode_message(frames: &[Bytes]) -> Result<(u64, EventBatch), DecodeError> {
    if frames.len() != 3 {
        return Err(DecodeError::Frames(frames.len()));
    }
    Ok((decode_seq(&frames[1])?, decode_payload(&frames[2])?))
}

/// Applies one multipart message without any resync (a gap or restart empties the index);
/// public for tests that feed frames directly.
pub fn apply(engine: &Engine, frames: &[Bytes]) -> Result<(), DecodeError> {
    let (seq, batch) = decode_message(frames)?;
    apply_batch(engine, seq, batch);
    Ok(())
}

/// A batch straight from the SUB socket: a gap or restart here is a drop (no replay tried).
fn apply_batch(engine: &Engine, seq: u64, batch: EventBatch) {
    let outcome = apply_decoded(engine, seq, batch);
    if outcome != BatchOutcome::InOrder {
        engine.kv.gaps.fetch_add(1, Ordering::Relaxed);
        engine.kv.resync_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(engine = %engine.name, ?outcome, "kv events: missed batches; the engine's index was emptied and rebuilds from here");
    }
}

/// What the exact index takes from an engine's event: the blocks of the first KV-cache group,
/// in their tier (`medium` unset or `GPU`: the engine's own cache; any other, such as `CPU`:
/// offloaded, a load rather than a free hit, and whose removal leaves a GPU copy alone), keyed
/// under their LoRA adapter when they have one (`lora_name`; an adapter known only by its
/// numeric `lora_id` cannot be keyed and is left out). A hybrid model's other groups (sliding
/// window, mamba) hold the same prefix under other hashes and are left out too: the index may
/// under-count, never over-count.
fn index_event(ev: EngineKvEvent) -> Option<IndexEvent> {
    let tier = |m: &Option<String>| match m.as_deref() {
        None => Tier::Gpu,
        Some(m) if m.eq_ignore_ascii_case("gpu") => Tier::Gpu,
        Some(_) => Tier::Offloaded,
    };
    let first_group = |g: &Option<i64>| g.is_none_or(|g| g == 0);
    match ev {
        EngineKvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium,
            lora_id,
            lora_name,
            group_idx,
            cache_salt,
        } if first_group(&group_idx) && (lora_name.is_some() || lora_id.is_none()) => Some(IndexEvent::Stored {
            block_hashes,
            parent: parent_block_hash,
            token_ids,
            block_size,
            salt: cache_salt,
            adapter: lora_name,
            tier: tier(&medium),
        }),
        EngineKvEvent::BlockRemoved { block_hashes, medium, group_idx } if first_group(&group_idx) => {
            Some(IndexEvent::Removed { block_hashes, tier: tier(&medium) })
        }
        EngineKvEvent::BlockStored { .. } | EngineKvEvent::BlockRemoved { .. } => None,
        EngineKvEvent::AllBlocksCleared => Some(IndexEvent::Cleared),
        EngineKvEvent::Unknown(_) => None,
    }
}

/// A batch after a resync decision: whatever its outcome, it was already counted.
fn apply_replayed(engine: &Engine, seq: u64, batch: EventBatch) {
    let _ = apply_decoded(engine, seq, batch);
}

fn apply_decoded(engine: &Engine, seq: u64, batch: EventBatch) -> BatchOutcome {
    engine.kv.last_seq.store(seq, Ordering::Relaxed);
    engine.kv.batches.fetch_add(1, Ordering::Relaxed);
    engine.kv.events.fetch_add(batch.events.len() as u64, Ordering::Relaxed);
    let events = batch.events.into_iter().filter_map(index_event);
    let Ok(mut index) = engine.kv.index.write() else { return BatchOutcome::InOrder };
    index.apply_batch(seq, events)
}

/// The identity of the engine's base model (its index's chains are seeded by it:
/// `policy::models`), once the poller has read its models.
async fn wait_for_model(engine: &Engine, cancel: &CancellationToken) -> Option<String> {
    loop {
        if let Some(m) = engine.snapshot().cards.base_identity() {
            return Some(m);
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(medium: Option<&str>, lora: Option<&str>, group: Option<i64>) -> EngineKvEvent {
        EngineKvEvent::BlockStored {
            block_hashes: vec![1],
            parent_block_hash: None,
            token_ids: vec![0; 16],
            block_size: 16,
            lora_id: None,
            medium: medium.map(str::to_owned),
            lora_name: lora.map(str::to_owned),
            group_idx: group,
            cache_salt: None,
        }
    }

    #[test]
    fn blocks_of_the_first_group_are_indexed_in_their_tier_and_key_space() {
        let tier_of = |ev| match index_event(ev) {
            Some(IndexEvent::Stored { tier, .. } | IndexEvent::Removed { tier, .. }) => Some(tier),
            Some(IndexEvent::Cleared) => Some(Tier::Gpu),
            None => None,
        };
        let table = [
            (stored(Some("GPU"), None, None), Some(Tier::Gpu)),
            (stored(None, None, Some(0)), Some(Tier::Gpu)),
            (stored(Some("CPU"), None, None), Some(Tier::Offloaded)),
            (stored(Some("GPU"), Some("sql-adapter"), None), Some(Tier::Gpu)),
            (stored(Some("GPU"), None, Some(1)), None),
            (
                EngineKvEvent::BlockRemoved { block_hashes: vec![1], medium: Some("CPU".into()), group_idx: None },
                Some(Tier::Offloaded),
            ),
            (
                EngineKvEvent::BlockRemoved { block_hashes: vec![1], medium: Some("gpu".into()), group_idx: Some(0) },
                Some(Tier::Gpu),
            ),
            (EngineKvEvent::BlockRemoved { block_hashes: vec![1], medium: None, group_idx: Some(2) }, None),
            (EngineKvEvent::AllBlocksCleared, Some(Tier::Gpu)),
        ];
        for (i, (ev, want)) in table.into_iter().enumerate() {
            assert_eq!(tier_of(ev), want, "row {i}");
        }
        let adapter = index_event(stored(None, Some("sql-adapter"), None));
        assert!(matches!(adapter, Some(IndexEvent::Stored { adapter: Some(a), .. }) if a == "sql-adapter"));
        let mut numeric_only = stored(None, None, None);
        if let EngineKvEvent::BlockStored { lora_id, .. } = &mut numeric_only {
            *lora_id = Some(3);
        }
        assert!(index_event(numeric_only).is_none(), "an adapter known only by number cannot be keyed");
    }
}
