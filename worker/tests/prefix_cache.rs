//! Prefix caching on the engine: requests that start on cached KV blocks produce exactly the
//! tokens and logprobs they produce with every prompt prefilled in full — greedy, seeded
//! sampling and penalties alike, on a dense model with a sliding window and on a Mixtral —,
//! identical prompts prefill once, and a cache too small for every prefix evicts without
//! losing a request; every block reference returns when the requests end.

use std::path::PathBuf;

use worker::sampling::Penalties;
use worker::{CacheConfig, Completion, Cpu, Engine, EngineOptions, Generator, SamplingParams, SeqRequest};

const MODELS: [&str; 2] = ["mistral-v1-tiny", "mixtral-f32-tiny"];

fn engine(model: &str, num_blocks: usize) -> Engine<Cpu> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(model);
    let options = EngineOptions { cache: CacheConfig { num_blocks, block_size: 4 }, ..EngineOptions::default() };
    Engine::load(Cpu, &dir, &options).expect("loads")
}

/// A 30-token prefix shared by every prompt (a system prompt), then each request's own turn.
fn prompt(turn: u32) -> Vec<u32> {
    (0..30u32).map(|j| 3 + 13 * j).chain((0..5).map(|j| 420 + 11 * turn + j)).collect()
}

/// Greedy, seeded sampling and penalized requests over the shared prefix; ids from `first`.
fn requests(first: u64) -> Vec<SeqRequest> {
    let greedy = |p: &Vec<u32>| SamplingParams { max_tokens: 10, logprobs: Some(3), prompt_len: p.len(), ..SamplingParams::default() };
    (0..6u32)
        .map(|i| {
            let p = prompt(i % 3);
            let params = match i {
                0 | 3 => greedy(&p),
                1 | 4 => SamplingParams { temperature: 0.9, seed: 7 + u64::from(i), ..greedy(&p) },
                _ => SamplingParams { penalties: Penalties { presence: 0.5, frequency: 0.3, repetition: 1.3 }, ..greedy(&p) },
            };
            SeqRequest { id: first + u64::from(i), prompt: p, params, cache_salt: None }
        })
        .collect()
}

/// Runs `requests` to the end, `at_once` of them queued at a time.
fn run(g: &mut Generator<Cpu>, requests: Vec<SeqRequest>, at_once: usize) -> Vec<Completion> {
    let mut done = Vec::new();
    for batch in requests.chunks(at_once) {
        for r in batch {
            g.add(r.clone()).expect("queued");
        }
        while g.has_work() {
            g.step().expect("step");
        }
        done.extend(g.take_finished());
    }
    done.sort_by_key(|c| c.id);
    done
}

fn outputs(done: &[Completion]) -> Vec<(Vec<u32>, Vec<f32>)> {
    done.iter().map(|c| (c.tokens.clone(), c.logprobs.iter().map(|t| t.logprob).collect())).collect()
}

#[test]
fn cache_hits_change_no_token_and_no_logprob() {
    for model in MODELS {
        let mut plain = Generator::with_prefix_caching(engine(model, 256), 8, false);
        let expected = outputs(&run(&mut plain, requests(0), 1));
        assert_eq!(plain.prefix_stats().hits, 0);

        let mut cached = Generator::new(engine(model, 256), 8);
        // One at a time: each request after the first starts on the blocks of those before.
        assert_eq!(outputs(&run(&mut cached, requests(0), 1)), expected, "{model}: one at a time");
        let after_first_round = cached.prefix_stats();
        assert!(after_first_round.hits >= 5 * 28, "{model}: every request after the first reuses the prefix: {after_first_round:?}");
        // All at once, every prompt cached now (identical prompts too).
        assert_eq!(outputs(&run(&mut cached, requests(100), 6)), expected, "{model}: all at once");
        let hits = cached.prefix_stats().hits - after_first_round.hits;
        assert_eq!(hits, 6 * 32, "{model}: each prompt's 8 full blocks but the last token's (35 tokens, blocks of 4)");
        assert_eq!(cached.used_blocks(), 0, "{model}: every block reference returned");
    }
}

#[test]
fn identical_prompts_queued_together_prefill_once() {
    let model = MODELS[0];
    let same: Vec<SeqRequest> =
        requests(0).into_iter().map(|r| SeqRequest { prompt: prompt(0), params: SamplingParams { prompt_len: 35, ..r.params }, ..r }).collect();
    let expected = outputs(&run(&mut Generator::with_prefix_caching(engine(model, 256), 8, false), same.clone(), 1));
    let mut g = Generator::new(engine(model, 256), 8);
    assert_eq!(outputs(&run(&mut g, same, 6)), expected);
    // The first prefilled 35 tokens; the five others waited for its blocks and found 32.
    assert_eq!(g.prefix_stats().hits, 5 * 32);
    assert_eq!(g.used_blocks(), 0);
}

#[test]
fn a_cache_too_small_for_every_prefix_evicts_and_loses_nothing() {
    for model in MODELS {
        let all: Vec<SeqRequest> = (0..4).flat_map(|round| requests(round * 10)).collect();
        let expected = outputs(&run(&mut Generator::with_prefix_caching(engine(model, 256), 8, false), all.clone(), all.len()));
        // 24 blocks of 4: two sequences of 45 tokens at a time, evicting and preempting.
        let mut g = Generator::new(engine(model, 24), 8);
        let done = run(&mut g, all.clone(), all.len());
        assert_eq!(done.len(), all.len(), "{model}: every request finished");
        assert_eq!(outputs(&done), expected, "{model}");
        assert_eq!(g.used_blocks(), 0, "{model}");
    }
}
