//! One replica: a [`Scheduler`] and the workers (its ranks) that execute its steps, driven by
//! a task (an actor: [`ReplicaHandle`] sends it requests and aborts). Each loop turn admits
//! what arrived, plans a step, sends it to every rank with the placement epoch, and delivers
//! the sampled tokens the driver rank returns to each request's channel. A request whose receiver is gone is aborted,
//! which frees its KV cache blocks at once. The hashes of the blocks its prefix cache holds
//! are mirrored in an index the frontends read to route requests (exact, updated every turn),
//! with those of the prompts it was given and has not finished (their blocks are being, or
//! will be, computed there: `n` choices and a burst of one prompt go to one replica, which
//! prefills it once).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cluster::TokenLogprobs;
use proto::tramontane::worker::v1 as pb;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::metrics::Metrics;
use cluster::embedding::Pooling;
use cluster::experts::ExpertLoad;
use cluster::kv_cache::{BlockHash, CacheEvent};
use cluster::scheduler::{Event, Finish, PlannedSeq, PrefixStats, Scheduler, SeqRequest, SeqResult};

/// What a request hears from its replica.
#[derive(Debug, Clone)]
pub enum ReplicaEvent {
    /// The request joined a batch; this many of its tokens were found in the prefix cache.
    Scheduled {
        cached_tokens: usize,
    },
    PromptLogprobs(Vec<TokenLogprobs>),
    Token(TokenLogprobs, Option<Finish>),
    /// An embedding request's answer (its last event).
    Embedding(Vec<f32>),
    /// The replica cannot finish the request (a worker failed, or the replica was retired by
    /// a new placement); the message says why. The request continues on another replica.
    Failed(String),
    /// The queue was full.
    Rejected(String),
    /// The request cannot go on anywhere (its output constraint failed); its last event.
    Error(String),
}

/// Load figures of a replica, refreshed every step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    pub running: usize,
    pub waiting: usize,
    pub used_blocks: usize,
    pub num_blocks: usize,
    pub prefix: PrefixStats,
}

/// Where a replica reports: the coordinator's metrics, the controller (a step that failed), and
/// the tokens its ranks' experts ran (empty for a dense model; the replica adds every step's).
pub struct Reports {
    pub metrics: Arc<Metrics>,
    pub down: mpsc::UnboundedSender<ReplicaDown>,
    pub experts: ExpertLoad,
}

/// A replica task that stopped because a rank's step failed.
#[derive(Debug, Clone)]
pub struct ReplicaDown {
    pub replica: u64,
    pub message: String,
}

type Reply<T> = tokio::sync::oneshot::Sender<T>;

/// The blocks a replica's prefix cache holds, and those of the prompts it is running: shared
/// by the replica's task (which writes it) and the frontends (which route with it).
#[derive(Debug, Default)]
struct PrefixIndex(Mutex<IndexedBlocks>);

#[derive(Debug, Default)]
struct IndexedBlocks {
    cached: HashSet<BlockHash>,
    /// Prompts' block hashes, counted by the requests that hold them.
    pending: HashMap<BlockHash, usize>,
}

impl PrefixIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, IndexedBlocks> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_pending(&self, hashes: &[BlockHash]) {
        let mut i = self.lock();
        for h in hashes {
            *i.pending.entry(*h).or_default() += 1;
        }
    }

    fn remove_pending(&self, hashes: &[BlockHash]) {
        let mut i = self.lock();
        for h in hashes {
            if let Some(n) = i.pending.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    i.pending.remove(h);
                }
            }
        }
    }

    /// Mirrors the prefix cache's changes.
    fn apply(&self, events: Vec<CacheEvent>) {
        let mut i = self.lock();
        for e in events {
            match e {
                CacheEvent::Stored(h) => i.cached.insert(h),
                CacheEvent::Evicted(h) => i.cached.remove(&h),
            };
        }
    }

    /// How many of `hashes`' leading blocks are cached or being computed.
    fn leading(&self, hashes: &[BlockHash]) -> usize {
        let i = self.lock();
        hashes.iter().take_while(|h| i.cached.contains(*h) || i.pending.contains_key(*h)).count()
    }
}

enum Command {
    /// A request, its prompt's block hashes, where its events go.
    Submit(Box<SeqRequest>, Vec<BlockHash>, mpsc::UnboundedSender<ReplicaEvent>),
    Abort(u64),
    /// At the next step boundary: send each rank its assignment again with a new epoch (the
    /// same shard, so nothing reloads; with these redundant experts, which the ranks change in
    /// place) and step in that epoch from then on.
    Advance(u64, Vec<pb::ExpertCopy>, Reply<Result<(), WorkerCallError>>),
    /// At the next step boundary: hand every request back (they move to other replicas) and
    /// stop.
    Retire(Reply<()>),
}

/// Clonable handle to a replica task.
#[derive(Clone)]
pub struct ReplicaHandle {
    pub id: u64,
    tx: mpsc::UnboundedSender<Command>,
    stats: watch::Receiver<ReplicaStats>,
    /// Requests submitted and not yet finished (for least-loaded routing).
    active: Arc<AtomicUsize>,
    /// The blocks its prefix cache holds or its requests compute (for cache-aware routing).
    prefix: Arc<PrefixIndex>,
    /// The tokens its experts ran since it started.
    experts: Arc<Mutex<ExpertLoad>>,
    /// The placement epoch it steps in.
    epoch: Arc<AtomicU64>,
}

impl ReplicaHandle {
    /// Starts the replica task over its ranks' workers, which already hold `assignments` (by
    /// rank); rank `driver` returns the sampled tokens.
    /// A failed step stops the task and is reported on `down`.
    pub fn spawn(
        id: u64,
        ranks: Vec<pb::worker_client::WorkerClient<Channel>>,
        assignments: Vec<pb::LoadAssignmentRequest>,
        driver: usize,
        scheduler: Scheduler,
        Reports { metrics, down, experts }: Reports,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stats_tx, stats) = watch::channel(ReplicaStats { num_blocks: scheduler.config().num_blocks, ..Default::default() });
        let active = Arc::new(AtomicUsize::new(0));
        let prefix = Arc::new(PrefixIndex::default());
        let epoch = assignments.first().map_or(0, |a| a.epoch);
        let stepping = Arc::new(AtomicU64::new(epoch));
        let experts = Arc::new(Mutex::new(experts));
        let task = ReplicaTask {
            id,
            assignments,
            down,
            stopped: false,
            ranks,
            driver,
            epoch,
            stepping: stepping.clone(),
            scheduler,
            prefix_index: prefix.clone(),
            prefixes: HashMap::new(),
            prefix: PrefixStats::default(),
            clients: HashMap::new(),
            queued: HashMap::new(),
            stats: stats_tx,
            active: active.clone(),
            metrics,
            experts: experts.clone(),
        };
        tokio::spawn(task.run(rx));
        ReplicaHandle { id, tx, stats, active, prefix, experts, epoch: stepping }
    }

    /// The placement epoch the replica steps in.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Whether the task still runs (it stops when a step fails or it is retired).
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Moves the replica to `epoch` with redundant experts `copies` ((layer, expert, expert
    /// rank)) at its next step boundary (see [`Command::Advance`]).
    pub async fn advance(&self, epoch: u64, copies: &[(usize, usize, usize)]) -> Result<(), WorkerCallError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let copies = copies.iter().map(|&(layer, expert, rank)| pb::ExpertCopy { layer: layer as u32, expert: expert as u32, ep_rank: rank as u32 }).collect();
        self.tx.send(Command::Advance(epoch, copies, reply)).map_err(|_| WorkerCallError::ReplicaStopped)?;
        rx.await.map_err(|_| WorkerCallError::ReplicaStopped)?
    }

    /// Hands the replica's requests back and stops it, at its next step boundary.
    pub async fn retire(&self) {
        let (reply, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Retire(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Queues a request whose prompt's full blocks hash to `prefix`; its events arrive on the
    /// returned channel.
    pub fn submit(&self, req: SeqRequest, prefix: Vec<BlockHash>) -> mpsc::UnboundedReceiver<ReplicaEvent> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        self.active.fetch_add(1, Ordering::Relaxed);
        // Known to routing at once, before the task takes it in.
        self.prefix.add_pending(&prefix);
        if let Err(mpsc::error::SendError(Command::Submit(_, prefix, _))) = self.tx.send(Command::Submit(Box::new(req), prefix, events_tx.clone())) {
            self.prefix.remove_pending(&prefix);
            self.active.fetch_sub(1, Ordering::Relaxed);
            let _ = events_tx.send(ReplicaEvent::Failed("the replica has stopped".into()));
        }
        events_rx
    }

    pub fn abort(&self, id: u64) {
        let _ = self.tx.send(Command::Abort(id));
    }

    pub fn stats(&self) -> ReplicaStats {
        *self.stats.borrow()
    }

    /// The tokens its experts ran since it started (by layer and expert).
    pub fn expert_load(&self) -> ExpertLoad {
        self.experts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// How many of `hashes`' leading blocks its prefix cache holds or its requests compute.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> usize {
        self.prefix.leading(hashes)
    }
}

struct ReplicaTask {
    id: u64,
    /// The epoch as the handle reads it.
    stepping: Arc<AtomicU64>,
    /// Each rank's assignment (its epoch is the one it was loaded in).
    assignments: Vec<pb::LoadAssignmentRequest>,
    down: mpsc::UnboundedSender<ReplicaDown>,
    /// Set when the task must end after this turn.
    stopped: bool,
    ranks: Vec<pb::worker_client::WorkerClient<Channel>>,
    driver: usize,
    epoch: u64,
    scheduler: Scheduler,
    prefix_index: Arc<PrefixIndex>,
    /// Each request's prompt block hashes (pending in the index until it finishes).
    prefixes: HashMap<u64, Vec<BlockHash>>,
    /// The scheduler's prefix cache counters as last published.
    prefix: PrefixStats,
    clients: HashMap<u64, mpsc::UnboundedSender<ReplicaEvent>>,
    /// Arrival times of requests not yet scheduled, for the queue-time metric.
    queued: HashMap<u64, std::time::Instant>,
    stats: watch::Sender<ReplicaStats>,
    active: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    experts: Arc<Mutex<ExpertLoad>>,
}

impl ReplicaTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        loop {
            if self.stopped {
                return;
            }
            if !self.scheduler.has_work() {
                match rx.recv().await {
                    Some(cmd) => self.handle(cmd).await,
                    None => return,
                }
            }
            while let Ok(cmd) = rx.try_recv() {
                self.handle(cmd).await;
            }
            if self.stopped {
                return;
            }
            self.drop_abandoned();
            let started = std::time::Instant::now();
            if let Some(plan) = self.scheduler.schedule() {
                self.publish_stats();
                self.execute(plan, started).await;
            }
            self.publish_stats();
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Advance(epoch, copies, reply) => {
                let _ = reply.send(self.advance(epoch, copies).await);
            }
            Command::Retire(reply) => {
                self.hand_back("the replica was retired by a new placement");
                self.stopped = true;
                let _ = reply.send(());
            }
            Command::Submit(_, prefix, events) if self.stopped => {
                self.prefix_index.remove_pending(&prefix);
                self.active.fetch_sub(1, Ordering::Relaxed);
                let _ = events.send(ReplicaEvent::Failed("the replica has stopped".into()));
            }
            Command::Submit(req, prefix, events) => {
                let id = req.id;
                match self.scheduler.add(*req) {
                    Ok(()) => {
                        self.clients.insert(id, events);
                        self.prefixes.insert(id, prefix);
                        self.queued.insert(id, std::time::Instant::now());
                    }
                    Err(e) => {
                        self.prefix_index.remove_pending(&prefix);
                        self.active.fetch_sub(1, Ordering::Relaxed);
                        let _ = events.send(ReplicaEvent::Rejected(e.to_string()));
                    }
                }
            }
            Command::Abort(id) => self.finish(id),
        }
    }

    /// Frees the blocks of requests whose client went away.
    fn drop_abandoned(&mut self) {
        let gone: Vec<u64> = self.clients.iter().filter(|(_, tx)| tx.is_closed()).map(|(id, _)| *id).collect();
        for id in gone {
            self.finish(id);
        }
    }

    fn finish(&mut self, id: u64) {
        self.scheduler.abort(id);
        self.queued.remove(&id);
        if self.clients.remove(&id).is_some() {
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(prefix) = self.prefixes.remove(&id) {
            self.prefix_index.remove_pending(&prefix);
        }
    }

    fn publish_stats(&mut self) {
        let events = self.scheduler.take_cache_events();
        if !events.is_empty() {
            self.prefix_index.apply(events);
        }
        let prefix = self.scheduler.prefix_stats();
        self.metrics.prefix_cache(prefix.queries - self.prefix.queries, prefix.hits - self.prefix.hits);
        self.prefix = prefix;
        let stats = ReplicaStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            used_blocks: self.scheduler.used_blocks(),
            num_blocks: self.stats.borrow().num_blocks,
            prefix,
        };
        self.stats.send_if_modified(|s| std::mem::replace(s, stats) != stats);
    }

    /// Runs a planned step; `started` is when planning began (for the overhead metric).
    async fn execute(&mut self, plan: Vec<PlannedSeq>, started: std::time::Instant) {
        self.metrics.batch_size(plan.len());
        for p in &plan {
            if let Some(arrived) = self.queued.remove(&p.id) {
                self.metrics.queue_time(arrived.elapsed().as_secs_f64());
                if let Some(tx) = self.clients.get(&p.id) {
                    let _ = tx.send(ReplicaEvent::Scheduled { cached_tokens: p.start_pos });
                }
            }
        }
        let request = pb::StepRequest { epoch: self.epoch, sequences: plan.iter().map(to_pb).collect(), released: self.scheduler.take_released() };
        match self.step_all_ranks(request).await {
            Ok(response) => {
                let compute_micros = response.compute_micros;
                self.count_experts(&response.expert_tokens);
                let results = response
                    .results
                    .into_iter()
                    .map(|r| SeqResult {
                        sampled: r.sampled.map(from_pb),
                        prompt_logprobs: r.prompt_logprobs.into_iter().map(from_pb).collect(),
                        embedding: (!r.embedding.is_empty()).then_some(r.embedding),
                        error: r.error,
                    })
                    .collect();
                for event in self.scheduler.complete(&plan, results) {
                    self.deliver(event);
                }
                self.metrics.step(started.elapsed(), compute_micros, plan.iter().map(|p| p.tokens.len()).sum());
            }
            Err(status) => {
                tracing::error!(replica = self.id, %status, "step failed; moving the replica's requests and stopping it");
                self.hand_back(&format!("a worker of the replica failed: {}", status.message()));
                self.stopped = true;
                let _ = self.down.send(ReplicaDown { replica: self.id, message: status.message().to_owned() });
            }
        }
    }

    /// Adds a step's expert counts (from every rank that reported some) to the replica's load.
    fn count_experts(&self, counts: &[pb::ExpertTokens]) {
        if counts.is_empty() {
            return;
        }
        let mut load = self.experts.lock().unwrap_or_else(|p| p.into_inner());
        for c in counts {
            if let Err(e) = load.add(c.layer as usize, c.ep_rank as usize, &c.tokens) {
                tracing::warn!(replica = self.id, error = %e, "a worker reported expert counts this model does not have");
            }
        }
    }

    /// Every request gets `Failed` (its generation moves it to another replica).
    fn hand_back(&mut self, why: &str) {
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            if let Some(tx) = self.clients.get(&id) {
                let _ = tx.send(ReplicaEvent::Failed(why.to_owned()));
            }
            self.finish(id);
        }
    }

    async fn advance(&mut self, epoch: u64, copies: Vec<pb::ExpertCopy>) -> Result<(), WorkerCallError> {
        let mut kept = true;
        for (rank, (worker, assignment)) in self.ranks.iter().zip(&mut self.assignments).enumerate() {
            assignment.expert_copies = copies.clone();
            let request = pb::LoadAssignmentRequest { epoch, ..assignment.clone() };
            let loaded = worker.clone().load_assignment(request).await.map_err(|status| WorkerCallError::Refused { rank, status })?;
            kept &= loaded.into_inner().kept;
        }
        if !kept {
            // A rank loaded its shard anew (its process was restarted while the replica was
            // idle): its KV cache is empty. Nothing that was in it may be used again.
            tracing::warn!(replica = self.id, "a rank of the replica reloaded: its KV cache is gone");
            self.hand_back("a worker of the replica lost its KV cache");
            self.scheduler.forget_cached();
        }
        self.epoch = epoch;
        self.stepping.store(epoch, Ordering::Relaxed);
        Ok(())
    }

    /// Sends the step to every rank at once (they exchange activations while running it) and
    /// returns the driver's answer, with every rank's expert counts; any rank's failure fails
    /// the step.
    async fn step_all_ranks(&self, request: pb::StepRequest) -> Result<pb::StepResponse, tonic::Status> {
        if self.ranks.len() == 1 {
            return self.ranks[0].clone().step(request).await.map(tonic::Response::into_inner);
        }
        let calls: Vec<_> = self
            .ranks
            .iter()
            .map(|w| {
                let (mut w, req) = (w.clone(), request.clone());
                tokio::spawn(async move { w.step(req).await.map(tonic::Response::into_inner) })
            })
            .collect();
        let mut driver = None;
        let mut failed = None;
        let mut experts = Vec::new();
        for (rank, call) in calls.into_iter().enumerate() {
            match call.await {
                Ok(Ok(mut resp)) => {
                    experts.append(&mut resp.expert_tokens);
                    if rank == self.driver {
                        driver = Some(resp);
                    }
                }
                Ok(Err(status)) => {
                    failed.get_or_insert(tonic::Status::new(status.code(), format!("rank {rank}: {}", status.message())));
                }
                Err(e) => {
                    failed.get_or_insert(tonic::Status::internal(format!("rank {rank}: {e}")));
                }
            }
        }
        match (failed, driver) {
            (None, Some(resp)) => Ok(pb::StepResponse { expert_tokens: experts, ..resp }),
            (Some(status), _) => Err(status),
            (None, None) => Err(tonic::Status::internal("the driver rank returned nothing")),
        }
    }

    fn deliver(&mut self, event: Event) {
        let (id, event, done) = match event {
            Event::PromptLogprobs { id, logprobs } => (id, ReplicaEvent::PromptLogprobs(logprobs), false),
            Event::Token { id, token, finished } => (id, ReplicaEvent::Token(token, finished), finished.is_some()),
            Event::Embedding { id, embedding } => (id, ReplicaEvent::Embedding(embedding), true),
            Event::Error { id, message } => (id, ReplicaEvent::Error(message), true),
        };
        let sent = self.clients.get(&id).is_some_and(|tx| tx.send(event).is_ok());
        if done || !sent {
            self.finish(id);
        }
    }
}

/// A call to a replica's workers that failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerCallError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("rank {rank}: {}", status.message())]
    Refused { rank: usize, status: tonic::Status },
    /// A call outside a replica's ranks (fence, release) answered with an error.
    #[error("{}", .0.message())]
    Failed(tonic::Status),
    #[error("the replica has stopped")]
    ReplicaStopped,
    #[error("nothing to move to: the plan was not stored")]
    NoEpoch,
}

fn to_pb(p: &PlannedSeq) -> pb::SequenceStep {
    pb::SequenceStep {
        seq_id: p.id,
        tokens: p.tokens.clone(),
        start_pos: p.start_pos as u32,
        block_table: p.block_table.clone(),
        sampling: p.sample.as_ref().map(|s| pb::Sampling {
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: s.top_p,
            seed: s.seed,
            logprobs: s.logprobs.unwrap_or(0) as u32,
            presence_penalty: s.penalties.presence,
            frequency_penalty: s.penalties.frequency,
            repetition_penalty: s.penalties.repetition,
            logit_bias: s.logit_bias.iter().copied().collect(),
            min_tokens: s.min_tokens as u32,
            stop_token_ids: if s.min_tokens > 0 { s.stop_token_ids.clone() } else { Vec::new() },
            prompt_len: s.prompt_len as u32,
        }),
        prompt_logprobs: p.prompt_logprobs.map(|n| n as u32),
        keep_history: p.keep_history.map(|n| n as u32),
        history: p.history.clone(),
        grammar: p.grammar.as_deref().map(str::to_owned),
        embed: match p.embed {
            None => pb::Pooling::None,
            Some(Pooling::Last) => pb::Pooling::Last,
            Some(Pooling::Mean) => pb::Pooling::Mean,
        } as i32,
    }
}

fn from_pb(t: pb::TokenLogprobs) -> TokenLogprobs {
    TokenLogprobs { token: t.token_id, logprob: t.logprob, top: t.top_ids.into_iter().zip(t.top_logprobs).collect() }
}
