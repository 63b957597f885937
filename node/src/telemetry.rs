//! Optional export of the tracing spans (the per-request `request` span and its fields) to an
//! OpenTelemetry collector over OTLP/HTTP with protobuf bodies (`observability.otlp_endpoint`).
//!
//! Spans go out through `ReqwestClient`, a small `opentelemetry_http::HttpClient` over the
//! node's own reqwest (the same major the exporter uses, so no second HTTP stack): it bounds the
//! collector's answer (`MAX_ANSWER_BYTES`, chunked or not) and each POST's time, which the
//! exporter's stock clients do not. The SDK's batch processor runs on a thread of its own,
//! outside tokio, so each POST is spawned onto the node's runtime and awaited from there.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;

use crate::error::NodeError;

/// Longest one export POST may take (connect included).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read back; OTLP answers are tiny.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
struct ReqwestClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for ReqwestClient {
    async fn send_bytes(&self, request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let client = self.client.clone();
        let post = async move {
            let resp =
                client.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            if resp.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES) {
                return Err(HttpError::from("collector answer too large"));
            }
            let mut out = http::Response::builder().status(resp.status());
            if let Some(h) = out.headers_mut() {
                *h = resp.headers().clone();
            }
            let mut resp = resp;
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if (body.len() + chunk.len()) as u64 > MAX_ANSWER_BYTES {
                    return Err(HttpError::from("collector answer too large"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(out.body(Bytes::from(body))?)
        };
        self.runtime.spawn(post).await.map_err(|e| HttpError::from(e.to_string()))?
    }
}

/// The running exporter: its tracing layer goes into the subscriber; `shutdown` sends what is
/// still batched.
pub struct OtlpExport {
    provider: SdkTracerProvider,
}

impl OtlpExport {
    /// Starts exporting to `endpoint` (the collector's base URL, e.g. `http://otel:4318`; spans
    /// go to `ENDPOINT/v1/traces`). Must be called inside the tokio runtime.
    pub fn start(endpoint: &str, node_name: &str) -> Result<Self, NodeError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| NodeError::Config(format!("observability.otlp_endpoint: no runtime: {e}")))?;
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| NodeError::Client(format!("OTLP client: {e}")))?;
        let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(ReqwestClient { client, runtime })
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| NodeError::Config(format!("observability.otlp_endpoint `{endpoint}`: {e}")))?;
        let resource = Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME").ok().filter(|n| !n.is_empty()).unwrap_or_else(|| "kvmesh".into()),
            )
            .with_attribute(opentelemetry::KeyValue::new("service.instance.id", node_name.to_owned()))
            .build();
        let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        Ok(Self { provider })
    }

    /// The layer that turns tracing spans into OpenTelemetry spans for this exporter.
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("kvmesh"))
    }

    /// Sends what is batched now (tests, and before exit).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "OTLP flush failed");
        }
    }

    /// Flushes and stops the exporter. Blocks the calling thread until the batch is sent, so
    /// call it from a blocking context (`spawn_blocking`) or at exit.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP shutdown failed");
        }
    }
}
