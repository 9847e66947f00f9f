//! The engine: a loaded model, its paged KV cache, and one batched forward per step.
//! Which sequences run and which blocks they own is decided by the caller (the coordinator,
//! or the local [`Generator`](crate::Generator)); the engine checks and executes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backend::{AttentionMeta, Backend, DType, KvShape, SeqAttention};
use crate::config::ModelConfig;
use crate::constraints::Constraints;
use crate::embedding::{Pooling, pool};
use crate::error::{BadRequest, EngineError, Result};
use crate::kv_cache::slot;
use crate::model::Rows;
use crate::model::{CausalLm, Loader};
use crate::quant::{Quantization, WeightDType};
use crate::rank::Parallel;
use crate::sampling::{RowChoice, SamplingParams, TokenHistory, TokenLogprobs};
use crate::weights::{Checkpoint, WeightSource};

pub use cluster::precision::LoadFormat;

/// Reads a checkpoint directory's config and opens its weights (cheap: files are mapped,
/// nothing is read yet).
pub fn open_model(dir: &Path, format: LoadFormat) -> Result<(ModelConfig, WeightSource)> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let source = match format {
        LoadFormat::Safetensors => WeightSource::Checkpoint(Checkpoint::open(dir)?),
        LoadFormat::Dummy => WeightSource::Dummy { seed: 0 },
    };
    Ok((config, source))
}

/// Size of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub num_blocks: usize,
    pub block_size: usize,
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The dtype dense weight matrices are kept in (as stored by default).
    pub dtype: WeightDType,
    pub quantization: Quantization,
    pub load_format: LoadFormat,
    pub cache: CacheConfig,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            dtype: WeightDType::Auto,
            quantization: Quantization::Auto,
            load_format: LoadFormat::Safetensors,
            cache: CacheConfig { num_blocks: 512, block_size: 16 },
        }
    }
}

/// One sequence's share of a step.
#[derive(Debug, Clone)]
pub struct SeqStep<'a> {
    /// The sequence's id (its token history is kept under it).
    pub id: u64,
    /// New tokens: a prompt chunk, or the last sampled token.
    pub tokens: &'a [u32],
    /// Tokens of this sequence already in the KV cache.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// Sample the token after this chunk.
    pub sample: Option<&'a SamplingParams>,
    /// Report the logprobs of `tokens[1..]` with this many alternatives.
    pub prompt_logprobs: Option<usize>,
    /// Keep the sequence's tokens for its penalties ([`TokenHistory`]); its own prompt is this
    /// long. A chunk at position 0, or one with a `history`, starts the history afresh; any
    /// other must continue it.
    pub keep_history: Option<usize>,
    /// With `keep_history`: the tokens before `start_pos` of a sequence that starts on cached
    /// blocks (empty otherwise).
    pub history: &'a [u32],
    /// Return the sequence's embedding, pooled from this chunk's final hidden states (`Mean`
    /// needs the whole prompt in one chunk).
    pub embed: Option<Pooling>,
    /// With `keep_history`, on a chunk that starts the kept tokens afresh: the grammar
    /// (llguidance's, serialized) the sequence's output is held to from here on.
    pub grammar: Option<&'a str>,
}

/// What a step produced for one sequence.
#[derive(Debug, Clone, Default)]
pub struct SeqOutput {
    pub sampled: Option<TokenLogprobs>,
    /// Logprobs of `tokens[1..]` of the step, when asked for.
    pub prompt_logprobs: Vec<TokenLogprobs>,
    /// The pooled, L2-normalised embedding, when asked for.
    pub embedding: Option<Vec<f32>>,
    /// Why nothing was sampled for a constrained sequence (its grammar failed).
    pub error: Option<String>,
}

pub struct Engine<B: Backend> {
    pub backend: B,
    pub model: CausalLm<B>,
    caches: Vec<B::KvCache>,
    cache: CacheConfig,
    options: EngineOptions,
    /// Bytes of the weights loaded with the model, and of the redundant experts' copies.
    weight_bytes: usize,
    copy_bytes: usize,
    /// The tokens of the sequences whose penalties or constraints need them, until released.
    histories: HashMap<u64, TokenHistory>,
    /// The output constraints of the sequences the driver rank samples.
    constraints: Constraints,
}

impl<B: Backend> Engine<B> {
    /// Loads the checkpoint in `dir` (`config.json` + safetensors), or dummy weights.
    pub fn load(backend: B, dir: &Path, options: &EngineOptions) -> Result<Self> {
        let (config, source) = open_model(dir, options.load_format)?;
        let mut engine = Self::from_source(backend, &config, &source, options, Parallel::single())?;
        engine.set_tokenizer(dir.join("tokenizer.json"));
        Ok(engine)
    }

    /// Loads this rank's share of the model (all of it for [`Parallel::single`]): only the
    /// slices it holds are read from the checkpoint.
    pub fn from_source(backend: B, config: &ModelConfig, source: &WeightSource, options: &EngineOptions, par: Parallel) -> Result<Self> {
        par.layout.validate(config)?;
        let loader = Loader::new(&backend, source, config, options.dtype, options.quantization, &par);
        let model = CausalLm::load(&loader)?;
        let shape = KvShape {
            num_blocks: options.cache.num_blocks,
            block_size: options.cache.block_size,
            num_kv_heads: par.kv_heads(config).len(),
            head_dim: config.head_dim,
            // Keys and values keep the activations' precision (f32): with 2-byte or 8-bit
            // weights the weights shrink the bytes a decode step reads, and the arithmetic
            // stays that of f32.
            dtype: DType::F32,
        };
        let caches = model.layers.iter().map(|_| backend.alloc_kv_cache(shape)).collect::<Result<_>>()?;
        let weight_bytes = loader.loaded_bytes.get();
        Ok(Engine {
            backend,
            model,
            caches,
            cache: options.cache,
            options: options.clone(),
            weight_bytes,
            copy_bytes: 0,
            histories: HashMap::new(),
            constraints: Constraints::new(config),
        })
    }

    /// Makes `copies` ((layer, expert, expert-parallel rank)) the model's redundant experts
    /// (Mixtral): this rank loads the copies it gains from `source` and drops those it loses;
    /// nothing else is loaded, and the KV cache stays.
    pub fn set_expert_copies(&mut self, source: &WeightSource, copies: &[(usize, usize, usize)]) -> Result<()> {
        let (backend, config, par) = (self.backend.clone(), self.model.config.clone(), self.model.par.clone());
        let loader = Loader::new(&backend, source, &config, self.options.dtype, self.options.quantization, &par);
        self.copy_bytes = self.model.set_expert_copies(&loader, copies)?;
        Ok(())
    }

    /// The checkpoint's `tokenizer.json`, which output constraints are compiled against (read
    /// when the first constrained sequence comes).
    pub fn set_tokenizer(&mut self, path: PathBuf) {
        self.constraints.set_tokenizer(path);
    }

    pub fn parallel(&self) -> &Parallel {
        &self.model.par
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    pub fn cache_config(&self) -> CacheConfig {
        self.cache
    }

    /// Bytes of weights this rank holds.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes + self.copy_bytes
    }

    /// Forgets the token histories of sequences that ended.
    /// Tokens each Mixtral expert ran on this rank since the last call, by layer (see
    /// [`CausalLm::take_expert_tokens`]).
    pub fn take_expert_tokens(&self) -> Vec<(usize, Vec<u64>)> {
        self.model.take_expert_tokens()
    }

    pub fn release(&mut self, ids: &[u64]) {
        for id in ids {
            self.histories.remove(id);
        }
        self.constraints.release(ids);
    }

    /// Runs one batched forward over every sequence's new tokens and samples where asked.
    /// Every rank of a replica runs the same step; only the driver rank (the first of the
    /// last stage) samples, the others return empty outputs.
    pub fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Vec<SeqOutput>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let vocab = self.model.config.vocab_size;
        let bs = self.cache.block_size;
        let mut tokens = Vec::new();
        let mut meta = AttentionMeta {
            seqs: Vec::with_capacity(seqs.len()),
            slots: Vec::new(),
            positions: Vec::new(),
            block_size: bs,
            sliding_window: self.model.config.sliding_window,
        };
        let mut logit_rows = Vec::new();
        // The rows each embedding pools, in step order.
        let mut hidden_rows = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            let context_len = s.start_pos + s.tokens.len();
            if s.tokens.is_empty() {
                return Err(BadRequest::NoNewTokens(i).into());
            }
            if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(BadRequest::TokenId { token: t, vocab }.into());
            }
            if s.block_table.len() * bs < context_len {
                return Err(BadRequest::BlockTable { seq: i, blocks: s.block_table.len(), block_size: bs, tokens: context_len }.into());
            }
            if let Some(&b) = s.block_table.iter().find(|&&b| b as usize >= self.cache.num_blocks) {
                return Err(BadRequest::Block { block: b, blocks: self.cache.num_blocks }.into());
            }
            if s.embed == Some(Pooling::Mean) && s.start_pos > 0 {
                return Err(BadRequest::PooledChunk(s.id).into());
            }
            let kept = self.histories.get(&s.id).map(TokenHistory::len);
            let fresh = s.start_pos == 0 || !s.history.is_empty();
            if s.keep_history.is_some() && (if fresh { s.history.len() != s.start_pos } else { kept != Some(s.start_pos) }) {
                return Err(BadRequest::History { seq: s.id, start_pos: s.start_pos, kept }.into());
            }
            if s.grammar.is_some() && (s.keep_history.is_none() || !fresh) {
                return Err(BadRequest::Grammar(s.id).into());
            }
            let token_start = tokens.len();
            tokens.extend_from_slice(s.tokens);
            for p in s.start_pos..context_len {
                meta.positions.push(p as u32);
                meta.slots.push(slot(s.block_table, bs, p));
            }
            if s.prompt_logprobs.is_some() {
                logit_rows.extend((token_start..tokens.len()).map(|r| r as u32));
            } else if s.sample.is_some() {
                logit_rows.push((tokens.len() - 1) as u32);
            }
            match s.embed {
                Some(Pooling::Last) => hidden_rows.push((tokens.len() - 1) as u32),
                Some(Pooling::Mean) => hidden_rows.extend((token_start..tokens.len()).map(|r| r as u32)),
                None => {}
            }
            meta.seqs.push(SeqAttention { token_start, num_tokens: s.tokens.len(), context_len, block_table: s.block_table.to_vec() });
        }
        let driver = self.model.par.is_driver();
        for s in seqs {
            if let Some(prompt_len) = s.keep_history {
                let history = self.histories.entry(s.id).or_default();
                if s.start_pos == 0 || !s.history.is_empty() {
                    *history = TokenHistory::default();
                    history.extend(s.history, prompt_len);
                }
                history.extend(s.tokens, prompt_len);
                if driver {
                    self.constraints.record(s.id, s.grammar, s.history, s.tokens, s.start_pos, prompt_len);
                }
            }
        }
        let mut choices = Vec::with_capacity(logit_rows.len());
        // (choice, sequence) of the rows whose constraint masks them.
        let mut masked = Vec::new();
        for s in seqs {
            let position = s.start_pos + s.tokens.len();
            let last = match s.sample {
                Some(params) => RowChoice::Sample { params, position, history: self.histories.get(&s.id), allowed: None },
                None => RowChoice::Skip,
            };
            if let Some(top_n) = s.prompt_logprobs {
                choices.extend(s.tokens[1..].iter().map(|&token| RowChoice::Score { token, top_n }));
            }
            if s.prompt_logprobs.is_some() || s.sample.is_some() {
                if s.sample.is_some() && driver && self.constraints.is_constrained(s.id) {
                    masked.push((choices.len(), s.id));
                }
                choices.push(last);
            }
        }
        let (backend, model, caches, constraints) = (&self.backend, &self.model, &mut self.caches, &mut self.constraints);
        let hidden_size = model.config.hidden_size;
        let mut errors = HashMap::new();
        let (chosen, hidden) = std::thread::scope(|scope| {
            // The masks depend only on tokens the step already has: they are computed while
            // the layers run.
            let ids: Vec<u64> = masked.iter().map(|&(_, id)| id).collect();
            let masks = (!ids.is_empty()).then(|| scope.spawn(move || constraints.masks(&ids)));
            backend.execute(|| -> Result<(Vec<Option<TokenLogprobs>>, Vec<f32>)> {
                // With no row wanted, the layers still run for their KV cache writes.
                let rows = Rows { logits: &logit_rows, hidden: &hidden_rows };
                let heads = model.forward(backend, &tokens, &meta, caches, &rows)?;
                let masks = match masks {
                    Some(handle) => handle.join().map_err(|_| EngineError::Backend("computing the constraints' masks panicked".into()))?,
                    None => Vec::new(),
                };
                let mut choices = choices.clone();
                for (&(row, id), mask) in masked.iter().zip(&masks) {
                    match (mask, &mut choices[row]) {
                        (Ok(mask), RowChoice::Sample { allowed, .. }) => *allowed = Some(mask),
                        (Err(e), choice) => {
                            *choice = RowChoice::Skip;
                            errors.insert(id, e.clone());
                        }
                        _ => {}
                    }
                }
                match heads {
                    Some(heads) if model.par.is_driver() => {
                        let chosen = match &heads.logits {
                            Some(logits) => backend.choose(logits, &choices)?,
                            None => Vec::new(),
                        };
                        let hidden = heads.hidden.as_ref().map(|h| backend.to_host(h)).transpose()?.unwrap_or_default();
                        Ok((chosen, hidden))
                    }
                    _ => Ok((Vec::new(), Vec::new())),
                }
            })
        })?;
        if !model.par.is_driver() {
            return Ok(vec![SeqOutput::default(); seqs.len()]);
        }
        let mut rows = chosen.into_iter();
        let mut next_row = || rows.next().ok_or_else(|| EngineError::Backend("missing logits row".into()));
        let mut out = Vec::with_capacity(seqs.len());
        let mut hidden = hidden.chunks_exact(hidden_size.max(1));
        for s in seqs {
            let mut o = SeqOutput::default();
            if let Some(pooling) = s.embed {
                let n = if pooling == Pooling::Last { 1 } else { s.tokens.len() };
                let rows: Vec<f32> = hidden.by_ref().take(n).flatten().copied().collect();
                if rows.len() != n * hidden_size {
                    return Err(EngineError::Backend("missing hidden rows".into()));
                }
                o.embedding = Some(pool(&rows, hidden_size, pooling));
            }
            if s.prompt_logprobs.is_some() {
                for _ in &s.tokens[1..] {
                    o.prompt_logprobs.extend(next_row()?);
                }
            }
            if s.prompt_logprobs.is_some() || s.sample.is_some() {
                o.sampled = next_row()?;
            }
            o.error = errors.remove(&s.id);
            out.push(o);
        }
        Ok(out)
    }
}
