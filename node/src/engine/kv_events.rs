//! Decoding vLLM's KV-cache events (ZeroMQ multipart `[topic, seq, payload]`, msgpack payload
//! `[timestamp, [event, ...], dp_rank]`), written against vLLM's wire format, not against the
//! simulator's encoder. Tolerant of what newer vLLM versions append: unknown trailing fields are
//! ignored, unknown event tags are reported as such, hashes may be integers or bytes.

use rmpv::Value;

/// Field order of vLLM's events (`vllm/distributed/kv_events.py`, msgspec array-like, trailing
/// defaults omitted): `BlockStored [tag, block_hashes, parent_block_hash, token_ids, block_size,
/// lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
/// kv_cache_spec_sliding_window]`, `BlockRemoved [tag, block_hashes, medium, group_idx]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineKvEvent {
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        lora_id: Option<i64>,
        /// Where the blocks live: `GPU` (or unset) for the engine's own KV cache; `CPU` and
        /// others for blocks an offloading connector moved.
        medium: Option<String>,
        /// The LoRA adapter the blocks were computed for.
        lora_name: Option<String>,
        /// The KV-cache group (hybrid models keep one per attention kind).
        group_idx: Option<i64>,
        /// The request's `cache_salt`, read from the first block's `extra_keys` when the event
        /// starts a chain: its last string that is not the adapter's name. (vLLM puts media
        /// hashes first, then the adapter, then the salt; a media prompt without a salt would
        /// be read as salted, and its blocks keyed under a salt no request uses: a miss, never a
        /// false hit.)
        cache_salt: Option<String>,
    },
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Option<String>,
        group_idx: Option<i64>,
    },
    AllBlocksCleared,
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub timestamp: f64,
    pub events: Vec<EngineKvEvent>,
    pub data_parallel_rank: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("expected 3 frames [topic, seq, payload], got {0}")]
    Frames(usize),
    #[error("sequence frame must be 8 bytes, got {0}")]
    Sequence(usize),
    #[error("payload is not msgpack: {0}")]
    Msgpack(String),
    #[error("payload shape: {0}")]
    Shape(&'static str),
}

/// Sequence number of a message's second frame.
pub fn decode_seq(frame: &[u8]) -> Result<u64, DecodeError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| DecodeError::Sequence(frame.len()))?;
    Ok(u64::from_be_bytes(bytes))
}

pub fn decode_payload(mut bytes: &[u8]) -> Result<EventBatch, DecodeError> {
    let v = rmpv::decode::read_value(&mut bytes).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    let Value::Array(items) = v else {
        return Err(DecodeError::Shape("payload is not an array"));
    };
    let timestamp = match items.first() {
        Some(Value::F64(f)) => *f,
        Some(Value::F32(f)) => *f as f64,
        Some(v) if v.as_i64().is_some() => v.as_i64().unwrap_or(0) as f64,
        _ => return Err(DecodeError::Shape("timestamp missing")),
    };
    let Some(Value::Array(raw)) = items.get(1) else {
        return Err(DecodeError::Shape("events array missing"));
    };
    let events = raw.iter().map(decode_event).collect::<Result<_, _>>()?;
    let data_parallel_rank = items.get(2).and_then(Value::as_i64);
    Ok(EventBatch { timestamp, events, data_parallel_rank })
}

fn decode_event(v: &Value) -> Result<EngineKvEvent, DecodeError> {
    let Value::Array(f) = v else {
        return Err(DecodeError::Shape("event is not an array"));
    };
    let tag = f.first().and_then(Value::as_str).ok_or(DecodeError::Shape("event tag missing"))?;
    Ok(match tag {
        "BlockStored" => {
            let parent_block_hash = match f.get(2) {
                None | Some(Value::Nil) => None,
                Some(v) => Some(hash(v)?),
            };
            let lora_name = f.get(7).and_then(Value::as_str).map(str::to_owned);
            let cache_salt = match (parent_block_hash, f.get(8)) {
                (None, Some(Value::Array(per_block))) => match per_block.first() {
                    Some(Value::Array(keys)) => keys
                        .iter()
                        .filter_map(Value::as_str)
                        .rfind(|k| Some(*k) != lora_name.as_deref())
                        .map(str::to_owned),
                    _ => None,
                },
                _ => None,
            };
            EngineKvEvent::BlockStored {
                block_hashes: hashes(f.get(1))?,
                parent_block_hash,
                token_ids: match f.get(3) {
                    Some(Value::Array(ts)) => ts
                        .iter()
                        .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                        .collect::<Option<_>>()
                        .ok_or(DecodeError::Shape("token id is not a u32"))?,
                    _ => return Err(DecodeError::Shape("BlockStored token_ids missing")),
                },
                // vLLM's offloading connector reports blocks by hash alone (no tokens), some
                // versions with `block_size` 0; blocks with tokens need a real size.
                block_size: f
                    .get(4)
                    .and_then(Value::as_u64)
                    .and_then(|b| u32::try_from(b).ok())
                    .filter(|&b| b > 0 || matches!(f.get(3), Some(Value::Array(t)) if t.is_empty()))
                    .ok_or(DecodeError::Shape("BlockStored block_size missing"))?,
                lora_id: f.get(5).and_then(Value::as_i64),
                medium: f.get(6).and_then(Value::as_str).map(str::to_owned),
                lora_name,
                group_idx: f.get(9).and_then(Value::as_i64),
                cache_salt,
            }
        }
        "BlockRemoved" => EngineKvEvent::BlockRemoved {
            block_hashes: hashes(f.get(1))?,
            medium: f.get(2).and_then(Value::as_str).map(str::to_owned),
            group_idx: f.get(3).and_then(Value::as_i64),
        },
        "AllBlocksCleared" => EngineKvEvent::AllBlocksCleared,
        other => EngineKvEvent::Unknown(other.to_owned()),
    })
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>, DecodeError> {
    match v {
        Some(Value::Array(hs)) => hs.iter().map(hash).collect(),
        _ => Err(DecodeError::Shape("block_hashes missing")),
    }
}

/// An unsigned integer, or bytes whose last 8 are read big-endian (vLLM's sha256 hashes).
fn hash(v: &Value) -> Result<u64, DecodeError> {
    match v {
        Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)).ok_or(DecodeError::Shape("hash")),
        Value::Binary(b) if !b.is_empty() => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut buf = [0u8; 8];
            buf[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(buf))
        }
        _ => Err(DecodeError::Shape("block hash is neither an integer nor bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enc(v: Value) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        b
    }

    #[test]
    fn decodes_newer_vllm_layout_with_bytes_hashes_and_extra_fields() {
        let hash_bytes = Value::Binary(vec![0xAA; 24].into_iter().chain(1u64.to_be_bytes()).collect());
        let payload = enc(Value::Array(vec![
            Value::F64(1.5),
            Value::Array(vec![
                Value::Array(vec![
                    "BlockStored".into(),
                    Value::Array(vec![hash_bytes]),
                    Value::Nil,
                    Value::Array((0..4).map(Value::from).collect()),
                    Value::from(4),
                    Value::Nil,
                    "GPU".into(),
                    "lora-name".into(),
                    Value::Array(vec![Value::Array(vec!["lora-name".into(), "salt-1".into()])]),
                    Value::from(1),
                    "full_attention".into(),
                ]),
                Value::Array(vec!["BlockRemoved".into(), Value::Array(vec![Value::from(7u64)]), "CPU".into()]),
                Value::Array(vec!["AllBlocksCleared".into()]),
                Value::Array(vec!["SomethingNew".into(), Value::from(1)]),
            ]),
            Value::from(0),
        ]));
        let b = decode_payload(&payload).unwrap();
        assert_eq!(b.data_parallel_rank, Some(0));
        assert_eq!(
            b.events,
            vec![
                EngineKvEvent::BlockStored {
                    block_hashes: vec![1],
                    parent_block_hash: None,
                    token_ids: vec![0, 1, 2, 3],
                    block_size: 4,
                    lora_id: None,
                    medium: Some("GPU".into()),
                    lora_name: Some("lora-name".into()),
                    group_idx: Some(1),
                    cache_salt: Some("salt-1".into()),
                },
                EngineKvEvent::BlockRemoved { block_hashes: vec![7], medium: Some("CPU".into()), group_idx: None },
                EngineKvEvent::AllBlocksCleared,
                EngineKvEvent::Unknown("SomethingNew".into()),
            ]
        );
    }

    /// vLLM's `OffloadingConnector.take_events`: `BlockStored(block_hashes, parent_block_hash=None,
    /// token_ids=[], lora_id=None, block_size=0, medium="CPU", lora_name=None)`.
    #[test]
    fn decodes_offloaded_blocks_reported_by_hash_alone() {
        let payload = enc(Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec![
                "BlockStored".into(),
                Value::Array(vec![Value::from(5u64)]),
                Value::Nil,
                Value::Array(vec![]),
                Value::from(0),
                Value::Nil,
                "CPU".into(),
                Value::Nil,
            ])]),
            Value::Nil,
        ]));
        let b = decode_payload(&payload).unwrap();
        assert!(
            matches!(&b.events[0], EngineKvEvent::BlockStored { block_size: 0, medium: Some(m), token_ids, .. } if m == "CPU" && token_ids.is_empty())
        );
        let with_tokens = enc(Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec![
                "BlockStored".into(),
                Value::Array(vec![Value::from(5u64)]),
                Value::Nil,
                Value::Array(vec![Value::from(1)]),
                Value::from(0),
            ])]),
        ]));
        assert!(decode_payload(&with_tokens).is_err(), "tokens with no block size cannot be keyed");
    }

    #[test]
    fn bad_frames_are_errors() {
        assert_eq!(decode_seq(&[1, 2]), Err(DecodeError::Sequence(2)));
        assert_eq!(decode_seq(&5u64.to_be_bytes()), Ok(5));
        assert!(decode_payload(&enc(Value::from(3))).is_err());
        assert!(decode_payload(&[0xc1]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics_on_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_payload(&b);
        }
    }
}
