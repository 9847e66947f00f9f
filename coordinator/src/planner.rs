//! Placement as a pure function: from the model, the wanted layout and the live workers,
//! which replicas to run and which worker holds each rank. Replicas whose workers are all
//! still live are kept as they are (nothing moves); the other workers form new replicas of
//! the wanted layout, and workers too few for it form smaller replicas that fit their
//! memory (a TP-2 replica that lost a rank continues as TP 1 on the survivor).

use serde::{Deserialize, Serialize};
use worker::membership::WorkerCard;
use worker::parallel::Layout;
use worker::{Architecture, ModelConfig};

/// One replica: its layout and the worker ids of its ranks, by rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlan {
    pub layout: Layout,
    pub workers: Vec<String>,
}

/// The placement of a cluster in an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    pub epoch: u64,
    pub replicas: Vec<ReplicaPlan>,
}

impl Plan {
    /// The replica and rank of worker `id`.
    pub fn find(&self, id: &str) -> Option<(usize, usize)> {
        self.replicas.iter().enumerate().find_map(|(r, p)| p.workers.iter().position(|w| w == id).map(|rank| (r, rank)))
    }
}

/// What every rank must hold besides its weights.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    /// Bytes per weight element (the compute dtype).
    pub dtype_bytes: usize,
    pub kv_blocks: usize,
    pub block_size: usize,
}

/// Bytes one rank of `layout` holds: its weight slices and its KV cache (f32).
pub fn rank_memory(c: &ModelConfig, layout: &Layout, s: &Sizing) -> (u64, u64) {
    let experts = match c.architecture {
        Architecture::Mixtral => c.num_hidden_layers * c.num_local_experts * 3 * c.hidden_size * c.intermediate_size,
        Architecture::Mistral => 0,
    };
    let dense = c.num_parameters() - experts;
    let (tp, ep, pp) = (layout.tp, layout.ep, layout.pp);
    let weights = (dense / (tp * pp) + experts / (tp * ep * pp)) * s.dtype_bytes;
    let kv_heads = (c.num_key_value_heads / tp).max(1);
    let layers = c.num_hidden_layers.div_ceil(pp);
    let kv = s.kv_blocks * s.block_size * layers * 2 * kv_heads * c.head_dim * 4;
    (weights as u64, kv as u64)
}

fn fits(c: &ModelConfig, layout: &Layout, s: &Sizing, workers: &[&WorkerCard]) -> bool {
    let (w, kv) = rank_memory(c, layout, s);
    layout.validate(c).is_ok() && workers.iter().all(|card| card.memory_bytes == 0 || card.memory_bytes >= w + kv)
}

/// Layouts of exactly `world` ranks that fit the model, the wanted shape's order first.
fn layouts_of(world: usize, want: &Layout) -> Vec<Layout> {
    let mut out = Vec::new();
    for tp in (1..=world).rev().filter(|t| world.is_multiple_of(*t)) {
        for ep in (1..=world / tp).rev().filter(|e| (world / tp).is_multiple_of(*e)) {
            let pp = world / tp / ep;
            out.push(Layout { tp, ep, pp, stage_layers: Vec::new() });
        }
    }
    out.sort_by_key(|l| (l.tp != want.tp, l.ep != want.ep, l.pp != want.pp));
    out
}

/// Plans replicas over `workers` (live, not draining). Err says why no replica fits.
pub fn plan(
    config: &ModelConfig,
    want: &Layout,
    sizing: &Sizing,
    workers: &[WorkerCard],
    current: &[ReplicaPlan],
) -> Result<Vec<ReplicaPlan>, String> {
    let live = |id: &String| workers.iter().any(|w| &w.id == id);
    let mut replicas: Vec<ReplicaPlan> = current.iter().filter(|r| r.workers.iter().all(live)).cloned().collect();
    let mut free: Vec<&WorkerCard> = workers.iter().filter(|w| !replicas.iter().any(|r| r.workers.contains(&w.id))).collect();
    free.sort_by(|a, b| a.id.cmp(&b.id));
    let world = want.world();
    while free.len() >= world && fits(config, want, sizing, &free[..world]) {
        let group: Vec<&WorkerCard> = free.drain(..world).collect();
        replicas.push(ReplicaPlan { layout: want.clone(), workers: group.iter().map(|w| w.id.clone()).collect() });
    }
    // Too few (or too small) workers for the wanted layout: the largest layout that fits.
    'outer: while !free.is_empty() {
        for n in (1..=free.len().min(world)).rev() {
            for layout in layouts_of(n, want) {
                if fits(config, &layout, sizing, &free[..n]) {
                    let group: Vec<&WorkerCard> = free.drain(..n).collect();
                    replicas.push(ReplicaPlan { layout, workers: group.iter().map(|w| w.id.clone()).collect() });
                    continue 'outer;
                }
            }
        }
        break;
    }
    if replicas.is_empty() {
        let (w, kv) = rank_memory(config, want, sizing);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(match workers.len() {
            0 => "no capacity remains: no live worker".to_owned(),
            n => format!(
                "no capacity remains: {n} live worker(s) cannot hold a replica (one rank of tp {} ep {} pp {} needs {:.2} GiB of weights + {:.2} GiB of KV cache)",
                want.tp, want.ep, want.pp, gib(w), gib(kv)
            ),
        });
    }
    Ok(replicas)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let json = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":1000,"hidden_size":64,"intermediate_size":128,
          "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"num_local_experts":4,"num_experts_per_tok":2}"#;
        ModelConfig::parse(json, "test".as_ref()).expect("config")
    }

    fn card(id: &str, memory_bytes: u64) -> WorkerCard {
        WorkerCard { id: id.into(), address: format!("{id}:1"), device: "cpu".into(), memory_bytes, version: "t".into(), pid: 0 }
    }

    const SIZING: Sizing = Sizing { dtype_bytes: 4, kv_blocks: 16, block_size: 16 };

    fn tp(n: usize) -> Layout {
        Layout { tp: n, ..Layout::default() }
    }

    #[test]
    fn joins_add_replicas_and_keep_the_others_in_place() {
        let c = config();
        let one = plan(&c, &tp(1), &SIZING, &[card("a", 0)], &[]).unwrap();
        assert_eq!(one, vec![ReplicaPlan { layout: tp(1), workers: vec!["a".into()] }]);
        let two = plan(&c, &tp(1), &SIZING, &[card("b", 0), card("a", 0)], &one).unwrap();
        assert_eq!(two[0], one[0], "the existing replica does not move");
        assert_eq!(two[1].workers, vec!["b".to_owned()]);
        let without_a = plan(&c, &tp(1), &SIZING, &[card("b", 0)], &two).unwrap();
        assert_eq!(without_a, vec![two[1].clone()]);
    }

    #[test]
    fn a_replica_that_loses_a_rank_shrinks_to_what_fits() {
        let c = config();
        let (w1, kv1) = rank_memory(&c, &tp(1), &SIZING);
        let (w2, kv2) = rank_memory(&c, &tp(2), &SIZING);
        assert!(w2 < w1 && kv2 < kv1, "two ranks hold less each");
        let big = w1 + kv1;
        let both = plan(&c, &tp(2), &SIZING, &[card("a", big), card("b", big)], &[]).unwrap();
        assert_eq!(both, vec![ReplicaPlan { layout: tp(2), workers: vec!["a".into(), "b".into()] }]);
        let survivor = plan(&c, &tp(2), &SIZING, &[card("b", big)], &both).unwrap();
        assert_eq!(survivor, vec![ReplicaPlan { layout: tp(1), workers: vec!["b".into()] }]);
        // Too small for the whole model: no capacity, and the message says how much is needed.
        let err = plan(&c, &tp(2), &SIZING, &[card("b", w2 + kv2)], &both).unwrap_err();
        assert!(err.contains("no capacity remains") && err.contains("GiB"), "{err}");
        assert!(plan(&c, &tp(2), &SIZING, &[], &both).unwrap_err().contains("no live worker"));
    }

    #[test]
    fn three_workers_at_tp2_give_a_tp2_and_a_tp1_replica() {
        let c = config();
        let p = plan(&c, &tp(2), &SIZING, &[card("a", 0), card("b", 0), card("c", 0)], &[]).unwrap();
        assert_eq!(p.iter().map(|r| r.layout.world()).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(p[1].workers, vec!["c".to_owned()]);
    }
}
