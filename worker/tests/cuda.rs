//! The CUDA backend on a real GPU (feature `cuda` or `cuda-12`): every operation against the
//! CPU backend on fresh random inputs, the reference fixtures end to end, and NCCL's
//! collectives at world size 1. tests/gpu/check.sh runs these on a GPU machine.
#![cfg(feature = "_cuda")]

mod common;

use std::sync::OnceLock;

use common::{WorkerProcess, fixture, reference};
use proto::tramontane::worker::v1 as pb;
use worker::backend::cuda::Product;
use worker::backend::{AttentionMeta, Cuda, Heads, KvShape, RowsUpdate, SeqAttention};
use worker::comm::{Comm, NcclComm, nccl_unique_id};
use worker::sampling::{RowChoice, splitmix64};
use worker::weights::HostTensor;
use worker::{Backend, Cpu, DType, Engine, EngineOptions, Generator, SamplingParams, SeqRequest};

fn gpu() -> Cuda {
    static GPU: OnceLock<Cuda> = OnceLock::new();
    GPU.get_or_init(|| Cuda::new(0).unwrap_or_else(|e| panic!("the CUDA backend: {e}"))).clone()
}

/// Uniform values in [-scale, scale), from a seed.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n).map(|_| ((splitmix64(&mut s) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale).collect()
}

fn host(values: &[f32], shape: &[usize]) -> HostTensor<'static> {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    HostTensor { dtype: DType::F32, shape: shape.to_vec(), data: data.into() }
}

/// A weight matrix on the CPU backend, rounded to `dtype` as the GPU's upload rounds it.
fn cpu_weight(c: &Cpu, values: &[f32], shape: &[usize], dtype: DType) -> <Cpu as Backend>::Weight {
    let dense = worker::weights::HostMatrix::Dense(host(values, shape));
    c.upload_weight(worker::quant::convert(dense, worker::quant::Format::Dense(dtype)).unwrap()).unwrap()
}

/// Largest |a - b| relative to the largest |b| (at least 1), asserted under `tol`; prints a
/// table row.
fn check(op: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{op}: lengths");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
    assert!(a.iter().all(|v| v.is_finite()), "{op}: non-finite GPU output");
    eprintln!("| {op} | {err:.2e} | {tol:.0e} |");
    assert!(err <= tol, "{op}: relative error {err} > {tol}");
}

#[test]
fn every_op_matches_the_cpu_backend() {
    let g = gpu();
    let c = Cpu;
    eprintln!("| op (bf16 unless named) | max error / max value | tolerance |\n|---|---:|---:|");

    // Products: the small-batch kernel (m <= 4, k % 8 == 0), cuBLAS in bf16, f16 and f32.
    for (m, n, k, dtype, tol) in [
        (1, 4096, 4096, DType::BF16, 1e-2),
        (3, 1000, 520, DType::BF16, 1e-2),
        (4, 4096, 1024, DType::F16, 2e-3),
        (7, 2048, 4096, DType::BF16, 1e-2),
        (64, 1024, 4096, DType::BF16, 1e-2),
        (5, 300, 100, DType::BF16, 1e-2),
        (9, 512, 256, DType::F32, 1e-5),
        (1, 512, 256, DType::F32, 1e-5),
    ] {
        let (x, w) = (random(m * k, 1 + m as u64, 1.0), random(n * k, 2 + n as u64, 0.05));
        let (xg, wg) = (g.upload_activations(x.clone(), m, k).unwrap(), g.upload(host(&w, &[n, k]), dtype).unwrap());
        let (xc, wc) = (c.upload_activations(x, m, k).unwrap(), cpu_weight(&c, &w, &[n, k], dtype));
        let ours = g.to_host(&g.linear(&xg, &wg).unwrap()).unwrap();
        let cpu = c.to_host(&c.linear(&xc, &wc).unwrap()).unwrap();
        check(&format!("linear [{m}×{k}]·[{n}×{k}]ᵀ {dtype}"), &ours, &cpu, tol);
        if m <= 4 && dtype != DType::F32 && k % 8 == 0 {
            // The GEMV kernel and cuBLAS see the same rounded inputs: they agree closely.
            let blas = g.to_host(&g.linear_with(&xg, &wg, Product::Cublas).unwrap()).unwrap();
            check(&format!("GEMV kernel vs cuBLAS [{m}×{k}]·[{n}×{k}]ᵀ {dtype}"), &ours, &blas, 1e-5);
        }
        // Weights come back exactly as uploaded.
        let every_row: Vec<u32> = (0..n as u32).collect();
        check(&format!("weights {dtype} to host"), &g.to_host(&wg).unwrap(), &c.to_host(&c.embedding(&wc, &every_row).unwrap()).unwrap(), 0.0);
    }

    let (rows, cols) = (33, 4096);
    let (a, b) = (random(rows * cols, 10, 3.0), random(rows * cols, 11, 3.0));
    let norm_w = random(cols, 12, 1.0);
    let ag = g.upload_activations(a.clone(), rows, cols).unwrap();
    let bg = g.upload_activations(b.clone(), rows, cols).unwrap();
    let ac = c.upload_activations(a, rows, cols).unwrap();
    let bc = c.upload_activations(b, rows, cols).unwrap();
    let (wg, wc) = (g.upload(host(&norm_w, &[cols]), DType::F32).unwrap(), c.upload(host(&norm_w, &[cols]), DType::F32).unwrap());
    let pair = |t: &<Cuda as Backend>::Tensor, u: &<Cpu as Backend>::Tensor| (g.to_host(t).unwrap(), c.to_host(u).unwrap());
    let (x, y) = pair(&g.rms_norm(&ag, &wg, 1e-5).unwrap(), &c.rms_norm(&ac, &wc, 1e-5).unwrap());
    check("rms_norm", &x, &y, 1e-5);
    let (x, y) = pair(&g.add(&ag, &bg).unwrap(), &c.add(&ac, &bc).unwrap());
    check("add", &x, &y, 1e-6);
    let (x, y) = pair(&g.silu_mul(&ag, &bg).unwrap(), &c.silu_mul(&ac, &bc).unwrap());
    check("silu_mul", &x, &y, 1e-5);
    let ((sg, ng), (sc, nc)) = (g.add_rms_norm(&ag, &bg, &wg, 1e-5).unwrap(), c.add_rms_norm(&ac, &bc, &wc, 1e-5).unwrap());
    check("add_rms_norm (sum)", &g.to_host(&sg).unwrap(), &c.to_host(&sc).unwrap(), 1e-6);
    check("add_rms_norm (norm)", &g.to_host(&ng).unwrap(), &c.to_host(&nc).unwrap(), 1e-5);
    // SwiGLU: the fused small-batch kernel (m <= 4) and the two-product path.
    for m in [1usize, 3, 9] {
        let (n, k) = (1792, 1024);
        let x = random(m * k, 40 + m as u64, 1.0);
        let (gw, uw) = (random(n * k, 41, 0.05), random(n * k, 42, 0.05));
        let xg = g.upload_activations(x.clone(), m, k).unwrap();
        let (gg, ug) = (g.upload(host(&gw, &[n, k]), DType::BF16).unwrap(), g.upload(host(&uw, &[n, k]), DType::BF16).unwrap());
        let fused = g.to_host(&g.swiglu(&xg, &gg, &ug).unwrap()).unwrap();
        if m <= 4 {
            // The fused kernel against two cuBLAS products (above 4 rows swiglu is those).
            let apart = g.silu_mul(&g.linear_with(&xg, &gg, Product::Cublas).unwrap(), &g.linear_with(&xg, &ug, Product::Cublas).unwrap());
            check(&format!("swiglu [{m}×{k}] bf16 vs two products"), &fused, &g.to_host(&apart.unwrap()).unwrap(), 1e-5);
        }
        let xc = c.upload_activations(x, m, k).unwrap();
        let (gc, uc) = (cpu_weight(&c, &gw, &[n, k], DType::BF16), cpu_weight(&c, &uw, &[n, k], DType::BF16));
        check(&format!("swiglu [{m}×{k}] bf16"), &fused, &c.to_host(&c.swiglu(&xc, &gc, &uc).unwrap()).unwrap(), 2e-2);
    }
    let heads = Heads { num_heads: 32, head_dim: 128 };
    let positions: Vec<u32> = (0..rows as u32).map(|i| i * 997 % 32_768).collect();
    let (x, y) = pair(&g.rope(&ag, heads, &positions, 1e6).unwrap(), &c.rope(&ac, heads, &positions, 1e6).unwrap());
    check("rope (positions up to 32k)", &x, &y, 1e-4);

    // Embedding from a bf16 table; gather and scatter of rows.
    let table = random(1000 * 256, 13, 1.0);
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 1000) as u32).collect();
    let (tg, tc) = (g.upload(host(&table, &[1000, 256]), DType::BF16).unwrap(), cpu_weight(&c, &table, &[1000, 256], DType::BF16));
    let (x, y) = pair(&g.embedding(&tg, &ids).unwrap(), &c.embedding(&tc, &ids).unwrap());
    check("embedding (bf16 table)", &x, &y, 0.0);
    let picks = [5u32, 0, 32, 7, 7];
    let (x, y) = pair(&g.gather_rows(&ag, &picks).unwrap(), &c.gather_rows(&ac, &picks).unwrap());
    check("gather_rows", &x, &y, 0.0);
    let (src_g, src_c) = (g.gather_rows(&ag, &[1, 2, 3]).unwrap(), c.gather_rows(&ac, &[1, 2, 3]).unwrap());
    let (rows_a, rows_b, w_a, w_b) = ([4u32, 0, 9], [0u32, 9, 2], [0.5f32, 0.25, 1.0], [2.0f32, -1.0, 0.75]);
    let parts_g = [RowsUpdate { rows: &rows_a, weights: &w_a, src: &src_g }, RowsUpdate { rows: &rows_b, weights: &w_b, src: &src_g }];
    let parts_c = [RowsUpdate { rows: &rows_a, weights: &w_a, src: &src_c }, RowsUpdate { rows: &rows_b, weights: &w_b, src: &src_c }];
    let (x, y) = pair(&g.scatter_add_rows(12, &parts_g).unwrap(), &c.scatter_add_rows(12, &parts_c).unwrap());
    check("scatter_add_rows", &x, &y, 1e-6);

    // Router: softmax, top-2 of 8, renormalised; ties go to the lower expert.
    let mut logits = random(50 * 8, 14, 2.0);
    logits[8..16].copy_from_slice(&[1.0, 3.0, 3.0, 0.5, 3.0, -1.0, 0.0, 2.0]);
    let (lg, lc) = (g.upload_activations(logits.clone(), 50, 8).unwrap(), c.upload_activations(logits, 50, 8).unwrap());
    let ((ig, wg), (ic, wc)) = (g.router_top_k(&lg, 2).unwrap(), c.router_top_k(&lc, 2).unwrap());
    assert_eq!(ig, ic, "router choices");
    assert_eq!(&ig[2..4], &[1, 2], "ties go to the lower expert");
    check("router_top_k weights", &wg, &wc, 1e-6);

    for (kv, tol) in [(DType::BF16, 1e-2), (DType::F32, 1e-5)] {
        attention_matches(&g, &c, kv, None, tol);
        attention_matches(&g, &c, kv, Some(16), tol);
    }
}

/// Two sequences: a 37-token and a 49-token prefill in one step (GQA 8 heads over 2), then
/// one decode token each; the attention outputs of both steps must match.
fn attention_matches(g: &Cuda, c: &Cpu, kv: DType, window: Option<usize>, tol: f32) {
    let shape = KvShape { num_blocks: 32, block_size: 16, num_kv_heads: 2, head_dim: 128, dtype: kv };
    let heads = Heads { num_heads: 8, head_dim: 128 };
    let (mut cg, mut cc) = (g.alloc_kv_cache(shape).unwrap(), c.alloc_kv_cache(shape).unwrap());
    let tables = [vec![5u32, 9, 1, 30], vec![2u32, 7, 11, 3]];
    let mut context = [0usize, 0];
    for (step, new) in [[37usize, 49], [1, 1]].iter().enumerate() {
        let mut meta = AttentionMeta { seqs: Vec::new(), slots: Vec::new(), positions: Vec::new(), block_size: 16, sliding_window: window };
        let mut start = 0;
        for s in 0..2 {
            for p in context[s]..context[s] + new[s] {
                meta.positions.push(p as u32);
                meta.slots.push(tables[s][p / 16] * 16 + (p % 16) as u32);
            }
            context[s] += new[s];
            meta.seqs.push(SeqAttention { token_start: start, num_tokens: new[s], context_len: context[s], block_table: tables[s].clone() });
            start += new[s];
        }
        let rows = start;
        let seed = 20 + step as u64;
        let (q, k, v) = (random(rows * 8 * 128, seed, 1.0), random(rows * 2 * 128, seed + 100, 1.0), random(rows * 2 * 128, seed + 200, 1.0));
        let up_g = |d: &[f32], cols| g.upload_activations(d.to_vec(), rows, cols).unwrap();
        let up_c = |d: &[f32], cols| c.upload_activations(d.to_vec(), rows, cols).unwrap();
        g.write_kv(&mut cg, &up_g(&k, 256), &up_g(&v, 256), &meta.slots).unwrap();
        c.write_kv(&mut cc, &up_c(&k, 256), &up_c(&v, 256), &meta.slots).unwrap();
        let ours = g.to_host(&g.paged_attention(&up_g(&q, 1024), &cg, heads, &meta).unwrap()).unwrap();
        let cpu = c.to_host(&c.paged_attention(&up_c(&q, 1024), &cc, heads, &meta).unwrap()).unwrap();
        let what = if step == 0 { "prefill" } else { "decode" };
        check(&format!("paged_attention {what}, {kv} cache, window {window:?}"), &ours, &cpu, tol);
    }
}

#[test]
fn choosing_tokens_on_the_gpu_matches_the_host() {
    let g = gpu();
    let vocab = 32_768;
    let mut logits = random(4 * vocab, 30, 4.0);
    logits[vocab + 77] = 20.0;
    logits[vocab + 78] = 20.0; // a tie: the lower id wins
    let lg = g.upload_activations(logits.clone(), 4, vocab).unwrap();
    let greedy = SamplingParams { logprobs: Some(5), ..SamplingParams::default() };
    // A biased row is chosen on the host: token 77 loses its lead.
    let biased = SamplingParams { logit_bias: vec![(77, -50.0)], ..greedy.clone() };
    let choices = [
        RowChoice::Sample { params: &greedy, position: 3, history: None, allowed: None },
        RowChoice::Sample { params: &greedy, position: 4, history: None, allowed: None },
        RowChoice::Score { token: 12_345, top_n: 20 },
        RowChoice::Skip,
    ];
    let adjusted = [RowChoice::Skip, RowChoice::Sample { params: &biased, position: 4, history: None, allowed: None }, RowChoice::Skip, RowChoice::Skip];
    assert_eq!(g.choose(&lg, &adjusted).unwrap()[1].as_ref().unwrap().token, 78);
    let ours = g.choose(&lg, &choices).unwrap();
    let host: Vec<_> = logits.chunks_exact(vocab).zip(&choices).map(|(row, c)| worker::sampling::choose(row, c)).collect();
    assert!(ours[3].is_none());
    assert_eq!(ours[1].as_ref().unwrap().token, 77);
    for (o, h) in ours.iter().zip(&host).take(3) {
        let (o, h) = (o.as_ref().unwrap(), h.as_ref().unwrap());
        assert_eq!(o.token, h.token);
        assert!((o.logprob - h.logprob).abs() < 1e-4, "{} vs {}", o.logprob, h.logprob);
        assert_eq!(o.top.iter().map(|t| t.0).collect::<Vec<_>>(), h.top.iter().map(|t| t.0).collect::<Vec<_>>());
        for (a, b) in o.top.iter().zip(&h.top) {
            assert!((a.1 - b.1).abs() < 1e-4);
        }
    }

    // Seeded draws pick the host sampler's tokens (both walk the kept tokens in id order).
    let (rows, small_vocab) = (512, 1000);
    let logits = random(rows * small_vocab, 31, 3.0);
    let lg = g.upload_activations(logits.clone(), rows, small_vocab).unwrap();
    for (temperature, top_k, top_p) in [(1.0f32, 0usize, 1.0f32), (0.8, 40, 1.0), (1.2, 0, 0.9), (0.9, 50, 0.7)] {
        let params = SamplingParams { temperature, top_k, top_p, seed: 7, logprobs: Some(3), ..SamplingParams::default() };
        let choices: Vec<_> = (0..rows).map(|position| RowChoice::Sample { params: &params, position, history: None, allowed: None }).collect();
        let ours = g.choose(&lg, &choices).unwrap();
        let differ = logits
            .chunks_exact(small_vocab)
            .zip(&choices)
            .zip(&ours)
            .filter(|((row, c), o)| worker::sampling::choose(row, c).map(|h| h.token) != o.as_ref().map(|o| o.token))
            .count();
        eprintln!("seeded sampling T={temperature} top_k={top_k} top_p={top_p}: {differ} of {rows} draws differ from the host");
        assert_eq!(differ, 0, "GPU draws differ from the host sampler's");
    }

    // Sampling: 16384 draws (one row each, positions 0..16384) follow the filtered distribution
    // (the total variation chance alone gives is about 0.02).
    let small = 64;
    let row: Vec<f32> = (0..small).map(|i| -0.08 * i as f32).collect();
    let draws = 16_384;
    let rows: Vec<f32> = row.iter().copied().cycle().take(draws * small).collect();
    let lg = g.upload_activations(rows, draws, small).unwrap();
    for (temperature, top_k, top_p) in [(1.0f32, 0usize, 1.0f32), (0.7, 10, 1.0), (1.3, 0, 0.6), (1.0, 20, 0.5)] {
        let params = SamplingParams { temperature, top_k, top_p, seed: 99, ..SamplingParams::default() };
        let choices: Vec<_> = (0..draws).map(|position| RowChoice::Sample { params: &params, position, history: None, allowed: None }).collect();
        let got = g.choose(&lg, &choices).unwrap();
        let again = g.choose(&lg, &choices).unwrap();
        let mut counts = vec![0f64; small];
        for (a, b) in got.iter().zip(&again) {
            let (a, b) = (a.as_ref().unwrap().token, b.as_ref().unwrap().token);
            assert_eq!(a, b, "same seed and position, same token");
            counts[a as usize] += 1.0;
        }
        // The distribution the host sampler draws from (logits are sorted, so top-k and
        // top-p keep a prefix).
        let mut p: Vec<f64> = row.iter().map(|&l| ((l - row[0]) / temperature) as f64).map(f64::exp).collect();
        if top_k > 0 {
            p[top_k..].iter_mut().for_each(|v| *v = 0.0);
        }
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
        if top_p < 1.0 {
            let mut cum = 0.0;
            let keep = p.iter().position(|v| {
                cum += v;
                cum >= top_p as f64
            });
            p[keep.unwrap() + 1..].iter_mut().for_each(|v| *v = 0.0);
            let kept: f64 = p.iter().sum();
            p.iter_mut().for_each(|v| *v /= kept);
        }
        let tv: f64 = counts.iter().zip(&p).map(|(c, p)| (c / draws as f64 - p).abs()).sum::<f64>() / 2.0;
        let outside = counts.iter().zip(&p).filter(|(c, p)| **c > 0.0 && **p == 0.0).count();
        eprintln!("sampling T={temperature} top_k={top_k} top_p={top_p}: total variation {tv:.3}");
        assert_eq!(outside, 0, "a token outside top-k / top-p was drawn");
        assert!(tv < 0.05, "total variation {tv} from the filtered distribution");
    }
}

#[test]
fn the_reference_fixtures_run_on_the_gpu() {
    eprintln!("| fixture | dtype | greedy ids | worst logprob error | tolerance |\n|---|---|---|---:|---:|");
    for name in ["mistral-v1-tiny", "mixtral-v3-tiny", "mistral-nemo-tiny", "mixtral-f32-tiny"] {
        let reference = reference(name);
        // Each checkpoint in the dtype it is published in (bf16, f16 or f32: 2-byte weights
        // keep f32 activations, so the results are those of f32 arithmetic), and in f32.
        let config = worker::ModelConfig::from_file(&fixture(name).join("config.json")).expect("config");
        let native: DType = config.checkpoint_dtype.as_deref().unwrap_or("float32").parse().expect("a known dtype");
        let runs = if native == DType::F32 { vec![(DType::F32, 2e-3f32)] } else { vec![(native, 2e-2), (DType::F32, 2e-3)] };
        for (dtype, tol) in runs {
            let options = EngineOptions { dtype: worker::WeightDType::As(dtype), ..EngineOptions::default() };
            let engine = Engine::load(gpu(), &fixture(name), &options).unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut g = Generator::new(engine, 16);
            // All prompts in one batch: mixed lengths share every step.
            for (i, case) in reference.cases.iter().enumerate() {
                let params = SamplingParams { max_tokens: case.greedy_ids.len(), logprobs: Some(1), prompt_logprobs: Some(1), ..SamplingParams::default() };
                g.add(SeqRequest { id: i as u64, prompt: case.prompt_ids.clone(), params, cache_salt: None }).unwrap();
            }
            let mut done = g.run_to_completion().expect("runs");
            done.sort_by_key(|d| d.id);
            let mut worst = 0f32;
            let mut same = true;
            for (case, d) in reference.cases.iter().zip(&done) {
                same &= d.tokens == case.greedy_ids;
                for (o, r) in d.prompt_logprobs.iter().zip(&case.prompt_logprobs[1..]) {
                    worst = worst.max((o.logprob - r.expect("logprob")).abs());
                }
                for (o, r) in d.logprobs.iter().zip(&case.greedy_logprobs) {
                    worst = worst.max((o.logprob - r).abs());
                }
            }
            eprintln!("| {name} | {dtype} | {} | {worst:.2e} | {tol:.0e} |", if same { "identical" } else { "DIFFER" });
            assert!(same, "{name} {dtype}: greedy ids differ from transformers");
            assert!(worst <= tol, "{name} {dtype}: logprob error {worst} > {tol}");
        }
    }
}

#[test]
fn nccl_runs_every_collective_at_world_size_one() {
    let id = nccl_unique_id().expect("NCCL unique id");
    let comm = NcclComm::init(0, 0, 1, &id).expect("NCCL init");
    assert_eq!((comm.rank(), comm.world()), (0, 1));
    let mut data = vec![1.5f32, -2.0, 3.25];
    comm.all_reduce_sum(&mut data).unwrap();
    assert_eq!(data, [1.5, -2.0, 3.25]);
    assert_eq!(comm.all_gather(&data).unwrap(), data);
    comm.broadcast(&mut data, 0).unwrap();
    assert_eq!(data, [1.5, -2.0, 3.25]);
    assert_eq!(comm.all_to_all_v(vec![vec![4.0, 5.0]]).unwrap(), vec![vec![4.0, 5.0]]);
    comm.barrier().unwrap();
    let sub = comm.split(&[0]).unwrap();
    let mut one = vec![7.0f32];
    sub.all_reduce_sum(&mut one).unwrap();
    assert_eq!(one, [7.0]);
}

/// The worker binary with `--device cuda`, driven over its gRPC API like a coordinator drives
/// it: two sequences batched, prefill then greedy decode, in bf16, against the reference.
#[tokio::test]
async fn a_gpu_worker_process_serves_the_reference() {
    let worker = WorkerProcess::start_with(&["--device", "cuda"]);
    let mut client = pb::worker_client::WorkerClient::connect(worker.url()).await.expect("connects");
    let load = pb::LoadAssignmentRequest {
        epoch: 1,
        model_path: fixture("mistral-v1-tiny").display().to_string(),
        dtype: pb::WeightDtype::Bf16 as i32,
        kv_blocks: 64,
        block_size: 16,
        ..Default::default()
    };
    client.load_assignment(load).await.expect("loads on the GPU");
    let reference = reference("mistral-v1-tiny");
    let cases = [&reference.cases[0], &reference.cases[1]];
    let tables: [Vec<u32>; 2] = [vec![3, 4], vec![8, 0, 2]];
    let greedy = pb::Sampling { top_p: 1.0, logprobs: 0, ..Default::default() };
    let mut generated: [Vec<u32>; 2] = Default::default();
    let mut worst = 0f32;
    let steps = cases[0].greedy_ids.len().min(cases[1].greedy_ids.len());
    for step in 0..steps {
        let sequences = (0..2)
            .map(|i| {
                let (tokens, start_pos) = match generated[i].last() {
                    None => (cases[i].prompt_ids.clone(), 0),
                    Some(&t) => (vec![t], (cases[i].prompt_ids.len() + step - 1) as u32),
                };
                pb::SequenceStep {
                    seq_id: i as u64,
                    tokens,
                    start_pos,
                    block_table: tables[i].clone(),
                    sampling: Some(greedy.clone()),
                    prompt_logprobs: None,
                    keep_history: None,
                    embed: 0,
                    history: vec![],
                    grammar: None,
                }
            })
            .collect();
        let resp = client.step(pb::StepRequest { epoch: 1, sequences, released: vec![] }).await.expect("step").into_inner();
        for (i, r) in resp.results.iter().enumerate() {
            let s = r.sampled.as_ref().expect("sampled");
            generated[i].push(s.token_id);
            worst = worst.max((s.logprob - cases[i].greedy_logprobs[step]).abs());
        }
    }
    for i in 0..2 {
        assert_eq!(generated[i], cases[i].greedy_ids[..steps], "sequence {i}: greedy ids");
    }
    eprintln!("gpu worker process (bf16): greedy ids identical, worst logprob error {worst:.2e}");
    assert!(worst <= 2e-2, "logprob error {worst}");
}
