//! Timed decode and prefill through a [`Generator`], shared by the benchmark binaries.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::{EngineError, Result};
use crate::generator::{Generator, Request};
use crate::sampling::{SamplingParams, splitmix64};

/// Decode tokens/s of `batch` sequences with random `prompt_len`-token prompts: prefill and
/// one warm-up step untimed, then `steps` greedy steps timed (tokens summed over the batch).
pub fn decode_tokens_per_s<B: Backend>(g: &mut Generator<B>, batch: usize, prompt_len: usize, steps: usize) -> Result<f64> {
    let vocab = g.engine.config().vocab_size as u64;
    let mut state = 0x5EED + batch as u64;
    for i in 0..batch {
        let prompt = (0..prompt_len).map(|_| (splitmix64(&mut state) % (vocab - 3) + 3) as u32).collect();
        let params = SamplingParams { max_tokens: steps + 2, ..SamplingParams::default() };
        g.add(Request { id: i as u64, prompt, params })?;
    }
    g.step()?; // prefill
    g.step()?; // warm-up decode
    if g.num_running() != batch {
        return Err(EngineError::Backend(format!("only {} of {batch} sequences running (too few KV blocks?)", g.num_running())));
    }
    let started = Instant::now();
    for _ in 0..steps {
        g.step()?;
    }
    let secs = started.elapsed().as_secs_f64();
    g.run_to_completion()?;
    Ok((batch * steps) as f64 / secs)
}

/// Tokens/s of one `len`-token prompt's prefill (a single step), best of `rounds`.
pub fn prefill_tokens_per_s<B: Backend>(g: &mut Generator<B>, len: usize, rounds: usize) -> Result<f64> {
    let mut best = f64::INFINITY;
    for round in 0..rounds.max(1) {
        let prompt: Vec<u32> = (0..len).map(|t| (3 + (t * 7 + round) % 1000) as u32).collect();
        let params = SamplingParams { max_tokens: 1, ..SamplingParams::default() };
        g.add(Request { id: (1 << 40) + round as u64, prompt, params })?;
        let started = Instant::now();
        g.step()?;
        best = best.min(started.elapsed().as_secs_f64());
        g.run_to_completion()?;
    }
    Ok(len as f64 / best)
}
