//! Serving benchmark against a running cluster: for each concurrency level, that many
//! streams each run `--requests` greedy generations back to back through the gRPC API.
//! Prints TTFT and inter-token latency percentiles, throughput, and the coordinator's own
//! overhead per token (step wall time at the coordinator minus the workers' compute time,
//! from /metrics).

use std::time::{Duration, Instant};

use clap::Parser;
use proto::tramontane::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(about = "TTFT / inter-token latency / coordinator overhead against a running cluster")]
struct Args {
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
}

async fn scrape(http: &str) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
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
                        let req = pb::GenerateRequest {
                            request_id: String::new(),
                            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds { ids })),
                            sampling: Some(pb::SamplingParams { max_tokens: Some(max_tokens), ..Default::default() }),
                        };
                        let sent = Instant::now();
                        let mut stream = client.generate(req).await?.into_inner();
                        let mut last: Option<Instant> = None;
                        while let Some(msg) = stream.message().await? {
                            if msg.token_ids.is_empty() {
                                continue;
                            }
                            let now = Instant::now();
                            match last {
                                None => ttft.push((now - sent).as_secs_f64()),
                                Some(prev) => itl.push((now - prev).as_secs_f64()),
                            }
                            last = Some(now);
                            tokens += msg.token_ids.len();
                        }
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
        let ms = |v: f64| format!("{:.1} ms", v * 1e3);
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
