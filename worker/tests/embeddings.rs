//! Embeddings from the engine against transformers: a `MistralModel` checkpoint (no lm_head,
//! tensors without the `model.` prefix; tests/fixtures/generate_embed.py) pooled `last` and
//! `mean` and L2-normalised, within 1e-4 cosine of `MistralModel`'s last hidden state pooled
//! the same way — alone and in one batch, `last` also over prompt chunks.

use std::path::PathBuf;

use worker::embedding::Pooling;
use worker::{BadRequest, Cpu, Engine, EngineError, EngineOptions, SamplingParams, SeqStep};

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    last: Vec<f32>,
    mean: Vec<f32>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mistral-embed-tiny")
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).expect("reference.json")).expect("parses")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "embedding widths");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Blocks `[i * 8, i * 8 + 8)` for sequence `i`: room for 8 * 16 tokens each.
fn blocks(i: usize) -> Vec<u32> {
    (0..8).map(|b| (i * 8 + b) as u32).collect()
}

#[test]
fn a_mistral_model_embeds_as_transformers_does() {
    let reference = reference();
    assert_eq!(reference.cases.len(), 4);
    let mut engine = Engine::load(Cpu, &dir(), &EngineOptions::default()).expect("loads a MistralModel checkpoint");
    assert!(!engine.config().lm_head);
    let tables: Vec<Vec<u32>> = (0..2 * reference.cases.len()).map(blocks).collect();
    // Every case, both poolings, in one batch.
    let steps: Vec<SeqStep<'_>> = reference
        .cases
        .iter()
        .enumerate()
        .flat_map(|(i, c)| [Pooling::Last, Pooling::Mean].into_iter().enumerate().map(move |(j, pooling)| (2 * i + j, c, pooling)))
        .map(|(k, c, pooling)| SeqStep {
            id: k as u64,
            tokens: &c.prompt_ids,
            start_pos: 0,
            block_table: &tables[k],
            sample: None,
            prompt_logprobs: None,
            keep_history: None,
            history: &[],
            embed: Some(pooling),
            grammar: None,
        })
        .collect();
    let out = engine.step(&steps).expect("step");
    assert_eq!(out.len(), 8);
    for (i, c) in reference.cases.iter().enumerate() {
        for (j, expected) in [&c.last, &c.mean].into_iter().enumerate() {
            let ours = out[2 * i + j].embedding.as_ref().expect("an embedding");
            let cos = cosine(ours, expected);
            assert!(cos >= 1.0 - 1e-4, "case {i} pooling {j}: cosine {cos}");
        }
    }
    // `last` over two chunks: the second chunk's last row is the prompt's.
    let c = &reference.cases[3];
    let (head, tail) = c.prompt_ids.split_at(10);
    let table = blocks(0);
    let chunk = |tokens, start_pos, embed| SeqStep {
        id: 0,
        tokens,
        start_pos,
        block_table: &table,
        sample: None,
        prompt_logprobs: None,
        keep_history: None,
        history: &[],
        embed,
        grammar: None,
    };
    engine.step(&[chunk(head, 0, None)]).expect("first chunk");
    let out = engine.step(&[chunk(tail, 10, Some(Pooling::Last))]).expect("second chunk");
    assert!(cosine(out[0].embedding.as_ref().expect("embedding"), &c.last) >= 1.0 - 1e-4);
    // Mean pooling needs the whole prompt at once; a model without an lm_head samples nothing.
    let err = engine.step(&[chunk(tail, 10, Some(Pooling::Mean))]).expect_err("refused");
    assert!(matches!(err, EngineError::InvalidRequest(BadRequest::PooledChunk(0))), "{err}");
    let params = SamplingParams::default();
    let sampled = SeqStep { sample: Some(&params), embed: None, ..chunk(head, 0, None) };
    let err = engine.step(&[sampled]).expect_err("refused");
    assert!(matches!(err, EngineError::InvalidRequest(BadRequest::NoLmHead)), "{err}");
}
