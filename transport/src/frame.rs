//! Framing on a request stream. Each side writes a length-prefixed JSON head, then raw body
//! bytes until the stream finishes: `[u32 BE len][head JSON][body ...FIN]`. A clean FIN ends a
//! body, and a reset or a lost connection is an error, so a cut never looks like an ending.

use serde::{Deserialize, Serialize};

use crate::error::TransportError;

/// Largest head accepted. A head is a few hundred bytes plus, at most, a prompt digest of
/// [`MAX_DIGEST_KEYS`] block keys; more is a broken or hostile peer.
pub const MAX_HEAD: usize = 256 * 1024;

/// Block keys carried in one head: a 1M-token prompt at block size 16 (the origin leaves the
/// digest out above this, and the peer tokenizes).
pub const MAX_DIGEST_KEYS: usize = 16_384;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub path: String,
    pub request_id: String,
    /// Node that received the request from the client.
    pub origin: String,
    /// Engine on the receiving node that should serve it, by name.
    pub engine: String,
    pub stream: bool,
    /// The prompt as the origin tokenized it, so the peer can match it against its engines'
    /// exact indexes without tokenizing again. Absent when the origin has no tokenizer for the
    /// model or named the engine itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<PromptDigest>,
    /// Sent from another cell to the prompt's home node (`policy::cells`): route it among this
    /// node's cell, which the origin cannot see. The origin admitted and audits it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub relay: bool,
    /// Asks the prompt's home node in another cell where the request should go instead of
    /// sending it (`policy::cells`): the body is empty, `prompt` carries the block keys, and the
    /// answer's body is a [`Placement`]. The origin then forwards the request itself, so the
    /// prompt crosses the mesh once, as in a flat mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<PlaceQuery>,
    /// The body's content type when it is not JSON (a multipart form with its boundary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The tenant the origin admitted the request for (it owns the responses the request makes,
    /// `node::router::stored`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The W3C trace context to continue (`traceparent`, `tracestate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
    /// Flow control at the origin: the request's priority band (`critical`, `standard`,
    /// `sheddable`), its tenant's weight, and how long it may still wait for an engine (ms,
    /// when sent). The serving node holds it by these while its own engines are saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_ms: Option<u64>,
    /// Prompt tokens as the origin counted them (0: unknown): the request's cost in the
    /// serving node's fair queue when no digest comes with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u32>,
}

/// What a peer asks of this node, decoded from a [`RequestHead`]'s fields (the wire format
/// keeps the flags older nodes send and read).
#[derive(Debug, Clone, PartialEq)]
pub enum PeerRequest {
    /// Serve the request on this engine of the receiving node.
    Engine(String),
    /// Serve it on whichever of the receiving node's engines fits best: the origin sent the
    /// prompt's block keys and leaves the choice to the node's exact indexes.
    AnyEngine,
    /// Route it within the receiving node's cell: it is the prompt's home node there.
    Relay,
    /// Answer where in the receiving node's cell the request should go ([`Placement`]).
    Place(PlaceQuery),
}

impl RequestHead {
    /// A head asking `ask` for the request at `path`.
    pub fn new(ask: PeerRequest, path: &str, request_id: &str, origin: &str, stream: bool) -> Self {
        let mut head = Self {
            path: path.to_owned(),
            request_id: request_id.to_owned(),
            origin: origin.to_owned(),
            stream,
            ..Self::default()
        };
        match ask {
            PeerRequest::Engine(name) => head.engine = name,
            PeerRequest::AnyEngine => {}
            PeerRequest::Relay => head.relay = true,
            PeerRequest::Place(q) => head.place = Some(q),
        }
        head
    }

    /// What the peer asks. A placement query wins over the other flags, then a relay; an
    /// empty engine name leaves the choice to this node.
    pub fn ask(&self) -> PeerRequest {
        match (&self.place, self.relay, self.engine.as_str()) {
            (Some(q), _, _) => PeerRequest::Place(q.clone()),
            (None, true, _) => PeerRequest::Relay,
            (None, false, "") => PeerRequest::AnyEngine,
            (None, false, name) => PeerRequest::Engine(name.to_owned()),
        }
    }
}

/// What a home node needs, beyond the block keys, to place a request it does not see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceQuery {
    pub model: String,
}

/// A home node's answer to a [`PlaceQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "send_to", rename_all = "snake_case")]
pub enum Placement {
    /// Forward the request to `engine` on `node`, at `addr` (`None`: the node that answered).
    /// `route` is the home node's explanation, for `x-kvmesh-route`.
    Engine { node: String, addr: Option<std::net::SocketAddr>, engine: String, route: String },
    /// Send the whole request to the node that answered (`RequestHead::relay`): it splits it
    /// between a prefill and a decode engine, which one forward cannot express.
    Relay,
}

/// Largest placement answer read; a real one is a few hundred bytes.
pub const MAX_PLACEMENT: usize = 16 * 1024;

/// A prompt's chained block keys at one block size, little-endian u64s in base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptDigest {
    pub tokens: u32,
    pub block_size: u32,
    keys: String,
}

impl PromptDigest {
    /// `None` when there are more keys than a head may carry.
    pub fn new(tokens: u32, block_size: u32, keys: &[u64]) -> Option<Self> {
        use base64::Engine as _;
        if keys.len() > MAX_DIGEST_KEYS {
            return None;
        }
        let bytes: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
        Some(Self { tokens, block_size, keys: base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes) })
    }

    pub fn keys(&self) -> Result<Vec<u64>, TransportError> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&self.keys)
            .map_err(|e| TransportError::Frame(format!("prompt digest: {e}")))?;
        if bytes.len() % 8 != 0 || bytes.len() / 8 > MAX_DIGEST_KEYS {
            return Err(TransportError::Frame(format!("prompt digest of {} bytes is not whole keys", bytes.len())));
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
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
    /// The answer's `retry-after` in seconds (a refusal that says when to come back), for the
    /// origin to pass on to its client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
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
    let len = head_len(len)?;
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await.map_err(|e| TransportError::Stream(e.to_string()))?;
    parse_head(&buf)
}

/// The head's length from its 4-byte prefix, refused past [`MAX_HEAD`] before anything is
/// allocated for it.
fn head_len(prefix: [u8; 4]) -> Result<usize, TransportError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_HEAD {
        return Err(TransportError::Frame(format!("head of {len} bytes exceeds {MAX_HEAD}")));
    }
    Ok(len)
}

fn parse_head<T: for<'de> Deserialize<'de>>(json: &[u8]) -> Result<T, TransportError> {
    serde_json::from_slice(json).map_err(|e| TransportError::Frame(e.to_string()))
}

/// [`read_head`] over bytes in memory: the head at the start of `frame`, and the body bytes
/// after it. `Err` as `read_head`'s, and for a frame cut before its head ends.
pub fn decode_head<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<(T, &[u8]), TransportError> {
    let (prefix, rest) = frame
        .split_first_chunk::<4>()
        .ok_or_else(|| TransportError::Frame(format!("frame of {} bytes has no head length", frame.len())))?;
    let len = head_len(*prefix)?;
    if rest.len() < len {
        return Err(TransportError::Frame(format!("head of {len} bytes cut after {}", rest.len())));
    }
    let (json, body) = rest.split_at(len);
    Ok((parse_head(json)?, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_peer_asks_survives_the_wire() {
        let asks = [
            PeerRequest::Engine("e1".into()),
            PeerRequest::AnyEngine,
            PeerRequest::Relay,
            PeerRequest::Place(PlaceQuery { model: "m".into() }),
        ];
        for ask in asks {
            let head = RequestHead::new(ask.clone(), "/v1/chat/completions", "id", "n0", true);
            let bytes = encode_head(&head).unwrap();
            let back: RequestHead = serde_json::from_slice(&bytes[4..]).unwrap();
            assert_eq!(back.ask(), ask);
        }
    }

    #[test]
    fn digest_roundtrip_and_bounds() {
        let keys: Vec<u64> = (0..1000u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
        let d = PromptDigest::new(16_000, 16, &keys).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        let back: PromptDigest = serde_json::from_str(&json).unwrap();
        assert_eq!(back.keys().unwrap(), keys);
        assert!(json.len() < keys.len() * 11 + 100, "{} bytes", json.len());
        assert!(PromptDigest::new(0, 16, &vec![0; MAX_DIGEST_KEYS + 1]).is_none());
        let bad = PromptDigest { tokens: 1, block_size: 16, keys: "AAAA".into() };
        assert!(bad.keys().is_err());
        let max = PromptDigest::new(0, 16, &vec![u64::MAX; MAX_DIGEST_KEYS]).unwrap();
        assert!(serde_json::to_vec(&max).unwrap().len() < MAX_HEAD - 1024);
    }

    #[test]
    fn heads_decode_from_bytes_with_their_body_and_bounds() {
        let head = RequestHead::new(PeerRequest::Relay, "/v1/completions", "id", "n0", false);
        let mut frame = encode_head(&head).unwrap();
        frame.extend_from_slice(b"body");
        let (back, body) = decode_head::<RequestHead>(&frame).unwrap();
        assert_eq!((back, body), (head, &b"body"[..]));
        assert!(decode_head::<RequestHead>(&frame[..frame.len() - 6]).is_err(), "cut inside the head");
        assert!(decode_head::<RequestHead>(&[0, 0]).is_err());
        let too_long = ((MAX_HEAD + 1) as u32).to_be_bytes();
        assert!(decode_head::<RequestHead>(&too_long).unwrap_err().to_string().contains("exceeds"));
    }

    #[test]
    fn head_roundtrip_prefix() {
        let h = ResponseHead {
            status: 200,
            content_type: "text/event-stream".into(),
            served_by: "a/b".into(),
            retryable: false,
            retry_after_s: None,
        };
        let bytes = encode_head(&h).unwrap();
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        let back: ResponseHead = serde_json::from_slice(&bytes[4..]).unwrap();
        assert_eq!(back, h);
    }
}
