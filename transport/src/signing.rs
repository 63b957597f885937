//! Signatures on what a node publishes about itself, so that state relayed by a third node can
//! be checked against its author. Gossip is anti-entropy: a node hears most of its peers' state
//! from other peers, and the connection it arrived on authenticates only the relay. Each value a
//! node publishes therefore carries its author's signature, made with the key of its node
//! certificate, and the author publishes that certificate; a reader checks the certificate
//! against the cluster CA and its name against the author's node name, then every value against
//! the certificate.
//!
//! This module signs and checks bytes. What is signed (which fields, in which encoding) is the
//! gossip crate's business.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{Signer, SigningKey};
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};

use crate::error::TransportError;
use crate::tls::{cert_name, provider, TlsIdentity};

/// At most this many certificates in a published chain, and this many bytes each.
const MAX_CHAIN: usize = 4;
const MAX_CERT_BYTES: usize = 16 * 1024;
/// A signature longer than this is not one of the schemes below.
const MAX_SIGNATURE_BYTES: usize = 1024;

/// The schemes a node signs with, strongest first among what its key supports. They are the
/// TLS 1.3 schemes, each with one verification algorithm.
const SCHEMES: [SignatureScheme; 5] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

fn algorithm(scheme: SignatureScheme) -> Option<&'static dyn SignatureVerificationAlgorithm> {
    use webpki::ring as alg;
    Some(match scheme {
        SignatureScheme::ED25519 => alg::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256 => alg::ECDSA_P256_SHA256,
        SignatureScheme::ECDSA_NISTP384_SHA384 => alg::ECDSA_P384_SHA384,
        SignatureScheme::RSA_PSS_SHA256 => alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        SignatureScheme::RSA_PKCS1_SHA256 => alg::RSA_PKCS1_2048_8192_SHA256,
        _ => return None,
    })
}

/// Signs this node's published state and checks its peers'.
pub struct StateSigner {
    signer: Box<dyn Signer>,
    scheme: SignatureScheme,
    /// This node's certificate chain as published (`encode_chain`).
    chain: String,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for StateSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSigner").field("scheme", &self.scheme).finish_non_exhaustive()
    }
}

impl StateSigner {
    pub fn new(identity: &TlsIdentity) -> Result<Self, TransportError> {
        let key: Arc<dyn SigningKey> = rustls::crypto::ring::sign::any_supported_type(&identity.key)
            .map_err(|e| TransportError::Tls(format!("node key cannot sign: {e}")))?;
        let signer = key.choose_scheme(&SCHEMES).ok_or_else(|| {
            TransportError::Tls(format!("the node key's algorithm ({:?}) signs none of {SCHEMES:?}", key.algorithm()))
        })?;
        let scheme = signer.scheme();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(identity.ca.clone()).map_err(|e| TransportError::Tls(format!("CA certificate: {e}")))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        Ok(Self { signer, scheme, chain: encode_chain(&identity.chain), verifier })
    }

    /// This node's certificate chain, to publish beside the signed values.
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// `message` signed: the scheme and the signature, base64url.
    pub fn sign(&self, message: &[u8]) -> Result<String, TransportError> {
        let sig = self.signer.sign(message).map_err(|e| TransportError::Tls(format!("signing: {e}")))?;
        let mut out = u16::from(self.scheme).to_be_bytes().to_vec();
        out.extend_from_slice(&sig);
        Ok(URL_SAFE_NO_PAD.encode(out))
    }

    /// The key of the node `name`, from the chain it published: only if the chain leads to this
    /// mesh's CA, is valid for client authentication now, and was made for `name`.
    pub fn author(&self, chain: &str, name: &str) -> Result<AuthorKey, TransportError> {
        let certs = decode_chain(chain)?;
        let (leaf, intermediates) = certs.split_first().ok_or_else(|| TransportError::Tls("empty chain".into()))?;
        self.verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map_err(|e| TransportError::Tls(format!("certificate: {e}")))?;
        match cert_name(leaf) {
            Some(n) if n == name => {}
            other => {
                return Err(TransportError::Tls(format!("certificate made for {other:?}, published under `{name}`")))
            }
        }
        // Parsed once here, so that checking a signature later cannot fail on the certificate.
        webpki::EndEntityCert::try_from(leaf).map_err(|e| TransportError::Tls(format!("certificate: {e}")))?;
        Ok(AuthorKey { leaf: leaf.clone().into_owned() })
    }
}

/// A peer's certificate, checked against the CA and its name: what its signatures are checked
/// with.
#[derive(Debug, Clone)]
pub struct AuthorKey {
    leaf: CertificateDer<'static>,
}

impl AuthorKey {
    /// Whether `signature` (as `StateSigner::sign` encodes it) is this author's over `message`.
    pub fn verify(&self, message: &[u8], signature: &str) -> bool {
        if signature.len() > MAX_SIGNATURE_BYTES * 2 {
            return false;
        }
        let Ok(raw) = URL_SAFE_NO_PAD.decode(signature) else { return false };
        let Some((scheme, sig)) = raw.split_first_chunk::<2>() else { return false };
        let Some(alg) = algorithm(SignatureScheme::from(u16::from_be_bytes(*scheme))) else { return false };
        let Ok(cert) = webpki::EndEntityCert::try_from(&self.leaf) else { return false };
        cert.verify_signature(alg, message, sig).is_ok()
    }
}

fn encode_chain(chain: &[CertificateDer<'_>]) -> String {
    chain.iter().take(MAX_CHAIN).map(|c| URL_SAFE_NO_PAD.encode(c.as_ref())).collect::<Vec<_>>().join(",")
}

fn decode_chain(s: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() > MAX_CHAIN {
        return Err(TransportError::Tls(format!("a chain of {} certificates (at most {MAX_CHAIN})", parts.len())));
    }
    parts
        .into_iter()
        .map(|p| {
            if p.len() > MAX_CERT_BYTES * 4 / 3 + 4 {
                return Err(TransportError::Tls("a certificate over 16 KiB".into()));
            }
            URL_SAFE_NO_PAD
                .decode(p)
                .map(CertificateDer::from)
                .map_err(|e| TransportError::Tls(format!("certificate encoding: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{create_ca, create_node};

    fn identity(ca_dir: &std::path::Path, dir: &std::path::Path, name: &str) -> TlsIdentity {
        create_node(ca_dir, dir, name).unwrap();
        let (ca, crt, key) = TlsIdentity::paths_in(dir, name);
        TlsIdentity::load(&ca, &crt, &key).unwrap()
    }

    #[test]
    fn a_signature_checks_only_under_its_authors_certificate_and_name() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca");
        create_ca(&ca, "test").unwrap();
        let a = StateSigner::new(&identity(&ca, &tmp.path().join("a"), "a")).unwrap();
        let b = StateSigner::new(&identity(&ca, &tmp.path().join("b"), "b")).unwrap();

        let sig = a.sign(b"state of a").unwrap();
        let a_key = b.author(a.chain(), "a").unwrap();
        assert!(a_key.verify(b"state of a", &sig));
        assert!(!a_key.verify(b"state of A", &sig), "another message");
        assert!(!a_key.verify(b"state of a", &b.sign(b"state of a").unwrap()), "another author");
        assert!(!a_key.verify(b"state of a", "not base64 !"));
        assert!(!a_key.verify(b"state of a", ""));
        // a's certificate published under b's name.
        assert!(b.author(a.chain(), "b").is_err());
        assert!(b.author("", "a").is_err());
        assert!(b.author("AAAA", "a").is_err());
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (ours, theirs) = (tmp.path().join("ours"), tmp.path().join("theirs"));
        create_ca(&ours, "test").unwrap();
        create_ca(&theirs, "test").unwrap();
        let me = StateSigner::new(&identity(&ours, &tmp.path().join("me"), "a")).unwrap();
        let forger = StateSigner::new(&identity(&theirs, &tmp.path().join("forger"), "a")).unwrap();
        assert!(me.author(forger.chain(), "a").is_err());
    }
}
