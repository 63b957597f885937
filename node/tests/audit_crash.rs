//! `kill -9` of a `kvmesh serve` process under load: the audit chain still verifies, and every
//! request a client saw answered has its record (an answer completes only after its record is
//! written to the OS).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_answered_record() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_name = \"crash\"\nhttp_addr = \"127.0.0.1:0\"\n[embedded]\ntime_scale = 0.02\n[audit]\npath = {:?}\nfsync_interval_ms = 50\n",
            audit.display().to_string()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("kvmesh starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("kvmesh exited early").unwrap();
        if let Some(u) = line.split_whitespace().find(|w| w.starts_with("http://")) {
            break u.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let answered: Arc<Mutex<HashSet<String>>> = Arc::default();
    let sent: Arc<Mutex<HashSet<String>>> = Arc::default();
    let client = reqwest::Client::new();
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, url, answered, sent) = (client.clone(), url.clone(), answered.clone(), sent.clone());
        workers.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{w}-{i}");
                let stream = i % 2 == 0;
                let body = json!({"model": "kvmesh-sim", "max_tokens": 8, "stream": stream,
                                  "messages": [{"role": "user", "content": format!("crash test {id}")}]});
                sent.lock().unwrap().insert(id.clone());
                let Ok(r) = client
                    .post(format!("{url}/v1/chat/completions"))
                    .header("x-request-id", &id)
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                let ok = r.status() == 200;
                // Answered means the whole body arrived, ending as it should.
                match r.text().await {
                    Ok(t) if ok && (!stream || t.ends_with("data: [DONE]\n\n")) => {
                        answered.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    let t = Instant::now();
    while answered.lock().unwrap().len() < 200 && t.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for w in workers {
        let _ = w.await;
    }
    let answered = answered.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(answered.len() >= 200, "only {} answered", answered.len());

    let out =
        Command::new(env!("CARGO_BIN_EXE_kvmesh")).args(["audit", "verify", audit.to_str().unwrap()]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chain broken after kill -9: {report}");

    let text = std::fs::read_to_string(&audit).unwrap();
    let recorded: HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "request")
        .map(|v| v["request_id"].as_str().unwrap().to_owned())
        .collect();
    let missing: Vec<&String> = answered.iter().filter(|id| !recorded.contains(*id)).collect();
    assert!(missing.is_empty(), "answered but not recorded: {missing:?}");
    assert!(recorded.iter().all(|id| sent.contains(id)), "a record of a request nobody sent");
    eprintln!(
        "sent {}, answered {}, recorded {} (the difference: requests in flight at the kill); {report}",
        sent.len(),
        answered.len(),
        recorded.len()
    );
}
