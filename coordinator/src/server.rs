//! Bringing a coordinator up: load the model's assignment onto every worker, start one
//! replica per worker, serve the client API on a bound listener until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cluster::layout::Layout;
use cluster::membership::{EtcdMembership, Membership, MemoryMembership, WorkerCard};
use cluster::{ModelConfig, Tokenizer};
use proto::tramontane::v1::inference_server::InferenceServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{AdminService, InferenceService};
use crate::control::{self, ControlConfig, ControlHandle};
use crate::control::{Pool, Routing};
use crate::frontend::{Frontend, Served};
use crate::metrics::Metrics;
use crate::planner::Sizing;
use cluster::embedding::Pooling;
use cluster::kv_cache::PrefixHasher;
use cluster::scheduler::SchedulerConfig;

/// Everything a coordinator needs to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Checkpoint directory (the coordinator reads config.json and tokenizer.json; workers read
    /// the weights from the same path).
    pub model: PathBuf,
    /// Worker API addresses (`host:port`) of a fixed cluster (without etcd); every
    /// `layout.world()` consecutive workers form a replica, by rank.
    pub workers: Vec<String>,
    /// The wanted layout of each replica.
    pub layout: Layout,
    /// How ranks keep weights and how much KV cache each holds.
    pub sizing: Sizing,
    /// The scheduler's limits per replica.
    pub limits: Limits,
    /// How embedding requests pool hidden states.
    pub pooling: Pooling,
    /// Deadline of a request that sets none.
    pub request_timeout: Duration,
    /// etcd endpoints; empty = the fixed `workers` and in-process membership.
    pub etcd: Vec<String>,
    pub cluster: String,
    pub lease_ttl: Duration,
    /// This coordinator's id (leadership on etcd).
    pub id: String,
    /// API keys (`--api-keys`); `None`: every request is served.
    pub api_keys: Option<PathBuf>,
    /// Mutual TLS inside the cluster (the workers' API and etcd); `None`: plain text.
    pub cluster_tls: Option<cluster::tls::ClusterTls>,
}

/// Each replica scheduler's limits (the coordinator's flags of these names).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Limits {
    /// Most sequences in one batch step.
    #[arg(long, default_value_t = SchedulerConfig::MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// Most new tokens in one batch step (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = SchedulerConfig::MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Most requests waiting per replica; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = SchedulerConfig::MAX_QUEUE)]
    pub max_queue: usize,
    /// Prefill every prompt in full: no KV block is reused across requests.
    #[arg(long)]
    pub no_prefix_caching: bool,
    #[command(flatten)]
    pub routing: Routing,
}

impl Limits {
    /// A replica's scheduler over the KV cache `sizing` gives each rank.
    pub fn scheduler(&self, sizing: &Sizing) -> SchedulerConfig {
        SchedulerConfig {
            num_blocks: sizing.kv_blocks,
            block_size: sizing.block_size,
            max_num_seqs: self.max_num_seqs,
            max_batch_tokens: self.max_batch_tokens,
            max_queue: self.max_queue,
            prefix_caching: !self.no_prefix_caching,
        }
    }
}

/// What names a replica's cached KV blocks: the model, and how its weights are kept.
pub fn prefix_hasher(config: &ModelConfig, sizing: &Sizing) -> PrefixHasher {
    PrefixHasher::new(&format!("{config:?} {:?} {:?}", sizing.dtype, sizing.quantization), sizing.block_size)
}

/// A coordinator ready to serve.
pub struct Prepared {
    pub frontend: Frontend,
    pub control: ControlHandle,
    /// Receives the reason this coordinator can never serve: the workers of a fixed cluster
    /// (all answering) cannot hold the model, or the placement controller stopped.
    pub fatal: tokio::sync::mpsc::Receiver<anyhow::Error>,
}

/// Reads the model, starts membership and the placement controller, and returns at once:
/// the API is up and not ready until a placement is loaded. Without etcd, the fixed workers
/// are registered once every one of them answers (each may start after the coordinator);
/// with etcd they register themselves (and a standby serves nothing until it leads).
pub async fn prepare(cfg: &ServeConfig) -> anyhow::Result<Prepared> {
    let config = ModelConfig::from_file(&cfg.model.join("config.json"))?;
    let tokenizer = Tokenizer::from_file(&cfg.model.join("tokenizer.json"))?;
    cfg.layout.validate(&config).map_err(|e| anyhow::anyhow!("layout: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let fixed = cfg.etcd.is_empty().then(|| Arc::new(MemoryMembership::new()));
    let membership: Arc<dyn Membership> = match &fixed {
        Some(m) => {
            anyhow::ensure!(!cfg.workers.is_empty(), "give the workers (--worker) or an etcd cluster to find them in (--etcd)");
            let world = cfg.layout.world();
            anyhow::ensure!(
                cfg.workers.len().is_multiple_of(world),
                "{} workers cannot form replicas of {world} ranks (tp {} x ep {} x pp {}): give a multiple of {world}",
                cfg.workers.len(),
                cfg.layout.tp,
                cfg.layout.ep,
                cfg.layout.pp
            );
            m.clone()
        }
        None => Arc::new(EtcdMembership::connect(&cfg.etcd, &cfg.cluster, cfg.lease_ttl, cfg.cluster_tls.as_ref()).await?),
    };
    let control_cfg = ControlConfig {
        model: cfg.model.clone(),
        config: config.clone(),
        layout: cfg.layout.clone(),
        sizing: cfg.sizing,
        sched: cfg.limits.scheduler(&cfg.sizing),
        prefix: prefix_hasher(&config, &cfg.sizing),
        id: cfg.id.clone(),
        lease_ttl: cfg.lease_ttl,
        dialer: control::Dialer::new(cfg.cluster_tls.clone()),
    };
    let (pool_tx, pool_rx) = watch::channel(Arc::new(Pool::default()));
    // Sent only when this coordinator can never serve; every sender dropped unsent means never.
    let (fatal_tx, fatal) = tokio::sync::mpsc::channel(2);
    let control = control::spawn(control_cfg, membership, pool_tx, metrics.clone(), fatal_tx.clone());
    if let Some(m) = fixed {
        // The API serves at once (not ready) while the workers are found and loaded.
        let (workers, control, pool) = (cfg.workers.clone(), control.clone(), pool_rx.clone());
        let dialer = control::Dialer::new(cfg.cluster_tls.clone());
        tokio::spawn(async move {
            if let Err(e) = enrol(&m, &workers, &dialer, &control, pool).await {
                let _ = fatal_tx.send(e).await;
            }
        });
    }
    let served = Served {
        pooling: cfg.pooling,
        prefix: (!cfg.limits.no_prefix_caching).then(|| prefix_hasher(&config, &cfg.sizing)),
        routing: cfg.limits.routing,
        ..Served::load(&cfg.model, &config, tokenizer).map_err(anyhow::Error::msg)?
    };
    let auth = match &cfg.api_keys {
        Some(path) => crate::auth::Auth::from_file(path)?,
        None => crate::auth::Auth::open(),
    };
    Ok(Prepared { frontend: Frontend::new(served, pool_rx, metrics, auth), control, fatal })
}

/// Registers the workers of a fixed cluster once every one has answered its first Health
/// (with its memory and pid: the planner sizes placements by what each offers), all at
/// once so the first placement sees them all; then an error if that placement cannot be
/// made (the set of workers is fixed, so it never could).
async fn enrol(
    m: &MemoryMembership,
    workers: &[String],
    dialer: &control::Dialer,
    control: &ControlHandle,
    mut pool: watch::Receiver<Arc<Pool>>,
) -> anyhow::Result<()> {
    let mut cards = Vec::new();
    for (i, address) in workers.iter().enumerate() {
        let id = format!("worker-{i}");
        let health = first_health(dialer, &id, address).await;
        if health.memory_bytes == 0 {
            tracing::warn!(worker = %id, %address, "the worker does not report its memory: placing as if it held anything");
        }
        cards.push(WorkerCard {
            id,
            address: address.clone(),
            device: "cpu".into(),
            memory_bytes: health.memory_bytes,
            version: String::new(),
            pid: health.pid,
            restarts: health.restarts,
        });
    }
    for card in &cards {
        m.register(card).await?;
    }
    loop {
        let placed = pool.wait_for(|p| p.leading && (!p.replicas.is_empty() || p.no_capacity.is_some())).await?.clone();
        if !placed.replicas.is_empty() {
            return Ok(());
        }
        // The controller may not have seen every registration yet: once it has (its status
        // lists them all), the pool it published last was placed with all of them.
        let seen = control.status().await?.workers.len();
        if seen == cards.len()
            && let Some(reason) = pool.borrow().no_capacity.clone()
            && pool.borrow().replicas.is_empty()
        {
            anyhow::bail!("the workers cannot serve the model: {reason}");
        }
        pool.changed().await?;
    }
}

/// The worker's first Health answer, retried until it comes (the worker may not listen yet);
/// a line is logged while waiting.
async fn first_health(dialer: &control::Dialer, id: &str, address: &str) -> proto::tramontane::worker::v1::HealthResponse {
    let started = tokio::time::Instant::now();
    let mut next_log = Duration::from_secs(2);
    loop {
        if let Some(health) = dialer.health(address, Duration::from_secs(2)).await {
            return health;
        }
        let waited = started.elapsed();
        if waited >= next_log {
            tracing::info!(worker = %id, %address, waited_s = waited.as_secs(), "waiting for the worker to answer");
            next_log = waited + Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long requests may take: each (when it sets no deadline), and all those in flight
/// once shutdown starts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub request: Duration,
    pub shutdown: Duration,
}

/// Serves the gRPC API on `grpc` and the OpenAI HTTP API on `http` until `shutdown` is
/// cancelled, then shuts down gracefully: not ready at once (HTTP `/health` 503, gRPC health
/// NOT_SERVING), new requests refused (503 with Retry-After / UNAVAILABLE) while the listeners
/// stay open, the requests in flight finish within `timeouts.shutdown`, and any still running
/// then ends with an explicit error (an SSE error event and `[DONE]`; gRPC UNAVAILABLE).
pub async fn serve(
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    tls: Option<crate::tls::ServerTls>,
    prepared: Prepared,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let request_timeout = timeouts.request;
    let Prepared { frontend, control, mut fatal } = prepared;
    // The servers close only once the requests in flight have ended.
    let closed = CancellationToken::new();
    let incoming = cluster::process::nodelay_incoming(grpc);
    // Standard grpc.health.v1, for the whole server and for the Inference service: SERVING
    // while a placement serves (as HTTP `/health`), NOT_SERVING before, between and after.
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(follow_readiness(frontend.clone(), health.clone()));
    if frontend.auth.enabled() {
        tokio::spawn(reload_keys_on_sighup(frontend.auth.clone()));
    }
    let reflection = || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET);
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder.tls_config(tls.grpc())?;
    }
    let grpc_server = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InferenceServer::with_interceptor(
            InferenceService::new(frontend.clone(), request_timeout),
            crate::api::authorizer(frontend.auth.clone(), false),
        ))
        .add_service(proto::tramontane::v1::admin_server::AdminServer::with_interceptor(
            AdminService::new(frontend.clone(), control.clone()),
            crate::api::authorizer(frontend.auth.clone(), true),
        ))
        .serve_with_incoming_shutdown(incoming, closed.clone().cancelled_owned());
    let router = crate::openai::router(frontend.clone(), request_timeout);
    let http_closed = closed.clone().cancelled_owned();
    let http_server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> = match &tls {
        None => {
            let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot set TCP_NODELAY");
                }
            });
            Box::pin(std::future::IntoFuture::into_future(axum::serve(http, router).with_graceful_shutdown(http_closed)))
        }
        Some(tls) => {
            let http = crate::tls::TlsListener::new(http, tls)?;
            Box::pin(std::future::IntoFuture::into_future(axum::serve(http, router).with_graceful_shutdown(http_closed)))
        }
    };
    let drain = async {
        shutdown.cancelled().await;
        frontend.stop_accepting();
        health.set_not_serving::<InferenceServer<InferenceService>>().await;
        health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        let started = tokio::time::Instant::now();
        tracing::info!(in_flight = frontend.in_flight(), timeout = ?timeouts.shutdown, "shutting down: refusing new requests, finishing those in flight");
        if tokio::time::timeout(timeouts.shutdown, until_idle(&frontend)).await.is_err() {
            tracing::warn!(in_flight = frontend.in_flight(), "the shutdown timeout passed: ending the requests still running with an error");
            frontend.cut_running();
            // Their streams end at once with the error; give them a moment to be written.
            let _ = tokio::time::timeout(Duration::from_secs(5), until_idle(&frontend)).await;
        }
        tracing::info!(took = ?started.elapsed(), "every request ended; closing");
        // A standby leads at once rather than when the leadership lease would expire.
        control.resign(Duration::from_secs(3)).await;
        closed.cancel();
    };
    // Both servers wait for their connections to close; clients may keep idle ones open, so
    // once every request has ended they get a moment, then the process goes on without them.
    let drained_then_grace = async {
        drain.await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    // The controller stopped (another coordinator leads, say): the requests in flight end
    // with an explicit error their clients retry on, never a cut connection.
    let fatal = async {
        let e = match fatal.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        };
        tracing::error!(error = %e, in_flight = frontend.in_flight(), "stopping: ending the requests in flight with an error");
        frontend.stop_accepting();
        frontend.cut_running();
        let _ = tokio::time::timeout(Duration::from_secs(5), until_idle(&frontend)).await;
        e
    };
    tokio::select! {
        (g, h) = async { tokio::join!(grpc_server, http_server) } => {
            g?;
            h?;
        }
        () = drained_then_grace => tracing::info!("clients keep idle connections open; closing them"),
        e = fatal => return Err(e),
    }
    Ok(())
}

/// Keeps the gRPC health status in line with readiness: SERVING while a replica serves and
/// shutdown has not begun.
async fn follow_readiness(frontend: Frontend, health: tonic_health::server::HealthReporter) {
    let mut pool = frontend.pool_changes();
    loop {
        let status = if frontend.ready() { tonic_health::ServingStatus::Serving } else { tonic_health::ServingStatus::NotServing };
        health.set_service_status("", status).await;
        health.set_service_status(<InferenceServer<InferenceService> as tonic::server::NamedService>::NAME, status).await;
        if frontend.stopping() || pool.changed().await.is_err() {
            return;
        }
    }
}

/// Reads the API key file again on every SIGHUP (requests in flight go on; a file that
/// cannot be read keeps the keys in force).
async fn reload_keys_on_sighup(auth: crate::auth::Auth) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else { return };
    while hup.recv().await.is_some() {
        match auth.reload() {
            Ok(n) => tracing::info!(keys = n, "SIGHUP: API keys read again"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: the API key file cannot be read; the keys in force stay"),
        }
    }
}

/// How long the servers may wait for clients' idle connections once every request ended.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Returns once no request runs.
async fn until_idle(frontend: &Frontend) {
    while frontend.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
