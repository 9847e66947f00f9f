//! What the coordinator and the workers share, without the engine: a model's config and sizes
//! (`config`), its weights' precisions and the bytes a rank keeps (`precision`), devices and
//! dtypes (`device`), pooled embeddings (`embedding`), Mixtral's observed expert load (`experts`), a replica's layout (`layout`), sampling parameters and the sampler
//! (`sampling`), the scheduler and its KV block allocator (`scheduler`, `kv_cache`), the
//! tokenizer, etcd membership (`membership`) and the plumbing every server process needs
//! (`process`).

pub mod config;
pub mod constraint;
pub mod device;
pub mod embedding;
pub mod error;
pub mod experts;
pub mod kv_cache;
pub mod layout;
pub mod membership;
pub mod precision;
pub mod process;
pub mod sampling;
pub mod scheduler;
pub mod tls;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig};
pub use device::{DType, Device};
pub use error::{Error, Result};
pub use precision::{LoadFormat, Quantization, WeightDType};
pub use sampling::{SamplingParams, TokenLogprobs};
pub use scheduler::{Event, Finish, Scheduler, SchedulerConfig, SeqRequest, SeqResult};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
