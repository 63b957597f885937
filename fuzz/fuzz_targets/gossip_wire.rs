//! chitchat messages as the gossip transport reads them (`gossip::wire`) before chitchat does,
//! checked against chitchat 0.11's own decoder.
//!
//! Input: a message's bytes.
//! Invariants: `read` never panics; a message chitchat decodes, `read` reads too (the
//! transport refuses nothing chitchat would take, but for a delta past its decompressed bound);
//! a message written again without some digest members and node sections (`rewrite`) is one
//! chitchat decodes, and reads back as exactly the sections kept.
#![no_main]

use chitchat::{ChitchatMessage, Deserializable};
use kvmesh_gossip::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let theirs = ChitchatMessage::deserialize(&mut &data[..]);
    let ours = wire::read(data);
    if theirs.is_ok() {
        if let Err(why) = &ours {
            assert!(why.contains("MiB"), "chitchat decodes it, the transport does not: {why}");
        }
    }
    let (Ok(_), Ok(msg)) = (theirs, ours) else { return };
    // Every other section and every other digest member left out.
    let keep: Vec<bool> = (0..msg.sections.len()).map(|i| i % 2 == 1).collect();
    let members: Vec<_> = msg.digest.iter().step_by(2).map(|(id, _)| id.clone()).collect();
    if let Some(again) = wire::rewrite(data, &msg, |id| members.contains(id), &keep) {
        assert!(
            ChitchatMessage::deserialize(&mut again.as_slice()).is_ok(),
            "chitchat refuses the message written again"
        );
        let back = wire::read(&again).expect("the message written again reads");
        let kept: Vec<_> = msg.sections.iter().zip(&keep).filter(|(_, k)| **k).map(|(s, _)| s.clone()).collect();
        assert_eq!(back.sections, kept, "other sections than kept");
        assert!(back.digest.iter().all(|(id, _)| members.contains(id)), "a member left out came back");
    }
});
