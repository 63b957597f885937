//! Starting and stopping one simulated engine: HTTP server, engine loop, KV-event publisher.

use axum::serve::ListenerExt as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api::{self, AppState};
use crate::engine::{CoreConfig, EngineCore};
use crate::error::SimError;
use crate::filler::Filler;
use crate::kv_events::{self, KvPublisher};
use crate::metrics::EngineMetrics;
use crate::runner::Runner;
use crate::EngineConfig;
use kvmesh_policy::tokenize::ModelTokenizer;

/// `kvmesh engine-sim` flags: where to listen, plus the engine's own settings.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineSimArgs {
    /// HTTP address of the OpenAI API, /metrics and /health (vLLM's default port is 8000).
    #[arg(long = "http-addr", default_value = "127.0.0.1:8000")]
    pub http_addr: String,
    /// ZeroMQ endpoint to publish KV-cache events on, e.g. `tcp://*:5557` or `127.0.0.1:5557`.
    /// Without it no events are published (vLLM's default).
    #[arg(long = "kv-events-addr")]
    pub kv_events_addr: Option<String>,
    /// ZeroMQ ROUTER endpoint answering replay requests for missed KV-event batches (vLLM's
    /// `kv_events_config.replay_endpoint`), e.g. `tcp://*:5558`. Needs `--kv-events-addr`.
    /// Off by default, as in vLLM.
    #[arg(long = "kv-events-replay-addr", requires = "kv_events_addr")]
    pub kv_events_replay_addr: Option<String>,
    #[command(flatten)]
    pub engine: EngineConfig,
}

/// A started engine. Dropping it does not stop it; call `shutdown`.
pub struct RunningEngine {
    pub http_addr: SocketAddr,
    /// The bound ZeroMQ endpoint (`tcp://host:port`), when KV events are on.
    pub kv_events_endpoint: Option<String>,
    /// The bound replay endpoint, when replay is on.
    pub kv_events_replay_endpoint: Option<String>,
    pub model: String,
    engine: crate::runner::EngineHandle,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl RunningEngine {
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Engine hashes of the blocks cached now: the engine's own state, for tests that check
    /// what a KV-event subscriber derived (not something vLLM offers).
    pub async fn cached_block_hashes(&self) -> Option<Vec<u64>> {
        self.engine.cached_block_hashes().await.ok()
    }

    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops accepting requests, ends open responses, and waits for every task.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Waits until the engine stops (its token was cancelled).
    pub async fn wait(self) {
        self.cancel.cancelled().await;
        self.shutdown().await;
    }
}

/// ZeroMQ wants `tcp://host:port`; accept `host:port` and vLLM's `tcp://*:port` too.
pub fn zmq_endpoint(addr: &str) -> String {
    let full = if addr.contains("://") { addr.to_owned() } else { format!("tcp://{addr}") };
    full.replace("://*:", "://0.0.0.0:")
}

pub struct EngineSim;

/// Binds each data-parallel rank's KV-event publisher (and replay socket): rank 0 on what was
/// asked, rank r on the port after it by r, as vLLM's publisher offsets its endpoints. When
/// rank 0's port was picked by the system (port 0), a later rank's port may already be taken
/// by another process; then every socket is dropped and the whole set is bound again on a new
/// pick, a bounded number of times. An asked port is bound once: its error is the answer.
async fn bind_publishers(
    cfg: &EngineConfig,
    kv_events_addr: Option<&str>,
    replay_addr: Option<&str>,
) -> Result<Vec<Option<KvPublisher>>, SimError> {
    const ATTEMPTS: usize = 16;
    let Some(asked) = kv_events_addr.map(zmq_endpoint) else {
        return Ok((0..cfg.data_parallel_size).map(|_| None).collect());
    };
    let asked_replay = replay_addr.map(zmq_endpoint);
    let picked = |e: &str| e.ends_with(":0");
    let retry = cfg.data_parallel_size > 1 && picked(&asked);
    let mut attempt = 0;
    loop {
        attempt += 1;
        match bind_ranks(cfg, &asked, asked_replay.as_deref()).await {
            Err(e @ SimError::BindKvEvents { .. }) if retry && attempt < ATTEMPTS => {
                tracing::debug!(error = %e, attempt, "a data-parallel rank's port was taken; binding again");
            }
            other => return other,
        }
    }
}

async fn bind_ranks(
    cfg: &EngineConfig,
    asked: &str,
    replay: Option<&str>,
) -> Result<Vec<Option<KvPublisher>>, SimError> {
    let mut out: Vec<Option<KvPublisher>> = Vec::new();
    for rank in 0..cfg.data_parallel_size {
        let at = |asked: &str, first: Option<&str>| match first {
            None => Ok(asked.to_owned()),
            Some(first) => kv_events::offset_endpoint_port(first, rank)
                .ok_or_else(|| SimError::Config(format!("no endpoint for data-parallel rank {rank} after {first}"))),
        };
        let first = out.first().and_then(|p| p.as_ref());
        let endpoint = at(asked, first.map(|p| p.endpoint.as_str()))?;
        let replay_endpoint = match replay {
            Some(r) => Some(at(r, first.and_then(|p| p.replay_endpoint.as_deref()))?),
            None => None,
        };
        let p = KvPublisher::bind(&endpoint, &cfg.kv_events_topic).await?.with_rank(rank, cfg.data_parallel_size);
        let p = match replay_endpoint {
            Some(r) => p.with_replay(&r, cfg.kv_events_buffer_steps).await?,
            None => p,
        };
        out.push(Some(p));
    }
    Ok(out)
}

impl EngineSim {
    /// Starts an engine. `cancel` (a child token is taken) stops it.
    pub async fn start(
        cfg: EngineConfig,
        http_addr: &str,
        kv_events_addr: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<RunningEngine, SimError> {
        Self::start_with_replay(cfg, http_addr, kv_events_addr, None, cancel).await
    }

    /// As `start`, with a KV-event replay socket on `replay_addr` (which needs `kv_events_addr`).
    pub async fn start_with_replay(
        cfg: EngineConfig,
        http_addr: &str,
        kv_events_addr: Option<&str>,
        replay_addr: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<RunningEngine, SimError> {
        cfg.validate()?;
        if replay_addr.is_some() && kv_events_addr.is_none() {
            return Err(SimError::Config("--kv-events-replay-addr needs --kv-events-addr".into()));
        }
        let tokenizer = match &cfg.tokenizer {
            Some(p) => ModelTokenizer::from_path(p)?,
            None => ModelTokenizer::builtin()?,
        };
        if !tokenizer.has_chat_template() {
            tracing::warn!(tokenizer = tokenizer.source(), "no chat template: /v1/chat/completions will answer 400");
        }
        let max_model_len = cfg.max_model_len.unwrap_or_else(|| tokenizer.max_model_len());
        let filler = Filler::new(&tokenizer, cfg.seed);
        let registry = prometheus::Registry::new();
        let hash_seed = cfg.hash_seed.unwrap_or_else(rand::random);
        let cancel = cancel.child_token();
        let tasks = TaskTracker::new();
        let publishers = bind_publishers(&cfg, kv_events_addr, replay_addr).await?;
        let kv_events_endpoint = publishers.first().and_then(|p| p.as_ref()).map(|p| p.endpoint.clone());
        let kv_events_replay_endpoint =
            publishers.first().and_then(|p| p.as_ref()).and_then(|p| p.replay_endpoint.clone());
        let mut publishers = publishers.into_iter();
        let mut ranks = Vec::new();
        for rank in 0..cfg.data_parallel_size {
            let metrics = Arc::new(
                EngineMetrics::for_rank(&registry, rank, &cfg.model, cfg.block_size, cfg.num_gpu_blocks)
                    .map_err(|e| SimError::Config(format!("metrics: {e}")))?,
            );
            let output_filler = filler.clone();
            let core = EngineCore::new(
                CoreConfig {
                    block_size: cfg.block_size,
                    num_gpu_blocks: cfg.num_gpu_blocks,
                    max_num_seqs: cfg.max_num_seqs,
                    max_num_batched_tokens: cfg.max_num_batched_tokens,
                    enable_prefix_caching: cfg.enable_prefix_caching,
                    hash_seed,
                    timing: cfg.timing.clone(),
                    num_cpu_blocks: cfg.cpu_offload_blocks,
                    cpu_load_ms_per_token: cfg.cpu_load_ms_per_token(),
                    scheduling: cfg.scheduling_policy,
                },
                move |seed, i| output_filler.token(seed, i),
            );
            let publisher = publishers.next().flatten();
            let (runner, handle, kv_rx) = Runner::new(core, metrics.clone(), cfg.time_scale, publisher.is_some());
            tasks.spawn(runner.run(cancel.clone()));
            if let (Some(p), Some(rx)) = (publisher, kv_rx) {
                tasks.spawn(p.run(rx, cancel.clone()));
            }
            ranks.push(api::Rank { engine: handle, metrics });
        }
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .map_err(|source| SimError::BindHttp { addr: http_addr.to_owned(), source })?;
        let local =
            listener.local_addr().map_err(|source| SimError::BindHttp { addr: http_addr.to_owned(), source })?;

        let state = Arc::new(AppState {
            kv_capacity_tokens: cfg.num_gpu_blocks as u64 * cfg.block_size as u64,
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            cfg: cfg.clone(),
            tokenizer,
            filler,
            ranks,
            next_rank: Default::default(),
            max_model_len,
            http_addr: local,
            engine_id: format!("kvmesh-sim-{:016x}", rand::random::<u64>()),
            offers: crate::nixl::Offers::default(),
            client: reqwest::Client::builder().no_proxy().build().unwrap_or_default(),
            responses: api::ResponseStore::default(),
        });
        let engine = state.ranks[0].engine.clone();
        let app = api::router(state);
        let shutdown = cancel.clone();
        tasks.spawn(async move {
            // vLLM's server (uvicorn) sends streamed tokens with Nagle's algorithm off; so does this.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let served =
                axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
            if let Err(e) = served {
                tracing::error!(error = %e, "engine-sim HTTP server failed");
            }
        });
        tracing::info!(
            http = %local,
            kv_events = ?kv_events_endpoint,
            kv_events_replay = ?kv_events_replay_endpoint,
            model = %cfg.model,
            "engine simulator started"
        );
        Ok(RunningEngine {
            http_addr: local,
            kv_events_endpoint,
            kv_events_replay_endpoint,
            model: cfg.model,
            engine,
            cancel,
            tasks,
        })
    }
}
