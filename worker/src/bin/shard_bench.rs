//! Sharding benchmark: for each layout, starts fresh `worker serve` processes (siblings of
//! this binary), loads a dummy model sharded over them (TCP communicator, same machine), and
//! prints each rank's peak resident memory and weight bytes, and the time per decode step.
//! Each worker gets `cores / ranks` threads, so layouts share the machine fairly. With `--tls`
//! each layout runs again right after, with the cluster's mutual TLS (worker API and links;
//! a CA made here), and its row gives the ratio of its step time to plain text's.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use pb::worker_client::WorkerClient;
use proto::tramontane::worker::v1 as pb;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(about = "Per-rank memory and step time of sharded layouts over worker processes")]
struct Args {
    /// Layouts as TPxEPxPP.
    #[arg(long, value_delimiter = ',', default_value = "1x1x1,2x1x1,1x2x1,2x2x1,1x1x2")]
    layouts: Vec<String>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Timed decode steps per batch size (after one warm-up step).
    #[arg(long, default_value_t = 16)]
    steps: usize,
    /// A checkpoint directory's config.json to use instead of the mix-bench shape (dummy weights).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "f32")]
    dtype: worker::WeightDType,
    /// Also run each layout over mutual TLS.
    #[arg(long)]
    tls: bool,
}

/// The workers' cluster certificate files and the bench's own TLS (the same certificate).
type Tls = (cluster::tls::ClusterTlsArgs, cluster::tls::ClusterTls);

struct Worker {
    child: Child,
    client: WorkerClient<Channel>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_worker(threads: usize, tls: Option<&Tls>) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe()?.with_file_name("worker");
    let mut child = Command::new(&exe)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(tls.map(|(files, _)| files.to_args()).unwrap_or_default())
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {} (build it: cargo build --release -p worker)", exe.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").context("worker address")?.to_owned();
    let channel = match tls {
        Some((_, tls)) => Channel::from_shared(format!("https://{addr}"))?.tls_config(tls.grpc_client())?.connect().await?,
        None => Channel::from_shared(format!("http://{addr}"))?.connect().await?,
    };
    let client = WorkerClient::new(channel).max_decoding_message_size(256 << 20);
    Ok(Worker { child, client })
}

/// Runs `call` on every worker at once and returns the results by rank.
async fn on_all<T: Send + 'static, F>(workers: &[Worker], call: impl Fn(usize, WorkerClient<Channel>) -> F) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
{
    let tasks: Vec<_> = workers.iter().enumerate().map(|(r, w)| tokio::spawn(call(r, w.client.clone()))).collect();
    let mut out = Vec::new();
    for (r, t) in tasks.into_iter().enumerate() {
        out.push(t.await?.map_err(|s| anyhow::anyhow!("rank {r}: {}", s.message()))?);
    }
    Ok(out)
}

struct Row {
    layout: String,
    load_s: f64,
    peak_rss: Vec<u64>,
    weights: Vec<u64>,
    step_ms: Vec<(usize, f64)>,
}

async fn run_layout(args: &Args, model: &str, spec: &str, tls: Option<&Tls>) -> anyhow::Result<Row> {
    let dims: Vec<u32> = spec.split('x').map(str::parse).collect::<Result<_, _>>().with_context(|| format!("layout {spec:?}"))?;
    let [tp, ep, pp] = dims[..] else { anyhow::bail!("layout {spec:?} is not TPxEPxPP") };
    let world = (tp * ep * pp) as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut workers = Vec::new();
    for _ in 0..world {
        workers.push(start_worker((cores / world).max(1), tls).await?);
    }
    let peers: Vec<String> = on_all(&workers, |_, mut c| async move { c.health(pb::HealthRequest {}).await.map(|h| h.into_inner().comm_address) }).await?;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let started = Instant::now();
    let (dtype, model) = (pb::WeightDtype::from(args.dtype) as i32, model.to_owned());
    on_all(&workers, |rank, mut c| {
        let req = pb::LoadAssignmentRequest {
            epoch: 1,
            model_path: model.clone(),
            dtype,
            load_format: pb::LoadFormat::Dummy as i32,
            kv_blocks: (max_batch * 4) as u32,
            block_size: 16,
            tp,
            ep,
            pp,
            rank: rank as u32,
            peers: if world > 1 { peers.clone() } else { Vec::new() },
            ..Default::default()
        };
        async move { c.load_assignment(req).await.map(drop) }
    })
    .await?;
    let load_s = started.elapsed().as_secs_f64();
    let health = on_all(&workers, |_, mut c| async move { c.health(pb::HealthRequest {}).await.map(tonic::Response::into_inner) }).await?;
    let mut step_ms = Vec::new();
    for &batch in &args.batches {
        let greedy = Some(pb::Sampling { top_p: 1.0, ..Default::default() });
        let mut last: Vec<u32> = vec![0; batch];
        let prompt_len = 8;
        let mut elapsed = 0.0;
        for step in 0..=args.steps + 1 {
            let sequences: Vec<pb::SequenceStep> = (0..batch)
                .map(|i| {
                    let (tokens, start_pos) = if step == 0 {
                        ((0..prompt_len).map(|t| (100 + 13 * i + t) as u32).collect(), 0)
                    } else {
                        (vec![last[i]], (prompt_len + step - 1) as u32)
                    };
                    let table = (i as u32 * 4..i as u32 * 4 + 4).collect();
                    pb::SequenceStep { seq_id: i as u64, tokens, start_pos, block_table: table, sampling: greedy.clone(), ..Default::default() }
                })
                .collect();
            let t = Instant::now();
            let out = on_all(&workers, |_, mut c| {
                let req = pb::StepRequest { epoch: 1, sequences: sequences.clone(), released: vec![] };
                async move { c.step(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if step >= 2 {
                elapsed += t.elapsed().as_secs_f64();
            }
            let driver = world - (tp * ep) as usize;
            for (i, r) in out[driver].results.iter().enumerate() {
                last[i] = r.sampled.as_ref().map_or(0, |s| s.token_id);
            }
        }
        step_ms.push((batch, elapsed * 1e3 / args.steps as f64));
    }
    Ok(Row {
        layout: format!("tp {tp} ep {ep} pp {pp}{}", if tls.is_some() { ", mutual TLS" } else { "" }),
        load_s,
        peak_rss: health.iter().map(|h| h.peak_rss_bytes).collect(),
        weights: health.iter().map(|h| h.weight_bytes).collect(),
        step_ms,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("tramontane-shard-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = match &args.config {
        Some(p) => std::fs::read_to_string(p)?,
        None => worker::config::MIX_BENCH.to_owned(),
    };
    std::fs::write(dir.join("config.json"), config)?;
    let tls = if args.tls {
        let ca = cluster::tls::Authority::new("shard-bench CA")?;
        let files = ca.write(&dir, "bench", &[])?;
        let own = cluster::tls::ClusterTls::load(&files)?.context("every file written")?;
        Some((files, own))
    } else {
        None
    };
    let mut rows: Vec<(Row, Option<usize>)> = Vec::new();
    for spec in &args.layouts {
        eprintln!("layout {spec}...");
        let plain = rows.len();
        rows.push((run_layout(&args, &dir.display().to_string(), spec, None).await?, None));
        if let Some(tls) = &tls {
            eprintln!("layout {spec} over mutual TLS...");
            rows.push((run_layout(&args, &dir.display().to_string(), spec, Some(tls)).await?, Some(plain)));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!();
    println!("shard-bench: dummy {} weights, ranks are processes on one machine linked over TCP loopback", args.dtype);
    print!("| layout | load s | peak RSS per rank (GiB) | weights per rank (GiB) |");
    for (b, _) in &rows[0].0.step_ms {
        print!(" ms/step b={b} |");
    }
    println!();
    println!("|---|---|---|---|{}", "---|".repeat(rows[0].0.step_ms.len()));
    for (r, plain) in &rows {
        let rss: Vec<String> = r.peak_rss.iter().map(|&b| format!("{:.2}", gib(b))).collect();
        let w: Vec<String> = r.weights.iter().map(|&b| format!("{:.2}", gib(b))).collect();
        print!("| {} | {:.1} | {} | {} |", r.layout, r.load_s, rss.join(" / "), w.join(" / "));
        for (i, (_, ms)) in r.step_ms.iter().enumerate() {
            match plain {
                Some(p) => print!(" {ms:.1} ({:.2}× plain) |", ms / rows[*p].0.step_ms[i].1),
                None => print!(" {ms:.1} |"),
            }
        }
        println!();
    }
    Ok(())
}
