//! A request split in two (vLLM's NixlConnector flow, as llm-d's sidecar drives it): the
//! prefill engine gets a copy with `do_remote_decode`, not streamed and one token long; its
//! answer's `kv_transfer_params` go verbatim into the original request, which the decode engine
//! serves and streams.

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;
use kvmesh_policy::request::InferenceRequest;
use kvmesh_policy::route::RouteReason;

use super::pick::SplitTargets;
use super::relay::MAX_BUFFERED_RESPONSE;
use super::Router;
use crate::ctx::RequestCtx;
use crate::reply::is_not_accepted;

impl Router {
    /// `Err(reason)` means nothing reached the client, and the request can still be served
    /// whole.
    pub(super) async fn serve_split(
        self: &Arc<Self>,
        ctx: &RequestCtx,
        req: &InferenceRequest,
        body: &Bytes,
        split: &SplitTargets,
    ) -> Result<Response, &'static str> {
        let Ok(serde_json::Value::Object(original)) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Err("body_not_object");
        };
        let mut prefill = original.clone();
        prefill.insert(
            "kv_transfer_params".into(),
            serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                               "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        );
        prefill.insert("stream".into(), false.into());
        prefill.remove("stream_options");
        prefill.insert("max_tokens".into(), 1.into());
        for k in ["max_completion_tokens", "min_tokens"] {
            if prefill.contains_key(k) {
                prefill.insert(k.into(), 1.into());
            }
        }
        let prefill_body = Bytes::from(serde_json::Value::Object(prefill).to_string());
        let mut prefill_ctx = ctx.clone();
        prefill_ctx.id = format!("{}-prefill", ctx.id);
        let route = split.decision.to_string();
        self.metrics.route_decisions.with_label_values(&[RouteReason::Pd.as_str()]).inc();
        let answer = match self.forward_to(&prefill_ctx, &split.prefill, false, &prefill_body, &route).await {
            Ok(resp) if resp.status().is_success() => resp,
            Ok(_) | Err(_) => return Err("prefill_failed"),
        };
        let bytes =
            axum::body::to_bytes(answer.into_body(), MAX_BUFFERED_RESPONSE).await.map_err(|_| "prefill_failed")?;
        let params = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|mut v| v.get_mut("kv_transfer_params").map(serde_json::Value::take))
            .filter(serde_json::Value::is_object)
            .ok_or("prefill_no_transfer_params")?;
        let mut decode = original;
        decode.insert("kv_transfer_params".into(), params);
        let decode_body = Bytes::from(serde_json::Value::Object(decode).to_string());
        ctx.span.record("route", route.as_str());
        match self.forward_to(ctx, &split.decode, req.stream, &decode_body, &route).await {
            Ok(resp) if !is_not_accepted(&resp) => Ok(resp),
            Ok(_) | Err(_) => Err("decode_failed"),
        }
    }
}
