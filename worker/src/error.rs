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
    InvalidRequest(String),
    #[error("backend: {0}")]
    Backend(String),
    #[error("the replica's group cannot be used: {0}")]
    Layout(String),
    #[error("exchanging activations failed: {0}")]
    Comm(#[from] crate::comm::CommError),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Backend(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
