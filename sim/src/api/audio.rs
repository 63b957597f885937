//! `POST /v1/audio/transcriptions` and `/v1/audio/translations` for a text model.
//!
//! The simulated model is a text model, so these answer as vLLM answers when the served model
//! has no `transcription` task and the route is attached (vllm/entrypoints/openai/translations/
//! api_router.py, `create_transcriptions`/`create_translations`): the multipart form is
//! validated first (FastAPI parses `Annotated[TranscriptionRequest, Form()]`; a missing `file`
//! or a body that is not multipart fails there, 400 `Bad Request` from the app's validation
//! handler), then the handler is absent and `create_error_response("The model does not support
//! Transcriptions API")` answers 400 `BadRequestError`.
//!
//! Newer vLLM attaches these routes only for models with the `transcription` task
//! (`register_speech_to_text_api_routers`), so there a text model answers FastAPI's plain 404
//! `{"detail": "Not Found"}` instead.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::vllm::VllmError;
use super::AppState;

/// Names of the form fields of a `multipart/form-data` body, or `None` when it is not one.
fn form_fields(headers: &HeaderMap, body: &[u8]) -> Option<Vec<String>> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    if !ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        return None;
    }
    let boundary = ct.split(';').map(str::trim).find_map(|p| p.strip_prefix("boundary="))?.trim_matches('"');
    if boundary.is_empty() {
        return None;
    }
    let delim = format!("--{boundary}");
    let text = String::from_utf8_lossy(body);
    let mut names = Vec::new();
    for part in text.split(delim.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let head = part.split("\r\n\r\n").next().unwrap_or("");
        for line in head.lines() {
            let l = line.to_ascii_lowercase();
            if !l.starts_with("content-disposition:") {
                continue;
            }
            if let Some(i) = l.find("name=\"") {
                let rest = &line[i + 6..];
                if let Some(end) = rest.find('"') {
                    names.push(rest[..end].to_owned());
                }
            }
        }
        if names.len() > 64 {
            break;
        }
    }
    Some(names)
}

fn answer(headers: &HeaderMap, body: Result<Bytes, BytesRejection>, api: &str) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return VllmError::validation(e.body_text()).into_response(),
    };
    let Some(fields) = form_fields(headers, &body) else {
        return VllmError::validation("[{'type': 'missing', 'loc': ('body', 'file'), 'msg': 'Field required'}]")
            .into_response();
    };
    for required in ["file"] {
        if !fields.iter().any(|f| f == required) {
            return VllmError::missing(required).into_response();
        }
    }
    VllmError::bad_request(format!("The model does not support {api} API"), None).into_response()
}

pub(crate) async fn transcriptions(
    State(_st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(&headers, body, "Transcriptions")
}

pub(crate) async fn translations(
    State(_st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(&headers, body, "Translations")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_read() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "multipart/form-data; boundary=XyZ".parse().unwrap());
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--XyZ--\r\n";
        assert_eq!(form_fields(&h, body), Some(vec!["file".to_string(), "model".to_string()]));
        assert_eq!(form_fields(&HeaderMap::new(), body), None);
    }
}
