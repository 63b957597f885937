//! Guardrail rules from a file, reloaded without a restart: when the file changes, on
//! `POST /admin/reload` and on SIGHUP. A file that cannot be used keeps the rules in force and
//! says where it is wrong. (Its own test binary: it sends SIGHUP to this process.)

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use kvmesh_node::config::Config;
use kvmesh_node::RunningNode;
use kvmesh_policy::auth::{hash_key, KeyEntry};
use serde_json::{json, Value};

const ADMIN: &str = "sk-admin";

fn deny_file(path: &Path, words: &[&str]) {
    let words: Vec<String> = words.iter().map(|w| format!("\"{w}\"")).collect();
    let text = format!(
        "# prompt rules\n[[guardrails]]\nkind = \"deny\"\nname = \"words\"\non = [\"prompt\"]\nwords = [{}]\n",
        words.join(", ")
    );
    write_atomically(path, &text);
}

/// Replaces the file in one step, as config tools do, so a watcher never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn start(dir: &Path, reload_interval_ms: u64) -> (RunningNode, kvmesh_sim::RunningEngine) {
    let e = engine(fast_engine(), false).await;
    let mut cfg: Config = node_config(vec![entry(e.url())]);
    cfg.auth.keys = vec![KeyEntry {
        tenant: "ops".into(),
        key_sha256: hash_key(ADMIN),
        models: vec![],
        admin: true,
        share_cache: false,
        ..Default::default()
    }];
    cfg.guardrails_file = Some(dir.join("rules.toml"));
    cfg.guardrails_reload_interval_ms = reload_interval_ms;
    (node(cfg).await, e)
}

/// The status of a chat request whose prompt is `text`.
async fn status_of(n: &RunningNode, text: &str) -> u16 {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", n.url()))
        .bearer_auth(ADMIN)
        .json(&chat(text, json!({"max_tokens": 1})))
        .send()
        .await
        .unwrap();
    r.status().as_u16()
}

async fn admin_reload(n: &RunningNode, key: Option<&str>) -> (u16, Value) {
    let mut rb = reqwest::Client::new().post(format!("{}/admin/reload", n.url()));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    let r = rb.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvmesh-guard-reload-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn rules_file_changes_apply_and_a_bad_file_keeps_the_old_rules() {
    let dir = temp_dir("watch");
    let rules = dir.join("rules.toml");
    deny_file(&rules, &["forbidden"]);
    let (n, e) = start(&dir, 50).await;
    assert_eq!(status_of(&n, "a forbidden word").await, 400);
    assert_eq!(status_of(&n, "a banana").await, 200);

    // Changed on disk: picked up without a restart.
    deny_file(&rules, &["banana"]);
    eventually("the new rules apply", Duration::from_secs(5), async || status_of(&n, "a banana").await == 400).await;
    assert_eq!(status_of(&n, "a forbidden word").await, 200);

    // A broken file (a typo in a field name) is refused; the rules in force stay.
    write_atomically(&rules, "[[guardrails]]\nkind = \"deny\"\nname = \"words\"\nwrods = [\"cherry\"]\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_of(&n, "a banana").await, 400, "old rules kept");
    assert_eq!(status_of(&n, "a cherry").await, 200);
    let (s, v) = admin_reload(&n, Some(ADMIN)).await;
    assert_eq!(s, 400);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("guardrails kept") && msg.contains("rules.toml"), "{msg}");
    // TOML points at the entry's header for a field of a tagged table.
    assert!(msg.contains("line 1") && msg.contains("wrods"), "names the line and the field: {msg}");
    n.shutdown().await;
    e.shutdown().await;
}

#[tokio::test]
async fn admin_reload_and_sighup_reload_the_rules() {
    let dir = temp_dir("explicit");
    let rules = dir.join("rules.toml");
    deny_file(&rules, &["forbidden"]);
    // No watching within the test: only explicit reloads change the rules.
    let (n, e) = start(&dir, 3_600_000).await;
    assert_eq!(status_of(&n, "a forbidden word").await, 400);

    deny_file(&rules, &["banana"]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", n.url()))
        .bearer_auth(ADMIN)
        .json(&chat("a banana", json!({"max_tokens": 1})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "not reloaded yet: {}", r.text().await.unwrap());
    assert_eq!(admin_reload(&n, None).await.0, 401, "admin key required");
    let (s, v) = admin_reload(&n, Some(ADMIN)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({"keys": 1, "guardrails": 1}));
    assert_eq!(status_of(&n, "a banana").await, 400);

    // An entry that does not build (a bad regex) is named by its position and line.
    write_atomically(
        &rules,
        "[[guardrails]]\nkind = \"pii\"\nname = \"pii\"\n\n[[guardrails]]\nkind = \"deny\"\nname = \"re\"\npatterns = [\"(\"]\n",
    );
    let (s, v) = admin_reload(&n, Some(ADMIN)).await;
    assert_eq!(s, 400);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("entry 2") && msg.contains("line 5") && msg.contains("`re`"), "{msg}");
    assert_eq!(status_of(&n, "a banana").await, 400, "old rules kept");

    // SIGHUP reloads too.
    deny_file(&rules, &["cherry"]);
    let hup = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(hup.success());
    eventually("SIGHUP reloads the rules", Duration::from_secs(5), async || status_of(&n, "a cherry").await == 400)
        .await;
    assert_eq!(status_of(&n, "a banana").await, 200);
    n.shutdown().await;
    e.shutdown().await;
}
