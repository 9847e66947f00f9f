//! A local driver over one [`Engine`]: requests join at step boundaries, finished ones leave
//! (continuous batching), each new request is admitted only when the KV cache can hold its
//! prompt and all of its `max_tokens`, so nothing is ever preempted. Used by `worker
//! generate`, the benchmark and the tests; the coordinator schedules clusters itself.

use std::collections::VecDeque;

use crate::backend::Backend;
use crate::engine::{Engine, SeqStep};
use crate::error::{EngineError, Result};
use crate::kv_cache::BlockAllocator;
use crate::sampling::{SamplingParams, TokenLogprobs};

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or the model's context was reached.
    Length,
    /// A stop token was sampled.
    Stop,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: u64,
    pub tokens: Vec<u32>,
    /// One per generated token.
    pub logprobs: Vec<TokenLogprobs>,
    /// One per prompt token after the first, when asked for.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub finish_reason: FinishReason,
}

/// A token produced by a step, for streaming.
#[derive(Debug, Clone)]
pub struct TokenEvent {
    pub id: u64,
    pub token: TokenLogprobs,
    pub finished: Option<FinishReason>,
}

struct Running {
    request: Request,
    blocks: Vec<u32>,
    /// Tokens in the KV cache.
    cached: usize,
    generated: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    prompt_logprobs: Vec<TokenLogprobs>,
}

pub struct Generator<B: Backend> {
    pub engine: Engine<B>,
    allocator: BlockAllocator,
    waiting: VecDeque<Request>,
    running: Vec<Running>,
    finished: Vec<Completion>,
    max_num_seqs: usize,
}

impl<B: Backend> Generator<B> {
    pub fn new(engine: Engine<B>, max_num_seqs: usize) -> Self {
        let c = engine.cache_config();
        Generator {
            engine,
            allocator: BlockAllocator::new(c.num_blocks, c.block_size),
            waiting: VecDeque::new(),
            running: Vec::new(),
            finished: Vec::new(),
            max_num_seqs: max_num_seqs.max(1),
        }
    }

    /// Checks and queues a request.
    pub fn add(&mut self, request: Request) -> Result<()> {
        let config = self.engine.config();
        let max_context = config.max_position_embeddings;
        request.params.validate(config.vocab_size).map_err(EngineError::InvalidRequest)?;
        if request.prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(&t) = request.prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(EngineError::InvalidRequest(format!("prompt token {t} must be < {}", config.vocab_size)));
        }
        let total = request.prompt.len() + request.params.max_tokens;
        if total > max_context {
            return Err(EngineError::InvalidRequest(format!(
                "prompt ({}) + max_tokens ({}) must be <= {max_context} (the model's context), got {total}",
                request.prompt.len(),
                request.params.max_tokens
            )));
        }
        let blocks = self.allocator.blocks_for(total);
        if blocks > self.allocator.num_blocks() {
            return Err(EngineError::InvalidRequest(format!(
                "prompt + max_tokens ({total} tokens) must fit in the KV cache ({} tokens)",
                self.allocator.num_blocks() * self.allocator.block_size()
            )));
        }
        self.waiting.push_back(request);
        Ok(())
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Takes the requests finished so far.
    pub fn take_finished(&mut self) -> Vec<Completion> {
        std::mem::take(&mut self.finished)
    }

    /// Admits what fits, runs one step over all running sequences, returns the new tokens.
    pub fn step(&mut self) -> Result<Vec<TokenEvent>> {
        while self.running.len() < self.max_num_seqs {
            let Some(front) = self.waiting.front() else { break };
            let mut blocks = Vec::new();
            if self.allocator.reserve(&mut blocks, front.prompt.len() + front.params.max_tokens).is_err() {
                break;
            }
            let request = self.waiting.pop_front().expect("front exists");
            self.running.push(Running { request, blocks, cached: 0, generated: Vec::new(), logprobs: Vec::new(), prompt_logprobs: Vec::new() });
        }
        if self.running.is_empty() {
            return Ok(Vec::new());
        }
        let steps: Vec<SeqStep<'_>> = self
            .running
            .iter()
            .map(|r| {
                let prefill = r.cached == 0;
                SeqStep {
                    tokens: if prefill { &r.request.prompt } else { std::slice::from_ref(r.generated.last().expect("decoding")) },
                    start_pos: r.cached,
                    block_table: &r.blocks,
                    sample: Some(&r.request.params),
                    prompt_logprobs: if prefill { r.request.params.prompt_logprobs } else { None },
                }
            })
            .collect();
        let outputs = self.engine.step(&steps)?;
        let mut events = Vec::with_capacity(outputs.len());
        for (r, out) in self.running.iter_mut().zip(outputs) {
            r.cached += if r.cached == 0 { r.request.prompt.len() } else { 1 };
            r.prompt_logprobs.extend(out.prompt_logprobs);
            let sampled = out.sampled.ok_or_else(|| EngineError::Backend("no sampled token".into()))?;
            r.generated.push(sampled.token);
            let finished = if r.request.params.stop_token_ids.contains(&sampled.token) {
                Some(FinishReason::Stop)
            } else if r.generated.len() >= r.request.params.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if r.request.params.logprobs.is_some() || r.request.params.prompt_logprobs.is_some() {
                r.logprobs.push(sampled.clone());
            }
            events.push(TokenEvent { id: r.request.id, token: sampled, finished });
        }
        let mut i = 0;
        while i < self.running.len() {
            if let Some(reason) = events.iter().find(|e| e.id == self.running[i].request.id).and_then(|e| e.finished) {
                let mut r = self.running.remove(i);
                self.allocator.release(&mut r.blocks);
                self.finished.push(Completion {
                    id: r.request.id,
                    tokens: r.generated,
                    logprobs: r.logprobs,
                    prompt_logprobs: r.prompt_logprobs,
                    finish_reason: reason,
                });
            } else {
                i += 1;
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
