//! The engine's operation interface. Model code is written against [`Backend`] only, so the
//! CPU backend (candle) and the CUDA backend slot in without touching it.

mod cpu;
#[cfg(feature = "_cuda")]
pub mod cuda;
mod gemv;

pub use cluster::device::{DType, Device};
pub use cpu::Cpu;
#[cfg(feature = "_cuda")]
pub use cuda::Cuda;
pub use gemv::{E4M3_VALUES, Elem, gemv_f32, matmul_t};

use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::sampling::{RowChoice, TokenLogprobs};
use crate::weights::{HostMatrix, HostTensor};

/// One sequence's slice of a batch, as paged attention sees it.
#[derive(Debug, Clone)]
pub struct SeqAttention {
    /// First row of this sequence's new tokens in the flattened batch.
    pub token_start: usize,
    /// Number of new tokens (prompt chunk, or 1 when decoding).
    pub num_tokens: usize,
    /// Tokens in the KV cache once this step's tokens are written (cached + new).
    pub context_len: usize,
    /// Physical KV cache blocks holding positions `0..context_len`, in order.
    pub block_table: Vec<u32>,
}

/// Everything paged attention needs about a batch, shared by all layers of one step.
#[derive(Debug, Clone)]
pub struct AttentionMeta {
    pub seqs: Vec<SeqAttention>,
    /// Physical cache slot (`block * block_size + offset`) of every new token, in batch order.
    pub slots: Vec<u32>,
    /// Position of every new token in its sequence, in batch order.
    pub positions: Vec<u32>,
    pub block_size: usize,
    /// A token attends to itself and the `window - 1` tokens before it.
    pub sliding_window: Option<usize>,
}

/// Shape of one layer's paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The element type the cache keeps (the model's; the CPU backend keeps f32).
    pub dtype: DType,
}

/// Heads layout of a projection's output rows: `[tokens, num_heads * head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub num_heads: usize,
    pub head_dim: usize,
}

/// The operations the model code is written in. Tensors are 2-D `[rows, cols]` activations
/// or weights; index arrays (token ids, positions, slots) come from the host.
pub trait Backend: Clone + Send + Sync + 'static {
    type Tensor: Clone + Send + Sync + std::fmt::Debug;
    /// A weight matrix `[out, in]` as products and lookups read it (dense, or scaled 8-bit).
    type Weight: Clone + Send + Sync + std::fmt::Debug;
    /// One layer's paged K and V cache.
    type KvCache: Send;

    fn name(&self) -> &'static str;
    /// Runs a whole step's work inside the backend's execution context (the CPU backend's
    /// thread pool, so the calling thread works instead of waiting to be woken per op).
    fn execute<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }
    /// Moves a host tensor (norm weights) to the device, converted to `dtype`.
    fn upload(&self, host: HostTensor<'_>, dtype: DType) -> Result<Self::Tensor>;
    /// Moves a weight matrix to the device in the format it has (the loader converted it).
    fn upload_weight(&self, host: HostMatrix<'static>) -> Result<Self::Weight>;
    /// `[rows, cols]` of a tensor.
    fn dims(&self, x: &Self::Tensor) -> (usize, usize);
    /// `[out, in]` of a weight matrix.
    fn weight_dims(&self, w: &Self::Weight) -> (usize, usize);
    /// Rows `ids` of `table` (`[vocab, hidden]`), as activations.
    fn embedding(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x · wᵀ` with `w` stored `[out, in]` as checkpoints store it.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    /// `x / rms(x) * weight`, per row.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f64) -> Result<Self::Tensor>;
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `silu(gate) * up`, elementwise.
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// The residual step of a pre-norm block: `x + residual`, and its RMSNorm. A backend may
    /// do both in one pass.
    fn add_rms_norm(&self, x: &Self::Tensor, residual: &Self::Tensor, weight: &Self::Tensor, eps: f64) -> Result<(Self::Tensor, Self::Tensor)> {
        let sum = self.add(x, residual)?;
        let normed = self.rms_norm(&sum, weight, eps)?;
        Ok((sum, normed))
    }
    /// SwiGLU's first half: `silu(x · gateᵀ) * (x · upᵀ)`. A backend may do it in one pass
    /// over both weights.
    fn swiglu(&self, x: &Self::Tensor, gate: &Self::Weight, up: &Self::Weight) -> Result<Self::Tensor> {
        self.silu_mul(&self.linear(x, gate)?, &self.linear(x, up)?)
    }
    /// Rotary position embedding (rotate-half convention) of every head of every row.
    fn rope(&self, x: &Self::Tensor, heads: Heads, positions: &[u32], theta: f64) -> Result<Self::Tensor>;
    fn alloc_kv_cache(&self, shape: KvShape) -> Result<Self::KvCache>;
    /// Writes this step's K and V rows into their cache slots.
    fn write_kv(&self, cache: &mut Self::KvCache, k: &Self::Tensor, v: &Self::Tensor, slots: &[u32]) -> Result<()>;
    /// Causal (optionally sliding-window) attention of the new tokens' queries over each
    /// sequence's cached keys and values. `q` is `[tokens, heads * head_dim]`.
    fn paged_attention(&self, q: &Self::Tensor, cache: &Self::KvCache, heads: Heads, meta: &AttentionMeta) -> Result<Self::Tensor>;
    /// Router: softmax over experts, top-k, renormalised weights. Returns per token the
    /// chosen experts and their weights, `k` each, flattened.
    fn router_top_k(&self, logits: &Self::Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)>;
    /// Rows `rows` of `x`, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Result<Self::Tensor>;
    /// `out[rows[i]] += weights[i] * src[i]` for every expert output, into a zeroed
    /// `[num_rows, cols]` tensor.
    fn scatter_add_rows(&self, num_rows: usize, parts: &[RowsUpdate<'_, Self::Tensor>]) -> Result<Self::Tensor>;
    /// `x` as f32 on the host (logits, activations for a communicator).
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// Activations `[rows, cols]` from f32 host data (what a communicator received).
    fn upload_activations(&self, data: Vec<f32>, rows: usize, cols: usize) -> Result<Self::Tensor>;
    /// Carries out `choices[r]` on row `r` of `logits` (`[rows, vocab]`): only the chosen
    /// tokens and their logprobs leave the backend. The default copies the logits to the host
    /// and takes the rows in parallel.
    fn choose(&self, logits: &Self::Tensor, choices: &[RowChoice<'_>]) -> Result<Vec<Option<TokenLogprobs>>> {
        choose_on_host(self, logits, choices)
    }
}

/// [`Backend::choose`] on the host: the logits copied over, the rows taken in parallel.
pub fn choose_on_host<B: Backend>(backend: &B, logits: &B::Tensor, choices: &[RowChoice<'_>]) -> Result<Vec<Option<TokenLogprobs>>> {
    let (rows, vocab) = backend.dims(logits);
    if rows != choices.len() {
        return Err(EngineError::Backend(format!("choose: {rows} rows of logits for {} choices", choices.len())));
    }
    let host = backend.to_host(logits)?;
    Ok(host.par_chunks_exact(vocab.max(1)).zip(choices).map(|(row, c)| crate::sampling::choose(row, c)).collect())
}

/// RoPE's inverse frequencies `1 / theta^(2i / d)` for `i < d / 2`, in f32 as transformers
/// computes them; every backend rotates by these same values.
pub fn rope_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32)).collect()
}

/// One expert's contribution to [`Backend::scatter_add_rows`].
#[derive(Debug)]
pub struct RowsUpdate<'a, T> {
    pub rows: &'a [u32],
    pub weights: &'a [f32],
    pub src: &'a T,
}

/// Softmax over each row of `logits` (`[tokens, experts]`), top-k, renormalised; the reference
/// routing of Mixtral. Ties go to the lower expert index.
pub fn route_top_k(logits: &[f32], num_experts: usize, k: usize) -> (Vec<u32>, Vec<f32>) {
    let tokens = logits.len() / num_experts;
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for row in logits.chunks_exact(num_experts) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = row.iter().map(|&l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        let chosen = crate::sampling::top_n(&exp, k);
        let total: f32 = chosen.iter().map(|&(_, p)| p / sum).sum();
        for (e, p) in chosen {
            ids.push(e);
            weights.push(p / sum / total);
        }
    }
    (ids, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        for (text, device) in [("cpu", Device::Cpu), ("cuda", Device::Cuda(0)), ("cuda:3", Device::Cuda(3))] {
            assert_eq!(text.parse::<Device>(), Ok(device));
        }
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert!("gpu".parse::<Device>().unwrap_err().contains("cpu, cuda or cuda:N"));
        assert!("cuda:x".parse::<Device>().is_err());
    }
}
