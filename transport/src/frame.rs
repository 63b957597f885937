//! Framing on a request stream. Each side writes a length-prefixed JSON head, then raw body
//! bytes until the stream finishes: `[u32 BE len][head JSON][body ...FIN]`. A clean FIN ends a
//! body, and a reset or a lost connection is an error, so a cut never looks like an ending.

use serde::{Deserialize, Serialize};

use crate::error::TransportError;

/// Largest head accepted; a head is a few hundred bytes, so more is a broken or hostile peer.
pub const MAX_HEAD: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: String,
    pub request_id: String,
    /// Node that received the request from the client.
    pub origin: String,
    /// Engine on the receiving node that should serve it, by name.
    pub engine: String,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub status: u16,
    pub content_type: String,
    /// `NODE/ENGINE` that served it.
    pub served_by: String,
    /// The peer failed before any engine accepted the request, so the origin may send it
    /// elsewhere without running it twice.
    #[serde(default)]
    pub retryable: bool,
}

pub fn encode_head<T: Serialize>(head: &T) -> Result<Vec<u8>, TransportError> {
    let json = serde_json::to_vec(head).map_err(|e| TransportError::Frame(e.to_string()))?;
    if json.len() > MAX_HEAD {
        return Err(TransportError::Frame(format!("head of {} bytes exceeds {MAX_HEAD}", json.len())));
    }
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

pub async fn read_head<T: for<'de> Deserialize<'de>>(recv: &mut quinn::RecvStream) -> Result<T, TransportError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| TransportError::Stream(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEAD {
        return Err(TransportError::Frame(format!("head of {len} bytes exceeds {MAX_HEAD}")));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| TransportError::Stream(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| TransportError::Frame(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_roundtrip_prefix() {
        let h = ResponseHead {
            status: 200,
            content_type: "text/event-stream".into(),
            served_by: "a/b".into(),
            retryable: false,
        };
        let bytes = encode_head(&h).unwrap();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let back: ResponseHead = serde_json::from_slice(&bytes[4..]).unwrap();
        assert_eq!(back, h);
    }
}
