//! Bringing a coordinator up: load the model's assignment onto every worker, start one
//! replica per worker, serve the client API on a bound listener until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::tramontane::v1::inference_server::InferenceServer;
use proto::tramontane::worker::v1 as wpb;
use tokio_util::sync::CancellationToken;
use worker::parallel::Layout;
use worker::{ModelConfig, Tokenizer};

use crate::api::{AdminService, InferenceService};
use crate::chat::ChatTemplate;
use crate::frontend::{Frontend, Served};
use crate::metrics::Metrics;
use crate::replica::ReplicaHandle;
use crate::scheduler::SchedulerConfig;
use crate::validate::ModelLimits;

/// Everything a coordinator needs to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Checkpoint directory (the coordinator reads config.json and tokenizer.json; workers read
    /// the weights from the same path).
    pub model: PathBuf,
    /// Worker API addresses (`host:port`); every `layout.world()` consecutive workers form a
    /// replica, by rank.
    pub workers: Vec<String>,
    pub layout: Layout,
    pub dtype: String,
    pub load_format: String,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub max_num_seqs: usize,
    pub max_batch_tokens: usize,
    pub max_queue: usize,
    /// Deadline of a request that sets none.
    pub request_timeout: Duration,
}

/// The placement epoch of a coordinator's first (and, without membership, only) plan.
const FIRST_EPOCH: u64 = 1;

async fn connect(addr: &str) -> anyhow::Result<wpb::worker_client::WorkerClient<tonic::transport::Channel>> {
    let url = format!("http://{addr}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match wpb::worker_client::WorkerClient::connect(url.clone()).await {
            Ok(c) => return Ok(c.max_decoding_message_size(64 << 20)),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%addr, error = %e, "worker not reachable yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => anyhow::bail!("cannot reach worker {addr}: {e}"),
        }
    }
}

/// Loads the model on every worker and builds the API service.
pub async fn prepare(cfg: &ServeConfig) -> anyhow::Result<Frontend> {
    anyhow::ensure!(!cfg.workers.is_empty(), "at least one worker address is needed");
    let config = ModelConfig::from_file(&cfg.model.join("config.json"))?;
    let tokenizer = Tokenizer::from_file(&cfg.model.join("tokenizer.json"))?;
    let metrics = Arc::new(Metrics::default());
    let world = cfg.layout.world();
    cfg.layout.validate(&config).map_err(|e| anyhow::anyhow!("layout: {e}"))?;
    anyhow::ensure!(
        cfg.workers.len().is_multiple_of(world),
        "{} workers cannot form replicas of {world} ranks (tp {} x ep {} x pp {}): give a multiple of {world}",
        cfg.workers.len(),
        cfg.layout.tp,
        cfg.layout.ep,
        cfg.layout.pp
    );
    let mut replicas = Vec::new();
    for group in cfg.workers.chunks(world) {
        let started = std::time::Instant::now();
        let ranks = load_replica(cfg, group).await?;
        tracing::info!(workers = ?group, elapsed = ?started.elapsed(), "replica loaded");
        let sched = SchedulerConfig {
            num_blocks: cfg.kv_blocks,
            block_size: cfg.block_size,
            max_num_seqs: cfg.max_num_seqs,
            max_batch_tokens: cfg.max_batch_tokens,
            max_queue: cfg.max_queue,
        };
        replicas.push(ReplicaHandle::spawn(ranks, cfg.layout.driver(), FIRST_EPOCH, sched, metrics.clone()));
    }
    let name = cfg.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    Ok(Frontend::new(Served {
        name,
        architecture: config.architecture.hf_name().to_owned(),
        tokenizer,
        chat_template: ChatTemplate::load(&cfg.model).map_err(anyhow::Error::msg)?,
        limits: ModelLimits {
            vocab_size: config.vocab_size,
            max_context: config.max_position_embeddings,
            eos_token_ids: config.eos_token_ids.clone(),
        },
        replicas,
        workers: cfg.workers.clone(),
        layout: cfg.layout.clone(),
        epoch: FIRST_EPOCH,
    }, metrics))
}

type WorkerClient = wpb::worker_client::WorkerClient<tonic::transport::Channel>;

/// Loads one replica's assignment on its workers (`group`, by rank) at once: sharded ranks
/// link to each other while loading.
async fn load_replica(cfg: &ServeConfig, group: &[String]) -> anyhow::Result<Vec<WorkerClient>> {
    let mut clients = Vec::with_capacity(group.len());
    let mut peers = Vec::new();
    for addr in group {
        let mut client = connect(addr).await?;
        if group.len() > 1 {
            let health = client.health(wpb::HealthRequest {}).await.map_err(|s| anyhow::anyhow!("worker {addr}: {}", s.message()))?;
            peers.push(health.into_inner().comm_address);
        }
        clients.push(client);
    }
    let calls: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(rank, client)| {
            let mut client = client.clone();
            let l = &cfg.layout;
            let request = wpb::LoadAssignmentRequest {
                epoch: FIRST_EPOCH,
                model_path: cfg.model.display().to_string(),
                dtype: cfg.dtype.clone(),
                load_format: cfg.load_format.clone(),
                kv_blocks: cfg.kv_blocks as u32,
                block_size: cfg.block_size as u32,
                tp: l.tp as u32,
                ep: l.ep as u32,
                pp: l.pp as u32,
                stage_layers: l.stage_layers.iter().map(|&n| n as u32).collect(),
                rank: rank as u32,
                peers: peers.clone(),
                ..Default::default()
            };
            tokio::spawn(async move { client.load_assignment(request).await })
        })
        .collect();
    for (call, addr) in calls.into_iter().zip(group) {
        let loaded = call.await?.map_err(|s| anyhow::anyhow!("worker {addr} could not load the model: {}", s.message()))?;
        tracing::info!(%addr, architecture = %loaded.into_inner().architecture, "worker loaded its shard");
    }
    Ok(clients)
}

/// Serves the gRPC API on `grpc` and the OpenAI HTTP API on `http` until `shutdown` is
/// cancelled.
pub async fn serve(
    grpc: tokio::net::TcpListener,
    http: tokio::net::TcpListener,
    frontend: Frontend,
    request_timeout: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
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
        .add_service(proto::tramontane::v1::admin_server::AdminServer::new(AdminService::new(frontend.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let http_server = axum::serve(http, crate::openai::router(frontend, request_timeout)).with_graceful_shutdown(shutdown.cancelled_owned());
    let (g, h) = tokio::join!(grpc_server, http_server);
    g?;
    h?;
    Ok(())
}
