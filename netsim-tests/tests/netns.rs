//! Real-kernel network tests: one `kvmesh` process per network namespace on a bridge, faults
//! made by the kernel (SIGKILL, a link taken down, nftables packet loss) and delay by a UDP
//! relay. They need root and `ip netns` (and `nft` for loss); without them each test prints
//! `skipped: ...` and passes, unless `KVMESH_REQUIRE_NETNS=1`. See `kvmesh_netsim_tests::netns`.
//!
//! Topology of most scenarios: `n0` is an edge node (no engine, so everything it serves crosses
//! the mesh), `n1`..`n3` are workers with the embedded simulator.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvmesh_netsim_tests::netns::{self, chat, client, Answer, DelayRelay, Lab, NodeOpts};

/// The scenarios share two cores with their nodes; one at a time, so that a starved CPU cannot
/// pass for (or hide) a network fault.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const ALL: [&str; 4] = ["n0", "n1", "n2", "n3"];

/// Longest a request may take across a fault: the transport's idle timeout (3 s), which ends a
/// forward to a peer gone silent, plus the retry and a loaded machine's slack.
const SLOWEST: Duration = Duration::from_secs(6);

async fn mesh_of_four(tag: &str) -> (Lab, reqwest::Client) {
    let mut lab = Lab::new(tag, 4);
    lab.start(0, NodeOpts { edge: true, ..Default::default() });
    for i in 1..4 {
        lab.start(i, NodeOpts::default());
    }
    let c = client();
    let took = lab.wait_views(&c, &[0, 1, 2, 3], &ALL, Duration::from_secs(20)).await;
    eprintln!("{tag}: 4 namespaces in one mesh after {took:?}");
    (lab, c)
}

/// Requests sent without pause by two clients, round-robin over `urls`, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<(Instant, String, Answer)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &reqwest::Client, urls: Vec<String>) -> Self {
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        // `sent` numbers the requests, so every prompt is new (no prefix affinity).
        let answers = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..2)
            .map(|_| {
                let (c, urls, stop, sent, answers) =
                    (c.clone(), urls.clone(), stop.clone(), sent.clone(), answers.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::SeqCst) {
                        let i = sent.fetch_add(1, Ordering::SeqCst);
                        let url = &urls[i % urls.len()];
                        let at = Instant::now();
                        let a = chat(&c, url, i).await;
                        answers.lock().expect("answers").push((at, url.clone(), a));
                    }
                })
            })
            .collect();
        Load { stop, answers, tasks }
    }

    fn answered(&self) -> usize {
        self.answers.lock().expect("answers").len()
    }

    /// Waits until `n` more answers have come back.
    async fn more(&self, n: usize, limit: Duration) {
        let (start, t) = (self.answered(), Instant::now());
        while self.answered() < start + n {
            assert!(t.elapsed() < limit, "load stalled: {} answers in {limit:?}", self.answered() - start);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops, and checks that every request succeeded; returns the answers with send times.
    async fn finish(self, what: &str) -> Vec<(Instant, String, Answer)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load task");
        }
        let answers = std::mem::take(&mut *self.answers.lock().expect("answers"));
        let failed: Vec<_> = answers.iter().filter(|(_, _, a)| a.status != 200).collect();
        let slowest = answers.iter().map(|(_, _, a)| a.took).max().unwrap_or_default();
        eprintln!("{what}: {} requests, {} failed, slowest {slowest:?}", answers.len(), failed.len());
        assert!(failed.is_empty(), "{what}: failed requests: {failed:#?}");
        // A request forwarded into the fault waits for QUIC's idle timeout (3 s) before it is
        // retried elsewhere; nothing should wait much longer.
        assert!(slowest < SLOWEST, "{what}: a request took {slowest:?}");
        answers
    }
}

/// Waits until none of `who` lists `name`; returns how long that took, failing past `limit`.
async fn wait_gone(lab: &Lab, c: &reqwest::Client, who: &[usize], name: &str, limit: Duration) -> Duration {
    let t = Instant::now();
    loop {
        let mut views = Vec::new();
        for &i in who {
            views.push((i, lab.view(c, i).await));
        }
        if views.iter().all(|(_, v)| v.as_ref().is_some_and(|v| !v.iter().any(|n| n == name))) {
            return t.elapsed();
        }
        assert!(t.elapsed() < limit, "{name} still in a view after {limit:?}: {views:?}\n{}", lab.logs());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn route_field<'a>(route: &'a str, key: &str) -> Option<&'a str> {
    route.split("; ").find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Node loss by SIGKILL: no goodbye, the peers' failure detectors must notice. Requests sent to
/// the survivors all succeed (those caught on the dead node are retried elsewhere), and the dead
/// node leaves every survivor's view within the bound computed from the gossip settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_views_within_the_bound_and_survivors_serve() {
    if netns::skip("sigkill_leaves_views_within_the_bound_and_survivors_serve", false) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    let (mut lab, c) = mesh_of_four("kill").await;
    let load = Load::start(&c, vec![lab.nodes[0].url(), lab.nodes[2].url(), lab.nodes[3].url()]);
    load.more(10, Duration::from_secs(10)).await;

    let bound = netns::failure_detection_bound();
    let killed = Instant::now();
    lab.kill(1);
    let took = wait_gone(&lab, &c, &[0, 2, 3], "n1", bound).await;
    eprintln!("sigkill: n1 left every survivor's view after {took:?} (bound {bound:?})");
    load.more(10, Duration::from_secs(10)).await;
    let answers = load.finish("sigkill").await;
    let detected = killed + took;
    let late: Vec<_> = answers.iter().filter(|(at, _, a)| *at > detected && a.served_by.starts_with("n1/")).collect();
    assert!(late.is_empty(), "served by the dead node after it left the views: {late:?}");
    assert!(answers.iter().any(|(at, _, _)| *at > detected), "no request sent after the detection");
}

/// A link cut (`ip link set eth0 down` in n1's namespace): n1 leaves the others' views within
/// the bound while requests keep succeeding; with the link back up it rejoins every view and
/// serves forwarded requests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_leaves_views_and_the_node_rejoins_when_it_returns() {
    if netns::skip("link_cut_leaves_views_and_the_node_rejoins_when_it_returns", false) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    let (lab, c) = mesh_of_four("cut").await;
    let load = Load::start(&c, vec![lab.nodes[0].url(), lab.nodes[2].url(), lab.nodes[3].url()]);
    load.more(10, Duration::from_secs(10)).await;

    let bound = netns::failure_detection_bound();
    lab.set_link(1, false);
    let took = wait_gone(&lab, &c, &[0, 2, 3], "n1", bound).await;
    eprintln!("link cut: n1 left every other view after {took:?} (bound {bound:?})");
    load.more(10, Duration::from_secs(10)).await;

    let restored = Instant::now();
    lab.set_link(1, true);
    let rejoined = lab.wait_views(&c, &[0, 1, 2, 3], &ALL, Duration::from_secs(15)).await;
    eprintln!("link restored: all four views complete again after {rejoined:?}");
    load.more(10, Duration::from_secs(10)).await;
    load.finish("link cut").await;

    // The forward path to n1 works again, not only gossip: the edge sends it requests. Idle
    // engines are near-equal, so the edge's random pick among them reaches n1 soon, once n1 is
    // no longer skipped for a forward that failed in the cut: forwards sent until n1 left the
    // views fail up to 3 s (QUIC idle timeout) later, each then skips n1 for `peer_suspect_ms`
    // (3 s). Measured 0.4 to 5.5 s after the restore.
    let mut i = 1_000_000;
    loop {
        let a = chat(&c, &lab.nodes[0].url(), i).await;
        assert_eq!(a.status, 200, "{a:?}");
        if a.served_by.starts_with("n1/") {
            eprintln!("link restored: n1 served a forwarded request after {:?}", restored.elapsed());
            break;
        }
        let limit = netns::failure_detection_bound() + Duration::from_secs(3 + 3 + 2);
        assert!(restored.elapsed() < limit, "the edge never forwarded to n1 again");
        i += 1;
    }
}

/// 20% loss of the mesh's packets (UDP: QUIC) both ways on the edge node's interface
/// (nftables): every request through it still completes, each crossing the lossy link to a
/// worker and back (QUIC retransmits), and no node's failure detector drops a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_loss_keeps_requests_completing_and_views_whole() {
    if netns::skip("packet_loss_keeps_requests_completing_and_views_whole", true) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    let (lab, c) = mesh_of_four("loss").await;
    lab.add_loss(0, 20);
    let load = Load::start(&c, vec![lab.nodes[0].url()]);
    // Longer than the detection bound, so a detector misled by late heartbeats would show.
    let window = netns::failure_detection_bound() + Duration::from_secs(3);
    let t = Instant::now();
    let (mut samples, mut edge_samples) = (0, 0);
    while t.elapsed() < window {
        for i in 1..4 {
            let v = lab.view(&c, i).await;
            assert_eq!(v.as_deref(), Some(&ALL.map(String::from)[..]), "n{i}'s view under loss\n{}", lab.logs());
            samples += 1;
        }
        // The edge answers over the lossy link; a query lost in it is not a verdict.
        if let Some(v) = tokio::time::timeout(Duration::from_millis(500), lab.view(&c, 0)).await.ok().flatten() {
            assert_eq!(v, ALL.map(String::from), "n0's view under loss\n{}", lab.logs());
            edge_samples += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answers = load.finish("20% loss").await;
    let rules = lab.loss_rules(0);
    let dropped: Vec<u64> =
        rules.split("packets ").skip(1).filter_map(|s| s.split_whitespace().next()?.parse().ok()).collect();
    eprintln!(
        "20% loss: {} answers, views whole in {samples} + {edge_samples} samples, dropped {dropped:?} (in, out)",
        answers.len()
    );
    assert!(answers.len() >= 10, "too few requests got through to prove anything");
    assert!(dropped.len() == 2 && dropped.iter().all(|&d| d > 0), "the loss rules dropped nothing: {rules}");
}

/// Delay: n2's QUIC traffic from its peers passes a user-space relay adding 40 ms each way (n2
/// advertises the relay's address). The edge measures that RTT on its QUIC connection and scores
/// with it: requests go to the near worker n1, with n2 as runner-up predicted at least the RTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_through_a_relay_shows_in_route_scoring() {
    if netns::skip("delay_through_a_relay_shows_in_route_scoring", false) {
        return;
    }
    let _one_at_a_time = SERIAL.lock().await;
    let mut lab = Lab::new("delay", 3);
    let one_way = Duration::from_millis(40);
    let relay = DelayRelay::start((lab.host_ip, 0).into(), lab.nodes[2].quic(), one_way).await;
    lab.start(0, NodeOpts { edge: true, seeds: Some(vec![1]), ..Default::default() });
    lab.start(1, NodeOpts { seeds: Some(vec![0]), ..Default::default() });
    lab.start(2, NodeOpts { seeds: Some(vec![1]), advertise: Some(relay.addr), ..Default::default() });
    let c = client();
    lab.wait_views(&c, &[0, 1, 2], &ALL[..3], Duration::from_secs(20)).await;

    let rtt_ms = 2.0 * one_way.as_secs_f64() * 1000.0;
    let runner_up_ms = |a: &Answer| -> Option<f64> {
        let r = route_field(&a.route, "runner_up")?.strip_prefix("n2/")?;
        r.split_once('@')?.1.parse().ok()
    };
    // Until the edge has a connection to the relay, n2's RTT is unmeasured; wait for it.
    let t = Instant::now();
    let mut i = 0;
    loop {
        let a = chat(&c, &lab.nodes[0].url(), i).await;
        assert_eq!(a.status, 200, "{a:?}");
        if runner_up_ms(&a).is_some_and(|ms| ms >= rtt_ms * 0.9) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "the relay's delay never showed in routing: {a:?}");
        i += 1;
    }
    for i in 100..110 {
        let a = chat(&c, &lab.nodes[0].url(), i).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.served_by.starts_with("n1/"), "the far worker was chosen: {a:?}");
        let chosen: f64 = route_field(&a.route, "predicted_ms").and_then(|v| v.parse().ok()).expect("predicted_ms");
        let far = runner_up_ms(&a).expect("n2 is the runner-up");
        assert!(far >= rtt_ms * 0.9 && chosen < far - rtt_ms * 0.5, "RTT {rtt_ms} ms not in the scores: {}", a.route);
        if i == 100 {
            eprintln!("delay: {}", a.route);
        }
    }
}
