//! The KV-event frame bound (`node::engine::zmtp_guard`): the relay's ZMTP 3 reader, the
//! 64-byte greeting then frames of a flags byte and a 1- or 8-byte size.
//!
//! Input: what an engine's publisher sends.
//! Invariants: the relay passes a prefix of the engine's bytes, byte for byte, and nothing
//! else; every frame it passes is within `MAX_FRAME` and every message within `MAX_FRAMES`
//! frames and `MAX_MESSAGE` bytes (read back by a reader written here from the ZMTP spec); a
//! stream that keeps every bound passes whole (but a frame header the engine cut short), and
//! one that breaks a bound is refused.
#![no_main]

use kvmesh_node::engine::zmtp_guard::{MAX_FRAME, MAX_FRAMES, MAX_MESSAGE};
use libfuzzer_sys::fuzz_target;

/// Walks `bytes` as ZMTP: `Err` at the first bound broken (a stream may end anywhere).
fn check(bytes: &[u8]) -> Result<(), String> {
    let Some(mut rest) = bytes.get(64..) else { return Ok(()) };
    let (mut msg_bytes, mut msg_frames) = (0u64, 0usize);
    while let Some((&flags, after)) = rest.split_first() {
        let (size, after) = if flags & 2 != 0 {
            let Some((b, after)) = after.split_first_chunk::<8>() else { return Ok(()) };
            (u64::from_be_bytes(*b), after)
        } else {
            let Some((&b, after)) = after.split_first() else { return Ok(()) };
            (u64::from(b), after)
        };
        if size > MAX_FRAME {
            return Err(format!("frame of {size}"));
        }
        if flags & 4 == 0 {
            msg_bytes += size;
            msg_frames += 1;
            if msg_bytes > MAX_MESSAGE || msg_frames > MAX_FRAMES {
                return Err(format!("message of {msg_frames} frames, {msg_bytes} bytes"));
            }
            if flags & 1 == 0 {
                (msg_bytes, msg_frames) = (0, 0);
            }
        }
        rest = after.get(size as usize..).unwrap_or(&[]);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let (out, r) = kvmesh_node::fuzzing::zmtp_relay(data);
    assert!(data.starts_with(&out), "the relay passed bytes the engine did not send");
    assert_eq!(check(&out), Ok(()), "the relay passed a frame past a bound");
    match check(data) {
        Ok(()) => {
            // Within the bounds everything passes, but a frame header cut short (the engine
            // closed inside it): that is held back, and ends the relay.
            let held = data.len() - out.len();
            if data.len() >= 64 {
                assert!(held < 9, "a stream within the bounds was cut: {held} bytes held back");
            }
            assert!(r.is_ok() || held > 0, "a stream within the bounds was refused: {r:?}");
        }
        Err(_) => assert!(r.is_err(), "a stream past a bound was not refused"),
    }
});
