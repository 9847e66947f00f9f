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

use cluster::ModelConfig;
use cluster::layout::Layout;
use cluster::membership::{Leadership, MemberEvent, Membership, MembershipError, RELEASE_LIMIT, WorkerCard};
use proto::tramontane::worker::v1 as wpb;
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::planner::{self, Plan, ReplicaPlan, Sizing, Wanted};
use crate::replica::ReplicaDown;
use cluster::experts::ExpertLoad;
use cluster::kv_cache::PrefixHasher;
use cluster::scheduler::SchedulerConfig;

mod calls;
mod handle;
mod lapse;
mod placing;
mod pool;
mod rebalance;
mod scale;

pub use handle::{ClusterView, ControlError, ControlHandle, PlannedReplica, ScaleTo, Scaled, WorkerView};
use handle::{Reply, Request};

pub use placing::Dialer;
use placing::{Change, NewReplica, Outcome, Serving, Target, gpu_ordinal};
pub use pool::{LiveReplica, Policy, Pool, Routing};

/// What the controller places.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Checkpoint directory, as the workers see it.
    pub model: PathBuf,
    pub config: ModelConfig,
    /// The wanted layout of a replica (until an operator scales the cluster: the stored
    /// plan's wanted shape wins over it).
    pub layout: Layout,
    /// How the workers keep and load the weights, and the KV cache they allocate.
    pub sizing: Sizing,
    pub sched: SchedulerConfig,
    /// Names the blocks the replicas' prefix caches hold.
    pub prefix: PrefixHasher,
    /// This coordinator's id (for leadership).
    pub id: String,
    /// How the workers' API is reached (plain text or mutual TLS).
    pub dialer: Dialer,
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
                    Request::Drain(_, r) => { let _ = r.send(Err(ControlError::Standby)); }
                    Request::Plan(r) => { let _ = r.send(Err(ControlError::Standby)); }
                    Request::Scale(_, r) => { let _ = r.send(Err(ControlError::Standby)); }
                    Request::Resign(r) => { let _ = r.send(()); return Ok(()); }
                },
            }
        }
    };
    tracing::info!(id = %cfg.id, "leading the cluster");
    let stored = stored_plan(&*membership).await.ok().flatten();
    let (down_tx, mut down_rx) = mpsc::unbounded_channel();
    let (reports, mut reports_rx) = mpsc::unbounded_channel();
    let stored_workers = stored.iter().flat_map(|p| &p.replicas).flat_map(|r| r.workers.iter().map(|id| (id.clone(), None))).collect();
    let flags = Wanted { layout: cfg.layout.clone(), replicas: 0 };
    let want = match stored.as_ref().and_then(|p| p.wanted.clone()) {
        Some(w) => {
            tracing::info!(layout = ?w.layout, replicas = w.replicas, "the cluster was scaled (tramctl scale): that shape wins over the flags'");
            w
        }
        None => flags.clone(),
    };
    let mut c = Controller {
        want,
        flags,
        reshaping: false,
        scale_waiters: Vec::new(),
        epoch: stored.as_ref().map_or(0, |p| p.epoch),
        previous: stored.map(|p| p.replicas).unwrap_or_default(),
        serving: Serving {
            sched: cfg.sched,
            prefix: cfg.prefix.clone(),
            metrics,
            down: down_tx,
            dialer: cfg.dialer.clone(),
            experts: (cfg.config.architecture == cluster::Architecture::Mixtral).then_some((cfg.config.num_hidden_layers, cfg.config.num_local_experts)),
        },
        cfg,
        membership: membership.clone(),
        leadership,
        releading: false,
        cards: BTreeMap::new(),
        suspects: HashSet::new(),
        probing: false,
        reading_epochs: false,
        stored: 0,
        draining: HashMap::new(),
        live: Vec::new(),
        placing: None,
        pool,
        reports,
        next_replica: 0,
        dirty: false,
        no_capacity: None,
        last_failure: None,
        // A new leader fences the workers of the stored plan that its own plan leaves out: a
        // former leader cut from etcd may still drive them.
        unfenced: stored_workers,
        vanished: HashMap::new(),
        rebalanced: HashMap::new(),
        observed: HashMap::new(),
        last_rebalance: Instant::now(),
    };
    let mut members = membership.watch_workers();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Nothing below awaits I/O: loads, probes, releases and campaigns run as tasks that
    // report back, so status, drain and plan are answered while a replica loads.
    loop {
        let lost = c.leadership.lease.lost.clone();
        tokio::select! {
            _ = lost.cancelled(), if !c.releading => c.lead_again(),
            Some(event) = members.recv() => {
                c.apply(event);
                // Take every event already queued before placing (a snapshot comes with many).
                while let Ok(event) = members.try_recv() {
                    c.apply(event);
                }
                c.reconcile();
            }
            Some(down) = down_rx.recv() => c.replica_down(down),
            Some(report) = reports_rx.recv() => c.report(report)?,
            Some(req) = requests.recv() => {
                if let Request::Resign(r) = req {
                    let Leadership { id, lease } = c.leadership;
                    let released = lease.release(RELEASE_LIMIT).await;
                    tracing::info!(%id, released, "resigned the leadership");
                    let _ = r.send(());
                    return Ok(());
                }
                c.request(req)
            }
            _ = tick.tick() => {
                c.probe_suspects();
                c.read_epochs_if_lapsed();
                if c.give_up_vanished() || c.dirty {
                    c.reconcile();
                }
                c.rebalance();
            }
        }
    }
}

/// What a task the controller started reports to its loop.
enum Report {
    /// A placement change ended.
    Placed(Outcome),
    /// The suspects' Health answers (None: no answer within a second).
    Probed(Vec<(String, Option<wpb::HealthResponse>)>),
    /// The workers of a failed replica that did not answer.
    Unhealthy(Vec<String>),
    /// The campaign after the leadership lease was lost ended; the stored plan's epoch then.
    Relead(Result<(Leadership, u64), MembershipError>),
    /// A change stored the plan of this epoch (it assigns it to workers next).
    Stored(u64),
    /// The workers' placement epochs, read while the leadership lease may have lapsed.
    Epochs(Vec<(String, Option<u64>)>),
    /// A change's new and kept replicas serve at this epoch; the ones it retires come next
    /// (their requests move to these).
    Serving(u64, Vec<LiveReplica>),
}

/// The placement change under way.
struct Placing {
    /// The epoch it stores (None: nothing can be placed; the replicas only retire).
    epoch: Option<u64>,
    wanted: Vec<ReplicaPlan>,
    /// The replicas it loads.
    loading: Vec<ReplicaPlan>,
    /// Replicas whose failure was handled while it ran (not installed if it kept them).
    handled: HashSet<u64>,
    /// Failures of replicas the loop did not know yet (ones it loads): handled once installed.
    unknown: Vec<ReplicaDown>,
    /// Whether it reshapes (see [`Controller::reshaping`]), and to what.
    reshape: bool,
    shape: Wanted,
    /// Who waits for its plan to be stored (a reshape's).
    waiters: Vec<Reply<Result<Scaled, ControlError>>>,
}

struct Controller {
    cfg: ControlConfig,
    membership: Arc<dyn Membership>,
    leadership: Leadership,
    /// Campaigning again after etcd expired the leadership lease: nothing is placed meanwhile.
    releading: bool,
    /// Registered workers by id.
    cards: BTreeMap<String, WorkerCard>,
    /// Registered but failing their health checks (a step through them failed).
    suspects: HashSet<String>,
    /// Whether a probe of the suspects runs.
    probing: bool,
    /// Whether a read of the workers' epochs runs (see `lapse.rs`).
    reading_epochs: bool,
    /// The newest epoch this leader stored (workers may run it before the change ends).
    stored: u64,
    /// Draining workers and who waits for them to be released.
    draining: HashMap<String, Vec<Reply<Result<(), ControlError>>>>,
    epoch: u64,
    /// The stored plan's replicas, before this controller runs any (kept where possible).
    previous: Vec<ReplicaPlan>,
    live: Vec<LiveReplica>,
    placing: Option<Placing>,
    pool: watch::Sender<Arc<Pool>>,
    /// What every replica task gets.
    serving: Serving,
    reports: mpsc::UnboundedSender<Report>,
    next_replica: u64,
    /// A placement change is pending (etcd was unreachable, a replica failed to load, or the
    /// workers changed while a change ran).
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
    /// Redundant experts placed for live replicas (by id) that the next change applies.
    rebalanced: HashMap<u64, Vec<(usize, usize, usize)>>,
    /// Each replica's expert load when its copies were last placed, and when that was.
    observed: HashMap<u64, ExpertLoad>,
    last_rebalance: Instant,
    /// The wanted shape (the flags', or what an operator scaled to), and the flags'.
    want: Wanted,
    flags: Wanted,
    /// A reshape is under way: the live replicas of another layout are re-placed, their
    /// workers loading the new ranks beside the old ones.
    reshaping: bool,
    /// Who waits for a reshape's plan to be stored.
    scale_waiters: Vec<Reply<Result<Scaled, ControlError>>>,
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

    fn report(&mut self, report: Report) -> Result<(), MembershipError> {
        match report {
            Report::Placed(outcome) => self.placed(outcome)?,
            Report::Probed(answers) => self.probed(answers),
            Report::Unhealthy(ids) => {
                self.suspects.extend(ids);
                self.reconcile();
            }
            Report::Relead(result) => self.relead(result)?,
            Report::Stored(epoch) => {
                self.stored = self.stored.max(epoch);
                self.answer_scaled(epoch);
            }
            Report::Epochs(epochs) => self.epochs_read(epochs)?,
            Report::Serving(epoch, replicas) => {
                let pool = Pool { epoch, replicas, no_capacity: None, leading: true };
                self.pool.send_replace(Arc::new(pool));
            }
        }
        Ok(())
    }

    /// Etcd expired the leadership lease (it was out of reach for longer than the TTL):
    /// campaigns again in a task, serving the current placement meanwhile.
    fn lead_again(&mut self) {
        let id = self.cfg.id.clone();
        tracing::warn!(%id, "etcd expired the leadership lease; campaigning again, serving the current placement meanwhile");
        self.releading = true;
        let (membership, reports, limit) = (self.membership.clone(), self.reports.clone(), 2 * self.cfg.lease_ttl);
        tokio::spawn(async move {
            let campaign = async {
                let leadership = tokio::time::timeout(limit, membership.campaign(&id)).await.map_err(|_| {
                    MembershipError::NotLeader(format!("another coordinator holds the leader key ({limit:?} after this one's lease expired)"))
                })??;
                let stored = stored_plan(&*membership).await?.map_or(0, |p| p.epoch);
                Ok((leadership, stored))
            };
            let _ = reports.send(Report::Relead(campaign.await));
        });
    }

    /// Keeps leading after a campaign again: only if no other coordinator took the lead
    /// meanwhile (the leader key was free within two TTLs and the stored plan is still this
    /// leader's). Err (and the coordinator stops) otherwise.
    fn relead(&mut self, result: Result<(Leadership, u64), MembershipError>) -> Result<(), MembershipError> {
        self.releading = false;
        let (leadership, stored) = result?;
        let own = stored == self.epoch || self.placing.as_ref().is_some_and(|p| p.epoch == Some(stored));
        if !own {
            return Err(MembershipError::NotLeader(format!("another leader stored placement epoch {stored} past this one's {}", self.epoch)));
        }
        tracing::info!(id = %self.cfg.id, epoch = stored, "leading the cluster again");
        self.leadership = leadership;
        if self.dirty {
            self.reconcile();
        }
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

    /// The live replicas' plans (with the redundant experts placed for them since).
    fn current(&self) -> Vec<ReplicaPlan> {
        if self.live.is_empty() && self.epoch > 0 {
            return self.previous.clone();
        }
        let plan = |r: &LiveReplica| match self.rebalanced.get(&r.handle.id) {
            Some(copies) => ReplicaPlan { copies: copies.clone(), ..r.plan.clone() },
            None => r.plan.clone(),
        };
        self.live.iter().filter(|r| r.handle.is_alive()).map(plan).collect()
    }

    fn publish(&self) {
        let pool = Pool { epoch: self.epoch, replicas: self.live.clone(), no_capacity: self.no_capacity.clone(), leading: true };
        self.pool.send_replace(Arc::new(pool));
    }

    /// Brings the replicas in line with the live workers: plans, and when the placement
    /// differs starts a [`Change`] (one at a time; what happens meanwhile is placed after it).
    fn reconcile(&mut self) {
        if self.placing.is_some() || self.releading {
            self.dirty = true;
            return;
        }
        self.dirty = false;
        let (store, wanted) = match planner::plan_wanted(&self.cfg.config, &self.want, &self.cfg.sizing, &self.usable(), &self.kept_by_plan()) {
            Ok(wanted) => {
                let had_no_capacity = self.no_capacity.take().is_some();
                let live_plans: Vec<ReplicaPlan> = self.live.iter().filter(|r| r.handle.is_alive()).map(|r| r.plan.clone()).collect();
                if wanted == live_plans && live_plans.len() == self.live.len() {
                    self.publish();
                    self.release_drained();
                    return;
                }
                if had_no_capacity {
                    // Requests wait for the replicas this change loads instead of failing.
                    self.publish();
                }
                (Some(Plan { epoch: self.epoch + 1, replicas: wanted.clone(), wanted: (self.want != self.flags).then(|| self.want.clone()) }), wanted)
            }
            Err(reason) => {
                tracing::warn!(%reason, "no replica can be placed");
                self.no_capacity = Some(match &self.last_failure {
                    Some(f) => format!("{reason} (last failure: {f})"),
                    None => reason,
                });
                if self.live.is_empty() {
                    self.publish();
                    self.release_drained();
                    return;
                }
                (None, Vec::new())
            }
        };
        let epoch = store.as_ref().map(|p| p.epoch);
        // A replica is kept on the same workers in the same ranks; its redundant experts may
        // change in place.
        let (keep, retire): (Vec<LiveReplica>, Vec<LiveReplica>) =
            self.live.iter().cloned().partition(|r| wanted.iter().any(|w| w.same_ranks(&r.plan)) && r.handle.is_alive());
        let keep: Vec<(LiveReplica, ReplicaPlan)> = keep
            .into_iter()
            .filter_map(|r| {
                let plan = wanted.iter().find(|w| w.same_ranks(&r.plan))?.clone();
                Some((r, plan))
            })
            .collect();
        let mut load = Vec::new();
        for rp in wanted.iter().filter(|rp| !keep.iter().any(|(r, _)| r.plan.same_ranks(rp))) {
            match self.new_replica(rp, epoch.unwrap_or(self.epoch)) {
                Ok(r) => load.push(r),
                Err(id) => {
                    tracing::warn!(worker = %id, "a planned worker is not registered");
                    self.suspects.insert(id);
                    self.dirty = true;
                }
            }
        }
        let reshape = self.reshaping;
        let waiters = if reshape { std::mem::take(&mut self.scale_waiters) } else { Vec::new() };
        self.placing = Some(Placing {
            epoch,
            wanted,
            loading: load.iter().map(|r| r.plan.clone()).collect(),
            handled: HashSet::new(),
            unknown: Vec::new(),
            reshape,
            shape: self.want.clone(),
            waiters,
        });
        let reports = self.reports.clone();
        let change = Change {
            membership: self.membership.clone(),
            leader: self.leadership.id.clone(),
            store,
            load,
            keep,
            retire,
            reshape,
            serving: self.serving.clone(),
            reports: reports.clone(),
        };
        tokio::spawn(async move {
            let outcome = change.run().await;
            let _ = reports.send(Report::Placed(outcome));
        });
    }

    /// Installs what a [`Change`] did and publishes the new pool.
    fn placed(&mut self, outcome: Outcome) -> Result<(), MembershipError> {
        let Some(mut placing) = self.placing.take() else { return Ok(()) };
        // Waiters whose plan was not stored wait for the next one.
        self.scale_waiters.append(&mut placing.waiters);
        // Done, unless an operator asked for another shape meanwhile.
        if placing.reshape && placing.shape == self.want && outcome.stored.as_ref().is_ok_and(Option::is_some) && outcome.failures.is_empty() {
            tracing::info!(layout = ?self.want.layout, replicas = outcome.live.len(), "reshaped");
            self.reshaping = false;
        }
        match outcome.stored {
            Err(MembershipError::Store(e)) => {
                tracing::warn!(error = %e, "cannot store the plan; serving the last placement and retrying");
                self.dirty = true;
            }
            // The leadership lease was lost meanwhile: placed again once this leader leads again.
            Err(MembershipError::NotLeader(_)) if self.releading => self.dirty = true,
            Err(e) => return Err(e),
            Ok(stored) => {
                if let Some(epoch) = stored {
                    self.epoch = epoch;
                    // The kept replicas took the copies placed for them.
                    self.rebalanced.clear();
                }
                for (workers, message) in outcome.failures {
                    tracing::warn!(%message, ?workers, "a replica failed to load");
                    self.last_failure = Some(message);
                    self.suspects.extend(workers);
                    self.dirty = true;
                }
                for r in &outcome.ended {
                    self.ended(r);
                }
                let mut live: Vec<LiveReplica> = outcome.live.into_iter().filter(|r| !placing.handled.contains(&r.handle.id)).collect();
                live.sort_by_key(|r| placing.wanted.iter().position(|w| *w == r.plan));
                self.live = live;
                if stored.is_some() {
                    self.fence();
                }
                self.publish();
                self.release_drained();
            }
        }
        for down in placing.unknown {
            self.replica_down(down);
        }
        if self.dirty {
            self.reconcile();
        }
        Ok(())
    }

    /// A replica to load for `plan` at `epoch`; Err names a worker that is not registered.
    fn new_replica(&mut self, plan: &ReplicaPlan, epoch: u64) -> Result<NewReplica, String> {
        let mut workers = Vec::new();
        for id in &plan.workers {
            let card = self.cards.get(id).ok_or_else(|| id.clone())?;
            workers.push(Target { id: id.clone(), address: card.address.clone(), gpu: gpu_ordinal(&card.device) });
        }
        self.next_replica += 1;
        let mut assignments = self.assignments(plan, epoch);
        // A reshape loads a serving worker's new rank beside its old one, which serves on.
        for (a, id) in assignments.iter_mut().zip(&plan.workers) {
            let serving = self.live.iter().find(|r| r.handle.is_alive() && r.plan.workers.contains(id));
            a.alongside_of = serving.filter(|_| self.reshaping).map_or(0, |r| r.handle.epoch());
        }
        Ok(NewReplica { id: self.next_replica, plan: plan.clone(), workers, assignments })
    }

    /// Remembers the workers of a replica that ended, to be fenced by the next plan.
    fn ended(&mut self, r: &LiveReplica) {
        for (id, address) in r.plan.workers.iter().zip(&r.addresses) {
            if !self.unfenced.iter().any(|(u, _)| u == id) {
                self.unfenced.push((id.clone(), Some(address.clone())));
            }
        }
    }

    fn assignments(&self, plan: &ReplicaPlan, epoch: u64) -> Vec<wpb::LoadAssignmentRequest> {
        let l = &plan.layout;
        (0..l.world())
            .map(|rank| wpb::LoadAssignmentRequest {
                epoch,
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
                formed: epoch,
                expert_copies: plan
                    .copies
                    .iter()
                    .map(|&(layer, expert, rank)| wpb::ExpertCopy { layer: layer as u32, expert: expert as u32, ep_rank: rank as u32 })
                    .collect(),
                ..Default::default()
            })
            .collect()
    }

    /// A replica's step failed: it leaves the pool at once (its requests move), its workers
    /// are checked in a task, and those that do not answer become suspect before re-placing.
    fn replica_down(&mut self, down: ReplicaDown) {
        let Some(i) = self.live.iter().position(|r| r.handle.id == down.replica) else {
            if let Some(placing) = &mut self.placing {
                placing.unknown.push(down);
            }
            return;
        };
        if let Some(placing) = &mut self.placing {
            placing.handled.insert(down.replica);
        }
        let r = self.live.remove(i);
        self.ended(&r);
        self.serving.metrics.replica_failed();
        tracing::warn!(workers = ?r.plan.workers, message = %down.message, "replica down");
        self.publish();
        // Its steps may have been refused for a newer leader's epoch.
        self.read_epochs_if_lapsed();
        let workers = r.plan.workers.iter().cloned().zip(r.addresses.iter().cloned().map(Some)).collect();
        let (reports, dialer) = (self.reports.clone(), self.cfg.dialer.clone());
        tokio::spawn(async move {
            let silent = dialer.health_of(workers).await.into_iter().filter(|(_, health)| health.is_none()).map(|(id, _)| id).collect();
            let _ = reports.send(Report::Unhealthy(silent));
        });
    }

    /// Workers a live replica uses or a change under way loads.
    fn in_use(&self) -> HashSet<&String> {
        let loading = self.placing.iter().flat_map(|p| &p.loading);
        self.live.iter().map(|r| &r.plan).chain(loading).flat_map(|p| p.workers.iter()).collect()
    }

    fn request(&mut self, req: Request) {
        match req {
            Request::Status(reply) => {
                let _ = reply.send(self.view());
            }
            Request::Plan(reply) => {
                let planned =
                    planner::plan_wanted(&self.cfg.config, &self.want, &self.cfg.sizing, &self.usable(), &self.kept_by_plan()).map_err(ControlError::NoFit);
                let _ = reply.send(planned.map(|replicas| self.with_memory(replicas)));
            }
            Request::Scale(to, reply) => self.scale(to, reply),
            Request::Drain(id, reply) => {
                if !self.cards.contains_key(&id) {
                    let _ = reply.send(Err(ControlError::UnknownWorker(id)));
                    return;
                }
                tracing::info!(worker = %id, "draining");
                self.draining.entry(id).or_default().push(reply);
                // A worker nothing uses is released at once, even while a replica loads.
                self.release_drained();
                self.reconcile();
            }
            // Handled by the loop, which stops.
            Request::Resign(reply) => {
                let _ = reply.send(());
            }
        }
    }

    fn view(&self) -> ClusterView {
        let loading: HashSet<&String> = self.placing.iter().flat_map(|p| &p.loading).flat_map(|p| p.workers.iter()).collect();
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
                } else if loading.contains(&card.id) {
                    "loading"
                } else {
                    "idle"
                };
                WorkerView { card: card.clone(), state, placement }
            })
            .collect();
        ClusterView { epoch: self.epoch, leader: true, workers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store where another coordinator always leads.
    struct LedByAnother;

    #[tonic::async_trait]
    impl Membership for LedByAnother {
        async fn register(&self, _: &WorkerCard) -> Result<cluster::membership::Lease, MembershipError> {
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
        async fn store_plan(&self, _: &str, _: &str) -> Result<(), MembershipError> {
            Err(MembershipError::NotLeader("unused".into()))
        }
    }

    /// A controller that stops tells the process why (through `fatal`) instead of ending it.
    #[tokio::test]
    async fn a_stopped_controller_reports_why_to_the_process() {
        let config = ModelConfig::parse(cluster::config::MIX_BENCH, "mix-bench".as_ref()).expect("the mix-bench config parses");
        let cfg = ControlConfig {
            model: PathBuf::from("unused"),
            config,
            layout: Layout::default(),
            sizing: Sizing {
                dtype: cluster::WeightDType::Auto,
                quantization: cluster::Quantization::None,
                load_format: cluster::LoadFormat::Dummy,
                kv_blocks: 16,
                block_size: 16,
                redundant_experts: 0,
                rebalance_secs: 30,
            },
            sched: SchedulerConfig { num_blocks: 16, block_size: 16, max_num_seqs: 4, max_batch_tokens: 64, max_queue: 4, prefix_caching: true },
            dialer: Dialer::default(),
            prefix: cluster::kv_cache::PrefixHasher::new("mix-bench", 16),
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
