//! Request bodies: `policy::request::parse` and `parse_client` for every endpoint (the
//! Responses and Messages conversions run inside them), `prompt_strings` and
//! `with_stream_usage`.
//!
//! Input: one selector byte (endpoint, default model), then the body.
//! Invariants: an accepted request keeps vLLM's bounds (a model name without control characters,
//! `max_tokens` and `n` at least 1, `min_tokens` at most `max_tokens`); the edge's view is the
//! view of the body it forwards (parsing the forwarded body gives the same request, and the edge
//! changes nothing more a second time); no field only the node may set survives the edge; a
//! salted endpoint carries the tenant's salt; the strings guardrails read stay within
//! `MAX_PROMPT_STRINGS`/`MAX_POINTER_BYTES`; asking for the usage chunk is idempotent.
#![no_main]

use kvmesh_policy::request::{self, Endpoint, ENGINE_OWNED_FIELDS, MAX_POINTER_BYTES, MAX_PROMPT_STRINGS};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn tenant_salt(client: Option<&str>) -> Option<String> {
    Some(format!("tenant:{}", client.unwrap_or_default()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let endpoint = Endpoint::ALL[sel as usize % Endpoint::ALL.len()];
    let default_model = (sel & 0x80 != 0).then_some("default-model");

    if let Ok(req) = request::parse(endpoint, body) {
        assert_eq!(req.endpoint, endpoint);
        assert!(!req.model.is_empty() && !req.model.chars().any(char::is_control), "{:?}", req.model);
        assert_ne!(req.max_tokens, Some(0));
        assert!(req.n >= 1);
        if let Some(max) = req.max_tokens {
            assert!(req.min_tokens <= max);
        }
    }

    // The edge, keeping the client's salt: what it forwards parses to the view it returned.
    if let Ok(c) = request::parse_client(endpoint, body, request::client_salt, default_model) {
        assert!(c.removed.iter().all(|f| ENGINE_OWNED_FIELDS.contains(f)));
        assert_eq!(c.req.priority, 0, "a client set the engine's priority");
        assert!(c.req.kv_transfer_params.is_none(), "a client set kv_transfer_params");
        let sent = c.body.as_deref().unwrap_or(body);
        let obj: serde_json::Map<String, Value> = serde_json::from_slice(sent).expect("the forwarded body is JSON");
        for f in ENGINE_OWNED_FIELDS {
            assert!(!obj.contains_key(*f), "{f} survived the edge");
        }
        let again = request::parse(endpoint, sent).expect("the forwarded body parses");
        assert_eq!(again, c.req, "the view differs from the forwarded body's");
        let twice = request::parse_client(endpoint, sent, request::client_salt, default_model)
            .expect("the forwarded body passes the edge again");
        assert!(twice.body.is_none() && twice.removed.is_empty(), "the edge is not idempotent");
        assert_eq!(twice.req, c.req);
    }

    // With a tenant's salt: every salted endpoint carries it.
    if let Ok(c) = request::parse_client(endpoint, body, tenant_salt, default_model) {
        let salted = !matches!(endpoint, Endpoint::Messages | Endpoint::MessagesCountTokens);
        if salted {
            assert!(c.req.cache_salt.as_deref().is_some_and(|s| s.starts_with("tenant:")), "{:?}", c.req.cache_salt);
        }
    }

    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Ok(strings) = request::prompt_strings(endpoint, &v) {
            assert!(strings.len() <= MAX_PROMPT_STRINGS);
            assert!(strings.iter().map(|(p, _)| p.len()).sum::<usize>() <= MAX_POINTER_BYTES);
            assert!(strings.iter().all(|(p, _)| p.starts_with('/')));
        }
        if let Value::Object(obj) = &v {
            // The conversions on any object, not only on requests that pass parse's checks.
            let _ = kvmesh_policy::convert::responses(obj);
            let _ = kvmesh_policy::convert::messages(obj);
        }
    }

    if let Some(asked) = request::with_stream_usage(body) {
        let v: Value = serde_json::from_slice(&asked).expect("with_stream_usage gives JSON");
        assert_eq!(v["stream"], Value::Bool(true));
        assert_eq!(v["stream_options"]["include_usage"], Value::Bool(true));
        assert!(request::with_stream_usage(&asked).is_none(), "asked twice");
    }
});
