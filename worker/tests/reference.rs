//! The engine against transformers: every fixture in tests/fixtures (made by
//! tests/fixtures/generate.py) must reproduce the reference prompt logprobs, top-5
//! alternatives and greedy continuations, alone and batched with the other prompts.

use std::path::PathBuf;

use serde::Deserialize;
use worker::{Completion, Cpu, DType, Engine, EngineOptions, Generator, SamplingParams, SeqRequest, TokenLogprobs, WeightDType};

/// Every fixture: bf16, f16 and f32 checkpoints, and two FP8 ones (weights kept FP8, the
/// reference computed from their dequantized values).
const FIXTURES: [&str; 6] = ["mistral-v1-tiny", "mixtral-v3-tiny", "mistral-nemo-tiny", "mixtral-f32-tiny", "mistral-fp8-tiny", "mixtral-fp8-tiny"];
/// Logprob tolerance against transformers in f32.
const TOL: f32 = 2e-3;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_text: Option<String>,
    prompt_ids: Vec<u32>,
    prompt_logprobs: Vec<Option<f32>>,
    prompt_top: Vec<Vec<(u32, f32)>>,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
    greedy_top: Vec<Vec<(u32, f32)>>,
}

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

fn generator(name: &str, dtype: WeightDType) -> Generator<Cpu> {
    let options = EngineOptions { dtype, ..EngineOptions::default() };
    let engine = Engine::load(Cpu, &fixture_dir(name), &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    Generator::new(engine, 16)
}

fn request(id: u64, case: &Case) -> SeqRequest {
    let params = SamplingParams { max_tokens: case.greedy_ids.len(), logprobs: Some(8), prompt_logprobs: Some(8), ..SamplingParams::default() };
    SeqRequest { id, prompt: case.prompt_ids.clone(), params, cache_salt: None }
}

/// Every reference alternative must be among ours with a logprob within `tol`.
fn assert_top(what: &str, ours: &TokenLogprobs, reference: &[(u32, f32)], tol: f32) {
    assert_eq!(ours.top[0].0, reference[0].0, "{what}: most likely token");
    for &(id, lp) in reference {
        let found = ours.top.iter().find(|t| t.0 == id).unwrap_or_else(|| panic!("{what}: token {id} not in our top 8"));
        assert!((found.1 - lp).abs() <= tol, "{what}: token {id} logprob {} vs reference {lp}", found.1);
    }
}

fn check_case(name: &str, i: usize, case: &Case, done: &Completion, tol: f32) -> f32 {
    let mut worst = 0f32;
    assert_eq!(done.tokens, case.greedy_ids, "{name} case {i}: greedy ids");
    assert_eq!(done.prompt_logprobs.len(), case.prompt_ids.len() - 1, "{name} case {i}: a logprob for every prompt token but the first");
    assert_eq!(done.logprobs.len(), case.greedy_logprobs.len(), "{name} case {i}: a logprob for every generated token");
    for (p, ours) in done.prompt_logprobs.iter().enumerate() {
        let want = case.prompt_logprobs[p + 1].expect("logprob after the first token");
        assert_eq!(ours.token, case.prompt_ids[p + 1]);
        worst = worst.max((ours.logprob - want).abs());
        assert_top(&format!("{name} case {i} prompt position {p}"), ours, &case.prompt_top[p], tol);
    }
    for (s, ours) in done.logprobs.iter().enumerate() {
        worst = worst.max((ours.logprob - case.greedy_logprobs[s]).abs());
        assert_top(&format!("{name} case {i} greedy step {s}"), ours, &case.greedy_top[s], tol);
    }
    assert!(worst <= tol, "{name} case {i}: logprob error {worst} > {tol}");
    worst
}

#[test]
fn every_fixture_matches_transformers_one_request_at_a_time() {
    for name in FIXTURES {
        let reference = reference(name);
        let mut g = generator(name, WeightDType::Auto);
        let mut worst = 0f32;
        for (i, case) in reference.cases.iter().enumerate() {
            g.add(request(i as u64, case)).expect("valid request");
            let done = g.run_to_completion().expect("runs");
            worst = worst.max(check_case(name, i, case, &done[0], TOL));
        }
        eprintln!("{name}: max |logprob - transformers| = {worst:.2e}");
    }
}

#[test]
fn a_mixed_length_batch_equals_one_at_a_time() {
    for name in FIXTURES {
        let reference = reference(name);
        let mut alone = Vec::new();
        for (i, case) in reference.cases.iter().enumerate() {
            let mut g = generator(name, WeightDType::Auto);
            g.add(request(i as u64, case)).expect("valid request");
            alone.extend(g.run_to_completion().expect("runs"));
        }
        let mut g = generator(name, WeightDType::Auto);
        for (i, case) in reference.cases.iter().enumerate() {
            g.add(request(i as u64, case)).expect("valid request");
        }
        g.step().expect("first step");
        assert_eq!(g.num_running(), reference.cases.len(), "all prompts share the batch");
        let batched = g.run_to_completion().expect("runs");
        assert_eq!((alone.len(), batched.len()), (reference.cases.len(), reference.cases.len()), "{name}: every request completes");
        for (a, b) in alone.iter().zip(&batched) {
            assert_eq!(a.tokens, b.tokens, "{name} request {}", a.id);
            assert_eq!((a.logprobs.len(), a.prompt_logprobs.len()), (b.logprobs.len(), b.prompt_logprobs.len()), "{name} request {}", a.id);
            for (x, y) in a.logprobs.iter().chain(&a.prompt_logprobs).zip(b.logprobs.iter().chain(&b.prompt_logprobs)) {
                assert!((x.logprob - y.logprob).abs() < 1e-4, "{name} request {}: {} vs {}", a.id, x.logprob, y.logprob);
            }
        }
        for (i, (case, done)) in reference.cases.iter().zip(&batched).enumerate() {
            check_case(name, i, case, done, TOL);
        }
    }
}

/// Weights kept as stored (bf16, f16, FP8) widen to f32 exactly inside the product kernel,
/// so every logprob has the bits it has with the weights converted to f32 at load.
#[test]
fn weights_kept_as_stored_give_the_bits_of_their_f32_copy() {
    for name in FIXTURES {
        let reference = reference(name);
        let run = |dtype| {
            let mut g = generator(name, dtype);
            for (i, case) in reference.cases.iter().enumerate() {
                g.add(request(i as u64, case)).expect("valid request");
            }
            g.run_to_completion().expect("runs")
        };
        let (kept, widened) = (run(WeightDType::Auto), run(WeightDType::As(DType::F32)));
        assert_eq!(kept.len(), reference.cases.len(), "{name}: every request completes");
        assert_eq!(kept.len(), widened.len());
        for (a, b) in kept.iter().zip(&widened) {
            assert_eq!(a.tokens, b.tokens, "{name} request {}", a.id);
            let bits = |c: &Completion| c.prompt_logprobs.iter().chain(&c.logprobs).map(|t| (t.token, t.logprob.to_bits())).collect::<Vec<_>>();
            assert!(!bits(a).is_empty(), "{name}: logprobs to compare");
            assert_eq!(bits(a), bits(b), "{name} request {}", a.id);
        }
    }
}

#[test]
fn tokenizers_encode_the_text_prompts_like_transformers() {
    for name in ["mistral-v1-tiny", "mixtral-v3-tiny"] {
        let tok = worker::Tokenizer::from_file(&fixture_dir(name).join("tokenizer.json")).expect("tokenizer");
        let reference = reference(name);
        let mut texts = 0;
        for case in &reference.cases {
            let Some(text) = &case.prompt_text else { continue };
            texts += 1;
            assert_eq!(tok.encode(text, true).expect("encodes"), case.prompt_ids, "{name}: {text}");
            // Incremental decoding of prompt + continuation reproduces the full decode.
            let all: Vec<u32> = case.prompt_ids.iter().chain(&case.greedy_ids).copied().collect();
            for skip_special_tokens in [false, true] {
                let mut dec = worker::IncrementalDecoder::new(&[], skip_special_tokens);
                let mut text_out = String::new();
                for &id in &all {
                    text_out.push_str(&dec.push(&tok, id).expect("decodes"));
                }
                text_out.push_str(&dec.flush(&tok).expect("flushes"));
                assert_eq!(text_out, tok.decode(&all, skip_special_tokens).expect("decodes"), "{name}");
            }
            // The prompt starts with BOS: its text is there only when special tokens are kept.
            assert_ne!(tok.decode(&all, false).expect("decodes"), tok.decode(&all, true).expect("decodes"), "{name}");
        }
        assert_eq!(texts, 2, "{name} has two text prompts");
    }
}

#[test]
fn chunked_prefill_equals_whole_prefill() {
    for name in FIXTURES {
        let reference = reference(name);
        let case = reference.cases.iter().max_by_key(|c| c.prompt_ids.len()).expect("cases");
        let mut engine = Engine::load(Cpu, &fixture_dir(name), &EngineOptions::default()).expect("loads");
        let blocks: Vec<u32> = vec![3, 1, 4, 0, 2]; // any physical blocks, in any order
        let params = SamplingParams { logprobs: Some(8), ..SamplingParams::default() };
        let mut sampled = None;
        let mut pos = 0;
        for chunk in case.prompt_ids.chunks(7) {
            let last = pos + chunk.len() == case.prompt_ids.len();
            let step = worker::SeqStep {
                id: 0,
                tokens: chunk,
                start_pos: pos,
                block_table: &blocks,
                sample: last.then_some(&params),
                prompt_logprobs: None,
                keep_history: None,
                history: &[],
                embed: None,
                grammar: None,
            };
            sampled = engine.step(&[step]).expect("step").remove(0).sampled;
            pos += chunk.len();
        }
        let sampled = sampled.expect("sampled after the last chunk");
        assert_eq!(sampled.token, case.greedy_ids[0], "{name}");
        assert!((sampled.logprob - case.greedy_logprobs[0]).abs() <= TOL, "{name}");
        assert_top(name, &sampled, &case.greedy_top[0], TOL);
    }
}
