//! Mistral and Mixtral, written against [`Backend`](crate::backend::Backend) operations.
//! Struct fields carry the checkpoint's tensor names.

mod mistral;
mod mixtral;

pub use mistral::{Attention, CausalLm, DecoderLayer, FeedForward, Mlp, RmsNorm};
pub use mixtral::{Expert, SparseMoeBlock};

use crate::backend::{Backend, DType};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::{Shard, WeightSource};

/// Loads named tensors of known shapes from a [`WeightSource`] onto a backend.
pub struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub source: &'a WeightSource,
    pub config: &'a ModelConfig,
    /// The dtype matrices are kept and multiplied in; norms stay f32.
    pub dtype: DType,
}

impl<B: Backend> Loader<'_, B> {
    /// A `[out, in]` projection weight.
    pub fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<B::Tensor> {
        let host = self.source.tensor(name, &[out, inp], Shard::Full)?;
        self.backend.upload(host, self.dtype)
    }

    /// A `[dim]` norm weight, kept in f32.
    pub fn vector(&self, name: &str, dim: usize) -> Result<B::Tensor> {
        let host = self.source.tensor(name, &[dim], Shard::Full)?;
        self.backend.upload(host, DType::F32)
    }
}

/// A projection `y = x · Wᵀ` with `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    pub weight: B::Tensor,
}

impl<B: Backend> Linear<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Linear { weight: loader.matrix(&format!("{prefix}.weight"), out, inp)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight)
    }
}
