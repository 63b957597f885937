//! The alarm for silent misses (`router::check`): every answer's `usage` is compared with the
//! prompt length and cached tokens the node predicted. With the engine's own tokenizer and
//! template the two agree; with a template that renders differently from the engine's, the
//! mismatch is counted and `/v1/mesh/status` says the model's keys disagree.

mod common;

use common::*;
use kvmesh_node::config::ModelEntry;
use serde_json::{json, Value};

async fn status_of(url: &str, model: &str) -> Value {
    let v: Value = reqwest::get(format!("{url}/v1/mesh/status")).await.unwrap().json().await.unwrap();
    v["models"].as_array().unwrap().iter().find(|m| m["model"] == model).cloned().unwrap_or(Value::Null)
}

async fn send_some(url: &str) {
    for i in 0..3 {
        let (s, _, v) =
            post(url, &chat(&format!("question {i} about the same long shared context"), json!({"max_tokens": 2})))
                .await;
        assert_eq!(s, 200, "{v}");
    }
    // A stream that asks for usage is checked too.
    let body =
        chat("a streamed one", json!({"max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}}));
    let r = reqwest::Client::new().post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("\"usage\""), "{text}");
}

#[tokio::test]
async fn router_and_engine_agree_when_they_render_alike() {
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    let n = node(cfg).await;
    send_some(&n.url()).await;
    assert_eq!(scrape(&n.url(), "kvmesh_prompt_length_checks_total").await, 4.0);
    assert_eq!(scrape(&n.url(), "kvmesh_prompt_length_mismatches_total").await, 0.0);
    let s = status_of(&n.url(), "kvmesh-sim").await;
    assert_eq!(s["prefix_matching"], "exact", "{s}");
    assert_eq!(s["engine_agreement"]["checked"], 4, "{s}");
    n.shutdown().await;
}

#[tokio::test]
async fn a_template_the_engine_does_not_use_sets_off_the_alarm() {
    let dir = tempfile::tempdir().unwrap();
    // The engine renders ChatML; this node is told to render with a preamble the engine never
    // writes, as when a router's template is not the engine's.
    let template = dir.path().join("other.jinja");
    std::fs::write(
        &template,
        "PREAMBLE THE ENGINE NEVER SEES\n{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let mut cfg = node_config(vec![]);
    cfg.embedded = fast_engine();
    cfg.models.push(ModelEntry {
        name: "kvmesh-sim".into(),
        tokenizer: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy/assets/tiny-chat"),
        chat_template: Some(template),
        encoder: Default::default(),
        max_model_len: None,
    });
    let n = node(cfg).await;
    send_some(&n.url()).await;
    assert_eq!(scrape(&n.url(), "kvmesh_prompt_length_checks_total").await, 4.0);
    assert_eq!(scrape(&n.url(), "kvmesh_prompt_length_mismatches_total").await, 4.0);
    let s = status_of(&n.url(), "kvmesh-sim").await;
    assert_eq!(s["prefix_matching"], "exact_disagreeing", "{s}");
    assert_eq!(s["engine_agreement"]["length_mismatches"], 4, "{s}");
    n.shutdown().await;
}
