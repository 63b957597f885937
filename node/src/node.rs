//! Starting a node: embedded engine (if needed), engine watchers, HTTP server; and stopping it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::config::{Config, EngineEntry};
use crate::engine::EngineSet;
use crate::error::NodeError;
use crate::guard::Guard;
use crate::mesh::Mesh;
use crate::metrics::NodeMetrics;
use crate::request::Pipeline;
use crate::router::{Router, RouterSettings};
use kvmesh_sim::{EngineSim, RunningEngine};

pub struct Node;

pub struct RunningNode {
    pub http_addr: SocketAddr,
    pub node_name: String,
    pub engines: Arc<EngineSet>,
    /// The embedded simulator, when this node started one.
    pub embedded: Option<RunningEngine>,
    /// This node's mesh membership, when it has certificates.
    pub mesh: Option<Arc<Mesh>>,
    router: Arc<Router>,
    guard: Option<Arc<Guard>>,
    /// Stops the HTTP server from accepting (open responses still finish).
    http_stop: CancellationToken,
    http_server: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

/// Longest a graceful shutdown waits for open streams before cutting them.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl RunningNode {
    /// Test hook (`testsuite`): the audit writer's next `n` batches fail, as on a full disk.
    #[cfg(feature = "testsuite")]
    pub fn fail_audit_writes(&self, n: u64) {
        if let Some(a) = self.guard.as_ref().and_then(|g| g.audit_log()) {
            a.fail_next_writes(n);
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Dies without telling peers (tests of failure detection; feature `testsuite`): the
    /// endpoint closes, tasks stop, the embedded engine goes away.
    #[cfg(feature = "testsuite")]
    pub async fn kill(self) {
        if let Some(m) = &self.mesh {
            m.endpoint.close().await;
        }
        self.cancel.cancel();
        self.http_server.abort();
        if let Some(e) = self.embedded {
            e.shutdown().await;
        }
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(g) = &self.guard {
            g.close().await;
        }
    }

    /// Graceful (SIGTERM): drains as `POST /admin/drain` does (refuses new requests, leaves the
    /// mesh so peers stop sending here), stops accepting client connections, lets open
    /// responses finish (clients' and peers', at most `DRAIN_LIMIT`), then stops
    /// every task and the embedded engine and waits for all of it.
    pub async fn shutdown(self) {
        // Requests still arriving on open keep-alive connections get a retryable 503 from here on.
        self.router.start_draining();
        if let Some(m) = &self.mesh {
            m.leave().await;
        }
        self.http_stop.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
        // axum's graceful shutdown returns once every client connection is done.
        if tokio::time::timeout_at(deadline, self.http_server).await.is_err() {
            tracing::warn!("open client responses did not finish within {DRAIN_LIMIT:?}; cutting them");
        }
        while self.router.open_requests() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.cancel.cancel();
        if let Some(m) = &self.mesh {
            m.close().await;
        }
        self.tasks.close();
        self.tasks.wait().await;
        // Last: every answer that could still produce a record has ended.
        if let Some(g) = &self.guard {
            g.close().await;
        }
        if let Some(e) = self.embedded {
            e.shutdown().await;
        }
    }
}

/// How a node is started, beyond its config: hooks for tests that embed nodes, never set by
/// the `kvmesh` binary (so not config keys).
#[derive(Default)]
pub struct StartOptions {
    /// The socket under the QUIC endpoint instead of a UDP port bound at `quic_addr`: the
    /// fault tests put nodes on a simulated network this way. Its `local_addr` is the node's
    /// QUIC address (advertised unless `advertise_addr` says otherwise).
    pub quic_socket: Option<Arc<dyn kvmesh_transport::AsyncUdpSocket>>,
}

impl Node {
    pub async fn start(cfg: Config, cancel: &CancellationToken) -> Result<RunningNode, NodeError> {
        Self::start_inner(cfg, cancel, StartOptions::default()).await
    }

    /// A node started with test hooks (feature `testsuite`).
    #[cfg(feature = "testsuite")]
    pub async fn start_with(
        cfg: Config,
        cancel: &CancellationToken,
        opts: StartOptions,
    ) -> Result<RunningNode, NodeError> {
        Self::start_inner(cfg, cancel, opts).await
    }

    async fn start_inner(
        mut cfg: Config,
        cancel: &CancellationToken,
        opts: StartOptions,
    ) -> Result<RunningNode, NodeError> {
        cfg.validate()?;
        let cancel = cancel.child_token();
        let embedded = if cfg.wants_embedded_engine() {
            // Loopback and ephemeral ports: the simulator is this node's private engine.
            let mut sim = cfg.embedded.clone();
            // A P/D role needs the simulated NixlConnector.
            sim.kv_transfer |= cfg.embedded_role != kvmesh_policy::pd::Role::Both;
            // Its replay socket is on too: a gap in its events is then filled, not dropped.
            let loopback = Some("tcp://127.0.0.1:0");
            let e = EngineSim::start_with_replay(sim, "127.0.0.1:0", loopback, loopback, &cancel).await?;
            cfg.engines.push(EngineEntry {
                name: Some("embedded-sim".into()),
                kv_events: e.kv_events_endpoint.clone(),
                kv_events_replay: e.kv_events_replay_endpoint.clone(),
                role: cfg.embedded_role,
                scheduling_policy: cfg.embedded.scheduling_policy,
                ..EngineEntry::new(e.url())
            });
            Some(e)
        } else {
            None
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Config::ms(cfg.engine_connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(1024)
            .no_proxy()
            .build()
            .map_err(|e| NodeError::Client(e.to_string()))?;
        let engines = Arc::new(EngineSet::new(&cfg.engines, &cfg, client.clone()));
        engines.probe_all().await;
        check_engines_against_config(&cfg, &engines);
        let tasks = TaskTracker::new();
        engines.spawn_watchers(&tasks, &cancel);
        engines.wait_for_subscriptions(Duration::from_secs(2)).await;
        let metrics = Arc::new(NodeMetrics::new(&cfg.node_name)?);
        let tokenizers = crate::tokens::Tokenizers::load(&cfg, metrics.clone(), engines.clone()).await?;
        let guard = Guard::new(&cfg, metrics.clone())?;
        let listener = tokio::net::TcpListener::bind(&cfg.http_addr)
            .await
            .map_err(|source| NodeError::Bind { addr: cfg.http_addr.clone(), source })?;
        let http_addr =
            listener.local_addr().map_err(|source| NodeError::Bind { addr: cfg.http_addr.clone(), source })?;
        let mesh = if cfg.mesh_enabled() {
            let mesh = Mesh::start(&cfg, http_addr, &engines, opts.quic_socket, &cancel, &tasks).await?;
            tracing::info!(quic = %mesh.endpoint.local_addr(), advertise = %mesh.advertise, seeds = ?cfg.seeds, "mesh endpoint up");
            Some(mesh)
        } else {
            tracing::info!("no certificates configured: serving alone, without a mesh");
            None
        };
        let settings = RouterSettings::from_config(&cfg);
        let router = Arc::new(Router::new(settings, engines.clone(), metrics, mesh.clone(), client, tokenizers));
        if let Some(mesh) = &mesh {
            // Weak: the endpoint must not keep the router (and through it the mesh) alive.
            let r = Arc::downgrade(&router);
            mesh.endpoint.set_request_handler(Arc::new(move |req| {
                let r = r.upgrade();
                Box::pin(async move {
                    if let Some(r) = r {
                        r.serve_peer(req).await
                    }
                })
            }));
        }
        // Flow control's dispatcher: lets held requests go as engines free up.
        tasks.spawn(crate::router::flow::run(Arc::downgrade(&router), cancel.clone()));
        if let Some(log) = guard.as_ref().and_then(|g| g.audit_log().cloned()) {
            router.record_peer_requests_in(log);
        }
        let admin_access = crate::request::AdminAccess::of(&cfg.auth);
        let pipeline = Arc::new(Pipeline::new(
            router.clone(),
            guard.clone(),
            admin_access,
            cfg.max_body_bytes,
            Config::ms(cfg.http_body_timeout_ms),
        ));
        if let Some(g) = &guard {
            g.spawn_tasks(mesh.clone(), &tasks, &cancel);
        }
        #[cfg(unix)]
        tasks.spawn(reload_on_sighup(guard.clone(), cancel.clone()));
        let app = api::router(pipeline.clone());
        let http_stop = cancel.child_token();
        let stop = http_stop.clone();
        // Not on the tracker: shutdown awaits it first, on its own, to drain client streams
        // while the mesh endpoint is still up.
        let limits = crate::http_server::HttpLimits {
            header_timeout: Config::ms(cfg.http_header_timeout_ms),
            write_timeout: Config::ms(cfg.http_write_timeout_ms),
            max_connections: cfg.http_max_connections,
        };
        let refused = router.metrics.http_connections_refused.clone();
        let http_server = tokio::spawn(crate::http_server::serve(listener, app, limits, stop, refused));
        for e in &engines.engines {
            let v = e.snapshot();
            tracing::info!(engine = %e.name, url = %e.url, healthy = v.healthy, models = ?v.models, "engine configured");
        }
        tracing::info!(node = %cfg.node_name, http = %http_addr, "kvmesh node serving");
        Ok(RunningNode {
            http_addr,
            node_name: cfg.node_name,
            engines,
            embedded,
            mesh,
            router,
            guard,
            http_stop,
            http_server,
            cancel,
            tasks,
        })
    }
}

/// What the engines report at start against what the config assumes, said at once: block keys
/// computed at another block size than an engine's match nothing there, and a tokenizer for a
/// model no engine here serves is only used for peers' engines. (`/v1/mesh/status` shows each
/// engine's block size, and whether it is the mesh-wide `default_block_size`.)
fn check_engines_against_config(cfg: &Config, engines: &EngineSet) {
    for e in &engines.engines {
        let v = e.snapshot();
        if let Some(bs) = v.load.block_size.filter(|&bs| bs != cfg.default_block_size) {
            tracing::warn!(
                engine = %e.name,
                engine_block_size = bs,
                default_block_size = cfg.default_block_size,
                "this engine's KV block size is not default_block_size: this node keys its prompts at the engine's size, but peers and cells key at default_block_size, so their matches for it miss (set default_block_size = {bs} on every node, or run the engines with --block-size {})",
                cfg.default_block_size
            );
        }
    }
    let served = engines.models();
    for m in cfg.models.iter().filter(|m| !served.contains(&m.name)) {
        if !engines.engines.is_empty() {
            tracing::warn!(model = %m.name, served = ?served, "a tokenizer is configured for a model this node's engines do not serve (yet): check [[models]] name against the engines' --served-model-name");
        }
    }
}

/// SIGHUP reloads what `POST /admin/reload` does. Handled with or without a guard, so a HUP
/// (a terminal closing, a config tool) never kills a node that has nothing to reload.
#[cfg(unix)]
async fn reload_on_sighup(guard: Option<Arc<Guard>>, cancel: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        match &guard {
            Some(g) => {
                let _ = g.reload_all();
            }
            None => tracing::info!("SIGHUP: no API keys or guardrails configured, nothing to reload"),
        }
    }
}
