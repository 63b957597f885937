//! A `kvmesh serve` process under abuse, measured: 500 connections that send half a request and
//! stop (slowloris), 200 unauthenticated uploads announcing 30 MiB each, and a flood of 2,000
//! requests for random model names, all at once; meanwhile legitimate requests are served, and
//! the process's resident memory stays under the bound stated in docs/security.md.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The stated bound on the node's resident memory under this abuse (docs/security.md).
const RSS_BOUND_MIB: u64 = 128;

fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_unauthenticated_uploads_and_random_models_leave_the_node_serving() {
    if !std::path::Path::new("/proc/self/status").exists() {
        eprintln!("SKIPPED: needs /proc to read the node's memory");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    let key_hash = kvmesh_policy::auth::hash_key("sk-legit");
    std::fs::write(
        &config,
        format!(
            "node_name = \"abuse\"\nhttp_addr = \"127.0.0.1:0\"\n[embedded]\ntime_scale = 0.02\n\
             [[auth.keys]]\ntenant = \"legit\"\nkey_sha256 = \"{key_hash}\"\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kvmesh starts");
    let pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("kvmesh exited early").unwrap();
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break u.trim_end_matches("/v1").to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let addr = url.trim_start_matches("http://").to_owned();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let legit = |i: usize| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let body = json!({"model": "kvmesh-sim", "max_tokens": 4, "messages": [{"role": "user", "content": format!("legit {i}")}]});
            let r = http.post(format!("{url}/v1/chat/completions")).bearer_auth("sk-legit").json(&body).send().await;
            r.map(|r| r.status().as_u16()).unwrap_or(0)
        }
    };
    for i in 0..5 {
        assert_eq!(legit(i).await, 200);
    }
    let baseline = rss_mib(pid);

    // 500 slowloris connections: half a request line, then nothing.
    let mut idle = Vec::new();
    for _ in 0..500 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        idle.push(s);
    }
    // 200 unauthenticated uploads announcing 30 MiB, 50 at a time, each sending 256 KiB.
    let started = Instant::now();
    let mut refused = 0;
    for _ in 0..4 {
        let batch = (0..50).map(|_| {
            let addr = addr.clone();
            async move {
                let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
                let head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 31457280\r\n\r\n";
                s.write_all(head.as_bytes()).await.ok()?;
                let _ = s.write_all(&vec![b' '; 256 * 1024]).await;
                let mut answer = vec![0u8; 512];
                let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer)).await.ok()?.ok()?;
                Some(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 401"))
            }
        });
        refused += futures::future::join_all(batch).await.into_iter().filter(|r| *r == Some(true)).count();
    }
    // 2,000 requests for random model names, with a valid key: 404s, and no new label values.
    let mut not_found = 0;
    for chunk in 0..40 {
        let batch = (0..50).map(|i| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let model = format!("random-model-{chunk}-{i}-{:x}", rand::random::<u64>());
                let body = json!({"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]});
                let r =
                    http.post(format!("{url}/v1/chat/completions")).bearer_auth("sk-legit").json(&body).send().await;
                r.map(|r| r.status().as_u16()).unwrap_or(0)
            }
        });
        not_found += futures::future::join_all(batch).await.into_iter().filter(|s| *s == 404).count();
    }
    let abuse_took = started.elapsed();
    // Legitimate requests, while the 500 connections are still open.
    let served = futures::future::join_all((0..20).map(legit)).await;
    let peak = rss_mib(pid);
    let metrics = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    println!(
        "abuse: {refused}/200 uploads refused (401), {not_found}/2000 random models 404, in {abuse_took:?}; \
         legit served {}/20; RSS {baseline} MiB before, {peak} MiB after (bound {RSS_BOUND_MIB} MiB)",
        served.iter().filter(|s| **s == 200).count()
    );
    drop(idle);
    unsafe_kill(pid);
    let _ = child.wait();
    assert_eq!(refused, 200, "every unauthenticated upload is refused before its body");
    assert_eq!(not_found, 2000);
    assert!(served.iter().all(|s| *s == 200), "legitimate requests are served: {served:?}");
    assert!(peak < RSS_BOUND_MIB, "RSS {peak} MiB over the bound of {RSS_BOUND_MIB} MiB");
    assert!(!metrics.contains("random-model-"), "client model names never become label values");
}

/// SIGKILL by pid (the test owns the child).
fn unsafe_kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}
