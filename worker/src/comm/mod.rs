//! Communicators: how the ranks of a sharded replica exchange activations. One interface,
//! [`Comm`], with a TCP backend for CPU workers ([`TcpComm`]) and an NCCL backend for GPU
//! workers (behind the `cuda` feature). The parallel layers in [`crate::parallel`] are
//! written against [`Comm`] only, so one code path serves 1 rank and N ranks.
//!
//! Every rank of a communicator must call the same operations in the same order (the model
//! code guarantees it: every rank runs the same layers over the same step). Results are
//! bit-identical on every rank: reductions sum contributions in rank order.

pub mod frame;
#[cfg(feature = "_cuda")]
mod nccl;
mod tcp;
mod tls;

#[cfg(feature = "_cuda")]
pub use nccl::{NcclComm, nccl_unique_id};
pub use tcp::{CommListener, TcpComm, TcpOptions};

use std::sync::Arc;

/// Why a collective failed. A failed communicator stays failed: the replica's group is
/// broken and must be rebuilt by a new assignment.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommError {
    #[error("rank {peer} ({addr}): {message}")]
    Peer { peer: usize, addr: String, message: String },
    #[error("communicator setup: {0}")]
    Setup(String),
    #[error("{0}")]
    Usage(String),
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// A group of ranks exchanging f32 buffers. Ranks are numbered `0..world()` within the
/// communicator; [`Comm::split`] makes sub-communicators over the same links.
pub trait Comm: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank gets the same bits.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// Every rank's `data` (all the same length), concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Sends `send[r]` to rank `r` (any length, empty included) and returns what each rank
    /// sent to this one, by rank.
    fn all_to_all_v(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError>;
    fn send(&self, to: usize, data: &[f32]) -> Result<(), CommError>;
    /// Receives exactly `len` elements from rank `from`.
    fn recv(&self, from: usize, len: usize) -> Result<Vec<f32>, CommError>;
    /// Makes every rank's `data` equal to `root`'s.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// The sub-communicator of `ranks` (ranks of this communicator, ascending; this rank
    /// among them). Collective: every rank calls `split` in the same order, each with the
    /// group it belongs to, the groups of one call being disjoint.
    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Comm>, CommError>;
}

/// The communicator of a single rank: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoloComm;

impl Comm for SoloComm {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        Ok(data.to_vec())
    }
    fn all_to_all_v(&self, send: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>, CommError> {
        check_parts(&send, 1)?;
        Ok(send)
    }
    fn send(&self, to: usize, _: &[f32]) -> Result<(), CommError> {
        Err(CommError::Usage(format!("send to rank {to} in a communicator of one rank")))
    }
    fn recv(&self, from: usize, _: usize) -> Result<Vec<f32>, CommError> {
        Err(CommError::Usage(format!("recv from rank {from} in a communicator of one rank")))
    }
    fn broadcast(&self, _: &mut [f32], _: usize) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn split(&self, ranks: &[usize]) -> Result<Arc<dyn Comm>, CommError> {
        check_split(ranks, 0, 1)?;
        Ok(Arc::new(SoloComm))
    }
}

fn check_parts(send: &[Vec<f32>], world: usize) -> Result<(), CommError> {
    if send.len() != world {
        return Err(CommError::Usage(format!("all_to_all_v needs {world} parts, got {}", send.len())));
    }
    Ok(())
}

/// The members (ranks of the underlying world) of the sub-communicator `ranks` of a
/// communicator whose members are `members`, and this rank's index among them (`me` is its
/// index in `members`).
fn sub_members(members: &[usize], me: usize, ranks: &[usize]) -> Result<(Vec<usize>, usize), CommError> {
    let index = check_split(ranks, me, members.len())?;
    Ok((ranks.iter().map(|&r| members[r]).collect(), index))
}

/// `ranks` must be ascending, within `0..world`, and contain `me`.
fn check_split(ranks: &[usize], me: usize, world: usize) -> Result<usize, CommError> {
    if ranks.windows(2).any(|w| w[0] >= w[1]) || ranks.last().is_some_and(|&r| r >= world) {
        return Err(CommError::Usage(format!("split: ranks {ranks:?} must be ascending and < {world}")));
    }
    ranks.iter().position(|&r| r == me).ok_or_else(|| CommError::Usage(format!("split: rank {me} is not among {ranks:?}")))
}
