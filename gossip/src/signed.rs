//! Signed values: every value a node gossips about itself is `{signature}.{payload}`, the
//! signature its author's (`kvmesh_transport::signing`) over the cluster id, the author's full
//! chitchat id (name, generation, gossip address), the key, the value's chitchat version and
//! the payload. The author also publishes its certificate chain under `cert`, signed the same
//! way.
//!
//! chitchat relays every member's state through every other, and the connection a delta
//! arrives on authenticates only the relay. A reader therefore uses a peer's value only when
//! its signature checks under the peer's own certificate (chained to the mesh's CA, made for
//! the peer's name): a member cannot put words in another's mouth, move them to another
//! address or generation, or replay an old value under a newer version.
//!
//! What signatures cannot do here (chitchat applies a delta before any of this code sees it,
//! and its delta format is private to the crate): a member can relay a forged value under a
//! higher version than its author's, so the author's real updates stop reaching the nodes that
//! took it. Such a peer's state then fails its check and is left out of the view: the attack
//! takes a node out of the mesh (as cutting its links would), never steers traffic with forged
//! load, models or addresses. Heartbeats and deletions (tombstones carry no value) are not
//! signed: a member can keep a dead peer looking alive, or hide a peer's cells keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chitchat::{ChitchatId, NodeState};
use kvmesh_transport::{AuthorKey, StateSigner};

use crate::error::GossipError;

/// The author's certificate chain (`StateSigner::chain`), signed by itself.
pub const KEY_CERT: &str = "cert";

/// Domain separation: these bytes are signed for nothing else.
const CONTEXT: &[u8] = b"kvmesh gossip value v2";

/// The bytes a value's signature covers. Every field is length-prefixed, so no two distinct
/// inputs share an encoding.
fn message(cluster: &str, id: &ChitchatId, key: &str, version: u64, payload: &str) -> Vec<u8> {
    let addr = id.gossip_advertise_addr.to_string();
    let mut m = Vec::with_capacity(CONTEXT.len() + cluster.len() + id.node_id.len() + key.len() + payload.len() + 64);
    for field in [CONTEXT, cluster.as_bytes(), id.node_id.as_bytes(), addr.as_bytes(), key.as_bytes()] {
        m.extend_from_slice(&(field.len() as u64).to_be_bytes());
        m.extend_from_slice(field);
    }
    m.extend_from_slice(&id.generation_id.to_be_bytes());
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    m.extend_from_slice(payload.as_bytes());
    m
}

/// `payload` sealed as the value of `key` at `version` in the state of `id`.
pub fn seal(
    signer: &StateSigner,
    cluster: &str,
    id: &ChitchatId,
    key: &str,
    version: u64,
    payload: &str,
) -> Result<String, GossipError> {
    let sig = signer.sign(&message(cluster, id, key, version, payload))?;
    Ok(format!("{sig}.{payload}"))
}

/// The payload of a sealed value, unchecked: for this node's own state and for chitchat's
/// liveness predicate (which only gates; the view checks).
pub fn payload(value: &str) -> Option<&str> {
    value.split_once('.').map(|(_, p)| p)
}

/// Why a peer's state was left out of the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No certificate published yet (a state still arriving).
    NoCertificate,
    /// The published certificate does not chain to the CA or names another node.
    Certificate(String),
    /// The value of this key is not signed by the certificate's key.
    BadSignature(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCertificate => write!(f, "no certificate yet"),
            Self::Certificate(why) => write!(f, "certificate refused: {why}"),
            Self::BadSignature(key) => write!(f, "value of `{key}` not signed by its node"),
        }
    }
}

/// Checks peers' values, remembering what it checked: a value is checked once per version,
/// a certificate once per version of `cert`. Entries of nodes gone from the states are
/// dropped at each `retain`, so memory follows the live members times the keys the view reads.
pub struct Checker {
    signer: Arc<StateSigner>,
    cluster: String,
    /// (node, generation) -> (`cert` version, its key or why it was refused).
    authors: HashMap<(String, u64), (u64, Result<AuthorKey, String>)>,
    /// (node, generation, key) -> (version, whether it checked).
    checked: HashMap<(String, u64, String), (u64, bool)>,
    /// Peer states left out of a view since start (a state counted once per version of the
    /// key that failed).
    pub rejected: Arc<AtomicU64>,
}

impl Checker {
    pub fn new(signer: Arc<StateSigner>, cluster: &str) -> Self {
        Self {
            signer,
            cluster: cluster.to_owned(),
            authors: HashMap::new(),
            checked: HashMap::new(),
            rejected: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A reader of `state`'s checked values, once its certificate is accepted.
    pub fn reader<'a>(&'a mut self, id: &'a ChitchatId, state: &'a NodeState) -> Result<Reader<'a>, Rejection> {
        let cert = state.get_versioned(KEY_CERT).filter(|v| !v.is_deleted()).ok_or(Rejection::NoCertificate)?;
        let slot = (id.node_id.to_string(), id.generation_id);
        let fresh = !matches!(self.authors.get(&slot), Some((v, _)) if *v == cert.version);
        if fresh {
            let author = self.author(id, &cert.value, cert.version);
            if let Err(why) = &author {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %id.node_id, generation = id.generation_id, error = %why, "gossiped state refused: its certificate");
            }
            self.authors.insert(slot.clone(), (cert.version, author));
        }
        match self.authors.get(&slot) {
            Some((_, Ok(key))) => Ok(Reader { key: key.clone(), id, state, checker: self }),
            Some((_, Err(why))) => Err(Rejection::Certificate(why.clone())),
            None => Err(Rejection::NoCertificate),
        }
    }

    fn author(&self, id: &ChitchatId, sealed: &str, version: u64) -> Result<AuthorKey, String> {
        let (sig, chain) = sealed.split_once('.').ok_or("not a sealed value")?;
        let key = self.signer.author(chain, &id.node_id).map_err(|e| e.to_string())?;
        match key.verify(&message(&self.cluster, id, KEY_CERT, version, chain), sig) {
            true => Ok(key),
            false => Err("the certificate's value is not signed by its own key".into()),
        }
    }

    /// Forgets the nodes `keep` says are gone.
    pub fn retain(&mut self, keep: impl Fn(&str, u64) -> bool) {
        self.authors.retain(|(n, g), _| keep(n, *g));
        self.checked.retain(|(n, g, _), _| keep(n, *g));
    }
}

/// One peer state's values, each checked against its author's key before it is returned.
pub struct Reader<'a> {
    key: AuthorKey,
    id: &'a ChitchatId,
    state: &'a NodeState,
    checker: &'a mut Checker,
}

impl<'a> Reader<'a> {
    /// The payload of `key` with its version, or `None` when the key is absent or deleted;
    /// an error when it is present and not signed by the state's author.
    pub fn get_versioned(&mut self, key: &str) -> Result<Option<(u64, &'a str)>, Rejection> {
        let Some(v) = self.state.get_versioned(key).filter(|v| !v.is_deleted()) else { return Ok(None) };
        let slot = (self.id.node_id.to_string(), self.id.generation_id, key.to_owned());
        let ok = match self.checker.checked.get(&slot) {
            Some((version, ok)) if *version == v.version => *ok,
            _ => {
                let ok = match v.value.split_once('.') {
                    Some((sig, payload)) => {
                        self.key.verify(&message(&self.checker.cluster, self.id, key, v.version, payload), sig)
                    }
                    None => false,
                };
                if !ok {
                    self.checker.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %self.id.node_id, generation = self.id.generation_id, key, version = v.version, "gossiped state refused: a value its node did not sign");
                }
                self.checker.checked.insert(slot, (v.version, ok));
                ok
            }
        };
        match (ok, payload(&v.value)) {
            (true, Some(p)) => Ok(Some((v.version, p))),
            _ => Err(Rejection::BadSignature(key.to_owned())),
        }
    }

    /// Up to `max` keys starting with `prefix`, deleted ones left out.
    pub fn keys_with_prefix(&self, prefix: &str, max: usize) -> Vec<String> {
        self.state.iter_prefix(prefix).take(max).map(|(k, _)| k.to_owned()).collect()
    }

    /// As `get_versioned`, without the version.
    pub fn get(&mut self, key: &str) -> Result<Option<&'a str>, Rejection> {
        Ok(self.get_versioned(key)?.map(|(_, p)| p))
    }
}
