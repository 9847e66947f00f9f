//! The Tramontane worker library: the model engine (Mistral, Mixtral), its backends and
//! communicators, weight loading and quantization, and the worker's gRPC service.

pub mod backend;
pub mod comm;
pub mod constraints;
pub mod engine;
pub mod error;
pub mod generator;
pub mod model;
pub mod quant;
pub mod rank;
pub mod service;
pub mod weights;

// What the coordinator shares with the worker lives in `cluster`; the engine reads it under
// the same paths.
pub use cluster::{config, embedding, experts, kv_cache, layout, membership, process, sampling, scheduler, tokenizer};

pub use backend::{Backend, Cpu, DType, Device};
pub use cluster::{Architecture, ModelConfig};
pub use cluster::{Event, Finish, SamplingParams, Scheduler, SchedulerConfig, SeqRequest, TokenLogprobs};
pub use cluster::{IncrementalDecoder, Tokenizer};
pub use engine::{CacheConfig, Engine, EngineOptions, LoadFormat, SeqOutput, SeqStep};
pub use error::{BadRequest, EngineError, Result};
pub use generator::{Completion, Generator};
pub use quant::{Quantization, WeightDType};
