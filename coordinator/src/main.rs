//! The coordinator binary: serves the client API over the workers it is given.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use coordinator::planner::Sizing;
use coordinator::server::{Limits, ServeConfig, Timeouts, prepare, serve};

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
    #[command(flatten)]
    layout: cluster::layout::Layout,
    #[command(flatten)]
    sizing: Sizing,
    #[command(flatten)]
    limits: Limits,
    /// How `/v1/embeddings` and Embed pool a sequence's hidden states.
    #[arg(long, env = "TRAMONTANE_POOLING", value_enum, default_value = "last")]
    pooling: cluster::embedding::Pooling,
    /// Seconds a request may take when it sets no deadline (gRPC `grpc-timeout`).
    #[arg(long, env = "TRAMONTANE_REQUEST_TIMEOUT", default_value_t = 600)]
    request_timeout_secs: u64,
    /// API keys, one per line: `NAME KEY [rpm=N] [tpm=N] [admin]` (requests and tokens per
    /// minute; `admin` may call the Admin API). Without it every request is served. Read
    /// again on SIGHUP.
    #[arg(long, env = "TRAMONTANE_API_KEYS")]
    api_keys: Option<PathBuf>,
    #[command(flatten)]
    tls: coordinator::tls::TlsArgs,
    #[command(flatten)]
    cluster_tls: cluster::tls::ClusterTlsArgs,
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
        layout: args.layout,
        sizing: args.sizing,
        limits: args.limits,
        pooling: args.pooling,
        request_timeout: std::time::Duration::from_secs(args.request_timeout_secs),
        etcd: args.membership.etcd,
        cluster: args.membership.cluster,
        lease_ttl: std::time::Duration::from_secs(args.membership.lease_ttl_secs),
        id: String::new(),
        api_keys: args.api_keys,
        cluster_tls: cluster::tls::ClusterTls::load(&args.cluster_tls)?,
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let tls = coordinator::tls::ServerTls::load(&args.tls)?;
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
        serve(listener, http, tls, prepared, timeouts, shutdown).await
    })
}
