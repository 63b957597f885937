//! API keys: which tenant a request belongs to, which models it may use, and whether it may call
//! admin endpoints.
//!
//! Keys are never stored in clear: config and keys files hold the hex SHA-256 of each key
//! (`kvmesh keys hash KEY`). A presented key is hashed and compared with every stored digest in
//! constant time, without stopping at the first match, so timing says nothing about which
//! digests exist. A key is a high-entropy secret, so a plain (unsalted) SHA-256 is enough: there
//! is nothing to brute-force the way there is with passwords.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::PolicyError;
use crate::openai::ApiError;

/// One API key as configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Who the key belongs to: limits and audit records are per tenant.
    pub tenant: String,
    /// Hex SHA-256 of the key (64 characters).
    pub key_sha256: String,
    /// Models the key may use; empty allows every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// May call admin and mesh-debug endpoints.
    #[serde(default)]
    pub admin: bool,
    /// The tenant's prompts share cached prefixes with other sharing tenants. Off (the default):
    /// its requests are salted with its own `cache_salt`, so no other tenant can hit, or time,
    /// its cached prompts.
    #[serde(default)]
    pub share_cache: bool,
    /// The band its requests are in unless they ask (`x-kvmesh-priority`) for another.
    #[serde(default)]
    pub priority: crate::flow::Priority,
    /// The highest band its requests may ask for; its `priority` when left out.
    #[serde(default)]
    pub max_priority: Option<crate::flow::Priority>,
    /// Its weight in the fair queue against other tenants of the same band (at least 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The largest fair-queue weight a key may have: one tenant cannot take a whole band.
pub const MAX_WEIGHT: u32 = 1000;

impl Default for KeyEntry {
    fn default() -> Self {
        Self {
            tenant: String::new(),
            key_sha256: String::new(),
            models: Vec::new(),
            admin: false,
            share_cache: false,
            priority: Default::default(),
            max_priority: None,
            weight: one(),
        }
    }
}

/// The tenant a verified key maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub models: Vec<String>,
    pub admin: bool,
    pub share_cache: bool,
    pub priority: crate::flow::Priority,
    pub max_priority: crate::flow::Priority,
    pub weight: u32,
}

/// The start of every tenant's own `cache_salt`.
const TENANT_SALT_PREFIX: &str = "kvmesh-tenant-";

impl Tenant {
    /// The `cache_salt` this tenant's request is sent with: its own prefix (a digest of its
    /// name, which no client can choose), then the client's salt if any; `None` for a tenant
    /// that shares its cache (the client's salt is kept as sent).
    pub fn cache_salt(&self, client_salt: Option<&str>) -> Option<String> {
        if self.share_cache {
            // A sharing tenant keeps its client's salt, but can never claim another tenant's.
            return client_salt.map(|s| match s.starts_with(TENANT_SALT_PREFIX) {
                true => format!("kvmesh-shared:{s}"),
                false => s.to_owned(),
            });
        }
        let digest = hex::encode(&Sha256::digest(self.name.as_bytes())[..8]);
        Some(match client_salt {
            Some(s) => format!("{TENANT_SALT_PREFIX}{digest}:{s}"),
            None => format!("{TENANT_SALT_PREFIX}{digest}"),
        })
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}

/// The verified keys of a node: immutable, replaced whole on reload.
#[derive(Debug, Default)]
pub struct KeyStore {
    keys: Vec<([u8; 32], Arc<Tenant>)>,
}

/// The hex SHA-256 of a key, as `key_sha256` stores it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl KeyStore {
    /// Checks every entry; the error names the entry and what is wrong with it.
    pub fn new(entries: &[KeyEntry]) -> Result<Self, PolicyError> {
        let mut keys = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            if e.tenant.trim().is_empty() {
                return Err(PolicyError::Keys(format!("keys[{i}]: tenant must not be empty")));
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(e.key_sha256.trim(), &mut digest).map_err(|_| {
                PolicyError::Keys(format!(
                    "keys[{i}] (tenant `{}`): key_sha256 must be 64 hex characters; make it with `kvmesh keys hash KEY`",
                    e.tenant
                ))
            })?;
            if keys.iter().any(|(d, _)| *d == digest) {
                return Err(PolicyError::Keys(format!(
                    "keys[{i}] (tenant `{}`): the same key is listed twice",
                    e.tenant
                )));
            }
            let tenant = Tenant {
                name: e.tenant.clone(),
                models: e.models.clone(),
                admin: e.admin,
                share_cache: e.share_cache,
                priority: e.priority,
                // A key may always ask for its own band.
                max_priority: e.max_priority.unwrap_or(e.priority).max(e.priority),
                weight: e.weight.clamp(1, MAX_WEIGHT),
            };
            keys.push((digest, Arc::new(tenant)));
        }
        Ok(Self { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant of an `Authorization` header value (`Bearer KEY`). Every failure gets the same
    /// 401, so a caller learns nothing about why.
    pub fn verify(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
        let key = authorization
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(ApiError::invalid_api_key)?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found: Option<&Arc<Tenant>> = None;
        // No early exit: every digest is compared, whether or not one matched already.
        for (d, tenant) in &self.keys {
            if bool::from(d.ct_eq(&digest)) {
                found = Some(tenant);
            }
        }
        found.cloned().ok_or_else(ApiError::invalid_api_key)
    }

    /// Like [`verify`](Self::verify), and the key must be an admin key.
    pub fn verify_admin(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
        let t = self.verify(authorization)?;
        if t.admin {
            Ok(t)
        } else {
            Err(ApiError::invalid_api_key())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_salt_their_cache_apart_unless_they_share() {
        let t = |name: &str, share| Tenant {
            name: name.into(),
            models: vec![],
            admin: false,
            share_cache: share,
            priority: Default::default(),
            max_priority: Default::default(),
            weight: 1,
        };
        let a = t("acme", false).cache_salt(None).unwrap();
        assert_ne!(Some(a.clone()), t("other", false).cache_salt(None));
        assert_eq!(Some(a.clone()), t("acme", false).cache_salt(None), "stable for a tenant");
        // A client cannot pick another tenant's salt: its own always comes after the prefix.
        assert!(t("other", false).cache_salt(Some(&a)).unwrap().starts_with("kvmesh-tenant-"));
        assert_ne!(t("other", false).cache_salt(Some(&a)).as_deref(), Some(a.as_str()));
        assert_eq!(t("shared", true).cache_salt(None), None);
        assert_eq!(t("shared", true).cache_salt(Some("s")).as_deref(), Some("s"));
        assert_ne!(t("shared", true).cache_salt(Some(&a)), Some(a.clone()), "nor may a sharing tenant claim it");
    }

    fn store() -> KeyStore {
        KeyStore::new(&[
            KeyEntry {
                tenant: "acme".into(),
                key_sha256: hash_key("sk-acme"),
                models: vec!["m1".into()],
                admin: false,
                share_cache: false,
                ..Default::default()
            },
            KeyEntry {
                tenant: "ops".into(),
                key_sha256: hash_key("sk-ops"),
                models: vec![],
                admin: true,
                share_cache: false,
                ..Default::default()
            },
        ])
        .unwrap()
    }

    #[test]
    fn right_key_maps_to_its_tenant() {
        let s = store();
        let t = s.verify(Some("Bearer sk-acme")).unwrap();
        assert_eq!(t.name, "acme");
        assert!(t.may_use("m1") && !t.may_use("m2"));
        assert!(s.verify(Some("Bearer sk-ops")).unwrap().may_use("anything"));
    }

    #[test]
    fn wrong_or_missing_key_is_one_opaque_401() {
        let s = store();
        let want = ApiError::invalid_api_key();
        for h in [None, Some(""), Some("Bearer "), Some("Basic sk-acme"), Some("Bearer sk-acmE"), Some("sk-acme")] {
            let e = s.verify(h).unwrap_err();
            assert_eq!(e, want, "{h:?}");
        }
        assert_eq!(want.status.as_u16(), 401);
        let v: serde_json::Value = serde_json::from_str(&want.to_json()).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert_eq!(v["error"]["message"], "Incorrect API key provided.");
    }

    #[test]
    fn admin_endpoints_need_an_admin_key() {
        let s = store();
        assert!(s.verify_admin(Some("Bearer sk-acme")).is_err());
        assert_eq!(s.verify_admin(Some("Bearer sk-ops")).unwrap().name, "ops");
    }

    #[test]
    fn bad_entries_say_what_to_fix() {
        let e = KeyStore::new(&[KeyEntry {
            tenant: "a".into(),
            key_sha256: "xyz".into(),
            models: vec![],
            admin: false,
            share_cache: false,
            ..Default::default()
        }])
        .unwrap_err()
        .to_string();
        assert!(e.contains("kvmesh keys hash"), "{e}");
        let dup = KeyEntry {
            tenant: "a".into(),
            key_sha256: hash_key("k"),
            models: vec![],
            admin: false,
            share_cache: false,
            ..Default::default()
        };
        assert!(KeyStore::new(&[dup.clone(), dup]).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn hash_is_sha256_hex() {
        // echo -n abc | sha256sum
        assert_eq!(hash_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
