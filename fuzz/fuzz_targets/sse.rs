//! Streamed answers: an engine's SSE bytes through the guard's rewriting (`node::guard::stream`,
//! reached through `kvmesh_node::fuzzing::rewrite_sse`), with a rule that redacts a word.
//!
//! Input: a flags byte (endpoint, window, rule action), a chunk-size byte, then the stream.
//! Invariants:
//! - the bytes the client gets do not depend on how the engine's stream was cut into chunks;
//! - they are whole events (end on a blank line);
//! - with no rules, every event passes as it came (but `[DONE]`, which goes last, once);
//! - with a rule that denies the word `secret`, no text the client reads (each
//!   completion's text; each chat choice's content, reasoning and tool-call arguments; joined in
//!   order across events,
//!   reading each event's data as an SSE client does) contains it.
#![no_main]

use kvmesh_policy::guardrails::GuardrailConfig;
use kvmesh_policy::request::Endpoint;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use std::collections::BTreeMap;

const WORD: &str = "secret";

/// Denies `secret` anywhere (a pattern, case-sensitive); `redact`: after a rule redacting
/// e-mail addresses, so rewritten events are scanned too.
fn rules(redact: bool) -> Vec<GuardrailConfig> {
    let deny = serde_json::json!({"kind": "deny", "name": "no-secret", "on": ["response"], "patterns": [WORD]});
    let pii =
        serde_json::json!({"kind": "pii", "name": "pii", "on": ["response"], "types": ["email"], "action": "redact"});
    let mut out = Vec::new();
    if redact {
        out.push(serde_json::from_value(pii).unwrap());
    }
    out.push(serde_json::from_value(deny).unwrap());
    out
}

/// The text fields a client reads (a completion's `text`; a chat delta's content, reasoning and
/// tool-call arguments), per choice and field, joined across events: each event's
/// `data:` lines joined by newlines, as the SSE spec has a client read them.
fn client_texts(out: &[u8], chat: bool) -> BTreeMap<(u64, String), String> {
    let mut texts: BTreeMap<(u64, String), String> = BTreeMap::new();
    let text = String::from_utf8_lossy(out);
    for ev in text.split("\n\n") {
        let data: Vec<&str> =
            ev.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
        if data.is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) else { continue };
        let Some(choices) = v.get("choices").and_then(Value::as_array) else { continue };
        for c in choices {
            let idx = c["index"].as_u64().unwrap_or(0);
            let mut add = |field: String, s: Option<&str>| {
                if let Some(s) = s {
                    texts.entry((idx, field)).or_default().push_str(s);
                }
            };
            if !chat {
                add("text".into(), c["text"].as_str());
                continue;
            }
            for f in ["content", "reasoning_content", "reasoning"] {
                add(f.into(), c["delta"][f].as_str());
            }
            if let Some(calls) = c["delta"]["tool_calls"].as_array() {
                for t in calls {
                    add(format!("tool{}", t["index"]), t["function"]["arguments"].as_str());
                }
            }
        }
    }
    texts
}

/// What a stream with no rules becomes: its events as they came, with their lines ended by LF
/// (SSE ends a line at CRLF, LF or a lone CR), an unterminated last one terminated, but
/// `[DONE]` (an event whose data lines, joined, are `[DONE]`), which goes last, once.
fn unruled(stream: &[u8]) -> String {
    let lf = String::from_utf8_lossy(stream).replace("\r\n", "\n").replace('\r', "\n");
    let stream = lf.as_bytes();
    let mut out = String::new();
    let mut done = false;
    let mut event = |ev: &str| {
        let data: Vec<&str> = ev.lines().filter_map(|l| l.strip_prefix("data:")).collect();
        let data = data.iter().map(|d| d.strip_prefix(' ').unwrap_or(d)).collect::<Vec<_>>().join("\n");
        if data.trim_start() == "[DONE]" {
            done = true;
        } else {
            out.push_str(ev);
            out.push_str("\n\n");
        }
    };
    let mut rest = stream;
    while let Some(pos) = rest.windows(2).position(|w| w == b"\n\n") {
        event(&String::from_utf8_lossy(&rest[..pos]));
        rest = &rest[pos + 2..];
    }
    if !rest.is_empty() {
        event(String::from_utf8_lossy(rest).trim_end_matches('\n'));
    }
    if done {
        out.push_str("data: [DONE]\n\n");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [flags, chunk, stream @ ..] = data else { return };
    let endpoint = if flags & 1 == 0 { Endpoint::Chat } else { Endpoint::Completions };
    // At least the word's length: a window shorter than a match cannot hold it back whole.
    let window = [8, 16, 64, 256][(flags >> 1 & 3) as usize];
    let rules: Vec<GuardrailConfig> = match flags >> 3 & 3 {
        0 => Vec::new(),
        1 => rules(false),
        _ => rules(true),
    };
    let chunk = (*chunk as usize).max(1);

    let whole = kvmesh_node::fuzzing::rewrite_sse(&rules, window, endpoint, &[stream]).unwrap();
    let pieces: Vec<&[u8]> = stream.chunks(chunk).collect();
    let cut = kvmesh_node::fuzzing::rewrite_sse(&rules, window, endpoint, &pieces).unwrap();
    assert_eq!(whole, cut, "the output depends on how the stream was cut");

    let (out, denied) = whole;
    assert!(out.is_empty() || out.ends_with(b"\n\n") || denied.is_some(), "not whole events");
    if rules.is_empty() {
        assert!(denied.is_none());
        assert_eq!(String::from_utf8_lossy(&out), unruled(stream), "a stream with no rules was changed");
        return;
    }
    for ((idx, field), text) in client_texts(&out, endpoint == Endpoint::Chat) {
        assert!(!text.contains(WORD), "choice {idx} {field} reaches the client with `{WORD}`: {text:?}");
    }
});
