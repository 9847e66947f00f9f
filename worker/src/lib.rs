//! The Tramontane worker library: the model engine (Mistral, Mixtral), its backends, the
//! paged KV cache, sampling and tokenization.

pub mod backend;
pub mod comm;
pub mod config;
pub mod engine;
pub mod error;
pub mod generator;
pub mod kv_cache;
pub mod layout;
pub mod membership;
pub mod model;
pub mod process;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod service;
pub mod tokenizer;
pub mod weights;

pub use backend::{Backend, Cpu, DType, Device};
pub use config::{Architecture, ModelConfig};
pub use engine::{CacheConfig, Engine, EngineOptions, LoadFormat, SeqOutput, SeqStep};
pub use error::{EngineError, Result};
pub use generator::{Completion, Generator};
pub use quant::{Quantization, WeightDType};
pub use sampling::{SamplingParams, TokenLogprobs};
pub use scheduler::{Event, Finish, Scheduler, SchedulerConfig, SeqRequest};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
