//! Mixtral's sparse mixture of experts (Jiang et al., 2024): a router picks the top-k of
//! `num_local_experts` SwiGLU experts per token (softmax, top-k, renormalised) and the
//! token's output is the weighted sum of the chosen experts' outputs.

use super::{Linear, Loader};
use crate::backend::{Backend, RowsUpdate};
use crate::error::Result;

/// One SwiGLU expert: `w2(silu(w1(x)) * w3(x))`.
#[derive(Debug, Clone)]
pub struct Expert<B: Backend> {
    pub w1: Linear<B>,
    pub w2: Linear<B>,
    pub w3: Linear<B>,
}

impl<B: Backend> Expert<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let (h, i) = (loader.config.hidden_size, loader.config.intermediate_size);
        Ok(Expert {
            w1: Linear::load(loader, &format!("{prefix}.w1"), i, h)?,
            w2: Linear::load(loader, &format!("{prefix}.w2"), h, i)?,
            w3: Linear::load(loader, &format!("{prefix}.w3"), i, h)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let act = b.silu_mul(&self.w1.forward(b, x)?, &self.w3.forward(b, x)?)?;
        self.w2.forward(b, &act)
    }
}

/// The router (`gate`) and the experts of one layer.
#[derive(Debug, Clone)]
pub struct SparseMoeBlock<B: Backend> {
    pub gate: Linear<B>,
    pub experts: Vec<Expert<B>>,
    pub num_experts_per_tok: usize,
}

impl<B: Backend> SparseMoeBlock<B> {
    pub fn load(loader: &Loader<'_, B>, prefix: &str) -> Result<Self> {
        let c = loader.config;
        Ok(SparseMoeBlock {
            gate: Linear::load(loader, &format!("{prefix}.gate"), c.num_local_experts, c.hidden_size)?,
            experts: (0..c.num_local_experts)
                .map(|e| Expert::load(loader, &format!("{prefix}.experts.{e}")))
                .collect::<Result<_>>()?,
            num_experts_per_tok: c.num_experts_per_tok,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor> {
        let (tokens, _) = b.dims(x);
        let k = self.num_experts_per_tok;
        let (chosen, weights) = b.router_top_k(&self.gate.forward(b, x)?, k)?;
        // Tokens (and their routing weights) per expert, in token order.
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); self.experts.len()];
        let mut row_weights: Vec<Vec<f32>> = vec![Vec::new(); self.experts.len()];
        for (i, (&e, &w)) in chosen.iter().zip(&weights).enumerate() {
            rows[e as usize].push((i / k) as u32);
            row_weights[e as usize].push(w);
        }
        let mut outputs = Vec::new();
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let xe = if rows[e].len() == tokens { x.clone() } else { b.gather_rows(x, &rows[e])? };
            outputs.push((e, expert.forward(b, &xe)?));
        }
        let parts: Vec<RowsUpdate<'_, B::Tensor>> = outputs
            .iter()
            .map(|(e, src)| RowsUpdate { rows: &rows[*e], weights: &row_weights[*e], src })
            .collect();
        b.scatter_add_rows(tokens, &parts)
    }
}
