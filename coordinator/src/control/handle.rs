//! The controller's face to the rest of the coordinator: the requests its loop answers,
//! the handle that sends them, and what comes back (views of the cluster and of a dry-run
//! plan, or a [`ControlError`]).

use std::time::Duration;

use cluster::layout::Layout;
use cluster::membership::WorkerCard;
use tokio::sync::{mpsc, oneshot};

use crate::planner::ReplicaPlan;

pub(super) type Reply<T> = oneshot::Sender<T>;

/// A worker as the status reports it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub card: WorkerCard,
    /// `serving`, `loading`, `idle`, `draining` or `unreachable`.
    pub state: &'static str,
    /// (replica, rank, layout) when it serves.
    pub placement: Option<(usize, usize, Layout)>,
}

#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub epoch: u64,
    pub leader: bool,
    pub workers: Vec<WorkerView>,
}

/// A replica of a dry-run plan with what one rank holds.
#[derive(Debug, Clone)]
pub struct PlannedReplica {
    pub plan: ReplicaPlan,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
}

/// Why the controller could not do what it was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ControlError {
    #[error("the placement controller has stopped")]
    Stopped,
    #[error("this coordinator is a standby: not the leader")]
    Standby,
    #[error("no worker {0:?} is registered")]
    UnknownWorker(String),
    /// A drained worker could not be told to go.
    #[error("releasing worker {worker}: {message}")]
    Release { worker: String, message: String },
    /// The planner's refusal: why nothing fits, with the arithmetic and what would.
    #[error("{0}")]
    NoFit(String),
    /// A shape the workers cannot hold (`tramctl scale`), and why.
    #[error("cannot scale to {shape}: {why}")]
    Shape { shape: String, why: String },
    /// A shape the model cannot take (heads or experts that do not divide), and why.
    #[error("cannot scale to {shape}: {why}")]
    BadShape { shape: String, why: String },
}

/// What `tramctl scale` asks for: the degrees of a replica's layout (0 keeps the wanted
/// one) and the replicas at most (0: as many as the workers hold).
#[derive(Debug, Clone, Copy)]
pub struct ScaleTo {
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub replicas: usize,
}

/// A reshape the leader stored: the epoch of the new placement and its replicas.
#[derive(Debug, Clone)]
pub struct Scaled {
    pub epoch: u64,
    pub replicas: Vec<PlannedReplica>,
}

pub(super) enum Request {
    Drain(String, Reply<Result<(), ControlError>>),
    Status(Reply<ClusterView>),
    Plan(Reply<Result<Vec<PlannedReplica>, ControlError>>),
    /// Change the wanted shape (a reshape while serving).
    Scale(ScaleTo, Reply<Result<Scaled, ControlError>>),
    /// Stop leading (the coordinator is exiting): give the leadership lease up.
    Resign(Reply<()>),
}

/// Clonable handle to the controller.
#[derive(Clone)]
pub struct ControlHandle {
    pub(super) tx: mpsc::UnboundedSender<Request>,
}

impl ControlHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)
    }

    /// Moves the worker's sequences to other replicas, then releases it (it exits).
    pub async fn drain(&self, worker: String) -> Result<(), ControlError> {
        self.ask(|r| Request::Drain(worker, r)).await?
    }

    pub async fn status(&self) -> Result<ClusterView, ControlError> {
        self.ask(Request::Status).await
    }

    /// Stops the controller and gives its leadership up (revoked on etcd, so a standby leads
    /// at once rather than when the lease would expire); waits at most `limit`.
    pub async fn resign(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.ask(Request::Resign)).await;
    }

    /// Reshapes the cluster to `wanted` while it serves; answers once the new placement is
    /// stored (its replicas then load beside the old ones, which retire when they serve).
    pub async fn scale(&self, tp: usize, ep: usize, pp: usize, replicas: usize) -> Result<Scaled, ControlError> {
        self.ask(|r| Request::Scale(ScaleTo { tp, ep, pp, replicas }, r)).await?
    }

    /// The placement the current workers would get.
    pub async fn plan(&self) -> Result<Vec<PlannedReplica>, ControlError> {
        self.ask(Request::Plan).await?
    }
}
