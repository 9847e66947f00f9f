//! The worker's gRPC service (`tramontane.worker.v1.Worker`). The engine lives on one OS
//! thread (an actor: [`EngineHandle`] sends it commands); the state it owns,
//! [`WorkerState`], enforces placement epochs: a step from any epoch other than the current
//! one (or, during a reshape, the old assignment's kept beside it) is refused, and an
//! assignment older than the current one is refused (fencing).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::tramontane::worker::v1 as pb;

use crate::backend::{Backend, Cpu};
use crate::comm::{Comm, CommListener, TcpComm, TcpOptions};
use crate::embedding::Pooling;
use crate::engine::{CacheConfig, Engine, EngineOptions, SeqStep, open_model};
use crate::error::{BadRequest, EngineError};
use crate::layout::Layout;
use crate::rank::Parallel;
use crate::sampling::{MAX_TOP_LOGPROBS, Penalties, SamplingParams, TokenLogprobs};

mod handle;

pub use handle::{EngineHandle, Offer, serve, serve_health};

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
    comm: Arc<CommSetup>,
    /// The memory this worker offers (reported by Health; 0 = unknown).
    memory_bytes: u64,
    /// How many times a supervisor restarted this worker (reported by Health).
    restarts: u32,
    /// A coordinator fenced this worker at `epoch`: older assignments are refused too.
    fenced: bool,
    /// The loaded assignment's redundant experts.
    copies: Vec<pb::ExpertCopy>,
    /// A reshape's old assignment, serving the steps of its epoch beside the current one
    /// (LoadAssignment `alongside_of`) until a Fence at a newer epoch.
    beside: Option<(u64, Engine<B>)>,
}

/// What a new assignment needs to load, checked before anything is given up.
pub struct Prepared {
    req: pb::LoadAssignmentRequest,
    config: crate::ModelConfig,
    source: crate::weights::WeightSource,
    options: EngineOptions,
    layout: Layout,
    copies: Vec<(usize, usize, usize)>,
}

/// How an assignment proceeds: answered at once, or a shard to build (beside the current one
/// when `alongside`: a reshape's).
pub enum Begin {
    Done(pb::LoadAssignmentResponse),
    Build { prepared: Box<Prepared>, alongside: bool },
}

impl Default for WorkerState<Cpu> {
    fn default() -> Self {
        WorkerState::new(Cpu, CommSetup::default())
    }
}

impl<B: Backend> WorkerState<B> {
    pub fn new(backend: B, comm: CommSetup) -> Self {
        WorkerState {
            backend,
            epoch: 0,
            engine: None,
            assigned: None,
            comm: Arc::new(comm),
            memory_bytes: 0,
            restarts: 0,
            fenced: false,
            copies: Vec::new(),
            beside: None,
        }
    }

    /// The memory this worker offers for weights and KV cache, as Health reports it.
    pub fn with_memory_bytes(self, memory_bytes: u64) -> Self {
        WorkerState { memory_bytes, ..self }
    }

    /// What the worker offers and how often it was restarted, as Health reports them.
    pub fn with_offer(self, offer: Offer) -> Self {
        WorkerState { memory_bytes: offer.memory_bytes, restarts: offer.restarts, ..self }
    }

    /// Drops the model (replaced, fenced, replica broken), and an old one kept beside it:
    /// steps are refused until a new assignment.
    pub fn unload(&mut self, why: &str) {
        if self.engine.take().is_some() {
            tracing::warn!(why, "unloaded the model");
        }
        if let Some((epoch, _)) = self.beside.take() {
            tracing::info!(why, epoch, "unloaded the assignment kept beside");
        }
        self.assigned = None;
        self.copies.clear();
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Loads an assignment on this thread (beside the current one when it asks to).
    pub fn load(&mut self, req: &pb::LoadAssignmentRequest) -> Result<pb::LoadAssignmentResponse, ServiceError> {
        match self.begin(req)? {
            Begin::Done(response) => Ok(response),
            Begin::Build { prepared, alongside } => {
                let built = build(self.backend.clone(), &self.comm, &prepared);
                self.install(*prepared, alongside, built)
            }
        }
    }

    /// Checks an assignment: refuses a stale or bad one, applies one the worker already holds
    /// (a newer epoch, other redundant experts), or prepares a new shard to build. A shard
    /// that replaces the current one unloads it first, so two need not fit at once.
    pub fn begin(&mut self, req: &pb::LoadAssignmentRequest) -> Result<Begin, ServiceError> {
        if (self.engine.is_some() || self.fenced) && req.epoch < self.epoch {
            return Err(ServiceError::StaleEpoch { got: req.epoch, current: self.epoch });
        }
        let unknown = |field: &str, v: i32| ServiceError::InvalidArgument(format!("`{field}`: unknown value {v} (a newer coordinator?)"));
        let load_format = pb::LoadFormat::try_from(req.load_format).map_err(|_| unknown("load_format", req.load_format))?.into();
        let same = pb::LoadAssignmentRequest { epoch: 0, expert_copies: Vec::new(), alongside_of: 0, ..req.clone() };
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
            return Ok(Begin::Done(pb::LoadAssignmentResponse { kept: true, ..loaded(engine) }));
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
        // Check the checkpoint opens and the layout fits before giving up the current model.
        let (config, source) = open_model(&PathBuf::from(&req.model_path), load_format)?;
        layout.validate(&config).map_err(EngineError::from)?;
        let copies = expert_copies(req, &config)?;
        // A reshape keeps serving the shard of epoch `alongside_of`; any other goes (one left
        // by a reshape that failed and is tried again).
        let keep = req.alongside_of;
        let current = self.engine.is_some() && self.epoch == keep;
        let beside = self.beside.as_ref().is_some_and(|(e, _)| *e == keep);
        let alongside = keep > 0 && req.epoch > self.epoch && (current || beside);
        if !alongside {
            self.unload("a new assignment replaces it");
        } else if current {
            self.beside = None;
        } else if self.engine.take().is_some() {
            tracing::info!(epoch = self.epoch, "dropped a shard no replica steps");
            self.assigned = None;
            self.copies.clear();
        }
        Ok(Begin::Build { prepared: Box::new(Prepared { req: req.clone(), config, source, options, layout, copies }), alongside })
    }

    /// Makes a built shard the current one; with `alongside`, the current one keeps serving
    /// its epoch beside it. A shard built for an epoch that is stale by now is dropped.
    pub fn install(&mut self, p: Prepared, alongside: bool, built: Result<Engine<B>, ServiceError>) -> Result<pb::LoadAssignmentResponse, ServiceError> {
        let engine = built?;
        if p.req.epoch < self.epoch || (self.engine.is_some() && (!alongside || p.req.epoch == self.epoch)) {
            return Err(ServiceError::StaleEpoch { got: p.req.epoch, current: self.epoch });
        }
        let response = loaded(&engine);
        if let Some(old) = self.engine.replace(engine) {
            tracing::info!(epoch = self.epoch, "the old assignment serves its epoch beside the new one");
            self.beside = Some((self.epoch, old));
        }
        self.assigned = Some(pb::LoadAssignmentRequest { epoch: 0, expert_copies: Vec::new(), alongside_of: 0, ..p.req.clone() });
        self.copies = p.req.expert_copies.clone();
        self.epoch = p.req.epoch;
        Ok(response)
    }

    /// The communicator setup, shared with shards built off the engine's thread.
    pub fn comm(&self) -> Arc<CommSetup> {
        self.comm.clone()
    }

    pub fn backend(&self) -> B {
        self.backend.clone()
    }
    /// Unloads every assignment older than `epoch` (saying `why`) and makes `epoch` the
    /// current one: a placement of that epoch no longer uses them (it fenced or released this
    /// worker, or a reshape retired the old shape's rank), and every older step or assignment
    /// is refused from now on. An assignment of `epoch` itself stays.
    pub fn fence(&mut self, epoch: u64, why: &str) -> Result<(), ServiceError> {
        // Even a fence that comes late (the worker moved on) drops an older shard kept beside.
        if self.beside.as_ref().is_some_and(|(e, _)| *e < epoch) {
            self.beside = None;
            tracing::info!(why, "unloaded the assignment kept beside");
        }
        if epoch < self.epoch {
            return Err(ServiceError::StaleEpoch { got: epoch, current: self.epoch });
        }
        if epoch > self.epoch || self.engine.is_none() {
            self.unload(why);
        }
        self.epoch = epoch;
        self.fenced = true;
        Ok(())
    }

    pub fn step(&mut self, req: &pb::StepRequest) -> Result<pb::StepResponse, ServiceError> {
        // A reshape's old assignment serves its own epoch beside the current one.
        let beside = self.beside.as_ref().is_some_and(|(e, _)| *e == req.epoch);
        if req.epoch < self.epoch && !beside {
            return Err(ServiceError::StaleEpoch { got: req.epoch, current: self.epoch });
        }
        let engine = match &mut self.beside {
            Some((_, engine)) if beside => engine,
            _ => self.engine.as_mut().ok_or(ServiceError::NotLoaded)?,
        };
        if req.epoch != self.epoch && !beside {
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
                if beside {
                    self.beside = None;
                    tracing::warn!("a peer of the old assignment kept beside failed; unloaded it");
                } else {
                    // The shard kept beside serves another replica: it stays.
                    let kept = self.beside.take();
                    self.unload("a peer of the replica failed");
                    self.beside = kept;
                }
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

/// Builds the shard of an assignment: links to its peers, loads its weights and its
/// redundant experts.
pub fn build<B: Backend>(backend: B, comm: &CommSetup, p: &Prepared) -> Result<Engine<B>, ServiceError> {
    let world = p.layout.world();
    let par = if world == 1 { Parallel::single() } else { Parallel::new(p.layout.clone(), connect(comm, &p.req, world)?).map_err(EngineError::from)? };
    let mut engine = Engine::from_source(backend, &p.config, &p.source, &p.options, par)?;
    engine.set_tokenizer(PathBuf::from(&p.req.model_path).join("tokenizer.json"));
    if !p.copies.is_empty() {
        engine.set_expert_copies(&p.source, &p.copies)?;
    }
    Ok(engine)
}

/// Links this rank to the other ranks of its replica.
fn connect(setup: &CommSetup, req: &pb::LoadAssignmentRequest, world: usize) -> Result<Arc<dyn Comm>, ServiceError> {
    let rank = req.rank as usize;
    match pb::Communicator::try_from(req.comm) {
        Ok(pb::Communicator::Tcp) => {
            let listener =
                setup.listener.as_ref().ok_or_else(|| ServiceError::InvalidArgument("this worker has no communicator listener for sharded replicas".into()))?;
            let comm = TcpComm::connect(listener, req.epoch, rank, &req.peers, setup.options).map_err(EngineError::from)?;
            Ok(Arc::new(comm))
        }
        Ok(pb::Communicator::Nccl) => nccl(req, world),
        Err(_) => Err(ServiceError::InvalidArgument(format!("unknown communicator {} (expected TCP or NCCL)", req.comm))),
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

    #[test]
    fn an_assignment_alongside_serves_beside_the_old_one_until_a_fence() {
        let mut state = WorkerState::default();
        state.load(&assignment(4)).expect("loads");
        let before = state.step(&step(4)).expect("epoch 4");
        let mut other = pb::LoadAssignmentRequest { kv_blocks: 8, alongside_of: 4, ..assignment(5) };
        let answer = state.load(&other).expect("loads beside");
        assert!(!answer.kept, "a new shard");
        assert_eq!(state.step(&step(4)).expect("the old epoch still serves").results, before.results, "the old shard is untouched");
        assert_eq!(state.step(&step(5)).expect("the new epoch serves").results, before.results, "the same model, a new shard");
        assert!(matches!(state.step(&step(3)), Err(ServiceError::StaleEpoch { got: 3, current: 5 })));
        state.fence(5, "test").expect("fences the old shape");
        assert!(matches!(state.step(&step(4)), Err(ServiceError::StaleEpoch { got: 4, current: 5 })), "the old shard is gone");
        state.step(&step(5)).expect("the current one stays");
        // Without `alongside_of`, a new assignment replaces the current one.
        other.alongside_of = 0;
        other.epoch = 6;
        other.kv_blocks = 4;
        state.load(&other).expect("replaces");
        assert!(matches!(state.step(&step(5)), Err(ServiceError::StaleEpoch { got: 5, current: 6 })));
    }

    #[test]
    fn a_reshape_tried_again_keeps_the_shard_that_serves_and_drops_the_orphan() {
        let mut state = WorkerState::default();
        state.load(&assignment(4)).expect("loads");
        let before = state.step(&step(4)).expect("epoch 4");
        // A reshape at 5 whose replica then failed elsewhere leaves its shard here; tried
        // again at 6, beside the shard of epoch 4, which still serves.
        state.load(&pb::LoadAssignmentRequest { kv_blocks: 8, alongside_of: 4, ..assignment(5) }).expect("loads beside");
        state.load(&pb::LoadAssignmentRequest { kv_blocks: 6, alongside_of: 4, ..assignment(6) }).expect("loads beside again");
        assert_eq!(state.step(&step(4)).expect("the old replica still serves").results, before.results);
        assert!(matches!(state.step(&step(5)), Err(ServiceError::StaleEpoch { got: 5, current: 6 })), "the orphan is gone");
        state.step(&step(6)).expect("the new one serves");
        // A fence that comes late still drops the old shard kept beside.
        state.load(&pb::LoadAssignmentRequest { kv_blocks: 6, ..assignment(7) }).expect("kept, a newer epoch");
        assert!(state.fence(5, "late").is_err(), "a stale fence");
        assert!(matches!(state.step(&step(4)), Err(ServiceError::StaleEpoch { got: 4, current: 7 })), "the shard kept beside is gone");
    }
}
