//! A node in front of engines on loopback: the OpenAI API through the node, every kind of bad
//! input, and engines that are down, overloaded or fail mid-stream.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn embedded_engine_answers_out_of_the_box() {
    let n = node(node_config(vec![])).await;
    assert!(n.embedded.is_some(), "no engine configured: the embedded simulator starts");
    let (s, h, v) = post(&n.url(), &chat("Hi", json!({"max_tokens": 4}))).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-kvmesh-served-by"], "test-node/embedded-sim");
    assert_eq!(v["usage"]["completion_tokens"], 4);

    let body = chat("Hi", json!({"max_tokens": 4, "stream": true, "stream_options": {"include_usage": true}}));
    let (s, h, text) = post_raw(&n.url(), "/v1/chat/completions", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(s, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 4);

    let (s, _, t) =
        post_raw(&n.url(), "/v1/completions", br#"{"model":"kvmesh-sim","prompt":"abc","max_tokens":3}"#.to_vec())
            .await;
    assert_eq!(s, 200, "{t}");
    let models: Value = reqwest::get(format!("{}/v1/models", n.url())).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "kvmesh-sim");
    n.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_the_right_status_and_leaves_the_node_healthy() {
    let mut cfg = node_config(vec![]);
    cfg.max_body_bytes = 4096;
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("/v1/chat/completions", b"{not json".to_vec(), 400),
        ("/v1/chat/completions", b"[]".to_vec(), 400),
        ("/v1/chat/completions", br#"{"model":"kvmesh-sim"}"#.to_vec(), 400),
        ("/v1/chat/completions", br#"{"model":"kvmesh-sim","messages":"hi"}"#.to_vec(), 400),
        ("/v1/chat/completions", br#"{"model":5,"messages":[]}"#.to_vec(), 400),
        (
            "/v1/chat/completions",
            br#"{"model":"kvmesh-sim","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#.to_vec(),
            400,
        ),
        ("/v1/chat/completions", br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.to_vec(), 404),
        ("/v1/completions", br#"{"model":"kvmesh-sim"}"#.to_vec(), 400),
        ("/v1/chat/completions", vec![b'x'; 10_000], 413),
        ("/v1/nothing", b"{}".to_vec(), 404),
    ];
    for (path, body, want) in cases {
        let (s, _, text) = post_raw(&n.url(), path, body.clone()).await;
        assert_eq!(s, want, "{path} {}", String::from_utf8_lossy(&body[..body.len().min(60)]));
        assert_openai_error(&serde_json::from_str(&text).unwrap());
    }
    let r = reqwest::get(format!("{}/v1/chat/completions", n.url())).await.unwrap();
    assert_eq!(r.status(), 405);
    assert_openai_error(&r.json().await.unwrap());
    // Still serving.
    let (s, _, _) = post(&n.url(), &chat("still ok?", json!({"max_tokens": 2}))).await;
    assert_eq!(s, 200);
    assert!(scrape(&n.url(), "kvmesh_requests_total").await >= 10.0);
    n.shutdown().await;
}

#[tokio::test]
async fn engine_down_gives_503_and_failover_keeps_serving() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let n = node(node_config(vec![entry(dead.clone())])).await;
    let (s, _, v) = post(&n.url(), &chat("x", json!({}))).await;
    // Its models were never seen: the model is unknown here.
    assert_eq!(s, 404, "{v}");
    assert_openai_error(&v);
    assert_eq!(reqwest::get(format!("{}/health", n.url())).await.unwrap().status(), 503);
    n.shutdown().await;

    // One live engine and one that dies: every request is still served.
    let live = engine(fast_engine(), false).await;
    let doomed = engine(fast_engine(), false).await;
    let n = node(node_config(vec![entry(doomed.url()), entry(live.url())])).await;
    doomed.shutdown().await;
    for i in 0..10 {
        let (s, h, v) = post(&n.url(), &chat(&format!("req {i}"), json!({"max_tokens": 2}))).await;
        assert_eq!(s, 200, "request {i}: {v}");
        assert_eq!(h["x-kvmesh-served-by"], "test-node/engine-1");
    }
    // Both engines down now: a known model gets 503 (retry later), not 404.
    live.shutdown().await;
    eventually("engines marked down", Duration::from_secs(3), async || {
        !n.engines.engines.iter().any(|e| e.is_healthy())
    })
    .await;
    let (s, _, v) = post(&n.url(), &chat("x", json!({}))).await;
    assert_eq!(s, 503, "{v}");
    assert_openai_error(&v);
    n.shutdown().await;
}

#[tokio::test]
async fn overloaded_engine_is_retried_elsewhere() {
    let (busy, stop) = scripted_engine(Script::Unavailable).await;
    let live = engine(fast_engine(), false).await;
    let n = node(node_config(vec![entry(format!("http://{busy}")), entry(live.url())])).await;
    for _ in 0..6 {
        let (s, _, v) = post(&n.url(), &chat("x", json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200, "{v}");
    }
    stop.cancel();
    n.shutdown().await;
    live.shutdown().await;
}

#[tokio::test]
async fn engine_failing_mid_stream_ends_with_error_event() {
    let (addr, stop) = scripted_engine(Script::FailMidStream).await;
    let n = node(node_config(vec![entry(format!("http://{addr}"))])).await;
    let body = chat("x", json!({"stream": true}));
    let (s, _, text) = post_raw(&n.url(), "/v1/chat/completions", serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(s, 200);
    let events = sse_data(&text);
    assert!(events[0].contains("w0") && events[1].contains("w1"), "{events:?}");
    let err: Value = serde_json::from_str(&events[2]).unwrap();
    assert_openai_error(&err);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(scrape(&n.url(), "kvmesh_stream_errors_total").await, 1.0);
    // The node is fine afterwards.
    assert_eq!(n.engines.engines[0].in_flight.load(std::sync::atomic::Ordering::Relaxed), 0);
    stop.cancel();
    n.shutdown().await;
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_on_the_engine() {
    let e = engine(kvmesh_sim::EngineConfig::default(), false).await;
    let n = node(node_config(vec![entry(e.url())])).await;
    let body = chat("tell me everything", json!({"max_tokens": 5000, "ignore_eos": true, "stream": true}));
    let mut r =
        reqwest::Client::new().post(format!("{}/v1/chat/completions", n.url())).json(&body).send().await.unwrap();
    r.chunk().await.unwrap();
    r.chunk().await.unwrap();
    assert_eq!(scrape(&e.url(), "vllm:num_requests_running").await, 1.0);
    drop(r);
    eventually("engine aborts the request", Duration::from_secs(3), async || {
        scrape(&e.url(), "vllm:num_requests_running").await == 0.0
    })
    .await;
    eventually("node releases in-flight", Duration::from_secs(3), async || {
        n.engines.engines[0].in_flight.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn node_follows_engine_load_and_kv_events() {
    let e = engine(fast_engine(), true).await;
    let n = node(node_config(vec![kv_entry("gpu0", &e)])).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // let the subscription land
    let doc = "a long shared document ".repeat(50);
    let (s, _, v) = post(&n.url(), &chat(&doc, json!({"max_tokens": 2}))).await;
    assert_eq!(s, 200);
    eventually("KV events reach the node", Duration::from_secs(3), async || {
        scrape(&n.url(), "kvmesh_kv_cached_blocks").await > 0.0
    })
    .await;
    // The router's own block keys for this prompt, from the same tokenizer and template, are
    // exactly the blocks the engine's events (under the engine's own hashes) said it stored.
    let tok = kvmesh_policy::tokenize::ModelTokenizer::builtin().unwrap();
    let msgs = [kvmesh_policy::request::ChatMessage { role: "user".into(), content: doc.clone() }];
    let ids = tok.encode(&tok.render_chat(&msgs, true).unwrap(), false).unwrap();
    assert_eq!(ids.len() as u64, v["usage"]["prompt_tokens"].as_u64().unwrap());
    let keys = kvmesh_policy::blocks::block_keys(kvmesh_policy::blocks::chain_seed("kvmesh-sim", None, None), &ids, 16);
    assert!(keys.len() >= 10);
    eventually("every prompt block indexed", Duration::from_secs(3), async || {
        n.engines.engines[0].kv.index.read().unwrap().matched_blocks(&keys) == keys.len()
    })
    .await;
    let gaps = scrape(&n.url(), "kvmesh_kv_event_gaps_total").await;
    assert_eq!(gaps, 0.0);
    assert_eq!(scrape(&n.url(), "kvmesh_engine_up").await, 1.0);
    // Clearing the engine's cache empties the node's view of it.
    reqwest::Client::new().post(format!("{}/reset_prefix_cache", e.url())).send().await.unwrap();
    eventually("AllBlocksCleared applied", Duration::from_secs(3), async || {
        scrape(&n.url(), "kvmesh_kv_cached_blocks").await == 0.0
    })
    .await;
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn repeated_prompts_follow_their_cached_prefix() {
    let (a, b) = (engine(fast_engine(), true).await, engine(fast_engine(), true).await);
    let entries = [&a, &b].iter().enumerate().map(|(i, e)| kv_entry(&format!("gpu{i}"), e)).collect();
    let n = node(node_config(entries)).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // subscriptions land
    for doc in 0..4 {
        let prompt = format!("document {doc}: ").repeat(80);
        let (s, h, _) = post(&n.url(), &chat(&prompt, json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
        let first = h["x-kvmesh-served-by"].to_str().unwrap().to_owned();
        let idx = if first.ends_with("gpu0") { 0 } else { 1 };
        eventually("the engine's blocks are indexed", Duration::from_secs(3), async || {
            n.engines.engines[idx].kv.cached_blocks() > 0
        })
        .await;
        let (s, h, v) = post(&n.url(), &chat(&prompt, json!({"max_tokens": 1}))).await;
        assert_eq!(s, 200);
        let route = h["x-kvmesh-route"].to_str().unwrap();
        assert_eq!(h["x-kvmesh-served-by"].to_str().unwrap(), first, "route: {route}");
        assert!(route.contains(&format!("engine={first}")) && !route.contains("matched_blocks=0"), "{route}");
        assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
    }
    assert!(scrape(&n.url(), "kvmesh_route_decisions_total").await >= 8.0);
    n.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A client that sends its headers slowly, or sends none after connecting, has its connection
/// closed after `http_header_timeout_ms`; beyond `http_max_connections` a connection is closed at
/// once; the node keeps serving others throughout.
#[tokio::test]
async fn slow_idle_and_excess_connections_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let e = engine(fast_engine(), false).await;
    let mut cfg = node_config(vec![entry(e.url())]);
    cfg.http_header_timeout_ms = 300;
    cfg.http_max_connections = 8;
    let n = node(cfg).await;
    let addr = n.http_addr;
    // Half a request line, then nothing: closed once the header deadline passes.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    for (what, s) in [("partial headers", &mut slow), ("nothing sent", &mut idle)] {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "{what}: the node closed the connection (or answered 408)");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "closed near the deadline: {:?}", started.elapsed());
    // A kept-alive connection that goes quiet after a request is closed the same way.
    let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let k = kept.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..k]).starts_with("HTTP/1.1 200"));
    let quiet = std::time::Instant::now();
    let eof = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match kept.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok() && quiet.elapsed() < Duration::from_secs(3), "an idle kept-alive connection is closed");
    // Fill the connection limit with idle connections: the next one is closed at once...
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let read = tokio::time::timeout(Duration::from_millis(200), extra.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a connection over the limit is closed: {read:?}");
    drop(held);
    // ... and once they are gone (or timed out) the node serves again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, _, _) = post(&n.url(), &chat("hi", json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200);
    assert!(scrape(&n.url(), "kvmesh_http_connections_refused_total").await >= 1.0);
    n.shutdown().await;
    e.shutdown().await;
}

/// A client that stops reading a stream is disconnected once it has accepted nothing for the
/// write deadline, and its request is cancelled on the engine (the engine sees its stream
/// dropped), instead of holding both for as long as it likes.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_the_write_deadline() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    struct Dropped(Arc<AtomicBool>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let dropped = Arc::new(AtomicBool::new(false));
    let flag = dropped.clone();
    // An engine that streams as fast as it is read, without end.
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "" }))
        .route("/metrics", axum::routing::get(|| async { "" }))
        .route(
            "/v1/models",
            axum::routing::get(|| async { axum::Json(json!({"object": "list", "data": [{"id": "kvmesh-sim", "object": "model"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let guard = Dropped(flag.clone());
                async move {
                    let piece = format!(
                        "data: {}\n\n",
                        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x".repeat(16_000)}, "finish_reason": null}]})
                    );
                    let s = futures::stream::repeat(piece).map(move |p| {
                        let _keep = &guard;
                        Ok::<_, std::io::Error>(axum::body::Bytes::from(p))
                    });
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::from_stream(s))
                        .unwrap()
                }
            }),
        );
    let (addr, stop) = serve_app(app).await;
    let mut cfg = node_config(vec![entry(format!("http://{addr}"))]);
    cfg.http_write_timeout_ms = 500;
    let n = node(cfg).await;
    let mut client = tokio::net::TcpStream::connect(n.http_addr).await.unwrap();
    let body = serde_json::to_vec(&chat("go", json!({"stream": true}))).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(&body).await.unwrap();
    // Never read. The buffers fill, the node's writes stall, and the deadline cuts it.
    let started = std::time::Instant::now();
    eventually("the engine's stream is dropped", Duration::from_secs(20), async || dropped.load(Ordering::SeqCst))
        .await;
    println!("cut after {:?}", started.elapsed());
    drop(client);
    stop.cancel();
    n.shutdown().await;
}
