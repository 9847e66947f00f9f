//! Bringing a coordinator up: load the model's assignment onto every worker, start one
//! replica per worker, serve the client API on a bound listener until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use proto::tramontane::v1::inference_server::InferenceServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use worker::membership::{EtcdMembership, Membership, MemoryMembership, WorkerCard};
use worker::parallel::Layout;
use worker::{ModelConfig, Tokenizer};

use crate::api::{AdminService, InferenceService};
use crate::chat::ChatTemplate;
use crate::control::{self, ControlConfig, ControlHandle};
use crate::frontend::{Frontend, Pool, Served};
use crate::metrics::Metrics;
use crate::planner::Sizing;
use crate::scheduler::SchedulerConfig;
use crate::validate::ModelLimits;

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
    /// `--dtype`: auto (as stored), f32, f16 or bf16.
    pub dtype: String,
    /// `--quantization`: auto (FP8 checkpoints stay FP8), none, int8 or fp8.
    pub quantization: String,
    pub load_format: String,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_batch_tokens: usize,
    pub max_queue: usize,
    /// Deadline of a request that sets none.
    pub request_timeout: Duration,
    /// etcd endpoints; empty = the fixed `workers` and in-process membership.
    pub etcd: Vec<String>,
    pub cluster: String,
    pub lease_ttl: Duration,
    /// This coordinator's id (leadership on etcd).
    pub id: String,
}

/// A coordinator ready to serve.
pub struct Prepared {
    pub frontend: Frontend,
    pub control: ControlHandle,
}

/// Reads the model, starts membership and the placement controller. Without etcd it waits
/// until the first placement is loaded on the workers; with etcd it returns at once (a
/// standby serves nothing until it leads).
pub async fn prepare(cfg: &ServeConfig) -> anyhow::Result<Prepared> {
    let config = ModelConfig::from_file(&cfg.model.join("config.json"))?;
    let tokenizer = Tokenizer::from_file(&cfg.model.join("tokenizer.json"))?;
    cfg.layout.validate(&config).map_err(|e| anyhow::anyhow!("layout: {e}"))?;
    let sizing = Sizing {
        dtype: cfg.dtype.parse().map_err(|e| anyhow::anyhow!("--dtype: {e}"))?,
        quantization: cfg.quantization.parse().map_err(|e| anyhow::anyhow!("--quantization: {e}"))?,
        dummy: cfg.load_format.parse::<worker::LoadFormat>().map_err(|e| anyhow::anyhow!("--load-format: {e}"))? == worker::LoadFormat::Dummy,
        kv_blocks: cfg.kv_blocks,
        block_size: cfg.block_size,
    };
    let metrics = Arc::new(Metrics::default());
    let membership: Arc<dyn Membership> = if cfg.etcd.is_empty() {
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
        let m = MemoryMembership::new();
        let deadline = tokio::time::Instant::now() + WORKER_WAIT;
        for (i, address) in cfg.workers.iter().enumerate() {
            // Its memory and pid: the planner sizes placements by what each worker offers.
            let id = format!("worker-{i}");
            let health = first_health(&id, address, deadline).await?;
            if health.memory_bytes == 0 {
                tracing::warn!(worker = %id, %address, "the worker does not report its memory: placing as if it held anything");
            }
            let card = WorkerCard {
                id,
                address: address.clone(),
                device: "cpu".into(),
                memory_bytes: health.memory_bytes,
                version: String::new(),
                pid: health.pid,
                restarts: health.restarts,
            };
            m.register(&card).await?;
        }
        Arc::new(m)
    } else {
        Arc::new(EtcdMembership::connect(&cfg.etcd, &cfg.cluster, cfg.lease_ttl).await?)
    };
    let control_cfg = ControlConfig {
        model: cfg.model.clone(),
        config: config.clone(),
        layout: cfg.layout.clone(),
        sizing,
        dtype: cfg.dtype.clone(),
        quantization: cfg.quantization.clone(),
        load_format: cfg.load_format.clone(),
        sched: SchedulerConfig {
            num_blocks: cfg.kv_blocks,
            block_size: cfg.block_size,
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            max_queue: cfg.max_queue,
        },
        id: cfg.id.clone(),
    };
    let (pool_tx, mut pool_rx) = watch::channel(Arc::new(Pool::default()));
    let control = control::spawn(control_cfg, membership, pool_tx, metrics.clone());
    if cfg.etcd.is_empty() {
        let placed = pool_rx.wait_for(|p| p.leading && (!p.replicas.is_empty() || p.no_capacity.is_some()));
        let pool = tokio::time::timeout(Duration::from_secs(900), placed).await.context("waiting for the workers to load")??.clone();
        if let Some(reason) = &pool.no_capacity {
            anyhow::bail!("the workers cannot serve the model: {reason}");
        }
    }
    let name = cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let served = Served {
        name,
        architecture: config.architecture.hf_name().to_owned(),
        tokenizer,
        chat_template: ChatTemplate::load(&cfg.model).map_err(anyhow::Error::msg)?,
        limits: ModelLimits { vocab_size: config.vocab_size, max_context: config.max_position_embeddings, eos_token_ids: config.eos_token_ids.clone() },
    };
    Ok(Prepared { frontend: Frontend::new(served, pool_rx, metrics), control })
}

/// How long a coordinator of a fixed cluster waits for its workers' first Health answers
/// (workers may start after it).
const WORKER_WAIT: Duration = Duration::from_secs(300);

/// The worker's first Health answer, retried until it comes (the worker may not listen yet)
/// or `deadline` passes; a line is logged while waiting.
async fn first_health(id: &str, address: &str, deadline: tokio::time::Instant) -> anyhow::Result<proto::tramontane::worker::v1::HealthResponse> {
    let started = tokio::time::Instant::now();
    let mut next_log = Duration::from_secs(2);
    loop {
        if let Some(health) = control::worker_health(address, Duration::from_secs(2)).await {
            return Ok(health);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{id} at {address} did not answer within {} s of the coordinator's start: is the worker running there?",
            WORKER_WAIT.as_secs()
        );
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
    prepared: Prepared,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let request_timeout = timeouts.request;
    let Prepared { frontend, control } = prepared;
    // The servers close only once the requests in flight have ended.
    let closed = CancellationToken::new();
    let incoming = worker::serving::nodelay_incoming(grpc);
    // Standard grpc.health.v1: SERVING once the model is loaded on every worker (it is, by
    // the time `serve` runs), for the whole server and for the Inference service.
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<InferenceServer<InferenceService>>().await;
    let reflection = || tonic_reflection::server::Builder::configure().register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET);
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InferenceServer::new(InferenceService::new(frontend.clone(), request_timeout)))
        .add_service(proto::tramontane::v1::admin_server::AdminServer::new(AdminService::new(frontend.clone(), control)))
        .serve_with_incoming_shutdown(incoming, closed.clone().cancelled_owned());
    let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let http_server = axum::serve(http, crate::openai::router(frontend.clone(), request_timeout)).with_graceful_shutdown(closed.clone().cancelled_owned());
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
        closed.cancel();
    };
    // Both servers wait for their connections to close; clients may keep idle ones open, so
    // once every request has ended they get a moment, then the process goes on without them.
    let drained_then_grace = async {
        drain.await;
        tokio::time::sleep(CLOSE_GRACE).await;
    };
    tokio::select! {
        (g, h) = async { tokio::join!(grpc_server, http_server) } => {
            g?;
            h?;
        }
        () = drained_then_grace => tracing::info!("clients keep idle connections open; closing them"),
    }
    Ok(())
}

/// How long the servers may wait for clients' idle connections once every request ended.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Returns once no request runs.
async fn until_idle(frontend: &Frontend) {
    while frontend.in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
