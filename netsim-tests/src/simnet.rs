//! A simulated UDP network for fault tests. Each node's QUIC endpoint gets a `SimSocket`
//! (quinn's `AsyncUdpSocket`) instead of a UDP port, and every datagram it sends goes through
//! one in-process `SimNet`, which applies per-directed-link rules: delay plus jitter, loss, one-
//! or two-way partitions, and nodes taken off the network. Everything above the socket is the
//! product code unchanged: quinn, TLS, the pooled endpoint, chitchat, routing.
//!
//! The fabric runs on whatever clock tokio has: `tests/virtual_time.rs` drives membership and
//! gossip (quinn, TLS, chitchat on `SimSocket`) on tokio's paused clock. Whole nodes run in real
//! time (`tests/faults.rs`): a node talks to its engine over real loopback HTTP and ZeroMQ, and
//! the engine simulator runs on the real clock, which a paused clock cannot drive.
//!
//! Determinism: a drop (and a jitter) is a pure function of the net's seed, the link
//! (source, destination) and the datagram's index on that link, so a link's k-th datagram meets
//! the same fate in every run. Which datagram is the k-th still depends on task scheduling, so
//! a run as a whole is reproducible in its rules, not bit for bit.
//!
//! No task is spawned: a datagram waits in its receiver's queue, ordered by when it is due,
//! and the receiver's `poll_recv` arms a timer for the earliest one.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::time::{Instant, Sleep};

/// Datagrams waiting at one socket; beyond this they are dropped, as a full kernel buffer would.
const RECV_QUEUE: usize = 16 * 1024;
/// The port every simulated node binds (each has its own address).
pub const PORT: u16 = 7946;

/// What happens to datagrams on one directed link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkRule {
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay drawn uniformly in `[0, jitter)` per datagram (so datagrams can reorder).
    pub jitter: Duration,
    /// Probability that a datagram is lost, in `[0, 1]`.
    pub loss: f64,
}

impl Default for LinkRule {
    /// A quiet LAN: half a millisecond, a little jitter, no loss.
    fn default() -> Self {
        Self { delay: Duration::from_micros(500), jitter: Duration::from_micros(200), loss: 0.0 }
    }
}

/// Counters over the whole net since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NetStats {
    pub delivered: u64,
    /// Lost to a link's loss probability.
    pub lost: u64,
    /// Dropped by a partition or because an end was down.
    pub cut: u64,
    /// Sent to an address with no socket, or to a full queue.
    pub undeliverable: u64,
}

#[derive(Default)]
struct State {
    sockets: HashMap<SocketAddr, Weak<SimSocket>>,
    names: HashMap<String, SocketAddr>,
    default_rule: LinkRule,
    rules: HashMap<(SocketAddr, SocketAddr), LinkRule>,
    blocked: HashSet<(SocketAddr, SocketAddr)>,
    down: HashSet<SocketAddr>,
    /// Datagrams sent so far per directed link: the index drop decisions hash.
    sent: HashMap<(SocketAddr, SocketAddr), u64>,
    stats: NetStats,
}

struct Inner {
    seed: u64,
    state: Mutex<State>,
}

/// The network. Clones share it.
#[derive(Clone)]
pub struct SimNet {
    inner: Arc<Inner>,
}

impl SimNet {
    pub fn new(seed: u64) -> Self {
        Self { inner: Arc::new(Inner { seed, state: Mutex::new(State::default()) }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// The address of the host called `name`: assigned on first use (10.77.x.y:7946) and the
    /// same ever after, so a node restarted under its name comes back at its old address.
    pub fn addr(&self, name: &str) -> SocketAddr {
        let mut st = self.state();
        let next = st.names.len() as u32;
        *st.names.entry(name.to_owned()).or_insert_with(|| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 1)) + next);
            SocketAddr::new(IpAddr::V4(ip), PORT)
        })
    }

    /// A socket bound at `name`'s address. It replaces any earlier socket there: the process
    /// that held it is gone, and datagrams for the address now reach the new one.
    pub fn socket(&self, name: &str) -> Arc<SimSocket> {
        let addr = self.addr(name);
        let socket = Arc::new(SimSocket { addr, net: self.inner.clone(), rx: Mutex::new(RxQueue::default()) });
        self.state().sockets.insert(addr, Arc::downgrade(&socket));
        socket
    }

    /// The rule for every link without one of its own.
    pub fn set_default(&self, rule: LinkRule) {
        self.state().default_rule = rule;
    }

    /// Sets loss on every link (the default rule and each link's own).
    pub fn set_loss(&self, loss: f64) {
        let mut st = self.state();
        st.default_rule.loss = loss;
        for r in st.rules.values_mut() {
            r.loss = loss;
        }
    }

    /// A rule for the link `from -> to` only.
    pub fn set_link(&self, from: SocketAddr, to: SocketAddr, rule: LinkRule) {
        self.state().rules.insert((from, to), rule);
    }

    /// Drops everything sent from `from` to `to` (the other direction is untouched).
    pub fn block(&self, from: SocketAddr, to: SocketAddr) {
        self.state().blocked.insert((from, to));
    }

    /// Cuts every link between the two sides, both ways.
    pub fn partition(&self, a: &[SocketAddr], b: &[SocketAddr]) {
        let mut st = self.state();
        for &x in a {
            for &y in b {
                st.blocked.insert((x, y));
                st.blocked.insert((y, x));
            }
        }
    }

    /// Removes every block and partition (nodes taken down stay down).
    pub fn heal(&self) {
        self.state().blocked.clear();
    }

    /// Takes a host off the network (`true`) or puts it back: its process keeps running, but
    /// nothing it sends or is sent arrives, as with a pulled cable.
    pub fn set_down(&self, addr: SocketAddr, down: bool) {
        let mut st = self.state();
        if down {
            st.down.insert(addr);
        } else {
            st.down.remove(&addr);
        }
    }

    pub fn stats(&self) -> NetStats {
        self.state().stats
    }

    /// Decides one datagram's fate and queues it at the receiver when it survives.
    fn send(inner: &Inner, from: SocketAddr, to: SocketAddr, data: &[u8]) {
        let delivery = {
            let mut st = lock(&inner.state);
            if st.down.contains(&from) || st.down.contains(&to) || st.blocked.contains(&(from, to)) {
                st.stats.cut += 1;
                return;
            }
            let rule = st.rules.get(&(from, to)).copied().unwrap_or(st.default_rule);
            let n = {
                let c = st.sent.entry((from, to)).or_insert(0);
                *c += 1;
                *c
            };
            let draw = link_draw(inner.seed, from, to, n);
            if unit(draw) < rule.loss {
                st.stats.lost += 1;
                return;
            }
            let Some(socket) = st.sockets.get(&to).and_then(Weak::upgrade) else {
                st.stats.undeliverable += 1;
                return;
            };
            let jitter = rule.jitter.mul_f64(unit(splitmix(draw)));
            (socket, Instant::now() + rule.delay + jitter)
        };
        let (socket, due) = delivery;
        let waker = {
            let mut rx = lock(&socket.rx);
            if rx.queue.len() >= RECV_QUEUE {
                drop(rx);
                lock(&inner.state).stats.undeliverable += 1;
                return;
            }
            rx.seq += 1;
            let seq = rx.seq;
            rx.queue.push(Datagram { due, seq, from, data: data.to_vec() });
            rx.waker.take()
        };
        lock(&inner.state).stats.delivered += 1;
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A poisoned lock only means a test panicked elsewhere; the fabric's state is still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn addr_bits(a: SocketAddr) -> u64 {
    let ip = match a.ip() {
        IpAddr::V4(v) => u64::from(u32::from(v)),
        IpAddr::V6(v) => {
            let b = u128::from(v);
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    (ip << 16) | u64::from(a.port())
}

/// The random draw for the `n`-th datagram on `from -> to`: the same in every run.
fn link_draw(seed: u64, from: SocketAddr, to: SocketAddr, n: u64) -> u64 {
    splitmix(splitmix(splitmix(seed ^ addr_bits(from)) ^ addr_bits(to)) ^ n)
}

/// A draw mapped to `[0, 1)`.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

struct Datagram {
    due: Instant,
    seq: u64,
    from: SocketAddr,
    data: Vec<u8>,
}

// Ordered so that `BinaryHeap` (a max-heap) pops the earliest due first, ties in send order.
impl Ord for Datagram {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}
impl PartialOrd for Datagram {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Datagram {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}
impl Eq for Datagram {}

#[derive(Default)]
struct RxQueue {
    queue: BinaryHeap<Datagram>,
    seq: u64,
    /// The endpoint driver waiting for a datagram.
    waker: Option<Waker>,
    /// Wakes the driver when the earliest queued datagram falls due.
    timer: Option<Pin<Box<Sleep>>>,
}

/// One host's socket on a `SimNet`.
pub struct SimSocket {
    addr: SocketAddr,
    net: Arc<Inner>,
    rx: Mutex<RxQueue>,
}

impl fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimSocket").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Sends never block on the simulated network, so the socket is always writable.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // One datagram per transmit (max_transmit_segments is 1), but split a batch anyway.
        let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for datagram in transmit.contents.chunks(size) {
            SimNet::send(&self.net, self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.rx);
        let now = Instant::now();
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            if rx.queue.peek().is_none_or(|d| d.due > now) {
                break;
            }
            let Some(d) = rx.queue.pop() else { break };
            let len = d.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&d.data[..len]);
            meta[n] = RecvMeta { addr: d.from, len, stride: len, ecn: None, dst_ip: Some(self.addr.ip()) };
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        rx.waker = Some(cx.waker().clone());
        if let Some(due) = rx.queue.peek().map(|d| d.due) {
            let timer = rx.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            timer.as_mut().reset(due);
            if timer.as_mut().poll(cx).is_ready() {
                // Fell due while we looked: have the driver poll again at once.
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_a_function_of_seed_link_and_index() {
        let (a, b) = ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
        let fate = |seed| (0..1000).map(|n| unit(link_draw(seed, a, b, n)) < 0.2).collect::<Vec<_>>();
        assert_eq!(fate(7), fate(7));
        assert_ne!(fate(7), fate(8));
        let lost = fate(7).iter().filter(|l| **l).count();
        assert!((150..250).contains(&lost), "{lost} of 1000 lost at p = 0.2");
    }

    #[tokio::test]
    async fn delivers_in_due_order_and_honours_partitions_and_down_hosts() {
        let net = SimNet::new(1);
        let (a, b) = (net.socket("a"), net.socket("b"));
        net.set_default(LinkRule { delay: Duration::from_millis(5), jitter: Duration::ZERO, loss: 0.0 });
        let send = |from: &SimSocket, to: SocketAddr, byte: u8| {
            let t = Transmit { destination: to, ecn: None, contents: &[byte], segment_size: None, src_ip: None };
            from.try_send(&t).unwrap();
        };
        let recv = |s: Arc<SimSocket>| async move {
            let mut buf = [0u8; 8];
            let mut meta = [RecvMeta::default()];
            std::future::poll_fn(|cx| s.poll_recv(cx, &mut [IoSliceMut::new(&mut buf)], &mut meta)).await.unwrap();
            (buf[0], meta[0].addr)
        };
        send(&a, b.addr, 1);
        send(&a, b.addr, 2);
        assert_eq!(recv(b.clone()).await, (1, a.addr));
        assert_eq!(recv(b.clone()).await, (2, a.addr));
        net.block(a.addr, b.addr);
        send(&a, b.addr, 3);
        send(&b, a.addr, 4);
        assert_eq!(recv(a.clone()).await, (4, b.addr), "a one-way block leaves the other direction");
        net.heal();
        net.set_down(b.addr, true);
        send(&a, b.addr, 5);
        net.set_down(b.addr, false);
        send(&a, b.addr, 6);
        assert_eq!(recv(b.clone()).await, (6, a.addr));
        let s = net.stats();
        assert_eq!((s.delivered, s.cut), (4, 2));
    }
}
