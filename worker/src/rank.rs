//! One rank's place in its replica: its coordinates in the replica's [`Layout`] and the
//! communicators its layers use (the whole replica, its tensor-parallel group, its
//! expert-parallel group).

use std::ops::Range;
use std::sync::Arc;

use crate::comm::{Comm, CommError, SoloComm};
use crate::config::ModelConfig;
use crate::layout::{Coords, Layout, even_part};

/// One rank's view of its replica: its coordinates and the communicators its layers use.
#[derive(Debug, Clone)]
pub struct Parallel {
    pub layout: Layout,
    pub rank: usize,
    pub coords: Coords,
    /// Every rank of the replica (pipeline hand-offs).
    pub world: Arc<dyn Comm>,
    /// The `tp` ranks of this rank's expert group in its stage.
    pub tp: Arc<dyn Comm>,
    /// The `ep` ranks of this rank's stage with its tensor index.
    pub ep: Arc<dyn Comm>,
}

impl Parallel {
    /// A replica of one rank.
    pub fn single() -> Self {
        Parallel {
            layout: Layout::default(),
            rank: 0,
            coords: Coords { stage: 0, expert: 0, tensor: 0 },
            world: Arc::new(SoloComm),
            tp: Arc::new(SoloComm),
            ep: Arc::new(SoloComm),
        }
    }

    /// Builds the sub-communicators of `layout` over `world` (collective: every rank calls it).
    pub fn new(layout: Layout, world: Arc<dyn Comm>) -> Result<Self, CommError> {
        if world.world() != layout.world() {
            return Err(CommError::Usage(format!("a layout of {} ranks over {} ranks", layout.world(), world.world())));
        }
        let rank = world.rank();
        let coords = layout.coords(rank);
        let tp_ranks: Vec<usize> = (0..layout.tp).map(|tensor| layout.rank_of(Coords { tensor, ..coords })).collect();
        let ep_ranks: Vec<usize> = (0..layout.ep).map(|expert| layout.rank_of(Coords { expert, ..coords })).collect();
        let tp = world.split(&tp_ranks)?;
        let ep = world.split(&ep_ranks)?;
        Ok(Parallel { layout, rank, coords, world, tp, ep })
    }

    pub fn is_first_stage(&self) -> bool {
        self.coords.stage == 0
    }

    pub fn is_last_stage(&self) -> bool {
        self.coords.stage + 1 == self.layout.pp
    }

    pub fn is_driver(&self) -> bool {
        self.rank == self.layout.driver()
    }

    /// The rank this one receives activations from, and the one it sends them to.
    pub fn prev_rank(&self) -> usize {
        self.layout.rank_of(Coords { stage: self.coords.stage - 1, ..self.coords })
    }

    pub fn next_rank(&self) -> usize {
        self.layout.rank_of(Coords { stage: self.coords.stage + 1, ..self.coords })
    }

    /// This rank's attention heads: a `tp`-th of them.
    pub fn q_heads(&self, c: &ModelConfig) -> Range<usize> {
        self.layout.q_heads(c, self.coords.tensor)
    }

    /// This rank's KV heads (see [`Layout::kv_heads`]).
    pub fn kv_heads(&self, c: &ModelConfig) -> Range<usize> {
        self.layout.kv_heads(c, self.coords.tensor)
    }

    /// This rank's slice of a `tp`-split dimension (intermediate size, vocabulary).
    pub fn tp_part(&self, total: usize) -> Range<usize> {
        even_part(total, self.coords.tensor, self.layout.tp)
    }

    /// This rank's decoder layers.
    pub fn layers(&self, num_layers: usize) -> Range<usize> {
        self.layout.layers(num_layers, self.coords.stage)
    }
}
