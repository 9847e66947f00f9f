//! Mistral and Mixtral, written against [`Backend`](crate::backend::Backend) operations.
//! Struct fields carry the checkpoint's tensor names.

mod mistral;
mod mixtral;
mod parallel;

pub use mistral::{Attention, CausalLm, DecoderLayer, FeedForward, Mlp, RmsNorm, Rows, StageOutput};
pub use mixtral::{Expert, ExpertParallel, SparseMoeBlock};
pub use parallel::{ColumnParallelLinear, ParallelLmHead, RowParallelLinear, VocabParallelEmbedding};

use std::cell::Cell;
use std::time::Instant;

use crate::backend::{Backend, DType};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::quant::{self, Format, Quantization, WeightDType};
use crate::rank::Parallel;
use crate::weights::{HostMatrix, Shard, WeightSource};

/// What a matrix is to the model, which decides whether `--quantization` applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A projection of a decoder layer, or the lm_head: 8-bit under int8/fp8.
    Projection,
    /// Looked up or tiny (the embedding table, Mixtral's router): kept dense.
    Table,
}

/// Loads named tensors of known shapes from a [`WeightSource`] onto a backend.
pub struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub source: &'a WeightSource,
    pub config: &'a ModelConfig,
    /// The dtype dense matrices are kept in; norms stay f32.
    pub dtype: WeightDType,
    pub quantization: Quantization,
    /// This rank's place in its replica: which slices it loads.
    pub par: &'a Parallel,
    /// Bytes of weights loaded so far (as kept).
    pub loaded_bytes: Cell<usize>,
    started: Instant,
    reported: Cell<Instant>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(backend: &'a B, source: &'a WeightSource, config: &'a ModelConfig, dtype: WeightDType, quantization: Quantization, par: &'a Parallel) -> Self {
        let now = Instant::now();
        Loader { backend, source, config, dtype, quantization, par, loaded_bytes: Cell::new(0), started: now, reported: Cell::new(now) }
    }

    /// The dtype of dense matrices stored as `stored`.
    fn dense(&self, stored: DType) -> DType {
        match self.dtype {
            WeightDType::As(d) => d,
            WeightDType::Auto => stored,
        }
    }

    /// The dtype dummy weights are made in: `--dtype`, else the config's `torch_dtype`.
    fn dummy_dtype(&self) -> DType {
        let declared = self.config.checkpoint_dtype.as_deref().and_then(|d| d.parse().ok()).unwrap_or(DType::F32);
        self.dense(declared)
    }

    /// Whether projections are kept as they are stored (no 8-bit conversion at load).
    pub fn keeps_projections_dense(&self) -> bool {
        matches!(self.quantization, Quantization::Auto | Quantization::None)
    }

    /// A `[out, in]` weight, or the `shard` of it this rank holds, in the format its role,
    /// the checkpoint and the options ask for.
    pub fn matrix(&self, name: &str, out: usize, inp: usize, shard: Shard, role: Role) -> Result<B::Weight> {
        let host = self.source.matrix(name, [out, inp], shard, self.dummy_dtype())?;
        let format = match (&host, self.quantization, role) {
            (HostMatrix::Scaled { .. }, Quantization::Auto | Quantization::Fp8, _) => Format::Fp8,
            (HostMatrix::Scaled { .. }, Quantization::Int8, _) => Format::Int8,
            (HostMatrix::Scaled { .. }, Quantization::None, _) => Format::Dense(self.dummy_dtype()),
            (HostMatrix::Dense(_), Quantization::Int8, Role::Projection) => Format::Int8,
            (HostMatrix::Dense(_), Quantization::Fp8, Role::Projection) => Format::Fp8,
            (HostMatrix::Dense(t), _, _) => Format::Dense(self.dense(t.dtype)),
        };
        let kept = quant::convert(host, format).map_err(|e| crate::error::EngineError::Backend(format!("{name}: {e}")))?;
        self.loaded_bytes.set(self.loaded_bytes.get() + kept.bytes());
        self.backend.upload_weight(kept)
    }

    /// A `[dim]` norm weight, kept in f32.
    pub fn vector(&self, name: &str, dim: usize) -> Result<B::Tensor> {
        let host = self.source.tensor(name, &[dim], Shard::Full, DType::F32)?;
        self.loaded_bytes.set(self.loaded_bytes.get() + dim * 4);
        self.backend.upload(host, DType::F32)
    }

    /// Logs how far loading has come (at most once a second, and at the end).
    pub fn progress(&self, done: usize, total: usize) {
        let now = Instant::now();
        if done < total && now.duration_since(self.reported.get()).as_secs_f64() < 1.0 {
            return;
        }
        self.reported.set(now);
        let (bytes, secs) = (self.loaded_bytes.get() as f64, now.duration_since(self.started).as_secs_f64());
        tracing::info!(
            layers = format!("{done}/{total}"),
            gb = format!("{:.2}", bytes / 1e9),
            gb_per_s = format!("{:.2}", bytes / 1e9 / secs.max(1e-9)),
            "loading weights"
        );
    }
}

/// A projection `y = x · Wᵀ` with `W` stored `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear<B: Backend> {
    pub weight: B::Weight,
}

impl<B: Backend> Linear<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str, out: usize, inp: usize) -> Result<Self> {
        Ok(Linear { weight: loader.matrix(&format!("{prefix}.weight"), out, inp, Shard::Full, Role::Table)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight)
    }
}
