//! Raw client requests (gRPC or HTTP) become [`ValidRequest`]s here; nothing past this point
//! sees an unchecked request. Every error names the field and its limit.

use cluster::constraint::{Constraint, Grammars};
use cluster::embedding::Pooling;
use cluster::sampling::{ParamError, Penalties};
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
    /// Whether the model has a language-model head (an embedding model has none: it only
    /// embeds).
    pub lm_head: bool,
    /// Compiles output constraints against the model's tokenizer (`Err`: why it cannot).
    pub grammars: Result<Grammars, String>,
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
    /// Leave special tokens (EOS, control tokens) out of the text; `None` = yes.
    pub skip_special_tokens: Option<bool>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Token id -> added to its logit.
    pub logit_bias: Vec<(u32, f32)>,
    /// Neither stop tokens nor stop strings end the generation before this many tokens.
    pub min_tokens: Option<u32>,
    /// The model's EOS does not end the generation.
    pub ignore_eos: bool,
    /// An embedding request: the prompt's hidden states pooled so; nothing is generated.
    pub embed: Option<Pooling>,
    /// Shares cached KV blocks only with requests of the same salt.
    pub cache_salt: Option<String>,
    /// What the output must match, and the request field that asked for it.
    pub constraint: Option<(&'static str, Constraint)>,
}

/// A checked, tokenized generation request.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// `max_tokens` 0: the prompt is scored (its logprobs) and nothing is generated. The
    /// replica runs it as one token whose choice is not delivered.
    pub score_only: bool,
    pub skip_special_tokens: bool,
    pub cache_salt: Option<String>,
}

/// Why a request is refused (INVALID_ARGUMENT / HTTP 400): each names the field at fault
/// ([`RequestError::field`]) and its limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Sampling(#[from] ParamError),
    #[error("`{0}` is required")]
    Required(&'static str),
    #[error("`{0}` must not be empty")]
    Empty(&'static str),
    #[error("`{field}` must be {expected}")]
    Shape { field: &'static str, expected: &'static str },
    #[error("`{field}` must be < {vocab} (the vocabulary), got {got}")]
    TokenId { field: &'static str, got: u32, vocab: usize },
    #[error("`{field}` cannot be tokenized: {reason}")]
    Untokenizable { field: &'static str, reason: String },
    /// The chat template (or the Mistral instruct format) refuses the conversation.
    #[error("{0}")]
    Messages(String),
    #[error("`stop` must be at most {MAX_STOP_STRINGS} non-empty strings")]
    Stop,
    #[error("`max_tokens` must be >= 1, or 0 to score the prompt only (with `prompt_logprobs`; over HTTP, `echo`)")]
    ScoreOnly,
    #[error("prompt ({prompt} tokens) + `max_tokens` ({max_tokens}) must be <= {context} (the model's context), got {}", prompt + max_tokens)]
    Context { prompt: usize, max_tokens: usize, context: usize },
    #[error("this model's tokenizer has no fill-in-the-middle tokens ([SUFFIX], [PREFIX]): it serves no FIM")]
    NoFim,
    #[error("this model has no language-model head: it serves embeddings only")]
    EmbeddingsOnly,
    #[error("`dimensions` must be {width}, this model's width (its embeddings are not truncated)")]
    Dimensions { width: usize },
    #[error("give exactly one of `{0}` and `{1}`")]
    OneOf(&'static str, &'static str),
    #[error("`{field}` is not supported with `{with}`")]
    Combination { field: &'static str, with: &'static str },
    #[error("`model` {got:?} is not served here; this server serves {served:?}")]
    Model { got: String, served: String },
    #[error("`{field}` is not supported by this server (got {got}); leave it out")]
    Unsupported { field: String, got: String },
    #[error("`{field}`: {reason}")]
    Grammar { field: &'static str, reason: String },
    #[error("`tools`: this model's tokenizer has no tool-calling tokens ([AVAILABLE_TOOLS], [TOOL_CALLS]): it cannot be offered tools")]
    NoTools,
}

impl RequestError {
    /// The tokenizer failing on the text or ids of `field`.
    pub fn untokenizable(field: &'static str) -> impl FnOnce(cluster::Error) -> RequestError {
        move |e| RequestError::Untokenizable { field, reason: e.to_string() }
    }

    /// The request field at fault, as clients name it (OpenAI's error `param`).
    pub fn field(&self) -> &str {
        match self {
            RequestError::Sampling(e) => e.field(),
            RequestError::Required(f) | RequestError::Empty(f) => f,
            RequestError::Shape { field, .. }
            | RequestError::TokenId { field, .. }
            | RequestError::Untokenizable { field, .. }
            | RequestError::Combination { field, .. }
            | RequestError::Grammar { field, .. } => field,
            RequestError::Messages(_) => "messages",
            RequestError::Stop => "stop",
            RequestError::Context { .. } | RequestError::ScoreOnly => "max_tokens",
            RequestError::OneOf(first, _) => first,
            RequestError::Model { .. } | RequestError::NoFim | RequestError::EmbeddingsOnly => "model",
            RequestError::Dimensions { .. } => "dimensions",
            RequestError::Unsupported { field, .. } => field,
            RequestError::NoTools => "tools",
        }
    }
}

/// The longest `cache_salt`, in bytes.
const MAX_CACHE_SALT: usize = 256;

/// Checks a request and tokenizes its prompt.
pub fn check(req: RawRequest, tok: &Tokenizer, limits: &ModelLimits, fresh_seed: u64) -> Result<ValidRequest, RequestError> {
    let prompt = match req.prompt {
        None => return Err(RequestError::Required("prompt")),
        Some(PromptInput::Text(t)) => {
            if t.is_empty() {
                return Err(RequestError::Empty("prompt"));
            }
            tok.encode(&t, true).map_err(RequestError::untokenizable("prompt"))?
        }
        Some(PromptInput::TokenIds(ids)) => {
            if ids.is_empty() {
                return Err(RequestError::Empty("prompt"));
            }
            if let Some(&got) = ids.iter().find(|&&t| t as usize >= limits.vocab_size) {
                return Err(RequestError::TokenId { field: "prompt", got, vocab: limits.vocab_size });
            }
            ids
        }
    };
    if !limits.lm_head && req.embed.is_none() {
        return Err(RequestError::EmbeddingsOnly);
    }
    // Embedding requests generate nothing either; they run as one step that samples nothing.
    let embeds = req.embed.is_some();
    let score_only = req.max_tokens == Some(0) && !embeds;
    if score_only && req.prompt_logprobs.is_none() {
        return Err(RequestError::ScoreOnly);
    }
    let max_tokens = match req.max_tokens {
        _ if embeds => 1,
        None => DEFAULT_MAX_TOKENS.min(limits.max_context.saturating_sub(prompt.len()).max(1)),
        Some(n) => (n as usize).max(1),
    };
    if req.stop.len() > MAX_STOP_STRINGS || req.stop.iter().any(String::is_empty) {
        return Err(RequestError::Stop);
    }
    let mut stop_token_ids = req.stop_token_ids;
    if !req.ignore_eos {
        stop_token_ids.extend(&limits.eos_token_ids);
    }
    let mut logit_bias = req.logit_bias;
    logit_bias.sort_by_key(|&(t, _)| t);
    let grammar = match &req.constraint {
        None => None,
        Some((field, constraint)) => {
            // The grammar says where the output ends.
            if req.ignore_eos {
                return Err(RequestError::Combination { field: "ignore_eos", with: field });
            }
            if req.min_tokens.is_some_and(|n| n > 0) {
                return Err(RequestError::Combination { field: "min_tokens", with: field });
            }
            if score_only || embeds {
                return Err(RequestError::Combination { field, with: "max_tokens: 0" });
            }
            let grammars = limits.grammars.as_ref().map_err(|reason| RequestError::Grammar { field, reason: reason.clone() })?;
            Some(grammars.check(&constraint.grammar()).map_err(|e| RequestError::Grammar { field, reason: e.to_string() })?)
        }
    };
    let params = SamplingParams {
        temperature: req.temperature.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(0) as usize,
        top_p: req.top_p.unwrap_or(1.0),
        seed: req.seed.unwrap_or(fresh_seed),
        max_tokens,
        stop_token_ids,
        logprobs: req.logprobs.map(|n| n as usize),
        prompt_logprobs: req.prompt_logprobs.map(|n| n as usize),
        logit_bias,
        penalties: Penalties {
            presence: req.presence_penalty.unwrap_or(0.0),
            frequency: req.frequency_penalty.unwrap_or(0.0),
            repetition: req.repetition_penalty.unwrap_or(1.0),
        },
        min_tokens: req.min_tokens.unwrap_or(0) as usize,
        prompt_len: prompt.len(),
        embed: req.embed,
        grammar,
    };
    params.validate(limits.vocab_size)?;
    let generated = if score_only || embeds { 0 } else { max_tokens };
    if prompt.len() + generated > limits.max_context {
        return Err(RequestError::Context { prompt: prompt.len(), max_tokens: generated, context: limits.max_context });
    }
    match &req.cache_salt {
        Some(salt) if salt.is_empty() => return Err(RequestError::Empty("cache_salt")),
        Some(salt) if salt.len() > MAX_CACHE_SALT => return Err(RequestError::Shape { field: "cache_salt", expected: "at most 256 bytes" }),
        _ => {}
    }
    Ok(ValidRequest { prompt, params, stop: req.stop, score_only, skip_special_tokens: req.skip_special_tokens.unwrap_or(true), cache_salt: req.cache_salt })
}
