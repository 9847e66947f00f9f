//! Parallel layers (Shoeybi et al., 2019): each rank holds a slice of a weight and the
//! layer's communicator puts the slices' results together. With one rank every exchange is
//! skipped, so the same model code serves 1 rank and N ranks.

use std::ops::Range;
use std::sync::Arc;

use super::{Loader, Role};
use crate::backend::Backend;
use crate::comm::Comm;
use crate::error::Result;
use crate::weights::Shard;

/// Sums `x` over the ranks of `comm` (identity for one rank).
pub fn all_reduce<B: Backend>(b: &B, comm: &dyn Comm, x: B::Tensor) -> Result<B::Tensor> {
    if comm.world() == 1 {
        return Ok(x);
    }
    let (rows, cols) = b.dims(&x);
    let mut host = b.to_host(&x)?;
    comm.all_reduce_sum(&mut host)?;
    b.upload_activations(host, rows, cols)
}

/// `y = x · Wᵀ` with the output features split: this rank holds rows `part` of `W` and
/// produces those output columns. No exchange: the next layer consumes the slice.
#[derive(Debug, Clone)]
pub struct ColumnParallelLinear<B: Backend> {
    pub weight: B::Weight,
}

impl<B: Backend> ColumnParallelLinear<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str, out: usize, inp: usize, part: Range<usize>) -> Result<Self> {
        let shard = Shard::Range { dim: 0, start: part.start, len: part.len() };
        Ok(ColumnParallelLinear { weight: loader.matrix(&format!("{prefix}.weight"), out, inp, shard, Role::Projection)? })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight)
    }
}

/// `y = x · Wᵀ` with the input features split: this rank holds columns `part` of `W`, takes
/// the matching slice of `x`, and the partial products are summed over `comm`.
#[derive(Debug, Clone)]
pub struct RowParallelLinear<B: Backend> {
    pub weight: B::Weight,
    pub comm: Arc<dyn Comm>,
}

impl<B: Backend> RowParallelLinear<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str, out: usize, inp: usize, part: Range<usize>, comm: Arc<dyn Comm>) -> Result<Self> {
        let shard = if part.len() == inp { Shard::Full } else { Shard::Range { dim: 1, start: part.start, len: part.len() } };
        Ok(RowParallelLinear { weight: loader.matrix(&format!("{prefix}.weight"), out, inp, shard, Role::Projection)?, comm })
    }

    /// This rank's partial product, not yet summed (for callers that sum once for several).
    pub fn forward_partial(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        b.linear(x, &self.weight)
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        all_reduce(b, &*self.comm, self.forward_partial(b, x)?)
    }
}

/// The token embedding with the vocabulary split: this rank holds rows `part` of the table,
/// looks up the ids that fall in it (zeros for the others) and the rows are summed over `comm`.
#[derive(Debug, Clone)]
pub struct VocabParallelEmbedding<B: Backend> {
    pub weight: B::Weight,
    pub part: Range<usize>,
    pub hidden: usize,
    pub comm: Arc<dyn Comm>,
}

impl<B: Backend> VocabParallelEmbedding<B> {
    pub fn load(loader: &Loader<'_, B>, name: &str, part: Range<usize>, comm: Arc<dyn Comm>) -> Result<Self> {
        let (vocab, hidden) = (loader.config.vocab_size, loader.config.hidden_size);
        let shard = if part.len() == vocab { Shard::Full } else { Shard::Range { dim: 0, start: part.start, len: part.len() } };
        Ok(VocabParallelEmbedding { weight: loader.matrix(name, vocab, hidden, shard, Role::Table)?, part, hidden, comm })
    }

    pub fn forward(&self, b: &B, ids: &[u32]) -> Result<B::Tensor> {
        let local: Vec<u32> = ids.iter().map(|&t| t.wrapping_sub(self.part.start as u32)).collect();
        let len = self.part.len() as u32;
        if local.iter().all(|&t| t < len) {
            return all_reduce(b, &*self.comm, b.embedding(&self.weight, &local)?);
        }
        let (rows, hits): (Vec<u32>, Vec<u32>) = local.iter().enumerate().filter(|&(_, &t)| t < len).map(|(i, &t)| (i as u32, t)).unzip();
        let x = if hits.is_empty() {
            b.upload_activations(vec![0.0; ids.len() * self.hidden], ids.len(), self.hidden)?
        } else {
            let found = b.embedding(&self.weight, &hits)?;
            let ones = vec![1.0; rows.len()];
            b.scatter_add_rows(ids.len(), &[crate::backend::RowsUpdate { rows: &rows, weights: &ones, src: &found }])?
        };
        all_reduce(b, &*self.comm, x)
    }
}

/// The output projection with the vocabulary split: each rank computes the logits of its
/// part, and the parts are gathered (padded to equal length) into full rows on the host.
#[derive(Debug, Clone)]
pub struct ParallelLmHead<B: Backend> {
    pub weight: B::Weight,
    pub vocab: usize,
    pub comm: Arc<dyn Comm>,
}

impl<B: Backend> ParallelLmHead<B> {
    /// Full-vocabulary logits `[rows, vocab]` of `x`.
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let local = b.linear(x, &self.weight)?;
        let world = self.comm.world();
        if world == 1 {
            return Ok(local);
        }
        let local = b.to_host(&local)?;
        let rows = b.dims(x).0;
        let width = self.vocab.div_ceil(world);
        let mine = b.weight_dims(&self.weight).0;
        let mut padded = vec![0f32; rows * width];
        for (src, dst) in local.chunks_exact(mine.max(1)).zip(padded.chunks_exact_mut(width)) {
            dst[..mine].copy_from_slice(src);
        }
        let gathered = self.comm.all_gather(&padded)?;
        let lens: Vec<usize> = (0..world).map(|rank| crate::layout::even_part(self.vocab, rank, world).len()).collect();
        let mut logits = Vec::with_capacity(rows * self.vocab);
        for r in 0..rows {
            for (rank, len) in lens.iter().enumerate() {
                let at = rank * rows * width + r * width;
                logits.extend_from_slice(&gathered[at..at + len]);
            }
        }
        b.upload_activations(logits, rows, self.vocab)
    }
}
