//! vLLM's pooling endpoints: `/v1/embeddings`, `/pooling`, `/classify`, `/score` (and
//! `/v1/score`), `/rerank` (and `/v1/rerank`, `/v2/rerank`), in vLLM's request and response
//! shapes (vllm/entrypoints/pooling/{embed,pooling,classify,score,scoring}/protocol.py).
//!
//! vLLM registers these routes only for a pooling model (`register_pooling_api_routers` in
//! vllm/entrypoints/pooling/factories.py); for a generative model they are absent and answer
//! FastAPI's 404 `{"detail": "Not Found"}`. The simulator serves them anyway, for whatever
//! model it serves, so tests can exercise the routes without a pooling model.
//!
//! Values are deterministic and computed from the prompt's token ids: an embedding is a
//! unit-normalised vector of hashed token features (64 dimensions unless `dimensions`), a
//! classification is a two-class softmax of such features, and a score or rerank relevance is
//! the token overlap (Jaccard) of the two texts. Every prompt goes through the simulated
//! scheduler as prefill-only work (`api::prefill`), so it loads the engine, counts in metrics
//! and publishes KV events like a real pooling request.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use kvmesh_policy::openai::ApiError;
use serde_json::{json, Map, Value};

use super::vllm::{self, VllmError};
use super::AppState;

/// The embedding size without `dimensions`.
pub const EMBEDDING_DIM: usize = 64;
/// The most inputs one request may carry (each is a scheduled prompt).
const MAX_INPUTS: usize = 2048;

/// One input: text to tokenize, or token ids as given.
enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// `input` of an embedding/pooling/classify request: a string, a list of strings, a list of
/// token ids, or a list of token-id lists.
fn inputs(v: Option<&Value>, field: &str) -> Result<Vec<Input>, VllmError> {
    let bad = || VllmError::wrong_type(field, "a string, a list of strings, or token id list(s)");
    let ids = |a: &[Value]| -> Option<Vec<u32>> {
        a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect()
    };
    let out = match v {
        None => return Err(VllmError::missing(field)),
        Some(Value::String(s)) => vec![Input::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(VllmError::bad_request("Input cannot be empty", Some(field)))
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            a.iter().filter_map(Value::as_str).map(|s| Input::Text(s.to_owned())).collect()
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => vec![Input::Ids(ids(a).ok_or_else(bad)?)],
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|x| x.as_array().and_then(|x| ids(x)).map(Input::Ids).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if out.len() > MAX_INPUTS {
        return Err(VllmError::bad_request(format!("At most {MAX_INPUTS} inputs per request."), Some(field)));
    }
    Ok(out)
}

/// Token ids of one input (`add_special_tokens` true, as vLLM's completion-style pooling
/// requests default), checked against the context length with vLLM's message
/// (`_validate_input` for pooling requests: up to the whole context, none generated).
async fn ids_of(st: &AppState, input: Input, operation: &str) -> Result<Vec<u32>, VllmError> {
    let ids = match input {
        Input::Ids(ids) => {
            let vocab = st.tokenizer.vocab_size();
            if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
                return Err(VllmError::bad_request(format!("Token id {bad} is out of vocabulary"), Some("input")));
            }
            ids
        }
        Input::Text(text) => {
            let t = st.tokenizer.clone();
            tokio::task::spawn_blocking(move || t.encode(&text, true))
                .await
                .map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?
                .map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?
        }
    };
    let max = st.max_model_len as usize;
    if ids.len() > max {
        return Err(VllmError::bad_request(
            format!(
                "This model's maximum context length is {max} tokens. However, you requested {} tokens in the input for {operation}. Please reduce the length of the input.",
                ids.len()
            ),
            Some("input_tokens"),
        ));
    }
    if ids.is_empty() {
        return Err(VllmError::bad_request("The prompt cannot be empty.", Some("input")));
    }
    Ok(ids)
}

/// Schedules `ids` as prefill work; the prompt token count for usage.
async fn run(st: &Arc<AppState>, headers: &HeaderMap, ids: Vec<u32>, salt: Option<String>) -> Result<usize, VllmError> {
    let n = ids.len();
    let done = super::prefill(st, headers, ids, salt).await.map_err(VllmError::from)?;
    Ok(done.prompt_tokens.max(n))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A deterministic unit vector of `dim` features hashed from the token ids.
pub fn embed(ids: &[u32], dim: usize) -> Vec<f32> {
    let mut v = vec![0f64; dim.max(1)];
    for (pos, &id) in ids.iter().enumerate() {
        let h = splitmix(id as u64 ^ ((pos as u64 % 8) << 40));
        for (k, x) in v.iter_mut().enumerate() {
            let r = splitmix(h ^ k as u64);
            *x += (r as f64 / u64::MAX as f64) * 2.0 - 1.0;
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm = if norm > 0.0 { norm } else { 1.0 };
    v.iter().map(|x| (x / norm) as f32).collect()
}

fn salt(obj: &Map<String, Value>) -> Option<String> {
    obj.get("cache_salt").and_then(Value::as_str).map(str::to_owned)
}

fn usage(prompt_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0, "prompt_tokens_details": null})
}

fn respond(r: Result<Value, VllmError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/embeddings`: `EmbeddingResponse` (`embd-` id, `object: "list"`, one
/// `{index, object: "embedding", embedding}` per input; `encoding_format` `float` or `base64`
/// of little-endian float32, as vLLM encodes it).
pub(crate) async fn embeddings(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let obj = vllm::body_object(&st, body)?;
            let model = vllm::check_model(&st, &obj)?;
            let format = match obj.get("encoding_format") {
                None | Some(Value::Null) => "float",
                Some(Value::String(s)) if s == "float" || s == "base64" => s.as_str(),
                Some(_) => {
                    return Err(VllmError::validation(
                        "[{'type': 'literal_error', 'loc': ('body', 'encoding_format'), 'msg': \"Input should be 'float' or 'base64'\"}]",
                    ))
                }
            };
            let dim = match obj.get("dimensions") {
                None | Some(Value::Null) => EMBEDDING_DIM,
                Some(v) => match v.as_u64() {
                    Some(d) if (1..=4096).contains(&d) => d as usize,
                    _ => return Err(VllmError::bad_request("dimensions must be a positive integer up to 4096.", Some("dimensions"))),
                },
            };
            let (data, total) = per_input(&st, &headers, &obj, "embedding generation", |index, ids| {
                let e = embed(ids, dim);
                let embedding = if format == "base64" {
                    let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(vllm::base64(&bytes))
                } else {
                    json!(e)
                };
                json!({"index": index, "object": "embedding", "embedding": embedding})
            })
            .await?;
            Ok(json!({
                "id": format!("embd-{}", vllm::random_uuid()), "object": "list", "created": super::now_secs(),
                "model": model, "data": data, "usage": usage(total),
            }))
        }
        .await,
    )
}

/// `POST /pooling`: `PoolingResponse` (`pool-` id, `{index, object: "pooling", data}`).
pub(crate) async fn pooling(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let obj = vllm::body_object(&st, body)?;
            let model = vllm::check_model(&st, &obj)?;
            let (data, total) = per_input(
                &st,
                &headers,
                &obj,
                "embedding generation",
                |index, ids| json!({"index": index, "object": "pooling", "data": embed(ids, EMBEDDING_DIM)}),
            )
            .await?;
            Ok(json!({
                "id": format!("pool-{}", vllm::random_uuid()), "object": "list", "created": super::now_secs(),
                "model": model, "data": data, "usage": usage(total),
            }))
        }
        .await,
    )
}

/// `POST /classify`: `ClassificationResponse` (`classify-` id, `{index, label, probs,
/// num_classes}` per input; labels `LABEL_0`/`LABEL_1`, transformers' default names).
pub(crate) async fn classify(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let obj = vllm::body_object(&st, body)?;
            let model = vllm::check_model(&st, &obj)?;
            let (data, total) = per_input(&st, &headers, &obj, "classification", |index, ids| {
                let e = embed(ids, 2);
                let (a, b) = ((e[0] as f64).exp(), (e[1] as f64).exp());
                let probs = [a / (a + b), b / (a + b)];
                let label = if probs[1] > probs[0] { "LABEL_1" } else { "LABEL_0" };
                json!({"index": index, "label": label, "probs": probs, "num_classes": 2})
            })
            .await?;
            Ok(json!({
                "id": format!("classify-{}", vllm::random_uuid()), "object": "list", "created": super::now_secs(),
                "model": model, "data": data, "usage": usage(total),
            }))
        }
        .await,
    )
}

/// Each of a request's `input` prompts, tokenized and scheduled as prefill work: the answer's
/// `data` (one `item(index, ids)` per input) and the prompt tokens in all.
async fn per_input(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    obj: &serde_json::Map<String, Value>,
    task: &str,
    item: impl Fn(usize, &[u32]) -> Value,
) -> Result<(Vec<Value>, usize), VllmError> {
    let mut data = Vec::new();
    let mut total = 0;
    for (index, input) in inputs(obj.get("input"), "input")?.into_iter().enumerate() {
        let ids = ids_of(st, input, task).await?;
        data.push(item(index, &ids));
        total += run(st, headers, ids, salt(obj)).await?;
    }
    Ok((data, total))
}

/// Token overlap of two prompts: |A ∩ B| / |A ∪ B| over their token-id sets.
pub fn overlap(a: &[u32], b: &[u32]) -> f64 {
    let a: HashSet<u32> = a.iter().copied().collect();
    let b: HashSet<u32> = b.iter().copied().collect();
    let union = a.union(&b).count();
    if union == 0 {
        0.0
    } else {
        a.intersection(&b).count() as f64 / union as f64
    }
}

/// A list of texts (`str | list[str]`).
fn texts(v: Option<&Value>, field: &str) -> Result<Vec<String>, VllmError> {
    match v {
        None => Err(VllmError::missing(field)),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= MAX_INPUTS => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.clone()),
                // A document given as {"text": ...} (Cohere-style rerank documents).
                Value::Object(o) => o
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| VllmError::wrong_type(field, "a list of strings")),
                _ => Err(VllmError::wrong_type(field, "a list of strings")),
            })
            .collect(),
        Some(_) => Err(VllmError::wrong_type(field, "a string or a list of strings")),
    }
}

/// Scores of each (query, document) pair, with each pair scheduled as one prefill of the
/// concatenated prompt (a cross-encoder's input). Returns the scores and the prompt tokens.
async fn pair_scores(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    obj: &Map<String, Value>,
    pairs: Vec<(String, String)>,
) -> Result<(Vec<f64>, usize), VllmError> {
    let mut scores = Vec::with_capacity(pairs.len());
    let mut total = 0;
    for (q, d) in pairs {
        let qa = ids_of(st, Input::Text(q), "score").await?;
        let da = ids_of(st, Input::Text(d), "score").await?;
        scores.push(overlap(&qa, &da));
        let mut both = qa;
        both.extend(da);
        let both = ids_of(st, Input::Ids(both), "score").await?;
        total += run(st, headers, both, salt(obj)).await?;
    }
    Ok((scores, total))
}

/// `POST /score`, `/v1/score`: `ScoreResponse` (`score-` id, `{index, object: "score",
/// score}`). `text_1`/`text_2` (also `queries`/`documents` and `data_1`/`data_2`, the names
/// later vLLM versions use): one text against many, or pairwise lists of equal length.
pub(crate) async fn score(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let obj = vllm::body_object(&st, body)?;
            let model = vllm::check_model(&st, &obj)?;
            let pick = |names: [&'static str; 3]| names.into_iter().find_map(|n| obj.get(n).map(|v| (n, v)));
            let (n1, v1) = pick(["text_1", "queries", "data_1"]).ok_or_else(|| VllmError::missing("text_1"))?;
            let (n2, v2) = pick(["text_2", "documents", "data_2"]).ok_or_else(|| VllmError::missing("text_2"))?;
            let (a, b) = (texts(Some(v1), n1)?, texts(Some(v2), n2)?);
            let pairs: Vec<(String, String)> = if a.len() == 1 {
                b.iter().map(|d| (a[0].clone(), d.clone())).collect()
            } else if a.len() == b.len() {
                a.into_iter().zip(b).collect()
            } else {
                return Err(VllmError::bad_request("text_1 and text_2 must have the same length", None));
            };
            let (scores, total) = pair_scores(&st, &headers, &obj, pairs).await?;
            let data: Vec<Value> =
                scores.iter().enumerate().map(|(i, s)| json!({"index": i, "object": "score", "score": s})).collect();
            Ok(json!({
                "id": format!("score-{}", vllm::random_uuid()), "object": "list", "created": super::now_secs(),
                "model": model, "data": data, "usage": usage(total),
            }))
        }
        .await,
    )
}

/// `POST /rerank`, `/v1/rerank`, `/v2/rerank`: `RerankResponse` (`rerank-` id, `results` of
/// `{index, document: {text}, relevance_score}` best first, at most `top_n` when it is > 0).
pub(crate) async fn rerank(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let obj = vllm::body_object(&st, body)?;
            let model = vllm::check_model(&st, &obj)?;
            let query = match obj.get("query") {
                Some(Value::String(q)) => q.clone(),
                None => return Err(VllmError::missing("query")),
                Some(_) => return Err(VllmError::wrong_type("query", "a valid string")),
            };
            let docs = texts(obj.get("documents"), "documents")?;
            let top_n = match obj.get("top_n") {
                None | Some(Value::Null) => 0,
                Some(v) => v.as_u64().ok_or_else(|| VllmError::wrong_type("top_n", "a valid integer"))? as usize,
            };
            let pairs = docs.iter().map(|d| (query.clone(), d.clone())).collect();
            let (scores, total) = pair_scores(&st, &headers, &obj, pairs).await?;
            let mut results: Vec<(usize, f64)> = scores.into_iter().enumerate().collect();
            results.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            if top_n > 0 {
                results.truncate(top_n);
            }
            let results: Vec<Value> = results
                .into_iter()
                .map(|(i, s)| json!({"index": i, "document": {"text": docs[i]}, "relevance_score": s}))
                .collect();
            Ok(json!({
                "id": format!("rerank-{}", vllm::random_uuid()), "model": model,
                "usage": {"total_tokens": total}, "results": results,
            }))
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeddings_are_unit_and_deterministic() {
        let a = embed(&[1, 2, 3], 64);
        assert_eq!(a, embed(&[1, 2, 3], 64));
        let n: f32 = a.iter().map(|x| x * x).sum();
        assert!((n - 1.0).abs() < 1e-4);
        assert_ne!(a, embed(&[1, 2, 4], 64));
    }

    #[test]
    fn overlap_is_jaccard() {
        assert_eq!(overlap(&[1, 2], &[1, 2]), 1.0);
        assert_eq!(overlap(&[1, 2], &[3]), 0.0);
        assert_eq!(overlap(&[1, 2], &[2, 3]), 1.0 / 3.0);
    }
}
