//! Continuous batching for one replica, as a plain state machine (no I/O), the one policy
//! every path runs: the coordinator's replicas and, over a local engine, `worker::Generator`
//! (`worker generate`, the benchmarks, the reference tests). Requests wait in a bounded
//! queue, join the batch at step boundaries when the replica's KV cache has blocks for
//! them, prefill in chunks under a per-step token budget, decode one token per step, and
//! leave when finished or aborted (their blocks are freed at once). When a running sequence
//! needs a block and none is free, the newest sequence is preempted: its blocks are freed and
//! it is re-queued at the front with the tokens generated so far, to be recomputed. Sampling
//! is keyed by (seed, position), so a recomputed sequence continues with the same tokens.

use std::collections::VecDeque;

use crate::embedding::Pooling;
use crate::kv_cache::BlockAllocator;
use crate::sampling::{SamplingParams, TokenLogprobs};

/// Limits of one replica's scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub num_blocks: usize,
    pub block_size: usize,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most new tokens (prompt chunks + decode tokens) in one step.
    pub max_batch_tokens: usize,
    /// Most requests waiting; beyond it `add` refuses.
    pub max_queue: usize,
}

impl SchedulerConfig {
    /// The cluster's defaults (the coordinator's flags of the same names).
    pub const MAX_NUM_SEQS: usize = 64;
    pub const MAX_BATCH_TOKENS: usize = 512;
    pub const MAX_QUEUE: usize = 256;
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
}

/// A request as the scheduler sees it (already validated and tokenized).
#[derive(Debug, Clone)]
pub struct SeqRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

#[derive(Debug)]
struct Seq {
    req: SeqRequest,
    /// Tokens sampled so far.
    generated: Vec<u32>,
    /// Tokens of `prompt ++ generated` in the KV cache.
    cached: usize,
    blocks: Vec<u32>,
}

impl Seq {
    fn context(&self) -> usize {
        self.req.prompt.len() + self.generated.len()
    }

    /// Tokens not yet in the KV cache: the prompt (or, after a preemption, the prompt and the
    /// generated tokens) while prefilling, the last sampled token while decoding.
    fn to_feed(&self) -> usize {
        self.context() - self.cached
    }

    fn token_at(&self, i: usize) -> u32 {
        if i < self.req.prompt.len() { self.req.prompt[i] } else { self.generated[i - self.req.prompt.len()] }
    }
}

/// One sequence's share of a planned step.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedSeq {
    pub id: u64,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<u32>,
    /// Sample after this chunk (false for a prompt chunk that is not the last).
    pub sample: Option<SamplingParams>,
    pub prompt_logprobs: Option<usize>,
    /// For a sequence with penalties: its tokens are kept where it runs (see
    /// `SamplingParams::prompt_len`, which this is).
    pub keep_history: Option<usize>,
    /// On an embedding request's last chunk: pool its hidden states so.
    pub embed: Option<Pooling>,
}

/// What a step returned for one planned sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqResult {
    pub sampled: Option<TokenLogprobs>,
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub embedding: Option<Vec<f32>>,
}

/// What happened to a request in a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        id: u64,
        token: TokenLogprobs,
        finished: Option<Finish>,
    },
    PromptLogprobs {
        id: u64,
        logprobs: Vec<TokenLogprobs>,
    },
    /// An embedding request's answer; the request has ended.
    Embedding {
        id: u64,
        embedding: Vec<f32>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("prompt + max_tokens ({0} tokens) must fit in the KV cache ({1} tokens)")]
    TooLong(usize, usize),
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Sequences with kept tokens that ended ([`Scheduler::take_released`]).
    released: Vec<u64>,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Scheduler { cfg, alloc: BlockAllocator::new(cfg.num_blocks, cfg.block_size), waiting: VecDeque::new(), running: Vec::new(), released: Vec::new() }
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// KV cache blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.cfg.num_blocks - self.alloc.num_free()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn add(&mut self, req: SeqRequest) -> Result<(), AdmitError> {
        if self.waiting.len() >= self.cfg.max_queue {
            return Err(AdmitError::QueueFull(self.waiting.len()));
        }
        let total = req.prompt.len() + req.params.max_tokens;
        let capacity = self.cfg.num_blocks * self.cfg.block_size;
        if total > capacity {
            return Err(AdmitError::TooLong(total, capacity));
        }
        self.waiting.push_back(Seq { req, generated: Vec::new(), cached: 0, blocks: Vec::new() });
        Ok(())
    }

    /// Removes a request wherever it is and frees its blocks; false if unknown.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.running.iter().position(|s| s.req.id == id) {
            let mut s = self.running.remove(i);
            self.release(&mut s);
            return true;
        }
        if let Some(i) = self.waiting.iter().position(|s| s.req.id == id) {
            let mut s = self.waiting.remove(i).expect("index is valid");
            self.release(&mut s);
            return true;
        }
        false
    }

    /// Plans the next step, or `None` when there is nothing to run.
    pub fn schedule(&mut self) -> Option<Vec<PlannedSeq>> {
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan: Vec<PlannedSeq> = Vec::new();
        // 1. Decodes, oldest first. A decode that finds no free block preempts the newest
        //    running sequence (possibly itself).
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &mut self.running[i];
            let decoding = s.to_feed() == 1 && !s.generated.is_empty();
            if !decoding {
                i += 1;
                continue;
            }
            match Self::plan_chunk(&mut self.alloc, s, &mut budget, plan.is_empty()) {
                Some(p) => {
                    plan.push(p);
                    i += 1;
                }
                None => self.preempt(self.running.len() - 1),
            }
        }
        // 2. Prompt chunks of sequences already running.
        for s in &mut self.running {
            if budget == 0 {
                break;
            }
            if !plan.iter().any(|p| p.id == s.req.id)
                && let Some(p) = Self::plan_chunk(&mut self.alloc, s, &mut budget, plan.is_empty())
            {
                plan.push(p);
            }
        }
        // 3. Admit waiting requests while sequences, budget and blocks allow.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else { break };
            match Self::plan_chunk(&mut self.alloc, &mut s, &mut budget, plan.is_empty()) {
                Some(p) => {
                    plan.push(p);
                    self.running.push(s);
                }
                None => {
                    self.waiting.push_front(s);
                    break;
                }
            }
        }
        (!plan.is_empty()).then_some(plan)
    }

    /// The next chunk of `s` within `budget`, reserving its blocks; `None` if blocks or
    /// budget are short. A prompt with prompt logprobs goes in one chunk (over the budget
    /// only when it is alone in the step).
    fn plan_chunk(alloc: &mut BlockAllocator, s: &mut Seq, budget: &mut usize, alone: bool) -> Option<PlannedSeq> {
        let to_feed = s.to_feed();
        let params = &s.req.params;
        let whole = (params.prompt_logprobs.is_some() || params.embed == Some(Pooling::Mean)) && s.cached == 0 && s.generated.is_empty();
        let n = match (whole, to_feed <= *budget) {
            (true, true) => to_feed,
            (true, false) if alone => to_feed,
            (true, false) => return None,
            (false, _) => to_feed.min(*budget),
        };
        if n == 0 {
            return None;
        }
        alloc.reserve(&mut s.blocks, s.cached + n).ok()?;
        *budget = budget.saturating_sub(n);
        Some(PlannedSeq {
            id: s.req.id,
            tokens: (s.cached..s.cached + n).map(|i| s.token_at(i)).collect(),
            start_pos: s.cached,
            block_table: s.blocks.clone(),
            sample: (n == to_feed && s.req.params.embed.is_none()).then(|| s.req.params.clone()),
            prompt_logprobs: if whole { s.req.params.prompt_logprobs } else { None },
            keep_history: s.req.params.penalties.active().then_some(s.req.params.prompt_len),
            embed: s.req.params.embed.filter(|_| n == to_feed),
        })
    }

    /// Frees a sequence that ended: its blocks, and its tokens where they are kept.
    fn release(&mut self, s: &mut Seq) {
        self.alloc.release(&mut s.blocks);
        if s.req.params.penalties.active() {
            self.released.push(s.req.id);
        }
    }

    /// The sequences whose kept tokens the engine may drop (they ended), since the last call.
    pub fn take_released(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.released)
    }

    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        tracing::debug!(id = s.req.id, "preempted: recomputing later");
        self.alloc.release(&mut s.blocks);
        s.cached = 0;
        self.waiting.push_front(s);
    }

    /// Applies a step's results (in plan order) and returns what clients must hear.
    pub fn complete(&mut self, plan: &[PlannedSeq], results: Vec<SeqResult>) -> Vec<Event> {
        let mut events = Vec::new();
        for (p, SeqResult { sampled, prompt_logprobs, embedding }) in plan.iter().zip(results) {
            let Some(i) = self.running.iter().position(|s| s.req.id == p.id) else { continue };
            let s = &mut self.running[i];
            s.cached = p.start_pos + p.tokens.len();
            if !prompt_logprobs.is_empty() {
                events.push(Event::PromptLogprobs { id: p.id, logprobs: prompt_logprobs });
            }
            if let Some(embedding) = embedding.filter(|_| p.embed.is_some()) {
                events.push(Event::Embedding { id: p.id, embedding });
                let mut s = self.running.remove(i);
                self.release(&mut s);
                continue;
            }
            let Some(token) = sampled else { continue };
            s.generated.push(token.token);
            let params = &s.req.params;
            let finished = if params.stop_token_ids.contains(&token.token) {
                Some(Finish::Stop)
            } else if s.generated.len() >= params.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            events.push(Event::Token { id: p.id, token, finished });
            if finished.is_some() {
                let mut s = self.running.remove(i);
                self.release(&mut s);
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(num_blocks: usize, max_batch_tokens: usize) -> SchedulerConfig {
        SchedulerConfig { num_blocks, block_size: 4, max_num_seqs: 8, max_batch_tokens, max_queue: 4 }
    }

    fn req(id: u64, prompt_len: usize, max_tokens: usize) -> SeqRequest {
        let params = SamplingParams { max_tokens, ..SamplingParams::default() };
        SeqRequest { id, prompt: (0..prompt_len as u32).map(|t| 10 + t).collect(), params }
    }

    /// A stand-in model whose next token depends only on the position, like seeded sampling.
    fn run(s: &mut Scheduler, plan: &[PlannedSeq]) -> Vec<Event> {
        let results = plan
            .iter()
            .map(|p| {
                let pos = p.start_pos + p.tokens.len();
                let tok = TokenLogprobs { token: (pos * 7 % 100) as u32, logprob: -1.0, top: vec![] };
                SeqResult { sampled: p.sample.as_ref().map(|_| tok), embedding: p.embed.map(|_| vec![pos as f32]), ..SeqResult::default() }
            })
            .collect();
        s.complete(plan, results)
    }

    fn tokens_of(events: &[Event], id: u64) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Token { id: i, token, .. } if *i == id => Some(token.token),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn long_prompts_prefill_in_chunks_under_the_token_budget() {
        let mut s = Scheduler::new(cfg(64, 8));
        s.add(req(1, 20, 2)).unwrap();
        let mut chunks = Vec::new();
        let mut events = Vec::new();
        while let Some(plan) = s.schedule() {
            chunks.push((plan[0].start_pos, plan[0].tokens.len(), plan[0].sample.is_some()));
            events.extend(run(&mut s, &plan));
        }
        assert_eq!(chunks, vec![(0, 8, false), (8, 8, false), (16, 4, true), (20, 1, true)]);
        assert_eq!(tokens_of(&events, 1), vec![(20 * 7 % 100) as u32, (21 * 7 % 100) as u32]);
        assert_eq!(s.used_blocks(), 0, "blocks freed when the sequence ends");
    }

    #[test]
    fn requests_join_and_leave_at_step_boundaries() {
        let mut s = Scheduler::new(cfg(64, 64));
        s.add(req(1, 3, 4)).unwrap();
        let plan = s.schedule().unwrap();
        run(&mut s, &plan);
        s.add(req(2, 5, 1)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(plan.iter().map(|p| (p.id, p.tokens.len())).collect::<Vec<_>>(), vec![(1, 1), (2, 5)]);
        let events = run(&mut s, &plan);
        assert!(events.contains(&Event::Token { id: 2, token: TokenLogprobs { token: 35, logprob: -1.0, top: vec![] }, finished: Some(Finish::Length) }));
        assert_eq!(s.num_running(), 1, "request 2 left after its only token");
    }

    #[test]
    fn abort_frees_blocks_at_once() {
        let mut s = Scheduler::new(cfg(64, 64));
        s.add(req(1, 9, 10)).unwrap();
        let plan = s.schedule().unwrap();
        run(&mut s, &plan);
        assert_eq!(s.used_blocks(), 3);
        assert!(s.abort(1));
        assert_eq!(s.used_blocks(), 0);
        assert!(!s.abort(1));
        assert!(s.schedule().is_none());
    }

    #[test]
    fn preemption_recomputes_and_continues_with_the_same_tokens() {
        // Alone, each request gets the tokens of positions prompt_len.. .
        let mut alone = Vec::new();
        for id in [1, 2] {
            let mut s = Scheduler::new(cfg(64, 64));
            s.add(req(id, 6, 8)).unwrap();
            let mut events = Vec::new();
            while let Some(plan) = s.schedule() {
                events.extend(run(&mut s, &plan));
            }
            alone.push(tokens_of(&events, id));
        }
        // Five blocks of 4 tokens cannot hold two sequences of 6 + 8.
        let mut s = Scheduler::new(cfg(5, 64));
        s.add(req(1, 6, 8)).unwrap();
        s.add(req(2, 6, 8)).unwrap();
        let mut events = Vec::new();
        let mut preempted = false;
        while let Some(plan) = s.schedule() {
            preempted |= s.num_waiting() > 0 && plan.iter().all(|p| p.id != 2);
            events.extend(run(&mut s, &plan));
        }
        assert!(preempted, "the cache was too small for both");
        assert_eq!(tokens_of(&events, 1), alone[0]);
        assert_eq!(tokens_of(&events, 2), alone[1]);
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn the_tokens_of_penalized_sequences_are_kept_until_they_end() {
        let penalized = |id, max_tokens| {
            let mut r = req(id, 3, max_tokens);
            r.params.penalties.presence = 0.5;
            r.params.prompt_len = 3;
            r
        };
        let mut s = Scheduler::new(cfg(64, 64));
        s.add(penalized(1, 2)).unwrap();
        s.add(penalized(2, 5)).unwrap();
        s.add(req(3, 3, 2)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(plan.iter().map(|p| p.keep_history).collect::<Vec<_>>(), vec![Some(3), Some(3), None]);
        run(&mut s, &plan);
        assert!(s.take_released().is_empty());
        let plan = s.schedule().unwrap();
        run(&mut s, &plan);
        // 1 finished; 3 finished too but kept nothing; 2 is aborted.
        assert_eq!(s.take_released(), vec![1]);
        assert!(s.abort(2));
        assert_eq!(s.take_released(), vec![2]);
        assert!(s.take_released().is_empty());
    }

    #[test]
    fn an_embedding_request_prefills_and_ends_with_its_embedding() {
        let mut s = Scheduler::new(cfg(64, 8));
        let mut r = req(1, 20, 1);
        r.params.embed = Some(Pooling::Last);
        s.add(r).unwrap();
        let mut mean = req(2, 6, 1);
        mean.params.embed = Some(Pooling::Mean);
        s.add(mean).unwrap();
        let mut steps = Vec::new();
        let mut events = Vec::new();
        while let Some(plan) = s.schedule() {
            steps.push(plan.iter().map(|p| (p.id, p.tokens.len(), p.embed, p.sample.is_some())).collect::<Vec<_>>());
            events.extend(run(&mut s, &plan));
        }
        // `last` prefills in chunks and pools the last; `mean` waits for room for its whole
        // prompt; neither samples.
        assert_eq!(
            steps,
            vec![vec![(1, 8, None, false)], vec![(1, 8, None, false)], vec![(1, 4, Some(Pooling::Last), false)], vec![(2, 6, Some(Pooling::Mean), false)],]
        );
        assert_eq!(events, vec![Event::Embedding { id: 1, embedding: vec![20.0] }, Event::Embedding { id: 2, embedding: vec![6.0] }]);
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn the_queue_is_bounded_and_oversized_requests_are_refused() {
        let mut s = Scheduler::new(cfg(8, 64));
        for id in 0..4 {
            s.add(req(id, 2, 2)).unwrap();
        }
        assert_eq!(s.add(req(9, 2, 2)), Err(AdmitError::QueueFull(4)));
        let mut s = Scheduler::new(cfg(8, 64));
        assert_eq!(s.add(req(1, 30, 3)), Err(AdmitError::TooLong(33, 32)));
    }
}
