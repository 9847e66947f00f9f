//! The client-facing gRPC API, `tramontane.v1.Inference`. Only this module (and `validate`)
//! touches the client protobuf types.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::tramontane::v1 as pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use worker::{IncrementalDecoder, TokenLogprobs, Tokenizer};

use crate::replica::{ReplicaEvent, ReplicaHandle};
use crate::scheduler::{Finish, SeqRequest};
use crate::validate::{self, ModelLimits};

/// The model a coordinator serves and the replicas serving it.
pub struct Served {
    pub name: String,
    pub architecture: String,
    pub tokenizer: Tokenizer,
    pub limits: ModelLimits,
    pub replicas: Vec<ReplicaHandle>,
}

#[derive(Clone)]
pub struct InferenceService {
    served: Arc<Served>,
    next_id: Arc<AtomicU64>,
    /// Client request id -> (replica index, internal id), for Abort.
    running: Arc<Mutex<HashMap<String, (usize, u64)>>>,
}

impl InferenceService {
    pub fn new(served: Served) -> Self {
        InferenceService { served: Arc::new(served), next_id: Arc::new(AtomicU64::new(1)), running: Arc::default() }
    }

    /// The least-loaded replica.
    fn pick(&self) -> Result<usize, Status> {
        (0..self.served.replicas.len())
            .min_by_key(|&i| self.served.replicas[i].active())
            .ok_or_else(|| Status::unavailable("no replica is serving: no capacity remains"))
    }
}

fn token_logprobs(tok: &Tokenizer, t: &TokenLogprobs) -> pb::PositionLogprobs {
    let entry = |id: u32, lp: f32| pb::TokenLogprob { token_id: id, text: tok.id_to_token(id).unwrap_or_default(), logprob: lp };
    pb::PositionLogprobs { token: Some(entry(t.token, t.logprob)), top: t.top.iter().map(|&(id, lp)| entry(id, lp)).collect() }
}

type GenerateStream = tokio_stream::wrappers::ReceiverStream<Result<pb::GenerateResponse, Status>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let req = request.into_inner();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh_seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ std::process::id() as u64;
        let valid = validate::generate_request(&req, &self.served.tokenizer, &self.served.limits, fresh_seed)
            .map_err(Status::invalid_argument)?;
        let request_id = if req.request_id.is_empty() { format!("req-{id}") } else { req.request_id.clone() };
        let replica = self.pick()?;
        {
            let mut running = self.running.lock().map_err(|_| Status::internal("lock poisoned"))?;
            if running.contains_key(&request_id) {
                return Err(Status::already_exists(format!("request id {request_id:?} is already running")));
            }
            running.insert(request_id.clone(), (replica, id));
        }
        let prompt_len = valid.prompt.len();
        let mut events = self.served.replicas[replica].submit(SeqRequest { id, prompt: valid.prompt.clone(), params: valid.params.clone() });
        let (tx, rx) = mpsc::channel(64);
        let served = self.served.clone();
        let running = self.running.clone();
        tokio::spawn(async move {
            let mut decoder = IncrementalDecoder::new(&valid.prompt);
            let mut completion = 0u32;
            while let Some(event) = events.recv().await {
                let msg = match event {
                    ReplicaEvent::PromptLogprobs(lps) => Ok(pb::GenerateResponse {
                        request_id: request_id.clone(),
                        prompt_logprobs: lps.iter().map(|t| token_logprobs(&served.tokenizer, t)).collect(),
                        ..Default::default()
                    }),
                    ReplicaEvent::Token(t, finished) => {
                        completion += 1;
                        let mut text = decoder.push(&served.tokenizer, t.token).unwrap_or_default();
                        if finished.is_some() {
                            text.push_str(&decoder.flush(&served.tokenizer).unwrap_or_default());
                        }
                        Ok(pb::GenerateResponse {
                            request_id: request_id.clone(),
                            token_ids: vec![t.token],
                            text,
                            logprobs: if valid.params.logprobs.is_some() { vec![token_logprobs(&served.tokenizer, &t)] } else { vec![] },
                            prompt_logprobs: vec![],
                            finish_reason: match finished {
                                None => pb::FinishReason::Unspecified,
                                Some(Finish::Length) => pb::FinishReason::Length,
                                Some(Finish::Stop) => pb::FinishReason::Stop,
                                Some(Finish::Abort) => pb::FinishReason::Abort,
                            } as i32,
                            usage: finished.map(|_| pb::Usage { prompt_tokens: prompt_len as u32, completion_tokens: completion }),
                        })
                    }
                    ReplicaEvent::Failed(m) => Err(Status::unavailable(m)),
                    ReplicaEvent::Rejected(m) => Err(Status::resource_exhausted(m)),
                };
                let last = msg.as_ref().map_or(true, |m| m.finish_reason != pb::FinishReason::Unspecified as i32);
                if tx.send(msg).await.is_err() || last {
                    break;
                }
            }
            // Dropping `events` tells the replica the client is gone (if it did not finish).
            if let Ok(mut running) = running.lock() {
                running.remove(&request_id);
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        let found = self.running.lock().map_err(|_| Status::internal("lock poisoned"))?.remove(&id);
        if let Some((replica, internal)) = found {
            self.served.replicas[replica].abort(internal);
        }
        Ok(Response::new(pb::AbortResponse { aborted: found.is_some() }))
    }

    async fn tokenize(&self, request: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let ids = self.served.tokenizer.encode(&req.text, req.add_special_tokens).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn detokenize(&self, request: Request<pb::DetokenizeRequest>) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let req = request.into_inner();
        let vocab = self.served.limits.vocab_size;
        if let Some(&t) = req.ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Status::invalid_argument(format!("`ids` must be < {vocab} (the vocabulary), got {t}")));
        }
        let text = self.served.tokenizer.decode(&req.ids, req.skip_special_tokens).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }

    async fn model_info(&self, _: Request<pb::ModelInfoRequest>) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let s = &self.served;
        let stats: Vec<_> = s.replicas.iter().map(|r| r.stats()).collect();
        let sum = |f: fn(&crate::replica::ReplicaStats) -> usize| stats.iter().map(f).sum::<usize>() as u32;
        Ok(Response::new(pb::ModelInfoResponse {
            model: s.name.clone(),
            architecture: s.architecture.clone(),
            max_context: s.limits.max_context as u32,
            vocab_size: s.limits.vocab_size as u32,
            kv_blocks_used: sum(|r| r.used_blocks),
            kv_blocks_total: sum(|r| r.num_blocks),
            running: sum(|r| r.running),
            waiting: sum(|r| r.waiting),
            replicas: s.replicas.len() as u32,
        }))
    }
}
