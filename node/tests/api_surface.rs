//! Every vLLM endpoint through a meshed node, compared with the same request sent to an engine
//! simulator directly (the simulator's shapes are checked against vLLM's source in
//! `sim/tests/api_surface.rs`): the same status, and a body of the same shape (the same keys,
//! recursively, with values of the same JSON types; `null` matches anything). The table in
//! `docs/api.md` names the case of each row here.

mod common;

use std::time::Duration;

use common::*;
use kvmesh_node::RunningNode;
use kvmesh_sim::RunningEngine;
use serde_json::{json, Value};

const MODEL: &str = "kvmesh-sim";

/// The shape of a JSON value: objects by key, arrays by their first element, scalars by type.
fn compatible(a: &Value, b: &Value, path: &str) -> Result<(), String> {
    match (a, b) {
        (Value::Null, _) | (_, Value::Null) => Ok(()),
        (Value::Object(x), Value::Object(y)) => {
            let (kx, ky): (Vec<_>, Vec<_>) = (x.keys().collect(), y.keys().collect());
            if kx != ky {
                return Err(format!("{path}: keys {kx:?} vs {ky:?}"));
            }
            x.iter().try_for_each(|(k, v)| compatible(v, &y[k], &format!("{path}/{k}")))
        }
        (Value::Array(x), Value::Array(y)) => match (x.first(), y.first()) {
            (Some(p), Some(q)) => compatible(p, q, &format!("{path}/0")),
            _ => Ok(()),
        },
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_)) => Ok(()),
        _ => Err(format!("{path}: {a} vs {b}")),
    }
}

/// A request as sent, to a node and to an engine alike.
#[derive(Clone)]
struct Case {
    name: &'static str,
    path: String,
    body: Option<Body>,
}

#[derive(Clone)]
enum Body {
    Json(Value),
    Form(&'static str, Vec<u8>),
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

async fn send(base: &str, c: &Case) -> Answer {
    let http = reqwest::Client::new();
    let url = format!("{base}{}", c.path);
    let rb = match &c.body {
        None => http.get(url),
        Some(Body::Json(v)) if c.path.ends_with("/cancel") && v.is_null() => http.post(url),
        Some(Body::Json(v)) => http.post(url).json(v),
        Some(Body::Form(ct, bytes)) => http.post(url).header("content-type", *ct).body(bytes.clone()),
    };
    let r = tokio::time::timeout(Duration::from_secs(20), rb.send()).await.expect("answer in time").unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Answer { status, headers, text: r.text().await.unwrap() }
}

/// An SSE body as its events' shapes, in order: the `event:` name and the data's shape.
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let name = b.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
            let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("");
            (name, serde_json::from_str(data).unwrap_or(Value::String(data.to_owned())))
        })
        .collect()
}

fn same_shape(c: &Case, via_node: &Answer, direct: &Answer) {
    assert_eq!(via_node.status, direct.status, "{}: node {} vs engine {}", c.name, via_node.text, direct.text);
    let sse = |a: &Answer| {
        a.headers.get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"))
    };
    assert_eq!(sse(via_node), sse(direct), "{}", c.name);
    if sse(direct) {
        let (a, b) = (events(&via_node.text), events(&direct.text));
        let names = |e: &[(String, Value)]| {
            let mut n: Vec<String> = e.iter().map(|(n, _)| n.clone()).collect();
            n.dedup();
            n
        };
        assert_eq!(names(&a), names(&b), "{}: event order", c.name);
        for ((na, da), (_, db)) in a.iter().zip(&b) {
            if let Err(e) = compatible(da, db, "") {
                panic!("{} event {na}: {e}", c.name);
            }
        }
        return;
    }
    let parse = |a: &Answer| {
        serde_json::from_str::<Value>(&a.text).unwrap_or_else(|_| panic!("{}: not JSON: {}", c.name, a.text))
    };
    if let Err(e) = compatible(&parse(via_node), &parse(direct), "") {
        panic!("{}: {e}\nnode: {}\nengine: {}", c.name, via_node.text, direct.text);
    }
}

fn json_case(name: &'static str, path: &str, body: Value) -> Case {
    Case { name, path: path.into(), body: Some(Body::Json(body)) }
}

fn audio_form(with_model: bool) -> (&'static str, Vec<u8>) {
    let mut b = String::from("--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF0000WAVE\r\n");
    if with_model {
        b.push_str(&format!("--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"));
    }
    b.push_str("--b0undary--\r\n");
    ("multipart/form-data; boundary=b0undary", b.into_bytes())
}

/// Every endpoint with a body vLLM answers 200 (or, for audio on a text model, its 400).
fn cases() -> Vec<Case> {
    let msgs = json!([{"role": "user", "content": "Tell me about the mesh"}]);
    let mut v = vec![
        json_case("chat", "/v1/chat/completions", json!({"model": MODEL, "messages": msgs, "max_tokens": 4})),
        json_case(
            "chat, streamed",
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": msgs, "max_tokens": 4, "stream": true}),
        ),
        json_case("completions", "/v1/completions", json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 4})),
        json_case(
            "completions, streamed",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon", "max_tokens": 4, "stream": true}),
        ),
        json_case(
            "responses",
            "/v1/responses",
            json!({"model": MODEL, "instructions": "be brief", "input": "Hello there", "max_output_tokens": 4}),
        ),
        json_case(
            "responses, streamed",
            "/v1/responses",
            json!({"model": MODEL, "input": "Hello there", "max_output_tokens": 4, "stream": true}),
        ),
        json_case(
            "messages",
            "/v1/messages",
            json!({"model": MODEL, "system": "sys", "messages": msgs, "max_tokens": 4}),
        ),
        json_case(
            "messages, streamed",
            "/v1/messages",
            json!({"model": MODEL, "messages": msgs, "max_tokens": 4, "stream": true}),
        ),
        json_case("messages count_tokens", "/v1/messages/count_tokens", json!({"model": MODEL, "messages": msgs})),
        json_case("embeddings", "/v1/embeddings", json!({"model": MODEL, "input": ["a b c", "d e"]})),
        json_case("pooling", "/pooling", json!({"model": MODEL, "input": "pool me"})),
        json_case("classify", "/classify", json!({"model": MODEL, "input": ["good", "bad"]})),
        json_case("score", "/score", json!({"model": MODEL, "text_1": "q", "text_2": ["q a", "b"]})),
        json_case("score v1", "/v1/score", json!({"model": MODEL, "text_1": "q", "text_2": "q a"})),
        json_case("rerank", "/rerank", json!({"model": MODEL, "query": "q", "documents": ["q a", "b"]})),
        json_case("rerank v1", "/v1/rerank", json!({"model": MODEL, "query": "q", "documents": ["q a"]})),
        json_case("rerank v2", "/v2/rerank", json!({"model": MODEL, "query": "q", "documents": ["q a"], "top_n": 1})),
        json_case("tokenize", "/tokenize", json!({"model": MODEL, "prompt": "hello world", "return_token_strs": true})),
        json_case("tokenize chat", "/tokenize", json!({"model": MODEL, "messages": msgs})),
        json_case("detokenize", "/detokenize", json!({"model": MODEL, "tokens": [10, 11, 12]})),
    ];
    let (ct, form) = audio_form(true);
    v.push(Case {
        name: "transcriptions",
        path: "/v1/audio/transcriptions".into(),
        body: Some(Body::Form(ct, form.clone())),
    });
    v.push(Case { name: "translations", path: "/v1/audio/translations".into(), body: Some(Body::Form(ct, form)) });
    v
}

/// Bad input on every endpoint: the status the engine gives, and an error in the API's shape
/// (Anthropic's for Messages).
fn bad_cases() -> Vec<(Case, u16)> {
    let mut v: Vec<(Case, u16)> = cases()
        .into_iter()
        .filter_map(|mut c| match &mut c.body {
            Some(Body::Json(b)) => {
                b["model"] = json!("no-such-model");
                Some((c, 404))
            }
            _ => None,
        })
        .collect();
    v.push((
        Case {
            name: "not JSON",
            path: "/v1/embeddings".into(),
            body: Some(Body::Form("application/json", b"{nope".to_vec())),
        },
        400,
    ));
    v.push((
        Case {
            name: "messages without max_tokens",
            path: "/v1/messages".into(),
            body: Some(Body::Json(json!({"model": MODEL, "messages": []}))),
        },
        400,
    ));
    let (ct, _) = audio_form(false);
    v.push((
        Case {
            name: "audio without a file",
            path: "/v1/audio/transcriptions".into(),
            body: Some(Body::Form(
                ct,
                format!(
                    "--b0undary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n--b0undary--\r\n"
                )
                .into_bytes(),
            )),
        },
        400,
    ));
    v
}

/// Three nodes with two engine simulators each, meshed.
async fn mesh() -> (tempfile::TempDir, Vec<RunningNode>, Vec<RunningEngine>) {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "surface").unwrap();
    let mut engines = Vec::new();
    let mut nodes: Vec<RunningNode> = Vec::new();
    for name in ["a", "b", "c"] {
        let seed = nodes.first().and_then(|n| n.mesh.as_ref()).map(|m| m.advertise.to_string());
        let mut cfg = mesh_config(dir.path(), "surface", name, seed);
        let (e0, e1) = (engine(fast_engine(), true).await, engine(fast_engine(), true).await);
        cfg.engines = vec![kv_entry("e0", &e0), kv_entry("e1", &e1)];
        engines.extend([e0, e1]);
        nodes.push(node(cfg).await);
    }
    let peers = |n: &RunningNode| n.mesh.as_ref().unwrap().peers().len();
    eventually("the three nodes see each other", Duration::from_secs(15), async || nodes.iter().all(|n| peers(n) == 3))
        .await;
    (dir, nodes, engines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_vllm_endpoint_answers_through_a_node_as_the_engine_does() {
    let (_dir, nodes, engines) = mesh().await;
    let (a, direct) = (nodes[0].url(), engines[0].url());
    for c in cases() {
        let via = send(&a, &c).await;
        let eng = send(&direct, &c).await;
        same_shape(&c, &via, &eng);
        if via.status == 200 {
            assert!(via.headers.contains_key("x-kvmesh-served-by"), "{}: routed through the mesh", c.name);
        }
    }
    for (c, status) in bad_cases() {
        let via = send(&a, &c).await;
        assert_eq!(via.status, status, "{}: {}", c.name, via.text);
        let eng = send(&direct, &c).await;
        assert_eq!(via.status, eng.status, "{}: the engine's own status: {}", c.name, eng.text);
        let v: Value = serde_json::from_str(&via.text).unwrap_or_else(|_| panic!("{}: {}", c.name, via.text));
        if c.path.starts_with("/v1/messages") {
            assert_eq!(v["type"], "error", "{}: Anthropic's shape: {v}", c.name);
            assert!(v["error"]["type"].is_string() && v["error"]["message"].is_string(), "{v}");
        } else {
            assert_openai_error(&v);
        }
    }
    // /version in vLLM's shape.
    let version = Case { name: "version", path: "/version".into(), body: None };
    same_shape(&version, &send(&a, &version).await, &send(&direct, &version).await);
    // Unknown paths: OpenAI's 404.
    let r = send(&a, &json_case("unknown", "/v1/nope", json!({}))).await;
    assert_eq!(r.status, 404);
    assert_openai_error(&serde_json::from_str(&r.text).unwrap());

    // /v1/models keeps every field vLLM's cards have, and names the nodes serving each.
    let (sm, nm) = (
        send(&direct, &Case { name: "models", path: "/v1/models".into(), body: None }).await,
        send(&a, &Case { name: "models", path: "/v1/models".into(), body: None }).await,
    );
    let (sm, nm): (Value, Value) = (serde_json::from_str(&sm.text).unwrap(), serde_json::from_str(&nm.text).unwrap());
    let card = nm["data"].as_array().unwrap().iter().find(|c| c["id"] == MODEL).expect("the model is listed").clone();
    for (k, v) in sm["data"][0].as_object().unwrap() {
        assert!(card.get(k).is_some(), "/v1/models lost `{k}`: {card}");
        if k == "max_model_len" || k == "root" {
            assert_eq!(&card[k], v, "{k}");
        }
    }
    let mut served_by: Vec<&str> = card["kvmesh_nodes"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    served_by.sort();
    assert_eq!(served_by, ["a", "b", "c"]);
    for n in nodes {
        n.shutdown().await;
    }
}

/// vLLM keeps a stored response in the engine that made it: a follow-up, a retrieval and a
/// cancel reach that engine from any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_reached_from_every_node() {
    let (_dir, nodes, _engines) = mesh().await;
    let first = send(
        &nodes[0].url(),
        &json_case(
            "create",
            "/v1/responses",
            json!({"model": MODEL, "input": "Remember the number 7.", "max_output_tokens": 4}),
        ),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.text);
    let home = first.headers["x-kvmesh-served-by"].to_str().unwrap().to_owned();
    let v: Value = serde_json::from_str(&first.text).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    for (i, n) in nodes.iter().enumerate() {
        // A follow-up continues the stored conversation, on the engine that stored it.
        let follow =
            json!({"model": MODEL, "input": "Which number?", "previous_response_id": id, "max_output_tokens": 4});
        let r = send(&n.url(), &json_case("follow-up", "/v1/responses", follow)).await;
        assert_eq!(r.status, 200, "node {i}: {}", r.text);
        assert_eq!(r.headers["x-kvmesh-served-by"], home.as_str(), "node {i}");
        let f: Value = serde_json::from_str(&r.text).unwrap();
        assert!(
            f["usage"]["input_tokens"].as_u64().unwrap() > v["usage"]["input_tokens"].as_u64().unwrap(),
            "the engine continued the stored conversation: {f}"
        );
        // Retrieval, from any node.
        let got = send(&n.url(), &Case { name: "retrieve", path: format!("/v1/responses/{id}"), body: None }).await;
        assert_eq!(got.status, 200, "node {i}: {}", got.text);
        assert_eq!(serde_json::from_str::<Value>(&got.text).unwrap()["id"], id.as_str());
        // Cancel of a finished (not background) response: the engine's own 400, not a 404 from
        // an engine that never saw it.
        let c = send(
            &n.url(),
            &Case { name: "cancel", path: format!("/v1/responses/{id}/cancel"), body: Some(Body::Json(Value::Null)) },
        )
        .await;
        assert_eq!(c.status, 400, "node {i}: {}", c.text);
    }
    // The same shapes as the engine's own retrieval and cancel of a response it stored.
    let direct = _engines[0].url();
    let made = send(
        &direct,
        &json_case("create", "/v1/responses", json!({"model": MODEL, "input": "Remember 7.", "max_output_tokens": 4})),
    )
    .await;
    let made_id = serde_json::from_str::<Value>(&made.text).unwrap()["id"].as_str().unwrap().to_owned();
    for (path, direct_path, body) in [
        (format!("/v1/responses/{id}"), format!("/v1/responses/{made_id}"), None),
        (
            format!("/v1/responses/{id}/cancel"),
            format!("/v1/responses/{made_id}/cancel"),
            Some(Body::Json(Value::Null)),
        ),
    ] {
        let c = Case { name: "stored", path, body: body.clone() };
        let d = Case { name: "stored", path: direct_path, body };
        same_shape(&c, &send(&nodes[1].url(), &c).await, &send(&direct, &d).await);
    }
    // An id no engine of this mesh made: a clear 404, from the node.
    for bad in ["resp_0123456789ab0123456789abcdef0123456789abcdef", "resp_short"] {
        let r =
            send(&nodes[1].url(), &Case { name: "unknown", path: format!("/v1/responses/{bad}"), body: None }).await;
        assert_eq!(r.status, 404, "{}", r.text);
        assert_openai_error(&serde_json::from_str(&r.text).unwrap());
        let follow = json!({"model": MODEL, "input": "x", "previous_response_id": bad});
        let r = send(&nodes[2].url(), &json_case("unknown follow-up", "/v1/responses", follow)).await;
        assert_eq!(r.status, 404, "{}", r.text);
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// A session prefers one engine while engines are near-equal: the same one from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stays_on_one_engine_from_every_node() {
    let (_dir, nodes, _engines) = mesh().await;
    for session in ["alice", "bob", "carol"] {
        let mut seen = std::collections::HashSet::new();
        for (i, n) in nodes.iter().cycle().take(6).enumerate() {
            // Different prompts: no cached prefix draws them anywhere.
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": format!("{session} question {i} {}", "z".repeat(i))}], "max_tokens": 2});
            let r = reqwest::Client::new()
                .post(format!("{}/v1/chat/completions", n.url()))
                .header("x-session-affinity", session)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            seen.insert(r.headers()["x-kvmesh-served-by"].to_str().unwrap().to_owned());
        }
        assert_eq!(seen.len(), 1, "session {session} went to {seen:?}");
    }
    for n in nodes {
        n.shutdown().await;
    }
}

/// The official `openai` and `anthropic` Python clients, unchanged, against two nodes of a
/// mesh (`tests/sdk_clients.py`): chat with tools, streaming, completions, a Responses
/// conversation started on one node and continued and retrieved on another, embeddings,
/// Messages (plain, streamed, with tools) and the errors the SDKs raise. Under `CI` the clients
/// must be installed (`.ci/run` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_and_anthropic_clients_work_across_the_mesh() {
    let has = std::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !has {
        assert!(std::env::var_os("CI").is_none(), "CI must install the openai and anthropic Python clients");
        eprintln!("SKIPPED: `pip install openai anthropic` to run the SDK checks");
        return;
    }
    let (_dir, nodes, _engines) = mesh().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_clients.py");
    let (a, b) = (nodes[0].url(), nodes[2].url());
    let out =
        tokio::task::spawn_blocking(move || std::process::Command::new("python3").args([script, &a, &b]).output())
            .await
            .unwrap()
            .unwrap();
    assert!(
        out.status.success(),
        "SDK checks failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for n in nodes {
        n.shutdown().await;
    }
}
