//! Reading what a chitchat 0.11 message would change, before chitchat applies it.
//!
//! chitchat applies a delta to its state as soon as it decodes it, and its delta type is
//! private to the crate, so the only place to refuse a forged value is the transport, on the
//! bytes. This module reads those bytes as chitchat 0.11 (pinned `=0.11.0`) writes them: the
//! message envelope (magic number, protocol version, type), the digest of a SYN-ACK, and the
//! delta, a stream of blocks (zstd-compressed or not) holding operations: a node header, a
//! key-value mutation, or a node's maximum version. Primitive fields are decoded with chitchat's
//! own public `Deserializable` implementations. `rewrite` writes a message again without the
//! digest members and node sections the checks left out (the delta as raw blocks).

use chitchat::{ChitchatId, Deserializable};

/// chitchat's message magic number (little-endian on the wire) and its one protocol version.
const MAGIC: u16 = 45_139;
const PROTOCOL_V0: u8 = 0;
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
const ACK: u8 = 2;
const BAD_CLUSTER: u8 = 3;

/// A delta's decompressed operations may not exceed this. chitchat cuts a delta at 65,507
/// bytes compressed, written in blocks of 16 KiB before compression.
const MAX_DECOMPRESSED: usize = 4 << 20;
/// A compressed block decompresses into at most this, as chitchat's reader allows.
const MAX_BLOCK: usize = u16::MAX as usize;

/// A key-value mutation's status: only `Set` is ever written by kvmesh.
pub const STATUS_SET: u8 = 0;

/// The part of a delta about one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSection {
    pub id: ChitchatId,
    pub last_gc_version: u64,
    pub from_version_excluded: u64,
    pub key_values: Vec<KeyValue>,
    /// Set when the section raises the node's maximum version without values (after a GC).
    pub set_max_version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    pub version: u64,
    /// 0 set, 1 deleted, 2 deleted after a TTL.
    pub status: u8,
}

/// The node sections a message's delta carries: none for a SYN (a digest only) or a
/// BAD_CLUSTER. An error for bytes chitchat 0.11 would not have written.
pub fn delta_sections(payload: &[u8]) -> Result<Vec<NodeSection>, String> {
    Ok(read(payload)?.sections)
}

/// A message as read: its digest's members (each with its bytes' span in the message, so
/// that the digest can be written again without some of them) and its delta's sections.
#[derive(Debug, Default)]
pub struct Message {
    /// Where the digest's member count starts; `None` without a digest.
    pub digest_at: Option<usize>,
    pub digest: Vec<(ChitchatId, std::ops::Range<usize>)>,
    /// Where the digest ends.
    pub digest_end: usize,
    /// Where the delta starts; `None` without a delta.
    pub delta_at: Option<usize>,
    pub sections: Vec<NodeSection>,
}

/// Reads a message: an error for bytes chitchat 0.11 would not have written.
pub fn read(payload: &[u8]) -> Result<Message, String> {
    let mut buf = payload;
    let at = |buf: &[u8]| payload.len() - buf.len();
    let magic = u16::from_le_bytes(take::<2>(&mut buf)?);
    if magic != MAGIC {
        return Err("not a chitchat message (magic number)".into());
    }
    let [version, kind] = take::<2>(&mut buf)?;
    if version != PROTOCOL_V0 {
        return Err(format!("chitchat protocol version {version}"));
    }
    let mut msg = Message::default();
    if kind == SYN || kind == SYN_ACK {
        msg.digest_at = Some(at(buf));
        let nodes = field::<u16>(&mut buf)?;
        for _ in 0..nodes {
            let start = at(buf);
            let id = field::<ChitchatId>(&mut buf)?;
            for _ in 0..3 {
                field::<u64>(&mut buf)?;
            }
            msg.digest.push((id, start..at(buf)));
        }
        msg.digest_end = at(buf);
    }
    match kind {
        SYN => {
            field::<String>(&mut buf)?;
        }
        BAD_CLUSTER => {}
        SYN_ACK | ACK => {
            msg.delta_at = Some(at(buf));
            msg.sections = sections(&decompress(&mut buf)?)?;
        }
        other => return Err(format!("chitchat message type {other}")),
    }
    Ok(msg)
}

/// `payload` written again with its digest keeping only the members `keep_member` accepts and
/// its delta only the sections `keep_section` marks (`keep_section[i]` for `msg.sections[i]`;
/// missing entries are kept); `None` when nothing is left out. A delta written again is a
/// stream of raw blocks, as chitchat's reader takes them.
pub fn rewrite(
    payload: &[u8],
    msg: &Message,
    keep_member: impl Fn(&ChitchatId) -> bool,
    keep_section: &[bool],
) -> Option<Vec<u8>> {
    let members_cut = msg.digest.iter().any(|(id, _)| !keep_member(id));
    let sections_cut = keep_section.iter().take(msg.sections.len()).any(|k| !k);
    if !members_cut && !sections_cut {
        return None;
    }
    let mut out = Vec::with_capacity(payload.len());
    let head_end = msg.digest_at.unwrap_or(msg.delta_at.unwrap_or(payload.len()));
    out.extend_from_slice(&payload[..head_end]);
    if msg.digest_at.is_some() {
        let kept: Vec<_> = msg.digest.iter().filter(|(id, _)| keep_member(id)).collect();
        out.extend_from_slice(&(kept.len() as u16).to_le_bytes());
        for (_, span) in kept {
            out.extend_from_slice(&payload[span.clone()]);
        }
    }
    match msg.delta_at {
        None => out.extend_from_slice(&payload[msg.digest_end..]),
        Some(_) if !sections_cut => out.extend_from_slice(&payload[msg.digest_end.max(head_end)..]),
        Some(_) => {
            let kept = msg.sections.iter().zip(keep_section.iter().chain(std::iter::repeat(&true)));
            write_delta(kept.filter(|(_, k)| **k).map(|(s, _)| s), &mut out);
        }
    }
    Some(out)
}

/// A delta holding `sections`, as chitchat reads it: their operations in raw blocks, then the
/// end block.
pub fn write_delta<'a>(sections: impl IntoIterator<Item = &'a NodeSection>, out: &mut Vec<u8>) {
    let mut ops = Vec::new();
    for s in sections {
        write_section(s, &mut ops);
    }
    for block in ops.chunks(MAX_BLOCK) {
        out.push(2);
        out.extend_from_slice(&(block.len() as u16).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.push(0);
}

/// A node section's operations, as chitchat writes them.
fn write_section(s: &NodeSection, out: &mut Vec<u8>) {
    use chitchat::Serializable;
    out.push(0);
    s.id.serialize(out);
    s.last_gc_version.serialize(out);
    s.from_version_excluded.serialize(out);
    for kv in &s.key_values {
        out.push(1);
        kv.key.serialize(out);
        kv.value.serialize(out);
        kv.version.serialize(out);
        out.push(kv.status);
    }
    if let Some(max) = s.set_max_version {
        out.push(2);
        max.serialize(out);
    }
}

fn take<const N: usize>(buf: &mut &[u8]) -> Result<[u8; N], String> {
    <[u8; N]>::deserialize(buf).map_err(|e| e.to_string())
}

fn field<T: Deserializable>(buf: &mut &[u8]) -> Result<T, String> {
    T::deserialize(buf).map_err(|e| e.to_string())
}

/// The delta's blocks, concatenated: type 0 ends, 1 is zstd with a u16 length, 2 is raw with a
/// u16 length.
fn decompress(buf: &mut &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let [block] = take::<1>(buf)?;
        if block == 0 {
            return Ok(out);
        }
        let len = usize::from(field::<u16>(buf)?);
        let bytes = buf.get(..len).ok_or("a block past the message's end")?;
        *buf = &buf[len..];
        match block {
            1 => {
                let plain = zstd::bulk::decompress(bytes, MAX_BLOCK).map_err(|e| format!("a block: {e}"))?;
                out.extend_from_slice(&plain);
            }
            2 => out.extend_from_slice(bytes),
            other => return Err(format!("block type {other}")),
        }
        if out.len() > MAX_DECOMPRESSED {
            return Err(format!("a delta over {} MiB", MAX_DECOMPRESSED >> 20));
        }
    }
}

/// Operations: tag 0 a node header (id, last GC version, from version), 1 a key-value mutation
/// of the last node (key, value, version, status), 2 the last node's max version.
fn sections(mut ops: &[u8]) -> Result<Vec<NodeSection>, String> {
    let buf = &mut ops;
    let mut out: Vec<NodeSection> = Vec::new();
    while !buf.is_empty() {
        let [tag] = take::<1>(buf)?;
        match tag {
            0 => out.push(NodeSection {
                id: field(buf)?,
                last_gc_version: field(buf)?,
                from_version_excluded: field(buf)?,
                key_values: Vec::new(),
                set_max_version: None,
            }),
            1 => {
                let kv = KeyValue { key: field(buf)?, value: field(buf)?, version: field(buf)?, status: field(buf)? };
                out.last_mut().ok_or("a value before any node")?.key_values.push(kv);
            }
            2 => {
                let max = field::<u64>(buf)?;
                out.last_mut().ok_or("a max version before any node")?.set_max_version = Some(max);
            }
            other => return Err(format!("delta operation {other}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::Serializable;

    fn ack(blocks: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut msg = MAGIC.to_le_bytes().to_vec();
        msg.extend_from_slice(&[PROTOCOL_V0, ACK]);
        for (kind, bytes) in blocks {
            msg.push(*kind);
            (bytes.len() as u16).serialize(&mut msg);
            msg.extend_from_slice(bytes);
        }
        msg.push(0);
        msg
    }

    fn ops() -> (ChitchatId, Vec<u8>) {
        let id = ChitchatId::new("b".to_string(), 7, "127.0.0.1:9".parse().unwrap());
        let mut ops = vec![0u8];
        id.serialize(&mut ops);
        0u64.serialize(&mut ops);
        3u64.serialize(&mut ops);
        ops.push(1);
        "load".to_string().serialize(&mut ops);
        "sig.{}".to_string().serialize(&mut ops);
        4u64.serialize(&mut ops);
        ops.push(STATUS_SET);
        (id, ops)
    }

    #[test]
    fn a_delta_reads_alike_from_raw_and_compressed_blocks() {
        let (id, ops) = ops();
        let want = vec![NodeSection {
            id,
            last_gc_version: 0,
            from_version_excluded: 3,
            key_values: vec![KeyValue { key: "load".into(), value: "sig.{}".into(), version: 4, status: 0 }],
            set_max_version: None,
        }];
        assert_eq!(delta_sections(&ack(&[(2, ops.clone())])).unwrap(), want);
        let packed = zstd::bulk::compress(&ops, 0).unwrap();
        assert_eq!(delta_sections(&ack(&[(1, packed)])).unwrap(), want);
        // Split across blocks mid-operation, as chitchat's writer may.
        let (head, tail) = ops.split_at(10);
        assert_eq!(delta_sections(&ack(&[(2, head.to_vec()), (2, tail.to_vec())])).unwrap(), want);
    }

    #[test]
    fn mangled_messages_are_errors_never_panics() {
        let (_, ops) = ops();
        let msg = ack(&[(2, ops)]);
        for cut in 0..msg.len() - 1 {
            assert!(delta_sections(&msg[..cut]).is_err(), "a message cut at {cut} read whole");
        }
        for i in 0..msg.len() {
            for bit in 0..8 {
                let mut m = msg.clone();
                m[i] ^= 1 << bit;
                let _ = delta_sections(&m);
            }
        }
        // A value before any node, and an unknown operation.
        assert!(delta_sections(&ack(&[(2, vec![1, 0, 0])])).is_err());
        assert!(delta_sections(&ack(&[(2, vec![9])])).is_err());
        // A SYN carries no delta.
        assert_eq!(delta_sections(&syn(&[])).unwrap(), Vec::new());
    }

    fn syn(members: &[&ChitchatId]) -> Vec<u8> {
        let mut msg = MAGIC.to_le_bytes().to_vec();
        msg.extend_from_slice(&[PROTOCOL_V0, SYN]);
        (members.len() as u16).serialize(&mut msg);
        for id in members {
            id.serialize(&mut msg);
            for n in [5u64, 0, 9] {
                n.serialize(&mut msg);
            }
        }
        "cluster".to_string().serialize(&mut msg);
        msg
    }

    #[test]
    fn a_delta_is_written_again_without_the_sections_left_out() {
        let (b, b_ops) = ops();
        let c = ChitchatId::new("c".to_string(), 3, "127.0.0.1:3".parse().unwrap());
        let mut c_ops = vec![0u8];
        c.serialize(&mut c_ops);
        0u64.serialize(&mut c_ops);
        0u64.serialize(&mut c_ops);
        let packed = zstd::bulk::compress(&[b_ops, c_ops].concat(), 0).unwrap();
        let msg = ack(&[(1, packed)]);
        let read_back = read(&msg).unwrap();
        assert_eq!(read_back.sections.len(), 2);
        assert!(rewrite(&msg, &read_back, |_| true, &[true, true]).is_none());
        let without_b = rewrite(&msg, &read_back, |_| true, &[false, true]).unwrap();
        let again = read(&without_b).unwrap();
        assert_eq!(again.sections, vec![read_back.sections[1].clone()]);
        assert_eq!(again.sections[0].id, c);
        // chitchat reads it as a message of its own.
        assert!(matches!(
            chitchat::ChitchatMessage::deserialize(&mut without_b.as_slice()),
            Ok(chitchat::ChitchatMessage::Ack { .. })
        ));
        let _ = b;
    }

    #[test]
    fn a_digest_is_written_again_without_the_members_left_out() {
        let a = ChitchatId::new("a".to_string(), 1, "127.0.0.1:1".parse().unwrap());
        let b = ChitchatId::new("b".to_string(), 2, "127.0.0.1:2".parse().unwrap());
        let msg = syn(&[&a, &b]);
        let read_back = read(&msg).unwrap();
        assert_eq!(read_back.digest.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(), [a.clone(), b.clone()]);
        assert!(rewrite(&msg, &read_back, |_| true, &[]).is_none());
        let filtered = rewrite(&msg, &read_back, |id| *id == b, &[]).unwrap();
        assert_eq!(filtered, syn(&[&b]));
        // chitchat reads it as a message of its own.
        assert!(matches!(
            chitchat::ChitchatMessage::deserialize(&mut filtered.as_slice()),
            Ok(chitchat::ChitchatMessage::Syn { .. })
        ));
    }
}
