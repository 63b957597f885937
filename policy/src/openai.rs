//! The OpenAI error envelope, as vLLM returns it: `{"error":{"message","type","param","code"}}`.

use http::StatusCode;
use serde::Serialize;

/// An error a client sees. `status` picks the HTTP status; the rest is the JSON body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: &'a ApiError,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), kind, param: None, code: None }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = param.map(str::to_owned);
        e
    }

    /// 404: the model is not served anywhere this node can reach.
    pub fn model_not_found(model: &str) -> Self {
        let mut e =
            Self::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("The model `{model}` does not exist."));
        e.param = Some("model".into());
        e.code = Some("model_not_found".into());
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message)
    }

    /// 413: the body is over the configured size limit.
    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("Request body is larger than the limit of {limit} bytes."),
        );
        e.code = Some("request_too_large".into());
        e
    }

    /// 503: nothing can take the request now; the client may retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "service_unavailable", message);
        e.code = Some("service_unavailable".into());
        e
    }

    /// 502: an upstream engine failed in a way the client cannot fix.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_GATEWAY, "upstream_error", message);
        e.code = Some("upstream_error".into());
        e
    }

    /// 504: an upstream engine did not answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::GATEWAY_TIMEOUT, "upstream_error", message);
        e.code = Some("upstream_timeout".into());
        e
    }

    /// 401: a missing or wrong API key. Always the same body, so nothing about the key leaks.
    pub fn invalid_api_key() -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "Incorrect API key provided.");
        e.code = Some("invalid_api_key".into());
        e
    }

    /// 429: a tenant is over a rate or token limit; `retry-after` travels as a header.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded", message);
        e.code = Some("rate_limit_exceeded".into());
        e
    }

    /// 400: a guardrail refused the prompt or the answer.
    pub fn content_filter(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.code = Some("content_filter".into());
        e
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }

    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.into());
        self
    }

    /// The JSON body, `{"error":{...}}`.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings cannot fail; the fallback keeps this infallible anyway.
        serde_json::to_string(&Envelope { error: self }).unwrap_or_else(|_| {
            r#"{"error":{"message":"error","type":"internal_error","param":null,"code":null}}"#.into()
        })
    }

    /// Anthropic's error body (`{"type":"error","error":{"type","message"}}`), for the Messages
    /// API; the error type by status, as Anthropic names them.
    pub fn to_anthropic_json(&self) -> String {
        let kind = match self.status.as_u16() {
            400 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        serde_json::json!({"type": "error", "error": {"type": kind, "message": self.message}}).to_string()
    }

    /// The same envelope as one Server-Sent Event, for failures after a stream has started.
    pub fn to_sse_event(&self) -> String {
        format!("data: {}\n\n", self.to_json())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl std::error::Error for ApiError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_has_all_four_fields() {
        let e = ApiError::invalid("bad", Some("messages"));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["error"]["message"], "bad");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "messages");
        assert!(v["error"]["code"].is_null());
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }
}
