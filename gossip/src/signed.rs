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
//! Values are checked twice. A message's delta is checked before chitchat applies it
//! (`Checker::admit`, on the bytes: `wire`): every value it carries must be signed at its
//! version, and nothing in it may reset a node's state or raise its version without a signed
//! value, so a member cannot stall another's updates by relaying a forged value under a higher
//! version; a message that fails is dropped whole. The view checks again what it reads
//! (`Checker::reader`), mostly from the cache `admit` filled, and leaves a state that fails
//! out whole. kvmesh never deletes a key (a withdrawn key is set to an empty payload), so an
//! honest delta carries neither tombstones nor GC versions. Heartbeats, in digests, are not
//! signed: a member can keep a dead peer looking alive until its connections fail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chitchat::{ChitchatId, NodeState};
use kvmesh_transport::{AuthorKey, StateSigner};

use crate::error::GossipError;
use crate::wire::{NodeSection, STATUS_SET};

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

/// Why a peer's state was left out of the view, or a message refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No certificate published yet (a state still arriving).
    NoCertificate,
    /// The published certificate does not chain to the CA or names another node.
    Certificate(String),
    /// The value of this key is not signed by the certificate's key.
    BadSignature(String),
    /// A delta that would reset a node's state, raise its version without a value, delete a
    /// key, or carry more values than a node publishes.
    Shape(String),
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCertificate => write!(f, "no certificate yet"),
            Self::Certificate(why) => write!(f, "certificate refused: {why}"),
            Self::BadSignature(key) => write!(f, "value of `{key}` not signed by its node"),
            Self::Shape(why) => write!(f, "{why}"),
        }
    }
}

/// Values one node section of a delta may carry: the schema's keys and its cells keys.
const MAX_SECTION_VALUES: usize = crate::schema::MAX_CELL_KEYS + 64;

/// Checks peers' values, remembering what it checked: a value once per version, a certificate
/// once per version of `cert`. Shared by the transport (`admit`) and the view (`reader`);
/// entries of nodes chitchat has forgotten are dropped by `retain`.
pub struct Checker {
    signer: Arc<StateSigner>,
    cluster: String,
    /// Per chitchat id: the `cert` version and its key, or why it was refused.
    authors: HashMap<ChitchatId, (u64, Result<AuthorKey, String>)>,
    /// (chitchat id, key) -> the version whose signature checked.
    checked: HashMap<(ChitchatId, String), u64>,
    /// States left out of a view and messages dropped since start.
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

    /// Whether a message's delta may be applied: every node section free of resets, deletions
    /// and bare version raises, and every value signed by its node at its version (the node's
    /// certificate taken from the section, or known from an earlier one).
    pub fn admit(&mut self, sections: &[NodeSection]) -> Result<(), Rejection> {
        let checked = sections.iter().try_for_each(|s| self.admit_section(s));
        if let Err(why) = &checked {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %why, "gossip message dropped: it carries state its node did not sign");
        }
        checked
    }

    fn admit_section(&mut self, s: &NodeSection) -> Result<(), Rejection> {
        let who = &s.id.node_id;
        if s.last_gc_version != 0 || s.set_max_version.is_some() {
            return Err(Rejection::Shape(format!("a delta for `{who}` that resets its state or raises its version")));
        }
        if s.key_values.len() > MAX_SECTION_VALUES {
            return Err(Rejection::Shape(format!("{} values for `{who}`", s.key_values.len())));
        }
        if let Some(kv) = s.key_values.iter().find(|kv| kv.status != STATUS_SET) {
            return Err(Rejection::Shape(format!("a deletion of `{}` for `{who}`", kv.key)));
        }
        if let Some(cert) = s.key_values.iter().find(|kv| kv.key == KEY_CERT) {
            let author = self.author(&s.id, &cert.value, cert.version);
            if let Err(why) = &author {
                return Err(Rejection::Certificate(format!("`{who}`: {why}")));
            }
            self.authors.insert(s.id.clone(), (cert.version, author));
        }
        let key = match self.authors.get(&s.id) {
            Some((_, Ok(key))) => key.clone(),
            Some((_, Err(why))) => return Err(Rejection::Certificate(format!("`{who}`: {why}"))),
            None => return Err(Rejection::NoCertificate),
        };
        for kv in s.key_values.iter().filter(|kv| kv.key != KEY_CERT) {
            let ok = kv.value.split_once('.').is_some_and(|(sig, payload)| {
                key.verify(&message(&self.cluster, &s.id, &kv.key, kv.version, payload), sig)
            });
            if !ok {
                return Err(Rejection::BadSignature(format!("{} of `{who}`", kv.key)));
            }
            self.checked.insert((s.id.clone(), kv.key.clone()), kv.version);
        }
        Ok(())
    }

    /// A reader of `state`'s checked values, once its certificate is accepted.
    pub fn reader<'a>(&'a mut self, id: &'a ChitchatId, state: &'a NodeState) -> Result<Reader<'a>, Rejection> {
        let cert = state.get_versioned(KEY_CERT).filter(|v| !v.is_deleted()).ok_or(Rejection::NoCertificate)?;
        let fresh = !matches!(self.authors.get(id), Some((v, _)) if *v == cert.version);
        if fresh {
            let author = self.author(id, &cert.value, cert.version);
            if let Err(why) = &author {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %id.node_id, generation = id.generation_id, error = %why, "gossiped state refused: its certificate");
            }
            self.authors.insert(id.clone(), (cert.version, author));
        }
        match self.authors.get(id) {
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

    /// Forgets the nodes `keep` says chitchat no longer holds.
    pub fn retain(&mut self, keep: impl Fn(&ChitchatId) -> bool) {
        self.authors.retain(|id, _| keep(id));
        self.checked.retain(|(id, _), _| keep(id));
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
    /// The payload of `key` with its version, or `None` when the key is absent, deleted or
    /// withdrawn (an empty payload); an error when it is not signed by the state's author.
    pub fn get_versioned(&mut self, key: &str) -> Result<Option<(u64, &'a str)>, Rejection> {
        let Some(v) = self.state.get_versioned(key).filter(|v| !v.is_deleted()) else { return Ok(None) };
        let slot = (self.id.clone(), key.to_owned());
        let ok = match self.checker.checked.get(&slot) {
            Some(version) if *version == v.version => true,
            _ => {
                let ok = v.value.split_once('.').is_some_and(|(sig, payload)| {
                    self.key.verify(&message(&self.checker.cluster, self.id, key, v.version, payload), sig)
                });
                match ok {
                    true => {
                        self.checker.checked.insert(slot, v.version);
                    }
                    false => {
                        self.checker.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %self.id.node_id, generation = self.id.generation_id, key, version = v.version, "gossiped state refused: a value its node did not sign");
                    }
                }
                ok
            }
        };
        match (ok, payload(&v.value)) {
            (true, Some("")) => Ok(None),
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
