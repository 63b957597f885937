//! KV-cache events (`node::engine::kv_events`): `decode_seq` and `decode_payload`, vLLM's
//! msgpack `[timestamp, [event, ...], dp_rank]`.
//!
//! Input: a message's sequence frame or payload frame (selector byte, then the frame).
//! Invariants: a sequence frame decodes iff it is 8 bytes, to its big-endian value; a decoded
//! batch survives vLLM's encoding (written back in vLLM's field order, it decodes to the same
//! batch: nothing is invented or lost between the wire and the index); a stored block with
//! tokens has a block size.
#![no_main]

use kvmesh_node::engine::kv_events::{decode_payload, decode_seq, EngineKvEvent, EventBatch};
use libfuzzer_sys::fuzz_target;
use rmpv::Value;

fn opt_str(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Nil, Value::from)
}

fn opt_i64(i: Option<i64>) -> Value {
    i.map_or(Value::Nil, Value::from)
}

/// The batch as vLLM writes it (`vllm/distributed/kv_events.py`).
fn encode(b: &EventBatch) -> Vec<u8> {
    let events = b
        .events
        .iter()
        .map(|e| match e {
            EngineKvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                group_idx,
                cache_salt,
            } => Value::Array(vec![
                "BlockStored".into(),
                Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
                parent_block_hash.map_or(Value::Nil, Value::from),
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
                Value::from(*block_size),
                opt_i64(*lora_id),
                opt_str(medium),
                opt_str(lora_name),
                match cache_salt {
                    Some(s) => Value::Array(vec![Value::Array(vec![Value::from(s.as_str())])]),
                    None => Value::Nil,
                },
                opt_i64(*group_idx),
            ]),
            EngineKvEvent::BlockRemoved { block_hashes, medium, group_idx } => Value::Array(vec![
                "BlockRemoved".into(),
                Value::Array(block_hashes.iter().map(|&h| Value::from(h)).collect()),
                opt_str(medium),
                opt_i64(*group_idx),
            ]),
            EngineKvEvent::AllBlocksCleared => Value::Array(vec!["AllBlocksCleared".into()]),
            EngineKvEvent::Unknown(tag) => Value::Array(vec![Value::from(tag.as_str())]),
        })
        .collect();
    let v = Value::Array(vec![Value::F64(b.timestamp), Value::Array(events), opt_i64(b.data_parallel_rank)]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, frame)) = data.split_first() else { return };
    if sel & 1 == 0 {
        match decode_seq(frame) {
            Ok(seq) => assert_eq!(seq.to_be_bytes().as_slice(), frame),
            Err(_) => assert_ne!(frame.len(), 8),
        }
        return;
    }
    let Ok(batch) = decode_payload(frame) else { return };
    for e in &batch.events {
        if let EngineKvEvent::BlockStored { token_ids, block_size, parent_block_hash, cache_salt, .. } = e {
            assert!(*block_size > 0 || token_ids.is_empty());
            assert!(cache_salt.is_none() || parent_block_hash.is_none(), "a salt read off a chain's middle");
        }
    }
    let back = decode_payload(&encode(&batch)).expect("a decoded batch re-encodes");
    // NaN is not equal to itself: compare timestamps by bits.
    assert_eq!(back.timestamp.to_bits(), batch.timestamp.to_bits());
    assert_eq!(back.events, batch.events, "events changed through vLLM's encoding");
    assert_eq!(back.data_parallel_rank, batch.data_parallel_rank);
});
