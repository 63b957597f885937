//! The engine simulator over real HTTP and real ZeroMQ on loopback.

use std::time::{Duration, Instant};

use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn start(cfg: EngineConfig, kv: bool) -> RunningEngine {
    EngineSim::start(cfg, "127.0.0.1:0", kv.then_some("tcp://127.0.0.1:0"), &CancellationToken::new()).await.unwrap()
}

fn fast() -> EngineConfig {
    EngineConfig { time_scale: 0.02, ..EngineConfig::default() }
}

fn chat(content: &str, extra: Value) -> Value {
    let mut b = json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": content}]});
    if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
        o.extend(e);
    }
    b
}

async fn post(e: &RunningEngine, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", e.url())).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Reads an SSE body into its `data:` payloads.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

async fn metric(e: &RunningEngine, name: &str) -> f64 {
    let text = reqwest::get(format!("{}/metrics", e.url())).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn chat_and_completions_as_vllm_answers_them() {
    let e = start(fast(), false).await;
    let (s, v) = post(&e, "/v1/chat/completions", &chat("Hello there", json!({"max_tokens": 7}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 3);
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].is_u64());
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty());

    // Same prompt, same output: the filler is deterministic.
    let (_, v2) = post(&e, "/v1/chat/completions", &chat("Hello there", json!({"max_tokens": 7}))).await;
    assert_eq!(v["choices"][0]["message"]["content"], v2["choices"][0]["message"]["content"]);

    let (s, v) =
        post(&e, "/v1/completions", &json!({"model": "kvmesh-sim", "prompt": "Once upon", "max_tokens": 5})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (s, v) =
        post(&e, "/v1/completions", &json!({"model": "kvmesh-sim", "prompt": [1, 2, 3, 4], "max_tokens": 2})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 4);

    let models: Value = reqwest::get(format!("{}/v1/models", e.url())).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "kvmesh-sim");
    assert_eq!(reqwest::get(format!("{}/health", e.url())).await.unwrap().status(), 200);
    e.shutdown().await;
}

#[tokio::test]
async fn streaming_chunks_usage_and_done() {
    let e = start(fast(), false).await;
    let body =
        chat("Stream please", json!({"max_tokens": 5, "stream": true, "stream_options": {"include_usage": true}}));
    let r = reqwest::Client::new().post(format!("{}/v1/chat/completions", e.url())).json(&body).send().await.unwrap();
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_events(r).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|s| serde_json::from_str(s).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: Vec<_> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|s| !s.is_empty()).collect();
    assert_eq!(content.len(), 5);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, "length");

    // Streamed and non-streamed text are the same.
    let (_, full) = post(&e, "/v1/chat/completions", &chat("Stream please", json!({"max_tokens": 5}))).await;
    assert_eq!(full["choices"][0]["message"]["content"].as_str().unwrap(), content.concat());
    e.shutdown().await;
}

#[tokio::test]
async fn stop_strings_cut_output() {
    let e = start(fast(), false).await;
    let (_, full) = post(&e, "/v1/chat/completions", &chat("stop test", json!({"max_tokens": 30}))).await;
    let text = full["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    // Stop on the third word of the unconstrained output.
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let stop = words[3].trim().to_owned();
    let (_, v) =
        post(&e, "/v1/chat/completions", &chat("stop test", json!({"max_tokens": 30, "stop": [stop.clone()]}))).await;
    let got = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop.as_str());
    assert!(text.starts_with(got) && !got.contains(&stop), "{got:?} vs {text:?}");
    e.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let cfg = EngineConfig { max_body_bytes: 4096, max_model_len: Some(64), ..fast() };
    let e = start(cfg, false).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", e.url());
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"{oops".to_vec(), 400),
        (br#"{"model":"kvmesh-sim"}"#.to_vec(), 400),
        (br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":1}]}"#.to_vec(), 400),
        (br#"{"model":"nope","messages":[{"role":"user","content":"x"}]}"#.to_vec(), 404),
        (br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":"x"}],"max_tokens":1000}"#.to_vec(), 400),
        (serde_json::to_vec(&chat(&"word ".repeat(2000), json!({}))).unwrap(), 413),
    ];
    for (body, want) in cases {
        let r = client.post(&url).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{}", String::from_utf8_lossy(&body[..body.len().min(80)]));
        let v: Value = r.json().await.unwrap();
        for k in ["message", "type", "param", "code"] {
            assert!(v["error"].get(k).is_some(), "missing {k} in {v}");
        }
    }
    let long = chat(&"word ".repeat(200), json!({}));
    let (s, v) = post(&e, "/v1/chat/completions", &long).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("maximum context length is 64"), "{v}");
    e.shutdown().await;
}

#[tokio::test]
async fn metrics_carry_vllm_names_and_move_with_load() {
    let e = start(EngineConfig { time_scale: 1.0, ..EngineConfig::default() }, false).await;
    let text = reqwest::get(format!("{}/metrics", e.url())).await.unwrap().text().await.unwrap();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert!(
        text.contains(r#"vllm:cache_config_info{block_size="16""#) && text.contains(r#"num_gpu_blocks="28000""#),
        "{text}"
    );
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", e.url());
    let reqs: Vec<_> = (0..8)
        .map(|i| {
            let b = chat(&format!("load {i} ").repeat(50), json!({"max_tokens": 60, "ignore_eos": true}));
            client.post(&url).json(&b).send()
        })
        .collect();
    let all = tokio::spawn(futures::future::join_all(reqs));
    let mut peak_running: f64 = 0.0;
    let mut peak_kv: f64 = 0.0;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(400) {
        peak_running = peak_running.max(metric(&e, "vllm:num_requests_running").await);
        peak_kv = peak_kv.max(metric(&e, "vllm:kv_cache_usage_perc").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in all.await.unwrap() {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert!(peak_running >= 4.0, "running peaked at {peak_running}");
    assert!(peak_kv > 0.0);
    assert_eq!(metric(&e, "vllm:num_requests_running").await, 0.0);
    assert!(metric(&e, "vllm:prefix_cache_queries_total").await > 0.0);
    assert_eq!(metric(&e, "vllm:time_to_first_token_seconds_count").await, 8.0);
    assert!(metric(&e, "vllm:inter_token_latency_seconds_count").await >= 8.0 * 59.0);
    e.shutdown().await;
}

#[tokio::test]
async fn prefix_reuse_lowers_ttft() {
    let e = start(EngineConfig { time_scale: 1.0, ..EngineConfig::default() }, false).await;
    let doc: String = (0..1500).map(|i| format!("fact{} ", i % 97)).collect();
    let ttft = |body: Value| {
        let url = format!("{}/v1/chat/completions", e.url());
        async move {
            let t = Instant::now();
            let mut r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            // The first chunk carries only the role; the first token follows it.
            let mut seen = String::new();
            while seen.matches("data: ").nth(1).is_none() {
                seen.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
            }
            let ttft = t.elapsed();
            while r.chunk().await.unwrap().is_some() {}
            ttft
        }
    };
    let body = chat(&doc, json!({"max_tokens": 2, "stream": true}));
    let cold = ttft(body.clone()).await;
    let warm = ttft(body).await;
    let (_, v) = post(&e, "/v1/chat/completions", &chat(&doc, json!({"max_tokens": 2}))).await;
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert!(prompt > 3000, "prompt {prompt}");
    assert!(cached >= prompt - 16, "cached {cached} of {prompt}");
    let ratio = warm.as_secs_f64() / cold.as_secs_f64();
    assert!(ratio < 0.5, "warm {warm:?} cold {cold:?}");
    e.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_frees_the_sequence() {
    let e = start(EngineConfig { time_scale: 1.0, ..EngineConfig::default() }, false).await;
    let body = chat("long answer", json!({"max_tokens": 5000, "ignore_eos": true, "stream": true}));
    let mut r =
        reqwest::Client::new().post(format!("{}/v1/chat/completions", e.url())).json(&body).send().await.unwrap();
    r.chunk().await.unwrap();
    assert_eq!(metric(&e, "vllm:num_requests_running").await, 1.0);
    drop(r);
    let t = Instant::now();
    while metric(&e, "vllm:num_requests_running").await > 0.0 {
        assert!(t.elapsed() < Duration::from_secs(3), "sequence still running after disconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(&e, "vllm:kv_cache_usage_perc").await, 0.0);
    e.shutdown().await;
}
