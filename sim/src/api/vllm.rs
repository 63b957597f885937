//! vLLM's own error envelope and the small helpers every added endpoint shares.
//!
//! vLLM answers errors as `ErrorResponse` (vllm/entrypoints/openai/engine/protocol.py):
//! `{"error": {"message", "type", "param", "code"}}` where `code` is the HTTP status as an
//! integer, not a string. `type` is `"BadRequestError"` by default
//! (`OpenAIServing.create_error_response`), `"NotFoundError"` for an unknown model
//! (`_check_model`), and `"Bad Request"` (the status phrase) for a body that fails pydantic
//! validation (the app's `RequestValidationError` handler in api_server.py). The endpoints this
//! module serves answer in that shape; the older chat and completions routes keep the project's
//! `ApiError` envelope (string `code`), see the module docs of `api`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use kvmesh_policy::openai::ApiError;
use serde_json::{json, Map, Value};

use super::AppState;

/// One error as vLLM sends it.
#[derive(Debug, Clone)]
pub(crate) struct VllmError {
    pub status: StatusCode,
    pub kind: String,
    pub message: String,
    pub param: Option<String>,
}

impl VllmError {
    pub fn new(status: StatusCode, kind: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self { status, kind: kind.to_owned(), message: message.into(), param: param.map(str::to_owned) }
    }

    /// `create_error_response(message)`: 400, `BadRequestError`.
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequestError", message, param)
    }

    /// A body pydantic refuses: 400 with the status phrase as type, no param.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "Bad Request", message, None)
    }

    /// A required body field is missing (pydantic's `missing` error, as FastAPI words it).
    pub fn missing(field: &str) -> Self {
        Self::validation(format!("[{{'type': 'missing', 'loc': ('body', '{field}'), 'msg': 'Field required'}}]"))
    }

    /// A body field has the wrong type.
    pub fn wrong_type(field: &str, expected: &str) -> Self {
        Self::validation(format!("[{{'loc': ('body', '{field}'), 'msg': 'Input should be {expected}'}}]"))
    }

    /// `_check_model`: 404, `NotFoundError`, param `model`.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NotFoundError", format!("The model `{model}` does not exist."), Some("model"))
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status.as_u16()}})
    }

    /// The same error in Anthropic's envelope, as vLLM's `/v1/messages` translates it
    /// (`translate_error_response` in vllm/entrypoints/anthropic/api_router.py).
    pub fn anthropic_body(&self) -> Value {
        json!({"type": "error", "error": {"type": self.kind, "message": self.message}})
    }

    pub fn anthropic_response(&self) -> Response {
        json_response(self.status, &self.anthropic_body())
    }
}

impl IntoResponse for VllmError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// The project's `ApiError` (what `prepare` and `request::parse` return) in vLLM's envelope.
impl From<ApiError> for VllmError {
    fn from(e: ApiError) -> Self {
        let kind = match e.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND if e.code.as_deref() == Some("model_not_found") => "NotFoundError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::PAYLOAD_TOO_LARGE => "BadRequestError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        Self { status: e.status, kind: kind.to_owned(), message: e.message, param: e.param }
    }
}

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// The request body as a JSON object, or vLLM's answer to one that is not.
pub(crate) fn body_object(st: &AppState, body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, VllmError> {
    let bytes = match body {
        Ok(b) => b,
        Err(BytesRejection::FailedToBufferBody(_)) => {
            return Err(VllmError::from(ApiError::too_large(st.cfg.max_body_bytes)))
        }
        Err(e) => return Err(VllmError::validation(e.body_text())),
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(VllmError::validation(
            "[{'type': 'model_attributes_type', 'loc': ('body',), 'msg': 'Input should be a valid dictionary or object to extract fields from'}]",
        )),
        Err(e) => Err(VllmError::validation(format!(
            "[{{'type': 'json_invalid', 'loc': ('body', {}), 'msg': 'JSON decode error', 'ctx': {{'error': '{e}'}}}}]",
            e.column()
        ))),
    }
}

/// `request.model` checked as `_check_model` does: absent or empty means the served model.
pub(crate) fn check_model(st: &AppState, obj: &Map<String, Value>) -> Result<String, VllmError> {
    match obj.get("model") {
        None | Some(Value::Null) => Ok(st.cfg.model.clone()),
        Some(Value::String(m)) if m.is_empty() => Ok(st.cfg.model.clone()),
        Some(Value::String(m)) if super::serves(st, m) => Ok(m.clone()),
        Some(Value::String(m)) => Err(VllmError::model_not_found(m)),
        Some(_) => Err(VllmError::wrong_type("model", "a valid string")),
    }
}

/// vLLM's `random_uuid()`: 32 lowercase hex digits.
pub(crate) fn random_uuid() -> String {
    format!("{:032x}", uuid4())
}

/// `str(uuid.uuid4())`: the dashed form.
pub(crate) fn dashed_uuid() -> String {
    let h = format!("{:032x}", uuid4());
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

fn uuid4() -> u128 {
    let r = rand::random::<u128>();
    // Version 4, variant 10.
    (r & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62)
}

/// Standard base64 (with padding) of `bytes`.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        out.push(A[(n >> 18) as usize & 63] as char);
        out.push(A[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 { A[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if c.len() > 2 { A[n as usize & 63] as char } else { '=' });
    }
    out
}

/// One Server-Sent Event with an `event:` line, as vLLM's Responses and Messages streams send.
pub(crate) fn named_event(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn uuids_have_vllm_forms() {
        assert_eq!(random_uuid().len(), 32);
        let d = dashed_uuid();
        assert_eq!(d.len(), 36);
        assert_eq!(&d[14..15], "4");
    }
}
