//! Entry points for the coverage-guided fuzz targets (`fuzz/`, `scripts/fuzz.sh`): the
//! parsers of hostile input that are otherwise private to the node, each as one call on bytes in
//! memory, running the same code as the node. Not an API: nothing but the fuzz targets may call
//! them.

use kvmesh_policy::guardrails::{Denied, GuardrailConfig};
use kvmesh_policy::request::Endpoint;

pub use crate::audit::{ChainBreak, VerifyReport};

/// An engine's streamed answer, given as the chunks it arrived in, as the guard rewrites it
/// for the client with the built-in `guardrails` and a held-back window of `window` bytes (no
/// webhooks, no audit record): the client's bytes (ending in `[DONE]` when the engine's did),
/// and the rule that stopped the stream, if one did. `Err`: the rules do not build.
pub fn rewrite_sse(
    guardrails: &[GuardrailConfig],
    window: usize,
    endpoint: Endpoint,
    chunks: &[&[u8]],
) -> Result<(Vec<u8>, Option<Denied>), String> {
    crate::guard::rewrite_for_fuzzing(guardrails, window, endpoint, chunks)
}

/// What the KV-event frame bound (`engine::zmtp_guard`) passes on of an engine's bytes, and
/// the bound it broke, if any.
pub fn zmtp_relay(input: &[u8]) -> (Vec<u8>, Result<(), String>) {
    crate::engine::zmtp_guard::relay_bytes(input)
}

/// `kvmesh audit verify` over files' contents, oldest first.
pub fn audit_verify(files: &[&[u8]]) -> Result<VerifyReport, ChainBreak> {
    crate::audit::verify_bytes(files)
}
