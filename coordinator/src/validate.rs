//! Raw client requests (gRPC or HTTP) become [`ValidRequest`]s here; nothing past this point
//! sees an unchecked request. Every error names the field and its limit.

use cluster::sampling::MAX_TOP_LOGPROBS;
use cluster::{SamplingParams, Tokenizer};

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// Stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// What the served model allows.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub vocab_size: usize,
    pub max_context: usize,
    pub eos_token_ids: Vec<u32>,
}

/// A prompt as a client sends it.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
}

/// A generation request in any protocol, before checks. `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    pub prompt: Option<PromptInput>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub max_tokens: Option<u32>,
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the generation (the text ends before the first one).
    pub stop: Vec<String>,
    pub logprobs: Option<u32>,
    pub prompt_logprobs: Option<u32>,
}

/// A checked, tokenized generation request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
}

/// Checks a request; `Err` is the message for INVALID_ARGUMENT / HTTP 400.
pub fn check(req: RawRequest, tok: &Tokenizer, limits: &ModelLimits, fresh_seed: u64) -> Result<ValidRequest, String> {
    let prompt = match req.prompt {
        None => return Err("`prompt` is required (text or token ids)".into()),
        Some(PromptInput::Text(t)) => {
            if t.is_empty() {
                return Err("`prompt` must not be empty".into());
            }
            tok.encode(&t, true).map_err(|e| format!("`prompt` cannot be tokenized: {e}"))?
        }
        Some(PromptInput::TokenIds(ids)) => {
            if ids.is_empty() {
                return Err("`prompt` must not be empty".into());
            }
            if let Some(&t) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(format!("prompt token ids must be < {} (the vocabulary), got {t}", limits.vocab_size));
            }
            ids
        }
    };
    let max_tokens = match req.max_tokens {
        None => DEFAULT_MAX_TOKENS.min(limits.max_context.saturating_sub(prompt.len()).max(1)),
        Some(0) => return Err("`max_tokens` must be >= 1, got 0".into()),
        Some(n) => n as usize,
    };
    if req.stop.len() > MAX_STOP_STRINGS || req.stop.iter().any(String::is_empty) {
        return Err(format!("`stop` must be at most {MAX_STOP_STRINGS} non-empty strings"));
    }
    let mut stop_token_ids = req.stop_token_ids;
    stop_token_ids.extend(&limits.eos_token_ids);
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0) as usize,
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed.unwrap_or(fresh_seed),
        max_tokens,
        stop_token_ids,
        logprobs: req.logprobs.map(|n| n as usize),
        prompt_logprobs: req.prompt_logprobs.map(|n| n as usize),
    };
    params.validate(limits.vocab_size)?;
    if params.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
        return Err(format!("`logprobs` must be <= {MAX_TOP_LOGPROBS}"));
    }
    let total = prompt.len() + max_tokens;
    if total > limits.max_context {
        return Err(format!(
            "prompt ({} tokens) + `max_tokens` ({max_tokens}) must be <= {} (the model's context), got {total}",
            prompt.len(),
            limits.max_context
        ));
    }
    Ok(ValidRequest { prompt, params, stop: req.stop })
}
