//! Responses state lives in the engine that made it (vLLM keeps stored responses in its API
//! server's memory): a follow-up (`previous_response_id`), a retrieval and a cancel must reach
//! that engine, from whichever node receives them.
//!
//! No table is kept or gossiped: the node that sends a Responses request to one of its engines
//! chooses the response's id (vLLM takes it from the request's `request_id`, a field clients may
//! not set, `policy::request::ENGINE_OWNED_FIELDS`), and the id names the engine:
//! `resp_` + 12 hex digits of a hash of `node/engine` + 32 random hex digits. Any node resolves
//! the tag against the engines it knows (its own and its peers', from gossip). When that engine
//! has left the mesh, the follow-up gets a 404 saying so: its state is gone with it.

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

/// A fresh response id naming `node/engine`.
pub fn mint(node: &str, engine: &str) -> String {
    format!("resp_{}{:032x}", tag(node, engine), rand::random::<u128>())
}

/// The request body with the response id the engine will use, for a Responses request about to
/// be sent to `node/engine`. `None` when the body is not a JSON object (the engine refuses it).
pub fn with_response_id(body: &[u8], node: &str, engine: &str) -> Option<Vec<u8>> {
    let mut obj: serde_json::Map<String, Value> = serde_json::from_slice(body).ok()?;
    obj.insert("request_id".into(), Value::String(mint(node, engine)));
    serde_json::to_vec(&obj).ok()
}

/// The tag an id carries, if it is one a node made.
fn tag_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("resp_")?;
    let tag = rest.get(..TAG_HEX)?;
    (rest.len() == TAG_HEX + 32 && rest.bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
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
    /// nowhere else (another engine does not have the response).
    pub async fn serve_stored(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        req: &InferenceRequest,
        body: &Bytes,
        id: &str,
    ) -> Response {
        let Some(target) = self.response_home(id) else {
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
    fn ids_name_their_engine_and_nothing_else() {
        let id = mint("n1", "e0");
        assert!(kvmesh_policy::endpoint::is_response_id(&id), "{id}");
        assert_eq!(tag_of(&id), Some(tag("n1", "e0").as_str()));
        assert_ne!(tag("n1", "e0"), tag("n1e", "0"), "the separator is part of the tag");
        assert_ne!(mint("n1", "e0"), id, "ids are fresh");
        for other in ["resp_abc", "resp_0123456789abcdef", "chatcmpl-1", &format!("{id}x")] {
            assert_eq!(tag_of(other), None, "{other}");
        }
    }
}
