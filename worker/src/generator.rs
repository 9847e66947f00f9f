//! A local driver over one [`Engine`]: the cluster's [`Scheduler`] plans each step, the engine
//! runs it, and the results go back to the scheduler, exactly as a replica drives its
//! workers (continuous batching, chunked prefill, preemption by recomputation). Used by
//! `worker generate`, the benchmarks and the tests.

use std::collections::HashMap;

use crate::backend::Backend;
use crate::engine::{Engine, SeqStep};
use crate::error::{BadRequest, EngineError, Result};
use crate::kv_cache::PrefixHasher;
use crate::sampling::TokenLogprobs;
use crate::scheduler::{Event, Finish, PrefixStats, Scheduler, SchedulerConfig, SeqRequest, SeqResult};

/// A finished request.
#[derive(Debug, Clone, Default)]
pub struct Completion {
    pub id: u64,
    pub tokens: Vec<u32>,
    /// One per generated token, when logprobs or prompt logprobs were asked for.
    pub logprobs: Vec<TokenLogprobs>,
    /// One per prompt token after the first, when asked for.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub finish: Option<Finish>,
    /// An embedding request's answer.
    pub embedding: Option<Vec<f32>>,
}

pub struct Generator<B: Backend> {
    pub engine: Engine<B>,
    scheduler: Scheduler,
    /// Requests not finished yet, as far as they have come.
    running: HashMap<u64, Running>,
    finished: Vec<Completion>,
}

/// A request not finished yet.
struct Running {
    done: Completion,
    /// Whether its generated tokens' logprobs are kept (logprobs or prompt logprobs asked).
    keeps_logprobs: bool,
}

impl<B: Backend> Generator<B> {
    /// A driver that runs at most `max_num_seqs` sequences a step, with the cluster's other
    /// limits (every request is queued: a local caller has no one to refuse) and prefix
    /// caching.
    pub fn new(engine: Engine<B>, max_num_seqs: usize) -> Self {
        Self::with_prefix_caching(engine, max_num_seqs, true)
    }

    /// [`Generator::new`], with prefix caching on or off.
    pub fn with_prefix_caching(engine: Engine<B>, max_num_seqs: usize, prefix_caching: bool) -> Self {
        let c = engine.cache_config();
        let cfg = SchedulerConfig {
            num_blocks: c.num_blocks,
            block_size: c.block_size,
            max_num_seqs: max_num_seqs.max(1),
            max_batch_tokens: SchedulerConfig::MAX_BATCH_TOKENS,
            max_queue: usize::MAX,
            prefix_caching,
        };
        // One engine, one model: its config names what its blocks hold.
        let scheduler = Scheduler::new(cfg, PrefixHasher::new(&format!("{:?}", engine.config()), c.block_size));
        Generator { engine, scheduler, running: HashMap::new(), finished: Vec::new() }
    }

    /// Checks and queues a request.
    pub fn add(&mut self, request: SeqRequest) -> Result<()> {
        let config = self.engine.config();
        let max_context = config.max_position_embeddings;
        request.params.validate(config.vocab_size).map_err(BadRequest::from)?;
        if request.prompt.is_empty() {
            return Err(BadRequest::EmptyPrompt.into());
        }
        if let Some(&token) = request.prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(BadRequest::TokenId { token, vocab: config.vocab_size }.into());
        }
        let (prompt, max_tokens) = (request.prompt.len(), request.params.max_tokens);
        if prompt + max_tokens > max_context {
            return Err(BadRequest::Context { prompt, max_tokens, context: max_context }.into());
        }
        if self.running.contains_key(&request.id) {
            return Err(BadRequest::Duplicate(request.id).into());
        }
        let id = request.id;
        let keeps_logprobs = request.params.logprobs.is_some() || request.params.prompt_logprobs.is_some();
        self.scheduler.add(request).map_err(BadRequest::from)?;
        self.running.insert(id, Running { done: Completion { id, ..Completion::default() }, keeps_logprobs });
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    pub fn num_running(&self) -> usize {
        self.scheduler.num_running()
    }

    /// KV cache blocks some sequence references.
    pub fn used_blocks(&self) -> usize {
        self.scheduler.used_blocks()
    }

    /// The prefix cache's counters (prompt tokens looked up and found).
    pub fn prefix_stats(&self) -> PrefixStats {
        self.scheduler.prefix_stats()
    }

    /// Takes the requests finished so far.
    pub fn take_finished(&mut self) -> Vec<Completion> {
        std::mem::take(&mut self.finished)
    }

    /// Runs the step the scheduler plans; returns what happened to each request.
    pub fn step(&mut self) -> Result<Vec<Event>> {
        let Some(plan) = self.scheduler.schedule() else { return Ok(Vec::new()) };
        let steps: Vec<SeqStep<'_>> = plan
            .iter()
            .map(|p| SeqStep {
                id: p.id,
                tokens: &p.tokens,
                start_pos: p.start_pos,
                block_table: &p.block_table,
                sample: p.sample.as_ref(),
                prompt_logprobs: p.prompt_logprobs,
                keep_history: p.keep_history,
                history: &p.history,
                embed: p.embed,
                grammar: p.grammar.as_deref(),
            })
            .collect();
        self.engine.release(&self.scheduler.take_released());
        let outputs = self.engine.step(&steps)?;
        let results = plan
            .iter()
            .zip(outputs)
            .map(|(p, out)| SeqResult {
                sampled: out.sampled.filter(|_| p.sample.is_some()),
                prompt_logprobs: out.prompt_logprobs,
                embedding: out.embedding,
                error: out.error,
            })
            .collect();
        let events = self.scheduler.complete(&plan, results);
        for event in &events {
            match event {
                Event::PromptLogprobs { id, logprobs } => {
                    if let Some(r) = self.running.get_mut(id) {
                        r.done.prompt_logprobs.extend(logprobs.iter().cloned());
                    }
                }
                Event::Embedding { id, embedding } => {
                    if let Some(r) = self.running.remove(id) {
                        self.finished.push(Completion { embedding: Some(embedding.clone()), ..r.done });
                    }
                }
                Event::Error { id, message } => return Err(EngineError::Backend(format!("request {id}: {message}"))),
                Event::Token { id, token, finished } => {
                    let Some(r) = self.running.get_mut(id) else { continue };
                    r.done.tokens.push(token.token);
                    if r.keeps_logprobs {
                        r.done.logprobs.push(token.clone());
                    }
                    if finished.is_some() {
                        let mut done = self.running.remove(id).expect("running").done;
                        done.finish = *finished;
                        self.finished.push(done);
                    }
                }
            }
        }
        Ok(events)
    }

    /// Runs until every queued request has finished; returns them in request-id order.
    pub fn run_to_completion(&mut self) -> Result<Vec<Completion>> {
        while self.has_work() {
            self.step()?;
        }
        let mut done = self.take_finished();
        done.sort_by_key(|c| c.id);
        Ok(done)
    }
}
