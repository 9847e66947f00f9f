//! Continuous batching for one replica, as a plain state machine (no I/O), the one policy
//! every path runs: the coordinator's replicas and, over a local engine, `worker::Generator`
//! (`worker generate`, the benchmarks, the reference tests). Requests wait in a bounded
//! queue, join the batch at step boundaries when the replica's KV cache has blocks for
//! them, prefill in chunks under a per-step token budget, decode one token per step, and
//! leave when finished or aborted (their blocks are freed at once). When a running sequence
//! needs a block and none is free, the newest sequence is preempted: its blocks are freed and
//! it is re-queued at the front with the tokens generated so far, to be recomputed. Sampling
//! is keyed by (seed, position), so a recomputed sequence continues with the same tokens.
//!
//! With prefix caching, a sequence joining the batch takes the cached blocks its context
//! starts with and prefills from the first block not cached (never its last token: it needs
//! logits); the blocks it fills are cached in turn. A request whose next block another running
//! sequence is computing waits for it (requests behind it go ahead), so identical prompts,
//! `n` choices among them, prefill once. Blocks are cached by content, so a hit changes no
//! token: the kernels are batch- and chunk-invariant.

use std::collections::VecDeque;

use crate::embedding::Pooling;
use crate::kv_cache::{BlockHash, BlockPool, CacheEvent, PrefixHasher};
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
    /// Reuse the KV blocks of prompts' common prefixes.
    pub prefix_caching: bool,
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
    /// Requests share cached blocks only with requests of the same salt.
    pub cache_salt: Option<String>,
}

#[derive(Debug)]
struct Seq {
    req: SeqRequest,
    /// Tokens sampled so far.
    generated: Vec<u32>,
    /// Tokens of `prompt ++ generated` in the KV cache.
    cached: usize,
    blocks: Vec<u32>,
    /// The hash chain's root (the salt's) and the hashes of the context's full blocks known.
    root: BlockHash,
    hashes: Vec<BlockHash>,
    /// Joined the batch with cached blocks and has not run a chunk since.
    resumed: bool,
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

    /// Hashes the context's full blocks not hashed yet.
    fn hash_blocks(&mut self, hasher: &PrefixHasher) {
        let bs = hasher.block_size();
        let (from, to) = (self.hashes.len() * bs, self.context() / bs * bs);
        if to > from {
            let tokens: Vec<u32> = (from..to).map(|i| self.token_at(i)).collect();
            hasher.extend(&self.root, &mut self.hashes, &tokens);
        }
    }

    /// Its first chunk must hold its whole prompt (to score it, or to pool over it).
    fn whole_prompt(&self) -> bool {
        (self.req.params.prompt_logprobs.is_some() || self.req.params.embed == Some(Pooling::Mean)) && self.generated.is_empty()
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
    /// With `keep_history`, on the first chunk of a sequence that joined with cached blocks:
    /// the tokens before `start_pos` (the history starts afresh from them).
    pub history: Vec<u32>,
    /// With `keep_history`, on the chunk that starts the kept tokens afresh: the sequence's
    /// grammar (`SamplingParams::grammar`).
    pub grammar: Option<std::sync::Arc<str>>,
}

/// What a step returned for one planned sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqResult {
    pub sampled: Option<TokenLogprobs>,
    pub prompt_logprobs: Vec<TokenLogprobs>,
    pub embedding: Option<Vec<f32>>,
    /// The sequence's constraint failed: nothing was sampled.
    pub error: Option<String>,
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
    /// The request cannot go on (its output constraint failed); it has ended.
    Error {
        id: u64,
        message: String,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    #[error("prompt + max_tokens ({0} tokens) must fit in the KV cache ({1} tokens)")]
    TooLong(usize, usize),
}

/// Prefix cache counters, in prompt tokens (vLLM's `prefix_cache_queries` and `_hits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Context tokens of the sequences that joined the batch.
    pub queries: u64,
    /// Those found in the cache.
    pub hits: u64,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    hasher: PrefixHasher,
    pool: BlockPool,
    prefix: PrefixStats,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Sequences with kept tokens that ended ([`Scheduler::take_released`]).
    released: Vec<u64>,
}

impl Scheduler {
    /// A scheduler whose cached blocks `hasher` names (its block size must be the config's).
    pub fn new(cfg: SchedulerConfig, hasher: PrefixHasher) -> Self {
        assert_eq!(hasher.block_size(), cfg.block_size, "the prefix hasher hashes blocks of the cache's size");
        Scheduler {
            cfg,
            hasher,
            pool: BlockPool::new(cfg.num_blocks, cfg.block_size, cfg.prefix_caching),
            prefix: PrefixStats::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            released: Vec::new(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// KV cache blocks some sequence references.
    pub fn used_blocks(&self) -> usize {
        self.pool.num_used()
    }

    /// KV cache blocks cached under their hash (referenced or not).
    pub fn cached_blocks(&self) -> usize {
        self.pool.num_cached()
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefix
    }

    /// Forgets every cached block no sequence references (the workers' KV cache lost their
    /// contents).
    pub fn forget_cached(&mut self) {
        self.pool.forget_cached();
    }

    /// Blocks cached or evicted since the last call.
    pub fn take_cache_events(&mut self) -> Vec<CacheEvent> {
        self.pool.take_events()
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
        let root = self.hasher.root(req.cache_salt.as_deref());
        self.waiting.push_back(Seq { req, generated: Vec::new(), cached: 0, blocks: Vec::new(), root, hashes: Vec::new(), resumed: false });
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
            match Self::plan_chunk(&mut self.pool, s, &mut budget, plan.is_empty()) {
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
                && let Some(p) = Self::plan_chunk(&mut self.pool, s, &mut budget, plan.is_empty())
            {
                plan.push(p);
            }
        }
        // 3. Admit waiting requests while sequences, budget and blocks allow, in order but for
        //    those that wait for a block another sequence is computing.
        let mut waiting_for_prefix = Vec::new();
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(mut s) = self.waiting.pop_front() else { break };
            let Some(hit) = self.reuse_prefix(&mut s) else {
                waiting_for_prefix.push(s);
                continue;
            };
            match Self::plan_chunk(&mut self.pool, &mut s, &mut budget, plan.is_empty()) {
                Some(p) => {
                    self.prefix.queries += s.context() as u64;
                    self.prefix.hits += hit as u64;
                    plan.push(p);
                    self.running.push(s);
                }
                None => {
                    self.requeue(s);
                    break;
                }
            }
        }
        for s in waiting_for_prefix.into_iter().rev() {
            self.waiting.push_front(s);
        }
        (!plan.is_empty()).then_some(plan)
    }

    /// Gives a sequence joining the batch the cached blocks its context starts with: the
    /// tokens found, or `None` if it must wait for a block a running sequence is computing.
    fn reuse_prefix(&mut self, s: &mut Seq) -> Option<usize> {
        if !self.cfg.prefix_caching {
            return Some(0);
        }
        s.hash_blocks(&self.hasher);
        if s.whole_prompt() {
            return Some(0);
        }
        let bs = self.cfg.block_size;
        let usable = &s.hashes[..s.context().saturating_sub(1) / bs];
        let hit = self.pool.cached_prefix(usable);
        if let Some(next) = usable.get(hit)
            && self.running.iter().any(|r| r.hashes.get(hit) == Some(next) && r.cached < (hit + 1) * bs)
        {
            return None;
        }
        self.pool.share(&mut s.blocks, &usable[..hit]);
        (s.cached, s.resumed) = (hit * bs, hit > 0);
        Some(hit * bs)
    }

    /// The next chunk of `s` within `budget`, reserving its blocks; `None` if blocks or
    /// budget are short. A prompt with prompt logprobs goes in one chunk (over the budget
    /// only when it is alone in the step).
    fn plan_chunk(pool: &mut BlockPool, s: &mut Seq, budget: &mut usize, alone: bool) -> Option<PlannedSeq> {
        let to_feed = s.to_feed();
        let whole = s.whole_prompt() && s.cached == 0;
        let n = match (whole, to_feed <= *budget) {
            (true, true) => to_feed,
            (true, false) if alone => to_feed,
            (true, false) => return None,
            (false, _) => to_feed.min(*budget),
        };
        if n == 0 {
            return None;
        }
        pool.reserve(&mut s.blocks, s.cached + n).ok()?;
        *budget = budget.saturating_sub(n);
        let keep_history = s.req.params.keeps_history().then_some(s.req.params.prompt_len);
        let history: Vec<u32> = if keep_history.is_some() && s.resumed { (0..s.cached).map(|i| s.token_at(i)).collect() } else { Vec::new() };
        let fresh = s.cached == 0 || !history.is_empty();
        s.resumed = false;
        Some(PlannedSeq {
            id: s.req.id,
            tokens: (s.cached..s.cached + n).map(|i| s.token_at(i)).collect(),
            start_pos: s.cached,
            block_table: s.blocks.clone(),
            sample: (n == to_feed && s.req.params.embed.is_none()).then(|| s.req.params.clone()),
            prompt_logprobs: if whole { s.req.params.prompt_logprobs } else { None },
            keep_history,
            embed: s.req.params.embed.filter(|_| n == to_feed),
            history,
            grammar: s.req.params.grammar.clone().filter(|_| fresh),
        })
    }

    /// Frees a sequence that ended: its blocks, and its tokens where they are kept.
    fn release(&mut self, s: &mut Seq) {
        self.pool.release(&mut s.blocks);
        if s.req.params.keeps_history() {
            self.released.push(s.req.id);
        }
    }

    /// The sequences whose kept tokens the engine may drop (they ended), since the last call.
    pub fn take_released(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.released)
    }

    fn preempt(&mut self, i: usize) {
        let s = self.running.remove(i);
        tracing::debug!(id = s.req.id, "preempted: recomputing later");
        self.requeue(s);
    }

    /// Puts a sequence back at the head of the queue with no blocks: it is computed again
    /// (from whatever of it is still cached) when it joins a batch.
    fn requeue(&mut self, mut s: Seq) {
        self.pool.release(&mut s.blocks);
        (s.cached, s.resumed) = (0, false);
        self.waiting.push_front(s);
    }

    /// Applies a step's results (in plan order) and returns what clients must hear.
    pub fn complete(&mut self, plan: &[PlannedSeq], results: Vec<SeqResult>) -> Vec<Event> {
        let mut events = Vec::new();
        for (p, SeqResult { sampled, prompt_logprobs, embedding, error }) in plan.iter().zip(results) {
            let Some(i) = self.running.iter().position(|s| s.req.id == p.id) else { continue };
            if let Some(message) = error {
                events.push(Event::Error { id: p.id, message });
                let mut s = self.running.remove(i);
                self.release(&mut s);
                continue;
            }
            let s = &mut self.running[i];
            s.cached = p.start_pos + p.tokens.len();
            if self.cfg.prefix_caching {
                s.hash_blocks(&self.hasher);
                let filled = p.start_pos / self.cfg.block_size..s.cached / self.cfg.block_size;
                for (&block, &hash) in s.blocks[filled.clone()].iter().zip(&s.hashes[filled]) {
                    self.pool.register(block, hash);
                }
            }
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
        SchedulerConfig { num_blocks, block_size: 4, max_num_seqs: 8, max_batch_tokens, max_queue: 4, prefix_caching: true }
    }

    fn sched(cfg: SchedulerConfig) -> Scheduler {
        Scheduler::new(cfg, PrefixHasher::new("test", cfg.block_size))
    }

    fn req(id: u64, prompt_len: usize, max_tokens: usize) -> SeqRequest {
        let params = SamplingParams { max_tokens, ..SamplingParams::default() };
        SeqRequest { id, prompt: (0..prompt_len as u32).map(|t| 10 + t).collect(), params, cache_salt: None }
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
        let mut s = sched(cfg(64, 8));
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
        let mut s = sched(cfg(64, 64));
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
        let mut s = sched(cfg(64, 64));
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
            let mut s = sched(cfg(64, 64));
            s.add(req(id, 6, 8)).unwrap();
            let mut events = Vec::new();
            while let Some(plan) = s.schedule() {
                events.extend(run(&mut s, &plan));
            }
            alone.push(tokens_of(&events, id));
        }
        // Five blocks of 4 tokens cannot hold two sequences of 6 + 8.
        let mut s = sched(cfg(5, 64));
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
        let mut s = sched(cfg(64, 64));
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
        let mut s = sched(cfg(64, 8));
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

    fn drain(s: &mut Scheduler) -> (Vec<Vec<PlannedSeq>>, Vec<Event>) {
        let (mut plans, mut events) = (Vec::new(), Vec::new());
        while let Some(plan) = s.schedule() {
            events.extend(run(s, &plan));
            plans.push(plan);
        }
        (plans, events)
    }

    fn with_prompt(id: u64, prompt: &[u32], max_tokens: usize) -> SeqRequest {
        SeqRequest { id, prompt: prompt.to_vec(), params: SamplingParams { max_tokens, ..SamplingParams::default() }, cache_salt: None }
    }

    #[test]
    fn a_cached_prefix_is_shared_and_skips_its_prefill() {
        let prompt: Vec<u32> = (0..10).collect();
        let mut s = sched(cfg(64, 64));
        s.add(with_prompt(1, &prompt, 3)).unwrap();
        let (first, _) = drain(&mut s);
        assert_eq!(s.used_blocks(), 0);
        assert_eq!(s.cached_blocks(), 3, "the blocks filled by 10 prompt + 2 generated tokens");
        // The same prompt again: two blocks are cached (the third holds its last token, which
        // must be fed to get logits). A longer one shares the same two.
        let mut longer = prompt.clone();
        longer.extend([50, 51, 52]);
        s.add(with_prompt(2, &prompt, 3)).unwrap();
        s.add(with_prompt(3, &longer, 3)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(plan.iter().map(|p| (p.id, p.start_pos, p.tokens.len())).collect::<Vec<_>>(), vec![(2, 8, 2), (3, 8, 5)]);
        assert_eq!(plan[0].block_table[..2], first[0][0].block_table[..2]);
        assert_eq!(plan[1].block_table[..2], first[0][0].block_table[..2]);
        assert_eq!(s.prefix_stats(), PrefixStats { queries: 10 + 10 + 13, hits: 16 });
        let mut events = run(&mut s, &plan);
        events.extend(drain(&mut s).1);
        assert_eq!(tokens_of(&events, 2), vec![70, 77, 84]);
        assert_eq!(s.used_blocks(), 0, "every reference returned");
        // A different salt shares nothing.
        let mut salted = with_prompt(4, &prompt, 1);
        salted.cache_salt = Some("tenant".into());
        s.add(salted).unwrap();
        assert_eq!(s.schedule().unwrap()[0].start_pos, 0);
    }

    #[test]
    fn identical_prompts_prefill_once_and_those_behind_go_ahead() {
        let prompt: Vec<u32> = (0..12).collect();
        let mut s = sched(cfg(64, 64));
        s.add(with_prompt(1, &prompt, 2)).unwrap();
        s.add(with_prompt(2, &prompt, 2)).unwrap();
        s.add(with_prompt(3, &[7, 7, 7, 7, 7], 2)).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!(plan.iter().map(|p| (p.id, p.start_pos)).collect::<Vec<_>>(), vec![(1, 0), (3, 0)], "2 waits for 1's blocks");
        run(&mut s, &plan);
        let plan = s.schedule().unwrap();
        assert_eq!(plan.iter().map(|p| (p.id, p.start_pos, p.tokens.len())).collect::<Vec<_>>(), vec![(1, 12, 1), (3, 5, 1), (2, 8, 4)]);
        run(&mut s, &plan);
        drain(&mut s);
        assert_eq!(s.used_blocks(), 0);
    }

    #[test]
    fn without_prefix_caching_every_prompt_is_prefilled() {
        let prompt: Vec<u32> = (0..12).collect();
        let mut s = sched(SchedulerConfig { prefix_caching: false, ..cfg(64, 64) });
        s.add(with_prompt(1, &prompt, 2)).unwrap();
        s.add(with_prompt(2, &prompt, 2)).unwrap();
        assert_eq!(s.schedule().unwrap().iter().map(|p| p.start_pos).collect::<Vec<_>>(), vec![0, 0]);
        drain(&mut s);
        s.add(with_prompt(3, &prompt, 2)).unwrap();
        assert_eq!(s.schedule().unwrap()[0].start_pos, 0);
        assert_eq!((s.cached_blocks(), s.prefix_stats().hits), (0, 0));
    }

    #[test]
    fn cached_blocks_give_way_under_memory_pressure_and_no_request_is_lost() {
        // Eight blocks of 4; each request needs 3 (8 prompt + 4 generated tokens), each
        // prompt is different, and they share a first block.
        let mut s = sched(cfg(8, 64));
        let mut expected = Vec::new();
        for id in 0..4u64 {
            let prompt: Vec<u32> = (0..4).chain((0..4).map(|t| 100 * (id as u32 + 1) + t)).collect();
            s.add(with_prompt(id, &prompt, 4)).unwrap();
            expected.push((8..12).map(|p| (p * 7 % 100) as u32).collect::<Vec<_>>());
        }
        let (_, mut events) = drain(&mut s);
        for id in 4..8u64 {
            s.add(with_prompt(id, &[id as u32; 9], 3)).unwrap();
        }
        events.extend(drain(&mut s).1);
        for id in 0..4 {
            assert_eq!(tokens_of(&events, id), expected[id as usize]);
        }
        for id in 4..8 {
            assert_eq!(tokens_of(&events, id).len(), 3);
        }
        assert_eq!(s.used_blocks(), 0);
        assert!(s.take_cache_events().iter().any(|e| matches!(e, CacheEvent::Evicted(_))));
        assert!(s.cached_blocks() <= 8);
    }

    #[test]
    fn a_penalized_sequence_joining_with_cached_blocks_sends_its_history() {
        let prompt: Vec<u32> = (0..9).collect();
        let mut s = sched(cfg(64, 64));
        s.add(with_prompt(1, &prompt, 1)).unwrap();
        drain(&mut s);
        let mut r = with_prompt(2, &prompt, 2);
        r.params.penalties.repetition = 1.2;
        r.params.prompt_len = 9;
        s.add(r).unwrap();
        let plan = s.schedule().unwrap();
        assert_eq!((plan[0].start_pos, plan[0].history.clone(), plan[0].keep_history), (8, prompt[..8].to_vec(), Some(9)));
        run(&mut s, &plan);
        assert!(s.schedule().unwrap()[0].history.is_empty(), "only the first chunk carries it");
    }

    #[test]
    fn the_queue_is_bounded_and_oversized_requests_are_refused() {
        let mut s = sched(cfg(8, 64));
        for id in 0..4 {
            s.add(req(id, 2, 2)).unwrap();
        }
        assert_eq!(s.add(req(9, 2, 2)), Err(AdmitError::QueueFull(4)));
        let mut s = sched(cfg(8, 64));
        assert_eq!(s.add(req(1, 30, 3)), Err(AdmitError::TooLong(33, 32)));
    }
}
