//! Fidelity of weights kept in less than their checkpoint's precision, stated: for every
//! fixture, int8 and FP8 quantized at load (and f32/f16 weights rounded to bf16) against the
//! transformers reference of the checkpoint as stored. The bounds are what these fixtures
//! measured, with the margin written next to each.

use std::path::PathBuf;

use serde::Deserialize;
use worker::{Cpu, DType, Engine, EngineOptions, Generator, Quantization, SamplingParams, SeqRequest, WeightDType};

const FIXTURES: [&str; 4] = ["mistral-v1-tiny", "mixtral-v3-tiny", "mistral-nemo-tiny", "mixtral-f32-tiny"];

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    prompt_logprobs: Vec<Option<f32>>,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
}

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// What one precision measured on one fixture.
#[derive(Debug, Default)]
struct Fidelity {
    /// Max |logprob − reference| over every prompt position and the greedy steps before the
    /// first token that differs.
    max_logprob_error: f32,
    /// Greedy steps equal to the reference's before the first difference, and in all.
    agreeing: usize,
    steps: usize,
}

fn measure(name: &str, dtype: WeightDType, quantization: Quantization) -> Fidelity {
    let text = std::fs::read_to_string(fixture_dir(name).join("reference.json")).expect("reference.json");
    let reference: Reference = serde_json::from_str(&text).expect("parses");
    let options = EngineOptions { dtype, quantization, ..EngineOptions::default() };
    let engine = Engine::load(Cpu, &fixture_dir(name), &options).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut g = Generator::new(engine, 16);
    for (i, case) in reference.cases.iter().enumerate() {
        let params = SamplingParams { max_tokens: case.greedy_ids.len(), logprobs: Some(0), prompt_logprobs: Some(0), ..SamplingParams::default() };
        g.add(SeqRequest { id: i as u64, prompt: case.prompt_ids.clone(), params, cache_salt: None }).expect("valid request");
    }
    let done = g.run_to_completion().expect("runs");
    assert_eq!(done.len(), reference.cases.len(), "{name}: every request completes");
    let mut f = Fidelity::default();
    for (case, c) in reference.cases.iter().zip(&done) {
        assert_eq!(c.prompt_logprobs.len(), case.prompt_ids.len() - 1, "{name}: a logprob per prompt token after the first");
        assert_eq!(c.tokens.len(), case.greedy_ids.len(), "{name}: every greedy step");
        assert_eq!(c.logprobs.len(), c.tokens.len(), "{name}: a logprob per generated token");
        for (ours, want) in c.prompt_logprobs.iter().zip(&case.prompt_logprobs[1..]) {
            f.max_logprob_error = f.max_logprob_error.max((ours.logprob - want.expect("logprob")).abs());
        }
        let agreeing = c.tokens.iter().zip(&case.greedy_ids).take_while(|(a, b)| a == b).count();
        for (ours, want) in c.logprobs.iter().zip(&case.greedy_logprobs).take(agreeing) {
            f.max_logprob_error = f.max_logprob_error.max((ours.logprob - want).abs());
        }
        f.agreeing += agreeing;
        f.steps += case.greedy_ids.len();
    }
    f
}

/// Measures every fixture at one precision, prints the table rows, and checks the bounds.
fn check(label: &str, dtype: WeightDType, quantization: Quantization, max_error: f32, min_agreement: f64) {
    for name in FIXTURES {
        let f = measure(name, dtype, quantization);
        let agreement = f.agreeing as f64 / f.steps as f64;
        eprintln!("{label:>5} {name:<18} max |Δlogprob| {:.2e}, greedy agreement {}/{} ({:.0} %)", f.max_logprob_error, f.agreeing, f.steps, 100.0 * agreement);
        assert!(f.max_logprob_error <= max_error, "{label} {name}: max |Δlogprob| {} > {max_error}", f.max_logprob_error);
        assert!(agreement >= min_agreement, "{label} {name}: greedy agreement {agreement:.3} < {min_agreement}");
    }
}

#[test]
fn int8_weights_stay_close_to_the_reference() {
    check("int8", WeightDType::Auto, Quantization::Int8, INT8_MAX_ERROR, INT8_MIN_AGREEMENT);
}

#[test]
fn fp8_weights_stay_close_to_the_reference() {
    check("fp8", WeightDType::Auto, Quantization::Fp8, FP8_MAX_ERROR, FP8_MIN_AGREEMENT);
}

#[test]
fn weights_rounded_to_bf16_stay_close_to_the_reference() {
    check("bf16", WeightDType::As(DType::BF16), Quantization::None, BF16_MAX_ERROR, BF16_MIN_AGREEMENT);
}

// Measured on these fixtures (`cargo test -p worker --test quantized -- --nocapture`):
//   int8  max |Δlogprob| 0.12–0.32, greedy agreement 42–71 %
//   fp8   max |Δlogprob| 0.48–0.96, greedy agreement  8–71 %
//   bf16  max |Δlogprob| 2e-6 (bf16 checkpoints: nothing to round) to 0.12 (f16/f32 ones), agreement 77–100 %
// The fixtures are tiny random models (hidden 32–64) whose logits turn on small margins
// (greedy gaps from 1e-3), so a rounding anywhere moves them far more than it moves a
// trained model; the bounds are the worst measured plus 25 % (the numbers are
// deterministic: a change in quantization or kernels that moves them past that is a
// change to look at), and agreement at least the worst measured minus a few steps.
const INT8_MAX_ERROR: f32 = 0.4;
const INT8_MIN_AGREEMENT: f64 = 0.35;
const FP8_MAX_ERROR: f32 = 1.2;
const FP8_MIN_AGREEMENT: f64 = 0.05;
const BF16_MAX_ERROR: f32 = 0.15;
const BF16_MIN_AGREEMENT: f64 = 0.7;
