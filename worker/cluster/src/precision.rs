//! How a worker keeps a model's weights: the dtype of dense matrices (`--dtype`: as stored by
//! default), 8-bit weights (`--quantization`), and the bytes a rank's share takes in them,
//! which the planner sizes placements with. The conversions themselves are the engine's.

use crate::config::{Architecture, ModelConfig};
use crate::device::DType;
use crate::layout::{Layout, even_part};
use proto::tramontane::worker::v1 as pb;

/// The dtype dense weights are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDType {
    /// As the checkpoint stores each tensor (dummy weights: the config's `torch_dtype`).
    #[default]
    Auto,
    As(DType),
}

impl std::str::FromStr for WeightDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(WeightDType::Auto),
            other => other.parse().map(WeightDType::As).map_err(|_| format!("unknown dtype {other:?} (expected auto, f32, f16 or bf16)")),
        }
    }
}

impl std::fmt::Display for WeightDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightDType::Auto => f.write_str("auto"),
            WeightDType::As(d) => d.fmt(f),
        }
    }
}

/// 8-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quantization {
    /// What the checkpoint declares: FP8 for an FP8 checkpoint, none otherwise.
    #[default]
    Auto,
    /// Dense weights (an FP8 checkpoint is dequantized to the dense dtype).
    None,
    /// int8 values quantized at load.
    Int8,
    /// FP8 E4M3 values: as an FP8 checkpoint stores them, or quantized at load.
    Fp8,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" | "" => Ok(Quantization::Auto),
            "none" => Ok(Quantization::None),
            "int8" => Ok(Quantization::Int8),
            "fp8" => Ok(Quantization::Fp8),
            other => Err(format!("unknown quantization {other:?} (expected auto, none, int8 or fp8)")),
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantization::Auto => "auto",
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Fp8 => "fp8",
        })
    }
}

/// The format a matrix is kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Dense(DType),
    Int8,
    Fp8,
}

impl Format {
    /// Bytes of a `[rows, cols]` matrix in this format.
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            Format::Dense(d) => rows * cols * d.size_in_bytes(),
            Format::Int8 | Format::Fp8 => rows * cols + 4 * rows,
        }
    }
}

/// Bytes of weights rank `rank` of `layout` keeps of a model of `config` under `--dtype` and
/// `--quantization`, counted as the worker's loader keeps them,
/// without reading the checkpoint: the embedding table (first stage, the vocabulary split over
/// tp), the stage's decoder layers (attention and MLP split over tp, Mixtral's experts over
/// tp · ep, router gates whole), norms in f32, and on the last stage the final norm and the
/// lm_head (a tied lm_head shares the table where the projections stay dense on a stage that
/// holds it; otherwise it is a copy in the projections' format; an embedding model has none).
///
/// Dense matrices take the bytes of `--dtype`, or under `auto` of the config's
/// `checkpoint_dtype` (`torch_dtype`/`dtype`: bfloat16 and float16 → 2, float32 or absent → 4).
/// Projections under int8 or fp8, and those of an FP8 checkpoint (`fp8_weights`) under auto,
/// take [`Format::bytes`]: 1 byte per element and a 4-byte scale per row. An FP8 checkpoint is
/// taken to store its decoder layers' projections in FP8 and its embedding table, lm_head and
/// router gates dense (as they publish them). Dummy weights are dense: size them with a config
/// whose `fp8_weights` is false.
pub fn rank_weight_bytes(config: &ModelConfig, layout: &Layout, rank: usize, dtype: WeightDType, quantization: Quantization) -> u64 {
    let c = config;
    let at = layout.coords(rank);
    let declared = c.checkpoint_dtype.as_deref().and_then(|d| d.parse().ok()).unwrap_or(DType::F32);
    let dense = Format::Dense(match dtype {
        WeightDType::As(d) => d,
        WeightDType::Auto => declared,
    });
    // A projection stored dense (the lm_head, a tied table, every projection of a dense
    // checkpoint), and one of an FP8 checkpoint's decoder layers.
    let projection = match quantization {
        Quantization::Int8 => Format::Int8,
        Quantization::Fp8 => Format::Fp8,
        Quantization::Auto | Quantization::None => dense,
    };
    let layer_projection = match (c.fp8_weights, quantization) {
        (true, Quantization::Auto) => Format::Fp8,
        (true, Quantization::None) => dense,
        _ => projection,
    };
    let (h, d, tensor) = (c.hidden_size, c.head_dim, at.tensor);
    let vocab = even_part(c.vocab_size, tensor, layout.tp).len();
    let (first, last) = (at.stage == 0, at.stage + 1 == layout.pp);
    let p = layer_projection;
    let (q, kv) = (layout.q_heads(c, tensor).len() * d, layout.kv_heads(c, tensor).len() * d);
    let attention = p.bytes(q, h) + 2 * p.bytes(kv, h) + p.bytes(h, q);
    let i = even_part(c.intermediate_size, tensor, layout.tp).len();
    let mlp = 2 * p.bytes(i, h) + p.bytes(h, i);
    let feed_forward = match c.architecture {
        Architecture::Mistral => mlp,
        Architecture::Mixtral => even_part(c.num_local_experts, at.expert, layout.ep).len() * mlp + dense.bytes(c.num_local_experts, h),
    };
    let layer = attention + feed_forward + 2 * h * 4;
    let mut bytes = layout.layers(c.num_hidden_layers, at.stage).len() * layer;
    if first {
        bytes += dense.bytes(vocab, h);
    }
    if last {
        let shares_the_table = c.tie_word_embeddings && first && matches!(quantization, Quantization::Auto | Quantization::None);
        let head = if shares_the_table || !c.lm_head { 0 } else { projection.bytes(vocab, h) };
        bytes += h * 4 + head;
    }
    bytes as u64
}

/// Where the weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadFormat {
    /// The checkpoint's safetensors files.
    #[default]
    Safetensors,
    /// Deterministic random weights of the config's shapes.
    Dummy,
}

impl std::str::FromStr for LoadFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "safetensors" | "auto" => Ok(LoadFormat::Safetensors),
            "dummy" => Ok(LoadFormat::Dummy),
            other => Err(format!("unknown load format {other:?} (expected safetensors or dummy)")),
        }
    }
}

/// How weights are kept and loaded, on the wire and typed (both directions: the
/// coordinator writes what a worker reads).
impl From<pb::WeightDtype> for WeightDType {
    fn from(d: pb::WeightDtype) -> Self {
        match d {
            pb::WeightDtype::Auto => WeightDType::Auto,
            pb::WeightDtype::F32 => WeightDType::As(DType::F32),
            pb::WeightDtype::F16 => WeightDType::As(DType::F16),
            pb::WeightDtype::Bf16 => WeightDType::As(DType::BF16),
        }
    }
}

impl From<WeightDType> for pb::WeightDtype {
    fn from(d: WeightDType) -> Self {
        match d {
            WeightDType::Auto => pb::WeightDtype::Auto,
            WeightDType::As(DType::F32) => pb::WeightDtype::F32,
            WeightDType::As(DType::F16) => pb::WeightDtype::F16,
            WeightDType::As(DType::BF16) => pb::WeightDtype::Bf16,
        }
    }
}

impl From<pb::Quantization> for Quantization {
    fn from(q: pb::Quantization) -> Self {
        match q {
            pb::Quantization::Auto => Quantization::Auto,
            pb::Quantization::None => Quantization::None,
            pb::Quantization::Int8 => Quantization::Int8,
            pb::Quantization::Fp8 => Quantization::Fp8,
        }
    }
}

impl From<Quantization> for pb::Quantization {
    fn from(q: Quantization) -> Self {
        match q {
            Quantization::Auto => pb::Quantization::Auto,
            Quantization::None => pb::Quantization::None,
            Quantization::Int8 => pb::Quantization::Int8,
            Quantization::Fp8 => pb::Quantization::Fp8,
        }
    }
}

impl From<pb::LoadFormat> for LoadFormat {
    fn from(f: pb::LoadFormat) -> Self {
        match f {
            pb::LoadFormat::Safetensors => LoadFormat::Safetensors,
            pb::LoadFormat::Dummy => LoadFormat::Dummy,
        }
    }
}

impl From<LoadFormat> for pb::LoadFormat {
    fn from(f: LoadFormat) -> Self {
        match f {
            LoadFormat::Safetensors => pb::LoadFormat::Safetensors,
            LoadFormat::Dummy => pb::LoadFormat::Dummy,
        }
    }
}
