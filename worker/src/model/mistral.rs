//! The Mistral decoder (Jiang et al., 2023): pre-norm blocks of grouped-query attention with
//! rotary embeddings (optionally over a sliding window) and a SwiGLU MLP. Mixtral is the
//! same decoder with the MLP replaced by a sparse mixture of experts.

use super::{ColumnParallelLinear, Loader, ParallelLmHead, Role, RowParallelLinear, SparseMoeBlock, VocabParallelEmbedding};
use crate::backend::{AttentionMeta, Backend, Heads};
use crate::config::{Architecture, ModelConfig};
use crate::error::Result;
use crate::rank::Parallel;
use crate::weights::Shard;

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

/// Grouped-query self-attention over the paged KV cache, its heads split over `tp` ranks.
#[derive(Debug, Clone)]
pub struct Attention<B: Backend> {
    pub q_proj: ColumnParallelLinear<B>,
    pub k_proj: ColumnParallelLinear<B>,
    pub v_proj: ColumnParallelLinear<B>,
    pub o_proj: RowParallelLinear<B>,
    /// This rank's query and KV heads.
    pub heads: Heads,
    pub kv_heads: Heads,
    pub rope_theta: f64,
}

impl<B: Backend> Attention<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let (c, par) = (loader.config, loader.par);
        let d = c.head_dim;
        let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let (qh, kvh) = (par.q_heads(c), par.kv_heads(c));
        let (q_rows, kv_rows) = (qh.start * d..qh.end * d, kvh.start * d..kvh.end * d);
        let name = |p: &str| format!("{prefix}.{p}");
        Ok(Attention {
            q_proj: ColumnParallelLinear::load(loader, &name("q_proj"), q, c.hidden_size, q_rows.clone())?,
            k_proj: ColumnParallelLinear::load(loader, &name("k_proj"), kv, c.hidden_size, kv_rows.clone())?,
            v_proj: ColumnParallelLinear::load(loader, &name("v_proj"), kv, c.hidden_size, kv_rows)?,
            o_proj: RowParallelLinear::load(loader, &name("o_proj"), c.hidden_size, q, q_rows, par.tp.clone())?,
            heads: Heads { num_heads: qh.len(), head_dim: d },
            kv_heads: Heads { num_heads: kvh.len(), head_dim: d },
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

/// The SwiGLU feed-forward block: `down(silu(gate(x)) * up(x))`, its hidden units split
/// over `tp` ranks.
#[derive(Debug, Clone)]
pub struct Mlp<B: Backend> {
    pub gate_proj: ColumnParallelLinear<B>,
    pub up_proj: ColumnParallelLinear<B>,
    pub down_proj: RowParallelLinear<B>,
}

impl<B: Backend> Mlp<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let (h, i) = (loader.config.hidden_size, loader.config.intermediate_size);
        let part = loader.par.tp_part(i);
        Ok(Mlp {
            gate_proj: ColumnParallelLinear::load(loader, &format!("{prefix}.gate_proj"), i, h, part.clone())?,
            up_proj: ColumnParallelLinear::load(loader, &format!("{prefix}.up_proj"), i, h, part.clone())?,
            down_proj: RowParallelLinear::load(loader, &format!("{prefix}.down_proj"), h, i, part, loader.par.tp.clone())?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let act = b.swiglu(x, &self.gate_proj.weight, &self.up_proj.weight)?;
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
            Architecture::Mixtral => FeedForward::SparseMoe(SparseMoeBlock::load(loader, &format!("{prefix}.block_sparse_moe"))?),
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
        let norm = &self.post_attention_layernorm;
        let (x, normed) = b.add_rms_norm(x, &h, &norm.weight, norm.eps)?;
        let h = match &self.feed_forward {
            FeedForward::Mlp(mlp) => mlp.forward(b, &normed)?,
            FeedForward::SparseMoe(moe) => moe.forward(b, &normed)?,
        };
        b.add(&x, &h)
    }
}

/// The whole causal language model: embeddings, decoder layers, final norm, lm_head (none in
/// an embedding model). A pipeline stage holds its layers only: the first stage the
/// embeddings, the last the norm and lm_head.
#[derive(Debug, Clone)]
pub struct CausalLm<B: Backend> {
    pub embed_tokens: Option<VocabParallelEmbedding<B>>,
    /// This stage's layers.
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: Option<RmsNorm<B>>,
    /// `lm_head.weight`, or the embedding table when embeddings are tied; on the last stage
    /// of a model that has one.
    pub lm_head: Option<ParallelLmHead<B>>,
    pub config: ModelConfig,
    pub par: Parallel,
}

impl<B: Backend> CausalLm<B> {
    pub fn load(loader: &Loader<'_, B>) -> Result<Self> {
        let (c, par) = (loader.config, loader.par);
        let vocab = par.tp_part(c.vocab_size);
        let embed_tokens =
            par.is_first_stage().then(|| VocabParallelEmbedding::load(loader, "model.embed_tokens.weight", vocab.clone(), par.tp.clone())).transpose()?;
        let range = par.layers(c.num_hidden_layers);
        let layers = range
            .clone()
            .map(|i| {
                let layer = DecoderLayer::load(loader, &format!("model.layers.{i}"));
                loader.progress(i + 1 - range.start, range.len());
                layer
            })
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if par.is_last_stage() && !c.lm_head {
            (Some(RmsNorm::load(loader, "model.norm")?), None)
        } else if par.is_last_stage() {
            let shard = vocab_shard(&vocab);
            let weight = match (&embed_tokens, c.tie_word_embeddings) {
                // Tied, and kept as the table is: the same matrix.
                (Some(e), true) if loader.keeps_projections_dense() => e.weight.clone(),
                (_, true) => loader.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size, shard, Role::Projection)?,
                (_, false) => loader.matrix("lm_head.weight", c.vocab_size, c.hidden_size, shard, Role::Projection)?,
            };
            let head = ParallelLmHead { weight, vocab: c.vocab_size, comm: par.tp.clone() };
            (Some(RmsNorm::load(loader, "model.norm")?), Some(head))
        } else {
            (None, None)
        };
        Ok(CausalLm { embed_tokens, layers, norm, lm_head, config: c.clone(), par: par.clone() })
    }

    /// Tokens each expert ran on this rank since the last call, by layer of the model (this
    /// stage's Mixtral layers; none for a dense model), and starts counting again.
    pub fn take_expert_tokens(&self) -> Vec<(usize, Vec<u64>)> {
        let first = self.par.layers(self.config.num_hidden_layers).start;
        let moe = self.layers.iter().enumerate().filter_map(|(i, layer)| match &layer.feed_forward {
            FeedForward::SparseMoe(moe) => Some((first + i, moe)),
            FeedForward::Mlp(_) => None,
        });
        moe.map(|(layer, moe)| (layer, moe.experts.take_routed())).collect()
    }

    /// Makes `copies` ((layer, expert, expert-parallel rank): that rank holds a copy of the
    /// expert too) the redundant experts of this stage's Mixtral layers
    /// ([`ExpertParallel::set_copies`](super::ExpertParallel::set_copies)); this rank loads its
    /// new copies with `loader`. Returns the bytes of the copies it holds.
    pub fn set_expert_copies(&mut self, loader: &Loader<'_, B>, copies: &[(usize, usize, usize)]) -> Result<usize> {
        let first = self.par.layers(self.config.num_hidden_layers).start;
        let mut bytes = 0;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if let FeedForward::SparseMoe(moe) = &mut layer.feed_forward {
                let l = first + i;
                let here: Vec<(usize, usize)> = copies.iter().filter(|c| c.0 == l).map(|c| (c.1, c.2)).collect();
                moe.experts.set_copies(loader, &format!("model.layers.{l}.block_sparse_moe.experts"), &here)?;
                bytes += moe.experts.copy_bytes();
            }
        }
        Ok(bytes)
    }

    /// Runs the batch's new tokens through this stage, writing their K/V into `caches` (one
    /// per layer of the stage). The first stage embeds `tokens`; the others receive the
    /// previous stage's activations; all but the last hand theirs on and return `None`. The
    /// last returns the logits `[logit_rows.len(), vocab]` of the rows asked for, and the
    /// final hidden states (normed) `[hidden_rows.len(), hidden]` of those.
    pub fn forward(&self, b: &B, tokens: &[u32], meta: &AttentionMeta, caches: &mut [B::KvCache], rows: &Rows<'_>) -> Result<Option<StageOutput<B::Tensor>>> {
        let hidden = self.config.hidden_size;
        let mut x = match &self.embed_tokens {
            Some(embed) => embed.forward(b, tokens)?,
            None => {
                let data = self.par.world.recv(self.par.prev_rank(), tokens.len() * hidden)?;
                b.upload_activations(data, tokens.len(), hidden)?
            }
        };
        for (layer, cache) in self.layers.iter().zip(caches.iter_mut()) {
            x = layer.forward(b, &x, cache, meta)?;
        }
        let Some(norm) = &self.norm else {
            self.par.world.send(self.par.next_rank(), &b.to_host(&x)?)?;
            return Ok(None);
        };
        let take = |wanted: &[u32]| if wanted.len() == tokens.len() { Ok(x.clone()) } else { b.gather_rows(&x, wanted) };
        let logits = match (rows.logits.is_empty(), &self.lm_head) {
            (true, _) => None,
            (false, Some(lm_head)) => Some(lm_head.forward(b, &norm.forward(b, &take(rows.logits)?)?)?),
            (false, None) => return Err(crate::error::BadRequest::NoLmHead.into()),
        };
        let hidden = if rows.hidden.is_empty() { None } else { Some(norm.forward(b, &take(rows.hidden)?)?) };
        Ok(Some(StageOutput { logits, hidden }))
    }
}

/// The rows of a step the last stage returns something for (indices into the step's tokens).
#[derive(Debug, Clone, Copy, Default)]
pub struct Rows<'a> {
    /// Rows whose logits are wanted.
    pub logits: &'a [u32],
    /// Rows whose final hidden states are wanted (embeddings).
    pub hidden: &'a [u32],
}

/// What the last stage returns for [`Rows`].
pub struct StageOutput<T> {
    pub logits: Option<T>,
    pub hidden: Option<T>,
}

fn vocab_shard(part: &std::ops::Range<usize>) -> Shard {
    Shard::Range { dim: 0, start: part.start, len: part.len() }
}
