//! Audit lines: `kvmesh audit verify` (`node::audit::verify`, through
//! `kvmesh_node::fuzzing::audit_verify`) over a chain of one to three files.
//!
//! Input: a flags byte, then the files' lines; a line `---` starts the next file. With the
//! flag's low bit set, a line that is a JSON object is sealed as the node seals a record: `PREV`
//! in it becomes the hash of the record before (the genesis hash first), and the hash of the
//! object is appended as its last member; so the search reaches the checks past the hash.
//! Invariants: `verify` answers (a report or a break, never a panic) for any bytes, UTF-8 or
//! not; a report adds up (records = requests + gaps, consecutive seqs from the first to the
//! last, a 64-hex-digit last hash, `starts_mid_chain` iff the first seq is not 0, a torn tail
//! only where the last file does not end in a newline); a break names a line of a given file.
#![no_main]

use kvmesh_node::audit::GENESIS;
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// The record line for the object `body`, chained after `prev`, as `node::audit` writes it.
fn seal(body: &str, prev: &str) -> (String, String) {
    let body = body.replace("PREV", prev);
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    (format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]), hash)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mut files: Vec<Vec<u8>> = vec![Vec::new()];
    let mut prev = GENESIS.to_owned();
    let lines: Vec<&[u8]> = rest.split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == b"---" && files.len() < 3 {
            files.push(Vec::new());
            continue;
        }
        let file = files.last_mut().unwrap();
        match std::str::from_utf8(line) {
            Ok(s) if flags & 1 == 1 && s.starts_with('{') && s.ends_with('}') => {
                let (sealed, hash) = seal(s, &prev);
                file.extend_from_slice(sealed.as_bytes());
                prev = hash;
            }
            _ => file.extend_from_slice(line),
        }
        if i + 1 < lines.len() {
            file.push(b'\n');
        }
    }
    let views: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    match kvmesh_node::fuzzing::audit_verify(&views) {
        Ok(rep) => {
            assert_eq!(rep.records, rep.requests + rep.gaps);
            match (rep.first_seq, rep.last_seq) {
                (Some(first), Some(last)) => {
                    assert!(rep.records > 0);
                    assert_eq!(last.checked_sub(first), Some(rep.records - 1), "seqs are not consecutive");
                    assert_eq!(rep.starts_mid_chain, first != 0);
                    let h = rep.last_hash.as_deref().unwrap_or_default();
                    assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()), "{h:?}");
                }
                (None, None) => assert!(rep.records == 0 && rep.last_hash.is_none()),
                other => panic!("first and last seq disagree: {other:?}"),
            }
            if rep.torn_tail {
                assert!(views.last().is_some_and(|f| !f.is_empty() && !f.ends_with(b"\n")));
            }
        }
        Err(brk) => {
            let fi: usize = brk.file.parse().expect("a file's name");
            assert!(fi < views.len() && brk.line >= 1, "{brk}");
        }
    }
});
