//! The shape of a LLaMA-family model, read from a Hugging Face `config.json` or GGUF metadata.
//! Architectures differ only in what this config says (biases, RoPE layout, scaling), so one
//! model file serves them all.

use anyq_core::cpu::RopeStyle;
use serde::Deserialize;

use crate::error::LoadError;
use crate::loader::gguf_meta::GgufMetadata;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    /// The `model_type` of Hugging Face configs and `general.architecture` of GGUF.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }

    fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    pub fn parse(name: &str) -> Result<Self, LoadError> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(LoadError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// Per-frequency divisors (LLaMA-3.1 long-context scaling); `None` = plain RoPE.
    pub rope_freq_factors: Option<Vec<f32>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
}

/// The fields of a Hugging Face `config.json` that anyq reads.
#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f32,
    rope_theta: Option<f32>,
    rope_scaling: Option<HfRopeScaling>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    /// anyq's own key for RoPE divisors that no `rope_scaling` form describes (GGUF's
    /// `rope_freqs`), written by `to_hf_json`.
    rope_freq_factors: Option<Vec<f32>>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

impl ModelConfig {
    pub fn from_hf_json(json: &str) -> Result<Self, LoadError> {
        let hf: HfConfig = serde_json::from_str(json).map_err(|e| LoadError::Metadata(format!("config.json: {e}")))?;
        let model_type =
            hf.model_type.as_deref().ok_or_else(|| LoadError::Metadata("config.json: no model_type".into()))?;
        let architecture = Architecture::parse(model_type)?;
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1));
        let rope_theta = hf.rope_theta.unwrap_or(10_000.0);
        let rope_freq_factors = match &hf.rope_scaling {
            _ if hf.rope_freq_factors.is_some() => hf.rope_freq_factors,
            None => None,
            Some(s) => {
                let kind = s.rope_type.as_deref().or(s.kind.as_deref()).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let need = |v: Option<f32>, name: &str| {
                            v.ok_or_else(|| {
                                LoadError::Metadata(format!("config.json: rope_scaling llama3 needs {name}"))
                            })
                        };
                        let original = s.original_max_position_embeddings.ok_or_else(|| {
                            LoadError::Metadata(
                                "config.json: rope_scaling llama3 needs original_max_position_embeddings".into(),
                            )
                        })?;
                        Some(llama3_freq_factors(
                            head_dim,
                            rope_theta,
                            need(s.factor, "factor")?,
                            need(s.low_freq_factor, "low_freq_factor")?,
                            need(s.high_freq_factor, "high_freq_factor")?,
                            original as f32,
                        ))
                    }
                    other => {
                        return Err(LoadError::Metadata(format!(
                            "config.json: rope_scaling type {other:?} is not supported"
                        )))
                    }
                }
            }
        };
        let config = Self {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_style: RopeStyle::Neox,
            rope_freq_factors,
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: hf.attention_bias.unwrap_or(architecture == Architecture::Qwen2),
        };
        config.validate()
    }

    /// The Hugging Face `config.json` that `from_hf_json` reads back as this config; Q/K rows
    /// must be in Hugging Face's order (`rope_style` NeoX) for it to describe the weights.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut json = serde_json::json!({
            "model_type": self.architecture.name(),
            "architectures": [self.architecture.hf_class()],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
        });
        if let Some(factors) = &self.rope_freq_factors {
            json["rope_freq_factors"] = serde_json::json!(factors);
        }
        json
    }

    /// From GGUF metadata. `has_output`, `has_qkv_bias` and `freq_factors` come from the tensor
    /// table, which is where llama.cpp's converter records them.
    pub fn from_gguf(
        meta: &GgufMetadata,
        vocab_from_embedding: usize,
        has_output: bool,
        has_qkv_bias: bool,
        freq_factors: Option<Vec<f32>>,
    ) -> Result<Self, LoadError> {
        let arch_name = meta.require("general.architecture", meta.str("general.architecture"))?;
        let architecture = Architecture::parse(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_key =
            |k: &str| -> Result<usize, LoadError> { Ok(meta.require(&key(k), meta.u64(&key(k)))? as usize) };
        let hidden_size = usize_key("embedding_length")?;
        let num_heads = usize_key("attention.head_count")?;
        let head_dim = match meta.u64(&key("attention.key_length"))? {
            Some(d) => d as usize,
            None => meta.u64(&key("rope.dimension_count"))?.map_or(hidden_size / num_heads.max(1), |d| d as usize),
        };
        if let Some(kind) = meta.str(&key("rope.scaling.type"))? {
            if kind != "none" {
                return Err(LoadError::Metadata(format!(
                    "{}: RoPE scaling {kind:?} is not supported",
                    key("rope.scaling.type")
                )));
            }
        }
        let config = Self {
            architecture,
            vocab_size: meta.u64(&key("vocab_size"))?.map_or(vocab_from_embedding, |v| v as usize),
            hidden_size,
            intermediate_size: usize_key("feed_forward_length")?,
            num_layers: usize_key("block_count")?,
            num_heads,
            num_kv_heads: meta.u64(&key("attention.head_count_kv"))?.map_or(num_heads, |v| v as usize),
            head_dim,
            rms_norm_eps: meta
                .require(&key("attention.layer_norm_rms_epsilon"), meta.f64(&key("attention.layer_norm_rms_epsilon")))?
                as f32,
            rope_theta: meta.f64(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            // llama.cpp's converter permutes LLaMA's Q/K rows so that RoPE pairs are adjacent;
            // Qwen2 keeps Hugging Face's layout (llama.cpp's "NEOX" RoPE).
            rope_style: match architecture {
                Architecture::Qwen2 => RopeStyle::Neox,
                Architecture::Llama | Architecture::Mistral => RopeStyle::Interleaved,
            },
            rope_freq_factors: freq_factors,
            max_position_embeddings: meta.u64(&key("context_length"))?.map_or(4096, |v| v as usize),
            tie_word_embeddings: !has_output,
            qkv_bias: has_qkv_bias,
        };
        config.validate()
    }

    fn validate(self) -> Result<Self, LoadError> {
        let bad = |m: String| Err(LoadError::Metadata(m));
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        ]
        .contains(&0)
        {
            return bad(format!("a model dimension is zero: {self:?}"));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} attention heads cannot be grouped over {} KV heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} is odd; RoPE needs pairs", self.head_dim));
        }
        if let Some(f) = &self.rope_freq_factors {
            if f.len() != self.head_dim / 2 {
                return bad(format!("{} RoPE frequency factors for head dimension {}", f.len(), self.head_dim));
            }
        }
        Ok(self)
    }
}

/// LLaMA-3.1's RoPE scaling as per-frequency divisors: high frequencies stay, low ones are
/// divided by `factor`, and the band between is interpolated smoothly.
fn llama3_freq_factors(
    head_dim: usize,
    theta: f32,
    factor: f32,
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_ctx: f32,
) -> Vec<f32> {
    let low_freq_wavelen = original_ctx / low_freq_factor;
    let high_freq_wavelen = original_ctx / high_freq_factor;
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                1.0
            } else if wavelen > low_freq_wavelen {
                factor
            } else {
                let smooth = (original_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA31: &str = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
        "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,
        "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
        "max_position_embeddings":131072}"#;

    #[test]
    fn llama31_config_has_scaled_low_frequencies_only() {
        let c = ModelConfig::from_hf_json(LLAMA31).unwrap();
        assert_eq!((c.head_dim, c.num_kv_heads, c.architecture), (128, 8, Architecture::Llama));
        let f = c.rope_freq_factors.unwrap();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0, "the highest frequency is not scaled");
        assert_eq!(f[63], 8.0, "the lowest frequency is divided by the factor");
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "factors grow as frequency falls");
    }

    #[test]
    fn unknown_architecture_and_bad_shapes_are_errors() {
        let gpt2 = LLAMA31.replace("\"llama\"", "\"gpt2\"");
        assert!(matches!(ModelConfig::from_hf_json(&gpt2), Err(LoadError::UnsupportedArchitecture(a)) if a == "gpt2"));
        let bad_groups = LLAMA31.replace("\"num_key_value_heads\":8", "\"num_key_value_heads\":5");
        assert!(ModelConfig::from_hf_json(&bad_groups).unwrap_err().to_string().contains("grouped"));
        let yarn = LLAMA31.replace("\"rope_type\":\"llama3\"", "\"rope_type\":\"yarn\"");
        assert!(ModelConfig::from_hf_json(&yarn).unwrap_err().to_string().contains("yarn"));
        assert!(ModelConfig::from_hf_json("{").is_err());
    }

    #[test]
    fn hf_json_round_trips() {
        let mut c = ModelConfig::from_hf_json(LLAMA31).unwrap();
        c.rope_freq_factors.as_mut().unwrap()[5] = 3.25;
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{c:?}"));
    }

    #[test]
    fn qwen2_has_qkv_bias_by_default() {
        let qwen = LLAMA31.replace("\"llama\"", "\"qwen2\"").replace("\"rope_scaling\"", "\"unused\"");
        let c = ModelConfig::from_hf_json(&qwen).unwrap();
        assert!(c.qkv_bias && c.rope_freq_factors.is_none());
    }
}
