//! The engine's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model's config, its tokenizer, or the KV cache's blocks (the pieces the worker
    /// shares with the coordinator).
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: malformed safetensors file: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("tensor {name:?} not found in the checkpoint at {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor {name:?} has unsupported dtype {dtype}")]
    TensorDtype { path: PathBuf, name: String, dtype: String },
    #[error("invalid request: {0}")]
    InvalidRequest(#[from] BadRequest),
    #[error("backend: {0}")]
    Backend(String),
    #[error("the layout does not fit the model: {0}")]
    Layout(#[from] cluster::layout::LayoutError),
    #[error("exchanging activations failed: {0}")]
    Comm(#[from] crate::comm::CommError),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Backend(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A request or step the engine refuses; each names what is wrong and the limit.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    #[error(transparent)]
    Sampling(#[from] cluster::sampling::ParamError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {token} is outside the vocabulary (size {vocab})")]
    TokenId { token: u32, vocab: usize },
    #[error("prompt ({prompt}) + max_tokens ({max_tokens}) must be <= {context} (the model's context), got {}", prompt + max_tokens)]
    Context { prompt: usize, max_tokens: usize, context: usize },
    #[error("request {0} is already running")]
    Duplicate(u64),
    #[error(transparent)]
    Admit(#[from] cluster::scheduler::AdmitError),
    #[error("sequence {0} has no new tokens")]
    NoNewTokens(usize),
    #[error("sequence {seq}: {blocks} blocks of {block_size} cannot hold {tokens} tokens")]
    BlockTable { seq: usize, blocks: usize, block_size: usize, tokens: usize },
    #[error("this model has no language-model head: it serves embeddings only")]
    NoLmHead,
    #[error("mean pooling needs the whole prompt in one chunk (sequence {0} continues at a later position)")]
    PooledChunk(u64),
    #[error("block {block} is outside the cache ({blocks} blocks)")]
    Block { block: u32, blocks: usize },
    #[error("sequence {0}: a grammar comes with `keep_history` on the chunk that starts its kept tokens")]
    Grammar(u64),
    #[error("sequence {seq} continues at position {start_pos}, but its token history holds {kept:?} tokens")]
    History { seq: u64, start_pos: usize, kept: Option<usize> },
}
