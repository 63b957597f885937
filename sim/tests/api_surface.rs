//! vLLM's wider OpenAI-compatible surface on the simulator, over real HTTP: Responses,
//! Anthropic Messages, pooling, tokenize and audio. Expected shapes come from vLLM's source
//! (files named at each test), not from this crate.

use std::time::Duration;

use kvmesh_sim::{EngineConfig, EngineSim, RunningEngine};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn start() -> RunningEngine {
    let cfg = EngineConfig { time_scale: 0.02, ..EngineConfig::default() };
    EngineSim::start(cfg, "127.0.0.1:0", None, &CancellationToken::new()).await.unwrap()
}

async fn post(e: &RunningEngine, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new().post(format!("{}{path}", e.url())).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(e: &RunningEngine, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", e.url())).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An SSE body as (event name, data) pairs; a `data:` line without an `event:` line has "".
async fn named_events(e: &RunningEngine, path: &str, body: &Value) -> Vec<(String, String)> {
    let r = reqwest::Client::new().post(format!("{}{path}", e.url())).json(body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let mut name = String::new();
            let mut data = String::new();
            for line in b.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = d.to_owned();
                }
            }
            (name, data)
        })
        .collect()
}

/// vLLM's ErrorResponse (vllm/entrypoints/openai/engine/protocol.py: ErrorInfo has an integer
/// `code`, the HTTP status).
fn assert_vllm_error(v: &Value, status: u16, kind: &str) {
    assert_eq!(v["error"]["code"], status, "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"].as_object().unwrap().contains_key("param"), "{v}");
}

// vllm/entrypoints/openai/responses/protocol.py (ResponsesRequest.request_id, ResponsesResponse,
// ResponseUsage) and serving.py (create_responses, retrieve_responses, cancel_responses,
// _make_not_found_error), utils.py (construct_input_messages).
#[tokio::test]
async fn responses_store_retrieve_continue_and_errors() {
    let e = start().await;
    let (s, r1) = post(
        &e,
        "/v1/responses",
        &json!({"model": "kvmesh-sim", "input": "Tell me about caches.", "instructions": "Be brief.",
                "max_output_tokens": 8, "request_id": "resp_chosen_by_node"}),
    )
    .await;
    assert_eq!(s, 200, "{r1}");
    assert_eq!(r1["id"], "resp_chosen_by_node");
    assert_eq!(r1["object"], "response");
    assert_eq!(r1["model"], "kvmesh-sim");
    assert_eq!(r1["instructions"], "Be brief.");
    assert!(matches!(r1["status"].as_str(), Some("completed" | "incomplete")));
    assert_eq!(r1["max_output_tokens"], 8);
    let item = &r1["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["status"], "completed");
    assert!(item["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(item["content"][0]["type"], "output_text");
    assert!(!item["content"][0]["text"].as_str().unwrap().is_empty());
    let u = &r1["usage"];
    let in1 = u["input_tokens"].as_u64().unwrap();
    assert!(in1 > 3);
    assert_eq!(u["total_tokens"].as_u64().unwrap(), in1 + u["output_tokens"].as_u64().unwrap());
    assert!(u["input_tokens_details"]["cached_tokens"].is_u64());
    assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 0);

    // Without request_id: resp_ + random hex.
    let (_, anon) = post(&e, "/v1/responses", &json!({"input": "hi", "max_output_tokens": 2})).await;
    let id = anon["id"].as_str().unwrap();
    assert!(id.starts_with("resp_") && id.len() == 5 + 32, "{id}");
    assert_eq!(anon["model"], "kvmesh-sim");

    // Stored (store defaults to true) and retrievable.
    let (s, got) = get(&e, "/v1/responses/resp_chosen_by_node").await;
    assert_eq!(s, 200);
    assert_eq!(got, r1);

    // A continuation carries the earlier turn: its prompt is longer than the first one's.
    let (s, r2) = post(
        &e,
        "/v1/responses",
        &json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "And then?"}]}],
                "previous_response_id": "resp_chosen_by_node", "max_output_tokens": 4}),
    )
    .await;
    assert_eq!(s, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], "resp_chosen_by_node");
    let in2 = r2["usage"]["input_tokens"].as_u64().unwrap();
    let out1 = r1["usage"]["output_tokens"].as_u64().unwrap();
    assert!(in2 > in1 + out1, "continued prompt {in2} should hold the first turn ({in1} + {out1})");

    // store=false: not retrievable.
    let (_, r3) = post(
        &e,
        "/v1/responses",
        &json!({"input": "x", "store": false, "max_output_tokens": 2, "request_id": "resp_nostore"}),
    )
    .await;
    assert_eq!(r3["id"], "resp_nostore");
    let (s, v) = get(&e, "/v1/responses/resp_nostore").await;
    assert_eq!(s, 404);
    assert_vllm_error(&v, 404, "invalid_request_error");
    assert_eq!(v["error"]["message"], "Response with id 'resp_nostore' not found.");
    assert_eq!(v["error"]["param"], "response_id");

    // Unknown previous_response_id: the same 404.
    let (s, v) = post(&e, "/v1/responses", &json!({"input": "x", "previous_response_id": "resp_nope"})).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["message"], "Response with id 'resp_nope' not found.");

    // Cancelling a finished, non-background response.
    let (s, v) = post(&e, "/v1/responses/resp_chosen_by_node/cancel", &json!({})).await;
    assert_eq!(s, 400);
    assert_vllm_error(&v, 400, "invalid_request_error");
    assert_eq!(v["error"]["message"], "Cannot cancel a synchronous response.");
    let (s, _) = post(&e, "/v1/responses/resp_nope/cancel", &json!({})).await;
    assert_eq!(s, 404);

    // Unknown model: _check_model's 404.
    let (s, v) = post(&e, "/v1/responses", &json!({"model": "nope", "input": "x"})).await;
    assert_eq!(s, 404);
    assert_vllm_error(&v, 404, "NotFoundError");
    assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
    assert_eq!(v["error"]["param"], "model");

    // Missing input, background without store: pydantic validation, 400 "Bad Request".
    let (s, v) = post(&e, "/v1/responses", &json!({"model": "kvmesh-sim"})).await;
    assert_eq!(s, 400);
    assert_vllm_error(&v, 400, "Bad Request");
    let (s, v) = post(&e, "/v1/responses", &json!({"input": "x", "background": true, "store": false})).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("background can only be used when `store` is true"));
    e.shutdown().await;
}

// serving.py: a background response is stored "queued" at once, replaced when done; cancel
// answers the response with status "cancelled".
#[tokio::test]
async fn background_responses_complete_or_cancel() {
    let e = start().await;
    let (s, q) = post(
        &e,
        "/v1/responses",
        &json!({"input": "background work", "background": true, "max_output_tokens": 3, "request_id": "resp_bg"}),
    )
    .await;
    assert_eq!(s, 200, "{q}");
    assert_eq!(q["status"], "queued");
    assert_eq!(q["background"], true);
    let mut done = Value::Null;
    for _ in 0..200 {
        let (_, v) = get(&e, "/v1/responses/resp_bg").await;
        if v["status"] != "queued" {
            done = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(done["status"].as_str(), Some("completed" | "incomplete")), "{done}");
    assert!(done["usage"]["output_tokens"].as_u64().unwrap() > 0);

    // A long one, cancelled while it runs.
    let (_, q) = post(
        &e,
        "/v1/responses",
        &json!({"input": "long", "background": true, "max_output_tokens": 2000, "ignore_eos": true, "request_id": "resp_long"}),
    )
    .await;
    assert_eq!(q["status"], "queued");
    let (s, c) = post(&e, "/v1/responses/resp_long/cancel", &json!({})).await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(c["status"], "cancelled");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, v) = get(&e, "/v1/responses/resp_long").await;
    assert_eq!(v["status"], "cancelled");
    e.shutdown().await;
}

// serving.py responses_stream_generator and _process_simple_streaming_events; api_router.py
// _convert_stream_to_sse_events ("event: {type}\ndata: {json}\n\n").
#[tokio::test]
async fn responses_stream_events_in_vllm_order() {
    let e = start().await;
    let events = named_events(
        &e,
        "/v1/responses",
        &json!({"input": "stream it", "stream": true, "max_output_tokens": 5, "request_id": "resp_streamed"}),
    )
    .await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let data: Vec<Value> = events.iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(
        &names[..4],
        ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    );
    let n = names.len();
    assert_eq!(
        &names[n - 4..],
        ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    );
    assert!(names[4..n - 4].iter().all(|n| *n == "response.output_text.delta"));
    for (i, (d, name)) in data.iter().zip(&names).enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
        assert_eq!(d["type"], *name);
    }
    assert_eq!(data[0]["response"]["status"], "in_progress");
    assert_eq!(data[0]["response"]["id"], "resp_streamed");
    let deltas: String = data[4..n - 4].iter().map(|d| d["delta"].as_str().unwrap()).collect();
    assert_eq!(data[n - 4]["text"], deltas.as_str());
    let completed = &data[n - 1]["response"];
    assert_eq!(completed["id"], "resp_streamed");
    assert_eq!(completed["output"][0]["content"][0]["text"], deltas.as_str());
    assert_eq!(completed["usage"]["output_tokens"], 5);
    // The streamed response is stored like any other.
    let (s, got) = get(&e, "/v1/responses/resp_streamed").await;
    assert_eq!(s, 200);
    assert_eq!(got["output"][0]["content"][0]["text"], deltas.as_str());
    e.shutdown().await;
}

// vllm/entrypoints/anthropic/serving.py (_convert_anthropic_to_openai_request,
// messages_full_converter, message_stream_converter), protocol.py, api_router.py.
#[tokio::test]
async fn anthropic_messages_answers_and_stream_order() {
    let e = start().await;
    let body = json!({
        "model": "kvmesh-sim", "max_tokens": 6, "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "tu1", "name": "calc", "input": {"e": "2+2"}}]},
            {"role": "user", "content": [{"type": "tool_result", "id": "tu1", "content": "4"}, {"type": "text", "text": "So?"}]},
        ],
        "tools": [{"name": "calc", "description": "math", "input_schema": {"type": "object", "properties": {}}}],
    });
    let (s, v) = post(&e, "/v1/messages", &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["content"][0]["type"], "text");
    assert!(!v["content"][0]["text"].as_str().unwrap().is_empty());
    assert!(matches!(v["stop_reason"].as_str(), Some("end_turn" | "max_tokens")));
    assert!(v["usage"]["input_tokens"].as_u64().unwrap() > 5);
    assert!(v["usage"]["output_tokens"].as_u64().unwrap() <= 6);
    // exclude_none: no stop_sequence, no cache usage fields.
    assert!(v.get("stop_sequence").is_none());
    assert!(v["usage"].get("cache_read_input_tokens").is_none());

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["max_tokens"] = json!(4);
    let events = named_events(&e, "/v1/messages", &sbody).await;
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let n = names.len();
    assert_eq!(&names[..3], ["message_start", "content_block_start", "content_block_delta"]);
    assert!(names[2..n - 4].iter().all(|n| *n == "content_block_delta"));
    assert_eq!(&names[n - 4..], ["content_block_stop", "message_delta", "message_stop", ""]);
    assert_eq!(events[n - 1].1, "[DONE]");
    let start: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(start["type"], "message_start");
    assert!(start["message"]["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(start["message"]["usage"]["output_tokens"], 0);
    assert!(start["message"]["usage"]["input_tokens"].as_u64().unwrap() > 5);
    let block: Value = serde_json::from_str(&events[1].1).unwrap();
    assert_eq!(
        block,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    let delta: Value = serde_json::from_str(&events[2].1).unwrap();
    assert_eq!(delta["delta"]["type"], "text_delta");
    let md: Value = serde_json::from_str(&events[n - 3].1).unwrap();
    assert_eq!(md["delta"]["stop_reason"], "max_tokens");
    assert_eq!(md["usage"]["output_tokens"], 4);

    // Unknown model: the chat path's 404, in Anthropic's envelope.
    let mut bad = body.clone();
    bad["model"] = json!("claude-nope");
    let (s, v) = post(&e, "/v1/messages", &bad).await;
    assert_eq!(s, 404);
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["message"], "The model `claude-nope` does not exist.");
    // max_tokens is required: pydantic validation, vLLM's app-wide (OpenAI-shaped) 400.
    let mut bad = body.clone();
    bad.as_object_mut().unwrap().remove("max_tokens");
    let (s, v) = post(&e, "/v1/messages", &bad).await;
    assert_eq!(s, 400);
    assert_vllm_error(&v, 400, "Bad Request");

    let (s, v) = post(
        &e,
        "/v1/messages/count_tokens",
        &json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": "count me"}]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["input_tokens"].as_u64().unwrap() > 2);
    e.shutdown().await;
}

// vllm/entrypoints/pooling/{embed,pooling,classify,scoring}/protocol.py response shapes.
#[tokio::test]
async fn pooling_endpoints_in_vllm_shapes() {
    let e = start().await;
    let (s, v) = post(&e, "/v1/embeddings", &json!({"model": "kvmesh-sim", "input": ["hello world", "bye"]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert!(v["id"].as_str().unwrap().starts_with("embd-"));
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(v["data"][0]["object"], "embedding");
    let emb: Vec<f64> = v["data"][0]["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(emb.len(), 64);
    assert!((emb.iter().map(|x| x * x).sum::<f64>() - 1.0).abs() < 1e-3);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 2);
    assert_eq!(v["usage"]["prompt_tokens"], v["usage"]["total_tokens"]);
    // Deterministic; dimensions; base64 of float32; token-id inputs.
    let (_, again) = post(&e, "/v1/embeddings", &json!({"input": "hello world"})).await;
    assert_eq!(again["data"][0]["embedding"], v["data"][0]["embedding"]);
    let (_, d) = post(&e, "/v1/embeddings", &json!({"input": "hello", "dimensions": 8})).await;
    assert_eq!(d["data"][0]["embedding"].as_array().unwrap().len(), 8);
    let (_, b) = post(&e, "/v1/embeddings", &json!({"input": "hello", "encoding_format": "base64"})).await;
    assert_eq!(b["data"][0]["embedding"].as_str().unwrap().len(), 344); // 64 * 4 bytes
    let (s, t) = post(&e, "/v1/embeddings", &json!({"input": [[1, 2, 3], [4, 5]]})).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["usage"]["prompt_tokens"], 5);
    let (s, v) = post(&e, "/v1/embeddings", &json!({"model": "nope", "input": "x"})).await;
    assert_eq!(s, 404);
    assert_vllm_error(&v, 404, "NotFoundError");
    let (s, v) = post(&e, "/v1/embeddings", &json!({"model": "kvmesh-sim"})).await;
    assert_eq!(s, 400);
    assert_vllm_error(&v, 400, "Bad Request");

    let (s, v) = post(&e, "/pooling", &json!({"input": "pool me"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"][0]["object"], "pooling");
    assert!(v["id"].as_str().unwrap().starts_with("pool-"));

    let (s, v) = post(&e, "/classify", &json!({"input": ["good", "bad"]})).await;
    assert_eq!(s, 200, "{v}");
    let c = &v["data"][0];
    assert_eq!(c["num_classes"], 2);
    let p: f64 = c["probs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
    assert!((p - 1.0).abs() < 1e-9);
    assert!(c["label"].as_str().unwrap().starts_with("LABEL_"));

    for path in ["/score", "/v1/score"] {
        let (s, v) =
            post(&e, path, &json!({"text_1": "the cat sat", "text_2": ["the cat sat", "dogs bark loudly"]})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["data"][0]["object"], "score");
        let s0 = v["data"][0]["score"].as_f64().unwrap();
        let s1 = v["data"][1]["score"].as_f64().unwrap();
        assert!((s0 - 1.0).abs() < 1e-9 && s1 < s0);
    }
    for path in ["/rerank", "/v1/rerank", "/v2/rerank"] {
        let (s, v) = post(
            &e,
            path,
            &json!({"query": "the cat sat", "documents": ["dogs bark", "the cat sat down", "cats"], "top_n": 2}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert!(v["id"].as_str().unwrap().starts_with("rerank-"));
        let r = v["results"].as_array().unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0]["index"], 1);
        assert_eq!(r[0]["document"]["text"], "the cat sat down");
        assert!(r[0]["relevance_score"].as_f64().unwrap() >= r[1]["relevance_score"].as_f64().unwrap());
        assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);
    }
    e.shutdown().await;
}

// vllm/entrypoints/serve/tokenize/serving.py (TokenizeResponse, DetokenizeResponse).
#[tokio::test]
async fn tokenize_and_detokenize() {
    let e = start().await;
    let (s, v) = post(&e, "/tokenize", &json!({"prompt": "Hello tokenizer", "return_token_strs": true})).await;
    assert_eq!(s, 200, "{v}");
    let tokens = v["tokens"].as_array().unwrap().clone();
    assert_eq!(v["count"], tokens.len());
    assert!(v["max_model_len"].as_u64().unwrap() > 0);
    assert_eq!(v["token_strs"].as_array().unwrap().len(), tokens.len());
    let (s, d) = post(&e, "/detokenize", &json!({"tokens": tokens})).await;
    assert_eq!(s, 200, "{d}");
    assert!(d["prompt"].as_str().unwrap().contains("Hello tokenizer"));
    let (_, plain) = post(&e, "/tokenize", &json!({"prompt": "x"})).await;
    assert!(plain["token_strs"].is_null());

    // A chat tokenized is the prompt the chat endpoint runs.
    let messages = json!([{"role": "user", "content": "How many tokens?"}]);
    let (_, t) = post(&e, "/tokenize", &json!({"messages": messages})).await;
    let (_, c) =
        post(&e, "/v1/chat/completions", &json!({"model": "kvmesh-sim", "messages": messages, "max_tokens": 1})).await;
    assert_eq!(t["count"], c["usage"]["prompt_tokens"]);
    let (_, nogen) = post(&e, "/tokenize", &json!({"messages": messages, "add_generation_prompt": false})).await;
    assert!(nogen["count"].as_u64().unwrap() <= t["count"].as_u64().unwrap());

    let (s, v) = post(&e, "/tokenize", &json!({"model": "nope", "prompt": "x"})).await;
    assert_eq!(s, 404);
    assert_vllm_error(&v, 404, "NotFoundError");
    let (s, v) = post(&e, "/detokenize", &json!({"tokens": [999_999_999]})).await;
    assert_eq!(s, 400);
    assert_vllm_error(&v, 400, "BadRequestError");
    e.shutdown().await;
}

// vllm/entrypoints/openai/translations/api_router.py: no transcription handler for a text
// model → create_error_response("The model does not support Transcriptions API").
#[tokio::test]
async fn audio_on_a_text_model() {
    let e = start().await;
    let form = |with_file: bool| {
        let mut b = String::new();
        if with_file {
            b.push_str("--B0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....\r\n");
        }
        b.push_str("--B0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nkvmesh-sim\r\n--B0und--\r\n");
        b
    };
    for (path, api) in [("/v1/audio/transcriptions", "Transcriptions"), ("/v1/audio/translations", "Translations")] {
        let send = |with_file: bool| {
            reqwest::Client::new()
                .post(format!("{}{path}", e.url()))
                .header("content-type", "multipart/form-data; boundary=B0und")
                .body(form(with_file))
                .send()
        };
        let r = send(true).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_vllm_error(&v, 400, "BadRequestError");
        assert_eq!(v["error"]["message"], format!("The model does not support {api} API"));
        let r = send(false).await.unwrap();
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await.unwrap();
        assert_vllm_error(&v, 400, "Bad Request");
    }
    e.shutdown().await;
}

// vllm/v1/engine (the input processor): `priority` other than 0 is refused unless the engine
// runs `--scheduling-policy priority`; a non-integer is a validation error.
#[tokio::test]
async fn priority_needs_the_priority_scheduling_policy() {
    let chat = |p: Value| json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "priority": p});
    let fcfs = start().await;
    let (status, v) = post(&fcfs, "/v1/chat/completions", &chat(json!(3))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("Priority scheduling is not enabled"), "{v}");
    assert_eq!(post(&fcfs, "/v1/chat/completions", &chat(json!(0))).await.0, 200);
    let cfg = EngineConfig {
        time_scale: 0.02,
        scheduling_policy: kvmesh_sim::engine::Scheduling::Priority,
        ..EngineConfig::default()
    };
    let prio = EngineSim::start(cfg, "127.0.0.1:0", None, &CancellationToken::new()).await.unwrap();
    assert_eq!(post(&prio, "/v1/chat/completions", &chat(json!(-2))).await.0, 200);
    let (status, v) = post(&prio, "/v1/chat/completions", &chat(json!("high"))).await;
    assert_eq!(status, 400, "{v}");
}
