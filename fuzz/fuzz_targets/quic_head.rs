//! QUIC request-stream heads (`transport::frame`): `decode_head`, the in-memory `read_head`,
//! as a `RequestHead`, a `ResponseHead` and a `Placement`, and a head's prompt digest.
//!
//! Input: a frame as a peer sends it, `[u32 BE len][head JSON][body]`.
//! Invariants: an accepted head is at most `MAX_HEAD` bytes, and what follows it is the body,
//! untouched; a decoded head survives the wire (encode, then decode, gives it back, within
//! `MAX_HEAD`); what a peer asks is what `RequestHead::new` would send for it; a digest's keys
//! are at most `MAX_DIGEST_KEYS` and survive re-encoding.
#![no_main]

use kvmesh_transport::frame::{self, MAX_DIGEST_KEYS, MAX_HEAD};
use kvmesh_transport::{Placement, PromptDigest, RequestHead, ResponseHead};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let (head, body) = frame::decode_head::<T>(data).ok()?;
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    assert!(len <= MAX_HEAD);
    assert_eq!(body, &data[4 + len..], "the body is what follows the head");
    let bytes = frame::encode_head(&head).expect("a decoded head encodes within MAX_HEAD");
    let (back, rest) = frame::decode_head::<T>(&bytes).expect("an encoded head decodes");
    assert!(rest.is_empty());
    assert_eq!(back, head, "the head did not survive the wire");
    Some(head)
}

fuzz_target!(|data: &[u8]| {
    if let Some(head) = roundtrip::<RequestHead>(data) {
        let ask = head.ask();
        let again = RequestHead::new(ask.clone(), &head.path, &head.request_id, &head.origin, head.stream);
        assert_eq!(again.ask(), ask);
        if let Some(d) = &head.prompt {
            if let Ok(keys) = d.keys() {
                assert!(keys.len() <= MAX_DIGEST_KEYS);
                let back = PromptDigest::new(d.tokens, d.block_size, &keys).expect("within MAX_DIGEST_KEYS");
                assert_eq!(back.keys().unwrap(), keys);
            }
        }
    }
    let _ = roundtrip::<ResponseHead>(data);
    let _ = roundtrip::<Placement>(data);
    // A placement answer is read as a bare body (`node::router::cells`).
    let _ = serde_json::from_slice::<Placement>(data);
});
