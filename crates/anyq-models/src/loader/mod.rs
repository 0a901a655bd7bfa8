//! Model loading: a GGUF file or a Hugging Face folder becomes a config, named f32 weights and
//! (where the source has one) a tokenizer with its chat template.

pub mod gguf;
pub mod gguf_meta;
pub mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyq_core::Tensor;
use anyq_quant::ggml::GgmlType;
use anyq_quant::layer_arrays::LayerArrays;

use crate::checkpoint::QuantizationConfig;
use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::llama::LlamaModel;
use crate::tokenizer::{tokenizer_from_gguf, SpecialTokens};
use gguf::GgufFile;

/// Tensors by their Hugging Face names, whatever the file format.
pub trait WeightSource {
    /// `Ok(None)` when the source has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError>;
    /// The file that errors should name.
    fn source_path(&self) -> PathBuf;
    /// A tensor as stored, where the source stores GGML blocks, so that quantized weights can
    /// stay quantized in memory. `None` otherwise.
    fn stored(&self, _name: &str) -> Option<StoredTensor<'_>> {
        None
    }
    /// The arrays of a quantized layer: every tensor named `{prefix}.{array}`, by array name.
    fn arrays(&self, prefix: &str) -> Result<LayerArrays, LoadError> {
        Err(LoadError::Format {
            path: self.source_path(),
            message: format!("{prefix}: this format holds no quantized layers"),
        })
    }
}

/// A tensor's bytes in its GGML type, with its row-major shape.
pub struct StoredTensor<'a> {
    pub ggml_type: GgmlType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// The Hugging Face name of a tensor in llama.cpp's naming.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}.{kind}"))
}

impl WeightSource for GgufFile {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        match gguf_name(name) {
            Some(g) if self.tensor_info(&g).is_some() => self.tensor_f32(&g).map(Some),
            _ => Ok(None),
        }
    }

    fn source_path(&self) -> PathBuf {
        self.path().to_path_buf()
    }

    fn stored(&self, name: &str) -> Option<StoredTensor<'_>> {
        let info = self.tensor_info(&gguf_name(name)?)?;
        Some(StoredTensor { ggml_type: info.ggml_type, shape: info.shape(), bytes: self.tensor_bytes(info) })
    }
}

/// A tokenizer with what generation needs to know about it.
pub struct TokenizerBundle {
    pub tokenizer: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    pub chat_template: Option<String>,
}

pub struct LoadedModel {
    pub model: LlamaModel,
    /// `None` for weights-only sources (a GGUF without tokenizer metadata).
    pub tokenizer: Option<TokenizerBundle>,
    pub source: PathBuf,
    /// How a quantized checkpoint's layers are stored; `None` for float/GGML weights.
    pub quantization: Option<QuantizationConfig>,
}

/// Loads a `.gguf` file, a folder holding one, or a Hugging Face folder (`config.json`).
/// `progress(done, total)` is called as layers load.
pub fn load_model(path: &Path, progress: &dyn Fn(usize, usize)) -> Result<LoadedModel, LoadError> {
    if path.is_dir() {
        if path.join("config.json").exists() {
            return load_hf_folder(path, progress);
        }
        let ggufs: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(LoadError::io(path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        return match &ggufs[..] {
            [one] => load_gguf(one, progress),
            [] => Err(LoadError::Format {
                path: path.to_path_buf(),
                message: "no config.json and no .gguf file in this folder".into(),
            }),
            _ => Err(LoadError::Format {
                path: path.to_path_buf(),
                message: format!("{} .gguf files here; name one", ggufs.len()),
            }),
        };
    }
    load_gguf(path, progress)
}

fn load_gguf(path: &Path, progress: &dyn Fn(usize, usize)) -> Result<LoadedModel, LoadError> {
    let file = GgufFile::open(path)?;
    let embed = file.tensor_info("token_embd.weight").ok_or_else(|| LoadError::Tensor {
        path: path.to_path_buf(),
        tensor: "token_embd.weight".into(),
        message: "missing".into(),
    })?;
    let vocab_from_embedding = embed.shape()[0];
    let freq_factors = match file.tensor_info("rope_freqs.weight") {
        Some(_) => Some(file.tensor_f32("rope_freqs.weight")?.into_data()),
        None => None,
    };
    let config = ModelConfig::from_gguf(
        &file.metadata,
        vocab_from_embedding,
        file.tensor_info("output.weight").is_some(),
        file.tensor_info("blk.0.attn_q.bias").is_some(),
        freq_factors,
    )
    .map_err(|e| LoadError::Format { path: path.to_path_buf(), message: e.to_string() })?;
    let tokenizer = if file.metadata.get("tokenizer.ggml.model").is_some() {
        let (tokenizer, special) = tokenizer_from_gguf(&file.metadata)?;
        let chat_template = file.metadata.str("tokenizer.chat_template")?.map(str::to_string);
        Some(TokenizerBundle { tokenizer, special, chat_template })
    } else {
        None
    };
    let model = LlamaModel::load(config, &file, None, progress)?;
    Ok(LoadedModel { model, tokenizer, source: path.to_path_buf(), quantization: None })
}

fn load_hf_folder(dir: &Path, progress: &dyn Fn(usize, usize)) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(LoadError::io(&config_path))?;
    let config = ModelConfig::from_hf_json(&text).map_err(|e| match e {
        LoadError::Metadata(m) => LoadError::Format { path: config_path.clone(), message: m },
        other => other,
    })?;
    let quantization = quantization_config(&text).map_err(|message| LoadError::Format {
        path: config_path.clone(),
        message: format!("quantization_config: {message}"),
    })?;
    let method = quantization.as_ref().map(|q| q.method()).transpose().map_err(|message| LoadError::Format {
        path: config_path.clone(),
        message: format!("quantization_config: {message}"),
    })?;
    let mut ggml_types = HashMap::new();
    for (name, ty) in quantization.iter().flat_map(|q| &q.ggml_tensors) {
        let ggml_type = GgmlType::from_name(ty).ok_or_else(|| LoadError::Format {
            path: config_path.clone(),
            message: format!("quantization_config: tensor {name} has unknown GGML type {ty:?}"),
        })?;
        ggml_types.insert(name.clone(), ggml_type);
    }
    let weights = safetensors::SafetensorsWeights::open_folder(dir)?.with_ggml_types(ggml_types);
    let tokenizer = crate::tokenizer::tokenizer_from_hf_folder(dir)?;
    let model = LlamaModel::load(config, &weights, method.as_deref(), progress)?;
    Ok(LoadedModel { model, tokenizer, source: dir.to_path_buf(), quantization })
}

/// The `quantization_config` of a `config.json`, if it has one.
fn quantization_config(config_json: &str) -> Result<Option<QuantizationConfig>, String> {
    let json: serde_json::Value = serde_json::from_str(config_json).map_err(|e| e.to_string())?;
    match json.get("quantization_config") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(q) => serde_json::from_value(q.clone()).map(Some).map_err(|e| e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::gguf_name;

    #[test]
    fn gguf_names_follow_llama_cpp() {
        assert_eq!(gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(), Some("blk.12.attn_output.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.bias").as_deref(), Some("blk.0.attn_q.bias"));
        assert_eq!(
            gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(),
            Some("blk.3.ffn_norm.weight")
        );
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.3.unknown.weight"), None);
    }
}
