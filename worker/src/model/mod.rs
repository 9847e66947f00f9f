//! Mistral and Mixtral, written against [`Backend`](crate::backend::Backend) operations.
//! Struct fields carry the checkpoint's tensor names.

mod mistral;
mod mixtral;
mod parallel;

pub use mistral::{Attention, CausalLm, DecoderLayer, FeedForward, Mlp, RmsNorm};
pub use mixtral::{Expert, ExpertParallel, SparseMoeBlock};
pub use parallel::{ColumnParallelLinear, ParallelLmHead, RowParallelLinear, VocabParallelEmbedding};

use std::cell::Cell;

use crate::backend::{Backend, DType};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::parallel::Parallel;
use crate::weights::{Shard, WeightSource};

/// Loads named tensors of known shapes from a [`WeightSource`] onto a backend.
pub struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub source: &'a WeightSource,
    pub config: &'a ModelConfig,
    /// The dtype matrices are kept and multiplied in; norms stay f32.
    pub dtype: DType,
    /// This rank's place in its replica: which slices it loads.
    pub par: &'a Parallel,
    /// Bytes of weights loaded so far (at their kept dtype).
    pub loaded_bytes: Cell<usize>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(backend: &'a B, source: &'a WeightSource, config: &'a ModelConfig, dtype: DType, par: &'a Parallel) -> Self {
        Loader { backend, source, config, dtype, par, loaded_bytes: Cell::new(0) }
    }

    /// A `[out, in]` projection weight, or the `shard` of it this rank holds.
    pub fn matrix(&self, name: &str, out: usize, inp: usize, shard: Shard) -> Result<B::Tensor> {
        let host = self.source.tensor(name, &[out, inp], shard)?;
        let elements: usize = host.shape.iter().product();
        self.loaded_bytes.set(self.loaded_bytes.get() + elements * self.dtype.size_in_bytes());
        self.backend.upload(host, self.dtype)
    }

    /// A `[dim]` norm weight, kept in f32.
    pub fn vector(&self, name: &str, dim: usize) -> Result<B::Tensor> {
        let host = self.source.tensor(name, &[dim], Shard::Full)?;
        self.loaded_bytes.set(self.loaded_bytes.get() + dim * 4);
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
        Ok(Linear { weight: loader.matrix(&format!("{prefix}.weight"), out, inp, Shard::Full)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight)
    }
}
