//! What the gRPC and HTTP APIs share: the served model, request ids, routing to the
//! least-loaded replica, and a [`Generation`] that turns a replica's events into text deltas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use worker::{IncrementalDecoder, TokenLogprobs, Tokenizer};

use crate::chat::ChatTemplate;
use crate::metrics::{Gauges, Metrics, Outcome};
use crate::replica::{ReplicaEvent, ReplicaHandle, ReplicaStats};
use crate::scheduler::{Finish, SeqRequest};
use crate::validate::{self, ModelLimits, RawRequest};

/// The model a coordinator serves and the replicas serving it.
pub struct Served {
    pub name: String,
    pub architecture: String,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub limits: ModelLimits,
    pub replicas: Vec<ReplicaHandle>,
    /// Worker addresses: replica `i` is workers `i * world .. (i + 1) * world`, by rank.
    pub workers: Vec<String>,
    /// Every replica's layout.
    pub layout: worker::parallel::Layout,
    /// The placement epoch the replicas serve.
    pub epoch: u64,
}

/// Errors the APIs report; each API maps them exhaustively to its own status codes.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("request id {0:?} is already running")]
    AlreadyExists(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the request's deadline of {0:?} passed before it finished")]
    DeadlineExceeded(std::time::Duration),
}

/// One step's worth of a generation, for a client.
#[derive(Debug, Clone)]
pub enum Chunk {
    PromptLogprobs(Vec<TokenLogprobs>),
    Token { token: TokenLogprobs, text: String, finish: Option<Finish> },
}

#[derive(Clone)]
pub struct Frontend {
    pub served: Arc<Served>,
    pub metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
    /// Client request id -> (replica index, internal id), for Abort.
    running: Arc<Mutex<HashMap<String, (usize, u64)>>>,
}

impl Frontend {
    pub fn new(served: Served, metrics: Arc<Metrics>) -> Self {
        Frontend { served: Arc::new(served), metrics, next_id: Arc::new(AtomicU64::new(1)), running: Arc::default() }
    }

    /// Validates, routes and starts a generation that must finish within `timeout`.
    pub fn start(&self, request_id: Option<String>, raw: RawRequest, timeout: std::time::Duration) -> Result<Generation, FrontendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh_seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
        let valid = validate::check(raw, &self.served.tokenizer, &self.served.limits, fresh_seed)
            .map_err(FrontendError::InvalidArgument)?;
        let request_id = request_id.filter(|r| !r.is_empty()).unwrap_or_else(|| format!("req-{id}"));
        let replica = (0..self.served.replicas.len())
            .min_by_key(|&i| self.served.replicas[i].active())
            .ok_or_else(|| FrontendError::Unavailable("no replica is serving: no capacity remains".into()))?;
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&request_id) {
                return Err(FrontendError::AlreadyExists(request_id));
            }
            running.insert(request_id.clone(), (replica, id));
        }
        let events = self.served.replicas[replica].submit(SeqRequest { id, prompt: valid.prompt.clone(), params: valid.params.clone() });
        Ok(Generation {
            request_id,
            prompt: valid.prompt.clone(),
            decoder: IncrementalDecoder::new(&valid.prompt),
            wants_logprobs: valid.params.logprobs.is_some(),
            completion_tokens: 0,
            events,
            served: self.served.clone(),
            running: self.running.clone(),
            metrics: self.metrics.clone(),
            arrived: Instant::now(),
            timeout,
            last_token: None,
            outcome: None,
        })
    }

    /// Aborts a running request by its client id; false if none runs.
    pub fn abort(&self, request_id: &str) -> bool {
        let found = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(request_id);
        if let Some((replica, internal)) = found {
            self.served.replicas[replica].abort(internal);
        }
        found.is_some()
    }

    pub fn stats(&self) -> Vec<ReplicaStats> {
        self.served.replicas.iter().map(|r| r.stats()).collect()
    }

    /// Load figures summed over replicas.
    pub fn gauges(&self) -> Gauges {
        self.stats().iter().fold(Gauges::default(), |g, r| Gauges {
            running: g.running + r.running,
            waiting: g.waiting + r.waiting,
            used_blocks: g.used_blocks + r.used_blocks,
            num_blocks: g.num_blocks + r.num_blocks,
        })
    }
}

/// A running generation. Dropping it before the end aborts the request (its KV blocks are
/// freed at the replica's next turn).
pub struct Generation {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub wants_logprobs: bool,
    pub completion_tokens: usize,
    decoder: IncrementalDecoder,
    events: mpsc::UnboundedReceiver<ReplicaEvent>,
    served: Arc<Served>,
    running: Arc<Mutex<HashMap<String, (usize, u64)>>>,
    metrics: Arc<Metrics>,
    arrived: Instant,
    timeout: std::time::Duration,
    last_token: Option<Instant>,
    /// Set once the generation has ended.
    outcome: Option<Outcome>,
}

impl Generation {
    /// The next chunk; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<Chunk, FrontendError>> {
        if self.outcome.is_some() {
            return None;
        }
        let deadline = tokio::time::Instant::from_std(self.arrived + self.timeout);
        let event = tokio::time::timeout_at(deadline, self.events.recv()).await;
        let tok = &self.served.tokenizer;
        let chunk = match event {
            Err(_) => Err(FrontendError::DeadlineExceeded(self.timeout)),
            Ok(event) => match event {
            None => Err(FrontendError::Unavailable("the replica stopped".into())),
            Some(ReplicaEvent::PromptLogprobs(lps)) => Ok(Chunk::PromptLogprobs(lps)),
            Some(ReplicaEvent::Token(token, finish)) => {
                self.completion_tokens += 1;
                let now = Instant::now();
                match self.last_token.replace(now) {
                    None => self.metrics.time_to_first_token((now - self.arrived).as_secs_f64()),
                    Some(prev) => self.metrics.inter_token_latency((now - prev).as_secs_f64()),
                }
                let mut text = self.decoder.push(tok, token.token).unwrap_or_default();
                if finish.is_some() {
                    text.push_str(&self.decoder.flush(tok).unwrap_or_default());
                }
                Ok(Chunk::Token { token, text, finish })
            }
            Some(ReplicaEvent::Failed(m)) => Err(FrontendError::Unavailable(m)),
            Some(ReplicaEvent::Rejected(m)) => Err(FrontendError::QueueFull(m)),
            },
        };
        self.outcome = match &chunk {
            Err(FrontendError::DeadlineExceeded(_)) => Some(Outcome::Aborted),
            Err(_) => Some(Outcome::Failed),
            Ok(Chunk::Token { finish: Some(Finish::Length), .. }) => Some(Outcome::Length),
            Ok(Chunk::Token { finish: Some(Finish::Stop), .. }) => Some(Outcome::Stop),
            Ok(Chunk::Token { finish: Some(Finish::Abort), .. }) => Some(Outcome::Aborted),
            Ok(_) => None,
        };
        Some(chunk)
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.served.tokenizer
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.request_id);
        let outcome = self.outcome.unwrap_or(Outcome::Aborted);
        self.metrics.finished(outcome, self.arrived.elapsed().as_secs_f64(), self.prompt.len(), self.completion_tokens);
    }
}
