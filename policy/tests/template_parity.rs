//! Chat-template parity against the reference: every template in `fixtures/templates/` and every
//! request in `fixtures/template-cases.json`, rendered by kvmesh and by
//! `scripts/chat-template-reference.py` (vLLM's request preprocessing on pydantic and OpenAI's
//! types, then Hugging Face transformers' renderer, then the `tokenizers` library), must give
//! the same outcome: the same text and the same token ids (from both of kvmesh's encoders), or
//! an error on both sides.
//!
//! The reference needs Python 3 with `transformers`, `jinja2`, `pydantic`, `openai` and
//! `tokenizers` (`.ci/run` installs them). Without them the test says so and passes, except
//! under `CI`, where it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvmesh_policy::prompt_encoder::{EncoderOptions, PromptEncoder};
use kvmesh_policy::request::{self, Endpoint};
use kvmesh_policy::tokenize::{ModelTokenizer, TokenizerFiles};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The reference's outcome per (template, case), or why it could not run.
fn reference(cases: &Path, templates: &Path, tokenizer: &Path) -> Result<BTreeMap<(String, String), Value>, String> {
    let script = root().join("scripts/chat-template-reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(cases)
        .arg(templates)
        .arg(tokenizer)
        .output()
        .map_err(|e| format!("python3 could not run: {e}"))?;
    if !out.status.success() {
        return Err(format!("the reference failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut rows = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with('{')) {
        let row: Value = serde_json::from_str(line).map_err(|e| format!("bad reference line {line}: {e}"))?;
        let key = (row["template"].as_str().unwrap_or("").to_owned(), row["case"].as_str().unwrap_or("").to_owned());
        rows.insert(key, row);
    }
    Ok(rows)
}

#[test]
fn chat_templates_render_as_vllm_renders_them() {
    let fixtures = root().join("policy/tests/fixtures");
    let cases_path = fixtures.join("template-cases.json");
    let templates = fixtures.join("templates");
    let tokenizer_json = root().join("policy/assets/tiny-chat/tokenizer.json");
    let spec: Value = serde_json::from_str(&std::fs::read_to_string(&cases_path).expect("cases")).expect("cases json");
    let want = match reference(&cases_path, &templates, &tokenizer_json) {
        Ok(rows) => rows,
        Err(why) if std::env::var_os("CI").is_some() => panic!("the chat-template reference must run in CI: {why}"),
        Err(why) => {
            eprintln!("SKIPPED: chat-template parity needs the Python reference ({why}); `.ci/run` installs it");
            return;
        }
    };
    // Per template: cases agreeing, differing (with why), and rendered (not refused) by both.
    let mut matrix: BTreeMap<String, (usize, usize, Vec<String>)> = BTreeMap::new();
    let mut rendered: BTreeMap<String, usize> = BTreeMap::new();
    let templates_spec = spec["templates"].as_object().expect("templates");
    for (name, special) in templates_spec {
        let files = TokenizerFiles {
            json: std::fs::read(&tokenizer_json).expect("tokenizer"),
            config: Some(serde_json::to_vec(special).expect("config")),
            chat_template: Some(std::fs::read_to_string(templates.join(name)).expect("template")),
            source: name.clone(),
        };
        let tokenizer = ModelTokenizer::from_files(&files).expect("template loads");
        let encoder = PromptEncoder::new(&files, &EncoderOptions::default()).expect("encoder");
        for case in spec["cases"].as_array().expect("cases") {
            let case_name = case["name"].as_str().expect("case name").to_owned();
            let mut body = case["request"].clone();
            body["model"] = Value::String("m".into());
            if body["tools"] == "$tools" {
                body["tools"] = spec["tools"].clone();
            }
            let reference = &want[&(name.clone(), case_name.clone())];
            let inputs = request::parse(Endpoint::Chat, body.to_string().as_bytes())
                .map(|r| r.chat.expect("chat inputs"))
                .map_err(|e| e.message);
            let ours = inputs.and_then(|i| tokenizer.render(&i).map_err(|e| e.to_string()).map(|t| (i, t)));
            let entry = matrix.entry(name.clone()).or_default();
            let verdict = match (&ours, reference.get("text")) {
                (Ok((inputs, text)), Some(Value::String(want_text))) if text == want_text => {
                    let want_ids: Vec<u32> = serde_json::from_value(reference["ids"].clone()).expect("ids");
                    let reference_ids = tokenizer.encode(text, false).expect("encode");
                    let fast_ids = encoder.encode_inputs(inputs).expect("fast encode").ids;
                    if reference_ids == want_ids && fast_ids == want_ids {
                        Ok("same text and ids")
                    } else {
                        Err(format!(
                            "same text, ids differ (tokenizers crate {}, fast encoder {})",
                            reference_ids == want_ids,
                            fast_ids == want_ids
                        ))
                    }
                }
                (Ok((_, text)), Some(Value::String(want_text))) => {
                    let at = text.chars().zip(want_text.chars()).take_while(|(a, b)| a == b).count();
                    let ours: String = text.chars().skip(at.saturating_sub(20)).take(80).collect();
                    let theirs: String = want_text.chars().skip(at.saturating_sub(20)).take(80).collect();
                    Err(format!("text differs at char {at}:\n  kvmesh:    {ours:?}\n  reference: {theirs:?}"))
                }
                (Err(_), None) => Ok("both refuse"),
                (Ok(_), None) => Err(format!("reference refused ({}) but kvmesh rendered", reference["error"])),
                (Err(e), Some(_)) => Err(format!("kvmesh refused ({e}) but the reference rendered")),
                (Ok(_), Some(other)) => Err(format!("bad reference row {other}")),
            };
            match verdict {
                Ok(v) => {
                    entry.0 += 1;
                    if v != "both refuse" {
                        *rendered.entry(name.clone()).or_default() += 1;
                    }
                }
                Err(why) => {
                    entry.1 += 1;
                    entry.2.push(format!("{case_name}: {why}"));
                }
            }
        }
    }
    let mut report = String::from("template parity (cases agreeing / differing; rendered by both):\n");
    for (name, (ok, bad, why)) in &matrix {
        let r = rendered.get(name).copied().unwrap_or(0);
        report.push_str(&format!("  {name}: {ok} / {bad}; {r} rendered\n"));
        for w in why {
            report.push_str(&format!("    {w}\n"));
        }
    }
    eprintln!("{report}");
    assert!(matrix.values().all(|(_, bad, _)| *bad == 0), "{report}");
    // Agreement on refusals alone would prove nothing: most cases must render on both sides.
    assert!(templates_spec.keys().all(|t| rendered.get(t).copied().unwrap_or(0) >= 8), "{report}");
}
