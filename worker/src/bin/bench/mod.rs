//! Timed decode and prefill through a [`worker::Generator`], the peer-script runner and the
//! table cells, shared by the benchmark binaries.

use std::process::Command;
use std::time::Instant;

use worker::backend::Backend;
use worker::error::{EngineError, Result};
use worker::generator::Generator;
use worker::sampling::{SamplingParams, splitmix64};
use worker::scheduler::{Event, SeqRequest};

/// Decode tokens/s of `batch` sequences with random `prompt_len`-token prompts: prefill (in
/// as many steps as the scheduler's token budget takes) and one warm-up step untimed, then `steps` greedy steps timed (tokens summed over the batch).
pub fn decode_tokens_per_s<B: Backend>(g: &mut Generator<B>, batch: usize, prompt_len: usize, steps: usize) -> Result<f64> {
    constrained_decode_tokens_per_s(g, batch, prompt_len, steps, None)
}

/// [`decode_tokens_per_s`] with every sequence's output held to `grammar` (llguidance's,
/// serialized), which must allow `steps + 2` tokens.
pub fn constrained_decode_tokens_per_s<B: Backend>(
    g: &mut Generator<B>,
    batch: usize,
    prompt_len: usize,
    steps: usize,
    grammar: Option<std::sync::Arc<str>>,
) -> Result<f64> {
    let vocab = g.engine.config().vocab_size as u64;
    let mut state = 0x5EED + batch as u64;
    for i in 0..batch {
        let prompt = (0..prompt_len).map(|_| (splitmix64(&mut state) % (vocab - 3) + 3) as u32).collect();
        let params = SamplingParams { max_tokens: steps + 2, grammar: grammar.clone(), prompt_len, ..SamplingParams::default() };
        g.add(SeqRequest { id: i as u64, prompt, params, cache_salt: None })?;
    }
    let mut prefilled = 0;
    while prefilled < batch && g.has_work() {
        prefilled += g.step()?.iter().filter(|e| matches!(e, Event::Token { .. })).count();
    }
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

/// The flags every peer script takes: the model's shape, the batch sizes and the timed steps.
pub fn peer_shape_args(c: &worker::ModelConfig, batches: &[usize], steps: usize) -> Vec<String> {
    let batches = batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(",");
    [
        ("--hidden", c.hidden_size.to_string()),
        ("--heads", c.num_attention_heads.to_string()),
        ("--kv-heads", c.num_key_value_heads.to_string()),
        ("--intermediate", c.intermediate_size.to_string()),
        ("--layers", c.num_hidden_layers.to_string()),
        ("--vocab", c.vocab_size.to_string()),
        ("--batches", batches),
        ("--steps", steps.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_owned(), value])
    .collect()
}

/// A peer's tok/s at `batch` in a peer script's JSON (`{"name": {"batch": tok_s}}`), if it
/// reported a number.
pub fn peer_tok_s(peers: &serde_json::Value, name: &str, batch: usize) -> Option<f64> {
    peers.get(name).and_then(|p| p.get(batch.to_string())).and_then(|v| v.as_f64())
}

/// A tok/s table cell: one decimal, or a dash when there is no number.
pub fn tok_s_cell(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.1}"))
}

/// A "vs peer" table cell: `ours / peer` as `1.23×`, or a dash when the peer has no number.
pub fn ratio_cell(ours: f64, peer: Option<f64>) -> String {
    peer.map_or("–".to_owned(), |v| format!("{:.2}×", ours / v))
}

/// Runs a peer benchmark script and returns the JSON object its last stdout line holds, or
/// `{"error": ...}` when it could not start or printed none (stderr passes through).
pub fn peer_json(command: &mut Command) -> serde_json::Value {
    match command.stderr(std::process::Stdio::inherit()).output() {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.lines().last().unwrap_or_default();
            serde_json::from_str(last).unwrap_or_else(|e| serde_json::json!({"error": format!("the peer printed no JSON ({e}): {last}")}))
        }
        Err(e) => serde_json::json!({"error": format!("starting the peer script: {e}")}),
    }
}

/// Tokens/s of one `len`-token prompt's prefill (until its first token: one step, or as many
/// as the scheduler's token budget takes), best of `rounds`.
pub fn prefill_tokens_per_s<B: Backend>(g: &mut Generator<B>, len: usize, rounds: usize) -> Result<f64> {
    let mut best = f64::INFINITY;
    for round in 0..rounds.max(1) {
        let prompt: Vec<u32> = (0..len).map(|t| (3 + (t * 7 + round) % 1000) as u32).collect();
        let params = SamplingParams { max_tokens: 1, ..SamplingParams::default() };
        g.add(SeqRequest { id: (1 << 40) + round as u64, prompt, params, cache_salt: None })?;
        let started = Instant::now();
        while g.has_work() && !g.step()?.iter().any(|e| matches!(e, Event::Token { .. })) {}
        best = best.min(started.elapsed().as_secs_f64());
        g.run_to_completion()?;
    }
    Ok(len as f64 / best)
}
