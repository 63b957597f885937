//! docs/configuration.md is checked against the `Config` type, so the reference cannot drift:
//! - every key path of `Config` (nested tables and array-of-table entries included) has a row,
//!   and every row names a real key;
//! - each row's default is the one `Config::default()` has;
//! - every `kvmesh serve` flag and its `KVMESH_*` variable appear in the reference;
//! - the node configs shipped for Docker Compose and Kubernetes load and validate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Args;
use kvmesh_node::config::{Config, EngineEntry, ModelEntry, ServeArgs};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn reference() -> String {
    std::fs::read_to_string(repo().join("docs/configuration.md")).expect("docs/configuration.md")
}

/// Key path (`a.b.c`, array-of-table entries as `engines.url`) to its default value.
fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    Value::Object(_) => walk(&path, v, out),
                    Value::Array(a) if a.first().is_some_and(Value::is_object) => walk(&path, &a[0], out),
                    _ => {
                        out.insert(path, v.clone());
                    }
                }
            }
        }
        _ => unreachable!("walk is called on tables"),
    }
}

/// Every key path with its default. `engines` and `models` default to empty lists; one sample
/// entry with every field set exposes their keys (their defaults are "required" or unset).
fn key_paths() -> BTreeMap<String, Value> {
    let mut cfg = Config::default();
    let mut out = BTreeMap::new();
    walk("", &serde_json::to_value(&cfg).unwrap(), &mut out);
    cfg.engines = vec![EngineEntry {
        url: "http://e".into(),
        name: Some("n".into()),
        kv_events: Some("tcp://e:1".into()),
        kv_events_replay: Some("tcp://e:2".into()),
        api_key: Some("k".into()),
        api_key_file: None,
        role: Default::default(),
        data_parallel_size: 1,
        scheduling_policy: Default::default(),
    }];
    cfg.models = vec![ModelEntry {
        name: "m".into(),
        tokenizer: "/t".into(),
        chat_template: Some("/c".into()),
        encoder: Default::default(),
        max_model_len: Some(1),
    }];
    out.remove("engines");
    out.remove("models");
    let mut with_entries = BTreeMap::new();
    walk("", &serde_json::to_value(&cfg).unwrap(), &mut with_entries);
    for k in with_entries.into_keys() {
        if k.starts_with("engines.") || k.starts_with("models.") {
            out.insert(k, Value::Null);
        }
    }
    out
}

/// Rows of the reference tables: first cell `key`, third cell the default.
fn rows(doc: &str) -> BTreeMap<String, String> {
    let mut rows = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `key` | type | default | env | flag | meaning |
        if cells.len() >= 7 && cells[1].starts_with('`') && cells[1].ends_with('`') {
            let key = cells[1].trim_matches('`').to_owned();
            assert!(rows.insert(key.clone(), cells[3].to_owned()).is_none(), "row `{key}` appears twice");
        }
    }
    rows
}

#[test]
fn every_config_key_is_documented_with_its_default() {
    let keys = key_paths();
    let rows = rows(&reference());
    let missing: Vec<_> = keys.keys().filter(|k| !rows.contains_key(*k)).collect();
    assert!(missing.is_empty(), "docs/configuration.md has no row for {missing:?}");
    let stale: Vec<_> = rows.keys().filter(|k| !keys.contains_key(*k)).collect();
    assert!(stale.is_empty(), "docs/configuration.md documents keys Config does not have: {stale:?}");
    let mut wrong = Vec::new();
    for (key, default) in &keys {
        let cell = &rows[key];
        let expected = match default {
            _ if key == "node_name" => continue, // the host name, different on every machine
            _ if key == "tokenize.threads" => continue, // half the cores, different on every machine
            _ if key.starts_with("engines.") || key.starts_with("models.") => continue,
            Value::Null => "unset".to_owned(),
            v => format!("`{v}`"),
        };
        if *cell != expected {
            wrong.push(format!("{key}: the doc says {cell}, Config::default() has {expected}"));
        }
    }
    assert!(wrong.is_empty(), "wrong defaults in docs/configuration.md:\n{}", wrong.join("\n"));
}

#[test]
fn every_serve_flag_and_env_var_is_documented() {
    let doc = reference();
    let cmd = ServeArgs::augment_args(clap::Command::new("serve"));
    let mut missing = BTreeSet::new();
    for arg in cmd.get_arguments() {
        if let Some(long) = arg.get_long() {
            if !doc.contains(&format!("`--{long}`")) && !doc.contains(&format!("`--{long} ")) {
                missing.insert(format!("--{long}"));
            }
        }
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy();
            if !doc.contains(&format!("`{env}`")) {
                missing.insert(env.into_owned());
            }
        }
    }
    assert!(missing.is_empty(), "docs/configuration.md does not mention {missing:?}");
}

#[test]
fn shipped_deployment_configs_load() {
    let root = repo();
    let mut files = Vec::new();
    for dir in ["examples/compose", "deploy/kubernetes/vllm", "deploy/kubernetes/sim"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 6, "expected the compose and Kubernetes node configs, found {files:?}");
    for path in files {
        let cfg = Config::load(&ServeArgs { config: Some(path.clone()), ..Default::default() })
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(cfg.mesh_enabled(), "{}: the shipped configs run in a mesh", path.display());
    }
}
