//! Decode benchmark of the CUDA backend on a Mistral-7B-shaped dummy model (bf16, one GPU).
//! Prints decode tokens/s per batch size next to the HBM roofline (the device-to-device copy
//! bandwidth measured in the same run) and, with `--peers`, transformers on the same GPU.

mod bench;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;
use worker::Backend;
use worker::backend::Cuda;
use worker::backend::cuda::Product;
use worker::rank::Parallel;
use worker::weights::HostTensor;
use worker::weights::WeightSource;
use worker::{CacheConfig, DType, Engine, EngineOptions, Generator, LoadFormat, ModelConfig};

#[derive(Debug, Parser)]
#[command(about = "GPU decode benchmark: tokens/s vs the HBM roofline and transformers")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    batches: Vec<usize>,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens of one prompt whose prefill is timed (0 skips it).
    #[arg(long, default_value_t = 2048)]
    prefill_len: usize,
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// A config.json to benchmark instead of the Mistral-7B shape (weights are dummy).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// GiB copied by the bandwidth probe.
    #[arg(long, default_value_t = 2)]
    copy_gib: usize,
    /// Also run transformers (worker/benches/gpu_peer.py) on the same shapes and GPU.
    #[arg(long)]
    peers: bool,
    #[arg(long, env = "TRAMONTANE_PYTHON", default_value = "python3")]
    python: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => ModelConfig::from_file(path)?,
        None => ModelConfig::parse(worker::config::MISTRAL_7B, "mistral-7b".as_ref())?,
    };
    let backend = Cuda::new(args.device)?;
    eprintln!("{}: measuring the copy bandwidth over {} GiB...", backend.device_name(), args.copy_gib);
    let bandwidth = copy_bandwidth(&backend, args.copy_gib << 30)?;
    eprintln!("timing the products of the model's shapes...");
    let products = product_table(&backend, &config, &args, bandwidth)?;
    eprintln!("loading dummy weights ({} M parameters, {})...", config.num_parameters() / 1_000_000, args.dtype);
    let max_batch = args.batches.iter().max().copied().unwrap_or(1);
    let per_seq = (args.prompt_len + args.steps + 4).max(args.prefill_len + 2);
    let options = EngineOptions {
        dtype: worker::WeightDType::As(args.dtype),
        quantization: worker::Quantization::None,
        load_format: LoadFormat::Dummy,
        cache: CacheConfig { num_blocks: max_batch * per_seq.div_ceil(16) + 16, block_size: 16 },
    };
    let started = Instant::now();
    let engine = Engine::from_source(backend.clone(), &config, &WeightSource::Dummy { seed: 0 }, &options, Parallel::single())?;
    let (free, total) = backend.memory()?;
    eprintln!("loaded in {:.1} s; {:.1} of {:.1} GiB free", started.elapsed().as_secs_f64(), gib(free), gib(total));
    let mut generator = Generator::new(engine, max_batch);
    let mut rows = Vec::new();
    for &batch in &args.batches {
        let tps = bench::decode_tokens_per_s(&mut generator, batch, args.prompt_len, args.steps)?;
        let bytes = config.decode_weight_bytes(batch, args.dtype.size_in_bytes() as f64);
        let roofline = bandwidth / bytes as f64 * batch as f64;
        eprintln!("batch {batch}: {tps:.1} tok/s");
        rows.push((batch, tps, bytes, roofline));
    }
    let prefill = (args.prefill_len > 0).then(|| bench::prefill_tokens_per_s(&mut generator, args.prefill_len, 2)).transpose()?;
    // The peer runs in another process: give it the memory the engine held.
    drop(generator);
    backend.release_free_memory()?;
    let peers = if args.peers { run_peers(&args, &config) } else { serde_json::Value::Null };

    println!();
    println!(
        "gpu-bench on {}: {} M parameters, {}, prompt {} tokens, {} decode steps timed",
        backend.device_name(),
        config.num_parameters() / 1_000_000,
        args.dtype,
        args.prompt_len,
        args.steps
    );
    println!("copy bandwidth (device to device, read + write): {:.0} GB/s", bandwidth / 1e9);
    println!();
    println!("| batch | tramontane tok/s | ms/step | weights read per step | roofline tok/s | % of roofline | transformers tok/s | vs transformers |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (batch, tps, bytes, roofline) in rows {
        let hf = bench::peer_tok_s(&peers, "transformers", batch);
        println!(
            "| {batch} | {tps:.1} | {:.2} | {:.2} GB | {roofline:.1} | {:.0} % | {} | {} |",
            1e3 * batch as f64 / tps,
            bytes as f64 / 1e9,
            100.0 * tps / roofline,
            bench::tok_s_cell(hf),
            bench::ratio_cell(tps, hf),
        );
    }
    println!();
    println!("products x[m×k]·W[n×k]ᵀ ({} weights), time per call and weight bytes per second:", args.dtype);
    println!();
    println!("| m | n × k | GEMV kernel µs | GB/s | % of copy bw | cuBLAS µs | GB/s | % of copy bw |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for row in products {
        println!("{row}");
    }
    if let Some(tps) = prefill {
        println!();
        println!("prefill of one {}-token prompt: {tps:.0} tok/s", args.prefill_len);
    }
    if !peers.is_null() {
        println!();
        println!("peers: {peers}");
    }
    Ok(())
}

/// Times `x · wᵀ` for the decoder's weight shapes at a few batch sizes, through the GEMV
/// kernel (where it applies) and through cuBLAS; one table row each.
fn product_table(backend: &Cuda, c: &ModelConfig, args: &Args, bandwidth: f64) -> anyhow::Result<Vec<String>> {
    let h = c.hidden_size;
    let shapes = [(c.intermediate_size, h), (h, c.intermediate_size), (c.num_key_value_heads * c.head_dim, h), (c.vocab_size, h)];
    let mut rows = Vec::new();
    for (n, k) in shapes {
        let values: Vec<f32> = (0..n * k).into_par_iter().map(|i| ((i % 1013) as f32 - 506.0) * 1e-4).collect();
        let data: Vec<u8> = values.par_iter().flat_map_iter(|v| v.to_le_bytes()).collect();
        let w = backend.upload(HostTensor { dtype: DType::F32, shape: vec![n, k], data: data.into() }, args.dtype)?;
        let bytes = (n * k * args.dtype.size_in_bytes()) as f64;
        for m in [1usize, 4, 8, 64] {
            let x = backend.upload_activations(vec![0.01; m * k], m, k)?;
            let time = |product: Product| -> anyhow::Result<Option<f64>> {
                if backend.linear_with(&x, &w, product).is_err() {
                    return Ok(None);
                }
                backend.synchronize()?;
                let started = Instant::now();
                for _ in 0..20 {
                    backend.linear_with(&x, &w, product)?;
                }
                backend.synchronize()?;
                Ok(Some(started.elapsed().as_secs_f64() / 20.0))
            };
            let cell = |t: Option<f64>| match t {
                Some(t) => format!("{:.1} | {:.0} | {:.0} %", t * 1e6, bytes / t / 1e9, 100.0 * bytes / t / bandwidth),
                None => "– | – | –".to_owned(),
            };
            rows.push(format!("| {m} | {n} × {k} | {} | {} |", cell(time(Product::Gemv)?), cell(time(Product::Cublas)?)));
        }
    }
    Ok(rows)
}

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Device-to-device copy bandwidth, counting the bytes read and written (best of 5 rounds of
/// 4 copies).
fn copy_bandwidth(backend: &Cuda, bytes: usize) -> anyhow::Result<f64> {
    let stream = backend.stream();
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    backend.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..4 {
            stream.memcpy_dtod(&src, &mut dst)?;
        }
        backend.synchronize()?;
        best = best.min(started.elapsed().as_secs_f64() / 4.0);
    }
    Ok(2.0 * bytes as f64 / best)
}

fn run_peers(args: &Args, c: &ModelConfig) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/gpu_peer.py");
    let script = if script.exists() { script } else { PathBuf::from("worker/benches/gpu_peer.py") };
    eprintln!("running transformers ({})...", script.display());
    bench::peer_json(
        Command::new(&args.python)
            .arg(&script)
            .args(bench::peer_shape_args(c, &args.batches, args.steps))
            .args(["--head-dim", &c.head_dim.to_string(), "--prompt-len", &args.prompt_len.to_string()])
            .args(["--dtype", &args.dtype.to_string()]),
    )
}
