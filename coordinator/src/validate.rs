//! Raw client requests become [`ValidRequest`]s here; nothing past this point sees an
//! unchecked request. Every error names the field and its limit.

use proto::tramontane::v1 as pb;
use worker::sampling::MAX_TOP_LOGPROBS;
use worker::{SamplingParams, Tokenizer};

/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// What the served model allows.
#[derive(Debug, Clone)]
pub struct ModelLimits {
    pub vocab_size: usize,
    pub max_context: usize,
    pub eos_token_ids: Vec<u32>,
}

/// A checked, tokenized generation request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// Checks a gRPC GenerateRequest; `Err` is the message for INVALID_ARGUMENT.
pub fn generate_request(req: &pb::GenerateRequest, tok: &Tokenizer, limits: &ModelLimits, fresh_seed: u64) -> Result<ValidRequest, String> {
    let prompt = match &req.prompt {
        None => return Err("`prompt` is required (text or token_ids)".into()),
        Some(pb::generate_request::Prompt::Text(t)) => {
            if t.is_empty() {
                return Err("`prompt` must not be empty".into());
            }
            tok.encode(t, true).map_err(|e| format!("`prompt` cannot be tokenized: {e}"))?
        }
        Some(pb::generate_request::Prompt::TokenIds(ids)) => {
            if ids.ids.is_empty() {
                return Err("`prompt` must not be empty".into());
            }
            if let Some(&t) = ids.ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(format!("`token_ids` must be < {} (the vocabulary), got {t}", limits.vocab_size));
            }
            ids.ids.clone()
        }
    };
    let s = req.sampling.clone().unwrap_or_default();
    let max_tokens = if s.max_tokens == 0 { DEFAULT_MAX_TOKENS } else { s.max_tokens as usize };
    let mut stop_token_ids = s.stop_token_ids.clone();
    stop_token_ids.extend(&limits.eos_token_ids);
    let params = SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k as usize,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        seed: s.seed.unwrap_or(fresh_seed),
        max_tokens,
        stop_token_ids,
        logprobs: s.logprobs.map(|n| n as usize),
        prompt_logprobs: s.prompt_logprobs.map(|n| n as usize),
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
    Ok(ValidRequest { prompt, params })
}
