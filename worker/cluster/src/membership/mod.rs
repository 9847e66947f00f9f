//! Cluster membership behind one trait, [`Membership`]: workers register a card under a
//! lease kept alive in the background; the coordinator watches the cards (a snapshot, then
//! changes), campaigns for leadership and stores the placement plan, which only the leader
//! may write. [`EtcdMembership`] runs it on etcd; [`MemoryMembership`] is the single-machine
//! default (the coordinator's fixed worker list).
//!
//! Keys on etcd, under `/tramontane/{cluster}/`:
//! - `workers/{id}`: a worker's card (JSON), attached to the worker's lease;
//! - `leader`: the leading coordinator's id, attached to its lease;
//! - `plan`: the placement plan and its epoch (JSON), written only while `leader` holds the
//!   writer's id (a transaction compares it).

mod etcd;
mod memory;

pub use etcd::EtcdMembership;
pub use memory::MemoryMembership;

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Where a process finds its cluster's membership (shared by the worker and coordinator CLIs).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints (comma-separated). Without them, a coordinator serves the fixed workers
    /// it is given and a worker serves whichever coordinator has its address.
    #[arg(long, env = "TRAMONTANE_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The cluster's name on etcd.
    #[arg(long, env = "TRAMONTANE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// Seconds a registration or leadership outlives its holder's last keep-alive.
    #[arg(long, env = "TRAMONTANE_LEASE_TTL_SECS", default_value_t = 10)]
    pub lease_ttl_secs: u64,
}

/// What a worker registers: who it is and what it can hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerCard {
    pub id: String,
    /// Worker API address (`host:port`).
    pub address: String,
    /// `cpu`, or `cuda:N` (the worker's GPU).
    pub device: String,
    /// Memory available for weights and KV cache; 0 = unknown (assumed enough).
    pub memory_bytes: u64,
    pub version: String,
    /// Process id of the worker.
    pub pid: u32,
    /// How many times a supervisor restarted the worker after it died.
    #[serde(default)]
    pub restarts: u32,
}

/// A change of the registered workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// Every registered worker (first, and again after the store was unreachable).
    Snapshot(Vec<WorkerCard>),
    Up(WorkerCard),
    /// The worker's card is gone (lease expired or revoked).
    Down(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MembershipError {
    #[error("etcd: {0}")]
    Store(String),
    #[error("not the leader: {0}")]
    NotLeader(String),
    #[error("{0}")]
    Invalid(String),
}

/// The longest a stopping process (a worker at SIGTERM, a resigning leader) waits for the
/// store to revoke its lease before it goes anyway.
pub const RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A registration or leadership kept alive by a background task. `lost` is cancelled when
/// the lease is known to be gone (not merely unreachable: while the store is down, a holder
/// keeps what it has). Dropping it revokes the lease.
#[derive(Debug)]
pub struct Lease {
    pub lost: CancellationToken,
    /// Until when the lease surely holds: the time the last keep-alive the store answered
    /// was sent, plus the TTL it answered with (the store counts from when it got it, later).
    /// Past it the store may have expired the lease without its holder hearing of it.
    pub until: watch::Receiver<Instant>,
    stop: CancellationToken,
    /// Cancelled once whatever keeps the lease has ended (revoking it, when stopped).
    ended: CancellationToken,
}

impl Lease {
    pub fn new(lost: CancellationToken, stop: CancellationToken, ended: CancellationToken, until: watch::Receiver<Instant>) -> Self {
        Lease { lost, until, stop, ended }
    }

    /// Whether the lease may have lapsed: its [`Lease::until`] has passed unrenewed.
    pub fn lapsed(&self) -> bool {
        Instant::now() > *self.until.borrow()
    }

    /// Gives the lease up and waits (at most `limit`) until it is revoked, so that whoever
    /// watches it (the leader watching workers, a standby waiting to lead) moves on now rather
    /// than when its TTL runs out; whether it was revoked in time.
    pub async fn release(self, limit: std::time::Duration) -> bool {
        let ended = self.ended.clone();
        drop(self);
        tokio::time::timeout(limit, ended.cancelled()).await.is_ok()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Leadership of a cluster's coordinators.
#[derive(Debug)]
pub struct Leadership {
    pub id: String,
    pub lease: Lease,
}

#[tonic::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Registers `card` until the returned lease is dropped (re-registering by itself if the
    /// lease is lost and the store comes back).
    async fn register(&self, card: &WorkerCard) -> Result<Lease, MembershipError>;
    /// The registered workers: a snapshot, then changes, for as long as the receiver lives.
    fn watch_workers(&self) -> mpsc::UnboundedReceiver<MemberEvent>;
    /// Waits until coordinator `id` leads the cluster.
    async fn campaign(&self, id: &str) -> Result<Leadership, MembershipError>;
    /// The stored placement plan (JSON), if any.
    async fn load_plan(&self) -> Result<Option<String>, MembershipError>;
    /// Stores the plan, only while coordinator `leader` (its id) still leads.
    async fn store_plan(&self, plan: &str, leader: &str) -> Result<(), MembershipError>;
}
