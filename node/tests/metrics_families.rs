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
    // docs/operations.md's metrics table and /metrics in step: every kvmesh family served is
    // documented, and every documented one is served.
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let served: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("kvmesh_"))
        .map(str::to_owned)
        .collect();
    let ops = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operations.md")).unwrap();
    let section = ops.split("### Metrics").nth(1).unwrap_or_default();
    let section = section.split("\n## ").next().unwrap_or_default();
    let documented: std::collections::BTreeSet<String> = section
        .split('`')
        .filter_map(|t| t.split('{').next())
        .filter(|n| n.starts_with("kvmesh_") && n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .map(str::to_owned)
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(undocumented.is_empty(), "served but not in docs/operations.md's metrics table: {undocumented:?}");
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
