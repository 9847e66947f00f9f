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
}

pub(super) enum Request {
    Drain(String, Reply<Result<(), ControlError>>),
    Status(Reply<ClusterView>),
    Plan(Reply<Result<Vec<PlannedReplica>, ControlError>>),
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

    /// The placement the current workers would get.
    pub async fn plan(&self) -> Result<Vec<PlannedReplica>, ControlError> {
        self.ask(Request::Plan).await?
    }
}
