//! API keys: who may call the inference endpoints (and which models), the admin endpoints,
//! and `/metrics` when it is protected. Keys are hashed and compared in constant time
//! (`policy::auth`).

use std::sync::Arc;

use axum::http::{header, HeaderMap};
use kvmesh_policy::auth::Tenant;
use kvmesh_policy::openai::ApiError;

use super::Guard;

impl Guard {
    fn authorization(headers: &HeaderMap) -> Option<&str> {
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
    }

    /// For admin and mesh-debug endpoints: `Err` is the 401 to answer.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.auth_enabled {
            return Ok(());
        }
        self.keys().verify_admin(Self::authorization(headers)).map(|_| ()).inspect_err(|_| {
            self.metrics.auth_failures.inc();
        })
    }

    /// For `/metrics`: admin-only when `protect_metrics` is set.
    pub fn check_metrics(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.protect_metrics {
            self.check_admin(headers)
        } else {
            Ok(())
        }
    }

    /// For client endpoints (inference and `/v1/models`): the caller's tenant, if keys are
    /// on.
    pub fn check_client(&self, headers: &HeaderMap) -> Result<Option<Arc<Tenant>>, ApiError> {
        if !self.auth_enabled {
            return Ok(None);
        }
        // Anthropic's clients send their key as `x-api-key`.
        let anthropic = match Self::authorization(headers) {
            None => headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(|k| format!("Bearer {k}")),
            Some(_) => None,
        };
        let presented = Self::authorization(headers).or(anthropic.as_deref());
        self.keys().verify(presented).map(Some).inspect_err(|_| {
            self.metrics.auth_failures.inc();
        })
    }
}
