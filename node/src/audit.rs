//! The audit trail: one JSON Lines record per request on the node that received it,
//! hash-chained so that an edited or deleted record is detectable (`kvmesh audit verify`).
//!
//! **Line format.** Each line is a JSON object whose last member is `"hash"`:
//! `{...,"prev":"<hex>","seq":N,...,"hash":"<hex>"}`. `hash` is the SHA-256 of the line's exact
//! bytes without the `,"hash":"…"` member (that is, the object closed right after its other
//! members), and `prev` is the previous record's `hash` (64 zeros for the first record ever).
//! `seq` counts up by one across files. So:
//! - an edited line no longer matches its own hash (or, if the editor recomputed it, the next
//!   line's `prev` no longer matches);
//! - a deleted line breaks the next line's `seq` and `prev`;
//! - hashing exact bytes needs no canonical JSON.
//!
//! The chain is tamper-evident, not tamper-proof: someone who can rewrite the whole file from
//! the edit onward, or cut its tail, is not caught by the chain alone. Shipping the file (or
//! its last hash) off the node closes that gap.
//!
//! **Durability.** A dedicated thread owns the file. It takes records from a bounded queue in
//! batches, writes each batch to the OS at once, then acknowledges them; a request's answer
//! completes only after that acknowledgement, so a process crash (`kill -9`) loses no record of
//! an answered request: at most the records of requests still in flight. `fsync` runs every
//! `fsync_interval_ms` or every `fsync_records` records, whichever comes first; that is what a
//! power loss or kernel crash can lose. A record torn by a crash mid-write is cut off when the
//! node starts again, and `audit verify` reports a torn final line without calling it tampering.
//!
//! **Back-pressure.** The queue holds `queue` records. With `on_full = "reject"` (the default)
//! every admitted request holds a queue slot until its record is written, so when the log falls
//! behind new requests get 503 instead of going unrecorded. With `on_full = "drop"` a record
//! that finds the queue full is dropped, counted (`kvmesh_audit_records_dropped_total`), logged,
//! and the next record written is preceded by a `{"type":"gap","dropped":N}` record, so the gap
//! is part of the chain.
//!
//! **Rotation.** When the file passes `max_bytes` it is renamed `FILE.1`, `FILE.2`, … (higher is
//! newer) and a new `FILE` continues the same chain. Rotated files are never deleted here.
//!
//! Why one long file: the writer, the chain and `verify` must agree byte for byte on the line
//! format, so they live together; the last ~130 lines are its tests.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::NodeError;

pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// `,"hash":"` + 64 hex + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The JSON Lines file. Unset: no audit trail.
    pub path: Option<PathBuf>,
    /// Records that may wait for the writer (and, with `on_full = "reject"`, requests in flight).
    pub queue: usize,
    pub on_full: OnFull,
    /// Longest time a written record waits for `fsync`.
    pub fsync_interval_ms: u64,
    /// Most records written between two `fsync`s.
    pub fsync_records: u64,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Also record the prompt and the answer text (after redaction). Off by default.
    pub record_text: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            queue: 4096,
            on_full: OnFull::Reject,
            fsync_interval_ms: 100,
            fsync_records: 512,
            max_bytes: 256 * 1024 * 1024,
            record_text: false,
        }
    }
}

impl AuditConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.path.is_none() {
            return Ok(());
        }
        if self.queue == 0 {
            return Err("[audit] queue must be at least 1".into());
        }
        if self.fsync_interval_ms == 0 || self.fsync_records == 0 {
            return Err("[audit] fsync_interval_ms and fsync_records must be greater than 0".into());
        }
        if self.max_bytes < 4096 {
            return Err(format!("[audit] max_bytes must be at least 4096, got {}", self.max_bytes));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Answer new requests 503 while the queue is full.
    #[default]
    Reject,
    /// Serve, drop the record, count it and chain a gap record.
    Drop,
}

/// What one guardrail hook decided: the `verdict` of an audit record's hook entry and the
/// `kvmesh_guardrail_verdicts_total` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Allow,
    Deny,
    Rewrite,
    /// A webhook asked to rewrite a streamed answer already sent: recorded, not applied.
    RewriteTooLate,
    /// The hook failed and is configured to let the request through.
    ErrorOpen,
    /// The hook failed and is configured to block.
    ErrorClosed,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Rewrite => "rewrite",
            Verdict::RewriteTooLate => "rewrite_too_late",
            Verdict::ErrorOpen => "error_open",
            Verdict::ErrorClosed => "error_closed",
        }
    }

    /// Whether the request (or answer) stops here.
    pub fn blocks(self) -> bool {
        matches!(self, Verdict::Deny | Verdict::ErrorClosed)
    }
}

/// What happened to one request, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    #[default]
    Ok,
    /// Refused (auth, limits, guardrails, no engine) or answered with an error.
    Rejected,
    /// A stream cut by a guardrail.
    GuardrailStopped,
    /// The answer failed mid-way.
    StreamError,
    /// The client left before the answer ended.
    ClientGone,
}

/// One hook's verdict on one request, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookVerdict {
    pub hook: String,
    pub stage: String,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What happened to one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix time in milliseconds when the request arrived.
    pub time_ms: u64,
    pub request_id: String,
    pub node: String,
    /// For a request a peer forwarded: the node that admitted it from its client (which holds
    /// the record the client's answer waited for).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub tenant: Option<String>,
    pub model: Option<String>,
    pub endpoint: String,
    pub stream: bool,
    pub status: u16,
    pub outcome: Outcome,
    /// `node/engine` that answered, and the routing decision (`x-kvmesh-route`).
    pub served_by: Option<String>,
    pub route: Option<String>,
    /// Prefill/decode split, when the request was disaggregated: `prefill=NODE/ENGINE;
    /// decode=NODE/ENGINE`.
    pub pd: Option<String>,
    /// SHA-256 (hex) of the request body as the client sent it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
    /// SHA-256 (hex) of the answer's bytes as sent to the client (a stream's up to its closing
    /// `[DONE]` or error event, which wait for this record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_sha256: Option<String>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub latency_ms: f64,
    pub guardrails: Vec<HookVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Entry<'a> {
    Request(&'a AuditRecord),
    Gap { dropped: u64, time_ms: u64 },
}

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    prev: &'a str,
    #[serde(flatten)]
    entry: Entry<'a>,
}

/// The chained line for `entry` after `(seq, prev)`, and its hash.
fn chain_line(seq: u64, prev: &str, entry: Entry<'_>) -> Result<(String, String), serde_json::Error> {
    let body = serde_json::to_string(&Line { seq, prev, entry })?;
    let hash = hex::encode(Sha256::digest(body.as_bytes()));
    // The object minus its closing brace, then the hash as its last member.
    let mut line = String::with_capacity(body.len() + HASH_SUFFIX_LEN + 1);
    line.push_str(&body[..body.len() - 1]);
    line.push_str(",\"hash\":\"");
    line.push_str(&hash);
    line.push_str("\"}\n");
    Ok((line, hash))
}

/// Audit metrics, registered by `NodeMetrics`.
#[derive(Clone)]
pub struct AuditMetrics {
    pub queue_depth: IntGauge,
    pub written: IntCounter,
    pub dropped: IntCounter,
    pub write_errors: IntCounter,
}

enum Msg {
    Record(Box<AuditRecord>, Option<tokio::sync::oneshot::Sender<()>>),
    Stop,
}

struct Shared {
    tx: SyncSender<Msg>,
    /// Slots held: records queued plus, in reject mode, requests that reserved one.
    held: AtomicUsize,
    capacity: usize,
    on_full: OnFull,
    /// Dropped since the last gap record.
    dropped: AtomicU64,
    metrics: AuditMetrics,
    /// Test hook (unit tests and the `testsuite` feature): the writer's next batches fail after
    /// writing half their bytes, as a full disk would make them.
    #[cfg(any(test, feature = "testsuite"))]
    fail_writes: AtomicU64,
}

impl Shared {
    fn try_hold(&self) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| (h < self.capacity).then_some(h + 1))
            .map(|h| self.metrics.queue_depth.set(h as i64 + 1))
            .is_ok()
    }

    fn release(&self) {
        let prev = self.held.fetch_sub(1, Ordering::AcqRel);
        self.metrics.queue_depth.set(prev.saturating_sub(1) as i64);
    }
}

/// The writer's handle: reserve a slot per request, submit its record at the end.
pub struct AuditLog {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub record_text: bool,
    /// What a request whose record cannot be written gets: `Reject` withholds its answer.
    pub on_full: OnFull,
}

/// A request's place in the audit queue.
pub struct Slot {
    shared: Arc<Shared>,
    held: bool,
}

impl Slot {
    /// Queues the record. The receiver fires once it is written to the OS (not yet fsynced);
    /// `None` when it was dropped (drop mode, queue full).
    pub fn submit(mut self, rec: AuditRecord) -> Option<tokio::sync::oneshot::Receiver<()>> {
        if !self.held && !self.shared.try_hold() {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            self.shared.metrics.dropped.inc();
            tracing::warn!(request_id = %rec.request_id, "audit queue full: record dropped (a gap record will mark it)");
            return None;
        }
        // The slot now belongs to the queued record; the writer releases it.
        self.held = false;
        let (tx, rx) = tokio::sync::oneshot::channel();
        match self.shared.tx.try_send(Msg::Record(Box::new(rec), Some(tx))) {
            Ok(()) => Some(rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                // Cannot happen while slots bound the queue, except after shutdown.
                self.shared.release();
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                self.shared.metrics.dropped.inc();
                None
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.shared.release();
        }
    }
}

impl AuditLog {
    /// Opens (or continues) the chain in `cfg.path` and starts the writer thread.
    pub fn open(cfg: &AuditConfig, metrics: AuditMetrics) -> Result<Option<Arc<Self>>, NodeError> {
        let Some(path) = cfg.path.clone() else { return Ok(None) };
        let io = |what: &str, e: std::io::Error| NodeError::Audit(format!("{}: {what}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
        }
        let (seq, prev) = chain_head(&path).map_err(|e| io("reading the chain head", e))?;
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(|e| io("opening", e))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        let shared = Arc::new(Shared {
            tx,
            held: AtomicUsize::new(0),
            capacity: cfg.queue,
            on_full: cfg.on_full,
            dropped: AtomicU64::new(0),
            #[cfg(any(test, feature = "testsuite"))]
            fail_writes: AtomicU64::new(0),
            metrics,
        });
        let writer = Writer {
            path: path.clone(),
            file,
            size,
            seq,
            prev,
            shared: shared.clone(),
            fsync_every: Duration::from_millis(cfg.fsync_interval_ms),
            fsync_records: cfg.fsync_records,
            max_bytes: cfg.max_bytes,
            broken: false,
        };
        let thread = std::thread::Builder::new()
            .name("kvmesh-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| io("starting the writer thread", e))?;
        tracing::info!(path = %path.display(), next_seq = seq, "audit trail open");
        Ok(Some(Arc::new(Self {
            shared,
            thread: Mutex::new(Some(thread)),
            record_text: cfg.record_text,
            on_full: cfg.on_full,
        })))
    }

    /// A slot for a new request. In reject mode, `None` means the log is behind: refuse it.
    /// Test hook: the next `n` batches fail to write (half their bytes reach the file).
    #[cfg(any(test, feature = "testsuite"))]
    pub fn fail_next_writes(&self, n: u64) {
        self.shared.fail_writes.store(n, Ordering::Relaxed);
    }

    pub fn reserve(&self) -> Option<Slot> {
        match self.shared.on_full {
            OnFull::Reject => self.shared.try_hold().then(|| Slot { shared: self.shared.clone(), held: true }),
            OnFull::Drop => Some(Slot { shared: self.shared.clone(), held: false }),
        }
    }

    /// Writes what is queued, fsyncs, and stops the writer thread.
    pub async fn close(&self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        let Some(thread) = thread else { return };
        let tx = self.shared.tx.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let _ = tx.send(Msg::Stop);
            thread.join()
        })
        .await;
        if !matches!(joined, Ok(Ok(()))) {
            tracing::error!("audit writer thread failed");
        }
    }
}

/// Where the chain continues: `(next seq, last hash)` from the file (or its newest rotated
/// predecessor when the file is new). A torn last line (a crash mid-write) is cut off.
fn chain_head(path: &Path) -> std::io::Result<(u64, String)> {
    if let Some(head) = last_record(path)? {
        return Ok(head);
    }
    match rotated(path)?.last() {
        Some((_, p)) => Ok(last_record(p)?.unwrap_or((0, GENESIS.to_owned()))),
        None => Ok((0, GENESIS.to_owned())),
    }
}

fn last_record(path: &Path) -> std::io::Result<Option<(u64, String)>> {
    let mut f = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    // The last line fits in the tail unless records are huge; read more until it does.
    let mut tail_len = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(tail_len);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        let mut end = buf.len();
        if buf.last() != Some(&b'\n') {
            // Torn by a crash: keep only complete lines.
            let keep = buf.iter().rposition(|&b| b == b'\n').map(|i| i + 1);
            match keep {
                Some(k) => {
                    tracing::warn!(path = %path.display(), bytes = end - k, "audit file ends in a torn record; cutting it off");
                    f.set_len(start + k as u64)?;
                    end = k;
                }
                None if start == 0 => {
                    tracing::warn!(path = %path.display(), "audit file holds only a torn record; cutting it off");
                    f.set_len(0)?;
                    return Ok(None);
                }
                None => {
                    tail_len *= 4;
                    continue;
                }
            }
        }
        let body = &buf[..end - 1];
        let line_start = match body.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if start == 0 => 0,
            None => {
                tail_len *= 4;
                continue;
            }
        };
        let line = String::from_utf8_lossy(&body[line_start..]);
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| std::io::Error::other(format!("last record is not JSON ({e}); run `kvmesh audit verify`")))?;
        let seq = v["seq"].as_u64().ok_or_else(|| std::io::Error::other("last record has no seq"))?;
        let hash = v["hash"].as_str().ok_or_else(|| std::io::Error::other("last record has no hash"))?;
        return Ok(Some((seq + 1, hash.to_owned())));
    }
}

/// Rotated files of `path` (`path.N`), oldest first.
fn rotated(path: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(n) = file_name.to_str().and_then(|f| f.strip_prefix(name)).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        if let Ok(i) = n.parse::<u64>() {
            out.push((i, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    seq: u64,
    prev: String,
    shared: Arc<Shared>,
    fsync_every: Duration,
    fsync_records: u64,
    max_bytes: u64,
    /// A failed write could not be cut back: the file is left as it is.
    broken: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let mut unsynced = 0u64;
        let mut last_sync = Instant::now();
        let mut stop = false;
        while !stop {
            let wait = self.fsync_every.saturating_sub(last_sync.elapsed()).max(Duration::from_millis(1));
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Ok(Msg::Record(r, ack)) => batch.push((r, ack)),
                Err(RecvTimeoutError::Timeout) => {}
            }
            while !stop && batch.len() < 1024 {
                match rx.try_recv() {
                    Ok(Msg::Record(r, ack)) => batch.push((r, ack)),
                    Ok(Msg::Stop) => stop = true,
                    Err(_) => break,
                }
            }
            let mut out = String::new();
            let mut count = 0u64;
            // The chain as it stands on disk: restored if this batch cannot be written, so the
            // file never holds a record whose successor chains from a line that is not there.
            let (seq_before, prev_before) = (self.seq, self.prev.clone());
            let dropped = self.shared.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                self.append(&mut out, Entry::Gap { dropped, time_ms: unix_ms() });
                count += 1;
            }
            for (r, _) in &batch {
                self.append(&mut out, Entry::Request(r));
                count += 1;
            }
            let mut written = true;
            if !out.is_empty() {
                let attempt = match self.broken {
                    true => Err(std::io::Error::other("the audit file could not be cut back after a failed write")),
                    false => self.write_batch(out.as_bytes()),
                };
                match attempt {
                    Ok(()) => {
                        self.size += out.len() as u64;
                        self.shared.metrics.written.inc_by(count);
                        unsynced += count;
                    }
                    Err(e) => {
                        written = false;
                        self.shared.metrics.write_errors.inc();
                        tracing::error!(error = %e, path = %self.path.display(), records = count, "audit write failed; the records are not acknowledged and a gap record will mark them");
                        // Cut back any part of the batch that reached the file, and chain the
                        // next batch from the last record that is there.
                        if let Err(e) = self.file.set_len(self.size) {
                            // The file may now end in part of a batch: nothing more is written
                            // to it (or acknowledged) until a restart cuts the torn tail.
                            tracing::error!(error = %e, "audit file could not be cut back after a failed write; no more records are written until restart");
                            self.broken = true;
                        }
                        (self.seq, self.prev) = (seq_before, prev_before);
                        let lost = batch.len() as u64 + dropped;
                        self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
                        self.shared.metrics.dropped.inc_by(batch.len() as u64);
                    }
                }
            }
            for (_, ack) in batch {
                self.shared.release();
                // No acknowledgement for a record that is not on file: its flow learns so.
                if let (Some(ack), true) = (ack, written) {
                    let _ = ack.send(());
                }
            }
            if unsynced > 0 && (unsynced >= self.fsync_records || last_sync.elapsed() >= self.fsync_every || stop) {
                if let Err(e) = self.file.sync_data() {
                    self.shared.metrics.write_errors.inc();
                    tracing::error!(error = %e, "audit fsync failed");
                }
                unsynced = 0;
                last_sync = Instant::now();
            } else if unsynced == 0 {
                last_sync = Instant::now();
            }
            if self.size >= self.max_bytes {
                if let Err(e) = self.rotate() {
                    self.shared.metrics.write_errors.inc();
                    tracing::error!(error = %e, "audit rotation failed; still writing to the same file");
                }
            }
        }
    }

    #[cfg(any(test, feature = "testsuite"))]
    fn write_batch(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let fail = self.shared.fail_writes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if fail.is_ok() {
            self.file.write_all(&bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::other("injected write failure"));
        }
        self.file.write_all(bytes)
    }

    #[cfg(not(any(test, feature = "testsuite")))]
    fn write_batch(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)
    }

    fn append(&mut self, out: &mut String, entry: Entry<'_>) {
        match chain_line(self.seq, &self.prev, entry) {
            Ok((line, hash)) => {
                out.push_str(&line);
                self.seq += 1;
                self.prev = hash;
            }
            Err(e) => {
                self.shared.metrics.write_errors.inc();
                tracing::error!(error = %e, "audit record could not be serialized");
            }
        }
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let next = rotated(&self.path)?.last().map(|(i, _)| i + 1).unwrap_or(1);
        let to = PathBuf::from(format!("{}.{next}", self.path.display()));
        std::fs::rename(&self.path, &to)?;
        self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        tracing::info!(rotated_to = %to.display(), "audit file rotated");
        Ok(())
    }
}

/// What `audit verify` found in an intact chain.
#[derive(Debug, Default, PartialEq)]
pub struct VerifyReport {
    pub records: u64,
    pub requests: u64,
    pub gaps: u64,
    pub dropped: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_hash: Option<String>,
    /// The chain starts after seq 0: earlier records are in files not given.
    pub starts_mid_chain: bool,
    /// The last file ended in a partial line (a crash mid-write); it was not counted.
    pub torn_tail: bool,
}

/// Where and why a chain breaks.
#[derive(Debug, PartialEq)]
pub struct ChainBreak {
    pub file: String,
    pub line: usize,
    pub why: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} line {}: {}", self.file, self.line, self.why)
    }
}

/// Checks the chain across `files`, given oldest first (`FILE.1 FILE.2 FILE`).
pub fn verify(files: &[PathBuf]) -> Result<VerifyReport, ChainBreak> {
    let mut chain = Chain::default();
    for (fi, path) in files.iter().enumerate() {
        let file = path.display().to_string();
        let f = File::open(path).map_err(|e| ChainBreak {
            file: file.clone(),
            line: 0,
            why: format!("cannot open: {e}"),
        })?;
        chain.file(&file, BufReader::new(f), fi + 1 == files.len())?;
    }
    Ok(chain.report())
}

/// [`verify`] over files' contents in memory (named `0`, `1`, ...), oldest first. For the
/// fuzz targets (`crate::fuzzing`).
pub(crate) fn verify_bytes(files: &[&[u8]]) -> Result<VerifyReport, ChainBreak> {
    let mut chain = Chain::default();
    for (fi, bytes) in files.iter().enumerate() {
        chain.file(&fi.to_string(), *bytes, fi + 1 == files.len())?;
    }
    Ok(chain.report())
}

/// A chain as `verify` reads it, file after file.
#[derive(Default)]
struct Chain {
    rep: VerifyReport,
    /// The last record: its seq, hash and line.
    prev: Option<(u64, String, usize)>,
}

impl Chain {
    /// Reads one file of the chain; `last`: no file follows (a torn last line is then a crash
    /// mid-write, not a break).
    fn file(&mut self, file: &str, mut reader: impl BufRead, last: bool) -> Result<(), ChainBreak> {
        let brk = |line: usize, why: String| ChainBreak { file: file.to_owned(), line, why };
        let rep = &mut self.rep;
        let mut lineno = 0usize;
        loop {
            let mut raw = Vec::new();
            let n = reader.read_until(b'\n', &mut raw).map_err(|e| brk(lineno + 1, format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if raw.last() != Some(&b'\n') {
                if last {
                    rep.torn_tail = true;
                    break;
                }
                return Err(brk(lineno, "partial line in the middle of the chain".into()));
            }
            raw.pop();
            let line = std::str::from_utf8(&raw).map_err(|_| brk(lineno, "not UTF-8".into()))?;
            let (seq, line_prev, hash, kind) = check_line(line).map_err(|why| brk(lineno, why))?;
            match &self.prev {
                None => {
                    if seq == 0 && line_prev != GENESIS {
                        return Err(brk(lineno, "seq 0 must follow the genesis hash".into()));
                    }
                    rep.starts_mid_chain = seq != 0;
                    rep.first_seq = Some(seq);
                }
                Some((pseq, phash, pline)) => {
                    if pseq.checked_add(1) != Some(seq) {
                        return Err(brk(
                            lineno,
                            format!("seq {seq} follows seq {pseq} (line {pline}): records were deleted or reordered"),
                        ));
                    }
                    if line_prev != *phash {
                        return Err(brk(
                            lineno,
                            format!("prev does not match the hash of the record before (line {pline}): it was edited or replaced"),
                        ));
                    }
                }
            }
            rep.records += 1;
            match kind {
                Kind::Request => rep.requests += 1,
                Kind::Gap(d) => {
                    rep.gaps += 1;
                    rep.dropped = rep.dropped.saturating_add(d);
                }
            }
            rep.last_seq = Some(seq);
            self.prev = Some((seq, hash, lineno));
        }
        Ok(())
    }

    fn report(mut self) -> VerifyReport {
        self.rep.last_hash = self.prev.map(|p| p.1);
        self.rep
    }
}

enum Kind {
    Request,
    Gap(u64),
}

fn check_line(line: &str) -> Result<(u64, String, String, Kind), String> {
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with("\"}") {
        return Err("not a chained record (no trailing hash)".into());
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    // A line whose last characters are not ASCII cannot end in our suffix (and must not be
    // split inside a character).
    if !line.is_char_boundary(cut) {
        return Err("not a chained record (no trailing hash)".into());
    }
    let (body_open, suffix) = line.split_at(cut);
    let Some(hash) = suffix.strip_prefix(",\"hash\":\"").and_then(|s| s.strip_suffix("\"}")) else {
        return Err("not a chained record (no trailing hash)".into());
    };
    let body = format!("{body_open}}}");
    let actual = hex::encode(Sha256::digest(body.as_bytes()));
    if actual != hash {
        return Err("content does not match its hash: the record was edited".into());
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}"))?;
    let seq = v["seq"].as_u64().ok_or("no seq")?;
    let prev = v["prev"].as_str().ok_or("no prev")?.to_owned();
    let kind = match v["type"].as_str() {
        Some("request") => Kind::Request,
        Some("gap") => Kind::Gap(v["dropped"].as_u64().unwrap_or(0)),
        other => return Err(format!("unknown record type {other:?}")),
    };
    Ok((seq, prev, hash.to_owned(), kind))
}

/// The files of a chain as `audit verify` takes them: the rotated ones of `path`, oldest
/// first, then `path` itself.
pub fn chain_files(path: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated(path).unwrap_or_default().into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> AuditMetrics {
        AuditMetrics {
            queue_depth: IntGauge::new("q", "q").unwrap(),
            written: IntCounter::new("w", "w").unwrap(),
            dropped: IntCounter::new("d", "d").unwrap(),
            write_errors: IntCounter::new("e", "e").unwrap(),
        }
    }

    fn rec(i: usize) -> AuditRecord {
        AuditRecord { request_id: format!("r{i}"), status: 200, outcome: Outcome::Ok, ..Default::default() }
    }

    async fn write_n(cfg: &AuditConfig, n: usize) -> Arc<AuditLog> {
        let log = AuditLog::open(cfg, metrics()).unwrap().unwrap();
        for i in 0..n {
            let slot = log.reserve().unwrap();
            slot.submit(rec(i)).unwrap().await.unwrap();
        }
        log
    }

    #[tokio::test]
    async fn chain_verifies_and_continues_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), ..Default::default() };
        write_n(&cfg, 3).await.close().await;
        write_n(&cfg, 2).await.close().await;
        let rep = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!((rep.records, rep.requests, rep.first_seq, rep.last_seq), (5, 5, Some(0), Some(4)));
        assert!(!rep.torn_tail && !rep.starts_mid_chain);
    }

    #[tokio::test]
    async fn edits_and_deletions_are_caught_at_the_right_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), ..Default::default() };
        write_n(&cfg, 5).await.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited: String = lines
            .iter()
            .enumerate()
            .map(|(i, l)| if i == 2 { l.replace("\"r2\"", "\"rX\"") } else { l.to_string() } + "\n")
            .collect();
        std::fs::write(&path, edited).unwrap();
        let b = verify(std::slice::from_ref(&path)).unwrap_err();
        assert_eq!(b.line, 3);
        assert!(b.why.contains("edited"), "{b}");

        let deleted: String =
            lines.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, l)| format!("{l}\n")).collect();
        std::fs::write(&path, deleted).unwrap();
        let b = verify(std::slice::from_ref(&path)).unwrap_err();
        assert_eq!(b.line, 2);
        assert!(b.why.contains("deleted"), "{b}");
    }

    /// A failed write (half the batch reached the file, then an error) acknowledges nothing,
    /// is cut back, and the chain goes on from the last good record with a gap record for it:
    /// the file verifies, instead of failing as if edited.
    #[tokio::test]
    async fn a_failed_write_is_cut_back_unacknowledged_and_marked_by_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), ..Default::default() };
        let log = write_n(&cfg, 2).await;
        log.fail_next_writes(1);
        let lost = log.reserve().unwrap().submit(rec(100)).unwrap().await;
        assert!(lost.is_err(), "a record that is not on file is not acknowledged");
        log.reserve().unwrap().submit(rec(101)).unwrap().await.expect("the next record is written");
        log.close().await;
        let rep = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!((rep.requests, rep.gaps, rep.dropped), (3, 1, 1), "{rep:?}");
        assert!(!rep.torn_tail);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"r100\""), "the failed record left nothing behind");
    }

    /// `verify` added up a chain's numbers unchecked: a record with seq `u64::MAX` followed by
    /// another, or gap records dropping more than `u64::MAX` in all, overflowed (a panic where
    /// overflow checks are on, a wrapped count or an accepted seq 0 where they are off).
    #[test]
    fn verify_survives_a_chain_at_the_numbers_limits() {
        let gap = |seq: u64, prev: &str| chain_line(seq, prev, Entry::Gap { dropped: u64::MAX, time_ms: 0 }).unwrap();
        let (a, ha) = gap(u64::MAX, GENESIS);
        let (b, _) = gap(0, &ha);
        let brk = verify_bytes(&[format!("{a}{b}").as_bytes()]).unwrap_err();
        assert_eq!(brk.line, 2, "{brk}");
        let (a, ha) = gap(7, GENESIS);
        let (b, _) = gap(8, &ha);
        let rep = verify_bytes(&[format!("{a}{b}").as_bytes()]).unwrap();
        assert_eq!((rep.gaps, rep.dropped), (2, u64::MAX));
    }

    #[test]
    fn verify_reports_a_non_ascii_tail_instead_of_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let line = format!("{{\"seq\":0,{}\"}}\n", "é".repeat(60));
        std::fs::write(&path, line).unwrap();
        assert!(verify(std::slice::from_ref(&path)).is_err());
    }

    #[tokio::test]
    async fn torn_tail_is_cut_on_restart_and_reported_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), ..Default::default() };
        write_n(&cfg, 2).await.close().await;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":2,\"prev\":\"ab").unwrap();
        drop(f);
        let rep = verify(std::slice::from_ref(&path)).unwrap();
        assert!(rep.torn_tail);
        assert_eq!(rep.records, 2);
        write_n(&cfg, 1).await.close().await;
        let rep = verify(std::slice::from_ref(&path)).unwrap();
        assert_eq!((rep.records, rep.torn_tail), (3, false));
    }

    #[tokio::test]
    async fn rotation_keeps_one_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), max_bytes: 4096, ..Default::default() };
        write_n(&cfg, 40).await.close().await;
        let files = chain_files(&path);
        assert!(files.len() >= 2, "{files:?}");
        let rep = verify(&files).unwrap();
        assert_eq!(rep.records, 40);
        // A later file alone verifies from the middle of the chain.
        let rep = verify(&[files[1].clone()]).unwrap();
        assert!(rep.starts_mid_chain);
        // Leaving out a middle file breaks it.
        if files.len() >= 3 {
            assert!(verify(&[files[0].clone(), files[2].clone()]).is_err());
        }
    }

    #[tokio::test]
    async fn full_queue_rejects_or_drops_with_a_gap_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let cfg = AuditConfig { path: Some(path.clone()), queue: 2, ..Default::default() };
        let log = AuditLog::open(&cfg, metrics()).unwrap().unwrap();
        let a = log.reserve().unwrap();
        let b = log.reserve().unwrap();
        assert!(log.reserve().is_none(), "reject mode: a third request finds no slot");
        drop(a);
        b.submit(rec(0)).unwrap().await.unwrap();
        assert!(log.reserve().is_some());
        log.close().await;

        let cfg = AuditConfig { path: Some(path.clone()), queue: 1, on_full: OnFull::Drop, ..Default::default() };
        let m = metrics();
        let log = AuditLog::open(&cfg, m.clone()).unwrap().unwrap();
        // Fill the single queue slot by hand, so the next submission finds it full.
        assert!(log.shared.try_hold());
        assert!(log.reserve().unwrap().submit(rec(1)).is_none());
        assert_eq!(m.dropped.get(), 1);
        log.shared.release();
        log.reserve().unwrap().submit(rec(2)).unwrap().await.unwrap();
        log.close().await;
        let rep = verify(&[path]).unwrap();
        assert_eq!((rep.requests, rep.gaps, rep.dropped), (2, 1, 1));
    }
}
