//! Real-kernel network tests: one `kvmesh` process per network namespace, the namespaces joined
//! by veth pairs to a bridge, faults made with the kernel's own tools (`ip link`, nftables), and
//! a user-space UDP relay for delay (the kernels these run on may lack netem).
//!
//! Needs root, iproute2 with `ip netns`, and `nft` for the loss test. [`skip`] says what is
//! missing; a test then passes as skipped, unless `KVMESH_REQUIRE_NETNS=1` (set it where CI has
//! root, so that a skip there fails instead of hiding that nothing ran).
//!
//! Layout of a [`Lab`]: namespace `kvmesh-PID-SEQ-br` holds bridge `br0`; each node namespace
//! `kvmesh-PID-SEQ-nI` has `eth0` (10.A.B.(10+I)/24) whose peer is a port of `br0`; the host has
//! `kvmPIDxSEQ` (10.A.B.1/24) on the bridge too, so the test talks to every node's HTTP API
//! directly and can run relays. Dropping the lab kills its processes and deletes its namespaces,
//! which destroys every veth with them, also when a test panics.
//!
//! Why one long file: the namespace harness (hosts, links, nftables faults, process control)
//! is one fixture; every part of it is needed by each kernel test.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Set to `1` to turn a skip (no root, no `ip netns`, no `nft`, no binary) into a failure.
pub const REQUIRE_ENV: &str = "KVMESH_REQUIRE_NETNS";
/// Overrides where the `kvmesh` binary is taken from.
pub const BIN_ENV: &str = "KVMESH_BIN";

/// Gossip settings the lab's nodes run with; the failure-detection bound is computed from them.
pub const GOSSIP_INTERVAL_MS: u64 = 200;
pub const PHI_THRESHOLD: f64 = 8.0;

const HTTP_PORT: u16 = 8080;
const QUIC_PORT: u16 = 7946;
const NS_PREFIX: &str = "kvmesh-";

/// Labs made by this process, for unique namespace names, interfaces and subnets.
static LAB_SEQ: AtomicU32 = AtomicU32::new(0);
/// Subnet choice and the check that the host does not use it must not interleave between labs.
static SUBNET_LOCK: Mutex<()> = Mutex::new(());

/// How long a silent node may stay in its peers' views, from this config.
///
/// chitchat's phi is (time since the peer's last heartbeat) / (mean interval between its
/// heartbeats), and the node is dead once phi exceeds the threshold. The mean is smoothed toward
/// a prior of 2 gossip intervals (weight 5), and a live peer's heartbeat arrives about once per
/// round, so the mean stays at or below 2 intervals: a silent peer is declared dead within
/// `phi × 2 × interval`. Liveness is re-evaluated once per round and the node's view is rebuilt
/// on the change (one more round each), and the test polls the view over HTTP; one second
/// covers scheduling on a loaded 2-core machine.
pub fn failure_detection_bound() -> Duration {
    let interval = Duration::from_millis(GOSSIP_INTERVAL_MS);
    interval.mul_f64(PHI_THRESHOLD * 2.0) + interval * 2 + Duration::from_secs(1)
}

/// Why the namespace tests cannot run here, or `None` when they can.
pub fn missing(need_nft: bool) -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
    });
    if euid.as_deref() != Some("0") {
        return Some(format!("not root (effective uid {})", euid.as_deref().unwrap_or("unknown")));
    }
    if !runs("ip", &["-V"]) {
        return Some("`ip` (iproute2) not found".into());
    }
    if need_nft && !runs("nft", &["--version"]) {
        return Some("`nft` not found (apt-get install nftables)".into());
    }
    // Try everything a lab needs in a throwaway namespace: a container may allow some of it.
    let probe = format!("{NS_PREFIX}{}-probe-{}", std::process::id(), LAB_SEQ.fetch_add(1, Ordering::SeqCst));
    if let Err(e) = try_ip(&["netns", "add", &probe]) {
        return Some(format!("`ip netns add` failed: {e}"));
    }
    let mut checks = vec![
        ("bridge", vec!["-n", &probe, "link", "add", "b0", "type", "bridge"]),
        ("veth", vec!["-n", &probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1"]),
        ("ip netns exec", vec!["netns", "exec", &probe, "true"]),
    ];
    let nft = ["netns", "exec", &probe, "nft", "add", "table", "inet", "probe"];
    if need_nft {
        checks.push(("nftables", nft.to_vec()));
    }
    let failed = checks.iter().find_map(|(what, args)| try_ip(args).err().map(|e| format!("{what}: {e}")));
    let _ = try_ip(&["netns", "del", &probe]);
    failed
}

/// True when the test should return now: says why on stderr (past the test harness's output
/// capture, so a skip shows in a plain `cargo test`), or panics where `KVMESH_REQUIRE_NETNS=1`.
pub fn skip(test: &str, need_nft: bool) -> bool {
    let what = if need_nft { "root, ip netns and nft" } else { "root and ip netns" };
    let msg = match (missing(need_nft), kvmesh_bin()) {
        (Some(reason), _) => format!("skipped: {test} needs {what} ({reason})"),
        (None, Err(reason)) => format!("skipped: {test} needs the kvmesh binary ({reason})"),
        (None, Ok(_)) => return false,
    };
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{msg}, and {REQUIRE_ENV}=1 forbids skipping");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{msg}");
    true
}

/// The `kvmesh` binary the nodes run: `KVMESH_BIN`, or the one cargo built beside this test
/// (`cargo test --workspace` builds it for the node crate's own process tests).
///
/// The test cannot build it itself: cargo holds the target directory's lock while tests run, so
/// a nested `cargo build` there waits forever. A binary older than any source file cargo lists
/// for it (its dep-info, `kvmesh.d`) is refused rather than tested.
pub fn kvmesh_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(BIN_ENV) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("{BIN_ENV}={} is not a file", p.display())) };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/PROFILE/deps/netns-HASH -> target/PROFILE/kvmesh
    let profile_dir = exe.parent().and_then(Path::parent).ok_or("no target directory above the test")?;
    let bin = profile_dir.join("kvmesh");
    let build = format!(
        "run `cargo build -p kvmesh-node --bin kvmesh` (or `cargo test --workspace`, which builds it) first, or set {BIN_ENV}"
    );
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .map_err(|_| format!("no kvmesh binary at {}: {build}", bin.display()))?;
    let deps = std::fs::read_to_string(profile_dir.join("kvmesh.d")).unwrap_or_default();
    if let Some(newer) =
        dep_info_files(&deps).find(|f| std::fs::metadata(f).and_then(|m| m.modified()).is_ok_and(|t| t > built))
    {
        return Err(format!("{} is older than {}: {build}", bin.display(), newer.display()));
    }
    Ok(bin)
}

/// The prerequisites in a Makefile-style dep-info file (`target: a b\ c`), spaces unescaped.
fn dep_info_files(text: &str) -> impl Iterator<Item = PathBuf> + '_ {
    let first = text.lines().next().unwrap_or("");
    let deps = first.split_once(": ").map(|(_, d)| d).unwrap_or("");
    let mut files = Vec::new();
    let mut cur = String::new();
    let mut chars = deps.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ' ' => files.extend((!cur.is_empty()).then(|| PathBuf::from(std::mem::take(&mut cur)))),
            c => cur.push(c),
        }
    }
    files.extend((!cur.is_empty()).then(|| PathBuf::from(cur)));
    files.into_iter()
}

fn runs(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("`ip {}`: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Removes what test processes killed before their drop ran left behind: their nodes, still
/// running in their namespaces, and the namespaces (which take the veths with them).
fn remove_stale_namespaces() {
    let Ok(list) = try_ip(&["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name.strip_prefix(NS_PREFIX).and_then(|r| r.split('-').next()) else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            // Only processes inside that namespace, each by its id.
            for p in try_ip(&["netns", "pids", name]).unwrap_or_default().split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", p]).status();
            }
            let _ = try_ip(&["netns", "del", name]);
        }
    }
}

/// One node of a lab.
pub struct LabNode {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    child: Option<Child>,
    log: PathBuf,
}

impl LabNode {
    pub fn url(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.ip)
    }

    pub fn quic(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), QUIC_PORT)
    }
}

/// How to start a node.
#[derive(Default, Clone)]
pub struct NodeOpts {
    /// An edge node runs no engine: everything it serves crosses the mesh.
    pub edge: bool,
    /// Address peers dial for this node, when not its own (a relay in front of it).
    pub advertise: Option<SocketAddr>,
    /// Nodes to seed from; default: every other node of the lab.
    pub seeds: Option<Vec<usize>>,
}

/// Namespaces, links and `kvmesh` processes of one test; all of it goes when this drops.
pub struct Lab {
    pub nodes: Vec<LabNode>,
    pub host_ip: Ipv4Addr,
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    bridge_ns: String,
    host_if: String,
    /// Every namespace created, deleted on drop.
    namespaces: Vec<String>,
    cluster_id: String,
}

impl Lab {
    /// Makes `n` node namespaces on one bridge, with certificates from `kvmesh cert`; starts no
    /// process yet.
    pub fn new(tag: &str, n: usize) -> Self {
        remove_stale_namespaces();
        let bin = kvmesh_bin().expect("kvmesh binary");
        let pid = std::process::id();
        let seq = LAB_SEQ.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{NS_PREFIX}{pid}-{seq}-{tag}");
        let net = {
            let _g = SUBNET_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            free_subnet(pid, seq)
        };
        let mut lab = Lab {
            nodes: Vec::new(),
            host_ip: Ipv4Addr::new(10, net[0], net[1], 1),
            dir: tempfile::tempdir().expect("temp dir"),
            bin,
            bridge_ns: format!("{prefix}-br"),
            // At most 15 characters: "kvm" + pid (up to 7 digits) + "x" + seq.
            host_if: format!("kvm{pid}x{seq}"),
            namespaces: Vec::new(),
            cluster_id: format!("netns-{pid}-{seq}"),
        };
        let br = lab.bridge_ns.clone();
        lab.add_ns(&br);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        ip(&["link", "add", &lab.host_if, "type", "veth", "peer", "name", "host", "netns", &br]);
        ip(&["addr", "add", &format!("{}/24", lab.host_ip), "dev", &lab.host_if]);
        ip(&["link", "set", &lab.host_if, "up"]);
        ip(&["-n", &br, "link", "set", "host", "master", "br0", "up"]);
        for i in 0..n {
            let ns = format!("{prefix}-n{i}");
            lab.add_ns(&ns);
            let port = format!("p{i}");
            ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"]);
            let addr = Ipv4Addr::new(10, net[0], net[1], 10 + i as u8);
            ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            let log = lab.dir.path().join(format!("n{i}.log"));
            lab.nodes.push(LabNode { name: format!("n{i}"), ns, ip: addr, child: None, log });
        }
        let d = lab.dir.path().to_str().expect("utf-8 temp dir").to_owned();
        lab.kvmesh(&["cert", "ca", "--dir", &d, "--cluster-id", &lab.cluster_id.clone()]);
        for i in 0..n {
            lab.kvmesh(&["cert", "node", "--dir", &d, "--name", &format!("n{i}")]);
        }
        // Fast gossip and a fast simulator keep the tests short; the bound follows from these.
        let config = format!(
            "gossip_interval_ms = {GOSSIP_INTERVAL_MS}\nphi_threshold = {PHI_THRESHOLD:.1}\n\
             engine_poll_interval_ms = 100\nload_publish_interval_ms = 200\nsummary_interval_ms = 500\n\
             [embedded]\ntime_scale = 0.02\n\
             [auth]\nopen_admin = true\n"
        );
        std::fs::write(lab.dir.path().join("node.toml"), config).expect("write node.toml");
        lab
    }

    fn add_ns(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// Runs a `kvmesh` command on the host (certificates).
    fn kvmesh(&self, args: &[&str]) -> String {
        let out = Command::new(&self.bin).args(args).output().expect("run kvmesh");
        assert!(out.status.success(), "kvmesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts node `i` in its namespace: `ip netns exec NS kvmesh serve ...`. `ip netns exec`
    /// execs the command in place, so the child is the node process itself and SIGKILL hits it.
    pub fn start(&mut self, i: usize, opts: NodeOpts) {
        let seeds: Vec<String> = match &opts.seeds {
            Some(s) => s.iter().map(|&j| self.nodes[j].quic().to_string()).collect(),
            None => (0..self.nodes.len()).filter(|&j| j != i).map(|j| self.nodes[j].quic().to_string()).collect(),
        };
        let node = &self.nodes[i];
        let dir = self.dir.path();
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            node.ns.clone(),
            self.bin.display().to_string(),
            "serve".into(),
            "--config".into(),
            dir.join("node.toml").display().to_string(),
            "--node-name".into(),
            node.name.clone(),
            "--http-addr".into(),
            format!("{}:{HTTP_PORT}", node.ip),
            "--quic-addr".into(),
            node.quic().to_string(),
            "--tls-dir".into(),
            dir.display().to_string(),
            "--cluster-id".into(),
            self.cluster_id.clone(),
        ];
        if !seeds.is_empty() {
            args.extend(["--seeds".into(), seeds.join(",")]);
        }
        if opts.edge {
            args.extend(["--role".into(), "edge".into()]);
        }
        if let Some(a) = opts.advertise {
            args.extend(["--advertise-addr".into(), a.to_string()]);
        }
        let log = File::create(&node.log).expect("node log");
        let child = Command::new("ip")
            .args(&args)
            .env("RUST_LOG", "warn,kvmesh_gossip=info,kvmesh_transport=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start kvmesh in its namespace");
        self.nodes[i].child = Some(child);
    }

    /// SIGKILL: no goodbye to the mesh, the process and its QUIC endpoint just vanish.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            c.kill().expect("SIGKILL the node");
            let _ = c.wait();
        }
    }

    /// Takes node `i`'s only interface down or up, inside its namespace.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["-n", &self.nodes[i].ns, "link", "set", "eth0", if up { "up" } else { "down" }]);
    }

    /// Drops `percent`% of the UDP packets node `i` sends and of those it receives (nftables'
    /// `numgen random`): all of the mesh's traffic, gossip and forwarded requests, is QUIC. The
    /// test's own HTTP client is left alone: under 20% loss Linux TCP's SYN backoff (1, 3, 7,
    /// 15 s) made single requests take 14 s, which measures the kernel's TCP, not kvmesh.
    pub fn add_loss(&self, i: usize, percent: u32) {
        let ns = &self.nodes[i].ns;
        let nft = |args: &[&str]| {
            let mut full = vec!["netns", "exec", ns, "nft"];
            full.extend_from_slice(args);
            ip(&full);
        };
        nft(&["add", "table", "inet", "kvmesh_loss"]);
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            nft(&["add", "chain", "inet", "kvmesh_loss", chain, &format!("{{ type filter hook {hook} priority 0; }}")]);
            nft(&[
                "add",
                "rule",
                "inet",
                "kvmesh_loss",
                chain,
                "meta",
                "l4proto",
                "udp",
                "numgen",
                "random",
                "mod",
                "100",
                "<",
                &percent.to_string(),
                "counter",
                "drop",
            ]);
        }
    }

    /// Packets the loss rules dropped so far on node `i` (in + out), from nft's counters.
    pub fn loss_rules(&self, i: usize) -> String {
        ip(&["netns", "exec", &self.nodes[i].ns, "nft", "list", "table", "inet", "kvmesh_loss"])
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ({}) ---\n", n.name, n.ip));
            for l in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Node `i`'s live members as it reports them (`/v1/mesh/peers`), sorted; `None` when it
    /// does not answer.
    pub async fn view(&self, client: &reqwest::Client, i: usize) -> Option<Vec<String>> {
        let v = self.peers(client, i).await?;
        let mut names: Vec<String> =
            v["peers"].as_array()?.iter().filter_map(|p| p["node"].as_str().map(str::to_owned)).collect();
        names.sort();
        Some(names)
    }

    /// Node `i`'s `/v1/mesh/peers` answer.
    pub async fn peers(&self, client: &reqwest::Client, i: usize) -> Option<Value> {
        let r =
            client.get(format!("{}/v1/mesh/peers", self.nodes[i].url())).timeout(Duration::from_secs(2)).send().await;
        r.ok()?.json().await.ok()
    }

    /// Waits until each node in `who` sees exactly `want` with every worker's engine healthy;
    /// returns how long that took.
    pub async fn wait_views(
        &self,
        client: &reqwest::Client,
        who: &[usize],
        want: &[&str],
        limit: Duration,
    ) -> Duration {
        let t = Instant::now();
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        loop {
            let mut views = Vec::new();
            let mut ok = true;
            for &i in who {
                let p = self.peers(client, i).await;
                let names = self.view(client, i).await;
                let healthy = p.as_ref().and_then(|p| p["peers"].as_array()).is_some_and(|ps| {
                    ps.iter().all(|p| {
                        p["role"] == "edge"
                            || p["engines"].as_array().is_some_and(|e| e.iter().any(|e| e["healthy"] == true))
                    })
                });
                ok &= names.as_ref() == Some(&want) && healthy;
                views.push((self.nodes[i].name.clone(), names));
            }
            if ok {
                return t.elapsed();
            }
            assert!(t.elapsed() < limit, "views not {want:?} within {limit:?}: {views:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// 10.A.B.0/24 with A from the pid and B from the lab's sequence, skipping any the host already
/// has an address or route in (another test process, or the machine's own networks).
fn free_subnet(pid: u32, seq: u32) -> [u8; 2] {
    let used = format!(
        "{}\n{}",
        try_ip(&["-4", "-o", "addr"]).unwrap_or_default(),
        try_ip(&["-4", "route"]).unwrap_or_default()
    );
    let a = 100 + (pid % 100) as u8;
    (0..250u32)
        .map(|k| [a, (1 + (seq + k) % 250) as u8])
        .find(|[a, b]| !used.contains(&format!("10.{a}.{b}.")))
        .expect("a free 10.x.y.0/24 subnet")
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("node logs:\n{}", self.logs());
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Deleting a namespace destroys its veths and their peers, the host's one included.
        for ns in self.namespaces.iter().rev() {
            let _ = try_ip(&["netns", "del", ns]);
        }
        let _ = try_ip(&["link", "del", &self.host_if]);
    }
}

/// An HTTP client for the lab: no proxy from the environment (the nodes are on a private
/// bridge), bounded waits.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .build()
        .expect("HTTP client")
}

/// One chat completion as the client saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub served_by: String,
    pub route: String,
    pub took: Duration,
    pub error: Option<String>,
}

/// Sends a short, non-streamed chat completion with a prompt unique to `i` (no prefix affinity:
/// routing is by load and distance only).
pub async fn chat(client: &reqwest::Client, url: &str, i: usize) -> Answer {
    let body = json!({"model": "kvmesh-sim", "max_tokens": 4, "ignore_eos": true,
                      "messages": [{"role": "user", "content": format!("netns request {i}")}]});
    let t = Instant::now();
    let r = match client.post(format!("{url}/v1/chat/completions")).json(&body).send().await {
        Ok(r) => r,
        Err(e) => {
            return Answer {
                status: 0,
                served_by: String::new(),
                route: String::new(),
                took: t.elapsed(),
                error: Some(e.to_string()),
            }
        }
    };
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (status, served_by, route) = (r.status().as_u16(), header("x-kvmesh-served-by"), header("x-kvmesh-route"));
    let error = match r.text().await {
        Ok(_) if status == 200 => None,
        Ok(text) => Some(text),
        Err(e) => Some(format!("body: {e}")),
    };
    Answer { status, served_by, route, took: t.elapsed(), error }
}

/// A UDP relay with a fixed one-way delay in each direction: stands in for a distant link where
/// netem is missing. Each client address gets its own upstream socket, so the upstream sees
/// one peer per client, as through NAT. Stops when dropped.
pub struct DelayRelay {
    pub addr: SocketAddr,
    cancel: CancellationToken,
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type Delayed = (tokio::time::Instant, Option<SocketAddr>, Vec<u8>);

impl DelayRelay {
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, one_way: Duration) -> Self {
        let front = Arc::new(UdpSocket::bind(listen).await.expect("bind relay"));
        let addr = front.local_addr().expect("relay address");
        let cancel = CancellationToken::new();
        let (back_tx, back_rx) = mpsc::unbounded_channel::<Delayed>();
        tokio::spawn(send_delayed(front.clone(), back_rx, cancel.clone()));
        let stop = cancel.clone();
        tokio::spawn(async move {
            let mut clients: HashMap<SocketAddr, mpsc::UnboundedSender<Delayed>> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = front.recv_from(&mut buf) => match r { Ok(x) => x, Err(_) => continue },
                };
                let tx = clients.entry(from).or_insert_with(|| {
                    let up = std::net::UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).expect("relay upstream socket");
                    up.connect(upstream).expect("relay connect");
                    up.set_nonblocking(true).expect("nonblocking");
                    let up = Arc::new(UdpSocket::from_std(up).expect("tokio socket"));
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(send_delayed(up.clone(), rx, stop.clone()));
                    let (back, stop) = (back_tx.clone(), stop.clone());
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        loop {
                            let n = tokio::select! {
                                _ = stop.cancelled() => return,
                                r = up.recv(&mut buf) => match r { Ok(n) => n, Err(_) => continue },
                            };
                            let due = tokio::time::Instant::now() + one_way;
                            if back.send((due, Some(from), buf[..n].to_vec())).is_err() {
                                return;
                            }
                        }
                    });
                    tx
                });
                let _ = tx.send((tokio::time::Instant::now() + one_way, None, buf[..n].to_vec()));
            }
        });
        DelayRelay { addr, cancel }
    }
}

/// Sends each packet at its due time, in arrival order (one queue per direction keeps order).
async fn send_delayed(sock: Arc<UdpSocket>, mut rx: mpsc::UnboundedReceiver<Delayed>, stop: CancellationToken) {
    loop {
        let (due, to, pkt) = tokio::select! {
            _ = stop.cancelled() => return,
            p = rx.recv() => match p { Some(p) => p, None => return },
        };
        tokio::time::sleep_until(due).await;
        let _ = match to {
            Some(a) => sock.send_to(&pkt, a).await,
            None => sock.send(&pkt).await,
        };
    }
}
