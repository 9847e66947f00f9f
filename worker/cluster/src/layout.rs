//! How one replica of a model is split over ranks: `pp` pipeline stages, each of `ep` expert
//! groups of `tp` tensor-parallel ranks. Global rank = `stage * ep * tp + expert * tp + tensor`.
//!
//! Within a stage every rank holds the full activations. Attention and dense MLPs are split
//! over the `tp` ranks of an expert group (column- then row-parallel); a Mixtral layer's
//! experts are split over the `ep` groups (each expert itself split over `tp`), with tokens
//! dispatched to their experts' owners and combined back. Stages hand activations on.

use std::ops::Range;

use crate::config::{Architecture, ModelConfig};

/// The parallel layout of a replica (the coordinator's `--tp/--ep/--pp/--stage-layers`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct Layout {
    /// Tensor-parallel ranks per replica (attention heads and MLP units split).
    #[arg(long, env = "TRAMONTANE_TP", default_value_t = 1)]
    pub tp: usize,
    /// Expert-parallel ranks per replica (Mixtral experts split).
    #[arg(long, env = "TRAMONTANE_EP", default_value_t = 1)]
    pub ep: usize,
    /// Pipeline stages per replica (decoder layers split).
    #[arg(long, env = "TRAMONTANE_PP", default_value_t = 1)]
    pub pp: usize,
    /// Decoder layers of each pipeline stage, e.g. `20,18,18` (default: as even as possible,
    /// earlier stages taking the remainder); they sum to the model's layers.
    #[arg(long, env = "TRAMONTANE_STAGE_LAYERS", value_delimiter = ',')]
    pub stage_layers: Vec<usize>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout { tp: 1, ep: 1, pp: 1, stage_layers: Vec::new() }
    }
}

/// A rank's position in a [`Layout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub stage: usize,
    pub expert: usize,
    pub tensor: usize,
}

/// `start..start + len` of `total` items, the `index`-th of `parts` near-equal parts (the first
/// `total % parts` parts one longer).
pub fn even_part(total: usize, index: usize, parts: usize) -> Range<usize> {
    let (base, extra) = (total / parts, total % parts);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

impl Layout {
    pub fn world(&self) -> usize {
        self.tp * self.ep * self.pp
    }

    pub fn coords(&self, rank: usize) -> Coords {
        let per_stage = self.tp * self.ep;
        Coords { stage: rank / per_stage, expert: rank % per_stage / self.tp, tensor: rank % self.tp }
    }

    pub fn rank_of(&self, c: Coords) -> usize {
        c.stage * self.tp * self.ep + c.expert * self.tp + c.tensor
    }

    /// The rank that samples and answers for the replica: the first rank of the last stage.
    pub fn driver(&self) -> usize {
        self.rank_of(Coords { stage: self.pp - 1, expert: 0, tensor: 0 })
    }

    /// Decoder layers of `stage`.
    pub fn layers(&self, num_layers: usize, stage: usize) -> Range<usize> {
        if self.stage_layers.is_empty() {
            return even_part(num_layers, stage, self.pp);
        }
        let start: usize = self.stage_layers[..stage].iter().sum();
        start..start + self.stage_layers[stage]
    }

    /// The attention heads of tensor rank `tensor`: a `tp`-th of them.
    pub fn q_heads(&self, c: &ModelConfig, tensor: usize) -> Range<usize> {
        even_part(c.num_attention_heads, tensor, self.tp)
    }

    /// The KV heads of tensor rank `tensor`: a `tp`-th of them, or, when `tp` exceeds them,
    /// the one its query heads read (KV heads are then replicated over
    /// `tp / num_key_value_heads` ranks).
    pub fn kv_heads(&self, c: &ModelConfig, tensor: usize) -> Range<usize> {
        let (kv, tp) = (c.num_key_value_heads, self.tp);
        if tp <= kv {
            even_part(kv, tensor, tp)
        } else {
            let head = tensor / (tp / kv);
            head..head + 1
        }
    }

    /// Checks the layout fits the model; the error says what does not.
    pub fn validate(&self, c: &ModelConfig) -> Result<(), LayoutError> {
        let (tp, ep, pp) = (self.tp, self.ep, self.pp);
        let (heads, kv_heads) = (c.num_attention_heads, c.num_key_value_heads);
        if tp == 0 || ep == 0 || pp == 0 {
            return Err(LayoutError::Zero);
        }
        if !heads.is_multiple_of(tp) {
            return Err(LayoutError::Heads { tp, heads });
        }
        if !(kv_heads.is_multiple_of(tp) || tp.is_multiple_of(kv_heads)) {
            return Err(LayoutError::KvHeads { tp, kv_heads });
        }
        if !c.intermediate_size.is_multiple_of(tp) {
            return Err(LayoutError::Intermediate { tp, intermediate: c.intermediate_size });
        }
        if ep > 1 && c.architecture != Architecture::Mixtral {
            return Err(LayoutError::NoExperts { ep, architecture: c.architecture.hf_name() });
        }
        if ep > c.num_local_experts.max(1) {
            return Err(LayoutError::Experts { ep, experts: c.num_local_experts });
        }
        let layers = c.num_hidden_layers;
        if self.stage_layers.is_empty() {
            if pp > layers {
                return Err(LayoutError::Stages { pp, layers });
            }
        } else if self.stage_layers.len() != pp || self.stage_layers.contains(&0) || self.stage_layers.iter().sum::<usize>() != layers {
            return Err(LayoutError::StageLayers { stage_layers: self.stage_layers.clone(), pp, layers });
        }
        Ok(())
    }
}

/// Why a layout does not fit a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("tp, ep and pp must each be >= 1")]
    Zero,
    #[error("tp = {tp} must divide the {heads} attention heads")]
    Heads { tp: usize, heads: usize },
    #[error("tp = {tp} must divide the {kv_heads} KV heads or be a multiple of them")]
    KvHeads { tp: usize, kv_heads: usize },
    #[error("tp = {tp} must divide intermediate_size {intermediate}")]
    Intermediate { tp: usize, intermediate: usize },
    #[error("ep = {ep} needs a mixture of experts; {architecture} has none")]
    NoExperts { ep: usize, architecture: &'static str },
    #[error("ep = {ep} is more than the {experts} experts")]
    Experts { ep: usize, experts: usize },
    #[error("pp = {pp} is more than the {layers} layers")]
    Stages { pp: usize, layers: usize },
    #[error("stage layers {stage_layers:?} must be {pp} non-zero counts summing to the {layers} layers")]
    StageLayers { stage_layers: Vec<usize>, pp: usize, layers: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_and_coordinates_round_trip() {
        let l = Layout { tp: 2, ep: 3, pp: 2, stage_layers: vec![] };
        for r in 0..l.world() {
            assert_eq!(l.rank_of(l.coords(r)), r);
        }
        assert_eq!(l.coords(7), Coords { stage: 1, expert: 0, tensor: 1 });
        assert_eq!(l.driver(), 6);
    }

    #[test]
    fn parts_cover_everything_once() {
        let parts: Vec<_> = (0..4).map(|i| even_part(6, i, 4)).collect();
        assert_eq!(parts, vec![0..2, 2..4, 4..5, 5..6]);
        let l = Layout { pp: 2, ..Layout::default() };
        assert_eq!((l.layers(3, 0), l.layers(3, 1)), (0..2, 2..3));
        let l = Layout { pp: 3, stage_layers: vec![1, 3, 1], ..Layout::default() };
        assert_eq!((l.layers(5, 0), l.layers(5, 1), l.layers(5, 2)), (0..1, 1..4, 4..5));
    }
}
