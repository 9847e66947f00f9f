//! Decode benchmark on a Mixtral-shaped dummy model ("mix-bench": hidden 1024, 16 heads / 4
//! KV heads, 8 experts top-2, intermediate 3584, 8 layers, vocab 32000; 791 M parameters),
//! or any config (`--config`), at each weight precision asked (`--dtype f32,bf16
//! --quantization int8,fp8`). Prints decode tokens/s per precision and batch size next to
//! the memory-bandwidth roofline measured in the same run and, with `--peers`, transformers
//! and llama.cpp at the matching precision (f32, f16 for bf16, Q8_0 for 8-bit) on the same
//! shapes; then each precision's load time, resident memory and prefill speed.

mod bench;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use bench::{peer_tok_s, ratio_cell, tok_s_cell};
use clap::Parser;
use rayon::prelude::*;
use worker::rank::Parallel;
use worker::weights::WeightSource;
use worker::{Backend, CacheConfig, Cpu, DType, Engine, EngineOptions, Generator, LoadFormat, ModelConfig, Quantization, WeightDType};

#[derive(Debug, Parser)]
#[command(about = "Decode benchmark: tokens/s vs the memory-bandwidth roofline and peers")]
struct Args {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    /// Decode steps timed per batch size (after one warm-up step).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 8)]
    prompt_len: usize,
    /// Tokens of the prompt whose prefill is timed (0 skips it).
    #[arg(long, default_value_t = 512)]
    prefill_len: usize,
    /// Dense weight dtypes to measure, one table row each (f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtype: Vec<DType>,
    /// 8-bit weights to measure, one row each (int8, fp8; quantized at load, dense parts bf16).
    #[arg(long, value_delimiter = ',')]
    quantization: Vec<Quantization>,
    /// A config.json to benchmark instead of the mix-bench shape (weights are dummy).
    #[arg(long)]
    config: Option<PathBuf>,
    /// GiB read by the bandwidth probe.
    #[arg(long, default_value_t = 2)]
    bandwidth_gib: usize,
    /// Also run transformers and llama.cpp (worker/benches/peers.py) on the same shapes.
    #[arg(long)]
    peers: bool,
    /// Run only this peer (`llamacpp` or `transformers`; transformers takes most of a round).
    #[arg(long)]
    only_peer: Option<String>,
    /// Rounds of (bandwidth probe, Tramontane decode, peers), one after the other, the peers
    /// first in even rounds; the table shows medians. This machine's bandwidth drifts by
    /// minutes, so alternating rounds keeps engines measured minutes apart comparable.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Also measure the f32 product kernel alone on weights streamed from memory, for 1 to 32
    /// rows of x, and bound each batch's expert products by those rates.
    #[arg(long)]
    kernel_sweep: bool,
    /// Python interpreter with the peers' packages (worker/benches/peers-requirements.txt).
    #[arg(long, env = "TRAMONTANE_PYTHON", default_value = "python3")]
    python: String,
}

/// One row of the table: how weights are kept, and what the peers run to match.
struct Precision {
    label: String,
    dtype: WeightDType,
    quantization: Quantization,
    /// `peers.py --precision`.
    peer: &'static str,
    /// Bytes a decode step reads per weight (8-bit: the value and its row's scale share).
    bytes_per_weight: f64,
}

fn precisions(args: &Args, c: &ModelConfig) -> Vec<Precision> {
    let dense = args.dtype.iter().map(|&d| Precision {
        label: d.to_string(),
        dtype: WeightDType::As(d),
        quantization: Quantization::None,
        peer: match d {
            DType::F32 => "f32",
            DType::F16 | DType::BF16 => "f16",
        },
        bytes_per_weight: d.size_in_bytes() as f64,
    });
    let quantized = args.quantization.iter().filter(|q| matches!(q, Quantization::Int8 | Quantization::Fp8)).map(|&q| Precision {
        label: q.to_string(),
        dtype: WeightDType::As(DType::BF16),
        quantization: q,
        peer: "q8_0",
        bytes_per_weight: 1.0 + 4.0 / c.hidden_size as f64,
    });
    dense.chain(quantized).collect()
}

/// What one precision measured in one round.
struct Measured {
    ours: Vec<f64>,
    peers: serde_json::Value,
}

/// What one precision measured once: load time, resident memory after loading, prefill.
struct Loaded {
    load_secs: f64,
    rss: u64,
    weight_bytes: usize,
    prefill: Option<f64>,
    /// The rate at which this machine gives fresh memory, measured just before the load.
    touch_rate: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => ModelConfig::from_file(path)?,
        None => ModelConfig::parse(worker::config::MIX_BENCH, "mix-bench".as_ref())?,
    };
    let threads = rayon::current_num_threads();
    let precisions = precisions(&args, &config);
    let max_batch = args.batches.iter().max().copied().unwrap_or(1);
    // Allocated once, so that no round allocates and frees gigabytes between measurements.
    let probe: Vec<f32> = (0..(args.bandwidth_gib << 30) / 4).into_par_iter().map(|i| (i % 7) as f32).collect();
    let mut bandwidths = Vec::new();
    let mut rounds: Vec<Vec<Measured>> = Vec::new();
    let mut loaded: Vec<Loaded> = Vec::new();
    for round in 1..=args.rounds.max(1) {
        eprintln!("round {round}: measuring read bandwidth over {} GiB with {threads} threads...", args.bandwidth_gib);
        bandwidths.push(read_bandwidth(&probe));
        let mut this = Vec::new();
        for p in &precisions {
            // Even rounds run the peers first, so that no engine always takes the same place.
            let peers_first = args.peers && round % 2 == 0;
            let mut peers = if peers_first { run_peers(&args, &config, threads, p.peer) } else { serde_json::Value::Null };
            eprintln!("loading dummy weights ({} M parameters, {})...", config.num_parameters() / 1_000_000, p.label);
            let options = EngineOptions {
                dtype: p.dtype,
                quantization: p.quantization,
                load_format: LoadFormat::Dummy,
                cache: CacheConfig { num_blocks: 64 * max_batch, block_size: 16 },
            };
            let touch_rate = if round == 1 { touch_rate(&config, p)? } else { 0.0 };
            let started = Instant::now();
            let engine = Engine::from_source(Cpu, &config, &WeightSource::Dummy { seed: 0 }, &options, Parallel::single())?;
            let load_secs = started.elapsed().as_secs_f64();
            let (rss, weight_bytes) = (resident_bytes("VmRSS"), engine.weight_bytes());
            eprintln!("loaded in {load_secs:.1} s");
            let mut generator = Generator::new(engine, max_batch);
            let mut ours = Vec::new();
            for &batch in &args.batches {
                let tps = bench::decode_tokens_per_s(&mut generator, batch, args.prompt_len, args.steps)?;
                eprintln!("round {round}, {}, batch {batch}: {tps:.1} tok/s", p.label);
                ours.push(tps);
            }
            if round == 1 {
                let prefill = (args.prefill_len > 0).then(|| bench::prefill_tokens_per_s(&mut generator, args.prefill_len, 1)).transpose()?;
                loaded.push(Loaded { load_secs, rss, weight_bytes, prefill, touch_rate });
            }
            drop(generator);
            if args.peers && !peers_first {
                peers = run_peers(&args, &config, threads, p.peer);
            }
            this.push(Measured { ours, peers });
        }
        rounds.push(this);
    }
    let kernel = (args.prefill_len > 0).then(|| kernel_ms(args.prefill_len, &config)).transpose()?;

    let bandwidth = median(bandwidths.iter().map(|&b| Some(b))).unwrap_or(0.0);
    let of = if rounds.len() > 1 { format!(", medians of {} rounds", rounds.len()) } else { String::new() };
    println!();
    println!(
        "mix-bench: {} M parameters, {} M read per token at batch 1, {threads} threads{of}",
        config.num_parameters() / 1_000_000,
        config.decode_parameters_per_token() / 1_000_000
    );
    println!("read bandwidth (vectorized, {threads} threads, {} GiB): {:.1} GB/s", args.bandwidth_gib, bandwidth / 1e9);
    println!();
    println!(
        "| precision | batch | tramontane tok/s | weights read per step | roofline tok/s | % of roofline | transformers tok/s | vs transformers | llama.cpp tok/s | vs llama.cpp |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, p) in precisions.iter().enumerate() {
        for (b, &batch) in args.batches.iter().enumerate() {
            let tps = median(rounds.iter().map(|r| Some(r[i].ours[b]))).unwrap_or(0.0);
            let bytes = config.decode_weight_bytes(batch, p.bytes_per_weight);
            let roofline = bandwidth / bytes as f64 * batch as f64;
            let peer = |name: &str| median(rounds.iter().map(|r| peer_tok_s(&r[i].peers, name, batch)));
            let (hf, cpp) = (peer("transformers"), peer("llama.cpp"));
            let cpp_type =
                rounds.iter().find_map(|r| r[i].peers.get("llama.cpp")?.get("weights")?.as_str().map(str::to_owned)).unwrap_or_else(|| p.peer.to_owned());
            println!(
                "| {} | {batch} | {tps:.1} | {:.0} MB | {roofline:.1} | {:.0} % | {} | {} | {} ({cpp_type}) | {} |",
                p.label,
                bytes as f64 / 1e6,
                100.0 * tps / roofline,
                tok_s_cell(hf),
                ratio_cell(tps, hf),
                tok_s_cell(cpp),
                ratio_cell(tps, cpp)
            );
        }
    }
    println!();
    println!(
        "| precision | load s | weights | load GB/s | fresh memory GB/s | RSS after load | prefill tok/s ({} tokens) | llama.cpp prefill tok/s |",
        args.prefill_len
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, (p, l)) in precisions.iter().zip(&loaded).enumerate() {
        let cpp = median(rounds.iter().map(|r| r[i].peers.get("llama.cpp")?.get("prefill")?.as_f64()));
        println!(
            "| {} | {:.1} | {:.2} GB | {:.2} | {:.2} | {:.2} GB | {} | {} |",
            p.label,
            l.load_secs,
            l.weight_bytes as f64 / 1e9,
            l.weight_bytes as f64 / l.load_secs / 1e9,
            l.touch_rate / 1e9,
            l.rss as f64 / 1e9,
            tok_s_cell(l.prefill),
            tok_s_cell(cpp)
        );
    }
    println!("peak RSS of the process: {:.2} GB", resident_bytes("VmHWM") as f64 / 1e9);
    if rounds.len() > 1 {
        let batches = args.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" / ");
        println!();
        println!("each round, tok/s at batch {batches}:");
        for (r, (round, bw)) in rounds.iter().zip(&bandwidths).enumerate() {
            for (p, m) in precisions.iter().zip(round) {
                let list = |v: Vec<Option<f64>>| v.into_iter().map(tok_s_cell).collect::<Vec<_>>().join(" / ");
                let mut line = format!("- round {} ({:.1} GB/s), {}: tramontane {}", r + 1, bw / 1e9, p.label, list(m.ours.iter().map(|v| Some(*v)).collect()));
                if !m.peers.is_null() {
                    for name in ["transformers", "llama.cpp"] {
                        line += &format!("; {name} {}", list(args.batches.iter().map(|&b| peer_tok_s(&m.peers, name, b)).collect()));
                    }
                }
                println!("{line}");
            }
        }
    }
    if let Some((ours, candle)) = kernel {
        let (m, h, i) = (args.prefill_len, config.hidden_size, config.intermediate_size);
        println!();
        println!("x[{m}×{h}]·W[{i}×{h}]ᵀ in f32: batch-invariant kernel {ours:.1} ms, candle matmul {candle:.1} ms ({:.2}× candle's time)", ours / candle);
    }
    if args.kernel_sweep {
        kernel_sweep(&args, &config, bandwidth)?;
    }
    for m in rounds.iter().flatten().filter(|m| !m.peers.is_null()) {
        println!();
        println!("peers: {}", m.peers);
    }
    Ok(())
}

/// A `/proc/self/status` figure in bytes (`VmRSS`, `VmHWM`), or 0 where unknown.
fn resident_bytes(field: &str) -> u64 {
    worker::process::proc_kb_field("/proc/self/status", field)
}

/// Bytes per second at which this machine hands out fresh memory: a mapping of the
/// precision's weight bytes (at most 4 GiB), one write per 4 KiB page from every thread,
/// then unmapped. A load cannot make weights faster than this; on a virtual machine it is
/// often the bound, and it drifts.
fn touch_rate(c: &ModelConfig, p: &Precision) -> anyhow::Result<f64> {
    let len = ((c.num_parameters() as f64 * p.bytes_per_weight) as usize).clamp(1 << 20, 4 << 30);
    let started = Instant::now();
    let mut map = memmap2::MmapMut::map_anon(len)?;
    map.par_chunks_mut(4096).for_each(|page| page[0] = 1);
    let secs = started.elapsed().as_secs_f64();
    drop(map);
    Ok(len as f64 / secs)
}

/// Rows of x the kernel sweep measures, besides each batch's rows per expert.
const SWEEP_ROWS: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// Rounds of the kernel sweep (medians reported).
const SWEEP_ROUNDS: usize = 5;

/// Prints the f32 product kernel's rate on weights streamed from memory (two matrices of
/// half the probe's size each, alternated so neither is cached) for `m` rows of x and `k`
/// = the hidden and the intermediate size, then, for each batch whose tokens reach every
/// expert, the fastest its expert products can run at those rates.
fn kernel_sweep(args: &Args, c: &ModelConfig, bandwidth: f64) -> anyhow::Result<()> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let experts = c.num_local_experts;
    // Rows per expert at batch b when its tokens reach every expert (b · top-k / experts).
    let expert_rows = |b: usize| (experts > 0 && b * c.num_experts_per_tok >= experts).then(|| (b * c.num_experts_per_tok).div_ceil(experts));
    let mut rows: Vec<usize> = SWEEP_ROWS.iter().copied().chain(args.batches.iter().filter_map(|&b| expert_rows(b))).collect();
    rows.sort_unstable();
    rows.dedup();
    let mut rates = std::collections::BTreeMap::new();
    println!();
    println!("f32 product kernel on weights streamed from memory ({} threads, medians of {SWEEP_ROUNDS}):", rayon::current_num_threads());
    println!();
    println!("| x rows | k | weights GB/s | % of read bandwidth | GFLOP/s |");
    println!("|---:|---:|---:|---:|---:|");
    let len = (args.bandwidth_gib << 30) / 2 / 4;
    let ws: Vec<Vec<f32>> = (0..2).map(|s| (0..len).into_par_iter().map(|j| ((j * 7 + s) % 13) as f32 / 13.0 - 0.5).collect()).collect();
    for k in [h, i] {
        let n = len / k;
        for &m in &rows {
            let x: Vec<f32> = (0..m * k).map(|j| (j % 7) as f32 / 7.0 - 0.5).collect();
            let mut secs = Vec::new();
            for _ in 0..SWEEP_ROUNDS {
                for w in ws.iter().map(|w| &w[..n * k]) {
                    let started = Instant::now();
                    std::hint::black_box(worker::Cpu.execute(|| worker::backend::gemv_f32(&x, w, m, n, k)));
                    secs.push(started.elapsed().as_secs_f64());
                }
            }
            let rate = (n * k * 4) as f64 / median(secs.into_iter().map(Some)).unwrap_or(f64::NAN);
            rates.insert((m, k), rate);
            println!("| {m} | {k} | {:.1} | {:.0} % | {:.1} |", rate / 1e9, 100.0 * rate / bandwidth, rate / 4.0 * 2.0 * m as f64 / 1e9);
        }
    }
    for &b in &args.batches {
        let Some(m) = expert_rows(b) else { continue };
        // Gate and up read `k` = hidden, down reads `k` = intermediate, every expert of every layer.
        let bytes = (c.num_hidden_layers * experts * h * i * 4) as f64;
        let secs = 2.0 * bytes / rates[&(m, h)] + bytes / rates[&(m, i)];
        println!();
        println!(
            "batch {b}: the expert products alone ({m} rows each, {:.0} MB) take at least {:.0} ms per step at these rates: at most {:.1} tok/s",
            3.0 * bytes / 1e6,
            secs * 1e3,
            b as f64 / secs
        );
    }
    Ok(())
}

/// The median of the values present (the mean of the middle two for an even count).
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut v: Vec<f64> = values.flatten().collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Milliseconds of one prefill-shaped product (`up_proj`-like) in the engine's f32 kernel and
/// in candle's matmul (best of three each).
fn kernel_ms(m: usize, c: &ModelConfig) -> anyhow::Result<(f64, f64)> {
    let (k, n) = (c.hidden_size, c.intermediate_size);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 5000.0).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 104_729 % 997) as f32 - 498.0) / 5000.0).collect();
    let best = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            f()?;
            best = best.min(started.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    let ours = worker::Cpu.execute(|| {
        best(&mut || {
            std::hint::black_box(worker::backend::gemv_f32(&x, &w, m, n, k));
            Ok(())
        })
    })?;
    let dev = candle_core::Device::Cpu;
    let (xt, wt) = (candle_core::Tensor::from_slice(&x, (m, k), &dev)?, candle_core::Tensor::from_slice(&w, (n, k), &dev)?);
    let candle = best(&mut || {
        std::hint::black_box(xt.matmul(&wt.t()?)?);
        Ok(())
    })?;
    Ok((ours, candle))
}

/// Bytes per second of the best of five vectorized reads of `data`, on every thread.
fn read_bandwidth(data: &[f32]) -> f64 {
    let chunk = 1 << 20;
    let mut best = f64::INFINITY;
    let mut check = 0f32;
    for _ in 0..5 {
        let started = Instant::now();
        check += data.par_chunks(chunk).map(sum_lanes).sum::<f32>();
        best = best.min(started.elapsed().as_secs_f64());
    }
    std::hint::black_box(check);
    std::mem::size_of_val(data) as f64 / best
}

/// Sum of `xs`: the widest vector loads the CPU has, eight independent accumulators.
fn sum_lanes(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { sum_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { sum_avx2(xs) };
        }
    }
    let mut acc = [0f32; 32];
    for c in xs.chunks_exact(32) {
        for l in 0..32 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum()
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 8];
    let p = xs.as_ptr();
    let mut i = 0;
    while i + 128 <= xs.len() {
        for (l, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 128 <= len bounds the load.
            *acc = _mm512_add_ps(*acc, unsafe { _mm512_loadu_ps(p.add(i + 16 * l)) });
        }
        i += 128;
    }
    let total = acc.iter().fold(_mm512_setzero_ps(), |s, a| _mm512_add_ps(s, *a));
    _mm512_reduce_add_ps(total) + xs[i..].iter().sum::<f32>()
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    let p = xs.as_ptr();
    let mut i = 0;
    while i + 64 <= xs.len() {
        for (l, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 64 <= len bounds the load.
            *acc = _mm256_add_ps(*acc, unsafe { _mm256_loadu_ps(p.add(i + 8 * l)) });
        }
        i += 64;
    }
    let mut lanes = [0f32; 8];
    let total = acc.iter().fold(_mm256_setzero_ps(), |s, a| _mm256_add_ps(s, *a));
    // SAFETY: `lanes` holds eight f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum::<f32>() + xs[i..].iter().sum::<f32>()
}

fn run_peers(args: &Args, c: &ModelConfig, threads: usize, precision: &str) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
    eprintln!("running peers ({})...", script.display());
    bench::peer_json(
        Command::new(&args.python)
            .arg(&script)
            .args(bench::peer_shape_args(c, &args.batches, args.steps))
            .args(["--experts", &c.num_local_experts.to_string(), "--top-k", &c.num_experts_per_tok.to_string()])
            .args(["--threads", &threads.to_string(), "--precision", precision])
            .args(["--prefill-len", &args.prefill_len.to_string()])
            .args(args.only_peer.iter().flat_map(|p| ["--only", p.as_str()]))
            // The GGUFs are written once and reused by every round and precision.
            .arg("--workdir")
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mix-bench-peers")),
    )
}
