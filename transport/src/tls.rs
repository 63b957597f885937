//! Mutual TLS for QUIC: a node presents its certificate and accepts only peers whose
//! certificate chains to the cluster CA, on both sides of every connection.
//!
//! Peers are dialled by address (seeds are addresses), so the client checks that the server's
//! chain leads to the CA but not that the name matches the dialled address. Membership is "holds
//! a certificate from this CA". The peer's node name is read from its certificate after the
//! handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::error::TransportError;
use crate::ALPN;

/// A node's certificate chain and key, and the cluster CA that peers must chain to.
#[derive(Debug)]
pub struct TlsIdentity {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TransportError {
    TransportError::Pem { path: path.display().to_string(), message: e.to_string() }
}

impl TlsIdentity {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let ca_der = CertificateDer::pem_file_iter(ca)
            .map_err(|e| pem_err(ca, e))?
            .next()
            .ok_or_else(|| pem_err(ca, "no certificate in file"))?
            .map_err(|e| pem_err(ca, e))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e))?;
        if chain.is_empty() {
            return Err(pem_err(cert, "no certificate in file"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
        Ok(Self { ca: ca_der, chain, key: key_der })
    }

    /// The node name this identity's certificate was made for (its first DNS name).
    pub fn name(&self) -> Option<String> {
        cert_name(self.chain.first()?)
    }

    /// `DIR/ca.crt`, `DIR/NAME.crt`, `DIR/NAME.key`, as `kvmesh cert node` writes them.
    pub fn paths_in(dir: &Path, node_name: &str) -> (PathBuf, PathBuf, PathBuf) {
        (dir.join(crate::certs::CA_CERT), dir.join(format!("{node_name}.crt")), dir.join(format!("{node_name}.key")))
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TransportError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(|e| TransportError::Tls(format!("CA certificate: {e}")))?;
        Ok(Arc::new(roots))
    }

    pub fn server_config(&self) -> Result<rustls::ServerConfig, TransportError> {
        self.server_config_for(None)
    }

    pub fn client_config(&self) -> Result<rustls::ClientConfig, TransportError> {
        self.client_config_for(None)
    }

    /// As `server_config`, speaking only the ALPN of `cluster_id` (`alpn`).
    pub fn server_config_for(&self, cluster_id: Option<&str>) -> Result<rustls::ServerConfig, TransportError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TransportError::Tls(format!("node certificate/key: {e}")))?;
        cfg.alpn_protocols = vec![alpn(cluster_id)];
        Ok(cfg)
    }

    /// As `client_config`, offering only the ALPN of `cluster_id` (`alpn`).
    pub fn client_config_for(&self, cluster_id: Option<&str>) -> Result<rustls::ClientConfig, TransportError> {
        let provider = provider();
        let inner = WebPkiServerVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ClusterCaVerifier { inner }))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TransportError::Tls(format!("node certificate/key: {e}")))?;
        cfg.alpn_protocols = vec![alpn(cluster_id)];
        Ok(cfg)
    }
}

/// The ALPN protocol of a mesh: `kvmesh/1`, or `kvmesh/1/{cluster_id}`. Both sides must offer
/// the same one, so a handshake between two meshes fails even under one CA.
pub fn alpn(cluster_id: Option<&str>) -> Vec<u8> {
    match cluster_id {
        Some(id) => [ALPN, b"/", id.as_bytes()].concat(),
        None => ALPN.to_vec(),
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Full WebPKI chain validation against the cluster CA, except the name check (see module doc).
#[derive(Debug)]
struct ClusterCaVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ClusterCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The first DNS name in a peer's end-entity certificate: its node name.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let chain = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_name(chain.first()?)
}

/// The first DNS name of a certificate: the node name `kvmesh cert node --name` gave it.
pub(crate) fn cert_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
        _ => None,
    })
}
