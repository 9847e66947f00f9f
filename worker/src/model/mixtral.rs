//! Mixtral's sparse mixture of experts (Jiang et al., 2024): a router picks the top-k of
//! `num_local_experts` SwiGLU experts per token (softmax, top-k, renormalised) and the
//! token's output is the weighted sum of the chosen experts' outputs.
//!
//! Expert parallelism: the experts are split over the `ep` ranks of a stage. Each rank routes
//! its share of the tokens, dispatches every (token, expert) pair to the expert's owner
//! (`all_to_all_v`), the owners run their experts, the outputs travel back and are combined
//! with the routing weights in the tokens' order; the shares are then gathered on every rank.
//!
//! Redundant experts (EPLB): a hot expert may have copies on other ranks; a rank sends its
//! (token, expert) pairs to the expert's holders in turn (owner first). A copy computes the
//! same rows with the same weights, and a token's top-2 outputs add up the same in either
//! order, so Mixtral's outputs do not change.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::parallel::all_reduce;
use super::{ColumnParallelLinear, Linear, Loader, RowParallelLinear};
use crate::backend::{Backend, RowsUpdate};
use crate::comm::Comm;
use crate::error::Result;
use crate::experts::holders;
use crate::layout::even_part;

/// One SwiGLU expert: `w2(silu(w1(x)) * w3(x))`, its hidden units split over `tp` ranks.
#[derive(Debug, Clone)]
pub struct Expert<B: Backend> {
    pub w1: ColumnParallelLinear<B>,
    pub w2: RowParallelLinear<B>,
    pub w3: ColumnParallelLinear<B>,
}

impl<B: Backend> Expert<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let (h, i) = (loader.config.hidden_size, loader.config.intermediate_size);
        let part = loader.par.tp_part(i);
        let tp = loader.par.tp.clone();
        Ok(Expert {
            w1: ColumnParallelLinear::load(loader, &format!("{prefix}.w1"), i, h, part.clone())?,
            w2: RowParallelLinear::load(loader, &format!("{prefix}.w2"), h, i, part.clone(), tp)?,
            w3: ColumnParallelLinear::load(loader, &format!("{prefix}.w3"), i, h, part)?,
        })
    }

    /// This rank's partial output (summed over `tp` by the caller, once for all experts).
    pub fn forward_partial(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let act = b.swiglu(x, &self.w1.weight, &self.w3.weight)?;
        self.w2.forward_partial(b, &act)
    }
}

/// The experts this rank owns, and how to reach the others'.
#[derive(Debug, Clone)]
pub struct ExpertParallel<B: Backend> {
    /// Experts `owned`, in order.
    pub experts: Vec<Expert<B>>,
    pub owned: Range<usize>,
    /// Copies of other ranks' experts that this rank runs too: (expert, its weights, their
    /// bytes).
    pub copies: Vec<(usize, Expert<B>, usize)>,
    /// The ranks holding each expert: its owner, then those with a copy.
    holders: Vec<Vec<usize>>,
    pub num_experts: usize,
    pub ep: Arc<dyn Comm>,
    pub tp: Arc<dyn Comm>,
    /// (Token, expert) pairs each expert ran here since [`Self::take_routed`] last read them.
    routed: Arc<[AtomicU64]>,
}

impl<B: Backend> ExpertParallel<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let par = loader.par;
        let n = loader.config.num_local_experts;
        let ep = par.layout.ep;
        let owned = even_part(n, par.coords.expert, ep);
        Ok(ExpertParallel {
            experts: owned.clone().map(|e| Expert::load(loader, &format!("{prefix}.{e}"))).collect::<Result<_>>()?,
            owned,
            copies: Vec::new(),
            holders: holders(n, ep, []),
            routed: (0..n).map(|_| AtomicU64::new(0)).collect(),
            num_experts: n,
            ep: par.ep.clone(),
            tp: par.tp.clone(),
        })
    }

    /// Makes `copies` ((expert, rank) pairs: `rank` holds a copy of `expert` too) the layer's
    /// redundant experts: this rank loads the copies it gains (from `loader`, under `prefix`)
    /// and drops those it loses; the others stay as they are.
    pub fn set_copies(&mut self, loader: &Loader<'_, B>, prefix: &str, copies: &[(usize, usize)]) -> Result<()> {
        let me = loader.par.coords.expert;
        let mine: Vec<usize> = copies.iter().filter(|&&(_, r)| r == me).map(|&(e, _)| e).collect();
        let mut kept: Vec<_> = std::mem::take(&mut self.copies).into_iter().filter(|(e, ..)| mine.contains(e)).collect();
        for &e in &mine {
            if !kept.iter().any(|(k, ..)| *k == e) {
                let before = loader.loaded_bytes.get();
                let expert = Expert::load(loader, &format!("{prefix}.{e}"))?;
                kept.push((e, expert, loader.loaded_bytes.get() - before));
            }
        }
        kept.sort_by_key(|(e, ..)| *e);
        self.copies = kept;
        let mut sorted = copies.to_vec();
        sorted.sort_unstable();
        self.holders = holders(self.num_experts, self.ep.world(), sorted);
        Ok(())
    }

    /// Tokens each expert of the model ran on this rank since the last call (0 for those it
    /// does not hold), and starts counting again.
    pub fn take_routed(&self) -> Vec<u64> {
        self.routed.iter().map(|r| r.swap(0, Ordering::Relaxed)).collect()
    }

    /// Bytes of the copies this rank holds.
    pub fn copy_bytes(&self) -> usize {
        self.copies.iter().map(|(.., bytes)| bytes).sum()
    }

    /// The weights this rank holds for `expert`: its own, or its copy.
    fn local(&self, expert: usize) -> &Expert<B> {
        match expert.checked_sub(self.owned.start).and_then(|i| self.experts.get(i)) {
            Some(own) => own,
            None => &self.copies.iter().find(|(e, ..)| *e == expert).expect("tokens are sent only to a rank that holds the expert").1,
        }
    }

    /// `sum_j weights[t, j] * expert[chosen[t, j]](x[t])` for every token `t`, all experts local.
    fn forward_local(&self, b: &B, x: &B::Tensor, chosen: &[u32], weights: &[f32], k: usize) -> Result<B::Tensor> {
        let (tokens, _) = b.dims(x);
        // Tokens (and their routing weights) per expert, in token order.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut row_weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (i, (&e, &w)) in chosen.iter().zip(weights).enumerate() {
            rows[e as usize - self.owned.start].push((i / k) as u32);
            row_weights[e as usize - self.owned.start].push(w);
        }
        let mut outputs = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            self.routed[self.owned.start + e].fetch_add(rows[e].len() as u64, Ordering::Relaxed);
            let xe = if rows[e].len() == tokens { x.clone() } else { b.gather_rows(x, &rows[e])? };
            outputs.push((e, expert.forward_partial(b, &xe)?));
        }
        let parts: Vec<RowsUpdate<'_, B::Tensor>> = outputs.iter().map(|(e, src)| RowsUpdate { rows: &rows[*e], weights: &row_weights[*e], src }).collect();
        all_reduce(b, &*self.tp, b.scatter_add_rows(tokens, &parts)?)
    }

    /// Runs this rank's experts over the rows other ranks dispatched to it: each received row
    /// is `[expert id, x...]`; the result for each is its partial output row.
    fn serve(&self, b: &B, received: &[Vec<f32>], hidden: usize) -> Result<Vec<Vec<f32>>> {
        let mut members: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.num_experts];
        let mut inputs: Vec<Vec<f32>> = vec![Vec::new(); self.num_experts];
        for (src, data) in received.iter().enumerate() {
            for (idx, rec) in data.chunks_exact(hidden + 1).enumerate() {
                let e = rec[0] as usize;
                members[e].push((src, idx));
                inputs[e].extend_from_slice(&rec[1..]);
            }
        }
        let mut results: Vec<Vec<f32>> = received.iter().map(|d| vec![0f32; d.len() / (hidden + 1) * hidden]).collect();
        for e in 0..self.num_experts {
            if members[e].is_empty() {
                continue;
            }
            self.routed[e].fetch_add(members[e].len() as u64, Ordering::Relaxed);
            let x = b.upload_activations(std::mem::take(&mut inputs[e]), members[e].len(), hidden)?;
            let y = b.to_host(&self.local(e).forward_partial(b, &x)?)?;
            for (j, &(src, idx)) in members[e].iter().enumerate() {
                results[src][idx * hidden..(idx + 1) * hidden].copy_from_slice(&y[j * hidden..(j + 1) * hidden]);
            }
        }
        Ok(results)
    }
}

/// The router (`gate`) and the experts of one layer.
#[derive(Debug, Clone)]
pub struct SparseMoeBlock<B: Backend> {
    pub gate: Linear<B>,
    pub experts: ExpertParallel<B>,
    pub num_experts_per_tok: usize,
}

impl<B: Backend> SparseMoeBlock<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let c = loader.config;
        Ok(SparseMoeBlock {
            gate: Linear::load(loader, &format!("{prefix}.gate"), c.num_local_experts, c.hidden_size)?,
            experts: ExpertParallel::load(loader, &format!("{prefix}.experts"))?,
            num_experts_per_tok: c.num_experts_per_tok,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let k = self.num_experts_per_tok;
        let ep = &self.experts.ep;
        if ep.world() == 1 {
            let (chosen, weights) = b.router_top_k(&self.gate.forward(b, x)?, k)?;
            return self.experts.forward_local(b, x, &chosen, &weights, k);
        }
        let (tokens, hidden) = b.dims(x);
        let (me, n) = (ep.rank(), ep.world());
        let share = even_part(tokens, me, n);
        let longest = tokens.div_ceil(n);
        // Route this rank's share and dispatch each (token, expert) pair to the expert's owner.
        let mut sends: Vec<Vec<f32>> = vec![Vec::new(); n];
        let mut plan: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n];
        // Pairs of each expert sent so far: the next goes to its next holder.
        let mut turns = vec![0usize; self.experts.num_experts];
        if !share.is_empty() {
            let rows: Vec<u32> = share.clone().map(|r| r as u32).collect();
            let xs = if share.len() == tokens { x.clone() } else { b.gather_rows(x, &rows)? };
            let (chosen, weights) = b.router_top_k(&self.gate.forward(b, &xs)?, k)?;
            let host = b.to_host(&xs)?;
            for (i, (&e, &w)) in chosen.iter().zip(&weights).enumerate() {
                let holders = &self.experts.holders[e as usize];
                let (row, owner) = (i / k, holders[turns[e as usize] % holders.len()]);
                turns[e as usize] += 1;
                sends[owner].push(e as f32);
                sends[owner].extend_from_slice(&host[row * hidden..(row + 1) * hidden]);
                plan[owner].push((row, w));
            }
        }
        let received = ep.all_to_all_v(sends)?;
        let returned = ep.all_to_all_v(self.experts.serve(b, &received, hidden)?)?;
        // Combine in the tokens' order, sum the tensor-parallel partials, gather the shares.
        let mut out = vec![0f32; longest * hidden];
        for (owner, rows) in plan.iter().enumerate() {
            for (j, &(row, w)) in rows.iter().enumerate() {
                let y = &returned[owner][j * hidden..(j + 1) * hidden];
                for (o, v) in out[row * hidden..(row + 1) * hidden].iter_mut().zip(y) {
                    *o += w * v;
                }
            }
        }
        self.experts.tp.all_reduce_sum(&mut out)?;
        let all = ep.all_gather(&out)?;
        let mut full = Vec::with_capacity(tokens * hidden);
        for r in 0..n {
            let at = r * longest * hidden;
            full.extend_from_slice(&all[at..at + even_part(tokens, r, n).len() * hidden]);
        }
        b.upload_activations(full, tokens, hidden)
    }
}
