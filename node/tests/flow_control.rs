//! Flow control on a real node over a real engine simulator (`router::flow`,
//! `policy::flow`): while the engine is saturated requests wait at the node, and leave in
//! priority and fair-share order; a request that cannot leave in time is answered 503 with
//! `retry-after`, a tenant over its share of the queue 429, and a drain answers what is held.
//!
//! The engine runs one request at a time (`max_num_seqs = 1`) in real time (about 6.5 ms a
//! token, and `ignore_eos`: every request generates all it asks for), and the node lets at most one more wait inside it (`max_waiting_per_engine = 1`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvmesh_node::config::Config;
use kvmesh_policy::auth::{hash_key, KeyEntry};
use kvmesh_policy::flow::{BandSlo, FlowSettings, Priority};
use kvmesh_sim::EngineConfig;
use serde_json::{json, Value};
use tokio::sync::Mutex;

fn flow_config(flow: FlowSettings) -> Config {
    let mut cfg = node_config(vec![]);
    cfg.embedded = EngineConfig { max_num_seqs: 1, ..EngineConfig::default() };
    cfg.engine_poll_interval_ms = 20;
    cfg.flow = FlowSettings { max_waiting_per_engine: 1, unkeyed_max_priority: Priority::Critical, ..flow };
    cfg
}

/// Sends a chat request with `tokens` to generate, in band `priority`, with `key`; returns the
/// status, the `retry-after` header and the body.
async fn send(url: &str, tokens: u32, priority: &str, key: Option<&str>, tag: &str) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-kvmesh-priority", priority)
        .json(&chat(&format!("request {tag}"), json!({"max_tokens": tokens, "ignore_eos": true})));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

/// Fills the engine: one request running, one waiting inside it; what follows is held.
async fn saturate(
    url: &str,
    tokens: u32,
    key: Option<&str>,
) -> Vec<tokio::task::JoinHandle<(u16, Option<String>, Value)>> {
    let mut busy = Vec::new();
    for i in 0..2 {
        let (u, k) = (url.to_owned(), key.map(str::to_owned));
        busy.push(tokio::spawn(async move { send(&u, tokens, "standard", k.as_deref(), &format!("busy {i}")).await }));
        // The second must arrive once the engine reports the first running.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    busy
}

/// Sends five short requests, 15 ms apart, in the bands sheddable, standard, sheddable,
/// standard, critical; each notes its tag (`BAND i`) in the returned order when answered 200.
async fn send_in_bands(url: &str) -> (Arc<Mutex<Vec<String>>>, Vec<tokio::task::JoinHandle<()>>) {
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut held = Vec::new();
    for (i, band) in ["sheddable", "standard", "sheddable", "standard", "critical"].iter().enumerate() {
        let (u, o, band) = (url.to_owned(), order.clone(), band.to_string());
        held.push(tokio::spawn(async move {
            let (s, _, v) = send(&u, 2, &band, None, &format!("{band} {i}")).await;
            assert_eq!(s, 200, "{v}");
            o.lock().await.push(format!("{band} {i}"));
        }));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    (order, held)
}

/// Waits for the saturating and the held requests, and checks that the held ones left by band,
/// then in arrival order.
async fn left_by_band(
    busy: Vec<tokio::task::JoinHandle<(u16, Option<String>, Value)>>,
    held: Vec<tokio::task::JoinHandle<()>>,
    order: Arc<Mutex<Vec<String>>>,
) {
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
    for h in held {
        h.await.unwrap();
    }
    let order = order.lock().await.clone();
    assert_eq!(order, ["critical 4", "standard 1", "standard 3", "sheddable 0", "sheddable 2"], "{order:?}");
}

async fn held_now(url: &str) -> f64 {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("kvmesh_flow_queued_requests{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn held_requests_leave_by_band_then_in_arrival_order() {
    let n = node(flow_config(FlowSettings::default())).await;
    let url = n.url();
    let busy = saturate(&url, 60, None).await;
    let (order, held) = send_in_bands(&url).await;
    eventually("five requests held", Duration::from_secs(5), async || held_now(&url).await == 5.0).await;
    left_by_band(busy, held, order).await;
    assert!(scrape(&url, "kvmesh_flow_held_total").await >= 5.0);
}

#[tokio::test]
async fn a_request_past_its_deadline_is_answered_503_with_retry_after() {
    let n = node(flow_config(FlowSettings { max_wait_ms: 300, ..FlowSettings::default() })).await;
    let url = n.url();
    let busy = saturate(&url, 200, None).await;
    let t = Instant::now();
    let (status, retry, body) = send(&url, 2, "standard", None, "late").await;
    let waited = t.elapsed();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "flow_no_capacity", "{body}");
    assert_openai_error(&body);
    assert!(retry.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
    // Answered at its deadline, not when the engine would have taken it (over a second later).
    assert!(waited < Duration::from_millis(900), "waited {waited:?}");
    assert!(waited >= Duration::from_millis(200), "waited {waited:?}");
    assert_eq!(held_now(&url).await, 0.0, "nothing left held");
    let shed = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    assert!(shed.contains("kvmesh_flow_shed_total{") && shed.contains("reason=\"deadline\""), "{shed}");
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

#[tokio::test]
async fn a_band_objective_is_a_held_requests_deadline() {
    // Standard requests must start within 100 ms: one held behind a multi-second request is
    // answered at 100 ms, not when the engine frees up.
    let slo = kvmesh_policy::flow::BandSlo { standard: Some(100), ..Default::default() };
    let n = node(flow_config(FlowSettings { slo_ms: slo, ..FlowSettings::default() })).await;
    let url = n.url();
    let busy = saturate(&url, 200, None).await;
    let t = Instant::now();
    let (status, retry, body) = send(&url, 2, "standard", None, "slo").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "flow_no_capacity", "{body}");
    assert!(retry.is_some());
    assert!(t.elapsed() < Duration::from_millis(600), "{:?}", t.elapsed());
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    let shed = |reason: &str| {
        text.lines()
            .filter(|l| l.starts_with("kvmesh_flow_shed_total{") && l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(shed("deadline"), 1.0, "held until its band's objective passed: {text}");
    // The critical band has no objective here: it waits and is served.
    let (status, _, body) = send(&url, 2, "critical", None, "no slo").await;
    assert_eq!(status, 200, "{body}");
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

fn keyed(mut cfg: Config, tenants: &[(&str, u32)]) -> Config {
    cfg.auth.keys = tenants
        .iter()
        .map(|(t, w)| KeyEntry {
            tenant: (*t).into(),
            key_sha256: hash_key(&format!("sk-{t}")),
            weight: *w,
            ..Default::default()
        })
        .collect();
    cfg
}

#[tokio::test]
async fn a_tenant_over_its_share_of_the_queue_gets_429() {
    let cfg = keyed(
        flow_config(FlowSettings { tenant_queue_capacity: 2, ..FlowSettings::default() }),
        &[("noisy", 1), ("quiet", 1)],
    );
    let n = node(cfg).await;
    let url = n.url();
    let busy = saturate(&url, 100, Some("sk-quiet")).await;
    let mut held = Vec::new();
    for i in 0..2 {
        let u = url.clone();
        held.push(tokio::spawn(async move { send(&u, 2, "standard", Some("sk-noisy"), &format!("noisy {i}")).await }));
    }
    eventually("two held", Duration::from_secs(5), async || held_now(&url).await == 2.0).await;
    let (status, retry, body) = send(&url, 2, "standard", Some("sk-noisy"), "one too many").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "flow_tenant_share", "{body}");
    assert!(retry.is_some());
    // The other tenant is still let in, and served.
    let (status, _, body) = send(&url, 2, "standard", Some("sk-quiet"), "quiet").await;
    assert_eq!(status, 200, "{body}");
    for h in busy.into_iter().chain(held) {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

#[tokio::test]
async fn a_quiet_tenant_waits_behind_one_noisy_request_not_all_of_them() {
    let cfg = keyed(flow_config(FlowSettings::default()), &[("noisy", 1), ("quiet", 1)]);
    let n = node(cfg).await;
    let url = n.url();
    let busy = saturate(&url, 40, Some("sk-noisy")).await;
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut held = Vec::new();
    for i in 0..12 {
        let (u, o) = (url.clone(), order.clone());
        held.push(tokio::spawn(async move {
            let (s, _, v) = send(&u, 4, "standard", Some("sk-noisy"), &format!("noisy {i}")).await;
            assert_eq!(s, 200, "{v}");
            o.lock().await.push("noisy".to_owned());
        }));
    }
    eventually("noisy held", Duration::from_secs(5), async || held_now(&url).await == 12.0).await;
    let (u, o) = (url.clone(), order.clone());
    held.push(tokio::spawn(async move {
        let (s, _, v) = send(&u, 4, "standard", Some("sk-quiet"), "quiet").await;
        assert_eq!(s, 200, "{v}");
        o.lock().await.push("quiet".to_owned());
    }));
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
    for h in held {
        h.await.unwrap();
    }
    let order = order.lock().await.clone();
    let at = order.iter().position(|t| t == "quiet").unwrap();
    // Turns alternate between tenants: the quiet request leaves after at most the noisy one
    // whose turn it was (and one more that left while it was on its way), not after all twelve.
    assert!(at <= 2, "quiet finished {at}th of {}: {order:?}", order.len());
}

#[tokio::test]
async fn a_drain_answers_held_requests_at_once() {
    let n = node(flow_config(FlowSettings::default())).await;
    let url = n.url();
    let busy = saturate(&url, 200, None).await;
    let u = url.clone();
    let held = tokio::spawn(async move { send(&u, 2, "standard", None, "held").await });
    eventually("held", Duration::from_secs(5), async || held_now(&url).await == 1.0).await;
    let t = Instant::now();
    let r = reqwest::Client::new().post(format!("{url}/admin/drain")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (status, _, body) = held.await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "draining", "{body}");
    assert!(t.elapsed() < Duration::from_millis(500), "{:?}", t.elapsed());
    assert_eq!(held_now(&url).await, 0.0);
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200, "open requests finish");
    }
}

#[tokio::test]
async fn a_client_that_leaves_frees_its_place() {
    let n = node(flow_config(FlowSettings::default())).await;
    let url = n.url();
    let busy = saturate(&url, 200, None).await;
    let u = url.clone();
    let gone = tokio::spawn(async move { send(&u, 2, "standard", None, "leaves").await });
    eventually("held", Duration::from_secs(5), async || held_now(&url).await == 1.0).await;
    // The client closes its connection while its request is held.
    gone.abort();
    eventually("its place freed", Duration::from_secs(5), async || held_now(&url).await == 0.0).await;
    // The next request is held in its turn and served: nothing leaked.
    let (status, _, body) = send(&url, 2, "standard", None, "next").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(held_now(&url).await, 0.0);
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

#[tokio::test]
async fn without_flow_control_every_request_goes_to_the_engine() {
    let n = node(flow_config(FlowSettings { enabled: false, ..FlowSettings::default() })).await;
    let url = n.url();
    let busy = saturate(&url, 60, None).await;
    let (status, _, _) = send(&url, 2, "standard", None, "direct").await;
    assert_eq!(status, 200);
    assert_eq!(scrape(&url, "kvmesh_flow_held_total").await, 0.0);
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

/// The second hold: a peer's request for this node's engine is held here, where every request
/// to the engine passes, by the band and the time left that the origin sent with it. The edge
/// node that receives the clients' requests runs without flow control, so every request
/// reaches the engine's node at once; that node must still keep its engine's queue short and
/// let the held requests go in band order.
#[tokio::test]
async fn the_engines_node_holds_what_peers_send_by_their_band() {
    let dir = tempfile::tempdir().unwrap();
    kvmesh_transport::certs::create_ca(dir.path(), "flow").unwrap();
    let mut worker = mesh_config(dir.path(), "flow", "worker", None);
    worker.embedded = EngineConfig { max_num_seqs: 1, ..EngineConfig::default() };
    worker.engine_poll_interval_ms = 20;
    worker.flow =
        FlowSettings { max_waiting_per_engine: 1, unkeyed_max_priority: Priority::Critical, ..FlowSettings::default() };
    let worker = node(worker).await;
    let seed = worker.mesh.as_ref().map(|m| m.advertise.to_string());
    let mut edge = mesh_config(dir.path(), "flow", "edge", seed);
    edge.role = kvmesh_node::config::NodeRole::Edge;
    edge.flow = FlowSettings { enabled: false, unkeyed_max_priority: Priority::Critical, ..FlowSettings::default() };
    let edge = node(edge).await;
    let (url, worker_url) = (edge.url(), worker.url());
    eventually("the edge sees the worker's engine", Duration::from_secs(10), async || {
        let (s, _, _) = send(&url, 1, "standard", None, "probe").await;
        s == 200
    })
    .await;

    let busy = saturate(&url, 60, None).await;
    let (order, held) = send_in_bands(&url).await;
    // Held at the worker, not the edge; its engine never has more than one waiting.
    eventually("five requests held at the worker", Duration::from_secs(5), async || held_now(&worker_url).await == 5.0)
        .await;
    assert_eq!(held_now(&url).await, 0.0, "the edge holds nothing");
    assert!(scrape(&worker_url, "kvmesh_engine_waiting").await <= 1.0);
    left_by_band(busy, held, order).await;

    // The time left travels too: a second edge, whose flow control never holds (64 places
    // an engine) but gives sheddable requests a 300 ms objective, sends one while the engine
    // is busy; the worker (30 s for every band) answers it 503 when those 300 ms run out.
    let mut edge2 = mesh_config(dir.path(), "flow", "edge2", worker.mesh.as_ref().map(|m| m.advertise.to_string()));
    edge2.role = kvmesh_node::config::NodeRole::Edge;
    edge2.flow = FlowSettings {
        max_waiting_per_engine: 64,
        slo_ms: BandSlo { sheddable: Some(300), ..BandSlo::default() },
        unkeyed_max_priority: Priority::Critical,
        ..FlowSettings::default()
    };
    let edge2 = node(edge2).await;
    let url2 = edge2.url();
    eventually("the second edge sees the worker's engine", Duration::from_secs(10), async || {
        send(&url2, 1, "standard", None, "probe").await.0 == 200
    })
    .await;
    let busy = saturate(&url, 200, None).await;
    let t = Instant::now();
    let (status, retry, body) = send(&url2, 2, "sheddable", None, "late").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "flow_no_capacity", "{body}");
    // The worker's `retry-after` crosses the mesh to the client.
    assert!(retry.as_deref().is_some_and(|r| r.parse::<u64>().unwrap() >= 1), "{retry:?}");
    assert!(t.elapsed() < Duration::from_millis(900), "waited {:?}", t.elapsed());
    for h in busy {
        assert_eq!(h.await.unwrap().0, 200);
    }
    edge2.shutdown().await;
    edge.shutdown().await;
    worker.shutdown().await;
}
