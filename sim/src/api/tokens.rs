//! `POST /tokenize` and `POST /detokenize` as vLLM serves them
//! (vllm/entrypoints/serve/tokenize/{serving,protocol}.py): `{count, max_model_len, tokens,
//! token_strs}` and `{prompt}`, with the simulator's tokenizer and chat rendering.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use kvmesh_policy::openai::ApiError;
use kvmesh_policy::request::{self, Endpoint};
use serde_json::{json, Map, Value};

use super::vllm::{self, VllmError};
use super::AppState;

fn flag(obj: &Map<String, Value>, k: &str, default: bool) -> Result<bool, VllmError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(VllmError::wrong_type(k, "a valid boolean")),
    }
}

/// `TokenizeCompletionRequest` (`prompt`) or `TokenizeChatRequest` (`messages`, with
/// `add_generation_prompt` default true, `continue_final_message`, `tools`,
/// `chat_template_kwargs`; `add_special_tokens` default false for chat, true for a prompt).
pub(crate) async fn tokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let obj = match vllm::body_object(&st, body) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    match run_tokenize(&st, obj).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn run_tokenize(st: &Arc<AppState>, obj: Map<String, Value>) -> Result<Value, VllmError> {
    let model = vllm::check_model(st, &obj)?;
    let return_token_strs = flag(&obj, "return_token_strs", false)?;
    let is_chat = obj.contains_key("messages");
    let add_special_tokens = flag(&obj, "add_special_tokens", !is_chat)?;
    let t = st.tokenizer.clone();
    let ids = if is_chat {
        if flag(&obj, "add_generation_prompt", true)? && flag(&obj, "continue_final_message", false)? {
            return Err(VllmError::validation(
                "[{'type': 'value_error', 'loc': ('body',), 'msg': 'Value error, Cannot set both `continue_final_message` and `add_generation_prompt` to True.'}]",
            ));
        }
        let mut chat = obj.clone();
        chat.insert("model".into(), json!(model));
        for k in ["return_token_strs", "add_special_tokens"] {
            chat.remove(k);
        }
        let bytes = serde_json::to_vec(&chat).map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?;
        let req = request::parse(Endpoint::Chat, &bytes).map_err(VllmError::from)?;
        let vocab = t.vocab_size();
        tokio::task::spawn_blocking(move || {
            let (ids, text) = super::tokenize(&t, &req.prompt, req.chat.as_ref(), req.add_generation_prompt, vocab)?;
            if add_special_tokens {
                t.encode(&text, true).map_err(|e| ApiError::internal(e.to_string()))
            } else {
                Ok(ids)
            }
        })
        .await
        .map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?
        .map_err(VllmError::from)?
    } else {
        match obj.get("prompt") {
            None => return Err(VllmError::missing("prompt")),
            Some(Value::String(p)) => {
                let p = p.clone();
                tokio::task::spawn_blocking(move || t.encode(&p, add_special_tokens))
                    .await
                    .map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?
                    .map_err(|e| VllmError::from(ApiError::internal(e.to_string())))?
            }
            Some(_) => return Err(VllmError::wrong_type("prompt", "a valid string")),
        }
    };
    let token_strs = if return_token_strs {
        json!(ids.iter().map(|&i| st.tokenizer.reference().id_to_token(i).unwrap_or_default()).collect::<Vec<_>>())
    } else {
        Value::Null
    };
    Ok(json!({"count": ids.len(), "max_model_len": st.max_model_len, "tokens": ids, "token_strs": token_strs}))
}

/// `DetokenizeRequest` (`tokens`) → `{"prompt": text}`.
pub(crate) async fn detokenize(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let obj = match vllm::body_object(&st, body) {
        Ok(o) => o,
        Err(e) => return e.into_response(),
    };
    let run = || -> Result<Value, VllmError> {
        vllm::check_model(&st, &obj)?;
        let Some(tokens) = obj.get("tokens") else { return Err(VllmError::missing("tokens")) };
        let ids: Vec<u32> = tokens
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect::<Option<Vec<_>>>())
            .ok_or_else(|| VllmError::wrong_type("tokens", "a valid list of integers"))?;
        let vocab = st.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i >= vocab) {
            return Err(VllmError::bad_request(format!("Token id {bad} is out of vocabulary"), None));
        }
        let text = st.tokenizer.decode(&ids).map_err(|e| VllmError::bad_request(e.to_string(), None))?;
        Ok(json!({"prompt": text}))
    };
    match run() {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
