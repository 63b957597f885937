//! Responses state lives in the engine that made it (vLLM keeps stored responses in its API
//! server's memory): a follow-up (`previous_response_id`), a retrieval and a cancel must reach
//! that engine, from whichever node receives them.
//!
//! No table is kept or gossiped: the node that sends a Responses request to one of its engines
//! chooses the response's id (vLLM takes it from the request's `request_id`, a field clients may
//! not set, `policy::request::ENGINE_OWNED_FIELDS`), and the id names the engine and the tenant
//! that made it: `resp_` + 12 hex digits of a hash of `node/engine` + 8 hex digits of a hash of
//! the tenant + 24 random hex digits. Any node resolves the engine tag against the engines it
//! knows (its own and its peers', from gossip; with cells, its own cell's only), and the guard
//! refuses another tenant's id as unknown. When that engine has left the mesh, the follow-up gets
//! a 404 saying so: its state is gone with it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{Endpoint, InferenceRequest};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{Router, Target};
use crate::ctx::RequestCtx;
use crate::reply::reply_error;

const TAG_HEX: usize = 12;
const OWNER_HEX: usize = 8;
const RANDOM_HEX: usize = 24;

/// The tag of an engine in response ids.
fn tag(node: &str, engine: &str) -> String {
    let h = Sha256::new()
        .chain_update(b"kvmesh-response-home\0")
        .chain_update(node)
        .chain_update(b"\0")
        .chain_update(engine)
        .finalize();
    hex::encode(&h[..TAG_HEX / 2])
}

/// The owner part of ids a tenant's requests make.
fn owner(tenant: &str) -> String {
    let h = Sha256::new().chain_update(b"kvmesh-response-owner\0").chain_update(tenant).finalize();
    hex::encode(&h[..OWNER_HEX / 2])
}

/// A fresh response id naming `node/engine` and `tenant`.
pub fn mint(node: &str, engine: &str, tenant: &str) -> String {
    let random = format!("{:032x}", rand::random::<u128>());
    format!("resp_{}{}{}", tag(node, engine), owner(tenant), &random[..RANDOM_HEX])
}

/// The request body with the response id the engine will use, for a Responses request about to
/// be sent to `node/engine` for `tenant`. `None` when the body is not a JSON object (the engine
/// refuses it).
pub fn with_response_id(body: &[u8], node: &str, engine: &str, tenant: &str) -> Option<Vec<u8>> {
    let mut obj: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    obj.insert("request_id".into(), Value::String(mint(node, engine, tenant)));
    serde_json::to_vec(&obj).ok()
}

/// The engine tag and owner an id carries, if it is one a node made.
fn parts_of(id: &str) -> Option<(&str, &str)> {
    let rest = id.strip_prefix("resp_")?;
    if rest.len() != TAG_HEX + OWNER_HEX + RANDOM_HEX || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((&rest[..TAG_HEX], &rest[TAG_HEX..TAG_HEX + OWNER_HEX]))
}

fn tag_of(id: &str) -> Option<&str> {
    parts_of(id).map(|(t, _)| t)
}

/// Whether `tenant` made response `id` (an id no node made belongs to nobody).
pub fn belongs_to(id: &str, tenant: &str) -> bool {
    parts_of(id).is_some_and(|(_, o)| o == owner(tenant))
}

impl Router {
    /// The engine that stored response `id`, among those this node knows.
    pub(super) fn response_home(&self, id: &str) -> Option<Target> {
        let want = tag_of(id)?;
        if let Some(e) = self.engines.engines.iter().find(|e| tag(&self.node_name, &e.name) == want) {
            return Some(Target::Local(e.clone()));
        }
        let view = self.mesh()?.view();
        view.engines.iter().find(|r| tag(&r.id.node, &r.load.name) == want).cloned().map(Target::Remote)
    }

    /// A request that must be served by the engine that stored a response: sent there, and
    /// nowhere else (another engine does not have the response). `local_only`: a peer's request,
    /// which never crosses the mesh a second time.
    pub async fn serve_stored(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        req: &InferenceRequest,
        body: &Bytes,
        id: &str,
        local_only: bool,
    ) -> Response {
        let home = self.response_home(id).filter(|t| !local_only || matches!(t, Target::Local(_)));
        let Some(target) = home else {
            let what = match ctx.endpoint {
                Endpoint::Responses => "previous_response_id",
                _ => "response_id",
            };
            let mut e = ApiError::not_found(format!(
                "Response with id '{id}' not found: no engine in this mesh stored it (the engine that did has left, or the id was not made by this mesh)."
            ));
            e.param = Some(what.to_owned());
            return reply_error(&self.metrics, ctx, &e);
        };
        ctx.span.record("reason", "stored_response");
        let route = format!("reason=stored_response; engine={}", target.label(&self.node_name));
        match self.forward_to(ctx, &target, req.stream, body, &route).await {
            Ok(r) => r,
            Err(retry) => reply_error(&self.metrics, ctx, &retry.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_engine_and_owner_and_nothing_else() {
        let id = mint("n1", "e0", "team-a");
        assert!(kvmesh_policy::endpoint::is_response_id(&id), "{id}");
        assert_eq!(id.len(), "resp_".len() + 44, "as long as vLLM's own (resp_ + 32 hex) plus 12");
        assert_eq!(tag_of(&id), Some(tag("n1", "e0").as_str()));
        assert!(belongs_to(&id, "team-a") && !belongs_to(&id, "team-b"));
        assert!(!belongs_to("resp_abc", "team-a"));
        assert_ne!(tag("n1", "e0"), tag("n1e", "0"), "the separator is part of the tag");
        assert_ne!(mint("n1", "e0", "team-a"), id, "ids are fresh");
        for other in ["resp_abc", "resp_0123456789abcdef", "chatcmpl-1", &format!("{id}x")] {
            assert_eq!(tag_of(other), None, "{other}");
        }
    }
}
