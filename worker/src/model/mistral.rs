//! The Mistral decoder (Jiang et al., 2023): pre-norm blocks of grouped-query attention with
//! rotary embeddings (optionally over a sliding window) and a SwiGLU MLP. Mixtral is the
//! same decoder with the MLP replaced by a sparse mixture of experts.

use super::{Linear, Loader, SparseMoeBlock};
use crate::backend::{AttentionMeta, Backend, Heads};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm<B: Backend> {
    pub weight: B::Tensor,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let weight = loader.vector(&format!("{prefix}.weight"), loader.config.hidden_size)?;
        Ok(RmsNorm { weight, eps: loader.config.rms_norm_eps })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.rms_norm(x, &self.weight, self.eps)
    }
}

/// Grouped-query self-attention over the paged KV cache.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub heads: Heads,
    pub kv_heads: Heads,
    pub rope_theta: f64,
}

impl<B: Backend> Attention<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let c = loader.config;
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        Ok(Attention {
            q_proj: Linear::load(loader, &format!("{prefix}.q_proj"), q, c.hidden_size)?,
            k_proj: Linear::load(loader, &format!("{prefix}.k_proj"), kv, c.hidden_size)?,
            v_proj: Linear::load(loader, &format!("{prefix}.v_proj"), kv, c.hidden_size)?,
            o_proj: Linear::load(loader, &format!("{prefix}.o_proj"), c.hidden_size, q)?,
            heads: Heads { num_heads: c.num_attention_heads, head_dim: c.head_dim },
            kv_heads: Heads { num_heads: c.num_key_value_heads, head_dim: c.head_dim },
            rope_theta: c.rope_theta,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, cache: &mut B::KvCache, meta: &AttentionMeta) -> Result<B::Tensor> {
        let q = b.rope(&self.q_proj.forward(b, x)?, self.heads, &meta.positions, self.rope_theta)?;
        let k = b.rope(&self.k_proj.forward(b, x)?, self.kv_heads, &meta.positions, self.rope_theta)?;
        let v = self.v_proj.forward(b, x)?;
        b.write_kv(cache, &k, &v, &meta.slots)?;
        let attn = b.paged_attention(&q, cache, self.heads, meta)?;
        self.o_proj.forward(b, &attn)
    }
}

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let (h, i) = (loader.config.hidden_size, loader.config.intermediate_size);
        Ok(Mlp {
            gate_proj: Linear::load(loader, &format!("{prefix}.gate_proj"), i, h)?,
            up_proj: Linear::load(loader, &format!("{prefix}.up_proj"), i, h)?,
            down_proj: Linear::load(loader, &format!("{prefix}.down_proj"), h, i)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let act = b.silu_mul(&self.gate_proj.forward(b, x)?, &self.up_proj.forward(b, x)?)?;
        self.down_proj.forward(b, &act)
    }
}

/// A layer's feed-forward half: dense (Mistral) or sparse (Mixtral).
#[derive(Debug, Clone)]
pub enum FeedForward<B: Backend> {
    Mlp(Mlp<B>),
    SparseMoe(SparseMoeBlock<B>),
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub feed_forward: FeedForward<B>,
}

impl<B: Backend> DecoderLayer<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let feed_forward = match loader.config.architecture {
            Architecture::Mistral => FeedForward::Mlp(Mlp::load(loader, &format!("{prefix}.mlp"))?),
            Architecture::Mixtral => {
                FeedForward::SparseMoe(SparseMoeBlock::load(loader, &format!("{prefix}.block_sparse_moe"))?)
            }
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(loader, &format!("{prefix}.input_layernorm"))?,
            self_attn: Attention::load(loader, &format!("{prefix}.self_attn"))?,
            post_attention_layernorm: RmsNorm::load(loader, &format!("{prefix}.post_attention_layernorm"))?,
            feed_forward,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor, cache: &mut B::KvCache, meta: &AttentionMeta) -> Result<B::Tensor> {
        let h = self.self_attn.forward(b, &self.input_layernorm.forward(b, x)?, cache, meta)?;
        let x = b.add(x, &h)?;
        let normed = self.post_attention_layernorm.forward(b, &x)?;
        let h = match &self.feed_forward {
            FeedForward::Mlp(mlp) => mlp.forward(b, &normed)?,
            FeedForward::SparseMoe(moe) => moe.forward(b, &normed)?,
        };
        b.add(&x, &h)
    }
}

/// The whole causal language model: embeddings, decoder layers, final norm, lm_head.
#[derive(Debug, Clone)]
pub struct CausalLm<B: Backend> {
    pub embed_tokens: B::Tensor,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `lm_head.weight`, or the embedding table when embeddings are tied.
    pub lm_head: Linear<B>,
    pub config: ModelConfig,
}

impl<B: Backend> CausalLm<B> {
    pub fn load(loader: &Loader<'_, B>) -> Result<Self> {
        let c = loader.config;
        let embed_tokens = loader.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(loader, &format!("model.layers.{i}")))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings {
            Linear { weight: embed_tokens.clone() }
        } else {
            Linear::load(loader, "lm_head", c.vocab_size, c.hidden_size)?
        };
        Ok(CausalLm { embed_tokens, layers, norm: RmsNorm::load(loader, "model.norm")?, lm_head, config: c.clone() })
    }

    /// Runs the batch's new tokens through the model, writing their K/V into `caches` (one
    /// per layer), and returns the logits `[logit_rows.len(), vocab]` of the rows asked for.
    pub fn forward(
        &self,
        b: &B,
        tokens: &[u32],
        meta: &AttentionMeta,
        caches: &mut [B::KvCache],
        logit_rows: &[u32],
    ) -> Result<B::Tensor> {
        let mut x = b.embedding(&self.embed_tokens, tokens)?;
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(b, &x, cache, meta)?;
        }
        let x = if logit_rows.len() == tokens.len() { x } else { b.gather_rows(&x, logit_rows)? };
        self.lm_head.forward(b, &self.norm.forward(b, &x)?)
    }
}
