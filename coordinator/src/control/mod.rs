//! The placement controller, an actor ([`ControlHandle`] → the task owning [`Controller`]).
//! It leads the cluster (campaigns first), watches the workers' cards, and whenever the live
//! workers change (join, lease expiry, a failed step, a drain) asks the [`planner`] for a
//! placement; when it differs, it writes the plan with a new epoch (only the leader can),
//! loads new replicas while the old ones keep serving, moves kept replicas to the new epoch
//! at a step boundary (nothing reloads), retires the others (their requests move) and
//! publishes the new [`Pool`]. With etcd unreachable it keeps the last placement and retries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::tramontane::worker::v1 as wpb;
use tokio::sync::{mpsc, oneshot, watch};
use worker::ModelConfig;
use worker::membership::{Leadership, MemberEvent, Membership, MembershipError, RELEASE_LIMIT, WorkerCard};
use worker::parallel::Layout;

use crate::frontend::{LiveReplica, Pool};
use crate::metrics::Metrics;
use crate::planner::{self, Plan, ReplicaPlan, Sizing};
use crate::replica::{ReplicaDown, ReplicaHandle};
use crate::scheduler::SchedulerConfig;

type WorkerClient = wpb::worker_client::WorkerClient<tonic::transport::Channel>;
type Reply<T> = oneshot::Sender<T>;

/// What the controller places.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Checkpoint directory, as the workers see it.
    pub model: PathBuf,
    pub config: ModelConfig,
    /// The wanted layout of a replica.
    pub layout: Layout,
    /// How the workers keep and load the weights, and the KV cache they allocate.
    pub sizing: Sizing,
    pub sched: SchedulerConfig,
    /// This coordinator's id (for leadership).
    pub id: String,
    /// The membership's lease TTL: a serving worker whose card vanishes is given up only when
    /// it has not registered again within [`gone_grace`] of it.
    pub lease_ttl: Duration,
}

/// How long a worker of a live replica whose card vanished may take to register again
/// before it is given up: two TTLs. After etcd was out of reach of everyone for longer than a
/// TTL, every lease expired there and every card goes; the workers, still serving, register
/// again within about a TTL of etcd coming back, and nothing moves. A worker cut from etcd
/// alone is given up this much later than its lease expired.
fn gone_grace(ttl: Duration) -> Duration {
    2 * ttl
}

/// A worker as the status reports it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub card: WorkerCard,
    /// `serving`, `idle`, `draining` or `unreachable`.
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

enum Request {
    Drain(String, Reply<Result<(), String>>),
    Status(Reply<ClusterView>),
    Plan(Reply<Result<Vec<PlannedReplica>, String>>),
    /// Stop leading (the coordinator is exiting): give the leadership lease up.
    Resign(Reply<()>),
}

/// Clonable handle to the controller.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::UnboundedSender<Request>,
}

impl ControlHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, String> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| "the controller has stopped".to_owned())?;
        rx.await.map_err(|_| "the controller has stopped".to_owned())
    }

    /// Moves the worker's sequences to other replicas, then releases it (it exits).
    pub async fn drain(&self, worker: String) -> Result<(), String> {
        self.ask(|r| Request::Drain(worker, r)).await?
    }

    pub async fn status(&self) -> Result<ClusterView, String> {
        self.ask(Request::Status).await
    }

    /// Stops the controller and gives its leadership up (revoked on etcd, so a standby leads
    /// at once rather than when the lease would expire); waits at most `limit`.
    pub async fn resign(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.ask(Request::Resign)).await;
    }

    /// The placement the current workers would get.
    pub async fn plan(&self) -> Result<Vec<PlannedReplica>, String> {
        self.ask(Request::Plan).await?
    }
}

/// Starts the controller: it campaigns for leadership, then places replicas and publishes
/// them on `pool`. The returned handle answers at once (a standby reports no placement). If
/// it stops (another coordinator leads now, say), the reason goes to `fatal`: the process
/// stops rather than serve a placement another may change.
pub fn spawn(
    cfg: ControlConfig,
    membership: Arc<dyn Membership>,
    pool: watch::Sender<Arc<Pool>>,
    metrics: Arc<Metrics>,
    fatal: mpsc::Sender<anyhow::Error>,
) -> ControlHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        if let Err(e) = run(cfg, membership, pool, metrics, rx).await {
            tracing::error!(error = %e, "the controller stopped");
            let _ = fatal.send(anyhow::anyhow!("the placement controller stopped: {e}")).await;
        }
    });
    ControlHandle { tx }
}

/// The plan on the store, if there is one it can read.
async fn stored_plan(membership: &dyn Membership) -> Result<Option<Plan>, MembershipError> {
    Ok(membership.load_plan().await?.and_then(|j| serde_json::from_str(&j).ok()))
}

async fn run(
    cfg: ControlConfig,
    membership: Arc<dyn Membership>,
    pool: watch::Sender<Arc<Pool>>,
    metrics: Arc<Metrics>,
    mut requests: mpsc::UnboundedReceiver<Request>,
) -> Result<(), MembershipError> {
    // Until it leads, the coordinator answers status requests and refuses work.
    pool.send_replace(Arc::new(Pool { no_capacity: Some("this coordinator is a standby: not the leader".into()), ..Pool::default() }));
    let leadership = {
        let campaign = membership.campaign(&cfg.id);
        tokio::pin!(campaign);
        loop {
            tokio::select! {
                lead = &mut campaign => break lead?,
                Some(req) = requests.recv() => match req {
                    Request::Status(r) => { let _ = r.send(ClusterView::default()); }
                    Request::Drain(_, r) => { let _ = r.send(Err("this coordinator is a standby: not the leader".into())); }
                    Request::Plan(r) => { let _ = r.send(Err("this coordinator is a standby: not the leader".into())); }
                    Request::Resign(r) => { let _ = r.send(()); return Ok(()); }
                },
            }
        }
    };
    tracing::info!(id = %cfg.id, "leading the cluster");
    let stored = stored_plan(&*membership).await.ok().flatten();
    let (down_tx, mut down_rx) = mpsc::unbounded_channel();
    let stored_workers = stored.iter().flat_map(|p| &p.replicas).flat_map(|r| r.workers.iter().map(|id| (id.clone(), None))).collect();
    let mut c = Controller {
        epoch: stored.as_ref().map_or(0, |p| p.epoch),
        previous: stored.map(|p| p.replicas).unwrap_or_default(),
        cfg,
        membership: membership.clone(),
        leadership,
        cards: BTreeMap::new(),
        suspects: HashSet::new(),
        draining: HashMap::new(),
        live: Vec::new(),
        pool,
        down_tx,
        metrics,
        next_replica: 0,
        dirty: false,
        no_capacity: None,
        last_failure: None,
        // A new leader fences the workers of the stored plan that its own plan leaves out: a
        // former leader cut from etcd may still drive them.
        unfenced: stored_workers,
        vanished: HashMap::new(),
    };
    let mut members = membership.watch_workers();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut lost = c.leadership.lease.lost.clone();
    loop {
        tokio::select! {
            _ = lost.cancelled() => {
                c.lead_again().await?;
                lost = c.leadership.lease.lost.clone();
            }
            Some(event) = members.recv() => {
                c.apply(event);
                // Take every event already queued before placing (a snapshot comes with many).
                while let Ok(event) = members.try_recv() {
                    c.apply(event);
                }
                c.reconcile().await?;
            }
            Some(down) = down_rx.recv() => c.replica_down(down).await?,
            Some(req) = requests.recv() => {
                if let Request::Resign(r) = req {
                    let Leadership { id, lease } = c.leadership;
                    let released = lease.release(RELEASE_LIMIT).await;
                    tracing::info!(%id, released, "resigned the leadership");
                    let _ = r.send(());
                    return Ok(());
                }
                c.request(req).await?
            }
            _ = tick.tick() => {
                c.probe_suspects().await;
                if c.give_up_vanished() || c.dirty {
                    c.reconcile().await?;
                }
            }
        }
    }
}

struct Controller {
    cfg: ControlConfig,
    membership: Arc<dyn Membership>,
    leadership: Leadership,
    /// Registered workers by id.
    cards: BTreeMap<String, WorkerCard>,
    /// Registered but failing their health checks (a step through them failed).
    suspects: HashSet<String>,
    /// Draining workers and who waits for them to be released.
    draining: HashMap<String, Vec<Reply<Result<(), String>>>>,
    epoch: u64,
    /// The stored plan's replicas, before this controller runs any (kept where possible).
    previous: Vec<ReplicaPlan>,
    live: Vec<LiveReplica>,
    pool: watch::Sender<Arc<Pool>>,
    down_tx: mpsc::UnboundedSender<ReplicaDown>,
    metrics: Arc<Metrics>,
    next_replica: u64,
    /// A placement change is pending (etcd was unreachable, or a replica failed to load).
    dirty: bool,
    no_capacity: Option<String>,
    /// Why a replica last failed to load (reported with "no capacity").
    last_failure: Option<String>,
    /// Workers (id, address where known) of replicas that ended since the last stored plan:
    /// the next plan fences those it does not use.
    unfenced: Vec<(String, Option<String>)>,
    /// Workers of live replicas whose cards vanished, and since when: given up after
    /// [`gone_grace`] unless they register again first.
    vanished: HashMap<String, Instant>,
}

impl Controller {
    fn apply(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Snapshot(cards) => {
                let mut cards: BTreeMap<String, WorkerCard> = cards.into_iter().map(|c| (c.id.clone(), c)).collect();
                for (id, card) in std::mem::take(&mut self.cards) {
                    if !cards.contains_key(&id) && self.serves(&id) {
                        self.vanished.entry(id.clone()).or_insert_with(Instant::now);
                        cards.insert(id, card);
                    }
                }
                self.vanished.retain(|id, _| cards.contains_key(id));
                self.cards = cards;
            }
            MemberEvent::Up(card) => {
                self.suspects.remove(&card.id);
                if self.vanished.remove(&card.id).is_some() {
                    tracing::info!(worker = %card.id, address = %card.address, "worker registered again");
                } else {
                    tracing::info!(worker = %card.id, address = %card.address, "worker joined");
                }
                self.cards.insert(card.id.clone(), card);
            }
            MemberEvent::Down(id) if self.serves(&id) => {
                tracing::info!(worker = %id, grace = ?gone_grace(self.cfg.lease_ttl), "the card of a serving worker vanished; giving it up unless it registers again");
                self.vanished.entry(id).or_insert_with(Instant::now);
            }
            MemberEvent::Down(id) => self.forget(&id),
        }
    }

    /// Takes the leadership again after etcd expired its lease (etcd was out of reach for
    /// longer than the TTL), keeping the placement: only if no other coordinator took it
    /// meanwhile (the leader key is free within two TTLs and the stored plan is still this
    /// leader's). Err (and the coordinator stops) otherwise.
    async fn lead_again(&mut self) -> Result<(), MembershipError> {
        let id = self.cfg.id.clone();
        tracing::warn!(%id, "etcd expired the leadership lease; campaigning again, serving the current placement meanwhile");
        let limit = 2 * self.cfg.lease_ttl;
        let leadership = tokio::time::timeout(limit, self.membership.campaign(&id))
            .await
            .map_err(|_| MembershipError::NotLeader(format!("another coordinator holds the leader key ({limit:?} after this one's lease expired)")))??;
        let stored = stored_plan(&*self.membership).await?.map_or(0, |p| p.epoch);
        if stored != self.epoch {
            return Err(MembershipError::NotLeader(format!("another leader stored placement epoch {stored} past this one's {}", self.epoch)));
        }
        tracing::info!(%id, epoch = self.epoch, "leading the cluster again");
        self.leadership = leadership;
        Ok(())
    }

    fn forget(&mut self, id: &str) {
        tracing::info!(worker = %id, "worker left");
        self.cards.remove(id);
        self.suspects.remove(id);
        self.vanished.remove(id);
    }

    /// Whether worker `id` is in a live replica.
    fn serves(&self, id: &str) -> bool {
        self.live.iter().any(|r| r.plan.workers.iter().any(|w| w == id))
    }

    /// Gives up the workers whose cards vanished longer than the grace ago; whether any.
    fn give_up_vanished(&mut self) -> bool {
        let grace = gone_grace(self.cfg.lease_ttl);
        let gone: Vec<String> = self.vanished.iter().filter(|(_, since)| since.elapsed() >= grace).map(|(id, _)| id.clone()).collect();
        for id in &gone {
            self.forget(id);
        }
        !gone.is_empty()
    }

    /// Workers a placement may use.
    fn usable(&self) -> Vec<WorkerCard> {
        self.cards.values().filter(|c| !self.suspects.contains(&c.id) && !self.draining.contains_key(&c.id)).cloned().collect()
    }

    fn current(&self) -> Vec<ReplicaPlan> {
        if self.live.is_empty() && self.epoch > 0 {
            return self.previous.clone();
        }
        self.live.iter().filter(|r| r.handle.is_alive()).map(|r| r.plan.clone()).collect()
    }

    fn publish(&self) {
        let pool = Pool { epoch: self.epoch, replicas: self.live.clone(), no_capacity: self.no_capacity.clone(), leading: true };
        self.pool.send_replace(Arc::new(pool));
    }

    /// Brings the replicas in line with the live workers.
    async fn reconcile(&mut self) -> Result<(), MembershipError> {
        self.dirty = false;
        let usable = self.usable();
        let current = self.current();
        let wanted = match planner::plan(&self.cfg.config, &self.cfg.layout, &self.cfg.sizing, &usable, &current) {
            Ok(p) => p,
            Err(reason) => {
                tracing::warn!(%reason, "no replica can be placed");
                for r in std::mem::take(&mut self.live) {
                    r.handle.retire().await;
                    self.ended(&r);
                }
                self.no_capacity = Some(match &self.last_failure {
                    Some(f) => format!("{reason} (last failure: {f})"),
                    None => reason,
                });
                self.publish();
                self.release_drained().await;
                return Ok(());
            }
        };
        self.no_capacity = None;
        let live_plans: Vec<ReplicaPlan> = self.live.iter().filter(|r| r.handle.is_alive()).map(|r| r.plan.clone()).collect();
        if wanted == live_plans && live_plans.len() == self.live.len() {
            self.publish();
            self.release_drained().await;
            return Ok(());
        }
        let epoch = self.epoch + 1;
        let plan = Plan { epoch, replicas: wanted.clone() };
        let json = serde_json::to_string(&plan).map_err(|e| MembershipError::Invalid(e.to_string()))?;
        match self.membership.store_plan(&json, &self.leadership).await {
            Ok(()) => {}
            Err(MembershipError::Store(e)) => {
                tracing::warn!(error = %e, "cannot store the plan; serving the last placement and retrying");
                self.dirty = true;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.epoch = epoch;
        tracing::info!(epoch, replicas = wanted.len(), "new placement");
        // New replicas load while the old placement keeps serving.
        let mut next: Vec<LiveReplica> = Vec::new();
        for rp in &wanted {
            if live_plans.contains(rp) {
                continue;
            }
            match self.start_replica(rp).await {
                Ok(r) => next.push(r),
                Err((bad, message)) => {
                    tracing::warn!(%message, workers = ?bad, "a replica failed to load");
                    self.last_failure = Some(message);
                    self.suspects.extend(bad);
                    self.dirty = true;
                }
            }
        }
        // Kept replicas move to the new epoch at a step boundary; the others retire.
        for r in std::mem::take(&mut self.live) {
            if wanted.contains(&r.plan) && r.handle.is_alive() {
                match r.handle.advance(self.epoch).await {
                    Ok(()) => next.push(r),
                    Err(message) => {
                        tracing::warn!(%message, "a replica could not move to the new epoch");
                        r.handle.retire().await;
                        self.ended(&r);
                        self.dirty = true;
                    }
                }
            } else {
                r.handle.retire().await;
                self.ended(&r);
            }
        }
        next.sort_by_key(|r| wanted.iter().position(|w| *w == r.plan));
        self.live = next;
        self.fence(&wanted);
        self.publish();
        self.release_drained().await;
        Ok(())
    }

    /// Remembers the workers of a replica that ended, to be fenced by the next plan.
    fn ended(&mut self, r: &LiveReplica) {
        self.unfenced.extend(r.plan.workers.iter().cloned().zip(r.addresses.iter().cloned().map(Some)));
    }

    /// Fences the workers of ended replicas that the stored plan (`wanted`, epoch
    /// `self.epoch`) does not use, each in a task of its own (the loop never waits on a
    /// worker): they unload and refuse older epochs, so a worker this coordinator gave up on
    /// (its lease expired while it still answers) or a former leader's worker serves nobody
    /// from an old placement. An unreachable worker is not waited for: it serves no one.
    fn fence(&mut self, wanted: &[ReplicaPlan]) {
        let epoch = self.epoch;
        for (id, address) in std::mem::take(&mut self.unfenced) {
            if wanted.iter().any(|r| r.workers.contains(&id)) {
                continue;
            }
            let Some(address) = address.or_else(|| self.cards.get(&id).map(|c| c.address.clone())) else { continue };
            tokio::spawn(async move {
                let call = async { connect(&address).await?.fence(wpb::FenceRequest { epoch }).await.map_err(|s| s.message().to_owned()) };
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(_)) => tracing::info!(worker = %id, %address, epoch, "fenced a worker the placement no longer uses"),
                    Ok(Err(e)) => tracing::info!(worker = %id, %address, epoch, error = %e, "could not fence a worker"),
                    Err(_) => tracing::info!(worker = %id, %address, epoch, "could not fence a worker: no answer within 5 s"),
                }
            });
        }
    }

    fn assignments(&self, plan: &ReplicaPlan) -> Vec<wpb::LoadAssignmentRequest> {
        let l = &plan.layout;
        (0..l.world())
            .map(|rank| wpb::LoadAssignmentRequest {
                epoch: self.epoch,
                model_path: self.cfg.model.display().to_string(),
                dtype: wpb::WeightDtype::from(self.cfg.sizing.dtype) as i32,
                quantization: wpb::Quantization::from(self.cfg.sizing.quantization) as i32,
                load_format: wpb::LoadFormat::from(self.cfg.sizing.load_format) as i32,
                kv_blocks: self.cfg.sizing.kv_blocks as u32,
                block_size: self.cfg.sizing.block_size as u32,
                tp: l.tp as u32,
                ep: l.ep as u32,
                pp: l.pp as u32,
                stage_layers: l.stage_layers.iter().map(|&n| n as u32).collect(),
                rank: rank as u32,
                peers: Vec::new(),
                formed: self.epoch,
                ..Default::default()
            })
            .collect()
    }

    /// Loads a replica's assignments onto its workers at once (sharded ranks link while
    /// loading) and starts its task. Err names the workers that failed.
    async fn start_replica(&mut self, plan: &ReplicaPlan) -> Result<LiveReplica, (Vec<String>, String)> {
        let mut addresses = Vec::new();
        for id in &plan.workers {
            let card = self.cards.get(id).ok_or_else(|| (vec![id.clone()], format!("worker {id} is not registered")))?;
            addresses.push(card.address.clone());
        }
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for (id, addr) in plan.workers.iter().zip(&addresses) {
            let fail = |e: String| (vec![id.clone()], format!("worker {id} ({addr}): {e}"));
            let mut client = connect(addr).await.map_err(fail)?;
            if plan.workers.len() > 1 {
                let health = client.health(wpb::HealthRequest {}).await.map_err(|s| fail(s.message().to_owned()))?;
                peers.push(health.into_inner().comm_address);
            }
            clients.push(client);
        }
        let mut requests = self.assignments(plan);
        for r in &mut requests {
            if plan.workers.len() > 1 {
                r.peers = peers.clone();
            }
        }
        // Ranks that all run on GPUs link over NCCL (rank 0 makes the group's unique id);
        // any CPU rank keeps the replica on TCP.
        let gpus: Vec<Option<usize>> = plan.workers.iter().map(|id| self.cards.get(id).and_then(|c| gpu_ordinal(&c.device))).collect();
        if plan.workers.len() > 1 && gpus.iter().all(Option::is_some) {
            let fail = |s: tonic::Status| (vec![plan.workers[0].clone()], format!("worker {}: making the NCCL id: {}", plan.workers[0], s.message()));
            let nccl_id = clients[0].clone().create_nccl_id(wpb::CreateNcclIdRequest {}).await.map_err(fail)?.into_inner().nccl_id;
            for (r, gpu) in requests.iter_mut().zip(&gpus) {
                r.comm = "nccl".into();
                r.nccl_id = nccl_id.clone();
                r.device = gpu.unwrap_or(0) as u32;
            }
        }
        let calls: Vec<_> = clients
            .iter()
            .zip(requests.clone())
            .map(|(c, req)| {
                let mut c = c.clone();
                tokio::spawn(async move { c.load_assignment(req).await })
            })
            .collect();
        let mut failed = Vec::new();
        let mut message = String::new();
        for (call, id) in calls.into_iter().zip(&plan.workers) {
            match call.await {
                Ok(Ok(_)) => {}
                Ok(Err(s)) => {
                    failed.push(id.clone());
                    message = format!("worker {id}: {}", s.message());
                }
                Err(e) => {
                    failed.push(id.clone());
                    message = e.to_string();
                }
            }
        }
        if !failed.is_empty() {
            return Err((failed, message));
        }
        self.next_replica += 1;
        let handle =
            ReplicaHandle::spawn(self.next_replica, clients, requests, plan.layout.driver(), self.cfg.sched, self.metrics.clone(), self.down_tx.clone());
        tracing::info!(workers = ?plan.workers, layout = ?plan.layout, epoch = self.epoch, "replica serving");
        Ok(LiveReplica { handle, plan: plan.clone(), addresses })
    }

    /// A replica's step failed: the workers that do not answer are suspect; re-place.
    async fn replica_down(&mut self, down: ReplicaDown) -> Result<(), MembershipError> {
        let Some(i) = self.live.iter().position(|r| r.handle.id == down.replica) else { return Ok(()) };
        let r = self.live.remove(i);
        self.ended(&r);
        tracing::warn!(workers = ?r.plan.workers, message = %down.message, "replica down");
        for (id, addr) in r.plan.workers.iter().zip(&r.addresses) {
            if !healthy(addr).await {
                self.suspects.insert(id.clone());
            }
        }
        self.publish();
        self.reconcile().await
    }

    /// Suspects that answer again are usable again; their cards take what the answer says
    /// (a worker restarted at the same address is a new process).
    async fn probe_suspects(&mut self) {
        let suspects: Vec<String> = self.suspects.iter().cloned().collect();
        for id in suspects {
            let health = match self.cards.get(&id) {
                Some(card) => worker_health(&card.address, Duration::from_secs(1)).await,
                None => None,
            };
            let back = health.is_some();
            if let (Some(h), Some(card)) = (health, self.cards.get_mut(&id)) {
                card.pid = h.pid;
                card.restarts = h.restarts;
                if h.memory_bytes > 0 {
                    card.memory_bytes = h.memory_bytes;
                }
            }
            if back || !self.cards.contains_key(&id) {
                self.suspects.remove(&id);
                self.dirty |= back;
            }
        }
    }

    /// Releases drained workers no replica uses any more, and answers who waited.
    async fn release_drained(&mut self) {
        let in_use: HashSet<&String> = self.live.iter().flat_map(|r| r.plan.workers.iter()).collect();
        let done: Vec<String> = self.draining.keys().filter(|id| !in_use.contains(id)).cloned().collect();
        for id in done {
            let waiters = self.draining.remove(&id).unwrap_or_default();
            let result = match self.cards.get(&id) {
                Some(card) => match connect(&card.address).await {
                    Ok(mut c) => c.release(wpb::ReleaseRequest { epoch: self.epoch }).await.map(drop).map_err(|s| s.message().to_owned()),
                    Err(e) => Err(e),
                },
                None => Ok(()),
            };
            tracing::info!(worker = %id, ?result, "drained worker released");
            self.cards.remove(&id);
            for w in waiters {
                let _ = w.send(result.clone());
            }
        }
    }

    async fn request(&mut self, req: Request) -> Result<(), MembershipError> {
        match req {
            // Handled by the loop, which stops.
            Request::Resign(reply) => {
                let _ = reply.send(());
            }
            Request::Status(reply) => {
                let _ = reply.send(self.view());
            }
            Request::Plan(reply) => {
                let planned = planner::plan(&self.cfg.config, &self.cfg.layout, &self.cfg.sizing, &self.usable(), &self.current());
                let planned = planned.map(|replicas| {
                    replicas
                        .into_iter()
                        .map(|plan| {
                            let (weight_bytes, kv_bytes) = planner::rank_memory(&self.cfg.config, &plan.layout, &self.cfg.sizing);
                            PlannedReplica { plan, weight_bytes, kv_bytes }
                        })
                        .collect()
                });
                let _ = reply.send(planned);
            }
            Request::Drain(id, reply) => {
                if !self.cards.contains_key(&id) {
                    let _ = reply.send(Err(format!("no worker {id:?} is registered")));
                    return Ok(());
                }
                tracing::info!(worker = %id, "draining");
                self.draining.entry(id).or_default().push(reply);
                self.reconcile().await?;
            }
        }
        Ok(())
    }

    fn view(&self) -> ClusterView {
        let workers = self
            .cards
            .values()
            .map(|card| {
                let placement = self
                    .live
                    .iter()
                    .enumerate()
                    .find_map(|(i, r)| r.plan.workers.iter().position(|w| *w == card.id).map(|rank| (i, rank, r.plan.layout.clone())));
                let state = if self.draining.contains_key(&card.id) {
                    "draining"
                } else if self.suspects.contains(&card.id) {
                    "unreachable"
                } else if placement.is_some() {
                    "serving"
                } else {
                    "idle"
                };
                WorkerView { card: card.clone(), state, placement }
            })
            .collect();
        ClusterView { epoch: self.epoch, leader: true, workers }
    }
}

async fn connect(addr: &str) -> Result<WorkerClient, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string())?.connect_timeout(Duration::from_secs(2));
    let channel = endpoint.connect().await.map_err(|e| format!("cannot reach {addr}: {e}"))?;
    Ok(WorkerClient::new(channel).max_decoding_message_size(64 << 20))
}

/// The worker's Health answer, if it gives one within `limit`.
pub async fn worker_health(addr: &str, limit: Duration) -> Option<wpb::HealthResponse> {
    let check = async {
        let mut c = connect(addr).await.ok()?;
        c.health(wpb::HealthRequest {}).await.ok().map(tonic::Response::into_inner)
    };
    tokio::time::timeout(limit, check).await.ok().flatten()
}

/// Whether the worker at `addr` answers Health within a second.
async fn healthy(addr: &str) -> bool {
    worker_health(addr, Duration::from_secs(1)).await.is_some()
}

/// The GPU a worker card names (`cuda:N`), if any.
fn gpu_ordinal(device: &str) -> Option<usize> {
    match device.parse::<worker::Device>() {
        Ok(worker::Device::Cuda(n)) => Some(n),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store where another coordinator always leads.
    struct LedByAnother;

    #[tonic::async_trait]
    impl Membership for LedByAnother {
        async fn register(&self, _: &WorkerCard) -> Result<worker::membership::Lease, MembershipError> {
            Err(MembershipError::NotLeader("unused".into()))
        }
        fn watch_workers(&self) -> mpsc::UnboundedReceiver<MemberEvent> {
            mpsc::unbounded_channel().1
        }
        async fn campaign(&self, _: &str) -> Result<Leadership, MembershipError> {
            Err(MembershipError::NotLeader("another coordinator leads".into()))
        }
        async fn load_plan(&self) -> Result<Option<String>, MembershipError> {
            Ok(None)
        }
        async fn store_plan(&self, _: &str, _: &Leadership) -> Result<(), MembershipError> {
            Err(MembershipError::NotLeader("unused".into()))
        }
    }

    /// A controller that stops tells the process why (through `fatal`) instead of ending it.
    #[tokio::test]
    async fn a_stopped_controller_reports_why_to_the_process() {
        let config = ModelConfig::parse(worker::config::MIX_BENCH, "mix-bench".as_ref()).expect("the mix-bench config parses");
        let cfg = ControlConfig {
            model: PathBuf::from("unused"),
            config,
            layout: Layout::default(),
            sizing: Sizing {
                dtype: worker::WeightDType::Auto,
                quantization: worker::Quantization::None,
                load_format: worker::LoadFormat::Dummy,
                kv_blocks: 16,
                block_size: 16,
            },
            sched: SchedulerConfig { num_blocks: 16, block_size: 16, max_num_seqs: 4, max_batch_tokens: 64, max_queue: 4 },
            id: "c1".into(),
            lease_ttl: Duration::from_secs(1),
        };
        let (pool, _) = watch::channel(Arc::new(Pool::default()));
        let (fatal_tx, mut fatal) = mpsc::channel(1);
        let _control = spawn(cfg, Arc::new(LedByAnother), pool, Arc::new(Metrics::default()), fatal_tx);
        let why = tokio::time::timeout(Duration::from_secs(5), fatal.recv()).await.expect("reported within 5 s").expect("a reason");
        assert!(why.to_string().contains("another coordinator leads"), "{why}");
    }
}
