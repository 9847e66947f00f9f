//! What the gRPC and HTTP APIs share: the served model, request ids, routing to the
//! least-loaded live replica, and a [`Generation`] that turns a replica's events into text
//! deltas. A generation outlives its replica: when the replica fails or is retired, the
//! request is re-queued on another with the tokens generated so far (sampling is keyed by
//! position, so it continues with the same tokens) and the client sees no gap or duplicate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cluster::{IncrementalDecoder, SamplingParams, TokenLogprobs, Tokenizer};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::chat::{ChatTemplate, Message};
use crate::control::{Pool, Routing};
use crate::metrics::{Gauges, Metrics, Outcome};
use crate::replica::{ReplicaEvent, ReplicaHandle, ReplicaStats};
use crate::validate::{self, ModelLimits, PromptInput, RawRequest, RequestError};
use cluster::embedding::Pooling;
use cluster::experts::ExpertLoad;
use cluster::kv_cache::PrefixHasher;
use cluster::scheduler::{Finish, SeqRequest};

/// Most inputs one embedding request may hold.
pub const MAX_EMBED_INPUTS: usize = 256;

/// The model a coordinator serves.
pub struct Served {
    pub name: String,
    pub architecture: String,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    pub limits: ModelLimits,
    /// How embedding requests pool hidden states.
    pub pooling: Pooling,
    /// Names the replicas' cached blocks (`None` without prefix caching).
    pub prefix: Option<PrefixHasher>,
    pub routing: Routing,
    /// The tokenizer's tool-calling control tokens (`None`: it has none; tools are refused).
    pub tool_tokens: Option<crate::tools::ToolTokens>,
}

impl Served {
    /// The model in `dir` (its `config.json` read as `config`, its tokenizer) as a coordinator
    /// serves it: named after the directory, its chat template, tool-calling tokens, limits and
    /// grammar compiler (without one, constrained requests are refused with the reason); mean
    /// pooling, the default routing and no prefix caching, which the caller may change.
    pub fn load(dir: &std::path::Path, config: &cluster::ModelConfig, tokenizer: Tokenizer) -> Result<Served, String> {
        let grammars = cluster::constraint::Grammars::for_model(&dir.join("tokenizer.json"), config).map_err(|e| {
            tracing::warn!(error = %e, "output constraints are unavailable");
            e.to_string()
        });
        Ok(Served {
            name: dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
            architecture: config.architecture.hf_name().to_owned(),
            tool_tokens: crate::tools::ToolTokens::of(&tokenizer),
            chat_template: ChatTemplate::load(dir)?,
            pooling: Pooling::default(),
            prefix: None,
            routing: Routing::default(),
            limits: ModelLimits {
                vocab_size: config.vocab_size,
                max_context: config.max_position_embeddings,
                eos_token_ids: config.eos_token_ids.clone(),
                lm_head: config.lm_head,
                grammars,
            },
            tokenizer,
        })
    }

    /// The prompt ids of a conversation: the chat template's text, tokenized without adding
    /// special tokens (the template writes its own).
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>, RequestError> {
        let text = self.chat_template.render(messages).map_err(RequestError::Messages)?;
        self.tokenizer.encode(&text, false).map_err(RequestError::untokenizable("messages"))
    }

    /// A fill-in-the-middle prompt: `prompt`, then the model writes what comes before `suffix`.
    pub fn fim_prompt(&self, prompt: &str, suffix: &str) -> Result<Vec<u32>, RequestError> {
        self.tokenizer.encode_fim(prompt, suffix).map_err(RequestError::untokenizable("prompt"))?.ok_or(RequestError::NoFim)
    }

    /// The text of token ids, each checked against the vocabulary (`field` names them in the
    /// error).
    pub fn detokenize(&self, ids: &[u32], skip_special_tokens: bool, field: &'static str) -> Result<String, RequestError> {
        let vocab = self.limits.vocab_size;
        if let Some(&got) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(RequestError::TokenId { field, got, vocab });
        }
        self.tokenizer.decode(ids, skip_special_tokens).map_err(RequestError::untokenizable(field))
    }
}

/// Errors the APIs report; each API maps them exhaustively to its own status codes.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error(transparent)]
    InvalidArgument(#[from] RequestError),
    #[error("request id {0:?} is already running")]
    AlreadyExists(String),
    #[error("{0}")]
    QueueFull(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("the request's deadline of {0:?} passed before it finished")]
    DeadlineExceeded(std::time::Duration),
    /// The coordinator is shutting down: it takes no new request, and one still running
    /// when its shutdown timeout passes ends with this.
    #[error("{0}")]
    ShuttingDown(String),
    /// The request failed where it ran and cannot be retried (its output constraint failed).
    #[error("{0}")]
    Internal(String),
}

/// One step's worth of a generation, for a client.
#[derive(Debug, Clone)]
pub enum Chunk {
    PromptLogprobs(Vec<TokenLogprobs>),
    Token {
        token: TokenLogprobs,
        text: String,
        finish: Option<Finish>,
    },
    /// The end, with no token: a request that scored its prompt only.
    End(Finish),
    /// An embedding request's answer (its only chunk).
    Embedding(Vec<f32>),
}

/// Client request id -> the replica and internal id serving it (`None` while it waits for a
/// replica). Abort removes the entry, which also stops a waiting request from being placed.
type Running = Arc<Mutex<HashMap<String, Option<(ReplicaHandle, u64)>>>>;

#[derive(Clone)]
pub struct Frontend {
    pub served: Arc<Served>,
    /// API keys, their limits and usage.
    pub auth: crate::auth::Auth,
    pub pool: watch::Receiver<Arc<Pool>>,
    pub metrics: Arc<Metrics>,
    next_id: Arc<AtomicU64>,
    running: Running,
    /// Cancelled when shutdown starts: new requests are refused.
    stopping: CancellationToken,
    /// Cancelled when the shutdown timeout passes: requests still running end with an error.
    cut: CancellationToken,
}

impl Frontend {
    pub fn new(served: Served, pool: watch::Receiver<Arc<Pool>>, metrics: Arc<Metrics>, auth: crate::auth::Auth) -> Self {
        Frontend {
            served: Arc::new(served),
            auth,
            pool,
            metrics,
            next_id: Arc::new(AtomicU64::new(1)),
            running: Arc::default(),
            stopping: CancellationToken::new(),
            cut: CancellationToken::new(),
        }
    }

    /// Starts shutting down: new requests are refused from now on.
    pub fn stop_accepting(&self) {
        self.stopping.cancel();
    }

    /// Whether shutdown has started (the coordinator is not ready).
    pub fn stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Ends every request still running with [`FrontendError::ShuttingDown`].
    pub fn cut_running(&self) {
        self.cut.cancel();
    }

    /// Requests running now.
    pub fn in_flight(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The current placement.
    pub fn pool(&self) -> Arc<Pool> {
        self.pool.borrow().clone()
    }

    /// The placement as it changes.
    pub fn pool_changes(&self) -> watch::Receiver<Arc<Pool>> {
        self.pool.clone()
    }

    /// Whether requests are served now: a replica serves and shutdown has not begun.
    pub fn ready(&self) -> bool {
        !self.stopping() && !self.pool().replicas.is_empty()
    }

    /// Validates and starts a generation that must finish within `timeout`. It is routed to
    /// the least-loaded replica; while none serves (the cluster is changing shape) it waits.
    pub fn start(&self, request_id: Option<String>, raw: RawRequest, timeout: std::time::Duration) -> Result<Generation, FrontendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let fresh_seed = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(std::process::id());
        if self.stopping() {
            return Err(FrontendError::ShuttingDown("the coordinator is shutting down: retry on another".into()));
        }
        let valid = validate::check(raw, &self.served.tokenizer, &self.served.limits, fresh_seed)?;
        if let Some(reason) = &self.pool().no_capacity {
            return Err(FrontendError::Unavailable(reason.clone()));
        }
        let request_id = request_id.filter(|r| !r.is_empty()).unwrap_or_else(|| format!("req-{id}"));
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&request_id) {
                return Err(FrontendError::AlreadyExists(request_id));
            }
            running.insert(request_id.clone(), None);
        }
        let mut g = Generation {
            request_id,
            prompt: valid.prompt.clone(),
            params: valid.params.clone(),
            generated: Vec::new(),
            decoder: IncrementalDecoder::new(&valid.prompt, valid.skip_special_tokens),
            score_only: valid.score_only,
            cache_salt: valid.cache_salt.clone(),
            cached_tokens: None,
            stops: StopStrings { stops: valid.stop.clone(), pending: String::new() },
            wants_logprobs: valid.params.logprobs.is_some(),
            completion_tokens: 0,
            events: None,
            frontend: self.clone(),
            arrived: Instant::now(),
            timeout,
            last_token: None,
            outcome: None,
        };
        g.try_submit()?;
        Ok(g)
    }

    /// Embeds each input (all at once, each a request of its own, as many replicas as serve
    /// sharing them): the pooled, L2-normalised vectors in order, and the tokens read. Text is
    /// tokenized as e5-mistral's inputs are: BOS, the text, EOS.
    pub async fn embed(&self, inputs: Vec<PromptInput>, timeout: std::time::Duration) -> Result<(Vec<Vec<f32>>, usize), FrontendError> {
        let eos = self.served.limits.eos_token_ids.first().copied();
        let mut generations = Vec::with_capacity(inputs.len());
        for input in inputs {
            let prompt = match input {
                PromptInput::Text(t) if !t.is_empty() => {
                    let mut ids = self.served.tokenizer.encode(&t, true).map_err(RequestError::untokenizable("input"))?;
                    ids.extend(eos);
                    PromptInput::TokenIds(ids)
                }
                other => other,
            };
            let raw = RawRequest { prompt: Some(prompt), embed: Some(self.served.pooling), ..RawRequest::default() };
            generations.push(self.start(None, raw, timeout)?);
        }
        let (mut vectors, mut tokens) = (Vec::with_capacity(generations.len()), 0);
        for mut g in generations {
            tokens += g.prompt.len();
            loop {
                match g.next().await {
                    Some(Ok(Chunk::Embedding(v))) => break vectors.push(v),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e),
                    None => return Err(FrontendError::Unavailable("the replica ended the request without its embedding".into())),
                }
            }
        }
        Ok((vectors, tokens))
    }

    /// Aborts a running request by its client id; false if none runs.
    pub fn abort(&self, request_id: &str) -> bool {
        let found = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(request_id);
        if let Some(Some((replica, internal))) = &found {
            replica.abort(*internal);
        }
        found.is_some()
    }

    pub fn stats(&self) -> Vec<ReplicaStats> {
        self.pool().replicas.iter().map(|r| r.handle.stats()).collect()
    }

    /// The expert load of each serving Mixtral replica: its id, its expert-parallel ranks and
    /// the tokens its experts ran.
    pub fn expert_loads(&self) -> Vec<(u64, usize, ExpertLoad)> {
        let pool = self.pool();
        pool.replicas.iter().map(|r| (r.handle.id, r.plan.layout.ep, r.handle.expert_load())).filter(|(_, _, load)| !load.tokens.is_empty()).collect()
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

    fn next_internal_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running generation. Dropping it before the end aborts the request (its KV blocks are
/// freed at the replica's next turn).
pub struct Generation {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub wants_logprobs: bool,
    pub completion_tokens: usize,
    params: SamplingParams,
    /// Tokens delivered so far (re-queued with the prompt if the replica goes away).
    generated: Vec<u32>,
    decoder: IncrementalDecoder,
    /// Only the prompt's logprobs are delivered ([`Chunk::End`] instead of the token).
    score_only: bool,
    cache_salt: Option<String>,
    /// Prompt tokens found in the prefix cache where the request was first scheduled.
    cached_tokens: Option<usize>,
    stops: StopStrings,
    /// The current replica's events; `None` while waiting for one.
    events: Option<mpsc::UnboundedReceiver<ReplicaEvent>>,
    frontend: Frontend,
    arrived: Instant,
    timeout: std::time::Duration,
    last_token: Option<Instant>,
    /// Set once the generation has ended.
    outcome: Option<Outcome>,
}

impl Generation {
    /// Puts the request (what remains of it) on the replica routing picks: `Ok(false)` while
    /// none serves, an error once the request was aborted.
    fn try_submit(&mut self) -> Result<bool, FrontendError> {
        let prompt: Vec<u32> = self.prompt.iter().chain(&self.generated).copied().collect();
        let served = &self.frontend.served;
        // Hashed before taking the lock every submission shares.
        let prefix = served.prefix.as_ref().map(|h| h.hashes(self.cache_salt.as_deref(), &prompt)).unwrap_or_default();
        let mut running = self.frontend.running.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = running.get_mut(&self.request_id) else {
            return Err(FrontendError::Unavailable("the request was aborted".into()));
        };
        let pool = self.frontend.pool();
        let Some(handle) = pool.pick(&prefix, served.routing) else { return Ok(false) };
        let id = self.frontend.next_internal_id();
        let mut params = self.params.clone();
        if !self.generated.is_empty() {
            params.max_tokens -= self.generated.len();
            params.prompt_logprobs = None;
        }
        self.events = Some(handle.submit(SeqRequest { id, prompt, params, cache_salt: self.cache_salt.clone() }, prefix));
        *slot = Some((handle.clone(), id));
        Ok(true)
    }

    /// Waits until a replica takes the request again, the deadline passes, or no capacity
    /// remains.
    async fn resubmit(&mut self, deadline: tokio::time::Instant) -> Result<(), FrontendError> {
        let mut pool = self.frontend.pool.clone();
        loop {
            pool.borrow_and_update();
            if self.try_submit()? {
                return Ok(());
            }
            if let Some(reason) = &self.frontend.pool().no_capacity {
                return Err(FrontendError::Unavailable(reason.clone()));
            }
            match tokio::time::timeout_at(deadline, pool.changed()).await {
                Err(_) => return Err(FrontendError::DeadlineExceeded(self.timeout)),
                Ok(Err(_)) => return Err(FrontendError::Unavailable("the coordinator is shutting down".into())),
                Ok(Ok(())) => {}
            }
        }
    }

    /// The next chunk; `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<Chunk, FrontendError>> {
        if self.outcome.is_some() {
            return None;
        }
        let deadline = tokio::time::Instant::from_std(self.arrived + self.timeout);
        let cut = self.frontend.cut.clone();
        let chunk = tokio::select! {
            biased;
            _ = cut.cancelled() => Err(FrontendError::ShuttingDown(format!(
                "the coordinator shut down before the request finished ({} tokens generated)",
                self.generated.len()
            ))),
            chunk = self.next_chunk(deadline) => chunk,
        };
        self.outcome = match &chunk {
            Err(FrontendError::DeadlineExceeded(_)) => Some(Outcome::Aborted),
            Err(_) => Some(Outcome::Failed),
            Ok(Chunk::Token { finish: Some(Finish::Length), .. } | Chunk::End(Finish::Length)) => Some(Outcome::Length),
            Ok(Chunk::Token { finish: Some(Finish::Stop), .. } | Chunk::End(Finish::Stop) | Chunk::Embedding(_)) => Some(Outcome::Stop),
            Ok(_) => None,
        };
        Some(chunk)
    }

    /// The next chunk from the replica, moving the request when the replica goes away.
    async fn next_chunk(&mut self, deadline: tokio::time::Instant) -> Result<Chunk, FrontendError> {
        loop {
            let event = match self.events.as_mut() {
                None => None,
                Some(events) => match tokio::time::timeout_at(deadline, events.recv()).await {
                    Err(_) => return Err(FrontendError::DeadlineExceeded(self.timeout)),
                    Ok(event) => event,
                },
            };
            match event {
                // The replica failed, was retired, or stopped (an aborted request's replica
                // drops it: placing it again then fails): continue elsewhere.
                None | Some(ReplicaEvent::Failed(_)) => {
                    if let Some(ReplicaEvent::Failed(why)) = &event {
                        tracing::info!(request = %self.request_id, generated = self.generated.len(), %why, "moving the request");
                    }
                    self.events = None;
                    self.resubmit(deadline).await?;
                }
                Some(ReplicaEvent::Scheduled { cached_tokens }) => {
                    self.cached_tokens.get_or_insert(cached_tokens.min(self.prompt.len()));
                }
                Some(ReplicaEvent::PromptLogprobs(lps)) => return Ok(Chunk::PromptLogprobs(lps)),
                Some(ReplicaEvent::Embedding(embedding)) => return Ok(Chunk::Embedding(embedding)),
                Some(ReplicaEvent::Token(..)) if self.score_only => return Ok(Chunk::End(Finish::Length)),
                Some(ReplicaEvent::Token(token, finish)) => return Ok(self.token(token, finish)),
                Some(ReplicaEvent::Rejected(m)) => return Err(FrontendError::QueueFull(m)),
                Some(ReplicaEvent::Error(m)) => return Err(FrontendError::Internal(m)),
            }
        }
    }

    fn token(&mut self, token: TokenLogprobs, finish: Option<Finish>) -> Chunk {
        self.completion_tokens += 1;
        self.generated.push(token.token);
        let now = Instant::now();
        let metrics = &self.frontend.metrics;
        match self.last_token.replace(now) {
            None => metrics.time_to_first_token((now - self.arrived).as_secs_f64()),
            Some(prev) => metrics.inter_token_latency((now - prev).as_secs_f64()),
        }
        let tok = &self.frontend.served.tokenizer;
        let mut text = self.decoder.push(tok, token.token).unwrap_or_default();
        if finish.is_some() {
            text.push_str(&self.decoder.flush(tok).unwrap_or_default());
        }
        // Stop strings count from min_tokens on (as vLLM's), as stop tokens do.
        let (mut text, hit) = if self.completion_tokens >= self.params.min_tokens { self.stops.push(&text) } else { (text, false) };
        if hit {
            // The replica would go on generating: its sequence ends here.
            if let Some(Some((replica, internal))) = self.frontend.running.lock().unwrap_or_else(|p| p.into_inner()).get(&self.request_id) {
                replica.abort(*internal);
            }
            return Chunk::Token { token, text, finish: Some(Finish::Stop) };
        }
        if finish.is_some() {
            text.push_str(&self.stops.flush());
        }
        Chunk::Token { token, text, finish }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.frontend.served.tokenizer
    }

    /// Prompt tokens whose KV blocks came from the prefix cache (0 until scheduled).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens.unwrap_or(0)
    }
}

/// A request's stop strings over its text as it is generated: text that could be the start
/// of one is held back until it cannot.
struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    /// Adds text; returns what is safe to emit, and whether a stop string was generated (the
    /// text then ends just before it).
    fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_owned();
            self.pending.clear();
            return (out, true);
        }
        let keep = self.stops.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        let mut cut = self.pending.len().saturating_sub(keep);
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    /// What was held back, at the end of the generation.
    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let found = self.frontend.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.request_id);
        if self.outcome.is_none()
            && let Some(Some((replica, internal))) = found
        {
            replica.abort(internal);
        }
        let outcome = self.outcome.unwrap_or(Outcome::Aborted);
        self.frontend.metrics.finished(outcome, self.arrived.elapsed().as_secs_f64(), self.prompt.len(), self.completion_tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_possible_prefixes() {
        let mut m = StopStrings { stops: vec!["END".into()], pending: String::new() };
        assert_eq!(m.push("hello E"), ("hello".into(), false));
        assert_eq!(m.push("N"), (" ".into(), false));
        assert_eq!(m.push("D tail"), (String::new(), true));
        let mut m = StopStrings { stops: vec!["END".into()], pending: String::new() };
        assert_eq!(m.push("a ENx"), ("a E".into(), false));
        assert_eq!(m.flush(), "Nx");
        let mut none = StopStrings { stops: vec![], pending: String::new() };
        assert_eq!(none.push("any text"), ("any text".into(), false));
    }
}
