//! A placement change, run as a task of its own so that the controller's loop keeps
//! answering (status, drain, plan, membership events) while replicas load: store the plan
//! with its epoch, load the new replicas (all at once) while the old ones serve, move the kept
//! ones to the new epoch at a step boundary and retire the rest. The task reports an
//! [`Outcome`]; the loop installs it and publishes the new pool.

use std::sync::Arc;
use std::time::Duration;

use cluster::membership::{Membership, MembershipError};
use proto::tramontane::worker::v1 as wpb;
use tokio::sync::mpsc;

use super::LiveReplica;
use crate::metrics::Metrics;
use crate::planner::{Plan, ReplicaPlan};
use crate::replica::{ReplicaDown, ReplicaHandle, Reports, WorkerCallError};
use cluster::experts::ExpertLoad;
use cluster::kv_cache::PrefixHasher;
use cluster::scheduler::{Scheduler, SchedulerConfig};
use cluster::tls::ClusterTls;

pub(super) type WorkerClient = wpb::worker_client::WorkerClient<tonic::transport::Channel>;

/// A worker a new replica uses, as its card names it when the change starts.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub id: String,
    pub address: String,
    /// The GPU it serves from, if any (`cuda:N` on its card).
    pub gpu: Option<usize>,
}

/// A replica to load: its id, its plan, its workers (by rank) and their assignments.
pub(super) struct NewReplica {
    pub id: u64,
    pub plan: ReplicaPlan,
    pub workers: Vec<Target>,
    pub assignments: Vec<wpb::LoadAssignmentRequest>,
}

/// What a loaded replica's task needs.
#[derive(Clone)]
pub(super) struct Serving {
    pub sched: SchedulerConfig,
    pub prefix: PrefixHasher,
    pub metrics: Arc<Metrics>,
    pub down: mpsc::UnboundedSender<ReplicaDown>,
    pub dialer: Dialer,
    /// Mixtral's layers and experts, whose load a replica counts (None: a dense model).
    pub experts: Option<(usize, usize)>,
}

/// One placement change.
pub(super) struct Change {
    pub membership: Arc<dyn Membership>,
    pub leader: String,
    /// The plan to store first; None when nothing can be placed (the replicas only retire).
    pub store: Option<Plan>,
    pub load: Vec<NewReplica>,
    /// Replicas kept, each with its plan in the new placement (its copies may change).
    pub keep: Vec<(LiveReplica, ReplicaPlan)>,
    pub retire: Vec<LiveReplica>,
    /// A reshape: if a new replica fails to load, the old ones serve on (nothing retires).
    pub reshape: bool,
    pub serving: Serving,
    /// Told the epoch as soon as the plan is stored, before any worker is assigned it.
    pub reports: mpsc::UnboundedSender<super::Report>,
}

/// How a change ended.
pub(super) struct Outcome {
    /// The epoch stored (None: nothing was to be stored). On Err nothing else happened.
    pub stored: Result<Option<u64>, MembershipError>,
    /// The replicas serving now: those loaded, then those kept.
    pub live: Vec<LiveReplica>,
    /// Replicas that stopped: retired, or kept ones that could not move to the new epoch.
    pub ended: Vec<LiveReplica>,
    /// Replicas that failed to load: the workers to blame and why.
    pub failures: Vec<(Vec<String>, String)>,
}

impl Change {
    pub(super) async fn run(self) -> Outcome {
        let mut out = Outcome { stored: Ok(None), live: Vec::new(), ended: Vec::new(), failures: Vec::new() };
        if let Some(plan) = &self.store {
            let stored = match serde_json::to_string(plan) {
                Ok(json) => self.membership.store_plan(&json, &self.leader).await,
                Err(e) => Err(MembershipError::Invalid(e.to_string())),
            };
            if let Err(e) = stored {
                out.stored = Err(e);
                return out;
            }
            out.stored = Ok(Some(plan.epoch));
            let _ = self.reports.send(super::Report::Stored(plan.epoch));
            tracing::info!(epoch = plan.epoch, replicas = plan.replicas.len(), "new placement");
        }
        // New replicas load while the old placement keeps serving.
        let loads: Vec<_> = self.load.into_iter().map(|r| tokio::spawn(start(r, self.serving.clone()))).collect();
        for load in loads {
            match load.await {
                Ok(Ok(r)) => out.live.push(r),
                Ok(Err(failure)) => out.failures.push(failure),
                Err(e) => out.failures.push((Vec::new(), format!("loading a replica: {e}"))),
            }
        }
        // Kept replicas move to the new epoch at a step boundary; the others retire.
        let epoch = out.stored.as_ref().ok().copied().flatten();
        for (r, plan) in self.keep {
            let moved = match epoch {
                Some(epoch) => r.handle.advance(epoch, &plan.copies).await,
                None => Err(WorkerCallError::NoEpoch),
            };
            match moved {
                Ok(()) => {
                    if plan.copies != r.plan.copies {
                        tracing::info!(workers = ?plan.workers, copies = plan.copies.len(), "redundant experts placed again");
                    }
                    out.live.push(LiveReplica { plan, ..r });
                }
                Err(message) => {
                    tracing::warn!(%message, "a replica could not move to the new epoch");
                    r.handle.retire().await;
                    out.ended.push(r);
                }
            }
        }
        if self.reshape && !out.failures.is_empty() {
            tracing::warn!(failed = out.failures.len(), "a reshape's replica failed to load: the old ones serve on");
            out.live.extend(self.retire);
            return out;
        }
        // One by one, each at a step boundary: its requests move to the replicas serving,
        // which take new requests from now on.
        if let (Some(epoch), false) = (epoch, self.retire.is_empty()) {
            let _ = self.reports.send(super::Report::Serving(epoch, out.live.clone()));
        }
        for r in self.retire {
            r.handle.retire().await;
            self.serving.metrics.replica_retired();
            out.ended.push(r);
        }
        out
    }
}

/// Loads a replica's assignments onto its workers at once (sharded ranks link while
/// loading) and starts its task. Err names the workers that failed.
async fn start(new: NewReplica, serving: Serving) -> Result<LiveReplica, (Vec<String>, String)> {
    let NewReplica { id: replica, plan, workers, mut assignments } = new;
    let sharded = workers.len() > 1;
    let mut clients = Vec::new();
    let mut peers = Vec::new();
    for w in &workers {
        let fail = |e: &dyn std::fmt::Display| (vec![w.id.clone()], format!("worker {} ({}): {e}", w.id, w.address));
        let mut client = serving.dialer.connect(&w.address).await.map_err(|e| fail(&e))?;
        if sharded {
            let health = client.health(wpb::HealthRequest {}).await.map_err(|s| fail(&s.message()))?;
            peers.push(health.into_inner().comm_address);
        }
        clients.push(client);
    }
    if sharded {
        for a in &mut assignments {
            a.peers = peers.clone();
        }
    }
    // Ranks that all run on GPUs link over NCCL (rank 0 makes the group's unique id); any CPU
    // rank keeps the replica on TCP.
    if sharded && workers.iter().all(|w| w.gpu.is_some()) {
        let first = &workers[0].id;
        let fail = |s: tonic::Status| (vec![first.clone()], format!("worker {first}: making the NCCL id: {}", s.message()));
        let nccl_id = clients[0].clone().create_nccl_id(wpb::CreateNcclIdRequest {}).await.map_err(fail)?.into_inner().nccl_id;
        for (a, w) in assignments.iter_mut().zip(&workers) {
            a.comm = wpb::Communicator::Nccl.into();
            a.nccl_id = nccl_id.clone();
            a.device = w.gpu.unwrap_or(0) as u32;
        }
    }
    let calls: Vec<_> = clients
        .iter()
        .zip(assignments.clone())
        .map(|(c, a)| {
            let mut c = c.clone();
            tokio::spawn(async move { c.load_assignment(a).await.map_err(|s| s.message().to_owned()) })
        })
        .collect();
    let mut failed = Vec::new();
    let mut message = String::new();
    for (call, w) in calls.into_iter().zip(&workers) {
        if let Err(e) = call.await.map_err(|e| e.to_string()).and_then(|answer| answer) {
            failed.push(w.id.clone());
            message = format!("worker {}: {e}", w.id);
        }
    }
    if !failed.is_empty() {
        return Err((failed, message));
    }
    let Serving { sched, prefix, metrics, down, experts, .. } = serving;
    // Moves to newer epochs replace nothing.
    for a in &mut assignments {
        a.alongside_of = 0;
    }
    let experts = experts.map_or_else(ExpertLoad::default, |(layers, n)| ExpertLoad::new(layers, n, plan.layout.ep));
    let reports = Reports { metrics, down, experts };
    let handle = ReplicaHandle::spawn(replica, clients, assignments.clone(), plan.layout.driver(), Scheduler::new(sched, prefix), reports);
    tracing::info!(workers = ?plan.workers, layout = ?plan.layout, epoch = assignments[0].epoch, "replica serving");
    Ok(LiveReplica { handle, plan, addresses: workers.into_iter().map(|w| w.address).collect() })
}

/// How the coordinator reaches its workers' API: plain text, or mutual TLS with the cluster's
/// certificate (the worker checks it is signed by the cluster CA, and the coordinator the
/// worker's).
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<ClusterTls>,
}

impl Dialer {
    pub fn new(tls: Option<ClusterTls>) -> Self {
        Dialer { tls }
    }

    pub(super) async fn connect(&self, addr: &str) -> Result<WorkerClient, WorkerCallError> {
        let unreachable = |source| WorkerCallError::Unreachable { addr: addr.to_owned(), source };
        let url = format!("{}://{addr}", ClusterTls::scheme(self.tls.as_ref()));
        let mut endpoint = tonic::transport::Endpoint::from_shared(url).map_err(unreachable)?.connect_timeout(Duration::from_secs(2));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.grpc_client()).map_err(unreachable)?;
        }
        let channel = endpoint.connect().await.map_err(unreachable)?;
        Ok(WorkerClient::new(channel).max_decoding_message_size(64 << 20))
    }

    /// The worker's Health answer, if it gives one within `limit`.
    pub async fn health(&self, addr: &str, limit: Duration) -> Option<wpb::HealthResponse> {
        let check = async {
            let mut c = self.connect(addr).await.ok()?;
            c.health(wpb::HealthRequest {}).await.ok().map(tonic::Response::into_inner)
        };
        tokio::time::timeout(limit, check).await.ok().flatten()
    }

    /// The Health answers of `workers` (id, and address where known), read all at once: None for
    /// one that gave none within a second, or has no address.
    pub(super) async fn health_of(&self, workers: Vec<(String, Option<String>)>) -> Vec<(String, Option<wpb::HealthResponse>)> {
        let reads: Vec<_> = workers
            .into_iter()
            .map(|(id, address)| {
                let dialer = self.clone();
                tokio::spawn(async move {
                    let health = match address {
                        Some(a) => dialer.health(&a, Duration::from_secs(1)).await,
                        None => None,
                    };
                    (id, health)
                })
            })
            .collect();
        let mut answers = Vec::new();
        for read in reads {
            answers.extend(read.await.ok());
        }
        answers
    }
}

/// The GPU a worker card names (`cuda:N`), if any.
pub(super) fn gpu_ordinal(device: &str) -> Option<usize> {
    match device.parse::<cluster::Device>() {
        Ok(cluster::Device::Cuda(n)) => Some(n),
        _ => None,
    }
}
