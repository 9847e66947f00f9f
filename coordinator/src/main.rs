//! The coordinator binary: serves the client API over the workers it is given.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use cluster::SchedulerConfig;
use coordinator::server::{ServeConfig, Timeouts, prepare, serve};

/// Command-line configuration of the coordinator.
#[derive(Debug, Parser)]
#[command(version, about = "Tramontane coordinator")]
struct Args {
    /// Address of the gRPC API (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "TRAMONTANE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: std::net::SocketAddr,
    /// Address of the OpenAI-compatible HTTP API (the bound address is printed second).
    #[arg(long, env = "TRAMONTANE_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    http_addr: std::net::SocketAddr,
    /// Checkpoint directory (config.json, tokenizer.json, weights), as the workers see it too.
    #[arg(long, env = "TRAMONTANE_MODEL")]
    model: PathBuf,
    /// Worker API address of a fixed cluster; repeat for more workers. Every tp x ep x pp
    /// consecutive workers form one replica, by rank. Without it, `--etcd` finds the workers.
    #[arg(long = "worker", env = "TRAMONTANE_WORKERS", value_delimiter = ',', required_unless_present = "etcd")]
    workers: Vec<String>,
    /// Membership, leadership and the plan on etcd: workers join with `worker serve --etcd`,
    /// and a second coordinator of the cluster is a standby.
    #[command(flatten)]
    membership: cluster::membership::EtcdArgs,
    /// This coordinator's id (default: host name and gRPC port).
    #[arg(long, env = "TRAMONTANE_COORDINATOR_ID")]
    id: Option<String>,
    /// Tensor-parallel ranks per replica (attention heads and MLP units split).
    #[arg(long, env = "TRAMONTANE_TP", default_value_t = 1)]
    tp: usize,
    /// Expert-parallel ranks per replica (Mixtral experts split).
    #[arg(long, env = "TRAMONTANE_EP", default_value_t = 1)]
    ep: usize,
    /// Pipeline stages per replica (decoder layers split).
    #[arg(long, env = "TRAMONTANE_PP", default_value_t = 1)]
    pp: usize,
    /// Decoder layers of each pipeline stage, e.g. `20,18,18` (default: as even as possible).
    #[arg(long, env = "TRAMONTANE_STAGE_LAYERS", value_delimiter = ',')]
    stage_layers: Vec<usize>,
    /// The dtype workers keep dense weights in: auto (as the checkpoint stores them), f32,
    /// f16 or bf16.
    #[arg(long, env = "TRAMONTANE_DTYPE", default_value = "auto")]
    dtype: cluster::WeightDType,
    /// 8-bit weights: auto (FP8 checkpoints stay FP8), none, int8 or fp8 (quantized at load).
    #[arg(long, env = "TRAMONTANE_QUANTIZATION", default_value = "auto")]
    quantization: cluster::Quantization,
    #[arg(long, default_value = "safetensors")]
    load_format: cluster::LoadFormat,
    /// KV cache blocks per worker.
    #[arg(long, env = "TRAMONTANE_KV_BLOCKS", default_value_t = 1024)]
    kv_blocks: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most sequences in one batch step.
    #[arg(long, default_value_t = SchedulerConfig::MAX_NUM_SEQS)]
    max_num_seqs: usize,
    /// Most new tokens in one batch step (longer prompts are prefilled in chunks).
    #[arg(long, default_value_t = SchedulerConfig::MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Most requests waiting per replica; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = SchedulerConfig::MAX_QUEUE)]
    max_queue: usize,
    /// Seconds a request may take when it sets no deadline (gRPC `grpc-timeout`).
    #[arg(long, env = "TRAMONTANE_REQUEST_TIMEOUT", default_value_t = 600)]
    request_timeout_secs: u64,
    /// On SIGTERM or Ctrl-C: seconds the requests in flight may take to finish (new ones are
    /// refused with 503 / UNAVAILABLE meanwhile); any still running then ends with an error.
    #[arg(long, env = "TRAMONTANE_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let cfg = ServeConfig {
        model: args.model,
        workers: args.workers,
        layout: cluster::layout::Layout { tp: args.tp, ep: args.ep, pp: args.pp, stage_layers: args.stage_layers },
        dtype: args.dtype,
        quantization: args.quantization,
        load_format: args.load_format,
        kv_blocks: args.kv_blocks,
        block_size: args.block_size,
        max_num_seqs: args.max_num_seqs,
        max_batch_tokens: args.max_batch_tokens,
        max_queue: args.max_queue,
        request_timeout: std::time::Duration::from_secs(args.request_timeout_secs),
        etcd: args.membership.etcd,
        cluster: args.membership.cluster,
        lease_ttl: std::time::Duration::from_secs(args.membership.lease_ttl_secs),
        id: String::new(),
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.grpc_addr).await.with_context(|| format!("binding {}", args.grpc_addr))?;
        let http = tokio::net::TcpListener::bind(args.http_addr).await.with_context(|| format!("binding {}", args.http_addr))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "coordinator".into());
        let cfg = ServeConfig { id: args.id.unwrap_or_else(|| format!("{host}-{}", listener.local_addr().map_or(0, |a| a.port()))), ..cfg };
        let prepared = prepare(&cfg).await?;
        let (addr, http_addr) = (listener.local_addr()?, http.local_addr()?);
        println!("listening on {addr}");
        println!("http listening on {http_addr}");
        std::io::stdout().flush()?;
        tracing::info!(grpc = %addr, http = %http_addr, "coordinator serving");
        let shutdown = cluster::process::shutdown_on_signal();
        let timeouts = Timeouts { request: cfg.request_timeout, shutdown: std::time::Duration::from_secs(args.shutdown_timeout) };
        serve(listener, http, prepared, timeouts, shutdown).await
    })
}
