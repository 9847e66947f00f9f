//! The worker's gRPC service (`tramontane.worker.v1.Worker`). The engine lives on one OS
//! thread (an actor: [`EngineHandle`] sends it commands); the state it owns,
//! [`WorkerState`], enforces placement epochs: a step from any epoch other than the current
//! one is refused, and an assignment older than the current one is refused (fencing).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::tramontane::worker::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::backend::{Backend, Cpu};
use crate::comm::{Comm, CommListener, TcpComm, TcpOptions};
use crate::embedding::Pooling;
use crate::engine::{CacheConfig, Engine, EngineOptions, SeqStep, open_model};
use crate::error::{BadRequest, EngineError};
use crate::layout::Layout;
use crate::rank::Parallel;
use crate::sampling::{MAX_TOP_LOGPROBS, Penalties, SamplingParams, TokenLogprobs};

/// Why the worker refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("stale placement epoch {got}: this worker serves epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("no model is loaded (send LoadAssignment first)")]
    NotLoaded,
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the engine thread has stopped")]
    EngineStopped,
    #[error("{0}")]
    Unsupported(String),
}

impl From<ServiceError> for tonic::Status {
    fn from(e: ServiceError) -> Self {
        use tonic::Status;
        let msg = e.to_string();
        match e {
            ServiceError::StaleEpoch { .. } | ServiceError::NotLoaded | ServiceError::Unsupported(_) => Status::failed_precondition(msg),
            ServiceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServiceError::EngineStopped => Status::unavailable(msg),
            ServiceError::Engine(e) => match e {
                EngineError::InvalidRequest(_) | EngineError::Layout(_) => Status::invalid_argument(msg),
                // A peer of the replica died or the links could not be set up: the replica
                // is unusable until the coordinator assigns a new layout.
                EngineError::Comm(_) => Status::unavailable(msg),
                EngineError::Cluster(e) => match e {
                    cluster::Error::OutOfBlocks { .. } => Status::resource_exhausted(msg),
                    cluster::Error::Tokenize(_) => Status::invalid_argument(msg),
                    cluster::Error::Io { .. }
                    | cluster::Error::Config { .. }
                    | cluster::Error::UnsupportedArchitecture(_)
                    | cluster::Error::Tokenizer { .. } => Status::failed_precondition(msg),
                },
                EngineError::Io { .. }
                | EngineError::Checkpoint { .. }
                | EngineError::MissingTensor { .. }
                | EngineError::TensorShape { .. }
                | EngineError::TensorDtype { .. } => Status::failed_precondition(msg),
                EngineError::Backend(_) => {
                    tracing::error!(error = %msg, "backend failure");
                    Status::internal("the worker's backend failed; see the worker's log")
                }
            },
        }
    }
}

/// How this worker links to the peers of a sharded replica.
pub struct CommSetup {
    /// Accepts peers' TCP links; `None` serves only single-rank replicas.
    pub listener: Option<CommListener>,
    pub options: TcpOptions,
    /// The host peers reach the listener at, when it is bound to a wildcard address.
    pub advertise_host: Option<String>,
}

impl Default for CommSetup {
    fn default() -> Self {
        CommSetup { listener: None, options: TcpOptions { timeout: Duration::from_secs(30), setup_timeout: Duration::from_secs(60) }, advertise_host: None }
    }
}

/// The state the engine thread owns.
pub struct WorkerState<B: Backend = Cpu> {
    backend: B,
    epoch: u64,
    engine: Option<Engine<B>>,
    /// The loaded assignment, epoch cleared (a newer epoch of the same one only moves the epoch).
    assigned: Option<pb::LoadAssignmentRequest>,
    comm: CommSetup,
    /// The memory this worker offers (reported by Health; 0 = unknown).
    memory_bytes: u64,
    /// How many times a supervisor restarted this worker (reported by Health).
    restarts: u32,
    /// A coordinator fenced this worker at `epoch`: older assignments are refused too.
    fenced: bool,
    /// The loaded assignment's redundant experts.
    copies: Vec<pb::ExpertCopy>,
}

impl Default for WorkerState<Cpu> {
    fn default() -> Self {
        WorkerState::new(Cpu, CommSetup::default())
    }
}

impl<B: Backend> WorkerState<B> {
    pub fn new(backend: B, comm: CommSetup) -> Self {
        WorkerState { backend, epoch: 0, engine: None, assigned: None, comm, memory_bytes: 0, restarts: 0, fenced: false, copies: Vec::new() }
    }

    /// The memory this worker offers for weights and KV cache, as Health reports it.
    pub fn with_memory_bytes(self, memory_bytes: u64) -> Self {
        WorkerState { memory_bytes, ..self }
    }

    /// What the worker offers and how often it was restarted, as Health reports them.
    pub fn with_offer(self, offer: Offer) -> Self {
        WorkerState { memory_bytes: offer.memory_bytes, restarts: offer.restarts, ..self }
    }

    /// Drops the model (replaced, fenced, replica broken): steps are refused until a new
    /// assignment.
    pub fn unload(&mut self, why: &str) {
        if self.engine.take().is_some() {
            tracing::warn!(why, "unloaded the model");
        }
        self.assigned = None;
        self.copies.clear();
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn load(&mut self, req: &pb::LoadAssignmentRequest) -> Result<pb::LoadAssignmentResponse, ServiceError> {
        if (self.engine.is_some() || self.fenced) && req.epoch < self.epoch {
            return Err(ServiceError::StaleEpoch { got: req.epoch, current: self.epoch });
        }
        let unknown = |field: &str, v: i32| ServiceError::InvalidArgument(format!("`{field}`: unknown value {v} (a newer coordinator?)"));
        let load_format = pb::LoadFormat::try_from(req.load_format).map_err(|_| unknown("load_format", req.load_format))?.into();
        let same = pb::LoadAssignmentRequest { epoch: 0, expert_copies: Vec::new(), ..req.clone() };
        if let (Some(engine), Some(assigned)) = (&mut self.engine, &self.assigned)
            && *assigned == same
        {
            if req.expert_copies != self.copies {
                let copies = expert_copies(req, engine.config())?;
                let (_, source) = open_model(&PathBuf::from(&req.model_path), load_format)?;
                engine.set_expert_copies(&source, &copies)?;
                self.copies = req.expert_copies.clone();
            }
            self.epoch = req.epoch;
            return Ok(pb::LoadAssignmentResponse { kept: true, ..loaded(engine) });
        }
        let dtype = pb::WeightDtype::try_from(req.dtype).map_err(|_| unknown("dtype", req.dtype))?.into();
        let quantization = pb::Quantization::try_from(req.quantization).map_err(|_| unknown("quantization", req.quantization))?.into();
        if req.kv_blocks == 0 || req.block_size == 0 {
            return Err(ServiceError::InvalidArgument("`kv_blocks` and `block_size` must be >= 1".into()));
        }
        let options =
            EngineOptions { dtype, quantization, load_format, cache: CacheConfig { num_blocks: req.kv_blocks as usize, block_size: req.block_size as usize } };
        let one = |v: u32| v.max(1) as usize;
        let layout = Layout { tp: one(req.tp), ep: one(req.ep), pp: one(req.pp), stage_layers: req.stage_layers.iter().map(|&n| n as usize).collect() };
        let world = layout.world();
        if req.rank as usize >= world || (world > 1 && req.peers.len() != world) {
            return Err(ServiceError::InvalidArgument(format!("rank {} with {} peers does not fit a layout of {world} ranks", req.rank, req.peers.len())));
        }
        // Check the checkpoint opens and the layout fits before giving up the current model;
        // then drop the old shard before loading the new one, so two need not fit at once.
        let (config, source) = open_model(&PathBuf::from(&req.model_path), load_format)?;
        layout.validate(&config).map_err(EngineError::from)?;
        let copies = expert_copies(req, &config)?;
        self.unload("a new assignment replaces it");
        let par = if world == 1 { Parallel::single() } else { Parallel::new(layout, self.connect(req, world)?).map_err(EngineError::from)? };
        let mut engine = Engine::from_source(self.backend.clone(), &config, &source, &options, par)?;
        engine.set_tokenizer(PathBuf::from(&req.model_path).join("tokenizer.json"));
        if !copies.is_empty() {
            engine.set_expert_copies(&source, &copies)?;
        }
        let response = loaded(&engine);
        self.engine = Some(engine);
        self.assigned = Some(same);
        self.copies = req.expert_copies.clone();
        self.epoch = req.epoch;
        Ok(response)
    }

    /// Links this rank to the other ranks of its replica.
    fn connect(&self, req: &pb::LoadAssignmentRequest, world: usize) -> Result<Arc<dyn Comm>, ServiceError> {
        let rank = req.rank as usize;
        match pb::Communicator::try_from(req.comm) {
            Ok(pb::Communicator::Tcp) => {
                let listener = self
                    .comm
                    .listener
                    .as_ref()
                    .ok_or_else(|| ServiceError::InvalidArgument("this worker has no communicator listener for sharded replicas".into()))?;
                let comm = TcpComm::connect(listener, req.epoch, rank, &req.peers, self.comm.options).map_err(EngineError::from)?;
                Ok(Arc::new(comm))
            }
            Ok(pb::Communicator::Nccl) => nccl(req, world),
            Err(_) => Err(ServiceError::InvalidArgument(format!("unknown communicator {} (expected TCP or NCCL)", req.comm))),
        }
    }

    /// Unloads the model (saying `why`) and makes `epoch` the current one: a placement of
    /// that epoch no longer uses this worker (it fenced or released it), and every older
    /// step or assignment is refused from now on.
    pub fn fence(&mut self, epoch: u64, why: &str) -> Result<(), ServiceError> {
        if epoch < self.epoch {
            return Err(ServiceError::StaleEpoch { got: epoch, current: self.epoch });
        }
        self.unload(why);
        self.epoch = epoch;
        self.fenced = true;
        Ok(())
    }

    pub fn step(&mut self, req: &pb::StepRequest) -> Result<pb::StepResponse, ServiceError> {
        if req.epoch < self.epoch {
            return Err(ServiceError::StaleEpoch { got: req.epoch, current: self.epoch });
        }
        let engine = self.engine.as_mut().ok_or(ServiceError::NotLoaded)?;
        if req.epoch != self.epoch {
            return Err(ServiceError::StaleEpoch { got: req.epoch, current: self.epoch });
        }
        let vocab = engine.config().vocab_size;
        let params: Vec<Option<SamplingParams>> =
            req.sequences.iter().map(|s| s.sampling.as_ref().map(|p| sampling_params(p, vocab)).transpose()).collect::<Result<_, _>>()?;
        if let Some(n) = req.sequences.iter().filter_map(|s| s.prompt_logprobs).find(|&n| n as usize > MAX_TOP_LOGPROBS) {
            return Err(ServiceError::InvalidArgument(format!("`prompt_logprobs` must be <= {MAX_TOP_LOGPROBS}, got {n}")));
        }
        let steps: Vec<SeqStep<'_>> = req
            .sequences
            .iter()
            .zip(&params)
            .map(|(s, p)| SeqStep {
                id: s.seq_id,
                tokens: &s.tokens,
                start_pos: s.start_pos as usize,
                block_table: &s.block_table,
                sample: p.as_ref(),
                prompt_logprobs: s.prompt_logprobs.map(|n| n as usize),
                keep_history: s.keep_history.map(|n| n as usize),
                history: &s.history,
                embed: match pb::Pooling::try_from(s.embed) {
                    Ok(pb::Pooling::Last) => Some(Pooling::Last),
                    Ok(pb::Pooling::Mean) => Some(Pooling::Mean),
                    _ => None,
                },
                grammar: s.grammar.as_deref(),
            })
            .collect();
        let started = std::time::Instant::now();
        engine.release(&req.released);
        let outputs = match engine.step(&steps) {
            Ok(o) => o,
            Err(e @ EngineError::Comm(_)) => {
                // The replica's group is broken: this shard is useless until reassigned.
                self.unload("a peer of the replica failed");
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let compute_micros = started.elapsed().as_micros() as u64;
        // The ranks of a tensor-parallel group run the same tokens: the first one counts them.
        let counted = engine.take_expert_tokens();
        let coords = engine.parallel().coords;
        let expert_tokens = match coords.tensor {
            0 => counted.into_iter().map(|(layer, tokens)| pb::ExpertTokens { layer: layer as u32, tokens, ep_rank: coords.expert as u32 }).collect(),
            _ => Vec::new(),
        };
        if !engine.parallel().is_driver() {
            return Ok(pb::StepResponse { results: Vec::new(), compute_micros, expert_tokens });
        }
        let results = req
            .sequences
            .iter()
            .zip(outputs)
            .map(|(s, o)| pb::SequenceResult {
                seq_id: s.seq_id,
                sampled: o.sampled.map(to_pb),
                prompt_logprobs: o.prompt_logprobs.into_iter().map(to_pb).collect(),
                embedding: o.embedding.unwrap_or_default(),
                error: o.error,
            })
            .collect();
        Ok(pb::StepResponse { results, compute_micros, expert_tokens })
    }

    pub fn health(&self) -> pb::HealthResponse {
        match &self.engine {
            None => pb::HealthResponse {
                epoch: self.epoch,
                comm_address: self.comm_address(),
                peak_rss_bytes: peak_rss_bytes(),
                pid: std::process::id(),
                memory_bytes: self.memory_bytes,
                restarts: self.restarts,
                ..Default::default()
            },
            Some(e) => {
                let c = e.config();
                pb::HealthResponse {
                    epoch: self.epoch,
                    architecture: c.architecture.hf_name().to_owned(),
                    kv_blocks: e.cache_config().num_blocks as u32,
                    block_size: e.cache_config().block_size as u32,
                    weight_bytes: e.weight_bytes() as u64,
                    comm_address: self.comm_address(),
                    rank: e.parallel().rank as u32,
                    world: e.parallel().layout.world() as u32,
                    peak_rss_bytes: peak_rss_bytes(),
                    pid: std::process::id(),
                    memory_bytes: self.memory_bytes,
                    restarts: self.restarts,
                }
            }
        }
    }
}

impl<B: Backend> WorkerState<B> {
    fn comm_address(&self) -> String {
        let Some(addr) = self.comm.listener.as_ref().and_then(|l| l.local_addr().ok()) else { return String::new() };
        match &self.comm.advertise_host {
            Some(host) => format!("{host}:{}", addr.port()),
            None => addr.to_string(),
        }
    }
}

#[cfg(feature = "_cuda")]
fn nccl(req: &pb::LoadAssignmentRequest, world: usize) -> Result<Arc<dyn Comm>, ServiceError> {
    let comm = crate::comm::NcclComm::init(req.device as usize, req.rank as usize, world, &req.nccl_id).map_err(EngineError::from)?;
    Ok(Arc::new(comm))
}

#[cfg(not(feature = "_cuda"))]
fn nccl(_: &pb::LoadAssignmentRequest, _: usize) -> Result<Arc<dyn Comm>, ServiceError> {
    Err(ServiceError::Unsupported("this worker was built without the `cuda` feature: no NCCL communicator".into()))
}

fn create_nccl_id() -> Result<Vec<u8>, ServiceError> {
    #[cfg(feature = "_cuda")]
    return crate::comm::nccl_unique_id().map_err(|e| ServiceError::Unsupported(e.to_string()));
    #[cfg(not(feature = "_cuda"))]
    Err(ServiceError::Unsupported("this worker was built without the `cuda` feature: no NCCL".into()))
}

/// The process's peak resident set (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> u64 {
    crate::process::proc_kb_field("/proc/self/status", "VmHWM")
}

/// What LoadAssignment answers about the loaded model.
/// An assignment's redundant experts as (layer, expert, expert-parallel rank), each checked
/// against the model and the layout: a Mixtral layer and expert, a rank of the expert group
/// that does not own the expert, no copy twice.
fn expert_copies(req: &pb::LoadAssignmentRequest, config: &crate::ModelConfig) -> Result<Vec<(usize, usize, usize)>, ServiceError> {
    let (layers, experts, ep) = (config.num_hidden_layers, config.num_local_experts, req.ep.max(1) as usize);
    if !req.expert_copies.is_empty() && (config.architecture != cluster::Architecture::Mixtral || ep == 1) {
        return Err(ServiceError::InvalidArgument("`expert_copies` need a Mixtral model with expert parallelism".into()));
    }
    let mut copies = Vec::with_capacity(req.expert_copies.len());
    for c in &req.expert_copies {
        let copy = (c.layer as usize, c.expert as usize, c.ep_rank as usize);
        let owned = copy.1 < experts && cluster::experts::owner(experts, copy.1, ep) == copy.2;
        if copy.0 >= layers || copy.1 >= experts || copy.2 >= ep || owned || copies.contains(&copy) {
            return Err(ServiceError::InvalidArgument(format!(
                "`expert_copies`: layer {} expert {} on rank {} (the model has {layers} layers of {experts} experts over {ep} ranks; a rank holds an expert once)",
                copy.0, copy.1, copy.2
            )));
        }
        copies.push(copy);
    }
    Ok(copies)
}

fn loaded<B: Backend>(engine: &Engine<B>) -> pb::LoadAssignmentResponse {
    let c = engine.config();
    pb::LoadAssignmentResponse {
        architecture: c.architecture.hf_name().to_owned(),
        vocab_size: c.vocab_size as u32,
        max_context: c.max_position_embeddings as u32,
        kept: false,
    }
}

fn sampling_params(p: &pb::Sampling, vocab: usize) -> Result<SamplingParams, ServiceError> {
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        seed: p.seed,
        // How many tokens is the coordinator's concern; at least min_tokens, which it checked.
        max_tokens: p.min_tokens.max(1) as usize,
        stop_token_ids: p.stop_token_ids.clone(),
        logprobs: Some(p.logprobs as usize),
        prompt_logprobs: None,
        logit_bias: p.logit_bias.iter().map(|(&t, &b)| (t, b)).collect(),
        penalties: Penalties {
            presence: p.presence_penalty,
            frequency: p.frequency_penalty,
            repetition: if p.repetition_penalty == 0.0 { 1.0 } else { p.repetition_penalty },
        },
        min_tokens: p.min_tokens as usize,
        prompt_len: p.prompt_len as usize,
        embed: None,
        // The grammar comes with the chunk that starts the kept tokens (`SequenceStep`).
        grammar: None,
    };
    params.validate(vocab).map_err(|e| EngineError::from(BadRequest::from(e)))?;
    Ok(params)
}

fn to_pb(t: TokenLogprobs) -> pb::TokenLogprobs {
    pb::TokenLogprobs { token_id: t.token, logprob: t.logprob, top_ids: t.top.iter().map(|a| a.0).collect(), top_logprobs: t.top.iter().map(|a| a.1).collect() }
}

enum Command {
    Release(u64, oneshot::Sender<Result<(), ServiceError>>),
    Fence(u64, oneshot::Sender<Result<(), ServiceError>>),
    Load(Box<pb::LoadAssignmentRequest>, oneshot::Sender<Result<pb::LoadAssignmentResponse, ServiceError>>),
    Step(pb::StepRequest, oneshot::Sender<Result<pb::StepResponse, ServiceError>>),
    Health(oneshot::Sender<pb::HealthResponse>),
}

/// Clonable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Cancelled when the coordinator releases this worker (the process then exits).
    released: tokio_util::sync::CancellationToken,
    offer: Offer,
}

/// What a worker offers the cluster, fixed when it starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Offer {
    /// Memory for weights and KV cache (0 = unknown).
    pub memory_bytes: u64,
    /// How many times a supervisor restarted this worker after it died.
    pub restarts: u32,
}

impl EngineHandle {
    /// Starts the engine thread on `backend`; it stops when every handle is dropped. Health
    /// reports the `offer`.
    pub fn spawn<B: Backend>(backend: B, comm: CommSetup, offer: Offer) -> std::io::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Command>(64);
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let mut state = WorkerState::new(backend, comm).with_offer(offer);
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Release(epoch, reply) => {
                        let _ = reply.send(state.fence(epoch, "released by the coordinator"));
                    }
                    Command::Fence(epoch, reply) => {
                        let _ = reply.send(state.fence(epoch, &format!("fenced: placement epoch {epoch} does not use this worker")));
                    }
                    Command::Load(req, reply) => {
                        let _ = reply.send(state.load(&req));
                    }
                    Command::Step(req, reply) => {
                        let _ = reply.send(state.step(&req));
                    }
                    Command::Health(reply) => {
                        let _ = reply.send(state.health());
                    }
                }
            }
        })?;
        Ok(EngineHandle { tx, released: tokio_util::sync::CancellationToken::new(), offer })
    }

    /// What this worker offers (memory, restarts).
    pub fn offer(&self) -> Offer {
        self.offer
    }

    /// Fires when the coordinator has released this worker.
    pub fn released(&self) -> tokio_util::sync::CancellationToken {
        self.released.clone()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| ServiceError::EngineStopped)?;
        rx.await.map_err(|_| ServiceError::EngineStopped)
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for EngineHandle {
    async fn load_assignment(&self, request: tonic::Request<pb::LoadAssignmentRequest>) -> Result<tonic::Response<pb::LoadAssignmentResponse>, tonic::Status> {
        let req = request.into_inner();
        tracing::info!(epoch = req.epoch, model = %req.model_path, "loading assignment");
        let resp = self.call(|r| Command::Load(Box::new(req), r)).await??;
        Ok(tonic::Response::new(resp))
    }

    async fn step(&self, request: tonic::Request<pb::StepRequest>) -> Result<tonic::Response<pb::StepResponse>, tonic::Status> {
        let resp = self.call(|r| Command::Step(request.into_inner(), r)).await??;
        Ok(tonic::Response::new(resp))
    }

    async fn health(&self, _: tonic::Request<pb::HealthRequest>) -> Result<tonic::Response<pb::HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(self.call(Command::Health).await?))
    }

    async fn release(&self, request: tonic::Request<pb::ReleaseRequest>) -> Result<tonic::Response<pb::ReleaseResponse>, tonic::Status> {
        let epoch = request.into_inner().epoch;
        self.call(|r| Command::Release(epoch, r)).await??;
        tracing::info!(epoch, "released by the coordinator; leaving");
        self.released.cancel();
        Ok(tonic::Response::new(pb::ReleaseResponse {}))
    }

    async fn fence(&self, request: tonic::Request<pb::FenceRequest>) -> Result<tonic::Response<pb::FenceResponse>, tonic::Status> {
        let epoch = request.into_inner().epoch;
        self.call(|r| Command::Fence(epoch, r)).await??;
        tracing::warn!(epoch, "fenced by the coordinator: this placement epoch does not use this worker");
        Ok(tonic::Response::new(pb::FenceResponse {}))
    }

    async fn create_nccl_id(&self, _: tonic::Request<pb::CreateNcclIdRequest>) -> Result<tonic::Response<pb::CreateNcclIdResponse>, tonic::Status> {
        let nccl_id = tokio::task::spawn_blocking(create_nccl_id).await.map_err(|_| ServiceError::EngineStopped)??;
        Ok(tonic::Response::new(pb::CreateNcclIdResponse { nccl_id }))
    }
}

/// Serves the worker API on `listener` until `shutdown` is cancelled or the coordinator
/// releases the worker; peers of sharded replicas link through `comm`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<&cluster::tls::ClusterTls>,
    handle: EngineHandle,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let released = handle.released();
    let shutdown = {
        let s = shutdown.clone();
        tokio::spawn(async move {
            released.cancelled().await;
            // Let the Release reply reach the coordinator first.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            s.cancel();
        });
        shutdown
    };
    let incoming = crate::process::nodelay_incoming(listener);
    // The standard gRPC health service (Kubernetes' gRPC probes): SERVING while the worker
    // answers; whether it holds a shard is the coordinator's business (its Health RPC).
    let (_health, health_service) = tonic_health::server::health_reporter();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        // Mutual TLS: only a coordinator with a certificate of the cluster CA reaches the API.
        builder = builder.tls_config(tls.grpc_server())?;
    }
    let server = builder
        .add_service(health_service)
        .add_service(pb::worker_server::WorkerServer::new(handle).max_decoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    // A graceful close waits for the coordinator to drop its connection; it gets a moment
    // (its steps already fail, so it is moving this worker's sequences), then the worker exits.
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    };
    tokio::select! {
        served = server => served?,
        () = grace => tracing::info!("the coordinator keeps its connection open; closing it"),
    }
    Ok(())
}

/// The standard gRPC health service alone (SERVING while the process runs), for probes that
/// cannot present the cluster's certificate.
pub async fn serve_health(listener: tokio::net::TcpListener, shutdown: tokio_util::sync::CancellationToken) {
    let (_health, health_service) = tonic_health::server::health_reporter();
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .serve_with_incoming_shutdown(crate::process::nodelay_incoming(listener), shutdown.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the health service stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(epoch: u64) -> pb::LoadAssignmentRequest {
        pb::LoadAssignmentRequest {
            epoch,
            model_path: concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mistral-nemo-tiny").into(),
            kv_blocks: 4,
            block_size: 16,
            ..Default::default()
        }
    }

    fn step(epoch: u64) -> pb::StepRequest {
        let seq = pb::SequenceStep {
            seq_id: 7,
            tokens: vec![5, 6],
            start_pos: 0,
            block_table: vec![0],
            sampling: None,
            prompt_logprobs: Some(2),
            keep_history: None,
            embed: 0,
            history: vec![],
            grammar: None,
        };
        pb::StepRequest { epoch, sequences: vec![seq], released: vec![] }
    }

    #[test]
    fn epochs_fence_steps_and_assignments() {
        let mut state = WorkerState::default().with_memory_bytes(123 << 20);
        assert!(matches!(state.step(&step(0)), Err(ServiceError::NotLoaded)));
        assert_eq!(state.health().memory_bytes, 123 << 20, "reported before a model loads");
        state.load(&assignment(4)).expect("loads");
        assert_eq!((state.health().epoch, state.health().memory_bytes), (4, 123 << 20));
        let out = state.step(&step(4)).expect("current epoch");
        assert_eq!(out.results[0].seq_id, 7);
        assert_eq!(out.results[0].prompt_logprobs.len(), 1);
        assert!(out.results[0].sampled.is_none(), "no sampling asked");
        assert!(matches!(state.step(&step(3)), Err(ServiceError::StaleEpoch { got: 3, current: 4 })));
        assert!(matches!(state.load(&assignment(3)), Err(ServiceError::StaleEpoch { .. })));
        let mut bad = assignment(5);
        bad.kv_blocks = 0;
        assert!(matches!(state.load(&bad), Err(ServiceError::InvalidArgument(_))));
        assert_eq!(state.epoch(), 4, "a refused assignment changes nothing");
        state.load(&assignment(5)).expect("newer epoch");
        assert!(matches!(state.step(&step(4)), Err(ServiceError::StaleEpoch { got: 4, current: 5 })));
    }

    #[test]
    fn a_fenced_worker_refuses_the_old_epoch_and_serves_a_newer_one() {
        let mut state = WorkerState::default();
        state.load(&assignment(4)).expect("loads");
        assert!(matches!(state.fence(3, "test"), Err(ServiceError::StaleEpoch { got: 3, current: 4 })), "an older placement cannot fence");
        state.step(&step(4)).expect("still serving epoch 4");
        state.fence(6, "test").expect("fenced");
        assert_eq!(state.health().epoch, 6);
        assert!(matches!(state.step(&step(4)), Err(ServiceError::StaleEpoch { got: 4, current: 6 })), "the old epoch's steps are refused");
        assert!(matches!(state.load(&assignment(5)), Err(ServiceError::StaleEpoch { got: 5, current: 6 })), "and its assignments");
        assert!(matches!(state.step(&step(6)), Err(ServiceError::NotLoaded)), "the model is gone");
        state.load(&assignment(7)).expect("a newer placement may use it again");
        state.step(&step(7)).expect("serving epoch 7");
    }
}
