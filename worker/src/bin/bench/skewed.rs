//! A Mixtral checkpoint whose routers favour experts 0 and 1 in every layer (shard-bench's
//! `--skewed-router`): random bf16 weights as the dummy loader makes them (uniform in
//! ±1/√fan_in, embeddings in ±1, norms 1), except that every embedding carries one shared
//! direction `d` (a ±1 pattern) and the router rows of experts 0 and 1 point along it, so
//! their logits rise by about `strength` × 0.87 (the other logits' spread is about 0.58)
//! wherever the residual stream still carries `d`. The load the ranks then report, not
//! this arithmetic, is what the benchmark shows.

use std::path::Path;

use anyhow::Context;
use rayon::prelude::*;
use safetensors::{Dtype, tensor::TensorView};
use worker::ModelConfig;
use worker::sampling::splitmix64;

/// Experts the routers favour.
pub const HOT: [usize; 2] = [0, 1];

/// SplitMix64 of one value.
fn mix(x: u64) -> u64 {
    splitmix64(&mut { x })
}

/// A uniform number in [-1, 1) from (key, index).
fn uniform(key: u64, i: u64) -> f32 {
    let bits = mix(key ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    ((bits >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

/// Element `i` of `d`: ±1.
fn direction(i: usize) -> f32 {
    if mix(0xD1EC_7104 ^ i as u64) & 1 == 0 { 1.0 } else { -1.0 }
}

/// A `rows` × `cols` tensor in bf16 bytes: element (r, c) is `f(r, c)`.
fn tensor(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32 + Sync) -> Vec<u8> {
    let mut out = vec![0u8; rows * cols * 2];
    out.par_chunks_mut(cols * 2).enumerate().for_each(|(r, row)| {
        for (c, b) in row.chunks_exact_mut(2).enumerate() {
            b.copy_from_slice(&half::bf16::from_f32(f(r, c)).to_le_bytes());
        }
    });
    out
}

/// Writes `config_json` (a Mixtral) and its skewed checkpoint into `dir`.
pub fn write(dir: &Path, config_json: &str, strength: f32) -> anyhow::Result<()> {
    let c = ModelConfig::parse(config_json, dir).context("the config parses")?;
    anyhow::ensure!(c.architecture == worker::Architecture::Mixtral, "--skewed-router needs a Mixtral config");
    let (h, i, e, v) = (c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut key = 0u64;
    let mut random = |name: String, rows: usize, cols: usize, scale: f32, extra: &(dyn Fn(usize, usize) -> f32 + Sync)| {
        key += 1;
        let k = mix(key);
        let data = tensor(rows, cols, |r, col| uniform(k, (r * cols + col) as u64) * scale + extra(r, col));
        tensors.push((name, vec![rows, cols], data));
    };
    let none = |_: usize, _: usize| 0.0;
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    random("model.embed_tokens.weight".into(), v, h, 1.0, &|_, col| direction(col));
    random("lm_head.weight".into(), v, h, fan(h), &none);
    let router = |r: usize, col: usize| if HOT.contains(&r) { strength * direction(col) / h as f32 } else { 0.0 };
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        random(format!("{p}.self_attn.q_proj.weight"), q, h, fan(h), &none);
        random(format!("{p}.self_attn.k_proj.weight"), kv, h, fan(h), &none);
        random(format!("{p}.self_attn.v_proj.weight"), kv, h, fan(h), &none);
        random(format!("{p}.self_attn.o_proj.weight"), h, q, fan(q), &none);
        random(format!("{p}.block_sparse_moe.gate.weight"), e, h, fan(h), &router);
        for x in 0..e {
            random(format!("{p}.block_sparse_moe.experts.{x}.w1.weight"), i, h, fan(h), &none);
            random(format!("{p}.block_sparse_moe.experts.{x}.w3.weight"), i, h, fan(h), &none);
            random(format!("{p}.block_sparse_moe.experts.{x}.w2.weight"), h, i, fan(i), &none);
        }
    }
    for l in 0..c.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.push((format!("model.layers.{l}.{norm}.weight"), vec![h], tensor(1, h, |_, _| 1.0)));
        }
    }
    tensors.push(("model.norm.weight".into(), vec![h], tensor(1, h, |_, _| 1.0)));
    let views =
        tensors.iter().map(|(name, shape, data)| Ok((name.clone(), TensorView::new(Dtype::BF16, shape.clone(), data)?))).collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    let mut config: serde_json::Value = serde_json::from_str(config_json)?;
    config["torch_dtype"] = "bfloat16".into();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    Ok(())
}
