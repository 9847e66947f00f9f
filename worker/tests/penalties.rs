//! Penalties, logit bias and min_tokens on the engine: greedy continuations under them equal
//! the reference's (tests/fixtures/generate_penalties.py: transformers' logits, its repetition
//! processor, OpenAI's presence and frequency formula), and a sequence recomputed after a
//! preemption — as after a move to another replica, its output so far re-fed as prompt —
//! continues exactly as it would have.

use std::path::PathBuf;

use worker::sampling::Penalties;
use worker::{CacheConfig, Completion, Cpu, Engine, EngineOptions, Generator, SamplingParams, SeqRequest};

fn engine(num_blocks: usize) -> Engine<Cpu> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mistral-nemo-tiny");
    let options = EngineOptions { cache: CacheConfig { num_blocks, block_size: 4 }, ..EngineOptions::default() };
    Engine::load(Cpu, &dir, &options).expect("loads")
}

/// Prompts of 8 token ids.
fn prompts() -> Vec<Vec<u32>> {
    (0..3u32).map(|i| (0..8).map(|j| 300 + 97 * i + 13 * j).collect()).collect()
}

fn penalized(prompt_len: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: 24,
        penalties: Penalties { presence: 0.7, frequency: 0.4, repetition: 1.4 },
        logit_bias: vec![(5, 2.0)],
        prompt_len,
        ..SamplingParams::default()
    }
}

/// Every request run to the end on `g`; the completions by id.
fn run(mut g: Generator<Cpu>, requests: Vec<SeqRequest>) -> Vec<Completion> {
    for r in requests {
        g.add(r).expect("queued");
    }
    while g.has_work() {
        g.step().expect("step");
    }
    let mut done = g.take_finished();
    done.sort_by_key(|c| c.id);
    done
}

fn requests(params: impl Fn(usize) -> SamplingParams) -> Vec<SeqRequest> {
    prompts().into_iter().enumerate().map(|(i, prompt)| SeqRequest { id: i as u64, params: params(prompt.len()), prompt, cache_salt: None }).collect()
}

fn repeats(tokens: &[u32]) -> usize {
    tokens.len() - tokens.iter().collect::<std::collections::HashSet<_>>().len()
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    settings: Settings,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Settings {
    presence: f32,
    frequency: f32,
    repetition: f32,
    logit_bias: Vec<(u32, f32)>,
}

#[test]
fn penalized_greedy_continuations_match_the_reference() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mistral-nemo-tiny/penalties.json");
    let reference: Reference = serde_json::from_str(&std::fs::read_to_string(dir).expect("penalties.json")).expect("parses");
    assert_eq!(reference.cases.len(), 9);
    let requests = reference
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let Settings { presence, frequency, repetition, ref logit_bias } = c.settings;
            let params = SamplingParams {
                max_tokens: c.greedy_ids.len(),
                logprobs: Some(0),
                penalties: Penalties { presence, frequency, repetition },
                logit_bias: logit_bias.clone(),
                prompt_len: c.prompt_ids.len(),
                ..SamplingParams::default()
            };
            SeqRequest { id: i as u64, prompt: c.prompt_ids.clone(), params, cache_salt: None }
        })
        .collect();
    // All at once, in one batch: each continuation as the reference computed it alone.
    let done = run(Generator::new(engine(256), 16), requests);
    for (c, d) in reference.cases.iter().zip(&done) {
        assert_eq!(d.tokens, c.greedy_ids, "case {}", d.id);
        assert_eq!(d.logprobs.len(), c.greedy_logprobs.len());
        for (ours, theirs) in d.logprobs.iter().zip(&c.greedy_logprobs) {
            assert!((ours.logprob - theirs).abs() <= 2e-3, "case {}: logprob {} vs {theirs}", d.id, ours.logprob);
        }
    }
}

#[test]
fn penalties_change_the_tokens_and_repeat_less() {
    let plain = run(Generator::new(engine(256), 16), requests(|_| SamplingParams { max_tokens: 24, ..SamplingParams::default() }));
    let penalized = run(Generator::new(engine(256), 16), requests(penalized));
    assert_eq!(plain.len(), 3);
    for (p, q) in plain.iter().zip(&penalized) {
        assert_eq!((p.tokens.len(), q.tokens.len()), (24, 24));
        assert_ne!(p.tokens, q.tokens, "request {}: the penalties change nothing", p.id);
    }
    let (before, after): (usize, usize) = (plain.iter().map(|c| repeats(&c.tokens)).sum(), penalized.iter().map(|c| repeats(&c.tokens)).sum());
    assert!(after < before, "penalized output repeats {after} times, unpenalized {before}");
}

#[test]
fn a_recomputed_sequence_keeps_its_penalties() {
    let roomy = run(Generator::new(engine(256), 16), requests(penalized));
    // 3 sequences of 8 + 24 tokens need 24 blocks of 4: with 14, the newest is preempted and
    // recomputed from its prompt and output (the output counted as output again).
    let tight = run(Generator::new(engine(14), 16), requests(penalized));
    for (a, b) in roomy.iter().zip(&tight) {
        assert_eq!(a.tokens, b.tokens, "request {}", a.id);
    }
    // The same request arriving with its first 10 tokens already in its prompt (as a moved
    // request does, its `prompt_len` still the client's prompt) continues them exactly.
    let first = &roomy[0];
    let mut prompt = prompts()[0].clone();
    prompt.extend(&first.tokens[..10]);
    let moved = SeqRequest { id: 9, prompt, params: SamplingParams { max_tokens: 14, ..penalized(8) }, cache_salt: None };
    let rest = run(Generator::new(engine(256), 16), vec![moved]);
    assert_eq!(rest[0].tokens, first.tokens[10..]);
}

#[test]
fn min_tokens_holds_off_the_stop_tokens() {
    // A bias that makes EOS (2) the choice at once; min_tokens delays it.
    let eos = |min_tokens| SamplingParams {
        max_tokens: 8,
        stop_token_ids: vec![2],
        logit_bias: vec![(2, 100.0)],
        min_tokens,
        prompt_len: 8,
        ..SamplingParams::default()
    };
    let done = run(Generator::new(engine(256), 16), vec![SeqRequest { id: 0, prompt: prompts()[0].clone(), params: eos(0), cache_salt: None }]);
    assert_eq!(done[0].tokens, vec![2]);
    let done = run(Generator::new(engine(256), 16), vec![SeqRequest { id: 0, prompt: prompts()[0].clone(), params: eos(3), cache_salt: None }]);
    assert_eq!(done[0].tokens.len(), 4);
    assert!(!done[0].tokens[..3].contains(&2) && done[0].tokens[3] == 2, "{:?}", done[0].tokens);
}
