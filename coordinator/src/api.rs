//! The client-facing gRPC APIs, `tramontane.v1.Inference` and `tramontane.v1.Admin`. Only
//! this module touches the client protobuf types.

use std::time::Duration;

use cluster::constraint::Constraint;
use cluster::layout::Layout;
use cluster::{TokenLogprobs, Tokenizer};
use proto::tramontane::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, AuthError, Caller};
use crate::control::{ControlError, ControlHandle};
use crate::frontend::{Chunk, Frontend, FrontendError, MAX_EMBED_INPUTS};
use crate::validate::{PromptInput, RawRequest, RequestError};
use cluster::scheduler::Finish;

impl From<FrontendError> for Status {
    fn from(e: FrontendError) -> Self {
        let msg = e.to_string();
        match e {
            FrontendError::InvalidArgument(_) => Status::invalid_argument(msg),
            FrontendError::AlreadyExists(_) => Status::already_exists(msg),
            FrontendError::QueueFull(_) => Status::resource_exhausted(msg),
            FrontendError::Unavailable(_) => Status::unavailable(msg),
            FrontendError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            FrontendError::ShuttingDown(_) => Status::unavailable(msg),
            FrontendError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        let msg = e.to_string();
        match e {
            AuthError::Missing | AuthError::Invalid => Status::unauthenticated(msg),
            AuthError::NotAdmin(_) => Status::permission_denied(msg),
            AuthError::Limited { retry_after, .. } => {
                let mut status = Status::resource_exhausted(msg);
                if let Ok(v) = retry_after.as_secs().max(1).to_string().parse() {
                    status.metadata_mut().insert("retry-after", v);
                }
                status
            }
        }
    }
}

/// A gRPC interceptor that checks the `authorization` metadata (`Bearer KEY`) against the
/// API keys (`admin`: a key marked admin) and hands the caller to the service in the
/// request's extensions.
pub fn authorizer(auth: Auth, admin: bool) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let caller: Caller = auth.authenticate(header, admin)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

fn caller<T>(req: &Request<T>) -> Caller {
    req.extensions().get::<Caller>().cloned().flatten()
}

impl From<RequestError> for Status {
    fn from(e: RequestError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        let msg = e.to_string();
        match e {
            ControlError::Stopped | ControlError::Release { .. } => Status::unavailable(msg),
            ControlError::Standby | ControlError::NoFit(_) | ControlError::Shape { .. } => Status::failed_precondition(msg),
            ControlError::UnknownWorker(_) => Status::not_found(msg),
            ControlError::BadShape { .. } => Status::invalid_argument(msg),
        }
    }
}

#[derive(Clone)]
pub struct InferenceService {
    frontend: Frontend,
    /// Deadline of a request that sets no `grpc-timeout`.
    default_timeout: Duration,
}

impl InferenceService {
    pub fn new(frontend: Frontend, default_timeout: Duration) -> Self {
        InferenceService { frontend, default_timeout }
    }
}

/// The `grpc-timeout` header ("<digits><H|M|S|m|u|n>"), if any.
fn grpc_timeout(meta: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = meta.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request's constraint: its JSON schema parsed, and `json_object` only when true.
fn constraint(c: &pb::generate_request::Constraint) -> Result<Option<(&'static str, Constraint)>, RequestError> {
    use pb::generate_request::Constraint as C;
    Ok(match c {
        C::JsonSchema(text) => {
            let schema = serde_json::from_str(text).map_err(|e| RequestError::Grammar { field: "json_schema", reason: format!("not JSON: {e}") })?;
            Some(("json_schema", Constraint::JsonSchema(schema)))
        }
        C::JsonObject(true) => Some(("json_object", Constraint::JsonObject)),
        C::JsonObject(false) => None,
        C::Regex(rx) => Some(("regex", Constraint::Regex(rx.clone()))),
        C::Choice(c) if c.choices.is_empty() => return Err(RequestError::Empty("choice")),
        C::Choice(c) => Some(("choice", Constraint::Choice(c.choices.clone()))),
        C::Lark(lark) => Some(("lark", Constraint::Lark(lark.clone()))),
    })
}

fn raw_request(req: &pb::GenerateRequest) -> Result<RawRequest, RequestError> {
    let s = req.sampling.clone().unwrap_or_default();
    Ok(RawRequest {
        prompt: req.prompt.as_ref().map(|p| match p {
            pb::generate_request::Prompt::Text(t) => PromptInput::Text(t.clone()),
            pb::generate_request::Prompt::TokenIds(ids) => PromptInput::TokenIds(ids.ids.clone()),
        }),
        // proto3 zero values: temperature 0 is greedy, top_p 0 means "unset".
        temperature: Some(s.temperature),
        top_p: (s.top_p != 0.0).then_some(s.top_p),
        top_k: Some(s.top_k),
        seed: s.seed,
        max_tokens: s.max_tokens,
        stop_token_ids: s.stop_token_ids,
        stop: s.stop,
        logprobs: s.logprobs,
        prompt_logprobs: s.prompt_logprobs,
        skip_special_tokens: s.skip_special_tokens,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty,
        logit_bias: s.logit_bias.into_iter().collect(),
        min_tokens: s.min_tokens,
        ignore_eos: s.ignore_eos,
        embed: None,
        cache_salt: req.cache_salt.clone(),
        constraint: req.constraint.as_ref().map(constraint).transpose()?.flatten(),
    })
}

fn position(tok: &Tokenizer, t: &TokenLogprobs) -> pb::PositionLogprobs {
    let entry = |id: u32, lp: f32| pb::TokenLogprob { token_id: id, text: tok.id_to_token(id).unwrap_or_default(), logprob: lp };
    pb::PositionLogprobs { token: Some(entry(t.token, t.logprob)), top: t.top.iter().map(|&(id, lp)| entry(id, lp)).collect() }
}

fn finish_reason(f: Option<Finish>) -> pb::FinishReason {
    match f {
        None => pb::FinishReason::Unspecified,
        Some(Finish::Length) => pb::FinishReason::Length,
        Some(Finish::Stop) => pb::FinishReason::Stop,
    }
}

type GenerateStream = tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateResponse, Status>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let timeout = grpc_timeout(request.metadata()).unwrap_or(self.default_timeout);
        let caller = caller(&request);
        self.frontend.auth.admit(&caller)?;
        let req = request.into_inner();
        let mut generation = self.frontend.start(Some(req.request_id.clone()), raw_request(&req)?, timeout)?;
        let auth = self.frontend.auth.clone();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let request_id = generation.request_id.clone();
            let prompt_tokens = generation.prompt.len() as u32;
            while let Some(chunk) = generation.next().await {
                let tok = generation.tokenizer();
                let msg = chunk.map_err(Status::from).map(|chunk| match chunk {
                    Chunk::PromptLogprobs(lps) => pb::GenerateResponse {
                        request_id: request_id.clone(),
                        prompt_logprobs: lps.iter().map(|t| position(tok, t)).collect(),
                        ..Default::default()
                    },
                    // Generate never embeds; were it to, the stream ends there.
                    Chunk::Embedding(_) => {
                        pb::GenerateResponse { request_id: request_id.clone(), finish_reason: finish_reason(Some(Finish::Stop)) as i32, ..Default::default() }
                    }
                    Chunk::End(finish) => pb::GenerateResponse {
                        request_id: request_id.clone(),
                        finish_reason: finish_reason(Some(finish)) as i32,
                        usage: Some(pb::Usage { prompt_tokens, completion_tokens: 0, cached_tokens: generation.cached_tokens() as u32 }),
                        ..Default::default()
                    },
                    Chunk::Token { token, text, finish } => pb::GenerateResponse {
                        request_id: request_id.clone(),
                        token_ids: vec![token.token],
                        text,
                        logprobs: if generation.wants_logprobs { vec![position(tok, &token)] } else { vec![] },
                        prompt_logprobs: vec![],
                        finish_reason: finish_reason(finish) as i32,
                        usage: finish.map(|_| pb::Usage {
                            prompt_tokens,
                            completion_tokens: generation.completion_tokens as u32,
                            cached_tokens: generation.cached_tokens() as u32,
                        }),
                    },
                });
                if let Ok(pb::GenerateResponse { usage: Some(u), .. }) = &msg {
                    auth.record(&caller, u.prompt_tokens as usize, u.cached_tokens as usize, u.completion_tokens as usize);
                }
                if tx.send(msg).await.is_err() {
                    break; // the client went away: dropping the generation aborts it
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let aborted = self.frontend.abort(&request.into_inner().request_id);
        Ok(Response::new(pb::AbortResponse { aborted }))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let ids = self.frontend.served.tokenizer.encode(&req.text, req.add_special_tokens).map_err(RequestError::untokenizable("text"))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn detokenize(&self, request: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let text = self.frontend.served.detokenize(&req.ids, req.skip_special_tokens, "ids")?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let timeout = grpc_timeout(request.metadata()).unwrap_or(self.default_timeout);
        let caller = caller(&request);
        self.frontend.auth.admit(&caller)?;
        let req = request.into_inner();
        let inputs: Vec<PromptInput> =
            req.texts.into_iter().map(PromptInput::Text).chain(req.token_ids.into_iter().map(|t| PromptInput::TokenIds(t.ids))).collect();
        if inputs.is_empty() || inputs.len() > MAX_EMBED_INPUTS {
            return Err(RequestError::Shape { field: "texts", expected: "1 to 256 inputs (texts and token_ids together)" }.into());
        }
        let (vectors, tokens) = self.frontend.embed(inputs, timeout).await?;
        self.frontend.auth.record(&caller, tokens, 0, 0);
        Ok(Response::new(pb::EmbedResponse {
            embeddings: vectors.into_iter().map(|values| pb::Embedding { values }).collect(),
            usage: Some(pb::Usage { prompt_tokens: tokens as u32, completion_tokens: 0, cached_tokens: 0 }),
        }))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let s = &self.frontend.served;
        let g = self.frontend.gauges();
        Ok(Response::new(pb::ModelInfoResponse {
            model: s.name.clone(),
            architecture: s.architecture.clone(),
            max_context: s.limits.max_context as u32,
            vocab_size: s.limits.vocab_size as u32,
            kv_blocks_used: g.used_blocks as u32,
            kv_blocks_total: g.num_blocks as u32,
            running: g.running as u32,
            waiting: g.waiting as u32,
            replicas: self.frontend.pool().replicas.len() as u32,
        }))
    }
}

/// `tramontane.v1.Admin`.
#[derive(Clone)]
pub struct AdminService {
    frontend: Frontend,
    control: ControlHandle,
}

impl AdminService {
    pub fn new(frontend: Frontend, control: ControlHandle) -> Self {
        AdminService { frontend, control }
    }
}

fn planned(p: crate::control::PlannedReplica) -> pb::PlannedReplica {
    pb::PlannedReplica { layout: layout_name(&p.plan.layout), workers: p.plan.workers, weight_bytes: p.weight_bytes, kv_cache_bytes: p.kv_bytes }
}

fn layout_name(l: &Layout) -> String {
    format!("tp {} ep {} pp {}", l.tp, l.ep, l.pp)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn cluster_status(&self, _: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let view = self.control.status().await?;
        let stats = self.frontend.stats();
        let workers = view
            .workers
            .iter()
            .map(|w| {
                let mut status = pb::WorkerStatus {
                    id: w.card.id.clone(),
                    address: w.card.address.clone(),
                    state: w.state.into(),
                    pid: w.card.pid,
                    memory_bytes: w.card.memory_bytes,
                    restarts: w.card.restarts,
                    ..Default::default()
                };
                if let Some((replica, rank, l)) = &w.placement {
                    let c = l.coords(*rank);
                    status.replica = *replica as u32;
                    status.ranks = format!("tp {}/{} ep {}/{} pp {}/{}", c.tensor, l.tp, c.expert, l.ep, c.stage, l.pp);
                    if let Some(st) = stats.get(*replica) {
                        status.running = st.running as u32;
                        status.waiting = st.waiting as u32;
                        status.kv_blocks_used = st.used_blocks as u32;
                        status.kv_blocks_total = st.num_blocks as u32;
                        status.prefix_cache_queries = st.prefix.queries;
                        status.prefix_cache_hits = st.prefix.hits;
                    }
                }
                status
            })
            .collect();
        let experts = self
            .frontend
            .pool()
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| (i, r.plan.layout.ep, r.plan.copies.len(), r.handle.expert_load()))
            .filter(|(.., load)| !load.tokens.is_empty())
            .map(|(i, ep, copies, load)| pb::ReplicaExperts {
                replica: i as u32,
                ep: ep as u32,
                copies: copies as u32,
                imbalance: load.imbalance().unwrap_or(0.0),
                layers: load
                    .tokens
                    .into_iter()
                    .zip(load.ranks)
                    .enumerate()
                    .map(|(layer, (tokens, ranks))| pb::ExpertLayer { layer: layer as u32, tokens, ranks })
                    .collect(),
            })
            .collect();
        let mut layouts: Vec<String> = self.frontend.pool().replicas.iter().map(|r| layout_name(&r.plan.layout)).collect();
        layouts.dedup();
        Ok(Response::new(pb::ClusterStatusResponse {
            model: self.frontend.served.name.clone(),
            epoch: view.epoch,
            layout: layouts.join(", "),
            workers,
            leader: view.leader,
            no_capacity: self.frontend.pool().no_capacity.clone().unwrap_or_default(),
            experts,
        }))
    }

    async fn drain(&self, request: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        self.control.drain(request.into_inner().worker_id).await?;
        Ok(Response::new(pb::DrainResponse {}))
    }

    async fn usage(&self, _: Request<pb::UsageRequest>) -> Result<Response<pb::UsageResponse>, Status> {
        let keys = self
            .frontend
            .auth
            .usage()
            .into_iter()
            .map(|(key, u)| pb::KeyUsage {
                key,
                requests: u.requests,
                prompt_tokens: u.prompt_tokens,
                cached_tokens: u.cached_tokens,
                completion_tokens: u.completion_tokens,
            })
            .collect();
        Ok(Response::new(pb::UsageResponse { keys }))
    }

    async fn plan(&self, _: Request<pb::PlanRequest>) -> Result<Response<pb::PlanResponse>, Status> {
        let replicas = self.control.plan().await?.into_iter().map(planned).collect();
        Ok(Response::new(pb::PlanResponse { replicas }))
    }

    async fn scale(&self, request: Request<pb::ScaleRequest>) -> Result<Response<pb::ScaleResponse>, Status> {
        let r = request.into_inner();
        let scaled = self.control.scale(r.tp as usize, r.ep as usize, r.pp as usize, r.replicas as usize).await?;
        Ok(Response::new(pb::ScaleResponse { epoch: scaled.epoch, replicas: scaled.replicas.into_iter().map(planned).collect() }))
    }
}
