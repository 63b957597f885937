//! The simulator's side of vLLM's NixlConnector (prefill/decode disaggregation), enabled with
//! `--kv-transfer` (vLLM: `--kv-transfer-config '{"kv_connector":"NixlConnector",...}'`).
//!
//! - A request with `kv_transfer_params.do_remote_decode = true` is served as usual (the router
//!   sends it with `max_tokens = 1`), and its blocks are kept for a decode engine to pull: the
//!   answer's `kv_transfer_params` names them (`remote_request_id`, `remote_block_ids`, the
//!   engine's id, host and port), like vLLM's.
//! - A request with `do_remote_prefill = true` pulls those blocks from the engine named in its
//!   params instead of computing its prompt: the pull goes over this simulator's side channel
//!   (`POST /kvmesh/nixl/pull` on the prefill engine, standing in for NIXL's own), then waits for
//!   the modelled transfer (`kv_bytes_per_token` over `kv_link_gb_per_s`, plus a fixed cost per
//!   transfer; shared/design/engine-timing.md section 7). Params that are malformed get a 400;
//!   blocks that are gone (pulled already, expired after `kv_transfer_ttl_s`, or an unreachable
//!   engine) get a 503, so the router may serve the request another way.
//!
//! Limits: the prefill engine does not pin the blocks it offers (they stay in its prefix cache
//! and may be evicted; the pull still succeeds, as only the bookkeeping is simulated), and the
//! transfer time does not contend with other transfers on the same link.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kvmesh_policy::openai::ApiError;
use serde_json::{json, Value};

/// Blocks offered to decode engines, by `remote_request_id`.
#[derive(Default)]
pub struct Offers {
    pending: Mutex<HashMap<String, (usize, Instant)>>,
}

impl Offers {
    /// Keeps `tokens` of KV for a decode engine until `ttl` passes.
    pub fn offer(&self, id: &str, tokens: usize, ttl: Duration) {
        let now = Instant::now();
        if let Ok(mut p) = self.pending.lock() {
            p.retain(|_, (_, expires)| *expires > now);
            p.insert(id.to_owned(), (tokens, now + ttl));
        }
    }

    /// The offered tokens, once: a second pull of the same blocks finds nothing.
    pub fn take(&self, id: &str) -> Option<usize> {
        let mut p = self.pending.lock().ok()?;
        let (tokens, expires) = p.remove(id)?;
        (expires > Instant::now()).then_some(tokens)
    }
}

/// What a request asks of the connector.
#[derive(Debug, Clone, PartialEq)]
pub enum Transfer {
    None,
    /// Prefill here; a decode engine will pull the blocks.
    Offer,
    /// Pull the prompt's blocks from `host:port`, offered there as `request_id`.
    Pull {
        host: String,
        port: u16,
        request_id: String,
        blocks: usize,
    },
}

/// Reads `kv_transfer_params` as vLLM's NixlConnector does.
pub fn parse(params: Option<&Value>) -> Result<Transfer, ApiError> {
    let Some(p) = params else { return Ok(Transfer::None) };
    let bad = |what: &str| {
        ApiError::invalid(format!("Invalid kv_transfer_params: {what}."), Some("kv_transfer_params"))
            .with_code("invalid_kv_transfer_params")
    };
    let Some(obj) = p.as_object() else { return Err(bad("not an object")) };
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
    match (flag("do_remote_decode"), flag("do_remote_prefill")) {
        (true, true) => Err(bad("do_remote_decode and do_remote_prefill are both true")),
        (true, false) => Ok(Transfer::Offer),
        (false, false) => Ok(Transfer::None),
        (false, true) => {
            let host = obj.get("remote_host").and_then(Value::as_str).ok_or_else(|| bad("remote_host missing"))?;
            let port = obj
                .get("remote_port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| bad("remote_port missing or not a port"))?;
            let request_id =
                obj.get("remote_request_id").and_then(Value::as_str).ok_or_else(|| bad("remote_request_id missing"))?;
            let blocks = obj
                .get("remote_block_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| bad("remote_block_ids missing"))?
                .len();
            Ok(Transfer::Pull { host: host.to_owned(), port, request_id: request_id.to_owned(), blocks })
        }
    }
}

/// The params a prefill engine answers with (vLLM's fields; `remote_block_ids` are the blocks'
/// positions here, opaque to the router).
pub fn offer_params(engine_id: &str, host: &str, port: u16, request_id: &str, blocks: usize) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_engine_id": engine_id,
        "remote_block_ids": (0..blocks).collect::<Vec<_>>(),
        "remote_host": host,
        "remote_port": port,
        "remote_request_id": request_id,
        "tp_size": 1,
    })
}

/// Pulls an offer from the prefill engine's side channel. `Ok(tokens)`, or a 503 to give up on.
pub async fn pull(client: &reqwest::Client, host: &str, port: u16, request_id: &str) -> Result<usize, ApiError> {
    let url = format!("http://{host}:{port}/kvmesh/nixl/pull");
    let gone = |why: String| {
        ApiError::unavailable(format!("KV transfer from {host}:{port} failed: {why}")).with_code("kv_transfer_failed")
    };
    let resp = client
        .post(&url)
        .json(&json!({"remote_request_id": request_id}))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| gone(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(gone(format!("the blocks of {request_id} are gone ({})", resp.status())));
    }
    let v: Value = resp.json().await.map_err(|e| gone(e.to_string()))?;
    v.get("tokens").and_then(Value::as_u64).map(|t| t as usize).ok_or_else(|| gone("bad side-channel answer".into()))
}

/// Modelled time to move `tokens` of KV between engines.
pub fn transfer_time(tokens: usize, bytes_per_token: u64, link_gb_per_s: f64, overhead_ms: f64) -> Duration {
    let bytes = tokens as f64 * bytes_per_token as f64;
    let secs = bytes / (link_gb_per_s.max(1e-3) * 1e9) + overhead_ms / 1000.0;
    Duration::from_secs_f64(secs.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_shapes_and_rejects_broken_ones() {
        assert_eq!(parse(None).unwrap(), Transfer::None);
        let offer = json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                           "remote_block_ids": null, "remote_host": null, "remote_port": null});
        assert_eq!(parse(Some(&offer)).unwrap(), Transfer::Offer);
        let p = offer_params("e", "127.0.0.1", 8000, "r1", 3);
        assert_eq!(
            parse(Some(&p)).unwrap(),
            Transfer::Pull { host: "127.0.0.1".into(), port: 8000, request_id: "r1".into(), blocks: 3 }
        );
        for broken in [
            json!("x"),
            json!({"do_remote_prefill": true}),
            json!({"do_remote_prefill": true, "remote_host": "h", "remote_port": 70000, "remote_request_id": "r",
                   "remote_block_ids": []}),
            json!({"do_remote_prefill": true, "do_remote_decode": true}),
        ] {
            let e = parse(Some(&broken)).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{broken}");
        }
    }

    #[test]
    fn offers_are_taken_once_and_expire() {
        let o = Offers::default();
        o.offer("a", 100, Duration::from_secs(60));
        o.offer("b", 5, Duration::ZERO);
        assert_eq!(o.take("a"), Some(100));
        assert_eq!(o.take("a"), None);
        assert_eq!(o.take("b"), None);
    }

    #[test]
    fn transfer_time_matches_the_sourced_rdma_figure() {
        // engine-timing.md section 7: 8B over 400G RDMA, ~3.3 us/token + 2 ms; 2k tokens ~9 ms.
        let t = transfer_time(2048, 131_072, 40.0, 2.0);
        assert!((t.as_secs_f64() * 1000.0 - 8.7).abs() < 1.0, "{t:?}");
    }
}
