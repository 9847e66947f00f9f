//! `config.json` of Hugging Face Mistral and Mixtral checkpoints, in both the transformers-4
//! style (top-level `rope_theta`, `torch_dtype`) and the transformers-5 style
//! (`rope_parameters`, `dtype`).

/// The benchmarks' Mixtral-shaped model ("mix-bench": 791 M parameters, 230 M read per
/// decoded token), for dummy weights.
pub const MIX_BENCH: &str = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32000,"hidden_size":1024,
  "intermediate_size":3584,"num_hidden_layers":8,"num_attention_heads":16,"num_key_value_heads":4,
  "num_local_experts":8,"num_experts_per_tok":2,"rope_theta":1000000.0,"max_position_embeddings":4096,
  "rms_norm_eps":1e-5,"tie_word_embeddings":false}"#;

/// A Mistral-7B-shaped config (v0.3: vocabulary 32768, no sliding window), for benchmarks on
/// dummy weights.
pub const MISTRAL_7B: &str = r#"{"architectures":["MistralForCausalLM"],"vocab_size":32768,"hidden_size":4096,
  "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
  "head_dim":128,"rope_theta":1000000.0,"max_position_embeddings":32768,"rms_norm_eps":1e-5,
  "sliding_window":null,"tie_word_embeddings":false}"#;

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Mistral,
    Mixtral,
}

impl Architecture {
    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
        }
    }
}

/// The model's hyper-parameters, normalised from either config style.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Whether the checkpoint has a language-model head: a `MistralModel` (an embedding
    /// checkpoint, e5-mistral style) has none, and serves embeddings only.
    pub lm_head: bool,
    /// Mixtral only: experts per layer and experts chosen per token.
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`).
    pub checkpoint_dtype: Option<String>,
    /// The checkpoint stores its projections as FP8 E4M3 with scales (its
    /// `quantization_config` is FP8: `quant_method` `fp8`, or `compressed-tensors` in the
    /// `float-quantized` format, per tensor or per channel).
    pub fp8_weights: bool,
}

#[derive(Debug, Deserialize)]
struct RawRopeParameters {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRopeParameters>,
    rope_scaling: Option<serde_json::Value>,
    sliding_window: Option<usize>,
    tie_word_embeddings: Option<bool>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    quantization_config: Option<serde_json::Value>,
    compression_config: Option<serde_json::Value>,
}

/// Whether a checkpoint's `quantization_config` declares FP8 weights the engine reads
/// (see [`ModelConfig::fp8_weights`]); any other scheme is refused by name.
fn fp8_weights(q: Option<&serde_json::Value>) -> Result<bool, String> {
    let Some(q) = q.filter(|q| !q.is_null()) else { return Ok(false) };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    match method {
        "fp8" => match q.get("weight_block_size") {
            Some(b) if !b.is_null() => {
                Err(format!("quantization_config: block-wise FP8 (weight_block_size {b}) is not supported; per-tensor and per-channel are"))
            }
            _ => Ok(true),
        },
        "compressed-tensors" => {
            let format = q.get("format").and_then(|f| f.as_str()).unwrap_or("");
            if format != "float-quantized" {
                return Err(format!("quantization_config: compressed-tensors format {format:?} is not supported (only \"float-quantized\" FP8)"));
            }
            let groups = q.get("config_groups").and_then(|g| g.as_object()).ok_or("quantization_config: no config_groups")?;
            for (name, group) in groups {
                let w = group.get("weights").ok_or_else(|| format!("quantization_config: {name} has no weights scheme"))?;
                let field = |k: &str| w.get(k).map(|v| v.to_string()).unwrap_or_default();
                let strategy = w.get("strategy").and_then(|s| s.as_str()).unwrap_or("");
                if field("type") != "\"float\"" || field("num_bits") != "8" || !matches!(strategy, "tensor" | "channel") {
                    return Err(format!(
                        "quantization_config: {name} weights are type {}, {} bits, strategy {strategy:?}: only 8-bit float per tensor or per channel is supported",
                        field("type"),
                        field("num_bits")
                    ));
                }
            }
            Ok(true)
        }
        other => Err(format!("quantization_config: quant_method {other:?} is not supported (FP8 checkpoints: \"fp8\" or \"compressed-tensors\")")),
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses config.json text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        Self::from_json(text).map_err(|problem| match problem {
            ConfigProblem::Architecture(a) => Error::UnsupportedArchitecture(a),
            ConfigProblem::Invalid(message) => Error::Config { path: origin.to_owned(), message },
        })
    }

    fn from_json(text: &str) -> Result<Self, ConfigProblem> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ConfigProblem::Invalid(e.to_string()))?;
        let arch_name = raw
            .architectures
            .as_ref()
            .and_then(|a| a.first().cloned())
            .or_else(|| raw.model_type.clone())
            .ok_or_else(|| ConfigProblem::Invalid("no `architectures` or `model_type`".into()))?;
        let lm_head = arch_name != "MistralModel";
        let architecture = match arch_name.as_str() {
            "MistralForCausalLM" | "MistralModel" | "mistral" => Architecture::Mistral,
            "MixtralForCausalLM" | "mixtral" => Architecture::Mixtral,
            other => return Err(ConfigProblem::Architecture(other.to_owned())),
        };
        if let Some(rp) = &raw.rope_parameters
            && let Some(t) = rp.rope_type.as_deref().filter(|t| *t != "default")
        {
            return Err(ConfigProblem::Invalid(format!("rope_type {t:?} is not supported (only \"default\")")));
        }
        if raw.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ConfigProblem::Invalid("rope_scaling is not supported".into()));
        }
        let rope_theta = raw.rope_parameters.as_ref().and_then(|r| r.rope_theta).or(raw.rope_theta).unwrap_or(10_000.0);
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or_else(|| raw.hidden_size / raw.num_attention_heads.max(1));
        let (num_local_experts, num_experts_per_tok) = match architecture {
            Architecture::Mistral => (0, 0),
            Architecture::Mixtral => (raw.num_local_experts.unwrap_or(8), raw.num_experts_per_tok.unwrap_or(2)),
        };
        let eos_token_ids = match raw.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        let cfg = ModelConfig {
            architecture,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(32_768),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta,
            sliding_window: raw.sliding_window,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            lm_head,
            num_local_experts,
            num_experts_per_tok,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            checkpoint_dtype: raw.dtype.or(raw.torch_dtype),
            fp8_weights: fp8_weights(raw.quantization_config.as_ref().or(raw.compression_config.as_ref())).map_err(ConfigProblem::Invalid)?,
        };
        cfg.validate().map_err(ConfigProblem::Invalid)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("`{name}` must be > 0"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("`head_dim` must be even for RoPE, got {}", self.head_dim));
        }
        if self.sliding_window == Some(0) {
            return Err("`sliding_window` must be > 0 or null".into());
        }
        if self.architecture == Architecture::Mixtral && (self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts) {
            return Err(format!("`num_experts_per_tok` must be in 1..={}, got {}", self.num_local_experts, self.num_experts_per_tok));
        }
        Ok(())
    }

    /// Parameters of the whole model (embeddings and lm_head counted once each, as stored).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2);
        let mlp = 3 * h * self.intermediate_size;
        let ffn = match self.architecture {
            Architecture::Mistral => mlp,
            Architecture::Mixtral => self.num_local_experts * mlp + h * self.num_local_experts,
        };
        let layer = attn + ffn + 2 * h;
        let head = if self.tie_word_embeddings || !self.lm_head { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_hidden_layers * layer + h + head
    }

    /// Parameters read from memory to decode one token (batch 1): attention, the active
    /// experts, norms and the lm_head (the embedding contributes a single row).
    pub fn decode_parameters_per_token(&self) -> usize {
        let h = self.hidden_size;
        let attn = h * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2);
        let mlp = 3 * h * self.intermediate_size;
        let ffn = match self.architecture {
            Architecture::Mistral => mlp,
            Architecture::Mixtral => self.num_experts_per_tok * mlp + h * self.num_local_experts,
        };
        self.num_hidden_layers * (attn + ffn + 2 * h) + h + self.vocab_size * h + h
    }

    /// Bytes of matrices a decode step of `batch` sequences must read at `bytes_per_weight`:
    /// attention, the experts the batch touches (expected count under uniform routing) with
    /// the routers, and the lm_head.
    pub fn decode_weight_bytes(&self, batch: usize, bytes_per_weight: f64) -> usize {
        let h = self.hidden_size;
        let attn = h * self.head_dim * (self.num_attention_heads * 2 + self.num_key_value_heads * 2);
        let mlp = (3 * h * self.intermediate_size) as f64;
        let ffn = match self.architecture {
            Architecture::Mistral => mlp,
            Architecture::Mixtral => {
                let (e, k) = (self.num_local_experts as f64, self.num_experts_per_tok as f64);
                e * (1.0 - (1.0 - k / e).powi(batch as i32)) * mlp + (h * self.num_local_experts) as f64
            }
        };
        let total = self.num_hidden_layers as f64 * (attn as f64 + ffn) + (self.vocab_size * h) as f64;
        (total * bytes_per_weight) as usize
    }
}

#[derive(Debug)]
enum ConfigProblem {
    Architecture(String),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32000,"hidden_size":1024,
      "intermediate_size":3584,"num_hidden_layers":8,"num_attention_heads":16,"num_key_value_heads":4,
      "rope_theta":1000000.0,"torch_dtype":"bfloat16","num_local_experts":8,"num_experts_per_tok":2,
      "sliding_window":null,"eos_token_id":2,"bos_token_id":1}"#;

    #[test]
    fn both_config_styles_give_the_same_model() {
        let v5 = V4.replace(r#""rope_theta":1000000.0"#, r#""rope_parameters":{"rope_type":"default","rope_theta":1000000.0}"#).replace("torch_dtype", "dtype");
        let a = ModelConfig::from_json(V4).unwrap();
        let b = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 1e6);
        assert_eq!(a.head_dim, 64);
        assert_eq!(a.checkpoint_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn mix_bench_shape_has_the_documented_sizes() {
        let c = ModelConfig::from_json(V4).unwrap();
        assert_eq!((c.num_parameters() + 500_000) / 1_000_000, 791);
        assert_eq!((c.decode_parameters_per_token() + 500_000) / 1_000_000, 230);
    }

    #[test]
    fn unknown_architecture_and_bad_values_are_refused() {
        let llama = V4.replace("MixtralForCausalLM", "LlamaForCausalLM");
        assert!(matches!(ModelConfig::from_json(&llama), Err(ConfigProblem::Architecture(a)) if a == "LlamaForCausalLM"));
        let bad = V4.replace(r#""num_key_value_heads":4"#, r#""num_key_value_heads":5"#);
        assert!(matches!(ModelConfig::from_json(&bad), Err(ConfigProblem::Invalid(m)) if m.contains("multiple")));
        let topk = V4.replace(r#""num_experts_per_tok":2"#, r#""num_experts_per_tok":9"#);
        assert!(ModelConfig::from_json(&topk).is_err());
    }

    #[test]
    fn fp8_quantization_configs_are_read_and_others_refused_by_name() {
        let with = |q: &str| ModelConfig::from_json(&V4.replacen('{', &format!("{{\"quantization_config\":{q},"), 1));
        assert!(!ModelConfig::from_json(V4).unwrap().fp8_weights);
        assert!(with(r#"{"quant_method":"fp8","activation_scheme":"static","ignored_layers":["lm_head"]}"#).unwrap().fp8_weights);
        let ct = r#"{"quant_method":"compressed-tensors","format":"float-quantized","config_groups":{"group_0":{"targets":["Linear"],"weights":{"num_bits":8,"type":"float","strategy":"channel","symmetric":true}}},"ignore":["lm_head"]}"#;
        assert!(with(ct).unwrap().fp8_weights);
        let refused = [
            (ct.replace("channel", "group"), "strategy \"group\""),
            (ct.replace("float-quantized", "pack-quantized"), "pack-quantized"),
            (r#"{"quant_method":"fp8","weight_block_size":[128,128]}"#.to_owned(), "block-wise"),
            (r#"{"quant_method":"awq","bits":4}"#.to_owned(), "\"awq\""),
        ];
        for (q, named) in refused {
            let Err(ConfigProblem::Invalid(m)) = with(&q) else { panic!("{q} is refused") };
            assert!(m.contains(named), "{m} names {named}");
        }
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        for name in ["mistral-fp8-tiny", "mixtral-fp8-tiny"] {
            assert!(ModelConfig::from_file(&fixture.join(name).join("config.json")).unwrap().fp8_weights, "{name}");
        }
    }
}
