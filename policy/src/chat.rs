//! A chat request's template inputs, shaped as vLLM hands them to Hugging Face's
//! `apply_chat_template`, so that kvmesh renders the same prompt text the engine does.
//!
//! vLLM (`entrypoints/chat_utils.py`, `renderers/hf.py`) does not give a template the messages
//! exactly as sent. It rebuilds each one: `role`, then `content` (a string of the text parts
//! joined by newlines, or a list of `{"type": "text", "text": ...}` and `{"type": <media>}` parts
//! when the template loops over a message's content), then for an assistant its `tool_calls`
//! (arguments parsed from their JSON string into an object, `{}` when they do not parse; an
//! empty list dropped) and its `reasoning` (also as `reasoning_content`), for a tool its
//! `tool_call_id` (text parts joined), and `name`, `task` and a developer's `tools`. Request
//! tools go in as vLLM's request model dumps them: `{"type", "function": {"name",
//! "description", "parameters", ...}}`, absent fields as `null`. `documents`,
//! `chat_template_kwargs` and `reasoning_effort` go in as template variables. Then what
//! transformers (5.x) adds: reasoning aliased as `thinking` and `reasoning_content`
//! (`alias_reasoning`), and `continue_final_message` by a tag on the final message where the
//! rendered text is cut (`tag_final_message`, `cut_at_tag`).
//!
//! What is not reproduced (the parity suite, `policy/tests/template_parity.rs`, checks the rest
//! against transformers itself): multimodal placeholders beyond `{"type": <media>}` parts, and
//! templates that use Jinja extensions minijinja lacks (`{% generation %}`), which fail to load
//! and leave their model in approximate mode.

use serde_json::{Map, Value};

/// How a template reads message content: vLLM's `--chat-template-content-format auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentFormat {
    /// Content is a string.
    String,
    /// Content is a list of parts (the template loops over it).
    OpenAi,
}

/// What a chat template is given besides the rendered special tokens.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatInputs {
    /// The messages as the client sent them (each an object with a string `role`).
    pub messages: Vec<Value>,
    /// Request tools, as vLLM dumps them (`tool_dump`).
    pub tools: Option<Vec<Value>>,
    pub documents: Option<Value>,
    /// `chat_template_kwargs`, plus `reasoning_effort` when the request sets it.
    pub kwargs: Map<String, Value>,
    pub add_generation_prompt: bool,
    pub continue_final_message: bool,
}

/// Text part types whose text vLLM keeps, and the key it is read from.
fn part_text(part: &Map<String, Value>) -> Option<&str> {
    match part.get("type").and_then(Value::as_str) {
        Some("text" | "input_text" | "output_text") => part.get("text").and_then(Value::as_str),
        Some("refusal") => part.get("refusal").and_then(Value::as_str),
        Some("thinking") => part.get("thinking").and_then(Value::as_str),
        _ => None,
    }
}

/// The modality a media part stands for, as vLLM names it in `{"type": <modality>}`.
fn part_modality(part: &Map<String, Value>) -> Option<&'static str> {
    match part.get("type").and_then(Value::as_str) {
        Some("image_url" | "input_image" | "image_pil" | "image_embeds") => Some("image"),
        Some("audio_url" | "input_audio" | "audio_embeds") => Some("audio"),
        Some("video_url") => Some("video"),
        _ => None,
    }
}

/// One message as vLLM rebuilds it for the template.
fn conversation_message(m: &Map<String, Value>, format: ContentFormat) -> Map<String, Value> {
    let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
    let parts: Vec<Value> = match m.get("content") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![serde_json::json!({"type": "text", "text": s})],
        Some(Value::Array(parts)) => parts.clone(),
        Some(other) => vec![other.clone()],
    };
    let content = match format {
        ContentFormat::String => {
            let texts: Vec<&str> = parts
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.as_str()),
                    Value::Object(o) => part_text(o),
                    _ => None,
                })
                .collect();
            Value::String(texts.join("\n"))
        }
        ContentFormat::OpenAi => Value::Array(
            parts
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(serde_json::json!({"type": "text", "text": s})),
                    Value::Object(o) => match (part_text(o), part_modality(o)) {
                        (Some(t), _) => Some(serde_json::json!({"type": "text", "text": t})),
                        (None, Some(modality)) => Some(serde_json::json!({"type": modality})),
                        (None, None) => None,
                    },
                    _ => None,
                })
                .collect(),
        ),
    };
    let mut out = Map::new();
    out.insert("role".into(), Value::String(role.to_owned()));
    out.insert("content".into(), content);
    match role {
        "assistant" => {
            if let Some(Value::Array(calls)) = m.get("tool_calls") {
                if !calls.is_empty() {
                    out.insert("tool_calls".into(), Value::Array(calls.iter().map(tool_call).collect()));
                }
            }
            let reasoning = m.get("reasoning").filter(|v| !v.is_null()).or_else(|| m.get("reasoning_content"));
            if let Some(r) = reasoning.filter(|v| !v.is_null()) {
                out.insert("reasoning".into(), r.clone());
                out.insert("reasoning_content".into(), r.clone());
            }
        }
        "tool" => {
            if let Some(id) = m.get("tool_call_id") {
                out.insert("tool_call_id".into(), id.clone());
            }
            // A tool result's text parts become one string, whatever the content format.
            if let Some(Value::Array(items)) = out.get("content") {
                if items.iter().all(|i| i.get("type").and_then(Value::as_str) == Some("text")) {
                    let texts: Vec<&str> = items.iter().filter_map(|i| i.get("text").and_then(Value::as_str)).collect();
                    out.insert("content".into(), Value::String(texts.join("\n")));
                }
            }
        }
        _ => {}
    }
    for key in ["name", "task"] {
        if let Some(Value::String(s)) = m.get(key) {
            out.insert(key.into(), Value::String(s.clone()));
        }
    }
    if role == "developer" {
        out.insert("tools".into(), m.get("tools").cloned().unwrap_or(Value::Null));
    }
    out
}

/// A tool call as the template sees it: `id`, `function` (`arguments` parsed into an object
/// when they are a JSON string, `{}` when not JSON or not an object or list; `name`), `type`.
fn tool_call(call: &Value) -> Value {
    let Value::Object(c) = call else { return call.clone() };
    let mut out = Map::new();
    if let Some(id) = c.get("id") {
        out.insert("id".into(), id.clone());
    }
    if let Some(Value::Object(f)) = c.get("function") {
        let mut function = Map::new();
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::Object(Map::new())),
            Some(v @ (Value::Object(_) | Value::Array(_))) => v.clone(),
            _ => Value::Object(Map::new()),
        };
        function.insert("arguments".into(), arguments);
        if let Some(name) = f.get("name") {
            function.insert("name".into(), name.clone());
        }
        out.insert("function".into(), Value::Object(function));
    }
    if let Some(t) = c.get("type") {
        out.insert("type".into(), t.clone());
    }
    Value::Object(out)
}

/// The conversation vLLM renders, from the messages as sent, with what transformers'
/// `apply_chat_template` then does first: keys whose value is null are dropped, so a template's
/// `is defined` sees them as absent.
pub fn conversation(messages: &[Value], format: ContentFormat) -> Vec<Value> {
    messages
        .iter()
        .filter_map(Value::as_object)
        .map(|m| {
            let mut out = conversation_message(m, format);
            out.retain(|_, v| !v.is_null());
            Value::Object(out)
        })
        .collect()
}

/// A request tool as vLLM's request model dumps it: `type` (default `function`), then
/// `function` with `name`, `description` and `parameters` (`null` when absent) and any other
/// keys in the order given, then the tool's other keys.
pub fn tool_dump(tool: &Value) -> Value {
    let Value::Object(t) = tool else { return tool.clone() };
    let mut out = Map::new();
    out.insert("type".into(), t.get("type").cloned().unwrap_or_else(|| Value::String("function".into())));
    if let Some(Value::Object(f)) = t.get("function") {
        let mut function = Map::new();
        for key in ["name", "description", "parameters"] {
            function.insert(key.into(), f.get(key).cloned().unwrap_or(Value::Null));
        }
        for (k, v) in f {
            if !function.contains_key(k) {
                function.insert(k.clone(), v.clone());
            }
        }
        out.insert("function".into(), Value::Object(function));
    }
    for (k, v) in t {
        if !out.contains_key(k) {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// vLLM's content-format detection, on the template's text: `OpenAi` when a loop iterates over
/// a message's `content` (`for x in message['content']`, `message.content`, with or without
/// filters), where `message` is a loop variable over `messages` (or over a variable assigned
/// from it); else `String`.
pub fn detect_content_format(template: &str) -> ContentFormat {
    // An alias is the list itself, a slice of it, or it through filters (as vLLM's AST rule):
    // `set m = messages[1:]`, `set m = messages | selectattr(...)`; not `messages[0]`.
    let Ok(assign) =
        regex::Regex::new(r#"\{%-?\s*set\s+(\w+)\s*=\s*(\w+)\s*(?:\[[^\]]*:[^\]]*\]\s*)?(?:\|[^%]*)?-?%\}"#)
    else {
        return ContentFormat::String;
    };
    let Ok(for_in) = regex::Regex::new(r#"\{%-?\s*for\s+(\w+)\s+in\s+(\w+)(?:\s*\[\s*['"]?(\w+)['"]?\s*\]|\.(\w+))?"#)
    else {
        return ContentFormat::String;
    };
    let mut lists = vec!["messages".to_owned()];
    // Variables assigned from the messages (`loop_messages = messages[1:]`), transitively.
    loop {
        let before = lists.len();
        for c in assign.captures_iter(template) {
            if lists.contains(&c[2].to_owned()) && !lists.contains(&c[1].to_owned()) {
                lists.push(c[1].to_owned());
            }
        }
        if lists.len() == before {
            break;
        }
    }
    let mut items: Vec<String> = Vec::new();
    for c in for_in.captures_iter(template) {
        let whole_list = c.get(3).is_none() && c.get(4).is_none();
        if whole_list && lists.contains(&c[2].to_owned()) {
            items.push(c[1].to_owned());
        }
    }
    for c in for_in.captures_iter(template) {
        let key = c.get(3).or(c.get(4)).map(|m| m.as_str());
        if key == Some("content") && items.contains(&c[2].to_owned()) {
            return ContentFormat::OpenAi;
        }
    }
    ContentFormat::String
}

/// What transformers (5.x) does to every message before rendering: a message with reasoning
/// (`reasoning_content`, `thinking` or `reasoning`, the first set) gets it as `thinking` first
/// and as `reasoning_content`, for templates that read either name.
pub fn alias_reasoning(conversation: Vec<Value>) -> Vec<Value> {
    conversation
        .into_iter()
        .map(|m| {
            let Value::Object(map) = m else { return m };
            let reasoning = ["reasoning_content", "thinking", "reasoning"]
                .iter()
                .find_map(|k| map.get(*k).filter(|v| !v.is_null()).cloned());
            let Some(r) = reasoning else { return Value::Object(map) };
            let mut out = Map::new();
            out.insert("thinking".into(), r.clone());
            for (k, v) in map {
                out.insert(k, v);
            }
            out.insert("reasoning_content".into(), r);
            Value::Object(out)
        })
        .collect()
}

/// The marker transformers appends to the final message for `continue_final_message`.
pub const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Appends [`CONTINUE_TAG`] to the final message's content (its last text part when the content
/// is a list) and returns that content as it was; `None` when there is nothing to continue.
pub fn tag_final_message(conversation: &mut [Value]) -> Option<String> {
    let content = conversation.last_mut()?.get_mut("content")?;
    match content {
        Value::String(s) => {
            let before = s.clone();
            s.push_str(CONTINUE_TAG);
            Some(before)
        }
        Value::Array(parts) => {
            let part = parts.iter_mut().rev().find(|p| p.get("text").is_some())?;
            let Some(Value::String(t)) = part.get_mut("text") else { return None };
            let before = t.clone();
            t.push_str(CONTINUE_TAG);
            Some(before)
        }
        _ => None,
    }
}

/// The rendered text cut where the final message was tagged: right before the tag when the
/// template kept it whole, else before it with trailing whitespace trimmed. `None` when the
/// final message or the tag does not appear (the template dropped them).
pub fn cut_at_tag(rendered: &str, final_text: &str) -> Option<String> {
    let tag = CONTINUE_TAG.trim();
    if !rendered.contains(final_text.trim()) || !rendered.contains(tag) {
        return None;
    }
    let at = rendered.rfind(tag)?;
    if rendered[at..].starts_with(CONTINUE_TAG) {
        Some(rendered[..at].to_owned())
    } else {
        Some(rendered[..at].trim_end().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_are_rebuilt_as_vllm_does() {
        let messages = vec![
            json!({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "role": "user", "name": "ann"}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"type": "function", "id": "c1", "function": {"name": "f", "arguments": "{\"x\": 1, \"a\": [2]}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}}
            ], "reasoning_content": "think"}),
            json!({"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "r1"}, {"type": "text", "text": "r2"}]}),
            json!({"role": "assistant", "content": "ok", "tool_calls": []}),
        ];
        let c = conversation(&messages, ContentFormat::String);
        assert_eq!(serde_json::to_string(&c[0]).unwrap(), r#"{"role":"user","content":"a\nb","name":"ann"}"#);
        assert_eq!(
            serde_json::to_string(&c[1]).unwrap(),
            r#"{"role":"assistant","content":"","tool_calls":[{"id":"c1","function":{"arguments":{"x":1,"a":[2]},"name":"f"},"type":"function"},{"id":"c2","function":{"arguments":{},"name":"g"},"type":"function"}],"reasoning":"think","reasoning_content":"think"}"#
        );
        assert_eq!(serde_json::to_string(&c[2]).unwrap(), r#"{"role":"tool","content":"r1\nr2","tool_call_id":"c1"}"#);
        assert_eq!(
            serde_json::to_string(&c[3]).unwrap(),
            r#"{"role":"assistant","content":"ok"}"#,
            "empty tool_calls dropped"
        );
        let nulls =
            conversation(&[json!({"role": "tool", "tool_call_id": null, "content": "r"})], ContentFormat::String);
        assert_eq!(serde_json::to_string(&nulls[0]).unwrap(), r#"{"role":"tool","content":"r"}"#, "null keys dropped");
        let o = conversation(&messages[..1], ContentFormat::OpenAi);
        assert_eq!(o[0]["content"], json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]));
    }

    #[test]
    fn tools_are_dumped_with_nulls_in_model_order() {
        let t =
            json!({"function": {"parameters": {"type": "object"}, "name": "f", "strict": true}, "type": "function"});
        assert_eq!(
            serde_json::to_string(&tool_dump(&t)).unwrap(),
            r#"{"type":"function","function":{"name":"f","description":null,"parameters":{"type":"object"},"strict":true}}"#
        );
    }

    #[test]
    fn content_format_follows_loops_over_content() {
        let string = "{% for message in messages %}{{ message['content'] }}{% endfor %}";
        assert_eq!(detect_content_format(string), ContentFormat::String);
        let parts = "{%- for message in messages -%}{%- for part in message['content'] -%}{{ part.text }}{%- endfor -%}{%- endfor -%}";
        assert_eq!(detect_content_format(parts), ContentFormat::OpenAi);
        let aliased = "{% set loop_messages = messages %}{% for m in loop_messages %}{% for c in m.content %}{% endfor %}{% endfor %}";
        assert_eq!(detect_content_format(aliased), ContentFormat::OpenAi);
        let other = "{% for m in messages %}{% for t in tools %}{% endfor %}{% endfor %}";
        assert_eq!(detect_content_format(other), ContentFormat::String);
        let double = r#"{% for m in messages %}{% for c in m["content"] %}{% endfor %}{% endfor %}"#;
        assert_eq!(detect_content_format(double), ContentFormat::OpenAi);
        let first = "{% set first = messages[0] %}{% for c in first['content'] %}{% endfor %}";
        assert_eq!(detect_content_format(first), ContentFormat::String, "an element is not an alias of the list");
    }

    #[test]
    fn continuing_cuts_where_the_final_message_was_tagged() {
        let mut conv = vec![json!({"role": "assistant", "content": "Hel "})];
        let before = tag_final_message(&mut conv).unwrap();
        assert_eq!(conv[0]["content"], "Hel CONTINUE_FINAL_MESSAGE_TAG ");
        assert_eq!(cut_at_tag("<s>A: Hel CONTINUE_FINAL_MESSAGE_TAG </s>", &before).as_deref(), Some("<s>A: Hel "));
        // A template that trims the content loses the tag's space: trailing whitespace goes too.
        assert_eq!(cut_at_tag("A: Hel CONTINUE_FINAL_MESSAGE_TAG</s>", &before).as_deref(), Some("A: Hel"));
        assert_eq!(cut_at_tag("nothing", &before), None);
    }

    #[test]
    fn reasoning_is_aliased_as_transformers_does() {
        let conv = alias_reasoning(vec![
            json!({"role": "assistant", "content": "x", "reasoning": "r", "reasoning_content": "r"}),
        ]);
        assert_eq!(
            serde_json::to_string(&conv[0]).unwrap(),
            r#"{"thinking":"r","role":"assistant","content":"x","reasoning":"r","reasoning_content":"r"}"#
        );
    }
}
