//! Mixtral's expert load as observed: tokens routed to each expert of each layer, and how
//! unevenly they fall on the ranks of an expert-parallel group.
//!
//! Expert parallelism gives rank `r` of `ep` the experts `even_part(num_experts, r, ep)`. Every
//! layer's all-to-all waits for the rank with the most (token, expert) pairs, so a layer costs
//! what its busiest rank computes. The imbalance of a load is `Σ_layers max_r tokens(l, r) /
//! Σ_layers mean_r tokens(l, r)`: 1 when every rank gets its share in every layer, `ep` when one
//! rank gets everything; it is the factor by which the experts' part of a step is slower than
//! on a perfectly balanced group.

use serde::{Deserialize, Serialize};

use crate::layout::even_part;

/// Tokens routed to each expert (`tokens[layer][expert]`), summed over steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertLoad {
    pub tokens: Vec<Vec<u64>>,
}

impl ExpertLoad {
    /// No tokens yet, for `layers` layers of `experts` experts.
    pub fn new(layers: usize, experts: usize) -> Self {
        ExpertLoad { tokens: vec![vec![0; experts]; layers] }
    }

    /// Adds one layer's counts (by expert; a rank reports those of the experts it ran). Counts
    /// of a layer or an expert the load does not have are an error, which names them.
    pub fn add(&mut self, layer: usize, counts: &[u64]) -> Result<(), String> {
        let layers = self.tokens.len();
        let row = self.tokens.get_mut(layer).ok_or_else(|| format!("layer {layer} of a model with {layers} layers"))?;
        if counts.len() > row.len() {
            return Err(format!("{} experts' counts for layer {layer} of a model with {} experts", counts.len(), row.len()));
        }
        for (t, c) in row.iter_mut().zip(counts) {
            *t += c;
        }
        Ok(())
    }

    /// Every token routed, over all layers.
    pub fn total(&self) -> u64 {
        self.tokens.iter().flatten().sum()
    }

    /// Tokens each rank of an `ep`-wide group computes in `layer`.
    pub fn rank_tokens(&self, layer: usize, ep: usize) -> Vec<u64> {
        let row = &self.tokens[layer];
        (0..ep).map(|r| row[even_part(row.len(), r, ep)].iter().sum()).collect()
    }

    /// The imbalance over an `ep`-wide group (see the module's documentation); `None` before
    /// any token.
    pub fn imbalance(&self, ep: usize) -> Option<f64> {
        let ep = ep.max(1);
        let (mut max, mut sum) = (0u64, 0u64);
        for layer in 0..self.tokens.len() {
            let ranks = self.rank_tokens(layer, ep);
            max += ranks.iter().max().copied().unwrap_or(0);
            sum += ranks.iter().sum::<u64>();
        }
        (sum > 0).then(|| max as f64 * ep as f64 / sum as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_even_load_is_balanced_and_a_lopsided_one_is_not() {
        let mut even = ExpertLoad::new(2, 8);
        even.add(0, &[3; 8]).unwrap();
        even.add(1, &[5; 8]).unwrap();
        assert_eq!(even.total(), 64);
        assert_eq!(even.imbalance(4), Some(1.0));
        assert_eq!(even.rank_tokens(1, 4), vec![10; 4]);

        // Every token on experts 0 and 1, which rank 0 of four owns: it does all the work.
        let mut hot = ExpertLoad::new(1, 8);
        hot.add(0, &[6, 2, 0, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(hot.rank_tokens(0, 4), vec![8, 0, 0, 0]);
        assert_eq!(hot.imbalance(4), Some(4.0));
        // On two ranks it is half as bad; on one rank there is nothing to balance.
        assert_eq!(hot.imbalance(2), Some(2.0));
        assert_eq!(hot.imbalance(1), Some(1.0));
        assert_eq!(ExpertLoad::new(1, 8).imbalance(4), None);
    }

    #[test]
    fn the_imbalance_weighs_layers_by_their_tokens() {
        // Layer 0: ranks (6, 2); layer 1: ranks (1, 3). Max 6 + 3 over mean 4 + 2.
        let mut load = ExpertLoad::new(2, 4);
        load.add(0, &[4, 2, 1, 1]).unwrap();
        load.add(1, &[1, 0, 2, 1]).unwrap();
        assert_eq!(load.imbalance(2), Some(9.0 / 6.0));
    }

    #[test]
    fn counts_of_a_layer_or_expert_it_lacks_are_refused() {
        let mut load = ExpertLoad::new(2, 4);
        assert!(load.add(2, &[1]).unwrap_err().contains("layer 2"));
        assert!(load.add(0, &[1; 5]).unwrap_err().contains("5 experts"));
        load.add(1, &[1, 2]).unwrap();
        assert_eq!(load.tokens[1], vec![1, 2, 0, 0]);
    }
}
