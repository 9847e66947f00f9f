//! What the shared pieces report: reading a model's files, a bad request, a full KV cache.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("unsupported architecture {0:?} (supported: MistralForCausalLM, MixtralForCausalLM)")]
    UnsupportedArchitecture(String),
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// The tokenizer failed on a text or on ids.
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("out of KV cache blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
