//! A multipart form (`/v1/audio/transcriptions`, `/v1/audio/translations`) read for what routing
//! needs: its text fields (`model`, `stream`) and that it has a `file`. The body is forwarded
//! as the client sent it, with its content type. Bounded: at most `MAX_FIELDS` parts, text
//! fields of at most `MAX_TEXT_FIELD` bytes; the whole body is already within the node's body
//! limit.

use std::collections::BTreeMap;

use axum::body::Bytes;
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint, InferenceRequest};

const MAX_FIELDS: usize = 64;
const MAX_TEXT_FIELD: u64 = 64 * 1024;

/// The routing view of a multipart request.
pub async fn parse(
    endpoint: Endpoint,
    content_type: Option<&str>,
    body: Bytes,
    default_model: Option<&str>,
) -> Result<InferenceRequest, ApiError> {
    let bad = |why: String| ApiError::invalid(format!("The multipart form could not be read: {why}"), None);
    let ct = content_type.ok_or_else(|| bad("no content type".into()))?;
    let boundary = multer::parse_boundary(ct).map_err(|e| bad(e.to_string()))?;
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().for_field("model", MAX_TEXT_FIELD).for_field("stream", MAX_TEXT_FIELD));
    let stream = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut form = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut fields = BTreeMap::new();
    let mut has_file = false;
    let mut parts = 0;
    while let Some(mut field) = form.next_field().await.map_err(|e| bad(e.to_string()))? {
        parts += 1;
        if parts > MAX_FIELDS {
            return Err(bad(format!("more than {MAX_FIELDS} parts")));
        }
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "model" | "stream" => {
                let text = field.text().await.map_err(|e| bad(e.to_string()))?;
                fields.insert(name, text);
            }
            _ => {
                has_file |= name == "file";
                // Read past it: only its presence matters here.
                while field.chunk().await.map_err(|e| bad(e.to_string()))?.is_some() {}
            }
        }
    }
    request::from_form(endpoint, &fields, has_file, default_model)
}

/// A client's or peer's multipart content type, when it is one to forward: `multipart/form-data`
/// with a boundary, short, visible ASCII.
pub fn forwardable(ct: &str) -> bool {
    ct.len() <= 200
        && ct.to_ascii_lowercase().starts_with("multipart/form-data")
        && ct.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, &str)]) -> (String, Bytes) {
        let mut body = String::new();
        for (name, value) in parts {
            body.push_str(&format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\""));
            if *name == "file" {
                body.push_str("; filename=\"a.wav\"\r\nContent-Type: audio/wav");
            }
            body.push_str(&format!("\r\n\r\n{value}\r\n"));
        }
        body.push_str("--XyZ--\r\n");
        ("multipart/form-data; boundary=XyZ".into(), Bytes::from(body))
    }

    #[tokio::test]
    async fn a_form_gives_its_model_and_stream_and_needs_a_file() {
        let (ct, body) = form(&[("file", "RIFF...."), ("model", "whisper"), ("stream", "true")]);
        let r = parse(Endpoint::Transcriptions, Some(&ct), body, None).await.unwrap();
        assert_eq!((r.model.as_str(), r.stream), ("whisper", true));
        let (ct, body) = form(&[("model", "whisper")]);
        let e = parse(Endpoint::Transcriptions, Some(&ct), body, None).await.unwrap_err();
        assert_eq!(e.param.as_deref(), Some("file"));
        let (ct, body) = form(&[("file", "x")]);
        let r = parse(Endpoint::Translations, Some(&ct), body, Some("only")).await.unwrap();
        assert_eq!(r.model, "only");
        let e = parse(Endpoint::Transcriptions, Some("application/json"), Bytes::from_static(b"{}"), None).await;
        assert_eq!(e.unwrap_err().status.as_u16(), 400);
        let (ct, body) = form(&[("file", "x"), ("model", "m"), ("stream", "maybe")]);
        assert_eq!(
            parse(Endpoint::Transcriptions, Some(&ct), body, None).await.unwrap_err().param.as_deref(),
            Some("stream")
        );
        // Cut short: an error, not a hang or a panic.
        let (ct, body) = form(&[("file", "x"), ("model", "m")]);
        let cut = body.slice(..body.len() / 2);
        assert!(parse(Endpoint::Transcriptions, Some(&ct), cut, None).await.is_err());
        assert!(forwardable(&ct) && !forwardable("multipart/form-data; boundary=a\r\nX: y"));
    }

    /// Fuzzed forms (a valid one with bytes flipped, cut or repeated): an answer every time,
    /// never a panic or a hang.
    #[tokio::test]
    async fn mangled_forms_get_an_answer() {
        let (ct, body) = form(&[("file", "RIFF...."), ("model", "whisper"), ("stream", "false")]);
        for i in 0..3000u64 {
            let mut b = body.to_vec();
            let r = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let at = (r as usize) % b.len();
            match i % 3 {
                0 => b[at] = (r >> 32) as u8,
                1 => b.truncate(at),
                _ => {
                    let piece = b[at..].to_vec();
                    b.extend_from_slice(&piece);
                }
            }
            let out = tokio::time::timeout(
                std::time::Duration::from_secs(1),
                parse(Endpoint::Transcriptions, Some(&ct), Bytes::from(b), None),
            )
            .await;
            assert!(out.is_ok(), "case {i} hung");
        }
    }
}
