//! Sharding benchmark: for each layout, starts fresh `worker serve` processes (siblings of
//! this binary), loads a dummy model sharded over them (TCP communicator, same machine), and
//! prints each rank's peak resident memory and weight bytes, and the time per decode step.
//! Each worker gets `cores / ranks` threads, so layouts share the machine fairly. With `--tls`
//! each layout runs again right after, with the cluster's mutual TLS (worker API and links;
//! a CA made here), and its row gives the ratio of its step time to plain text's.
//! With `--skewed-router S` the model is a Mixtral checkpoint written here whose routers
//! favour experts 0 and 1 (`bench/skewed.rs`), and with `--redundant-experts N` each
//! expert-parallel layout also runs with N copies a layer placed from the load its ranks
//! reported (EPLB's rule, as the coordinator places them), applied in place; the two runs
//! alternate `--rounds` times (medians), and the table gives the measured imbalance and
//! whether every sampled token is the same with and without the copies.

#[path = "bench/skewed.rs"]
mod skewed;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use pb::worker_client::WorkerClient;
use proto::tramontane::worker::v1 as pb;
use tonic::transport::Channel;
use worker::ModelConfig;

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
    /// Write and run a Mixtral checkpoint (the mix-bench shape, or `--config`'s) whose routers
    /// favour experts 0 and 1 with this strength.
    #[arg(long)]
    skewed_router: Option<f32>,
    /// Expert-parallel layouts also run with this many copies of hot experts a layer, placed
    /// from the load the plain run observed.
    #[arg(long, default_value_t = 0)]
    redundant_experts: usize,
    /// With `--redundant-experts`: runs without and with the copies, alternated (medians).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
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
    /// Mixtral: the measured expert-parallel imbalance.
    imbalance: Option<f64>,
    /// With copies: whether every sampled token equals the run without.
    same_tokens: Option<bool>,
}

/// One decode run: ms per step by batch size, the tokens sampled, and the expert load the
/// ranks reported over the timed steps.
struct Decoded {
    step_ms: Vec<(usize, f64)>,
    tokens: Vec<Vec<u32>>,
    load: Option<cluster::experts::ExpertLoad>,
}

async fn run_layout(args: &Args, model: &str, config: Option<&ModelConfig>, spec: &str, tls: Option<&Tls>) -> anyhow::Result<Vec<Row>> {
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
    let load_format = if args.skewed_router.is_some() { pb::LoadFormat::Safetensors } else { pb::LoadFormat::Dummy };
    let assignment = pb::LoadAssignmentRequest {
        epoch: 1,
        model_path: model.to_owned(),
        dtype: pb::WeightDtype::from(args.dtype) as i32,
        load_format: load_format as i32,
        kv_blocks: (max_batch * 4) as u32,
        block_size: 16,
        tp,
        ep,
        pp,
        peers: if world > 1 { peers.clone() } else { Vec::new() },
        ..Default::default()
    };
    on_all(&workers, |rank, mut c| {
        let req = pb::LoadAssignmentRequest { rank: rank as u32, ..assignment.clone() };
        async move { c.load_assignment(req).await.map(drop) }
    })
    .await?;
    let load_s = started.elapsed().as_secs_f64();
    let health = on_all(&workers, |_, mut c| async move { c.health(pb::HealthRequest {}).await.map(tonic::Response::into_inner) }).await?;
    let layout = format!("tp {tp} ep {ep} pp {pp}{}", if tls.is_some() { ", mutual TLS" } else { "" });
    let row = |d: &Decoded, layout: String, same_tokens| Row {
        layout,
        load_s,
        peak_rss: health.iter().map(|h| h.peak_rss_bytes).collect(),
        weights: health.iter().map(|h| h.weight_bytes).collect(),
        step_ms: d.step_ms.clone(),
        imbalance: d.load.as_ref().and_then(|l| l.imbalance()),
        same_tokens,
    };
    let experts = config.map(|c| (c.num_hidden_layers, c.num_local_experts)).filter(|_| ep > 1 && args.redundant_experts > 0);
    let Some((layers, n)) = experts else {
        let plain = decode(args, &workers, 1, (tp, ep), config).await?;
        return Ok(vec![row(&plain, layout, None)]);
    };
    // Without copies, then with the copies placed from that run's load, alternated.
    let first = decode(args, &workers, 1, (tp, ep), config).await?;
    let copies = cluster::experts::place_copies(first.load.as_ref().context("the ranks report their experts' tokens")?, args.redundant_experts);
    let expert_copies: Vec<pb::ExpertCopy> =
        copies.iter().map(|&(layer, expert, rank)| pb::ExpertCopy { layer: layer as u32, expert: expert as u32, ep_rank: rank as u32 }).collect();
    let (mut without, mut with) = (vec![first], Vec::new());
    let mut epoch = 1;
    for round in 0..args.rounds {
        for copies in [&expert_copies, &Vec::new()] {
            if round + 1 == args.rounds && copies.is_empty() {
                break;
            }
            epoch += 1;
            on_all(&workers, |rank, mut c| {
                let req = pb::LoadAssignmentRequest { epoch, rank: rank as u32, expert_copies: copies.clone(), ..assignment.clone() };
                async move { c.load_assignment(req).await.map(drop) }
            })
            .await?;
            let run = decode(args, &workers, epoch, (tp, ep), config).await?;
            if copies.is_empty() { without.push(run) } else { with.push(run) }
        }
    }
    let median = |runs: &[Decoded]| -> Decoded {
        let step_ms = runs[0]
            .step_ms
            .iter()
            .enumerate()
            .map(|(i, (b, _))| {
                let mut ms: Vec<f64> = runs.iter().map(|r| r.step_ms[i].1).collect();
                ms.sort_by(f64::total_cmp);
                (*b, ms[ms.len() / 2])
            })
            .collect();
        let mut load = cluster::experts::ExpertLoad::new(layers, n, ep as usize);
        for r in runs.iter().filter_map(|r| r.load.as_ref()) {
            for (sum, run) in load.tokens.iter_mut().zip(&r.tokens).chain(load.ranks.iter_mut().zip(&r.ranks)) {
                sum.iter_mut().zip(run).for_each(|(s, t)| *s += t);
            }
        }
        Decoded { step_ms, tokens: runs[0].tokens.clone(), load: Some(load) }
    };
    let same = without.iter().chain(&with).all(|r| r.tokens == without[0].tokens);
    let (plain, copied) = (median(&without), median(&with));
    Ok(vec![
        row(&plain, format!("{layout}, {} run(s)", without.len()), None),
        row(&copied, format!("{layout}, {} redundant experts a layer, {} run(s)", args.redundant_experts, with.len()), Some(same)),
    ])
}

/// Prefill of 8 tokens a sequence, one warm-up step, then `--steps` timed greedy decode
/// steps at each batch size, at `epoch`.
async fn decode(args: &Args, workers: &[Worker], epoch: u64, (tp, ep): (u32, u32), config: Option<&ModelConfig>) -> anyhow::Result<Decoded> {
    let world = workers.len();
    let mut step_ms = Vec::new();
    let mut tokens = Vec::new();
    let mut load = config
        .filter(|c| c.architecture == cluster::Architecture::Mixtral)
        .map(|c| cluster::experts::ExpertLoad::new(c.num_hidden_layers, c.num_local_experts, ep as usize));
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
            let out = on_all(workers, |_, mut c| {
                let req = pb::StepRequest { epoch, sequences: sequences.clone(), released: vec![] };
                async move { c.step(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
            if step >= 2 {
                elapsed += t.elapsed().as_secs_f64();
                if let Some(load) = &mut load {
                    for e in out.iter().flat_map(|o| &o.expert_tokens) {
                        load.add(e.layer as usize, e.ep_rank as usize, &e.tokens).map_err(anyhow::Error::msg)?;
                    }
                }
            }
            let driver = world - (tp * ep) as usize;
            for (i, r) in out[driver].results.iter().enumerate() {
                last[i] = r.sampled.as_ref().map_or(0, |s| s.token_id);
            }
            tokens.push(last.clone());
        }
        step_ms.push((batch, elapsed * 1e3 / args.steps as f64));
    }
    Ok(Decoded { step_ms, tokens, load })
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
    match args.skewed_router {
        Some(strength) => {
            eprintln!("writing a checkpoint whose routers favour experts {:?}...", skewed::HOT);
            skewed::write(&dir, &config, strength)?;
        }
        None => std::fs::write(dir.join("config.json"), &config)?,
    }
    let config = ModelConfig::parse(&config, &dir).ok();
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
        rows.extend(run_layout(&args, &dir.display().to_string(), config.as_ref(), spec, None).await?.into_iter().map(|r| (r, None)));
        if let Some(tls) = &tls {
            eprintln!("layout {spec} over mutual TLS...");
            rows.extend(run_layout(&args, &dir.display().to_string(), config.as_ref(), spec, Some(tls)).await?.into_iter().map(|r| (r, Some(plain))));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!();
    let weights = match args.skewed_router {
        Some(s) => format!("a Mixtral checkpoint whose routers favour experts {:?} (strength {s}), kept in {}", skewed::HOT, args.dtype),
        None => format!("dummy {} weights", args.dtype),
    };
    println!("shard-bench: {weights}; ranks are processes on one machine linked over TCP loopback");
    let experts = rows.iter().any(|(r, _)| r.imbalance.is_some());
    print!("| layout | load s | peak RSS per rank (GiB) | weights per rank (GiB) |");
    if experts {
        print!(" EP imbalance | tokens as without copies |");
    }
    for (b, _) in &rows[0].0.step_ms {
        print!(" ms/step b={b} |");
    }
    println!();
    println!("|---|---|---|---|{}{}", if experts { "---|---|" } else { "" }, "---|".repeat(rows[0].0.step_ms.len()));
    for (i, (r, plain)) in rows.iter().enumerate() {
        let rss: Vec<String> = r.peak_rss.iter().map(|&b| format!("{:.2}", gib(b))).collect();
        let w: Vec<String> = r.weights.iter().map(|&b| format!("{:.2}", gib(b))).collect();
        print!("| {} | {:.1} | {} | {} |", r.layout, r.load_s, rss.join(" / "), w.join(" / "));
        if experts {
            let same = match r.same_tokens {
                Some(true) => "identical",
                Some(false) => "DIFFERENT",
                None => "",
            };
            print!(" {} | {same} |", r.imbalance.map_or(String::new(), |x| format!("{x:.3}")));
        }
        // A row with copies compares with the run without, just before it.
        let base = plain.or(r.same_tokens.map(|_| i - 1));
        for (k, (_, ms)) in r.step_ms.iter().enumerate() {
            match base {
                Some(p) => print!(" {ms:.1} ({:.2}×) |", ms / rows[p].0.step_ms[k].1),
                None => print!(" {ms:.1} |"),
            }
        }
        println!();
    }
    Ok(())
}
