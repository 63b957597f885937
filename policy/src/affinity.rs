//! Session affinity: a client that names a session (`x-session-affinity`, as AIPerf sends it;
//! a header the operator names; OpenAI's `user` or `safety_identifier`; a Responses
//! `conversation`; Anthropic's `metadata.user_id`) gets a stable preference for one engine
//! among those predicted near-equal for its request. The preference is a rendezvous hash of the
//! session and each engine's name, so every node prefers the same engine without talking, and
//! an engine leaving moves only its own sessions. It never outweighs load or cache: only engines
//! within the scorer's tolerance of the best, plus `SESSION_SLACK_MS`, are ranked
//! (`score::Prefer::Ranked`).
//!
//! A request without a session gets the same kind of preference for its prompt's prefix
//! (`placement_key`, `prefix_ranks`): a prefix no engine is known to hold goes to the same
//! engine from every node.

use serde_json::{Map, Value};

use crate::endpoint::Endpoint;

/// How much slower than the best candidate a session's engine may be predicted and still be
/// preferred (beyond the scorer's relative tolerance): about a network hop and a short queue.
/// For short prompts predictions are a few ms, where a relative tolerance alone would let a
/// peer's round trip decide.
pub const SESSION_SLACK_MS: f64 = 20.0;

/// Longest session key kept; a longer one is cut (it is hashed, never shown).
pub const MAX_SESSION_KEY: usize = 256;

/// The session a request's body names, if any.
pub fn session_of_body(endpoint: Endpoint, obj: &Map<String, Value>) -> Option<String> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).filter(|s| !s.is_empty()).map(bounded);
    match endpoint {
        Endpoint::Messages | Endpoint::MessagesCountTokens => text(obj.get("metadata").and_then(|m| m.get("user_id"))),
        Endpoint::Responses => {
            // A conversation is a string id or `{"id": ...}`.
            let conversation = obj.get("conversation").and_then(|c| c.get("id").or(Some(c)));
            text(conversation).or_else(|| text(obj.get("safety_identifier"))).or_else(|| text(obj.get("user")))
        }
        _ => text(obj.get("safety_identifier")).or_else(|| text(obj.get("user"))),
    }
}

/// A session key from a header value.
pub fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_SESSION_KEY);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// The rank of each engine (by its `node/engine` label) for `session`: higher is preferred.
pub fn ranks(session: &str, labels: &[String]) -> Vec<u64> {
    rendezvous(session.as_bytes(), labels)
}

/// How deep into a prompt its placement key is taken, in tokens: prompts that share this much
/// of their beginning are placed alike while no engine is known to hold them. Deep enough that a
/// common chat-template header or a short system prompt does not make every prompt one
/// placement; shallow enough that prompts sharing a document or a long system prompt do.
pub const PLACEMENT_DEPTH_TOKENS: usize = 512;

/// The block key that places a prompt (`prefix_ranks`): the key of the block that ends at
/// `PLACEMENT_DEPTH_TOKENS`, or of its last full block when the prompt is shorter; `None` for
/// a prompt without a full block. Chained keys, so the key stands for the whole prefix up to it.
pub fn placement_key(keys: &[u64], block_size: u32) -> Option<u64> {
    crate::blocks::key_at_depth(keys, PLACEMENT_DEPTH_TOKENS.div_ceil(block_size.max(1) as usize))
}

/// The rank of each engine for a prompt's placement key: a rendezvous hash, so that every node
/// that sees the same engines places a prefix nobody is known to hold on the same engine,
/// without talking (where each node drew at random, the same new prefix landed on several
/// engines in the same gossip round, and under full caches the copies evicted prefixes in use:
/// BENCHMARKS.md, *Routers that agree when caches are full*). Like a session's ranks, they only
/// choose among engines predicted near-equal, within the tolerance plus `SESSION_SLACK_MS`
/// (`score::Prefer::Placed`), so load still bounds how much one engine takes; and only while
/// no candidate is believed to hold the prefix that deep (`candidates::decide`).
pub fn prefix_ranks(key: u64, labels: &[String]) -> Vec<u64> {
    rendezvous(&key.to_le_bytes(), labels)
}

fn rendezvous(item: &[u8], labels: &[String]) -> Vec<u64> {
    labels
        .iter()
        .map(|l| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(item);
            h.update(&[0]);
            h.update(l.as_bytes());
            h.digest()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_come_from_the_fields_each_api_has() {
        let o = |s: &str| serde_json::from_str::<Map<String, Value>>(s).unwrap();
        assert_eq!(session_of_body(Endpoint::Chat, &o(r#"{"user":"u1"}"#)).as_deref(), Some("u1"));
        assert_eq!(
            session_of_body(Endpoint::Chat, &o(r#"{"user":"u1","safety_identifier":"s"}"#)).as_deref(),
            Some("s")
        );
        assert_eq!(session_of_body(Endpoint::Responses, &o(r#"{"conversation":{"id":"c"}}"#)).as_deref(), Some("c"));
        assert_eq!(session_of_body(Endpoint::Responses, &o(r#"{"conversation":"c2"}"#)).as_deref(), Some("c2"));
        assert_eq!(session_of_body(Endpoint::Messages, &o(r#"{"metadata":{"user_id":"a"}}"#)).as_deref(), Some("a"));
        assert_eq!(session_of_body(Endpoint::Chat, &o(r#"{"user":""}"#)), None);
        assert_eq!(bounded(&"é".repeat(200)).len(), 256);
    }

    #[test]
    fn a_session_prefers_one_engine_and_moves_only_when_it_leaves() {
        let labels: Vec<String> = (0..8).map(|i| format!("n{i}/e0")).collect();
        let best = |s: &str, l: &[String]| {
            let r = ranks(s, l);
            l[(0..l.len()).max_by_key(|&i| r[i]).unwrap()].clone()
        };
        let mut moved = 0;
        let mut spread = std::collections::HashSet::new();
        for s in 0..400 {
            let key = format!("session-{s}");
            let before = best(&key, &labels);
            spread.insert(before.clone());
            let fewer: Vec<String> = labels.iter().filter(|l| *l != "n3/e0").cloned().collect();
            let after = best(&key, &fewer);
            if before != after {
                assert_eq!(before, "n3/e0", "only the leaving engine's sessions move");
                moved += 1;
            }
        }
        assert_eq!(spread.len(), 8, "sessions spread over every engine");
        assert!((20..=80).contains(&moved), "about 1/8 of the sessions moved: {moved}");
    }

    #[test]
    fn every_node_places_a_prefix_on_the_same_engine_whatever_its_order() {
        let labels: Vec<String> = (0..16).map(|i| format!("n{i}/e0")).collect();
        let placed = |key: u64, l: &[String]| {
            let r = prefix_ranks(key, l);
            l[(0..l.len()).max_by_key(|&i| r[i]).unwrap()].clone()
        };
        let mut spread = std::collections::HashMap::<String, usize>::new();
        for key in 0..1_600u64 {
            let key = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let here = placed(key, &labels);
            // Another node lists the same engines in another order (its own first).
            let mut there = labels.clone();
            there.rotate_left((key % 16) as usize);
            there.reverse();
            assert_eq!(placed(key, &there), here, "key {key}");
            *spread.entry(here).or_default() += 1;
        }
        assert_eq!(spread.len(), 16);
        assert!(spread.values().all(|&n| (50..=150).contains(&n)), "about 100 prefixes each: {spread:?}");
    }

    #[test]
    fn the_placement_key_is_the_prefix_at_a_fixed_depth() {
        let keys: Vec<u64> = (100..200).collect();
        // 512 tokens at block size 16: the 32nd block.
        assert_eq!(placement_key(&keys, 16), Some(131));
        assert_eq!(placement_key(&keys, 64), Some(107));
        assert_eq!(placement_key(&keys[..5], 16), Some(104), "a shorter prompt: its last full block");
        assert_eq!(placement_key(&[], 16), None);
    }
}
