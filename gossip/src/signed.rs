//! Signed values: every value a node gossips about itself is `{signature}.{index}.{payload}`,
//! the signature its author's (`kvmesh_transport::signing`) over the cluster id, the author's
//! full chitchat id (name, generation, gossip address), the key, the value's chitchat version,
//! the index and the payload. The index is a digest of the author's whole state as this value
//! made it: every key with its version (`state_index`). The author also publishes its
//! certificate chain under `cert`, sealed the same way.
//!
//! chitchat relays every member's state through every other, and the connection a delta
//! arrives on authenticates only the relay. A reader therefore uses a peer's value only when
//! its signature checks under the peer's own certificate (chained to the mesh's CA, made for
//! the peer's name): a member cannot put words in another's mouth, move them to another
//! address or generation, or replay an old value under a newer version.
//!
//! Checked three ways:
//! - A message's delta, before chitchat applies it (`Checker::admit`, on the bytes: `wire`):
//!   every value must be signed at its version, and nothing may reset a node's state, raise its
//!   version without a signed value, or delete a key, so a relay cannot push a node's version
//!   past its author's; a node's section that fails is left out of the message
//!   (`wire::rewrite`), the other nodes' sections go on. kvmesh never deletes a key (a
//!   withdrawn key is set to an empty payload), so honest deltas carry neither tombstones nor
//!   GC versions.
//! - A message's digest: only members whose certificate was checked here stay in it
//!   (`wire::rewrite`), so a digest cannot create members.
//! - The state the view reads (`Checker::reader`): each value, mostly from the cache `admit`
//!   filled, and the whole: the value at the state's highest version must carry the index of
//!   the state as held. A relay that left values out of a delta (chitchat then never asks for
//!   them again) leaves a state that fails this, so the view never uses a state with values
//!   missing or rolled back; it keeps the node's last whole state for a few seconds (a delta
//!   cut by chitchat's MTU completes within rounds) and then leaves the node out.
//!
//! Not covered: heartbeats (in digests) are unsigned, so a member can keep a node it has seen
//! looking alive; and a member that leaves values out of another node's delta takes that node
//! out of the receiver's view (availability, not integrity) until the node restarts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
fn message(cluster: &str, id: &ChitchatId, key: &str, version: u64, index: &str, payload: &str) -> Vec<u8> {
    let addr = id.gossip_advertise_addr.to_string();
    let mut m = Vec::with_capacity(CONTEXT.len() + cluster.len() + id.node_id.len() + key.len() + payload.len() + 128);
    for field in [CONTEXT, cluster.as_bytes(), id.node_id.as_bytes(), addr.as_bytes(), key.as_bytes(), index.as_bytes()]
    {
        m.extend_from_slice(&(field.len() as u64).to_be_bytes());
        m.extend_from_slice(field);
    }
    m.extend_from_slice(&id.generation_id.to_be_bytes());
    m.extend_from_slice(&version.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    m.extend_from_slice(payload.as_bytes());
    m
}

/// `payload` sealed as the value of `key` at `version` in the state of `id`, which holds the
/// keys and versions `index` digests (`state_index`) once the value is set.
pub fn seal(
    signer: &StateSigner,
    cluster: &str,
    id: &ChitchatId,
    key: &str,
    version: u64,
    index: &str,
    payload: &str,
) -> Result<String, GossipError> {
    let sig = signer.sign(&message(cluster, id, key, version, index, payload))?;
    Ok(format!("{sig}.{index}.{payload}"))
}

/// A sealed value's parts. The signature and the index are base64url, which has no `.`, so
/// the payload is everything after the second one.
struct Opened<'a> {
    sig: &'a str,
    index: &'a str,
    payload: &'a str,
}

fn open(value: &str) -> Option<Opened<'_>> {
    let mut parts = value.splitn(3, '.');
    Some(Opened { sig: parts.next()?, index: parts.next()?, payload: parts.next()? })
}

/// The payload of a sealed value, unchecked: for this node's own state and for chitchat's
/// liveness predicate (which only gates; the view checks).
pub fn payload(value: &str) -> Option<&str> {
    open(value).map(|o| o.payload)
}

/// The index of a state: SHA-256 over its keys and their versions, in key order, base64url.
pub fn state_index<'a>(entries: impl IntoIterator<Item = (&'a str, u64)>) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for (key, version) in entries {
        h.update((key.len() as u64).to_be_bytes());
        h.update(key.as_bytes());
        h.update(version.to_be_bytes());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(h.finalize())
}

/// The index of `state` as held, and as it will be with `key` set at `version`.
pub fn index_of(state: &NodeState, with: Option<(&str, u64)>) -> String {
    let mut entries: std::collections::BTreeMap<&str, u64> =
        state.key_values_including_deleted().map(|(k, v)| (k, v.version)).collect();
    if let Some((key, version)) = with {
        entries.insert(key, version);
    }
    state_index(entries)
}

/// A digest of a sealed value (SHA-256), to know a value already checked when another peer
/// relays it again.
fn digest(sealed: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(sealed.as_bytes()).into()
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
    /// The state holds other keys or versions than its newest value says it should: values
    /// still arriving, or left out by a relay.
    Incomplete,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoCertificate => write!(f, "no certificate yet"),
            Self::Certificate(why) => write!(f, "certificate refused: {why}"),
            Self::BadSignature(key) => write!(f, "value of `{key}` not signed by its node"),
            Self::Shape(why) => write!(f, "{why}"),
            Self::Incomplete => write!(f, "values missing from the state its newest value indexes"),
        }
    }
}

/// Values one node section of a delta may carry: the schema's keys and its cells keys.
const MAX_SECTION_VALUES: usize = crate::schema::MAX_CELL_KEYS + 64;
/// Values one message may carry: a chitchat delta is at most 65,507 bytes, and a value takes
/// at least a signature (about 100 bytes), so honest messages carry under 700. Each new one
/// costs a signature check (about 80 µs), so this bounds a message's cost to a fraction of a
/// second.
const MAX_MESSAGE_VALUES: usize = 2048;
/// How long what was checked of a node is kept after chitchat forgot it (and before chitchat
/// first holds it: a message is checked before chitchat applies it).
const FORGET_AFTER: Duration = Duration::from_secs(120);
/// How long a node's last whole state stands in while its state is not whole: chitchat sends
/// a node's values over rounds when they exceed its MTU, so an honest state completes within
/// a few rounds.
pub const INCOMPLETE_GRACE: Duration = Duration::from_secs(10);
/// How often the view checks a known certificate again (its validity period included).
const RECHECK: Duration = Duration::from_secs(600);

/// Checks peers' values, remembering what it checked: a value once per version, a certificate
/// once per version of `cert`. Shared by the transport (`admit`) and the view (`reader`);
/// entries of nodes chitchat has forgotten are dropped by `retain`.
pub struct Checker {
    signer: Arc<StateSigner>,
    cluster: String,
    /// Per chitchat id: the `cert` version and its key (or why it was refused), and when it
    /// was last checked.
    authors: HashMap<ChitchatId, (u64, Result<AuthorKey, String>, Instant)>,
    /// (chitchat id, key) -> the version whose signature checked, and a digest of the sealed
    /// value: the same update relayed by several peers is checked once.
    checked: HashMap<(ChitchatId, String), (u64, [u8; 32])>,
    /// States left out of a view and messages dropped since start.
    pub rejected: Arc<AtomicU64>,
    /// Since when a node's state has not been whole (`Reader::check_whole`).
    /// (since when, whether counted as rejected yet).
    incomplete_since: HashMap<ChitchatId, (Instant, bool)>,
    /// The highest version at which a node's state was found whole: chitchat applies only
    /// values above a state's highest version, so what it holds at a version never changes and
    /// the view need not index it again on every rebuild.
    whole_at: HashMap<ChitchatId, u64>,
}

impl Checker {
    pub fn new(signer: Arc<StateSigner>, cluster: &str) -> Self {
        Self {
            signer,
            cluster: cluster.to_owned(),
            authors: HashMap::new(),
            checked: HashMap::new(),
            rejected: Arc::new(AtomicU64::new(0)),
            incomplete_since: HashMap::new(),
            whole_at: HashMap::new(),
        }
    }

    /// Which of a message's node sections may be applied: each free of resets, deletions and
    /// bare version raises, with every value signed by its node at its version (the node's
    /// certificate taken from the section, or known from an earlier one). A section refused is
    /// left out of the message, the rest goes on (`wire::rewrite`); a message over
    /// `MAX_MESSAGE_VALUES` is refused whole.
    pub fn admit(&mut self, sections: &[NodeSection]) -> Result<Vec<bool>, Rejection> {
        let values: usize = sections.iter().map(|s| s.key_values.len()).sum();
        if values > MAX_MESSAGE_VALUES {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(values, "gossip message dropped: more values than any node sends");
            return Err(Rejection::Shape(format!("{values} values in one message")));
        }
        Ok(sections.iter().map(|s| self.admit_section(s).is_ok()).collect())
    }

    /// One section, checked, and counted and logged when refused.
    fn admit_section(&mut self, s: &NodeSection) -> Result<(), Rejection> {
        let checked = self.check_section(s);
        if let Err(why) = &checked {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %s.id.node_id, generation = s.id.generation_id, error = %why, "gossip about a node dropped: state its node did not sign");
        }
        checked
    }

    fn check_section(&mut self, s: &NodeSection) -> Result<(), Rejection> {
        let who = &s.id.node_id;
        if s.key_values.is_empty() && s.set_max_version.is_none() && s.last_gc_version == 0 {
            // A node header alone (chitchat's MTU cut before its first value) changes nothing.
            return Ok(());
        }
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
            let slot = (s.id.clone(), KEY_CERT.to_owned());
            let known = self.checked.get(&slot) == Some(&(cert.version, digest(&cert.value)))
                && matches!(self.authors.get(&s.id), Some((v, Ok(_), _)) if *v == cert.version);
            if !known {
                let author = self.author(&s.id, &cert.value, cert.version);
                if let Err(why) = &author {
                    return Err(Rejection::Certificate(format!("`{who}`: {why}")));
                }
                self.authors.insert(s.id.clone(), (cert.version, author, Instant::now()));
                self.checked.insert(slot, (cert.version, digest(&cert.value)));
            }
        }
        let key = match self.authors.get(&s.id) {
            Some((_, Ok(key), _)) => key.clone(),
            Some((_, Err(why), _)) => return Err(Rejection::Certificate(format!("`{who}`: {why}"))),
            None => return Err(Rejection::NoCertificate),
        };
        for kv in s.key_values.iter().filter(|kv| kv.key != KEY_CERT) {
            let slot = (s.id.clone(), kv.key.clone());
            let sealed = (kv.version, digest(&kv.value));
            if self.checked.get(&slot) == Some(&sealed) {
                continue;
            }
            let ok = open(&kv.value).is_some_and(|o| {
                key.verify(&message(&self.cluster, &s.id, &kv.key, kv.version, o.index, o.payload), o.sig)
            });
            if !ok {
                return Err(Rejection::BadSignature(format!("{} of `{who}`", kv.key)));
            }
            self.checked.insert(slot, sealed);
        }
        Ok(())
    }

    /// A reader of `state`'s checked values, once its certificate is accepted.
    pub fn reader<'a>(&'a mut self, id: &'a ChitchatId, state: &'a NodeState) -> Result<Reader<'a>, Rejection> {
        let cert = state.get_versioned(KEY_CERT).filter(|v| !v.is_deleted()).ok_or(Rejection::NoCertificate)?;
        // Checked again every `RECHECK`, so a certificate that expires leaves the view.
        let fresh = !matches!(self.authors.get(id), Some((v, _, at)) if *v == cert.version && at.elapsed() < RECHECK);
        if fresh {
            let author = self.author(id, &cert.value, cert.version);
            if let Err(why) = &author {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = %id.node_id, generation = id.generation_id, error = %why, "gossiped state refused: its certificate");
            }
            self.authors.insert(id.clone(), (cert.version, author, Instant::now()));
        }
        match self.authors.get(id) {
            Some((_, Ok(key), _)) => Ok(Reader { key: key.clone(), id, state, checker: self }),
            Some((_, Err(why), _)) => Err(Rejection::Certificate(why.clone())),
            None => Err(Rejection::NoCertificate),
        }
    }

    fn author(&self, id: &ChitchatId, sealed: &str, version: u64) -> Result<AuthorKey, String> {
        let o = open(sealed).ok_or("not a sealed value")?;
        let key = self.signer.author(o.payload, &id.node_id).map_err(|e| e.to_string())?;
        match key.verify(&message(&self.cluster, id, KEY_CERT, version, o.index, o.payload), o.sig) {
            true => Ok(key),
            false => Err("the certificate's value is not signed by its own key".into()),
        }
    }

    /// Notes whether `id`'s state is whole; for one that is not, whether it has been so for
    /// less than `INCOMPLETE_GRACE` (its last whole state may still be used). The first time
    /// the grace runs out it is counted as a rejection and logged.
    pub fn note_incomplete(&mut self, id: &ChitchatId, whole: bool) -> bool {
        if whole {
            self.incomplete_since.remove(id);
            return false;
        }
        let now = Instant::now();
        let (since, counted) = self.incomplete_since.entry(id.clone()).or_insert((now, false));
        let within = now.duration_since(*since) < INCOMPLETE_GRACE;
        if !within && !*counted {
            *counted = true;
            self.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %id.node_id, generation = id.generation_id, "gossiped state refused: values missing from what its newest value indexes, for 10 s");
        }
        within
    }

    /// Whether `id`'s certificate was checked and accepted here.
    pub fn certified(&self, id: &ChitchatId) -> bool {
        matches!(self.authors.get(id), Some((_, Ok(_), _)))
    }

    /// Forgets the nodes `held` says chitchat no longer holds, once not checked for a while.
    pub fn retain(&mut self, held: impl Fn(&ChitchatId) -> bool) {
        let now = Instant::now();
        self.authors.retain(|id, (_, _, at)| held(id) || now.duration_since(*at) < FORGET_AFTER);
        let authors = &self.authors;
        self.checked.retain(|(id, _), _| authors.contains_key(id));
        self.incomplete_since.retain(|id, _| authors.contains_key(id));
        self.whole_at.retain(|id, _| authors.contains_key(id));
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
        let sealed = (v.version, digest(&v.value));
        let ok = match self.checker.checked.get(&slot) {
            Some(known) if *known == sealed => true,
            _ => {
                let ok = open(&v.value).is_some_and(|o| {
                    self.key.verify(&message(&self.checker.cluster, self.id, key, v.version, o.index, o.payload), o.sig)
                });
                match ok {
                    true => {
                        self.checker.checked.insert(slot, sealed);
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

    /// Whether the state is whole: its newest value (signed) indexes exactly the keys and
    /// versions the state holds.
    pub fn check_whole(&mut self) -> Result<(), Rejection> {
        let max = self.state.max_version();
        if self.checker.whole_at.get(self.id) == Some(&max) {
            return Ok(());
        }
        let (key, top) =
            self.state.key_values_including_deleted().find(|(_, v)| v.version == max).ok_or(Rejection::Incomplete)?;
        self.get_versioned(key)?;
        let index = open(&top.value).map(|o| o.index).ok_or_else(|| Rejection::BadSignature(key.to_owned()))?;
        match index == index_of(self.state, None) {
            true => {
                self.checker.whole_at.insert(self.id.clone(), max);
                Ok(())
            }
            false => Err(Rejection::Incomplete),
        }
    }

    /// Up to `max` keys starting with `prefix`, deleted and withdrawn (empty) ones left out.
    pub fn keys_with_prefix(&self, prefix: &str, max: usize) -> Vec<String> {
        self.state
            .iter_prefix(prefix)
            .filter(|(_, v)| payload(&v.value) != Some(""))
            .take(max)
            .map(|(k, _)| k.to_owned())
            .collect()
    }

    /// As `get_versioned`, without the version.
    pub fn get(&mut self, key: &str) -> Result<Option<&'a str>, Rejection> {
        Ok(self.get_versioned(key)?.map(|(_, p)| p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::KeyValue;
    use kvmesh_transport::{certs, TlsIdentity};

    fn signer(dir: &std::path::Path, name: &str) -> Arc<StateSigner> {
        certs::create_node(dir, dir, name).unwrap();
        let (ca, crt, key) = TlsIdentity::paths_in(dir, name);
        Arc::new(StateSigner::new(&TlsIdentity::load(&ca, &crt, &key).unwrap()).unwrap())
    }

    /// `values` sealed by `by` for `id` from version `first`, as the author sets them.
    fn sealed(by: &StateSigner, id: &ChitchatId, first: u64, values: &[(&str, &str)]) -> Vec<KeyValue> {
        let mut held = std::collections::BTreeMap::new();
        values
            .iter()
            .enumerate()
            .map(|(i, (key, payload))| {
                let version = first + i as u64;
                held.insert(key.to_string(), version);
                let index = state_index(held.iter().map(|(k, v)| (k.as_str(), *v)));
                let value = seal(by, "c", id, key, version, &index, payload).unwrap();
                KeyValue { key: key.to_string(), value, version, status: STATUS_SET }
            })
            .collect()
    }

    fn section(id: &ChitchatId, key_values: Vec<KeyValue>) -> NodeSection {
        NodeSection { id: id.clone(), last_gc_version: 0, from_version_excluded: 0, key_values, set_max_version: None }
    }

    #[test]
    fn a_delta_passes_only_with_every_value_signed_by_its_node() {
        let tmp = tempfile::tempdir().unwrap();
        certs::create_ca(tmp.path(), "t").unwrap();
        let (me, b, m) = (signer(tmp.path(), "a"), signer(tmp.path(), "b"), signer(tmp.path(), "m"));
        let id = ChitchatId::new("b".to_string(), 1, "127.0.0.1:9".parse().unwrap());
        let mut checker = Checker::new(me, "c");
        let chain = b.chain().to_owned();

        // Values before the certificate is known: refused.
        let later = sealed(&b, &id, 1, &[(KEY_CERT, &chain), ("load", "{}")]);
        assert_eq!(checker.admit_section(&section(&id, later[1..].to_vec())), Err(Rejection::NoCertificate));
        assert!(!checker.certified(&id));
        // The certificate and its values: admitted, and later values without it too.
        assert_eq!(checker.admit_section(&section(&id, later.clone())), Ok(()));
        assert!(checker.certified(&id));
        let next = sealed(&b, &id, 3, &[("load", "{\"held\":1}")]);
        assert_eq!(checker.admit_section(&section(&id, next.clone())), Ok(()));

        // A value changed in transit, one signed by another member, one moved to another
        // version or node: each refused.
        let mut changed = next.clone();
        changed[0].value = changed[0].value.replace("\"held\":1", "\"held\":9");
        assert!(matches!(checker.admit_section(&section(&id, changed)), Err(Rejection::BadSignature(_))));
        let by_m = sealed(&m, &id, 4, &[("load", "{}")]);
        assert!(matches!(checker.admit_section(&section(&id, by_m)), Err(Rejection::BadSignature(_))));
        let mut moved = next.clone();
        moved[0].version = 1_000;
        assert!(matches!(checker.admit_section(&section(&id, moved)), Err(Rejection::BadSignature(_))));
        let other = ChitchatId::new("b".to_string(), 2, "127.0.0.1:9".parse().unwrap());
        let mut as_other = later.clone();
        as_other.truncate(1);
        assert!(matches!(checker.admit_section(&section(&other, as_other)), Err(Rejection::Certificate(_))));
        // m's certificate published under b's name.
        let m_cert = sealed(&m, &other, 1, &[(KEY_CERT, m.chain())]);
        assert!(matches!(checker.admit_section(&section(&other, m_cert)), Err(Rejection::Certificate(_))));
        // Every refusal counted.
        assert_eq!(checker.rejected.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn a_delta_may_not_reset_raise_or_delete() {
        let tmp = tempfile::tempdir().unwrap();
        certs::create_ca(tmp.path(), "t").unwrap();
        let (me, b) = (signer(tmp.path(), "a"), signer(tmp.path(), "b"));
        let id = ChitchatId::new("b".to_string(), 1, "127.0.0.1:9".parse().unwrap());
        let mut checker = Checker::new(me, "c");
        let values = sealed(&b, &id, 1, &[(KEY_CERT, b.chain()), ("load", "{}")]);
        let shape = |r: Result<(), Rejection>| matches!(r, Err(Rejection::Shape(_)));

        let mut reset = section(&id, values.clone());
        reset.last_gc_version = 5;
        assert!(shape(checker.admit_section(&reset)));
        let mut raise = section(&id, Vec::new());
        raise.set_max_version = Some(1_000_000);
        assert!(shape(checker.admit_section(&raise)));
        let mut delete = values.clone();
        delete[1].status = 1;
        assert!(shape(checker.admit_section(&section(&id, delete))));
        let many = vec![values[1].clone(); MAX_MESSAGE_VALUES + 1];
        assert!(shape(checker.admit(&[section(&id, many)]).map(|_| ())));
        // A node header alone (chitchat's MTU cut before its first value) changes nothing.
        assert_eq!(checker.admit_section(&section(&id, Vec::new())), Ok(()));
    }
}
