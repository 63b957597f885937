//! A cluster CA and node certificates, as `kvmesh cert ca` and `kvmesh cert node` make them.
//!
//! Node certificates name the node (DNS SAN = node name) and allow both server and client auth:
//! every node both accepts and opens connections with the same identity.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::error::TransportError;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

fn cert_err(e: rcgen::Error) -> TransportError {
    TransportError::Cert(e.to_string())
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), TransportError> {
    std::fs::write(path, contents).map_err(|source| TransportError::Io { path: path.display().to_string(), source })?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| TransportError::Io { path: path.display().to_string(), source })?;
    }
    let _ = private;
    Ok(())
}

fn read(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|source| TransportError::Io { path: path.display().to_string(), source })
}

/// Creates `dir/ca.crt` and `dir/ca.key` for a cluster named `cluster`. Refuses to overwrite.
pub fn create_ca(dir: &Path, cluster: &str) -> Result<(PathBuf, PathBuf), TransportError> {
    std::fs::create_dir_all(dir).map_err(|source| TransportError::Io { path: dir.display().to_string(), source })?;
    let (crt, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if crt.exists() || key.exists() {
        return Err(TransportError::Cert(format!(
            "{} already holds a CA; remove it first to make a new one",
            dir.display()
        )));
    }
    let key_pair = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("kvmesh CA ({cluster})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let cert = params.self_signed(&key_pair).map_err(cert_err)?;
    write(&crt, &cert.pem(), false)?;
    write(&key, &key_pair.serialize_pem(), true)?;
    Ok((crt, key))
}

/// Creates `dir/NAME.crt` and `dir/NAME.key`, signed by the CA in `ca_dir`.
pub fn create_node(ca_dir: &Path, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), TransportError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return Err(TransportError::Cert(format!(
            "node name `{name}` must be letters, digits, '-' and '.' (it becomes a DNS name in the certificate)"
        )));
    }
    let ca_pem = read(&ca_dir.join(CA_CERT))?;
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join(CA_KEY))?).map_err(cert_err)?;
    let ca = CertificateParams::from_ca_cert_pem(&ca_pem).map_err(cert_err)?.self_signed(&ca_key).map_err(cert_err)?;
    let key_pair = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_after = rcgen::date_time_ymd(2034, 1, 1);
    let cert = params.signed_by(&key_pair, &ca, &ca_key).map_err(cert_err)?;
    std::fs::create_dir_all(dir).map_err(|source| TransportError::Io { path: dir.display().to_string(), source })?;
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    write(&crt, &cert.pem(), false)?;
    write(&key, &key_pair.serialize_pem(), true)?;
    if dir != ca_dir {
        // The node also needs the CA certificate (not its key) to check its peers.
        write(&dir.join(CA_CERT), &ca_pem, false)?;
    }
    Ok((crt, key))
}
