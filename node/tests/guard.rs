//! API keys, tenant limits, guardrail hooks (built-in and webhooks, on prompts and on streamed
//! answers) and the audit trail, through a real node on loopback.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use common::*;
use futures::StreamExt;
use kvmesh_node::audit::AuditConfig;
use kvmesh_node::config::Config;
use kvmesh_policy::auth::{hash_key, KeyEntry};
use kvmesh_policy::guardrails::{FailMode, GuardrailConfig, PiiAction, PiiKind, Stage};
use kvmesh_policy::limits::LimitSpec;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A fake engine that answers with the last message's content: whole, or streamed in pieces of
/// `piece` characters, one network write each.
async fn echo_engine(piece: usize) -> (SocketAddr, CancellationToken) {
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "vllm:num_requests_running{engine=\"0\"} 0\n" }))
        .route("/v1/models", get(|| async { Json(json!({"object":"list","data":[{"id":"kvmesh-sim","object":"model"}]})) }))
        .route(
            "/v1/chat/completions",
            post(move |body: Bytes| async move {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let content = v["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_owned();
                if v["stream"] != true {
                    return Json(json!({
                        "id": "x", "object": "chat.completion", "model": "kvmesh-sim",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
                    }))
                    .into_response();
                }
                let chars: Vec<char> = content.chars().collect();
                let mut events: Vec<String> =
                    chars.chunks(piece).map(|c| chunk_event(json!({"content": c.iter().collect::<String>()}), Value::Null)).collect();
                events.push(chunk_event(json!({}), json!("stop")));
                events.push("data: [DONE]\n\n".into());
                let s = futures::stream::iter(events).then(|e| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Ok::<_, std::io::Error>(Bytes::from(e))
                });
                Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(s)).unwrap()
            }),
        );
    serve_app(app).await
}

fn chunk_event(delta: Value, finish: Value) -> String {
    let ev = json!({"id": "x", "object": "chat.completion.chunk", "model": "kvmesh-sim",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {ev}\n\n")
}

async fn echo_node(piece: usize, f: impl FnOnce(&mut Config)) -> (kvmesh_node::RunningNode, CancellationToken) {
    let (addr, stop) = echo_engine(piece).await;
    let mut cfg = node_config(vec![entry(format!("http://{addr}"))]);
    f(&mut cfg);
    (node(cfg).await, stop)
}

async fn send(url: &str, key: Option<&str>, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let mut rb = reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(body);
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

/// The text of a streamed chat answer, and its error event if any.
fn stream_text(body: &str) -> (String, Option<Value>) {
    let mut text = String::new();
    let mut error = None;
    for ev in sse_data(body) {
        if ev == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&ev).unwrap();
        if v.get("error").is_some() {
            error = Some(v);
            continue;
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    (text, error)
}

fn key(tenant: &str, secret: &str, models: &[&str], admin: bool) -> KeyEntry {
    KeyEntry {
        tenant: tenant.into(),
        key_sha256: hash_key(secret),
        models: models.iter().map(|m| m.to_string()).collect(),
        admin,
        share_cache: false,
        ..Default::default()
    }
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test]
async fn api_keys_gate_every_endpoint_and_reload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("keys.toml");
    std::fs::write(&keys_file, "").unwrap();
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    cfg.auth.keys = vec![key("acme", "sk-acme", &["kvmesh-sim"], false), key("ops", "sk-ops", &[], true)];
    cfg.auth.keys_file = Some(keys_file.clone());
    cfg.auth.reload_interval_ms = 50;
    let n = node(cfg).await;
    let url = n.url();
    let body = chat("hi", json!({"max_tokens": 2}));

    let want_401 = json!({"error":{"message":"Incorrect API key provided.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}});
    for k in [None, Some("sk-wrong"), Some("")] {
        let (s, _, t) = send(&url, k, &body).await;
        assert_eq!(s, 401, "{k:?}");
        assert_eq!(serde_json::from_str::<Value>(&t).unwrap(), want_401);
    }
    let (s, _, t) = send(&url, Some("sk-acme"), &body).await;
    assert_eq!(s, 200, "{t}");
    // A model outside the key's list does not exist, as far as that key can tell.
    let (s, _, t) =
        send(&url, Some("sk-acme"), &json!({"model": "other", "messages": [{"role": "user", "content": "x"}]})).await;
    assert_eq!(s, 404, "{t}");

    let client = reqwest::Client::new();
    let get = |path: &str, k: Option<&str>| {
        let mut rb = client.get(format!("{url}{path}"));
        if let Some(k) = k {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    assert_eq!(get("/v1/models", None).await.unwrap().status(), 401);
    assert_eq!(get("/v1/models", Some("sk-acme")).await.unwrap().status(), 200);
    // Mesh-debug and admin endpoints need an admin key.
    assert_eq!(get("/v1/mesh/peers", Some("sk-acme")).await.unwrap().status(), 401);
    assert_eq!(get("/v1/mesh/peers", Some("sk-ops")).await.unwrap().status(), 200);
    assert_eq!(get("/v1/mesh/status", Some("sk-acme")).await.unwrap().status(), 401);
    assert_eq!(get("/v1/mesh/status", Some("sk-ops")).await.unwrap().status(), 200);
    // Only an admin may drain (and none does here: the node keeps serving below).
    for k in [None, Some("sk-acme")] {
        let mut rb = client.post(format!("{url}/admin/drain"));
        if let Some(k) = k {
            rb = rb.bearer_auth(k);
        }
        assert_eq!(rb.send().await.unwrap().status(), 401, "{k:?}");
    }
    assert_eq!(get("/health", None).await.unwrap().status(), 200);

    // A key added to the keys file works without a restart; one removed stops working.
    assert_eq!(send(&url, Some("sk-new"), &body).await.0, 401);
    std::fs::write(&keys_file, format!("[[keys]]\ntenant = \"new\"\nkey_sha256 = \"{}\"\n", hash_key("sk-new")))
        .unwrap();
    eventually("new key accepted", Duration::from_secs(3), async || send(&url, Some("sk-new"), &body).await.0 == 200)
        .await;
    std::fs::write(&keys_file, "keys = []\n").unwrap();
    eventually("removed key refused", Duration::from_secs(3), async || {
        send(&url, Some("sk-new"), &body).await.0 == 401
    })
    .await;
    let r = client.post(format!("{url}/admin/keys/reload")).bearer_auth("sk-ops").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["keys"], 2);
    assert!(scrape(&url, "kvmesh_auth_failures_total").await >= 9.0);
    n.shutdown().await;
}

#[tokio::test]
async fn tenant_limits_answer_429_with_retry_after() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    cfg.auth.keys = vec![key("small", "sk-small", &[], false), key("big", "sk-big", &[], false)];
    cfg.limits.default = LimitSpec { requests_per_minute: Some(2), max_tokens: Some(50), ..Default::default() };
    cfg.limits.tenants.insert("big".into(), LimitSpec { requests_per_minute: Some(100), ..Default::default() });
    let n = node(cfg).await;
    let url = n.url();
    let body = chat("hi", json!({"max_tokens": 2}));
    assert_eq!(send(&url, Some("sk-small"), &body).await.0, 200);
    assert_eq!(send(&url, Some("sk-small"), &body).await.0, 200);
    let (s, h, t) = send(&url, Some("sk-small"), &body).await;
    assert_eq!(s, 429, "{t}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // Another tenant has its own quota.
    assert_eq!(send(&url, Some("sk-big"), &body).await.0, 200);
    // max_tokens over the key's limit is a 400 naming the parameter.
    let (s, _, t) = send(&url, Some("sk-big"), &chat("hi", json!({"max_tokens": 51}))).await;
    assert_eq!(s, 400);
    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["error"]["param"], "max_tokens");
    assert_eq!(scrape(&url, "kvmesh_rate_limited_total").await, 1.0);
    n.shutdown().await;
}

#[tokio::test]
async fn tokens_per_minute_count_real_prompt_tokens() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    cfg.limits.default = LimitSpec { tokens_per_minute: Some(400), ..Default::default() };
    let n = node(cfg).await;
    let url = n.url();
    // Prompt tokens as the engine counts them (the same tokenizer): charged at admission.
    let prompt = "count these tokens please ".repeat(10);
    let (s, _, t) = send(&url, None, &chat(&prompt, json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200, "{t}");
    let used = serde_json::from_str::<Value>(&t).unwrap()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used > 20);
    let mut ok = 1;
    while send(&url, None, &chat(&prompt, json!({"max_tokens": 1}))).await.0 == 200 {
        ok += 1;
        assert!(ok < 100);
    }
    // Each request costs its prompt (charged at admission) plus its completion token (charged
    // when it ends): the 400-token budget admits k requests while (k-1)*used + prompt <= 400.
    assert_eq!(ok, 401 / used, "used {used} tokens a request");
    n.shutdown().await;
}

#[tokio::test]
async fn prompt_rules_deny_redact_and_check_models() {
    let (n, stop) = echo_node(8, |cfg| {
        cfg.guardrails = vec![
            GuardrailConfig::Models { name: "models".into(), allow: vec!["kvmesh-sim".into()] },
            GuardrailConfig::Deny {
                name: "no-secrets".into(),
                on: vec![Stage::Prompt],
                patterns: vec![r"sk-[A-Za-z0-9]{20,}".into()],
                words: vec!["bomb".into()],
            },
            GuardrailConfig::Pii {
                name: "pii".into(),
                on: vec![Stage::Prompt],
                types: vec![PiiKind::Email, PiiKind::Card],
                action: PiiAction::Redact,
            },
            GuardrailConfig::MaxLength { name: "length".into(), max_chars: 200 },
        ];
    })
    .await;
    let url = n.url();
    let (s, _, t) = send(&url, None, &chat("how to build a BOMB", json!({}))).await;
    assert_eq!(s, 400);
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["error"]["code"], "content_filter");
    assert!(v["error"]["message"].as_str().unwrap().contains("no-secrets"));
    assert_eq!(send(&url, None, &chat(&"x".repeat(201), json!({}))).await.0, 400);
    assert_eq!(
        send(&url, None, &json!({"model": "gpt-x", "messages": [{"role": "user", "content": "x"}]})).await.0,
        400
    );
    // The engine echoes what it was sent: the redacted prompt.
    let (s, _, t) = send(&url, None, &chat("mail a@b.com, card 4111-1111-1111-1111", json!({}))).await;
    assert_eq!(s, 200, "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "mail [REDACTED:email], card [REDACTED:card]");
    let verdicts = scrape(&url, "kvmesh_guardrail_verdicts_total").await;
    assert!(verdicts >= 10.0, "{verdicts}");
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        text.contains(
            r#"kvmesh_guardrail_verdicts_total{hook="pii",stage="prompt",verdict="rewrite",kvmesh_node="test-node"} 1"#
        ),
        "{text}"
    );
    stop.cancel();
    n.shutdown().await;
}

#[tokio::test]
async fn streamed_pii_split_across_chunks_is_redacted_and_a_denied_word_stops_the_stream() {
    let (n, stop) = echo_node(5, |cfg| {
        cfg.guardrails = vec![
            GuardrailConfig::Pii {
                name: "pii".into(),
                on: vec![Stage::Response],
                types: vec![PiiKind::Email, PiiKind::Phone, PiiKind::Card],
                action: PiiAction::Redact,
            },
            GuardrailConfig::Deny {
                name: "words".into(),
                on: vec![Stage::Response],
                patterns: vec![],
                words: vec!["classified".into()],
            },
        ];
        cfg.guardrail_window_chars = 64;
    })
    .await;
    let url = n.url();
    let said =
        "Sure! Write to john.doe@example.com or call 555-867-5309 any time. ".to_owned() + &"More text. ".repeat(12);
    let (s, _, body) = send(&url, None, &chat(&said, json!({"stream": true}))).await;
    assert_eq!(s, 200);
    // The engine sent 5-character pieces: the email and the number each span several chunks.
    let (text, err) = stream_text(&body);
    assert!(err.is_none(), "{body}");
    assert_eq!(
        text,
        said.replace("john.doe@example.com", "[REDACTED:email]").replace("555-867-5309", "[REDACTED:phone]")
    );
    assert!(body.ends_with("data: [DONE]\n\n"));
    for leaked in ["john", "example.com", "867"] {
        assert!(!body.contains(leaked), "{leaked} leaked: {body}");
    }

    let said = "Here it is: the classified plan. ".to_owned() + &"Go on. ".repeat(20);
    let (s, _, body) = send(&url, None, &chat(&said, json!({"stream": true}))).await;
    assert_eq!(s, 200);
    let (text, err) = stream_text(&body);
    let err = err.expect("an error event ends the stream");
    assert_eq!(err["error"]["code"], "content_filter");
    assert!(!text.contains("classified") && !body.contains("Go on"), "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"));
    let m = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(m.contains(r#"hook="words",stage="response",verdict="deny",kvmesh_node="test-node"} 1"#), "{m}");
    stop.cancel();
    n.shutdown().await;
}

/// A webhook that answers after `delay` with `verdict`.
async fn webhook(delay: Duration, verdict: Value) -> (String, CancellationToken) {
    let app = Router::new().route(
        "/check",
        post(move |Json(req): Json<Value>| {
            let verdict = verdict.clone();
            async move {
                tokio::time::sleep(delay).await;
                let mut v = verdict;
                if v["verdict"] == "rewrite" {
                    let texts: Vec<Value> = req["texts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| json!(t.as_str().unwrap().to_uppercase()))
                        .collect();
                    v["texts"] = Value::Array(texts);
                }
                Json(v)
            }
        }),
    );
    let (addr, stop) = serve_app(app).await;
    (format!("http://{addr}/check"), stop)
}

fn hook(name: &str, url: &str, fail: FailMode, stages: &[Stage]) -> GuardrailConfig {
    GuardrailConfig::Webhook { name: name.into(), url: url.into(), on: stages.to_vec(), timeout_ms: 150, fail }
}

#[tokio::test]
async fn webhooks_time_out_open_or_closed_and_can_deny_or_rewrite() {
    let (slow, stop_slow) = webhook(Duration::from_secs(3), json!({"verdict": "allow"})).await;
    let (upper, stop_upper) = webhook(Duration::ZERO, json!({"verdict": "rewrite"})).await;
    let (deny, stop_deny) = webhook(Duration::ZERO, json!({"verdict": "deny", "reason": "policy 7"})).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");

    let a = audit.clone();
    let (s1, u1) = (slow.clone(), upper.clone());
    let (n, stop) = echo_node(4, move |cfg| {
        cfg.guardrails = vec![
            hook("slow-open", &s1, FailMode::Open, &[Stage::Prompt]),
            hook("upper", &u1, FailMode::Closed, &[Stage::Prompt]),
        ];
        cfg.audit = AuditConfig { path: Some(a), ..Default::default() };
    })
    .await;
    let t = std::time::Instant::now();
    let (s, _, body) = send(&n.url(), None, &chat("quiet words", json!({}))).await;
    assert_eq!(s, 200, "fail-open lets the request through: {body}");
    assert!(t.elapsed() < Duration::from_secs(2), "the timeout bounds the wait");
    // The rewrite webhook ran after the failed one, and the engine got its rewrite.
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["message"]["content"], "QUIET WORDS");
    stop.cancel();
    n.shutdown().await;
    let rec = audit_lines(&audit).pop().unwrap();
    let verdicts: Vec<(&str, &str)> = rec["guardrails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["hook"].as_str().unwrap(), v["verdict"].as_str().unwrap()))
        .collect();
    assert_eq!(verdicts, vec![("slow-open", "error_open"), ("upper", "rewrite")]);

    let s2 = slow.clone();
    let (n, stop) =
        echo_node(4, move |cfg| cfg.guardrails = vec![hook("slow-closed", &s2, FailMode::Closed, &[Stage::Prompt])])
            .await;
    let (s, _, body) = send(&n.url(), None, &chat("anything", json!({}))).await;
    assert_eq!(s, 400, "fail-closed refuses: {body}");
    assert!(body.contains("slow-closed"));
    assert_eq!(scrape(&n.url(), "kvmesh_guardrail_verdicts_total").await, 1.0);
    stop.cancel();
    n.shutdown().await;

    // A deny on the answer of a stream: the text went out, so the end is an error event.
    let d3 = deny.clone();
    let (n, stop) =
        echo_node(4, move |cfg| cfg.guardrails = vec![hook("judge", &d3, FailMode::Closed, &[Stage::Response])]).await;
    let (s, _, body) = send(&n.url(), None, &chat("some answer", json!({"stream": true}))).await;
    assert_eq!(s, 200);
    let (text, err) = stream_text(&body);
    assert_eq!(text, "some answer");
    assert!(err.unwrap()["error"]["message"].as_str().unwrap().contains("judge"));
    let (s, _, body) = send(&n.url(), None, &chat("some answer", json!({}))).await;
    assert_eq!(s, 400, "{body}");
    stop.cancel();
    n.shutdown().await;
    stop_slow.cancel();
    stop_upper.cancel();
    stop_deny.cancel();
}

#[tokio::test]
async fn audit_trail_records_every_request_and_verify_catches_edits_and_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit").join("audit.jsonl");
    let p = path.clone();
    let (n, stop) = echo_node(6, move |cfg| {
        cfg.auth.keys = vec![key("acme", "sk-acme", &[], false)];
        cfg.limits.default = LimitSpec { requests_per_minute: Some(4), ..Default::default() };
        cfg.guardrails = vec![GuardrailConfig::Pii {
            name: "pii".into(),
            on: vec![Stage::Response],
            types: vec![PiiKind::Email],
            action: PiiAction::Redact,
        }];
        cfg.audit = AuditConfig { path: Some(p), record_text: true, ..Default::default() };
    })
    .await;
    let url = n.url();
    assert_eq!(send(&url, Some("sk-acme"), &chat("write to a@b.com", json!({}))).await.0, 200);
    assert_eq!(send(&url, Some("sk-acme"), &chat("streamed c@d.org", json!({"stream": true}))).await.0, 200);
    assert_eq!(send(&url, Some("nope"), &chat("x", json!({}))).await.0, 401);
    assert_eq!(send(&url, Some("sk-acme"), &chat("x", json!({}))).await.0, 200);
    assert_eq!(send(&url, Some("sk-acme"), &chat("x", json!({}))).await.0, 200);
    assert_eq!(send(&url, Some("sk-acme"), &chat("x", json!({}))).await.0, 429);
    // Each answer completed only after its record was written: the file has all six now.
    let recs = audit_lines(&path);
    assert_eq!(recs.len(), 6);
    assert_eq!(scrape(&url, "kvmesh_audit_records_written_total").await, 6.0);
    stop.cancel();
    n.shutdown().await;

    let statuses: Vec<u64> = recs.iter().map(|r| r["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, vec![200, 200, 401, 200, 200, 429]);
    let first = &recs[0];
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["model"], "kvmesh-sim");
    assert_eq!(first["served_by"], "test-node/engine-0");
    assert!(first["route"].as_str().unwrap().contains("engine=test-node/engine-0"));
    assert_eq!(first["completion_tokens"], 7);
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0);
    // Recorded text is redacted, whatever the rules say about prompts.
    assert_eq!(first["prompt"], "write to [REDACTED:email]");
    assert_eq!(first["response"], "write to [REDACTED:email]");
    assert_eq!(recs[1]["stream"], true);
    assert_eq!(recs[1]["response"], "streamed [REDACTED:email]");
    assert_eq!(recs[1]["guardrails"][0]["verdict"], "rewrite");
    assert!(recs[2]["tenant"].is_null());
    assert_eq!(recs[5]["outcome"], "rejected");

    let kvmesh = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvmesh")).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let file = path.to_str().unwrap();
    let (code, out) = kvmesh(&["audit", "verify", file]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("OK: 6 records"), "{out}");

    let original = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    // One edited line: a status changed by hand.
    let edited: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| if i == 3 { l.replace("\"status\":200", "\"status\":201") } else { l.to_string() })
        .collect();
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    let (code, out) = kvmesh(&["audit", "verify", file]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("line 4") && out.contains("edited"), "{out}");
    // One deleted line.
    let deleted: Vec<&str> = lines.iter().enumerate().filter(|(i, _)| *i != 2).map(|(_, l)| *l).collect();
    std::fs::write(&path, deleted.join("\n") + "\n").unwrap();
    let (code, out) = kvmesh(&["audit", "verify", file]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("line 3") && out.contains("deleted"), "{out}");
}

/// An audit write that fails (a full disk, injected) withholds the answer it would have
/// recorded, whole (503 `audit_unavailable`) or streamed (an error event, no `[DONE]`), and the
/// file still verifies afterwards, a gap record marking what was lost; every answer a client
/// received is on record.
#[tokio::test]
async fn a_failed_audit_write_withholds_the_answer_and_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let a = audit.clone();
    let (n, stop) = echo_node(4, move |cfg| {
        cfg.audit = AuditConfig { path: Some(a), ..Default::default() };
    })
    .await;
    let (s, _, _) = send(&n.url(), None, &chat("first", json!({}))).await;
    assert_eq!(s, 200);
    n.fail_audit_writes(1);
    let (s, _, body) = send(&n.url(), None, &chat("lost", json!({}))).await;
    assert_eq!(s, 503, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], "audit_unavailable");
    n.fail_audit_writes(1);
    let (s, _, body) = send(&n.url(), None, &chat("lost stream", json!({"stream": true}))).await;
    assert_eq!(s, 200);
    assert!(body.contains("audit_unavailable") && !body.contains("[DONE]"), "{body}");
    let (s, _, _) = send(&n.url(), None, &chat("last", json!({}))).await;
    assert_eq!(s, 200);
    stop.cancel();
    n.shutdown().await;
    let rep = kvmesh_node::audit::verify(std::slice::from_ref(&audit)).expect("the chain verifies");
    assert_eq!((rep.requests, rep.dropped), (2, 2), "{rep:?}");
    let ids: Vec<String> =
        audit_lines(&audit).iter().filter_map(|r| r["request_id"].as_str().map(str::to_owned)).collect();
    assert_eq!(ids.len(), 2, "the two answers clients received, and only those: {ids:?}");
}

/// With keys, a request without a valid one is refused from its headers: the node answers 401
/// without waiting for (or buffering) the 30 MB body it announced, and records the refusal.
#[tokio::test]
async fn an_unauthenticated_body_is_refused_before_it_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (n, stop) = echo_node(4, |cfg| {
        cfg.auth.keys = vec![key("acme", "sk-acme", &[], false)];
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(n.http_addr).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 31457280\r\n\r\n{\"model\":";
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let k = tcp.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..k]);
            if k == 0 || String::from_utf8_lossy(&answer).contains("invalid_api_key") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "answered without the body: {}", String::from_utf8_lossy(&answer));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    // A keyed client is served as before.
    let (s, _, _) = send(&n.url(), Some("sk-acme"), &chat("hello", json!({}))).await;
    assert_eq!(s, 200);
    stop.cancel();
    n.shutdown().await;
}

/// A stream whose client did not ask for usage is still charged its completion tokens: the node
/// asks the engine for the usage chunk and keeps it from the client.
#[tokio::test]
async fn streams_without_include_usage_are_charged_and_see_no_usage_chunk() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    cfg.limits.default = LimitSpec { tokens_per_minute: Some(400), ..Default::default() };
    let n = node(cfg).await;
    let url = n.url();
    let body = chat("a short question", json!({"max_tokens": 200, "ignore_eos": true, "stream": true}));
    // Each stream costs ~210 tokens (its prompt and 200 completion tokens): after two, the 400
    // tokens a minute are spent and a third is refused. Counting prompts alone, it would pass.
    for i in 0..2 {
        let (s, _, text) = send(&url, None, &body).await;
        assert_eq!(s, 200, "stream {i}: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(!text.contains("\"usage\""), "the client did not ask for usage: {text}");
    }
    let (s, _, text) = send(&url, None, &body).await;
    assert_eq!(s, 429, "{text}");
    n.shutdown().await;
}

/// Prompt rules read every string the engine renders (a message's `name`, a tool's
/// description), a token-id prompt they cannot read is refused; answer rules read reasoning and
/// tool-call arguments as well as content, and log-probabilities (which would spell out what
/// they redact) are refused.
#[tokio::test]
async fn guardrails_read_every_rendered_and_returned_field() {
    // An engine whose answer carries an email in its reasoning and in a tool call's arguments.
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "" }))
        .route("/v1/models", get(|| async { Json(json!({"object":"list","data":[{"id":"kvmesh-sim","object":"model"}]})) }))
        .route(
            "/v1/chat/completions",
            post(|| async {
                Json(json!({"id": "x", "object": "chat.completion", "model": "kvmesh-sim", "choices": [{"index": 0,
                    "message": {"role": "assistant", "content": null, "reasoning_content": "mail bob@example.com",
                                "tool_calls": [{"id": "c", "type": "function",
                                                "function": {"name": "send", "arguments": "{\"to\": \"bob@example.com\"}"}}]},
                    "finish_reason": "tool_calls"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}))
            }),
        )
        .route("/v1/completions", post(|| async { Json(json!({"choices": [{"index": 0, "text": "ok"}]})) }));
    let (addr, stop) = serve_app(app).await;
    let mut cfg = node_config(vec![entry(format!("http://{addr}"))]);
    cfg.guardrails = vec![
        GuardrailConfig::Deny {
            name: "no-secrets".into(),
            on: vec![Stage::Prompt],
            patterns: vec![],
            words: vec!["classified".into()],
        },
        GuardrailConfig::Pii {
            name: "pii".into(),
            on: vec![Stage::Response],
            types: vec![PiiKind::Email],
            action: PiiAction::Redact,
        },
    ];
    let n = node(cfg).await;
    let url = n.url();
    for (where_, body) in [
        (
            "a message's name",
            json!({"model": "kvmesh-sim", "messages": [{"role": "user", "name": "classified", "content": "hi"}]}),
        ),
        (
            "a tool's description",
            json!({"model": "kvmesh-sim", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f", "description": "classified plans", "parameters": {}}}]}),
        ),
    ] {
        let (s, _, t) = send(&url, None, &body).await;
        assert_eq!(s, 400, "{where_}: {t}");
        assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["error"]["code"], "content_filter", "{where_}");
    }
    let (s, _, t) = post_raw(
        &url,
        "/v1/completions",
        serde_json::to_vec(&json!({"model": "kvmesh-sim", "prompt": [1, 2, 3]})).unwrap(),
    )
    .await;
    assert_eq!(s, 400, "a token-id prompt the rules cannot read: {t}");
    let (s, _, t) = send(&url, None, &chat("hi", json!({"logprobs": true}))).await;
    assert_eq!(s, 400, "{t}");
    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["error"]["param"], "logprobs");
    // The answer's reasoning and tool-call arguments are redacted like its content.
    let (s, _, t) = send(&url, None, &chat("hi", json!({}))).await;
    assert_eq!(s, 200, "{t}");
    assert!(!t.contains("bob@example.com"), "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert!(v["choices"][0]["message"]["reasoning_content"].as_str().unwrap().contains("[REDACTED"), "{v}");
    assert!(v["choices"][0]["message"]["content"].is_null(), "a null content stays null: {v}");
    stop.cancel();
    n.shutdown().await;
}

/// The other APIs a node serves have no side door: prompt rules read Responses `instructions`
/// and `input`, Messages `system` and tool inputs, embedding inputs; answer rules redact a
/// Responses answer's output text and function-call arguments and a Messages answer's text and
/// tool inputs; streams of those APIs, which are relayed unscanned, are refused while answer
/// rules read text, and so are Responses log-probabilities.
#[tokio::test]
async fn guardrails_cover_responses_messages_and_embeddings() {
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "" }))
        .route("/v1/models", get(|| async { Json(json!({"object":"list","data":[{"id":"kvmesh-sim","object":"model"}]})) }))
        .route(
            "/v1/responses",
            post(|| async {
                Json(json!({"id": "resp_x", "object": "response", "status": "completed", "output": [
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "write to bob@example.com", "annotations": []}]},
                    {"type": "function_call", "name": "send", "call_id": "c", "arguments": "{\"to\": \"bob@example.com\"}"}],
                    "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}))
            }),
        )
        .route(
            "/v1/messages",
            post(|| async {
                Json(json!({"id": "m", "type": "message", "role": "assistant", "model": "kvmesh-sim", "content": [
                    {"type": "text", "text": "bob@example.com it is"},
                    {"type": "tool_use", "id": "t", "name": "send", "input": {"to": ["bob@example.com"]}}],
                    "stop_reason": "end_turn", "usage": {"input_tokens": 5, "output_tokens": 7}}))
            }),
        )
        .route("/v1/embeddings", post(|| async { Json(json!({"object": "list", "data": []})) }));
    let (addr, stop) = serve_app(app).await;
    let mut cfg = node_config(vec![entry(format!("http://{addr}"))]);
    cfg.guardrails = vec![
        GuardrailConfig::Deny {
            name: "no-secrets".into(),
            on: vec![Stage::Prompt],
            patterns: vec![],
            words: vec!["classified".into()],
        },
        GuardrailConfig::Pii {
            name: "pii".into(),
            on: vec![Stage::Response],
            types: vec![PiiKind::Email],
            action: PiiAction::Redact,
        },
    ];
    let n = node(cfg).await;
    let url = n.url();
    let post_json = |path: &'static str, body: Value| {
        let url = url.clone();
        async move { post_raw(&url, path, serde_json::to_vec(&body).unwrap()).await }
    };
    for (path, body) in [
        ("/v1/responses", json!({"model": "kvmesh-sim", "instructions": "classified", "input": "hi"})),
        (
            "/v1/responses",
            json!({"model": "kvmesh-sim", "input": [{"role": "user", "content": [{"type": "input_text", "text": "a classified plan"}]}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "kvmesh-sim", "max_tokens": 4, "system": [{"type": "text", "text": "classified"}], "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "kvmesh-sim", "max_tokens": 4, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": "classified"}}]}]}),
        ),
        ("/v1/embeddings", json!({"model": "kvmesh-sim", "input": ["fine", "classified"]})),
    ] {
        let (s, _, t) = post_json(path, body).await;
        assert_eq!(s, 400, "{path}: {t}");
        assert!(t.contains("no-secrets"), "{path}: {t}");
    }
    let (s, _, t) = post_json("/v1/responses", json!({"model": "kvmesh-sim", "input": "hi"})).await;
    assert_eq!(s, 200, "{t}");
    assert!(!t.contains("bob@example.com"), "Responses output and function arguments are redacted: {t}");
    let (s, _, t) = post_json(
        "/v1/messages",
        json!({"model": "kvmesh-sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert!(!t.contains("bob@example.com"), "Messages text and tool inputs are redacted: {t}");
    for (path, body) in [
        ("/v1/responses", json!({"model": "kvmesh-sim", "input": "hi", "stream": true})),
        (
            "/v1/messages",
            json!({"model": "kvmesh-sim", "max_tokens": 4, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        ),
        ("/v1/responses", json!({"model": "kvmesh-sim", "input": "hi", "include": ["message.output_text.logprobs"]})),
    ] {
        let (s, _, t) = post_json(path, body).await;
        assert_eq!(s, 400, "{path}: {t}");
    }
    stop.cancel();
    n.shutdown().await;
}

/// Answer rules read a streamed answer's reasoning and tool-call arguments as they flow, not only
/// its content: an address split across chunks of either is redacted before the client sees
/// it.
#[tokio::test]
async fn streamed_reasoning_and_tool_arguments_are_scanned() {
    let app = Router::new()
        .route("/health", get(|| async { "" }))
        .route("/metrics", get(|| async { "" }))
        .route("/v1/models", get(|| async { Json(json!({"object":"list","data":[{"id":"kvmesh-sim","object":"model"}]})) }))
        .route(
            "/v1/chat/completions",
            post(|| async {
                let mut events = vec![
                    chunk_event(json!({"role": "assistant", "reasoning_content": "mail bob@exa"}), Value::Null),
                    chunk_event(json!({"reasoning_content": "mple.com now"}), Value::Null),
                    chunk_event(
                        json!({"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "send", "arguments": "{\"to\": \"al"}}]}),
                        Value::Null,
                    ),
                    chunk_event(json!({"tool_calls": [{"index": 0, "function": {"arguments": "ice@example.org\"}"}}]}), Value::Null),
                    chunk_event(json!({}), json!("tool_calls")),
                ];
                events.push("data: [DONE]\n\n".into());
                let s = futures::stream::iter(events).map(|e| Ok::<_, std::io::Error>(Bytes::from(e)));
                Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(s)).unwrap()
            }),
        );
    let (addr, stop) = serve_app(app).await;
    let mut cfg = node_config(vec![entry(format!("http://{addr}"))]);
    cfg.guardrails = vec![GuardrailConfig::Pii {
        name: "pii".into(),
        on: vec![Stage::Response],
        types: vec![PiiKind::Email],
        action: PiiAction::Redact,
    }];
    let n = node(cfg).await;
    let (s, _, body) = send(&n.url(), None, &chat("hi", json!({"stream": true}))).await;
    assert_eq!(s, 200, "{body}");
    assert!(!body.contains("example.com") && !body.contains("example.org"), "{body}");
    // What the client reads, put back together, still says everything else.
    let mut reasoning = String::new();
    let mut args = String::new();
    for ev in sse_data(&body) {
        let Ok(v) = serde_json::from_str::<Value>(&ev) else { continue };
        let d = &v["choices"][0]["delta"];
        reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
        args.push_str(d["tool_calls"][0]["function"]["arguments"].as_str().unwrap_or(""));
    }
    assert!(
        reasoning.starts_with("mail ") && reasoning.ends_with(" now") && reasoning.contains("[REDACTED"),
        "{reasoning}"
    );
    assert!(args.starts_with("{\"to\": \"") && args.contains("[REDACTED"), "{args}");
    stop.cancel();
    n.shutdown().await;
}

/// With keys: a stored response is its tenant's (another tenant's id is unknown to it), the
/// Anthropic clients' `x-api-key` is a key like a bearer token, and a key's `max_tokens` cap
/// does not shut it out of the endpoints that generate nothing.
#[tokio::test]
async fn stored_responses_are_their_tenants_and_every_api_takes_its_keys() {
    let e = engine(fast_engine(), false).await;
    let mut cfg = node_config(vec![entry(e.url())]);
    cfg.auth.keys = vec![key("acme", "sk-acme", &[], false), key("other", "sk-other", &[], false)];
    cfg.limits.default = LimitSpec { max_tokens: Some(64), ..Default::default() };
    let n = node(cfg).await;
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, key: &'static str, body: Option<Value>| {
        let rb = http.request(method, format!("{}{path}", n.url())).bearer_auth(key);
        let rb = match body {
            Some(b) => rb.json(&b),
            None => rb,
        };
        async move {
            let r = rb.send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.text().await.unwrap())
        }
    };
    let (s, t) = call(
        reqwest::Method::POST,
        "/v1/responses".into(),
        "sk-acme",
        Some(json!({"model": "kvmesh-sim", "input": "hello", "max_output_tokens": 4})),
    )
    .await;
    assert_eq!(s, 200, "{t}");
    let id = serde_json::from_str::<Value>(&t).unwrap()["id"].as_str().unwrap().to_owned();
    let (s, t) = call(reqwest::Method::GET, format!("/v1/responses/{id}"), "sk-acme", None).await;
    assert_eq!(s, 200, "the owner retrieves it: {t}");
    for (method, path, body) in [
        (reqwest::Method::GET, format!("/v1/responses/{id}"), None),
        (reqwest::Method::POST, format!("/v1/responses/{id}/cancel"), None),
        (
            reqwest::Method::POST,
            "/v1/responses".into(),
            Some(json!({"model": "kvmesh-sim", "input": "more", "previous_response_id": id, "max_output_tokens": 4})),
        ),
    ] {
        let (s, t) = call(method, path.clone(), "sk-other", body).await;
        assert_eq!(s, 404, "another tenant's response is unknown to it ({path}): {t}");
    }
    // Anthropic's clients send `x-api-key`.
    let body = json!({"model": "kvmesh-sim", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let r =
        http.post(format!("{}/v1/messages", n.url())).header("x-api-key", "sk-acme").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r =
        http.post(format!("{}/v1/messages", n.url())).header("x-api-key", "sk-wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // Endpoints that generate nothing need no max_tokens under a cap.
    for (path, body) in [
        ("/v1/embeddings", json!({"model": "kvmesh-sim", "input": "x"})),
        ("/tokenize", json!({"model": "kvmesh-sim", "prompt": "x"})),
        ("/v1/rerank", json!({"model": "kvmesh-sim", "query": "q", "documents": ["d"]})),
    ] {
        let (s, t) = call(reqwest::Method::POST, path.into(), "sk-acme", Some(body)).await;
        assert_eq!(s, 200, "{path}: {t}");
    }
    n.shutdown().await;
}
