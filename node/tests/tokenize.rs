//! The tokenizer service seen from a client: ids equal to the engine's own count, context-length
//! errors before routing, edge-case inputs, and what `/v1/mesh/status` reports.

mod common;

use common::*;
use serde_json::{json, Value};

fn prompt_tokens_in_route(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let route = headers.get("x-kvmesh-route")?.to_str().ok()?;
    route.split("; ").find_map(|kv| kv.strip_prefix("prompt_tokens="))?.parse().ok()
}

#[tokio::test]
async fn node_counts_the_same_prompt_tokens_as_the_engine() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let tricky = [
        "",
        "plain words",
        "<|im_start|>user\nnot really a turn<|im_end|>",
        "<|im_start <|im_end| |> <|endoftext|>",
        "日本語 👩‍👩‍👧 ∑ \t\t  \n\n\n  trailing   ",
        "It's they've we'll 'd\n's",
    ];
    for (i, text) in tricky.iter().enumerate() {
        for turn in 0..2 {
            // The second time the history is cached: the ids must not change.
            let body = json!({"model": "kvmesh-sim", "max_tokens": 1, "messages": [
                {"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": text},
                {"role": "assistant", "content": format!("answer {i}")},
                {"role": "user", "content": format!("{text} again")}]});
            let (s, h, v) = post(&n.url(), &body).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(
                prompt_tokens_in_route(&h),
                v["usage"]["prompt_tokens"].as_u64(),
                "case {i} turn {turn}: {text:?} {:?}",
                h.get("x-kvmesh-route")
            );
        }
        if text.is_empty() {
            continue; // vLLM refuses an empty completions prompt; the engine says so.
        }
        let body = json!({"model": "kvmesh-sim", "max_tokens": 1, "prompt": text});
        let r = reqwest::Client::new().post(format!("{}/v1/completions", n.url())).json(&body).send().await.unwrap();
        let h = r.headers().clone();
        let v: Value = r.json().await.unwrap();
        assert_eq!(prompt_tokens_in_route(&h), v["usage"]["prompt_tokens"].as_u64(), "completions {text:?}: {v}");
    }
    assert!(scrape(&n.url(), "kvmesh_tokenize_tokens_total").await > 0.0);
    n.shutdown().await;
}

#[tokio::test]
async fn over_long_requests_are_refused_before_routing() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let routed = || async { scrape(&n.url(), "kvmesh_route_decisions_total").await };
    let before = routed().await;
    // The builtin model's context is 32768 tokens (its tokenizer_config.json).
    let (s, _, v) = post(&n.url(), &chat("hello", json!({"max_tokens": 40_000}))).await;
    assert_eq!(s, 400, "{v}");
    assert_openai_error(&v);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("maximum context length is 32768 tokens"), "{v}");
    // Token-id prompts are checked without tokenizing.
    let ids: Vec<u32> = (0..32_768).map(|i| 100 + i % 50).collect();
    let (s, _, v) = post_raw(
        &n.url(),
        "/v1/completions",
        serde_json::to_vec(&json!({"model": "kvmesh-sim", "prompt": ids, "max_tokens": 1})).unwrap(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(routed().await, before, "a refused request was routed");
    let (s, _, v) =
        post_raw(&n.url(), "/v1/completions", br#"{"model":"kvmesh-sim","prompt":[1,2,3],"max_tokens":2}"#.to_vec())
            .await;
    assert_eq!(s, 200, "{v}");
    let text = reqwest::get(format!("{}/metrics", n.url())).await.unwrap().text().await.unwrap();
    assert!(text.lines().any(|l| l.starts_with("kvmesh_tokenize_requests_total") && l.contains("token_ids")));
    n.shutdown().await;
}

#[tokio::test]
async fn malformed_text_gets_a_clear_error() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let cases: Vec<Vec<u8>> = vec![
        // A lone surrogate escape is not a Unicode string.
        br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":"bad \ud800 here"}]}"#.to_vec(),
        // Raw bytes that are not UTF-8.
        [&br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":"x"#[..], &[0xff, 0xfe], &br#""}]}"#[..]]
            .concat(),
        br#"{"model":"kvmesh-sim","messages":[]}"#.to_vec(),
    ];
    for body in cases {
        let (s, _, text) = post_raw(&n.url(), "/v1/chat/completions", body.clone()).await;
        assert_eq!(s, 400, "{}", String::from_utf8_lossy(&body));
        assert_openai_error(&serde_json::from_str(&text).unwrap());
    }
    // An empty message is a valid prompt.
    let (s, _, v) = post(&n.url(), &chat("", json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200, "{v}");
    n.shutdown().await;
}

#[tokio::test]
async fn status_reports_how_each_model_is_matched() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let v: Value = reqwest::get(format!("{}/v1/mesh/status", n.url())).await.unwrap().json().await.unwrap();
    let model = v["models"].as_array().unwrap().iter().find(|m| m["model"] == "kvmesh-sim").unwrap();
    assert_eq!(model["prefix_matching"], "exact", "{v}");
    let tok = &v["tokenizers"][0];
    assert_eq!(tok["model"], "kvmesh-sim");
    assert_eq!(tok["encoder"]["segment_cache"], true, "{v}");
    assert_eq!(tok["max_model_len"], 32768);
    assert!(v["engines"][0]["kv_events"].is_boolean());
    n.shutdown().await;
}
