//! Gossiped values (`gossip::schema`): a peer's `node`, `load`, `usage` and `kv` values as
//! `membership` decodes them, the cells' `cell.*`/`cellm.*` values, and a KV-summary shard
//! (`policy::summary::BloomShard::decode`).
//!
//! Input: a selector byte, then the value (UTF-8, as chitchat carries it).
//! Invariants: a decoded value keeps `schema::MAX_*` (engines, models, tenants, names,
//! held requests, cards), bounding it again changes nothing, and it survives gossip (published
//! as this node publishes its own, a peer decodes the same value); a decoded shard is within
//! the summary's size and survives re-encoding, and matching keys against it never counts past
//! them.
#![no_main]

use std::fmt::Debug;
use std::sync::Arc;

use kvmesh_gossip::schema::{
    CellMember, CellReport, KvSummarySlot, LoadReport, NodeMeta, UsageReport, MAX_ENGINES_PER_NODE, MAX_HELD,
    MAX_MODELS, MAX_NAME_BYTES, MAX_TENANTS,
};
use kvmesh_policy::models::MAX_CARDS_PER_ENGINE;
use kvmesh_policy::summary::{self, BloomShard};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

/// Published, then decoded by a peer.
fn regossip<T: Serialize + PartialEq + Debug>(v: &T, decode: impl Fn(&str) -> Option<T>) {
    let wire = serde_json::to_string(v).expect("a decoded value encodes");
    let back = decode(&wire).unwrap_or_else(|| panic!("{wire} does not decode"));
    assert_eq!(&back, v, "changed through gossip: {wire}");
}

fn plain<T: Serialize + DeserializeOwned + PartialEq + Debug>(s: &str) {
    if let Ok(v) = serde_json::from_str::<T>(s) {
        regossip(&v, |w| serde_json::from_str(w).ok());
    }
}

fn names_ok(names: &[String]) -> bool {
    names.len() <= MAX_MODELS && names.iter().all(|m| m.len() <= MAX_NAME_BYTES)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    let Ok(s) = std::str::from_utf8(rest) else { return };
    match sel % 7 {
        0 => {
            if let Some(m) = NodeMeta::decode(s) {
                assert!(names_ok(&m.models));
                assert_eq!(m.clone().bounded(), m);
                regossip(&m, NodeMeta::decode);
            }
        }
        1 => {
            if let Some(l) = LoadReport::decode(s) {
                assert!(l.engines.len() <= MAX_ENGINES_PER_NODE && l.held <= MAX_HELD);
                for e in &l.engines {
                    assert!(e.name.len() <= MAX_NAME_BYTES && names_ok(&e.models));
                    assert!(e.cards.len() <= MAX_CARDS_PER_ENGINE);
                }
                assert_eq!(l.clone().bounded(), l);
                regossip(&l, LoadReport::decode);
            }
        }
        2 => {
            if let Some(u) = UsageReport::decode(s) {
                assert!(u.tenants.len() <= MAX_TENANTS);
                assert!(u.tenants.keys().all(|t| t.len() <= MAX_NAME_BYTES));
                assert_eq!(u.clone().bounded(), u);
                regossip(&u, UsageReport::decode);
            }
        }
        3 => {
            if let Some(k) = KvSummarySlot::decode(s) {
                regossip(&k, KvSummarySlot::decode);
            }
        }
        4 => plain::<CellReport>(s),
        5 => plain::<Vec<CellMember>>(s),
        _ => {
            if let Some(shard) = BloomShard::decode(s) {
                let wire = shard.encode();
                assert_eq!(BloomShard::decode(&wire).as_ref(), Some(&shard), "changed through gossip");
                // Keys from the input's bytes, all in this shard's slot.
                let keys: Vec<u64> = rest
                    .chunks(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b[..c.len()].copy_from_slice(c);
                        u64::from_le_bytes(b)
                    })
                    .collect();
                let shards: Vec<Option<Arc<BloomShard>>> = vec![Some(Arc::new(shard)); summary::SHARDS];
                for stride in [1, 8, summary::MAX_STRIDE] {
                    assert!(summary::matched_blocks(&shards, &keys, stride) <= keys.len());
                }
                assert_eq!(shards[0].as_ref().unwrap().difference(shards[1].as_ref().unwrap()), 0.0);
            }
        }
    }
});
