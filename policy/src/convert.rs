//! Requests of the APIs vLLM serves on top of chat — OpenAI's Responses and Anthropic's
//! Messages — turned into the chat template's inputs the way vLLM turns them, so that the router
//! keys their prompts as the engine will render them.
//!
//! - Responses (vLLM `entrypoints/openai/responses/utils.py`, `construct_input_messages`):
//!   `instructions` becomes a system message; a string `input` one user message; input items
//!   become messages: a message item as it is, a `function_call` an assistant message with that
//!   tool call (consecutive calls in one message), a `function_call_output` a `tool` message;
//!   `reasoning` items are not sent back to the template. Function tools
//!   (`{"type":"function","name",...}`) become chat tools (`{"type":"function","function":{...}}`).
//!   A request continuing a stored response (`previous_response_id`) is rendered by the engine
//!   with the stored conversation first, which the router cannot see: such requests are sent to
//!   the engine that stored it, so their keys do not choose anything.
//! - Messages (vLLM `entrypoints/anthropic/serving.py`, the conversion to a chat request):
//!   `system` (a string or text blocks) becomes a system message; text blocks text parts; image
//!   blocks image parts; `tool_use` blocks an assistant's tool calls (the input as JSON, as
//!   Python's `json.dumps` writes it); `tool_result` blocks `tool` messages; tools
//!   (`name`, `description`, `input_schema`) chat tools.
//!
//! Anything of another shape is left for the engine to judge: the conversion never refuses what
//! the engine might accept, it only makes keys.

use serde_json::{json, Map, Value};

use crate::chat::ChatInputs;
use crate::pyjson;

/// A Responses request's template inputs.
pub fn responses(obj: &Map<String, Value>) -> ChatInputs {
    let mut messages = Vec::new();
    if let Some(Value::String(s)) = obj.get("instructions") {
        messages.push(json!({"role": "system", "content": s}));
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let Value::Object(item) = item else { continue };
                match item.get("type").and_then(Value::as_str) {
                    Some("function_call") => {
                        let call = json!({
                            "id": item.get("call_id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": {
                                "name": item.get("name").cloned().unwrap_or(Value::Null),
                                "arguments": item.get("arguments").cloned().unwrap_or(Value::Null),
                            },
                        });
                        // Consecutive calls are one assistant turn.
                        let last_is_calls = messages.last().is_some_and(|m: &Value| {
                            m["role"] == "assistant" && m["content"].is_null() && m["tool_calls"].is_array()
                        });
                        match (last_is_calls, messages.last_mut()) {
                            (true, Some(Value::Object(m))) => {
                                if let Some(Value::Array(calls)) = m.get_mut("tool_calls") {
                                    calls.push(call);
                                }
                            }
                            _ => messages.push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                        }
                    }
                    Some("function_call_output") => messages.push(json!({
                        "role": "tool",
                        "content": item.get("output").cloned().unwrap_or(Value::Null),
                        "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    })),
                    Some("reasoning") => {}
                    // A message item (`type: "message"`, or no type).
                    _ => {
                        let mut m = Map::new();
                        for key in ["role", "content", "name"] {
                            if let Some(v) = item.get(key) {
                                m.insert(key.into(), v.clone());
                            }
                        }
                        if m.contains_key("role") {
                            messages.push(Value::Object(m));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    let tools = match obj.get("tools") {
        Some(Value::Array(tools)) => {
            let chat: Vec<Value> = tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
                .map(|t| {
                    let field = |k: &str| t.get(k).cloned().unwrap_or(Value::Null);
                    crate::chat::tool_dump(&json!({
                        "type": "function",
                        "function": {"name": field("name"), "description": field("description"), "parameters": field("parameters")},
                    }))
                })
                .collect();
            (!chat.is_empty()).then_some(chat)
        }
        _ => None,
    };
    let mut kwargs = Map::new();
    if let Some(effort) = obj.get("reasoning").and_then(|r| r.get("effort")).filter(|v| !v.is_null()) {
        kwargs.insert("reasoning_effort".into(), effort.clone());
    }
    ChatInputs { messages, tools, documents: None, kwargs, add_generation_prompt: true, continue_final_message: false }
}

/// A Messages request's template inputs.
pub fn messages(obj: &Map<String, Value>) -> ChatInputs {
    let mut out = Vec::new();
    match obj.get("system") {
        Some(Value::String(s)) => out.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let text: Vec<&str> = blocks.iter().filter_map(|b| b.get("text").and_then(Value::as_str)).collect();
            out.push(json!({"role": "system", "content": text.join("\n")}));
        }
        _ => {}
    }
    for m in obj.get("messages").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
        let Some(role) = m.get("role").and_then(Value::as_str) else { continue };
        match m.get("content") {
            Some(Value::String(s)) => out.push(json!({"role": role, "content": s})),
            Some(Value::Array(blocks)) => {
                let mut parts = Vec::new();
                let mut calls = Vec::new();
                let mut results = Vec::new();
                for b in blocks {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(Value::Null)})),
                        Some("image") => {
                            let src = b.get("source");
                            let url = match src.and_then(|s| s.get("type")).and_then(Value::as_str) {
                                Some("url") => src.and_then(|s| s.get("url")).cloned().unwrap_or(Value::Null),
                                _ => Value::String(format!(
                                    "data:{};base64,{}",
                                    src.and_then(|s| s.get("media_type")).and_then(Value::as_str).unwrap_or("image/png"),
                                    src.and_then(|s| s.get("data")).and_then(Value::as_str).unwrap_or_default()
                                )),
                            };
                            parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                        }
                        Some("tool_use") => calls.push(json!({
                            "id": b.get("id").cloned().unwrap_or(Value::Null),
                            "type": "function",
                            "function": {
                                "name": b.get("name").cloned().unwrap_or(Value::Null),
                                "arguments": pyjson::dumps(b.get("input").unwrap_or(&json!({})), &pyjson::Options { ensure_ascii: true, ..Default::default() }),
                            },
                        })),
                        Some("tool_result") => {
                            let content = match b.get("content") {
                                Some(Value::String(s)) => Value::String(s.clone()),
                                Some(Value::Array(inner)) => Value::String(
                                    inner
                                        .iter()
                                        .filter_map(|x| x.get("text").and_then(Value::as_str))
                                        .collect::<Vec<_>>()
                                        .join("\n"),
                                ),
                                _ => Value::String(String::new()),
                            };
                            results.push(json!({
                                "role": "tool",
                                "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                                "content": content,
                            }));
                        }
                        _ => {}
                    }
                }
                out.extend(results);
                if !parts.is_empty() || !calls.is_empty() {
                    let mut msg = Map::new();
                    msg.insert("role".into(), Value::String(role.to_owned()));
                    msg.insert("content".into(), if parts.is_empty() { Value::Null } else { Value::Array(parts) });
                    if !calls.is_empty() {
                        msg.insert("tool_calls".into(), Value::Array(calls));
                    }
                    out.push(Value::Object(msg));
                }
            }
            _ => {}
        }
    }
    let tools = obj.get("tools").and_then(Value::as_array).map(|tools| {
        tools
            .iter()
            .map(|t| {
                let field = |k: &str| t.get(k).cloned().unwrap_or(Value::Null);
                crate::chat::tool_dump(&json!({
                    "type": "function",
                    "function": {"name": field("name"), "description": field("description"), "parameters": field("input_schema")},
                }))
            })
            .collect::<Vec<_>>()
    });
    ChatInputs {
        messages: out,
        tools: tools.filter(|t| !t.is_empty()),
        documents: None,
        kwargs: Map::new(),
        add_generation_prompt: true,
        continue_final_message: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn responses_items_become_chat_turns() {
        let c = responses(&obj(r#"{"instructions":"be brief","input":[
                {"role":"user","content":[{"type":"input_text","text":"weather?"}]},
                {"type":"function_call","call_id":"c1","name":"w","arguments":"{}"},
                {"type":"function_call","call_id":"c2","name":"w","arguments":"{\"x\":1}"},
                {"type":"reasoning","summary":[]},
                {"type":"function_call_output","call_id":"c1","output":"sunny"}],
              "tools":[{"type":"function","name":"w","description":"d","parameters":{}},{"type":"web_search"}]}"#));
        let roles: Vec<&str> = c.messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(c.messages[2]["tool_calls"].as_array().unwrap().len(), 2, "consecutive calls are one turn");
        assert_eq!(c.messages[3]["tool_call_id"], "c1");
        let tools = c.tools.unwrap();
        assert_eq!(tools.len(), 1, "only function tools reach the template");
        assert_eq!(tools[0]["function"]["name"], "w");
    }

    #[test]
    fn messages_blocks_become_chat_turns() {
        let c = messages(&obj(r#"{"system":[{"type":"text","text":"sys"}],"messages":[
                {"role":"user","content":"hi"},
                {"role":"assistant","content":[{"type":"text","text":"calling"},{"type":"tool_use","id":"t1","name":"f","input":{"q":"é"}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":[{"type":"text","text":"ok"}]}]}],
              "tools":[{"name":"f","description":"d","input_schema":{"type":"object"}}]}"#));
        let roles: Vec<&str> = c.messages.iter().map(|m| m["role"].as_str().unwrap()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool"]);
        assert_eq!(c.messages[2]["tool_calls"][0]["function"]["arguments"], r#"{"q": "\u00e9"}"#);
        assert_eq!(c.messages[3]["content"], "ok");
        assert_eq!(c.tools.unwrap()[0]["function"]["parameters"]["type"], "object");
    }
}
