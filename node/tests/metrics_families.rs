//! `/metrics` under load: a node in a two-node mesh (the other an edge node), with guardrails
//! and an audit trail, takes 30 streamed requests; every family operators rely on must be there, and the counters and
//! histogram counts must have moved.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kvmesh_node::audit::AuditConfig;
use kvmesh_node::config::NodeRole;
use kvmesh_policy::guardrails::GuardrailConfig;
use serde_json::json;

/// Sample name (with labels) to value.
fn parse(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Sum of every sample of `family` (`name{...}` or `name`), 0 when it is absent.
fn total(m: &BTreeMap<String, f64>, family: &str) -> f64 {
    samples(m, family).map(|(_, v)| v).sum()
}

fn samples<'a>(m: &'a BTreeMap<String, f64>, family: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    m.iter()
        .filter(move |(k, _)| k.strip_prefix(family).is_some_and(|rest| rest.is_empty() || rest.starts_with('{')))
        .map(|(k, v)| (k.as_str(), *v))
}

/// The one sample of `family` whose labels include every `k="v"` in `labels`.
fn get(m: &BTreeMap<String, f64>, family: &str, labels: &[(&str, &str)]) -> f64 {
    let mut found = samples(m, family).filter(|(k, _)| labels.iter().all(|(l, v)| k.contains(&format!("{l}=\"{v}\""))));
    let (_, v) = found.next().unwrap_or_else(|| panic!("{family} {labels:?} missing"));
    assert!(found.next().is_none(), "{family} {labels:?} is not one sample");
    v
}

async fn metrics(url: &str) -> BTreeMap<String, f64> {
    parse(&reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap())
}

/// docs/metrics.md's table: each family named in a row's first cell, with the row's type and
/// the family's labels (its own `name{a,b}`, or the row's shared `{a,b}` cell).
fn doc_rows(doc: &str) -> BTreeMap<String, (String, std::collections::BTreeSet<String>)> {
    let mut rows = BTreeMap::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (names, kind) = (cells[1], cells[2]);
        let tokens: Vec<&str> = names.split('`').skip(1).step_by(2).collect();
        let labels_of = |t: &str| -> std::collections::BTreeSet<String> {
            t.split_once('{')
                .map(|(_, l)| l.trim_end_matches('}').split(',').map(|s| s.trim().to_owned()).collect())
                .unwrap_or_default()
        };
        let shared = tokens.iter().find(|t| t.starts_with('{')).map(|t| labels_of(t)).unwrap_or_default();
        for t in tokens.iter().filter(|t| t.starts_with("kvmesh_")) {
            let name = t.split('{').next().unwrap_or(t);
            let labels = if t.contains('{') { labels_of(t) } else { shared.clone() };
            rows.insert(name.to_owned(), (kind.to_owned(), labels));
        }
    }
    rows
}

/// Counters and histogram counts that must grow under streamed load.
const MOVING: &[&str] = &[
    "kvmesh_requests_total",
    "kvmesh_route_decisions_total",
    "kvmesh_time_to_first_byte_seconds_count",
    "kvmesh_request_duration_seconds_count",
    "kvmesh_inter_token_seconds_count",
    "kvmesh_guardrail_verdicts_total",
    "kvmesh_audit_records_written_total",
    "kvmesh_tokenize_requests_total",
    "kvmesh_kv_event_batches_total",
    "kvmesh_gossip_bytes_total",
];

/// Families that must be present (gauges and counters that may rightly stay at zero).
const PRESENT: &[&str] = &[
    "kvmesh_engine_up",
    "kvmesh_engine_in_flight",
    "kvmesh_engine_running",
    "kvmesh_engine_waiting",
    "kvmesh_engine_kv_usage",
    "kvmesh_kv_cached_blocks",
    "kvmesh_kv_event_gaps_total",
    "kvmesh_route_history_keys",
    "kvmesh_audit_queue_depth",
    "kvmesh_audit_records_dropped_total",
    "kvmesh_audit_write_errors_total",
    "kvmesh_auth_failures_total",
    "kvmesh_latency_summary_seconds",
    "kvmesh_draining",
    "kvmesh_gossip_peers",
    "kvmesh_gossip_dropped_total",
    "kvmesh_gossip_rejected_states_total",
    "kvmesh_gossip_heartbeat_age_seconds",
    "kvmesh_gossip_max_heartbeat_age_seconds",
    "kvmesh_mesh_refused_connections_total",
    "kvmesh_tokenize_queue",
    "kvmesh_build_info",
    "process_resident_memory_bytes",
    "process_open_fds",
];

#[tokio::test]
async fn every_family_is_present_and_moves_under_load() {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "metrics").unwrap();
    let mut cfg = mesh_config(dir.path(), "metrics", "m0", None);
    // Slow enough (about 1.3 ms a token) that tokens arrive as chunks of their own.
    cfg.embedded.time_scale = 0.2;
    cfg.guardrails = vec![GuardrailConfig::MaxLength { name: "length".into(), max_chars: 100_000 }];
    cfg.audit = AuditConfig { path: Some(dir.path().join("audit.jsonl")), ..Default::default() };
    let m0 = node(cfg).await;
    let seed = m0.mesh.as_ref().map(|m| m.advertise.to_string());
    // An edge peer: gossip flows both ways, and every request is served by m0's engine.
    let mut edge = mesh_config(dir.path(), "metrics", "m1", seed);
    edge.role = NodeRole::Edge;
    let m1 = node(edge).await;
    let url = m0.url();
    eventually("m0 sees m1", Duration::from_secs(10), async || m0.mesh.as_ref().unwrap().peers().len() == 2).await;
    let before = metrics(&url).await;
    assert_eq!(total(&before, "kvmesh_gossip_peers"), 1.0);

    // 30 streamed chats, 6 at a time, sharing a long system prompt (prefix hits after the first).
    let system = "You are a careful assistant. ".repeat(40);
    let client = reqwest::Client::new();
    let mut load = Vec::new();
    for i in 0..30 {
        let body = json!({
            "model": "kvmesh-sim",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}],
            "max_tokens": 24,
            "stream": true,
        });
        let (client, url) = (client.clone(), url.clone());
        load.push(async move {
            let r = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            assert!(!text.contains("\"error\""), "{text}");
        });
    }
    let mut load = futures::stream::iter(load).buffer_unordered(6);
    // Scrape while requests are in flight: every family must be there under load.
    let mut during = None;
    let mut done = 0;
    while let Some(()) = load.next().await {
        done += 1;
        if done == 10 {
            during = Some(metrics(&url).await);
        }
    }
    let during = during.unwrap();
    // Gossip keeps flowing on its own clock; give the counters one more round to show it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A few whole answers too: their usage is checked against the router's prediction.
    for i in 0..3 {
        let body = json!({"model": "kvmesh-sim", "max_tokens": 2,
                          "messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("whole {i}")}]});
        let (s, _, v) = post(&url, &body).await;
        assert_eq!(s, 200, "{v}");
    }
    let after = metrics(&url).await;

    for family in MOVING.iter().chain(PRESENT) {
        assert!(samples(&during, family).next().is_some(), "{family} missing under load");
        assert!(samples(&after, family).next().is_some(), "{family} missing after load");
    }
    for family in MOVING {
        let (b, a) = (total(&before, family), total(&after, family));
        assert!(a > b, "{family} did not move: {b} -> {a}");
    }
    // docs/metrics.md and /metrics in step: every kvmesh family served is documented with its
    // type and labels, and every documented one is served.
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let served_types: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .filter(|(n, _)| n.starts_with("kvmesh_"))
        .map(|(n, t)| (n.to_owned(), t.to_owned()))
        .collect();
    let served: std::collections::BTreeSet<String> = served_types.keys().cloned().collect();
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).unwrap();
    let rows = doc_rows(&doc);
    let documented: std::collections::BTreeSet<String> = rows.keys().cloned().collect();
    for (family, (kind, labels)) in &rows {
        let Some(served_kind) = served_types.get(family) else { continue };
        if kind != "mixed" {
            assert_eq!(served_kind, kind, "{family}: docs/metrics.md says {kind}, /metrics serves {served_kind}");
        }
        // Labels of the served samples (histogram and summary series included), less the one
        // every series carries and the histogram's bucket bound.
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some(rest) = line.strip_prefix(family.as_str()) else { continue };
            let rest = ["_bucket", "_sum", "_count"].iter().find_map(|x| rest.strip_prefix(x)).unwrap_or(rest);
            let Some(set) = rest.strip_prefix('{').and_then(|r| r.split_once('}')).map(|(set, _)| set) else {
                continue;
            };
            for pair in set.split("\",") {
                if let Some((name, _)) = pair.split_once('=') {
                    if name != "kvmesh_node" && name != "le" {
                        seen.insert(name.to_owned());
                    }
                }
            }
        }
        if !seen.is_empty() {
            assert_eq!(&seen, labels, "{family}: labels served vs docs/metrics.md");
        }
    }
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(undocumented.is_empty(), "served but not in docs/metrics.md: {undocumented:?}");
    // Labelled families show up with their first event (a retry, a 429, a failed stream),
    // which this load has none of; `kvmesh_node` is the label every series carries.
    const ON_EVENT: &[&str] = &[
        "kvmesh_engine_retries_total",
        "kvmesh_rate_limited_total",
        "kvmesh_stream_errors_total",
        "kvmesh_prompt_length_mismatches_total",
        "kvmesh_node",
    ];
    let unserved: Vec<_> = documented.difference(&served).filter(|n| !ON_EVENT.contains(&n.as_str())).collect();
    // The Grafana dashboard, the alert rules and the KEDA trigger query only metrics a node serves.
    for file in [
        "deploy/grafana/kvmesh-dashboard.json",
        "deploy/prometheus/kvmesh-alerts.yml",
        "deploy/keda/kvmesh-scaledobject.yaml",
    ] {
        let text = std::fs::read_to_string(format!("{}/../{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let mut queried = std::collections::BTreeSet::new();
        for (i, _) in text.match_indices("kvmesh_") {
            let name: String =
                text[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            // Labels (`kvmesh_node`) and histogram series name their family.
            if name == "kvmesh_node" || text[..i].ends_with(|c: char| c.is_ascii_alphanumeric()) {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"].iter().find_map(|x| name.strip_suffix(x)).unwrap_or(&name);
            queried.insert(family.to_owned());
        }
        // The scaler queries one signal; the dashboard and the alerts many.
        let least = if file.contains("keda") { 1 } else { 5 };
        assert!(queried.len() >= least, "{file}: {queried:?}");
        for q in &queried {
            assert!(served.contains(q) || ON_EVENT.contains(&q.as_str()), "{file} queries {q}, which no node serves");
        }
    }
    assert!(unserved.is_empty(), "documented but not served: {unserved:?}");
    // Each direction of gossip, not just their sum.
    for dir in ["sent", "received"] {
        let (b, a) = (
            get(&before, "kvmesh_gossip_bytes_total", &[("direction", dir)]),
            get(&after, "kvmesh_gossip_bytes_total", &[("direction", dir)]),
        );
        assert!(a > b, "gossip bytes {dir}: {b} -> {a}");
    }
    // 30 streams: at least 30 answered 200s, one TTFT each, and many gaps between tokens.
    let ok = samples(&after, "kvmesh_requests_total").filter(|(k, _)| k.contains("status=\"200\"")).map(|(_, v)| v);
    assert!(ok.sum::<f64>() >= 30.0);
    assert!(total(&after, "kvmesh_time_to_first_byte_seconds_count") >= 30.0);
    // About 24 gaps a stream; a few may arrive coalesced with their neighbours.
    assert!(total(&after, "kvmesh_inter_token_seconds_count") >= 30.0 * 10.0);
    assert!(total(&after, "kvmesh_guardrail_verdicts_total") >= 30.0);
    assert!(total(&after, "kvmesh_audit_records_written_total") >= 30.0);
    // The index and the view of the peer.
    assert!(total(&after, "kvmesh_kv_cached_blocks") > 0.0);
    assert_eq!(total(&after, "kvmesh_gossip_peers"), 1.0);
    assert_eq!(samples(&after, "kvmesh_gossip_heartbeat_age_seconds").count(), 1, "one peer, one age");
    let age = total(&after, "kvmesh_gossip_max_heartbeat_age_seconds");
    assert!((0.0..2.0).contains(&age), "a live peer's heartbeat is fresh: {age} s");
    assert_eq!(total(&after, "kvmesh_draining"), 0.0);
    // hdrhistogram summaries: the three quantiles of each measure, finite and ordered.
    for measure in ["ttft", "inter_token", "e2e"] {
        let q: Vec<f64> = ["0.5", "0.9", "0.99"]
            .iter()
            .map(|q| get(&after, "kvmesh_latency_summary_seconds", &[("measure", measure), ("quantile", q)]))
            .collect();
        assert!(q.iter().all(|v| v.is_finite() && *v >= 0.0), "{measure}: {q:?}");
        assert!(q[0] <= q[1] && q[1] <= q[2], "{measure}: {q:?}");
    }
    // A Prometheus summary: lifetime count and sum beside the recent quantiles.
    assert!(get(&after, "kvmesh_latency_summary_seconds_count", &[("measure", "ttft")]) >= 30.0);
    assert!(get(&after, "kvmesh_latency_summary_seconds_sum", &[("measure", "e2e")]) > 0.0);
    let ttft_p99 = get(&after, "kvmesh_latency_summary_seconds", &[("measure", "ttft"), ("quantile", "0.99")]);
    let e2e_p99 = get(&after, "kvmesh_latency_summary_seconds", &[("measure", "e2e"), ("quantile", "0.99")]);
    assert!(ttft_p99 > 0.0 && ttft_p99 <= e2e_p99 * 1.02, "ttft p99 {ttft_p99} vs e2e p99 {e2e_p99}");

    m1.shutdown().await;
    m0.shutdown().await;
}

/// A client's model names are free text: refused requests for made-up models, even ones a key's
/// limits refuse before routing, create no series; a served model labels its own.
#[tokio::test]
async fn client_model_names_never_become_label_values() {
    let e = engine(fast_engine(), false).await;
    let n = node(node_config(vec![entry(e.url())])).await;
    for i in 0..20 {
        // Unknown models (404) and bad requests with a made-up model (400 before any routing).
        let (s, _, _) =
            post(&n.url(), &json!({"model": format!("made-up-{i}"), "messages": [{"role": "user", "content": "x"}]}))
                .await;
        assert_eq!(s, 404);
        let (s, _, _) = post(&n.url(), &json!({"model": format!("junk-{i}"), "messages": [], "max_tokens": 1})).await;
        assert_eq!(s, 400);
    }
    let (s, _, _) = post(&n.url(), &chat("hi", json!({"max_tokens": 1}))).await;
    assert_eq!(s, 200);
    let text = reqwest::get(format!("{}/metrics", n.url())).await.unwrap().text().await.unwrap();
    assert!(!text.contains("made-up-") && !text.contains("junk-"), "a client's model name became a label");
    assert!(text.contains("model_name=\"kvmesh-sim\""), "the served model labels its series");
    n.shutdown().await;
    e.shutdown().await;
}
