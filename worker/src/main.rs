//! The worker binary: `worker serve` serves the worker API a coordinator drives;
//! `worker generate` runs a model locally (the engine without a cluster).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use worker::{
    Backend, CacheConfig, Cpu, Device, Engine, EngineOptions, Event, Generator, IncrementalDecoder, LoadFormat, Quantization, SamplingParams, SeqRequest,
    Tokenizer, WeightDType,
};

#[derive(Debug, Parser)]
#[command(version, about = "Tramontane worker")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a completion locally and stream it to stdout.
    Generate(GenerateArgs),
    /// Serve the worker API to a coordinator.
    Serve(Box<ServeArgs>),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, env = "TRAMONTANE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Address peers of a sharded replica link to (TCP communicator); default: the `--listen`
    /// host, a free port.
    #[arg(long, env = "TRAMONTANE_COMM_LISTEN")]
    comm_listen: Option<std::net::SocketAddr>,
    /// A collective waiting longer than this for a peer fails the step.
    #[arg(long, env = "TRAMONTANE_COMM_TIMEOUT_SECS", default_value_t = 30)]
    comm_timeout_secs: u64,
    /// The cluster to join on etcd.
    #[command(flatten)]
    membership: worker::membership::EtcdArgs,
    /// The host the coordinator and peers reach this worker at, when `--listen` is a wildcard
    /// address (in Kubernetes: the pod IP).
    #[arg(long, env = "TRAMONTANE_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// How many times a supervisor restarted this worker (`tramctl up` sets it; reported in
    /// Health and on the card, so `tramctl status` shows it).
    #[arg(long, env = "TRAMONTANE_RESTARTS", default_value_t = 0)]
    restarts: u32,
    /// This worker's id in the cluster (default: host name and API port).
    #[arg(long, env = "TRAMONTANE_WORKER_ID")]
    id: Option<String>,
    /// Memory the worker offers for weights and KV cache, reported in its Health and etcd
    /// card (the coordinator's planner refuses placements that do not fit). Default, measured
    /// at start: on CPU the smaller of the host's available memory and its cgroup's room, on
    /// a GPU its free memory.
    #[arg(long, env = "TRAMONTANE_MEMORY_BYTES")]
    memory_bytes: Option<u64>,
    /// Where the engine runs: cpu, cuda or cuda:N (builds with the `cuda` feature).
    #[arg(long, env = "TRAMONTANE_DEVICE", default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    cluster_tls: cluster::tls::ClusterTlsArgs,
    /// Also serve the standard gRPC health service alone, in plain text, here: for probes
    /// that cannot present a certificate (Kubernetes' gRPC probes) when the worker API is
    /// mutual TLS.
    #[arg(long, env = "TRAMONTANE_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "TRAMONTANE_MODEL")]
    model: PathBuf,
    /// The prompt text.
    prompt: String,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The dtype dense weight matrices are kept in: auto (as the checkpoint stores them), f32,
    /// f16 or bf16. Activations and the KV cache are f32.
    #[arg(long, env = "TRAMONTANE_DTYPE", default_value = "auto")]
    dtype: WeightDType,
    /// 8-bit weights: auto (FP8 checkpoints stay FP8), none, int8 or fp8 (quantized at load).
    #[arg(long, env = "TRAMONTANE_QUANTIZATION", default_value = "auto")]
    quantization: Quantization,
    /// `safetensors` (the checkpoint) or `dummy` (random weights of the config's shapes).
    #[arg(long, default_value = "safetensors")]
    load_format: LoadFormat,
    /// KV cache blocks of 16 tokens.
    #[arg(long, env = "TRAMONTANE_KV_BLOCKS", default_value_t = 1024)]
    kv_blocks: usize,
    /// Where the engine runs: cpu, cuda or cuda:N (builds with the `cuda` feature).
    #[arg(long, env = "TRAMONTANE_DEVICE", default_value = "cpu")]
    device: Device,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Args::parse().command {
        Command::Generate(args) => match args.device {
            Device::Cpu => generate(Cpu, args),
            Device::Cuda(n) => generate(cuda(n)?, args),
        },
        Command::Serve(args) => serve(*args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tls = cluster::tls::ClusterTls::load(&args.cluster_tls)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let comm_addr = args.comm_listen.unwrap_or_else(|| std::net::SocketAddr::new(addr.ip(), 0));
        let comm_listener = worker::comm::CommListener::bind(comm_addr).with_context(|| format!("binding {comm_addr}"))?.with_tls(tls.clone());
        tracing::info!(addr = %comm_listener.local_addr()?, "communicator listening");
        let timeout = std::time::Duration::from_secs(args.comm_timeout_secs);
        let comm = worker::service::CommSetup {
            listener: Some(comm_listener),
            options: worker::comm::TcpOptions { timeout, setup_timeout: timeout * 2 },
            advertise_host: args.advertise_host.clone(),
        };
        let shutdown = worker::process::shutdown_on_signal();
        if let Some(addr) = args.health_listen {
            let probes = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr} (--health-listen)"))?;
            tracing::info!(addr = %probes.local_addr()?, "health service listening (plain text)");
            tokio::spawn(worker::service::serve_health(probes, shutdown.clone()));
        }
        let handle = match args.device {
            Device::Cpu => {
                let memory = budget(args.memory_bytes, "host", worker::process::host_memory);
                worker::service::EngineHandle::spawn(Cpu, comm, worker::service::Offer { memory_bytes: memory, restarts: args.restarts })?
            }
            Device::Cuda(n) => {
                let backend = cuda(n)?;
                let free = device_memory(&backend)?;
                let memory = budget(args.memory_bytes, "GPU", || free);
                worker::service::EngineHandle::spawn(backend, comm, worker::service::Offer { memory_bytes: memory, restarts: args.restarts })?
            }
        };
        // Ready (the device opened): the first line of stdout tells a parent process where
        // to connect.
        println!("listening on {addr}");
        std::io::stdout().flush()?;
        tracing::info!(%addr, device = %args.device, "worker listening");
        // Registered until SIGTERM: then the lease is revoked at once, so the leader moves this
        // worker's sequences now rather than when the lease would expire.
        let registration = if args.membership.etcd.is_empty() { None } else { Some(register(&args, tls.as_ref(), addr, handle.offer()).await?) };
        let released = registration.map(|lease| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                shutdown.cancelled().await;
                if !lease.release(worker::membership::RELEASE_LIMIT).await {
                    tracing::warn!("could not revoke the registration on etcd; it expires with its lease");
                }
            })
        });
        let stopping = shutdown.clone();
        let served = worker::service::serve(listener, tls.as_ref(), handle, shutdown).await.map_err(|e| anyhow::anyhow!(e));
        if let Some(released) = released {
            if stopping.is_cancelled() {
                let _ = released.await;
            } else {
                released.abort();
            }
        }
        served
    })
}

/// Registers this worker's card, with what it `offer`s, on etcd (waiting for etcd with capped
/// backoff, never exiting for an outage); a lost lease is registered again, the model kept.
async fn register(
    args: &ServeArgs,
    tls: Option<&cluster::tls::ClusterTls>,
    addr: std::net::SocketAddr,
    offer: worker::service::Offer,
) -> anyhow::Result<worker::membership::Lease> {
    use worker::membership::{EtcdMembership, Membership, WorkerCard};
    let ttl = std::time::Duration::from_secs(args.membership.lease_ttl_secs);
    let membership = EtcdMembership::connect(&args.membership.etcd, &args.membership.cluster, ttl, tls).await.context("connecting to etcd")?;
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()));
    let card = WorkerCard {
        id: args.id.clone().unwrap_or_else(|| format!("{}-{}", host.unwrap_or_else(|| "worker".into()), addr.port())),
        address: match &args.advertise_host {
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        },
        device: args.device.to_string(),
        memory_bytes: offer.memory_bytes,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        restarts: offer.restarts,
    };
    // Registration retries in the background until etcd answers; the worker serves meanwhile.
    let lease = membership.register(&card).await.context("registering on etcd")?;
    tracing::info!(id = %card.id, cluster = %args.membership.cluster, "registering on etcd");
    // A lost lease is registered again by the membership, and the model stays: a coordinator
    // that gave this worker up fences it (Fence, or an assignment of a newer epoch), while an
    // etcd out of everyone's reach for longer than the TTL expires every lease at once, which
    // must not unload the whole cluster.
    Ok(lease)
}

/// The memory this worker offers: `--memory-bytes`, else `measured` (the `what`'s room now).
fn budget(flag: Option<u64>, what: &str, measured: impl FnOnce() -> u64) -> u64 {
    let (bytes, source) = match flag {
        Some(b) => (b, "--memory-bytes"),
        None => (measured(), what),
    };
    if bytes == 0 {
        tracing::warn!("cannot tell how much memory this worker has: give --memory-bytes; it reports 0 (unknown)");
    } else {
        tracing::info!(gb = format!("{:.2}", bytes as f64 / 1e9), source, "memory offered for weights and KV cache");
    }
    bytes
}

#[cfg(feature = "_cuda")]
fn cuda(ordinal: usize) -> anyhow::Result<worker::backend::Cuda> {
    let backend = worker::backend::Cuda::new(ordinal).with_context(|| format!("opening GPU {ordinal}"))?;
    tracing::info!(device = backend.device_name(), ordinal, "CUDA backend ready");
    Ok(backend)
}

#[cfg(feature = "_cuda")]
fn device_memory(backend: &worker::backend::Cuda) -> anyhow::Result<u64> {
    Ok(backend.memory()?.0 as u64)
}

/// Without the `cuda` feature no GPU backend exists; `--device cuda` says so.
#[cfg(not(feature = "_cuda"))]
fn cuda(_: usize) -> anyhow::Result<Cpu> {
    anyhow::bail!("this worker was built without the `cuda` feature: only --device cpu is available")
}

#[cfg(not(feature = "_cuda"))]
fn device_memory(_: &Cpu) -> anyhow::Result<u64> {
    Ok(worker::process::host_memory())
}

fn generate<B: Backend>(backend: B, args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_file(&args.model.join("tokenizer.json"))?;
    let options = EngineOptions {
        dtype: args.dtype,
        quantization: args.quantization,
        load_format: args.load_format,
        cache: CacheConfig { num_blocks: args.kv_blocks, block_size: 16 },
    };
    let started = std::time::Instant::now();
    let engine = Engine::load(backend, &args.model, &options).with_context(|| format!("loading {}", args.model.display()))?;
    tracing::info!(elapsed = ?started.elapsed(), architecture = engine.config().architecture.hf_name(), "model loaded");
    let prompt = tokenizer.encode(&args.prompt, true)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop_token_ids: engine.config().eos_token_ids.clone(),
        ..SamplingParams::default()
    };
    let mut generator = Generator::new(engine, 1);
    generator.add(SeqRequest { id: 0, prompt: prompt.clone(), params, cache_salt: None })?;
    let mut decoder = IncrementalDecoder::new(&prompt, true);
    let mut out = std::io::stdout().lock();
    let started = std::time::Instant::now();
    let mut count = 0;
    while generator.has_work() {
        for event in generator.step()? {
            let Event::Token { token, .. } = event else { continue };
            count += 1;
            write!(out, "{}", decoder.push(&tokenizer, token.token)?)?;
            out.flush()?;
        }
    }
    writeln!(out, "{}", decoder.flush(&tokenizer)?)?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(tokens = count, tokens_per_s = format!("{:.1}", count as f64 / secs), "done");
    Ok(())
}
