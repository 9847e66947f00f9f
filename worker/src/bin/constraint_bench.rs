//! What constrained decoding costs a decode step: the mix-bench shape (dummy f32 weights, the
//! v1 tokenizer's 32,000 tokens) decoding at batch 1 and 8, free and with every sequence held
//! to a JSON schema, in alternating rounds (this machine's bandwidth drifts by minutes). Prints
//! the median tokens/s of each and the overhead per token, and what a mask costs on its own
//! (it is computed on a thread of its own while the layers run).

#[allow(dead_code)] // the peer runners are the other benchmarks'.
mod bench;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use cluster::constraint::{Constraint, Grammars};
use worker::rank::Parallel;
use worker::weights::WeightSource;
use worker::{CacheConfig, Cpu, Engine, EngineOptions, Generator, LoadFormat, ModelConfig};

#[derive(Debug, Parser)]
#[command(about = "Decode tokens/s with and without an output constraint, and a mask's cost")]
struct Args {
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Decode steps timed per measurement.
    #[arg(long, default_value_t = 24)]
    steps: usize,
    /// Rounds of (free, constrained) per batch size; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The tokenizer the grammar is compiled against (its vocabulary is the model's).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mistral-v1-tiny/tokenizer.json"))]
    tokenizer: PathBuf,
}

/// A schema whose output runs for hundreds of tokens: records with bounded strings, numbers
/// and enums, at least 200 of them.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array", "minItems": 200,
        "items": {"type": "object", "additionalProperties": false, "required": ["name", "n", "kind"],
                  "properties": {"name": {"type": "string", "maxLength": 16}, "n": {"type": "integer", "minimum": 0, "maximum": 100000},
                                 "kind": {"enum": ["wind", "rain", "sun"]}, "note": {"type": "string", "maxLength": 8}}},
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = ModelConfig::parse(worker::config::MIX_BENCH, "mix-bench".as_ref())?;
    let grammars = Grammars::for_model(&args.tokenizer, &config)?;
    let eos = config.eos_token_ids.first().copied().unwrap_or(2);
    let grammar = grammars.check(&Constraint::JsonSchema(schema()).grammar())?;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let options =
        EngineOptions { load_format: LoadFormat::Dummy, cache: CacheConfig { num_blocks: 64 * max_batch, block_size: 16 }, ..EngineOptions::default() };
    eprintln!("loading dummy weights ({} M parameters, f32)...", config.num_parameters() / 1_000_000);
    let mut engine = Engine::from_source(Cpu, &config, &WeightSource::Dummy { seed: 0 }, &options, Parallel::single())?;
    engine.set_tokenizer(args.tokenizer.clone());
    let mut g = Generator::new(engine, max_batch);

    println!("| batch | free tok/s | constrained tok/s | overhead per token |");
    println!("|---:|---:|---:|---:|");
    for &batch in &args.batches {
        let (mut free, mut held) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            free.push(bench::decode_tokens_per_s(&mut g, batch, 8, args.steps)?);
            held.push(bench::constrained_decode_tokens_per_s(&mut g, batch, 8, args.steps, Some(grammar.clone()))?);
            eprintln!("round {round}, batch {batch}: free {:.1}, constrained {:.1} tok/s", free[round], held[round]);
        }
        let (free, held) = (median(free), median(held));
        println!("| {batch} | {free:.1} | {held:.1} | {:+.1} % |", 100.0 * (free / held - 1.0));
    }

    // A mask alone: one matcher fed a valid output, timed per token.
    let mut m = grammars.matcher(&grammar)?;
    let (mut tokens, mut spent) = (0usize, 0.0f64);
    for _ in 0..400 {
        let started = Instant::now();
        let mask = m.mask()?;
        spent += started.elapsed().as_secs_f64();
        // The highest allowed id that is not EOS keeps the output going.
        let next = (0..config.vocab_size as u32).rev().find(|&t| t != eos && cluster::constraint::allows(&mask, t));
        let Some(t) = next else { break };
        m.consume(&[t])?;
        tokens += 1;
    }
    println!();
    println!("a mask on its own (JSON schema above, {tokens} tokens): {:.0} µs per token", 1e6 * spent / tokens.max(1) as f64);
    Ok(())
}
