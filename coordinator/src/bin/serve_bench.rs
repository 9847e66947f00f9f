//! Serving benchmark through the gRPC API, with two workloads.
//!
//! `independent` (default): for each concurrency level, that many streams each run
//! `--requests` greedy generations back to back. Prints TTFT and inter-token latency
//! percentiles, throughput, and the coordinator's own overhead per token (step wall time at
//! the coordinator minus the workers' compute time, from /metrics).
//!
//! `shared-prefix`: `--conversations` chats at once, each with a long context of its own
//! (`--prefix-len` tokens: a system prompt or a document) and `--turn-len`-token user turns.
//! Each conversation's first turn warms up (not measured); its second turn — the context,
//! the first turn and its answer, a new user turn — is measured: TTFT, tokens/s and the
//! prefix cache's hit rate (from /metrics). With `--launch`, the benchmark starts a cluster
//! (`tramctl up` with those arguments) for each of: no prefix cache, prefix cache with
//! least-loaded routing, prefix cache with cache-aware routing, and prints a row for each.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, Instant};

use clap::Parser;
use proto::tramontane::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Independent,
    SharedPrefix,
}

#[derive(Debug, Parser)]
#[command(about = "TTFT / inter-token latency / coordinator overhead / prefix caching against a cluster")]
struct Args {
    #[arg(long, value_enum, default_value_t = Workload::Independent)]
    workload: Workload,
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: String,
    /// The HTTP API (for /metrics).
    #[arg(long, default_value = "127.0.0.1:8000")]
    http_addr: String,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Generations per stream.
    #[arg(long, default_value_t = 4)]
    requests: usize,
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    #[arg(long, default_value_t = 16)]
    prompt_len: u32,
    /// shared-prefix: conversations at once, each with a context of its own.
    #[arg(long, default_value_t = 8)]
    conversations: usize,
    /// shared-prefix: tokens of each conversation's context.
    #[arg(long, default_value_t = 1000)]
    prefix_len: usize,
    /// shared-prefix: tokens of each user turn.
    #[arg(long, default_value_t = 32)]
    turn_len: usize,
    /// shared-prefix: start a cluster for each configuration with these `tramctl up`
    /// arguments (one string, e.g. "--model DIR --load-format dummy --workers 2") instead of
    /// measuring the one at --grpc-addr.
    #[arg(long, allow_hyphen_values = true)]
    launch: Option<String>,
}

/// The response (head and body) to `GET path` on the HTTP API at `http`.
async fn get(http: &str, path: &str) -> std::io::Result<String> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    s.read_to_string(&mut response).await?;
    Ok(response)
}

async fn scrape(http: &str) -> anyhow::Result<HashMap<String, f64>> {
    let body = get(http, "/metrics").await?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(v: f64) -> String {
    format!("{:.1} ms", v * 1e3)
}

/// What one greedy generation took: TTFT, the gaps between later tokens, its token ids.
struct Timed {
    ttft: Option<f64>,
    itl: Vec<f64>,
    ids: Vec<u32>,
}

async fn timed_generate(
    client: &mut pb::inference_client::InferenceClient<tonic::transport::Channel>,
    ids: Vec<u32>,
    max_tokens: u32,
) -> anyhow::Result<Timed> {
    let req = pb::GenerateRequest {
        request_id: String::new(),
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
        sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
        cache_salt: None,
        constraint: None,
    };
    let sent = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let (mut out, mut last) = (Timed { ttft: None, itl: Vec::new(), ids: Vec::new() }, None::<Instant>);
    while let Some(msg) = stream.message().await? {
        if msg.token_ids.is_empty() {
            continue;
        }
        let now = Instant::now();
        match last {
            None => out.ttft = Some((now - sent).as_secs_f64()),
            Some(prev) => out.itl.push((now - prev).as_secs_f64()),
        }
        last = Some(now);
        out.ids.extend(msg.token_ids);
    }
    Ok(out)
}

async fn independent(args: &Args) -> anyhow::Result<()> {
    let client = pb::inference_client::InferenceClient::connect(format!("http://{}", args.grpc_addr)).await?;
    println!("| streams | requests | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | coordinator overhead per token | worker compute per token |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        let before = scrape(&args.http_addr).await?;
        let started = Instant::now();
        let tasks: Vec<_> = (0..c)
            .map(|s| {
                let mut client = client.clone();
                let (requests, max_tokens, prompt_len) = (args.requests, args.max_tokens, args.prompt_len);
                tokio::spawn(async move {
                    let (mut ttft, mut itl, mut tokens) = (Vec::new(), Vec::new(), 0usize);
                    for r in 0..requests {
                        let ids = (0..prompt_len).map(|j| 100 + 97 * s as u32 + 13 * r as u32 + j).collect();
                        let t = timed_generate(&mut client, ids, max_tokens).await?;
                        ttft.extend(t.ttft);
                        itl.extend(t.itl);
                        tokens += t.ids.len();
                    }
                    Ok::<_, anyhow::Error>((ttft, itl, tokens))
                })
            })
            .collect();
        let (mut ttft, mut itl, mut tokens) = (Vec::new(), Vec::new(), 0);
        for t in tasks {
            let (a, b, n) = t.await??;
            ttft.extend(a);
            itl.extend(b);
            tokens += n;
        }
        let secs = started.elapsed().as_secs_f64();
        let after = scrape(&args.http_addr).await?;
        let delta = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let step_tokens = delta("tramontane:step_tokens_total").max(1.0);
        let overhead = (delta("tramontane:step_micros_total") - delta("tramontane:worker_compute_micros_total")) / step_tokens;
        let compute = delta("tramontane:worker_compute_micros_total") / step_tokens;
        println!(
            "| {c} | {} | {:.1} | {} | {} | {} | {} | {overhead:.0} µs | {compute:.0} µs |",
            c * args.requests,
            tokens as f64 / secs,
            ms(pct(&mut ttft, 0.5)),
            ms(pct(&mut ttft, 0.99)),
            ms(pct(&mut itl, 0.5)),
            ms(pct(&mut itl, 0.99)),
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Token ids in the vocabulary of every Mistral model, from a fixed sequence.
fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1000 + (x % 30_000) as u32
        })
        .collect()
}

/// The shared-prefix workload on the cluster at `grpc`/`http`; one table row (`baseline`: the
/// TTFT p50 the row compares with). Returns its TTFT p50.
async fn shared_prefix(args: &Args, grpc: &str, http: &str, label: &str, baseline: Option<f64>) -> anyhow::Result<f64> {
    let client = pb::inference_client::InferenceClient::connect(format!("http://{grpc}")).await?;
    let conversations: Vec<(Vec<u32>, Vec<u32>)> = (0..args.conversations as u64)
        .map(|c| {
            let mut first = tokens(c, args.prefix_len);
            first.extend(tokens(1000 + c, args.turn_len));
            (first, tokens(2000 + c, args.turn_len))
        })
        .collect();
    let turn = |prompts: Vec<Vec<u32>>| {
        let max_tokens = args.max_tokens;
        let tasks: Vec<_> = prompts
            .into_iter()
            .map(|p| {
                let mut client = client.clone();
                tokio::spawn(async move { timed_generate(&mut client, p, max_tokens).await })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await??);
            }
            Ok::<_, anyhow::Error>(out)
        }
    };
    let warm = turn(conversations.iter().map(|(first, _)| first.clone()).collect()).await?;
    let before = scrape(http).await?;
    let started = Instant::now();
    let second = conversations.iter().zip(&warm).map(|((first, user), answer)| first.iter().chain(&answer.ids).chain(user).copied().collect()).collect();
    let measured = turn(second).await?;
    let secs = started.elapsed().as_secs_f64();
    let after = scrape(http).await?;
    let delta = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    let hit_rate = delta("tramontane:prefix_cache_hits_total") / delta("tramontane:prefix_cache_queries_total").max(1.0);
    let mut ttft: Vec<f64> = measured.iter().filter_map(|t| t.ttft).collect();
    let tokens: usize = measured.iter().map(|t| t.ids.len()).sum();
    let p50 = pct(&mut ttft, 0.5);
    println!(
        "| {label} | {} | {:.1} | {} | {} | {} | {:.1} % |",
        measured.len(),
        tokens as f64 / secs,
        ms(p50),
        ms(pct(&mut ttft, 0.99)),
        baseline.map_or("-".into(), |b| format!("{:.1}×", b / p50)),
        100.0 * hit_rate
    );
    Ok(p50)
}

/// A cluster `tramctl up` runs; stopped (SIGTERM: the coordinator drains, then the workers
/// stop) when dropped.
struct Launched {
    child: std::process::Child,
    grpc: String,
    http: String,
}

impl Launched {
    fn start(up_args: &str, coordinator_args: &[&str]) -> anyhow::Result<Self> {
        let tramctl = std::env::current_exe()?.with_file_name("tramctl");
        let mut child = std::process::Command::new(&tramctl)
            .args(["up", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(up_args.split_whitespace())
            .arg("--")
            .args(coordinator_args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", tramctl.display()))?;
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("piped")).lines();
        // The coordinator's two lines (after the workers'): its gRPC and HTTP addresses.
        let mut next = |prefix: &str| {
            lines.find_map(|l| l.ok()?.strip_prefix(prefix).map(str::to_owned)).ok_or_else(|| anyhow::anyhow!("tramctl up exited before serving"))
        };
        let (grpc, http) = (next("listening on ")?, next("http listening on ")?);
        // Keep reading: tramctl stops when its output goes nowhere.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Launched { child, grpc, http })
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if get(&self.http, "/health").await.is_ok_and(|head| head.starts_with("HTTP/1.1 200")) {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "the cluster was not ready within 10 minutes");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.workload == Workload::Independent {
        return independent(&args).await;
    }
    println!(
        "{} conversations at once, each a {}-token context of its own then {}-token user turns, {} tokens an answer; the second turn measured (the first warms up)",
        args.conversations, args.prefix_len, args.turn_len, args.max_tokens
    );
    println!("| configuration | requests | tokens/s | TTFT p50 | TTFT p99 | TTFT p50 lower than without cache | prefix cache hit rate |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let Some(up) = &args.launch else {
        return shared_prefix(&args, &args.grpc_addr, &args.http_addr, "running cluster", None).await.map(drop);
    };
    let configurations: [(&str, &[&str]); 3] = [
        ("no prefix cache", &["--no-prefix-caching", "--routing", "least-loaded"]),
        ("prefix cache, least-loaded routing", &["--routing", "least-loaded"]),
        ("prefix cache, cache-aware routing", &["--routing", "cache-aware"]),
    ];
    let mut uncached = None;
    for (label, flags) in configurations {
        let cluster = Launched::start(up, flags)?;
        cluster.ready().await?;
        let p50 = shared_prefix(&args, &cluster.grpc, &cluster.http, label, uncached).await?;
        uncached.get_or_insert(p50);
    }
    Ok(())
}
