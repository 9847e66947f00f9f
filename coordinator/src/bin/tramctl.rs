//! `tramctl`: run and talk to a Tramontane cluster.
//! - `tramctl up` starts a whole local cluster (workers + coordinator) in the foreground and
//!   supervises it: a worker that dies is started again (with backoff; `--no-restart` keeps
//!   it dead), and the cluster stops on Ctrl-C / SIGTERM or when the coordinator exits.
//! - `tramctl generate "text"` streams a completion from a running cluster.
//! - `tramctl status` prints the served model, the workers (with process ids), the placement
//!   epoch, the load and why nothing is placed when the model does not fit (`--experts`:
//!   Mixtral's tokens per expert and the expert-parallel imbalance); `tramctl plan`
//!   the placement the current workers would get, with the largest rank's memory (or why
//!   none fits); `tramctl drain WORKER_ID` moves a worker's sequences away and releases it;
//!   `tramctl usage` the tokens each API key used. With API keys, each sends `--api-key` (env
//!   `TRAMONTANE_API_KEY`; an admin key for the Admin API).

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use clap::{Parser, Subcommand};
use proto::tramontane::v1 as pb;

#[derive(Debug, Parser)]
#[command(version, about = "Run and talk to a Tramontane cluster")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start a local cluster in the foreground.
    Up(Box<UpArgs>),
    /// Stream a completion from a running cluster.
    Generate(GenerateArgs),
    /// Print the served model, workers, replicas and load.
    Status(StatusArgs),
    /// Print the placement the current workers would get, with each rank's memory.
    Plan(Box<PlanArgs>),
    /// Move a worker's sequences to other replicas, then release it (it exits).
    Drain(DrainArgs),
    /// Reshape the cluster while it serves: the replicas' layout (e.g. two TP-2 replicas into
    /// one TP-4) and how many; the new replicas load beside the old ones, which then retire.
    Scale(ScaleArgs),
    /// Print each API key's requests and tokens since the coordinator started.
    Usage(AdminArgs),
}

#[derive(Debug, clap::Args)]
struct PlanArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Plan here instead, without a cluster: this checkpoint directory's config.json (no
    /// weight is read) on `--workers` workers offering `--memory-gb` each.
    #[arg(long)]
    model: Option<PathBuf>,
    /// With `--model`: the workers (e.g. GPUs).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// With `--model`: the memory each worker offers for weights and KV cache, in GB (a GPU's
    /// memory less what CUDA and NCCL keep; 0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    memory_gb: f64,
    #[command(flatten)]
    layout: cluster::layout::Layout,
    #[command(flatten)]
    sizing: coordinator::planner::Sizing,
}

#[derive(Debug, clap::Args)]
struct ScaleArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Tensor-parallel ranks of a replica (unset: as now).
    #[arg(long)]
    tp: Option<u32>,
    /// Expert-parallel ranks of a replica (unset: as now).
    #[arg(long)]
    ep: Option<u32>,
    /// Pipeline stages of a replica (unset: as now).
    #[arg(long)]
    pp: Option<u32>,
    /// At most this many replicas (the other workers stay idle); 0 or unset: as many as the
    /// workers hold.
    #[arg(long, default_value_t = 0)]
    replicas: u32,
    /// Wait until every replica serves in the new layout.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, clap::Args)]
struct AdminArgs {
    #[arg(long, env = "TRAMONTANE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    #[command(flatten)]
    key: KeyArg,
}

/// How calls reach a coordinator that requires API keys or serves over TLS.
#[derive(Debug, Clone, clap::Args)]
struct KeyArg {
    #[arg(long = "api-key", env = "TRAMONTANE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Connect over TLS, trusting this CA certificate (PEM).
    #[arg(long, env = "TRAMONTANE_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

/// Adds `authorization: Bearer KEY` to every call.
#[derive(Clone)]
struct WithKey(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for WithKey {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Channel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, WithKey>;

/// A channel to the coordinator at `addr` whose calls carry `key` (over TLS with a CA).
async fn channel(addr: &str, key: &KeyArg) -> anyhow::Result<Channel> {
    let value = key.api_key.as_ref().map(|k| format!("Bearer {k}").parse()).transpose().context("--api-key: not a header value")?;
    let channel = endpoint(addr, key.tls_ca.as_deref())?.connect().await.with_context(|| format!("connecting to {addr}"))?;
    Ok(tonic::service::interceptor::InterceptedService::new(channel, WithKey(value)))
}

/// The coordinator's gRPC endpoint, over TLS when a CA is given.
fn endpoint(addr: &str, ca: Option<&std::path::Path>) -> anyhow::Result<tonic::transport::Endpoint> {
    let Some(ca) = ca else { return Ok(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?) };
    let pem = std::fs::read(ca).with_context(|| format!("--tls-ca {}", ca.display()))?;
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
    Ok(tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?)
}

#[derive(Debug, clap::Args)]
struct DrainArgs {
    /// The worker's id (see `tramctl status`).
    worker_id: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Checkpoint directory; without it, the small model shipped in the repository.
    #[arg(long, env = "TRAMONTANE_MODEL")]
    model: Option<PathBuf>,
    /// Worker processes; every tp x ep x pp of them form one replica.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Tensor-, expert- and pipeline-parallel degrees within a replica (linked over TCP).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[arg(long, default_value_t = 1)]
    ep: usize,
    #[arg(long, default_value_t = 1)]
    pp: usize,
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_addr: String,
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    #[arg(long, default_value = "safetensors")]
    load_format: String,
    /// The dtype workers keep dense weights in: auto (as the checkpoint stores them), f32,
    /// f16 or bf16.
    #[arg(long, env = "TRAMONTANE_DTYPE", default_value = "auto")]
    dtype: String,
    /// 8-bit weights: auto (FP8 checkpoints stay FP8), none, int8 or fp8 (quantized at load).
    #[arg(long, env = "TRAMONTANE_QUANTIZATION", default_value = "auto")]
    quantization: String,
    /// KV cache blocks per worker.
    #[arg(long, default_value_t = 1024)]
    kv_blocks: usize,
    /// Run the cluster through this etcd (endpoints, comma-separated) instead of in-process
    /// membership: workers register there and the coordinator finds them.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The cluster's name on etcd.
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Where the workers run: cpu, or cuda[:N] (worker i on GPU N + i; the worker must be
    /// built with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: cluster::Device,
    /// Leave a worker that dies dead instead of starting it again.
    #[arg(long)]
    no_restart: bool,
    /// API keys the coordinator requires (`NAME KEY [rpm=N] [tpm=N] [admin]` per line; read
    /// again on SIGHUP to the coordinator).
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Serve the client APIs over TLS with this certificate chain and key (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA tramctl trusts when it checks the coordinator's health over TLS (default: the
    /// certificate itself, for a self-signed one).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The cluster's certificates, given to every process: mutual TLS between the coordinator,
    /// the workers, their links and etcd (whose endpoints are then `https://`).
    #[command(flatten)]
    cluster_tls: cluster::tls::ClusterTlsArgs,
    /// TLS everywhere with a throwaway CA made now: the cluster's links (mutual TLS) and, but
    /// for `--tls-cert`, the client APIs, with a certificate for localhost and 127.0.0.1. The
    /// CA's path is printed for clients to trust; it is deleted when tramctl stops.
    #[arg(long, conflicts_with = "cluster_ca")]
    tls: bool,
    /// More coordinator flags, after `--` (e.g. `-- --no-prefix-caching --max-num-seqs 32`).
    #[arg(last = true)]
    coordinator_args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct GenerateArgs {
    prompt: String,
    #[arg(long, env = "TRAMONTANE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    #[command(flatten)]
    key: KeyArg,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    #[arg(long, env = "TRAMONTANE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    #[command(flatten)]
    key: KeyArg,
    /// Print JSON instead of text (with each Mixtral replica's expert load).
    #[arg(long)]
    json: bool,
    /// Also print each Mixtral replica's expert load: the tokens each expert of each layer
    /// ran, each expert-parallel rank's share, and the imbalance.
    #[arg(long)]
    experts: bool,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Up(a) => up(*a),
        Cmd::Generate(a) => tokio::runtime::Runtime::new()?.block_on(generate(a)),
        Cmd::Status(a) => tokio::runtime::Runtime::new()?.block_on(status(a)),
        Cmd::Plan(a) if a.model.is_some() => plan_offline(&a),
        Cmd::Plan(a) => tokio::runtime::Runtime::new()?.block_on(plan(a.admin)),
        Cmd::Drain(a) => tokio::runtime::Runtime::new()?.block_on(drain(a)),
        Cmd::Scale(a) => tokio::runtime::Runtime::new()?.block_on(scale(a)),
        Cmd::Usage(a) => tokio::runtime::Runtime::new()?.block_on(usage(a)),
    }
}

async fn admin(a: &AdminArgs) -> anyhow::Result<pb::admin_client::AdminClient<Channel>> {
    Ok(pb::admin_client::AdminClient::new(channel(&a.grpc_addr, &a.key).await?))
}

async fn usage(a: AdminArgs) -> anyhow::Result<()> {
    let usage = admin(&a).await?.usage(pb::UsageRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    println!("{:<24} {:>10} {:>14} {:>14} {:>18}", "KEY", "REQUESTS", "PROMPT TOKENS", "CACHED TOKENS", "COMPLETION TOKENS");
    for k in &usage.keys {
        println!("{:<24} {:>10} {:>14} {:>14} {:>18}", k.key, k.requests, k.prompt_tokens, k.cached_tokens, k.completion_tokens);
    }
    Ok(())
}

async fn plan(a: AdminArgs) -> anyhow::Result<()> {
    let plan = admin(&a).await?.plan(pb::PlanRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    print_plan(plan.replicas.iter().map(|r| (r.layout.clone(), r.workers.iter().map(|w| (w.clone(), r.weight_bytes, r.kv_cache_bytes)).collect())));
    Ok(())
}

/// Each replica's layout and ranks (worker, weight bytes, KV cache bytes) as a table.
fn print_plan(replicas: impl Iterator<Item = (String, Vec<(String, u64, u64)>)>) {
    let gb = |b: u64| b as f64 / 1e9;
    println!("{:<8} {:<16} {:<6} {:<24} {:>12} {:>12} {:>12}", "REPLICA", "LAYOUT", "RANK", "WORKER", "WEIGHTS GB", "KV GB", "TOTAL GB");
    for (i, (layout, ranks)) in replicas.enumerate() {
        for (rank, (w, wb, kv)) in ranks.into_iter().enumerate() {
            println!("{i:<8} {layout:<16} {rank:<6} {w:<24} {:>12.3} {:>12.3} {:>12.3}", gb(wb), gb(kv), gb(wb + kv));
        }
    }
}

/// `tramctl plan --model`: the placement the planner would make on such workers, with what
/// each rank holds, or why nothing fits.
fn plan_offline(a: &PlanArgs) -> anyhow::Result<()> {
    use coordinator::planner;
    let dir = a.model.as_ref().expect("--model given");
    let config = cluster::ModelConfig::from_file(&dir.join("config.json"))?;
    let memory_bytes = (a.memory_gb * 1e9) as u64;
    let cards: Vec<_> = (0..a.workers)
        .map(|i| cluster::membership::WorkerCard { id: format!("worker-{i}"), memory_bytes, ..cluster::membership::WorkerCard::default() })
        .collect();
    let replicas = planner::plan(&config, &a.layout, &a.sizing, &cards, &[]).map_err(anyhow::Error::msg)?;
    print_plan(replicas.iter().map(|r| {
        let ranks = r.workers.iter().enumerate().map(|(rank, w)| {
            let (weights, kv) = planner::rank_need(&config, &r.layout, rank, &a.sizing);
            (w.clone(), weights, kv)
        });
        (format!("tp {} ep {} pp {}", r.layout.tp, r.layout.ep, r.layout.pp), ranks.collect())
    }));
    Ok(())
}

async fn drain(a: DrainArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let request = pb::DrainRequest { worker_id: a.worker_id.clone() };
    admin(&a.admin).await?.drain(request).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("drained {}: its sequences moved and it was released in {:.2} s", a.worker_id, started.elapsed().as_secs_f64());
    Ok(())
}

async fn scale(a: ScaleArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let request = pb::ScaleRequest { tp: a.tp.unwrap_or(0), ep: a.ep.unwrap_or(0), pp: a.pp.unwrap_or(0), replicas: a.replicas };
    let mut admin = admin(&a.admin).await?;
    let scaled = admin.scale(request).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    println!("placement epoch {}: the new replicas load beside the old ones, which retire once they serve", scaled.epoch);
    print_plan(scaled.replicas.iter().map(|r| (r.layout.clone(), r.workers.iter().map(|w| (w.clone(), r.weight_bytes, r.kv_cache_bytes)).collect())));
    if a.wait {
        let want: Vec<&str> = scaled.replicas.iter().map(|r| r.layout.as_str()).collect();
        loop {
            let status = admin.cluster_status(pb::ClusterStatusRequest {}).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
            let mut serving: Vec<u32> = status.workers.iter().filter(|w| w.state == "serving").map(|w| w.replica).collect();
            serving.sort_unstable();
            serving.dedup();
            if status.layout.split(", ").all(|l| want.contains(&l)) && status.epoch >= scaled.epoch && serving.len() == want.len() {
                println!("reshaped in {:.2} s: {}", started.elapsed().as_secs_f64(), status.layout);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Children stopped (and reaped) when dropped.
struct Children(Vec<(String, Child)>);

impl Children {
    /// The process id of the child named `name` (0 if none runs).
    fn pid(&self, name: &str) -> u32 {
        self.0.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| c.id())
    }
}

/// Stops the cluster the way it drains: the coordinator first (SIGTERM: it refuses new
/// requests and finishes those in flight within its shutdown timeout, 30 s by default), then
/// the workers; whatever has not exited within its grace is killed.
impl Drop for Children {
    fn drop(&mut self) {
        let (coordinator, workers): (Vec<_>, Vec<_>) = self.0.iter_mut().partition(|(name, _)| name == "coordinator");
        for group in [coordinator, workers] {
            let grace = std::time::Duration::from_secs(if group.iter().any(|(n, _)| n == "coordinator") { 35 } else { 5 });
            for (_, c) in &group {
                let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            }
            let deadline = std::time::Instant::now() + grace;
            for (_, c) in group {
                while matches!(c.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Memory `tramctl up` leaves to the coordinator when it splits the host's among the workers.
const COORDINATOR_MARGIN: u64 = 512 << 20;

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(path.exists(), "{} not found next to tramctl (build it: cargo build -p worker -p coordinator)", path.display());
    Ok(path)
}

/// Spawns a server process and returns the lines it printed before serving.
fn spawn(children: &mut Children, name: &str, cmd: &mut Command, lines: usize) -> anyhow::Result<Vec<String>> {
    // A process group of its own: Ctrl-C in the terminal reaches tramctl alone, which then
    // stops the children in order (the coordinator drains before the workers go).
    use std::os::unix::process::CommandExt;
    let mut child = cmd.process_group(0).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().with_context(|| format!("starting {name}"))?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    children.0.push((name.to_owned(), child));
    let mut got = Vec::new();
    for _ in 0..lines {
        let mut line = String::new();
        anyhow::ensure!(out.read_line(&mut line)? > 0, "{name} exited before serving (its error is above)");
        got.push(line.trim().to_owned());
    }
    Ok(got)
}

fn up(a: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.workers >= 1, "`--workers` must be >= 1");
    let world = a.tp * a.ep * a.pp;
    anyhow::ensure!(world >= 1 && a.workers.is_multiple_of(world), "`--workers` {} must be a multiple of tp x ep x pp = {world}", a.workers);
    let model = a.model.clone().unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mistral-v1-tiny")));
    // With --tls: the throwaway CA's directory, kept as long as the cluster runs.
    let (_ca_dir, cluster_tls, client_tls) = throwaway_ca(&a)?;
    let mut children = Children(Vec::new());
    let mut addrs = Vec::new();
    let etcd = a.etcd.join(",");
    let membership: Vec<&str> = if a.etcd.is_empty() { Vec::new() } else { vec!["--etcd", &etcd, "--cluster", &a.cluster] };
    // Workers on this machine's CPU share its memory: each offers its part, so that the
    // planner does not count the same memory once per worker. (GPU workers measure their own
    // GPU; TRAMONTANE_MEMORY_BYTES, when set, reaches every worker as it is.)
    let share = match a.device {
        cluster::Device::Cpu if std::env::var_os("TRAMONTANE_MEMORY_BYTES").is_none() => {
            let host = cluster::process::host_memory();
            let share = host.saturating_sub(COORDINATOR_MARGIN) / a.workers as u64;
            eprintln!(
                "tramctl: each worker offers {:.2} GB ({:.2} GB available, less {} MiB for the coordinator, over {} worker(s))",
                share as f64 / 1e9,
                host as f64 / 1e9,
                COORDINATOR_MARGIN >> 20,
                a.workers
            );
            (host > 0).then_some(share)
        }
        _ => None,
    };
    let mut workers: Vec<Supervised> = Vec::new();
    for i in 0..a.workers {
        let device = match a.device {
            cluster::Device::Cpu => cluster::Device::Cpu,
            cluster::Device::Cuda(first) => cluster::Device::Cuda(first + i),
        };
        let mut args: Vec<String> = vec!["serve".into(), "--device".into(), device.to_string()];
        args.extend(membership.iter().map(|s| s.to_string()));
        args.extend(cluster_tls.to_args());
        if let Some(bytes) = share {
            args.extend(["--memory-bytes".into(), bytes.to_string()]);
        }
        let mut w = Supervised { name: format!("worker-{i}"), args, listen: "127.0.0.1:0".into(), restarts: 0, due: None };
        let addr = w.start(&mut children)?;
        println!("worker {i} pid {} listening on {addr}", children.pid(&w.name));
        eprintln!("tramctl: {} (pid {}) on {addr}", w.name, children.pid(&w.name));
        // Without etcd the coordinator knows each worker by its address, so a restarted worker
        // listens there again; with etcd it registers anew wherever it listens.
        if a.etcd.is_empty() {
            w.listen = addr.clone();
        }
        addrs.push(addr);
        workers.push(w);
    }
    eprintln!("tramctl: loading {} on {} worker(s)...", model.display(), a.workers);
    let mut coordinator = Command::new(sibling("coordinator")?);
    coordinator
        .args(["--model", &model.display().to_string()])
        .args(if a.etcd.is_empty() { vec!["--worker".to_owned(), addrs.join(",")] } else { Vec::new() })
        .args(&membership)
        .args(["--grpc-addr", &a.grpc_addr, "--http-addr", &a.http_addr])
        .args(["--load-format", &a.load_format, "--dtype", &a.dtype, "--quantization", &a.quantization])
        .args(["--kv-blocks", &a.kv_blocks.to_string()])
        .args(["--tp", &a.tp.to_string(), "--ep", &a.ep.to_string(), "--pp", &a.pp.to_string()])
        .args(a.api_keys.iter().flat_map(|k| ["--api-keys".to_owned(), k.display().to_string()]))
        .args(client_tls.0.iter().flat_map(|c| ["--tls-cert".to_owned(), c.display().to_string()]))
        .args(client_tls.1.iter().flat_map(|k| ["--tls-key".to_owned(), k.display().to_string()]))
        .args(cluster_tls.to_args())
        .args(&a.coordinator_args);
    let lines = spawn(&mut children, "coordinator", &mut coordinator, 2)?;
    // Same first lines as the coordinator's, so scripts can find the APIs: bound, and ready
    // once `/health` (or gRPC health) says so.
    println!("{}\n{}", lines[0], lines[1]);
    std::io::stdout().flush()?;
    let grpc = lines[0].trim_start_matches("listening on ").to_owned();
    eprintln!("tramctl: cluster up: gRPC {grpc}, HTTP {} (Ctrl-C stops it)", lines[1].trim_start_matches("http listening on "));
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let shutdown = cluster::process::shutdown_on_signal();
        let started = std::time::Instant::now();
        let (mut ready, mut next_note) = (false, std::time::Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => supervise(&mut children, &mut workers, a.no_restart)?,
            }
            if ready {
                continue;
            }
            if serving(&grpc, client_tls.2.as_deref()).await {
                ready = true;
                eprintln!("tramctl: serving ({} s after the start)", started.elapsed().as_secs());
            } else if started.elapsed() >= next_note {
                eprintln!("tramctl: waiting for the model to load on the workers ({} s)", started.elapsed().as_secs());
                next_note += std::time::Duration::from_secs(10);
            }
        }
    })
}

/// The client APIs' certificate, key and the CA that checks them.
type ClientTls = (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>);

/// The cluster's certificates and the client APIs' TLS of `tramctl up`: as given, or with
/// `--tls` from a CA made now in a temporary directory (returned: it lives as long as the
/// cluster).
fn throwaway_ca(a: &UpArgs) -> anyhow::Result<(Option<tempfile::TempDir>, cluster::tls::ClusterTlsArgs, ClientTls)> {
    let given: ClientTls = (a.tls_cert.clone(), a.tls_key.clone(), a.tls_ca.clone().or_else(|| a.tls_cert.clone()));
    if !a.tls {
        return Ok((None, a.cluster_tls.clone(), given));
    }
    let dir = tempfile::Builder::new().prefix("tramontane-ca-").tempdir()?;
    let ca = cluster::tls::Authority::new("Tramontane throwaway cluster CA")?;
    let mut hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    for addr in [&a.grpc_addr, &a.http_addr] {
        if let Some((host, _)) = addr.rsplit_once(':') {
            let host = host.trim_matches(['[', ']']).to_owned();
            if !hosts.contains(&host) && host != "0.0.0.0" && host != "::" {
                hosts.push(host);
            }
        }
    }
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let cluster_tls = ca.write(dir.path(), "cluster", &hosts)?;
    let client = match given.0 {
        Some(_) => given,
        None => (cluster_tls.cluster_cert.clone(), cluster_tls.cluster_key.clone(), cluster_tls.cluster_ca.clone()),
    };
    let ca_path = dir.path().join("ca.pem");
    eprintln!(
        "tramctl: TLS everywhere with a throwaway CA: {} (clients trust it: `tramctl --tls-ca`, SSL_CERT_FILE, grpc's root certificates)",
        ca_path.display()
    );
    println!("cluster CA {}", ca_path.display());
    Ok((Some(dir), cluster_tls, client))
}

/// Whether the coordinator at `grpc` reports SERVING on the standard gRPC health service
/// (over TLS, trusting `ca`, when given).
async fn serving(grpc: &str, ca: Option<&std::path::Path>) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    let check = async {
        let channel = endpoint(grpc, ca).ok()?.connect().await.ok()?;
        let mut c = HealthClient::new(channel);
        c.check(HealthCheckRequest { service: String::new() }).await.ok().map(|r| r.into_inner().status)
    };
    matches!(tokio::time::timeout(std::time::Duration::from_secs(2), check).await, Ok(Some(s)) if s == ServingStatus::Serving as i32)
}

/// A worker `tramctl up` runs, and how to start it again.
struct Supervised {
    name: String,
    /// `worker` arguments but `--listen`.
    args: Vec<String>,
    listen: String,
    restarts: u32,
    /// When it starts again, while it is dead.
    due: Option<std::time::Instant>,
}

impl Supervised {
    /// Starts the worker process; the address it listens on.
    fn start(&self, children: &mut Children) -> anyhow::Result<String> {
        let mut cmd = Command::new(sibling("worker")?);
        cmd.args(&self.args).args(["--listen", &self.listen]).env("TRAMONTANE_RESTARTS", self.restarts.to_string());
        let lines = spawn(children, &self.name, &mut cmd, 1)?;
        Ok(lines[0].strip_prefix("listening on ").context("the worker did not print its address")?.to_owned())
    }

    /// The wait before restart number `restarts + 1`: 1 s, doubling, at most 30 s.
    fn backoff(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1 << self.restarts.min(5)).min(std::time::Duration::from_secs(30))
    }
}

/// One round of supervision: notes the processes that exited, restarts the workers whose
/// backoff has passed; an error when the coordinator exited (the cluster stops).
fn supervise(children: &mut Children, workers: &mut Vec<Supervised>, no_restart: bool) -> anyhow::Result<()> {
    let mut exited = Vec::new();
    for (i, (name, c)) in children.0.iter_mut().enumerate() {
        if let Some(status) = c.try_wait()? {
            exited.push((i, name.clone(), status));
        }
    }
    for (i, name, status) in exited.into_iter().rev() {
        children.0.remove(i);
        let Some(at) = workers.iter().position(|w| w.name == name) else {
            anyhow::bail!("{name} exited ({status}); stopping the cluster");
        };
        if status.success() {
            // A drained worker leaves the cluster on its own; the rest serves on.
            eprintln!("tramctl: {name} left the cluster (drained)");
            workers.remove(at);
        } else if no_restart {
            eprintln!("tramctl: {name} exited ({status}); not restarting it (--no-restart)");
            workers.remove(at);
        } else {
            let w = &mut workers[at];
            let wait = w.backoff();
            eprintln!("tramctl: {name} exited ({status}); restarting it in {wait:?} (restart {})", w.restarts + 1);
            w.due = Some(std::time::Instant::now() + wait);
        }
    }
    for w in workers.iter_mut() {
        if w.due.is_some_and(|due| due <= std::time::Instant::now()) {
            w.restarts += 1;
            match w.start(children) {
                Ok(addr) => {
                    w.due = None;
                    eprintln!("tramctl: {} restarted (pid {}) on {addr}, restart {}", w.name, children.pid(&w.name), w.restarts);
                }
                Err(e) => {
                    let wait = w.backoff();
                    eprintln!("tramctl: restarting {} failed: {e:#}; trying again in {wait:?}", w.name);
                    w.due = Some(std::time::Instant::now() + wait);
                }
            }
        }
    }
    Ok(())
}

async fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let mut c = pb::inference_client::InferenceClient::new(channel(&a.grpc_addr, &a.key).await?);
    let req = pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(pb::generate_request::Prompt::Text(a.prompt)),
        sampling: Some(pb::SamplingParams { max_tokens: Some(a.max_tokens), temperature: a.temperature, ..Default::default() }),
        cache_salt: None,
        constraint: None,
    };
    let mut stream = c.generate(req).await.map_err(|s| anyhow::anyhow!("{}", s.message()))?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(msg) = stream.message().await.map_err(|s| anyhow::anyhow!("{}", s.message()))? {
        write!(out, "{}", msg.text)?;
        out.flush()?;
    }
    writeln!(out)?;
    Ok(())
}

/// A prefix cache's hit rate in tokens, or `-` before any lookup.
fn hit_rate(hits: u64, queries: u64) -> String {
    if queries == 0 { "-".into() } else { format!("{:.1}%", 100.0 * hits as f64 / queries as f64) }
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let channel = channel(&a.grpc_addr, &a.key).await?;
    let info = pb::inference_client::InferenceClient::new(channel.clone())
        .model_info(pb::ModelInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let cluster = pb::admin_client::AdminClient::new(channel)
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if a.json {
        let workers: Vec<_> = cluster
            .workers
            .iter()
            .map(|w| serde_json::json!({
                "id": w.id, "address": w.address, "pid": w.pid, "restarts": w.restarts, "memory_bytes": w.memory_bytes, "state": w.state, "replica": w.replica, "ranks": w.ranks,
                "running": w.running, "waiting": w.waiting, "kv_blocks_used": w.kv_blocks_used, "kv_blocks_total": w.kv_blocks_total,
                "prefix_cache_queries": w.prefix_cache_queries, "prefix_cache_hits": w.prefix_cache_hits,
            }))
            .collect();
        let v = serde_json::json!({
            "model": info.model, "architecture": info.architecture, "epoch": cluster.epoch, "layout": cluster.layout, "leader": cluster.leader,
            "no_capacity": cluster.no_capacity,
            "max_context": info.max_context, "running": info.running, "waiting": info.waiting,
            "kv_blocks_used": info.kv_blocks_used, "kv_blocks_total": info.kv_blocks_total, "workers": workers,
            "experts": cluster.experts.iter().map(|r| serde_json::json!({
                "replica": r.replica, "ep": r.ep, "copies": r.copies, "imbalance": r.imbalance,
                "layers": r.layers.iter().map(|l| serde_json::json!({"layer": l.layer, "tokens": l.tokens, "ranks": l.ranks})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        let role = if cluster.leader { "leader" } else { "standby" };
        println!("model    {} ({}), epoch {}, layouts: {} ({role})", info.model, info.architecture, cluster.epoch, cluster.layout);
        println!("load     {} running, {} waiting, KV cache {} / {} blocks", info.running, info.waiting, info.kv_blocks_used, info.kv_blocks_total);
        if !cluster.no_capacity.is_empty() {
            println!("placing  {}", cluster.no_capacity);
        }
        println!(
            "{:<16} {:<22} {:>8} {:>8} {:>10} {:<11} {:>7}  {:<22} {:>7} {:>7} {:>13} {:>12}",
            "WORKER", "ADDRESS", "PID", "RESTARTS", "MEMORY GB", "STATE", "REPLICA", "RANKS", "RUNNING", "WAITING", "KV BLOCKS", "PREFIX HITS"
        );
        for w in &cluster.workers {
            println!(
                "{:<16} {:<22} {:>8} {:>8} {:>10.2} {:<11} {:>7}  {:<22} {:>7} {:>7} {:>13} {:>12}",
                w.id,
                w.address,
                w.pid,
                w.restarts,
                w.memory_bytes as f64 / 1e9,
                w.state,
                w.replica,
                w.ranks,
                w.running,
                w.waiting,
                format!("{}/{}", w.kv_blocks_used, w.kv_blocks_total),
                hit_rate(w.prefix_cache_hits, w.prefix_cache_queries)
            );
        }
        if a.experts {
            print_experts(&cluster.experts);
        }
    }
    Ok(())
}

/// Each replica's tokens per expert (a row per layer), each expert-parallel rank's share of
/// them, and the imbalance.
fn print_experts(replicas: &[pb::ReplicaExperts]) {
    if replicas.is_empty() {
        println!("experts  none (not a Mixtral model, or no replica serves)");
    }
    for r in replicas {
        let experts = r.layers.first().map_or(0, |l| l.tokens.len());
        let ep = (r.ep as usize).max(1);
        let imbalance = if r.imbalance > 0.0 { format!("{:.3}", r.imbalance) } else { "- (no tokens yet)".into() };
        println!(
            "\nreplica {} experts (ep {}, {} redundant copies): imbalance {imbalance} (busiest rank over the mean; 1 is balanced)",
            r.replica, r.ep, r.copies
        );
        let mut head = format!("{:>5}", "LAYER");
        for e in 0..experts {
            head.push_str(&format!(" {:>9}", format!("E{e}")));
        }
        if ep > 1 {
            for rank in 0..ep {
                head.push_str(&format!(" {:>9}", format!("RANK {rank}")));
            }
        }
        println!("{head}");
        for l in &r.layers {
            let mut row = format!("{:>5}", l.layer);
            for t in &l.tokens {
                row.push_str(&format!(" {t:>9}"));
            }
            if ep > 1 {
                for n in &l.ranks {
                    row.push_str(&format!(" {n:>9}"));
                }
            }
            println!("{row}");
        }
    }
}
