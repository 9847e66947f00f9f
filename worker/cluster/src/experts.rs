//! Mixtral's expert load as observed: tokens routed to each expert of each layer, the tokens
//! each rank of an expert-parallel group ran, and how unevenly they fell on the ranks.
//!
//! Expert parallelism gives rank `r` of `ep` the experts `even_part(num_experts, r, ep)`, and
//! redundant copies of hot experts to other ranks. Every layer's all-to-all waits for the rank
//! with the most (token, expert) pairs, so a layer costs what its busiest rank computes. The
//! imbalance of a load is `Σ_layers max_r tokens(l, r) / Σ_layers mean_r tokens(l, r)`: 1 when
//! every rank gets its share in every layer, `ep` when one rank gets everything; it is the
//! factor by which the experts' part of a step is slower than on a perfectly balanced group.

use serde::{Deserialize, Serialize};

use crate::layout::even_part;

/// Tokens routed to each expert (`tokens[layer][expert]`) and run by each expert-parallel
/// rank (`ranks[layer][rank]`), summed over steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertLoad {
    pub tokens: Vec<Vec<u64>>,
    pub ranks: Vec<Vec<u64>>,
}

impl ExpertLoad {
    /// No tokens yet, for `layers` layers of `experts` experts over `ep` ranks.
    pub fn new(layers: usize, experts: usize, ep: usize) -> Self {
        ExpertLoad { tokens: vec![vec![0; experts]; layers], ranks: vec![vec![0; ep.max(1)]; layers] }
    }

    /// Adds the counts (by expert) that rank `ep_rank` reported for `layer`: the tokens its
    /// experts and copies ran. Counts of a layer, expert or rank the load does not have are an
    /// error, which names them.
    pub fn add(&mut self, layer: usize, ep_rank: usize, counts: &[u64]) -> Result<(), String> {
        let (layers, ep) = (self.tokens.len(), self.ranks.first().map_or(0, Vec::len));
        let row = self.tokens.get_mut(layer).ok_or_else(|| format!("layer {layer} of a model with {layers} layers"))?;
        if counts.len() > row.len() {
            return Err(format!("{} experts' counts for layer {layer} of a model with {} experts", counts.len(), row.len()));
        }
        let rank = self.ranks[layer].get_mut(ep_rank).ok_or_else(|| format!("rank {ep_rank} of an expert group of {ep}"))?;
        *rank += counts.iter().sum::<u64>();
        for (t, c) in row.iter_mut().zip(counts) {
            *t += c;
        }
        Ok(())
    }

    /// The load added since `earlier`, a snapshot of this one.
    pub fn since(&self, earlier: &ExpertLoad) -> ExpertLoad {
        let minus = |now: &[Vec<u64>], then: &[Vec<u64>]| -> Vec<Vec<u64>> {
            now.iter()
                .enumerate()
                .map(|(l, row)| row.iter().enumerate().map(|(i, n)| n - then.get(l).and_then(|r| r.get(i)).copied().unwrap_or(0).min(*n)).collect())
                .collect()
        };
        ExpertLoad { tokens: minus(&self.tokens, &earlier.tokens), ranks: minus(&self.ranks, &earlier.ranks) }
    }

    /// Every token routed, over all layers.
    pub fn total(&self) -> u64 {
        self.tokens.iter().flatten().sum()
    }

    /// The imbalance over the expert-parallel ranks (see the module's documentation); `None`
    /// before any token.
    pub fn imbalance(&self) -> Option<f64> {
        let (mut max, mut sum, mut ep) = (0u64, 0u64, 1);
        for ranks in &self.ranks {
            max += ranks.iter().max().copied().unwrap_or(0);
            sum += ranks.iter().sum::<u64>();
            ep = ranks.len().max(1);
        }
        (sum > 0).then(|| max as f64 * ep as f64 / sum as f64)
    }
}

/// The expert-parallel rank (of `ep`) that owns `expert` of `experts`: the one whose
/// [`even_part`] holds it.
pub fn owner(experts: usize, expert: usize, ep: usize) -> usize {
    (0..ep).find(|&r| even_part(experts, r, ep).contains(&expert)).unwrap_or(0)
}

/// Each of `experts` experts' holders over `ep` ranks: its owner, then the ranks that hold a
/// copy of it (`copies`: (expert, rank)), in their order.
pub fn holders(experts: usize, ep: usize, copies: impl IntoIterator<Item = (usize, usize)>) -> Vec<Vec<usize>> {
    let mut holders: Vec<Vec<usize>> = (0..experts).map(|e| vec![owner(experts, e, ep)]).collect();
    for (e, r) in copies {
        holders[e].push(r);
    }
    holders
}

/// Where `n` redundant copies of each layer's experts go, from an observed `load` (EPLB's
/// greedy rule): in each layer, again and again, the expert with the most tokens per holder
/// gets a copy on the rank with the least projected load that does not hold it and has a free
/// slot (`⌈n / ep⌉` copies a rank, which is what the planner sizes memory for); a holder is
/// projected to run an equal share of its expert's tokens. Experts with no tokens get none.
/// Returns (layer, expert, rank), sorted.
pub fn place_copies(load: &ExpertLoad, n: usize) -> Vec<(usize, usize, usize)> {
    let mut copies = Vec::new();
    for (layer, tokens) in load.tokens.iter().enumerate() {
        let (experts, ep) = (tokens.len(), load.ranks[layer].len());
        if ep < 2 {
            continue;
        }
        let slots = n.div_ceil(ep);
        let mut holders = holders(experts, ep, []);
        let mut used = vec![0usize; ep];
        let share = |e: usize, holders: &[Vec<usize>]| tokens[e] as f64 / holders[e].len() as f64;
        for _ in 0..n {
            let projected = |r: usize, holders: &[Vec<usize>]| -> f64 { (0..experts).filter(|&e| holders[e].contains(&r)).map(|e| share(e, holders)).sum() };
            let mut best: Option<(usize, usize)> = None;
            let mut order: Vec<usize> = (0..experts).filter(|&e| tokens[e] > 0).collect();
            order.sort_by(|&a, &b| share(b, &holders).total_cmp(&share(a, &holders)).then(a.cmp(&b)));
            for e in order {
                let free = (0..ep).filter(|&r| !holders[e].contains(&r) && used[r] < slots);
                if let Some(r) = free.min_by(|&a, &b| projected(a, &holders).total_cmp(&projected(b, &holders)).then(a.cmp(&b))) {
                    best = Some((e, r));
                    break;
                }
            }
            let Some((e, r)) = best else { break };
            holders[e].push(r);
            used[r] += 1;
            copies.push((layer, e, r));
        }
    }
    copies.sort_unstable();
    copies
}

/// The imbalance `load` would have had with `copies` ((layer, expert, rank)), each holder of
/// an expert taking an equal share of its tokens; `None` before any token.
pub fn projected_imbalance(load: &ExpertLoad, copies: &[(usize, usize, usize)]) -> Option<f64> {
    let (mut max, mut sum, mut ep) = (0f64, 0f64, 1);
    for (layer, tokens) in load.tokens.iter().enumerate() {
        ep = load.ranks[layer].len().max(1);
        let experts = tokens.len();
        let holders = holders(experts, ep, copies.iter().filter(|c| c.0 == layer).map(|&(_, e, r)| (e, r)));
        let mut ranks = vec![0f64; ep];
        for (e, h) in holders.iter().enumerate() {
            for &r in h {
                ranks[r] += tokens[e] as f64 / h.len() as f64;
            }
        }
        max += ranks.iter().copied().fold(0.0, f64::max);
        sum += ranks.iter().sum::<f64>();
    }
    (sum > 0.0).then(|| max * ep as f64 / sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A load whose ranks ran their own experts' tokens (no copies).
    fn owned(tokens: &[&[u64]], ep: usize) -> ExpertLoad {
        let mut load = ExpertLoad::new(tokens.len(), tokens[0].len(), ep);
        for (layer, row) in tokens.iter().enumerate() {
            for r in 0..ep {
                let mine: Vec<u64> = row.iter().enumerate().map(|(e, &n)| if even_part(row.len(), r, ep).contains(&e) { n } else { 0 }).collect();
                load.add(layer, r, &mine).unwrap();
            }
        }
        load
    }

    #[test]
    fn an_even_load_is_balanced_and_a_lopsided_one_is_not() {
        let even = owned(&[&[3; 8], &[5; 8]], 4);
        assert_eq!(even.total(), 64);
        assert_eq!(even.imbalance(), Some(1.0));
        assert_eq!(even.ranks[1], vec![10; 4]);

        // Every token on experts 0 and 1, which rank 0 of four owns: it does all the work.
        let hot: &[u64] = &[6, 2, 0, 0, 0, 0, 0, 0];
        assert_eq!(owned(&[hot], 4).ranks[0], vec![8, 0, 0, 0]);
        assert_eq!(owned(&[hot], 4).imbalance(), Some(4.0));
        // On two ranks it is half as bad; on one rank there is nothing to balance.
        assert_eq!(owned(&[hot], 2).imbalance(), Some(2.0));
        assert_eq!(owned(&[hot], 1).imbalance(), Some(1.0));
        assert_eq!(ExpertLoad::new(1, 8, 4).imbalance(), None);
    }

    #[test]
    fn the_imbalance_weighs_layers_by_their_tokens() {
        // Layer 0: ranks (6, 2); layer 1: ranks (1, 3). Max 6 + 3 over mean 4 + 2.
        let load = owned(&[&[4, 2, 1, 1], &[1, 0, 2, 1]], 2);
        assert_eq!(load.imbalance(), Some(9.0 / 6.0));
    }

    #[test]
    fn a_copy_takes_its_rank_s_share_of_an_expert() {
        // Expert 0 (rank 0's) ran 6 tokens: 3 on rank 0, 3 on a copy on rank 1.
        let mut load = ExpertLoad::new(1, 4, 2);
        load.add(0, 0, &[3, 2, 0, 0]).unwrap();
        load.add(0, 1, &[3, 0, 1, 1]).unwrap();
        assert_eq!(load.tokens[0], vec![6, 2, 1, 1]);
        assert_eq!(load.ranks[0], vec![5, 5]);
        assert_eq!(load.imbalance(), Some(1.0));
        let later = {
            let mut l = load.clone();
            l.add(0, 1, &[0, 0, 4, 0]).unwrap();
            l
        };
        let delta = later.since(&load);
        assert_eq!((delta.tokens[0].clone(), delta.ranks[0].clone()), (vec![0, 0, 4, 0], vec![0, 4]));
    }

    #[test]
    fn copies_go_from_the_hottest_experts_to_the_idlest_ranks() {
        // Experts 0 and 1 (rank 0's) run most tokens; rank 3's experts run none.
        let load = owned(&[&[40, 20, 10, 10, 5, 5, 0, 0]], 4);
        assert_eq!(load.ranks[0], vec![60, 20, 10, 0]);
        // One copy: expert 0 (40 tokens) goes to rank 3 (projected 0).
        assert_eq!(place_copies(&load, 1), vec![(0, 0, 3)]);
        // Four, one a rank: 0 → 3; then 0 again (20 a holder, tied with 1: the lower first) →
        // 2 (projected 10); then 1 (20) → 1, the other free rank not holding it; rank 0, last,
        // takes the hottest expert it does not hold (2).
        assert_eq!(place_copies(&load, 4), vec![(0, 0, 2), (0, 0, 3), (0, 1, 1), (0, 2, 0)]);
        assert_eq!(projected_imbalance(&load, &[]), load.imbalance());
        // With those four, rank 0 projects 40/3 + 10 + 5 tokens (experts 0, 1, 2: shares of
        // 3, 2 and 2 holders), the most, against a mean of 22.5: from 60 / 22.5.
        let four = projected_imbalance(&load, &place_copies(&load, 4)).unwrap();
        assert!((four - (40.0 / 3.0 + 15.0) / 22.5).abs() < 1e-12, "{four}");
        // No tokens, or no other rank: no copies.
        assert!(place_copies(&ExpertLoad::new(2, 8, 4), 4).is_empty());
        assert!(place_copies(&owned(&[&[9, 1]], 1), 2).is_empty());
    }

    #[test]
    fn counts_of_a_layer_expert_or_rank_it_lacks_are_refused() {
        let mut load = ExpertLoad::new(2, 4, 2);
        assert!(load.add(2, 0, &[1]).unwrap_err().contains("layer 2"));
        assert!(load.add(0, 0, &[1; 5]).unwrap_err().contains("5 experts"));
        assert!(load.add(0, 2, &[1]).unwrap_err().contains("rank 2"));
        load.add(1, 1, &[1, 2]).unwrap();
        assert_eq!(load.tokens[1], vec![1, 2, 0, 0]);
    }
}
