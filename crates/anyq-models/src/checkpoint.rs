//! Quantized checkpoints: a Hugging Face model folder (`config.json`, `model.safetensors`,
//! tokenizer files) whose block linear layers are stored as their quantization method's arrays,
//! `model.layers.{i}.{module}.{array}` (`qweight`, `scales`, ...), and whose `config.json`
//! carries a `quantization_config` that names the method, as GPTQ and AWQ checkpoints do.
//! Embeddings and the output projection are stored as f16, or in the GGML block format they
//! were loaded in (exact, and as compact as the source); norms as f32.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyq_core::cpu::RopeStyle;
use anyq_quant::layer_arrays::ArrayData;
use anyq_quant::methods::{method_by_name, MethodError, QuantMethod};
use half::f16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::llama::{FloatWeight, LlamaModel, LINEAR_MODULES};
use crate::loader::TokenizerBundle;

/// `quant_method` of the checkpoints anyq writes.
pub const QUANT_METHOD: &str = "anyq";

/// The `quantization_config` object of `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantizationConfig {
    pub quant_method: String,
    /// The method's full name, e.g. `mixq-w4a8-g128`: it alone decides how layers load.
    pub method: String,
    /// Stored weight bits and the bits of the activations the kernels multiply (16 = float).
    pub bits: u8,
    pub activation_bits: u8,
    pub group_size: Option<usize>,
    /// Input channels kept in floating point, by layer (MixQ); for the reader, the stored arrays
    /// are what loads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outlier_channels: BTreeMap<String, Vec<i32>>,
    /// Float weights kept in the GGML block format they were loaded in (a GGUF's Q8_0
    /// embeddings), by tensor name: stored as U8 `[rows, bytes per row]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ggml_tensors: BTreeMap<String, String>,
}

impl QuantizationConfig {
    pub fn of(method: &dyn QuantMethod) -> Self {
        let (bits, activation_bits) = method.bits();
        Self {
            quant_method: QUANT_METHOD.into(),
            method: method.name(),
            bits,
            activation_bits,
            group_size: method.group_size(),
            outlier_channels: BTreeMap::new(),
            ggml_tensors: BTreeMap::new(),
        }
    }

    /// The method this config names, checked against what the config says of it.
    pub fn method(&self) -> Result<Box<dyn QuantMethod>, String> {
        if self.quant_method != QUANT_METHOD {
            return Err(format!(
                "quant_method {:?} is not supported (anyq reads its own {QUANT_METHOD:?} checkpoints)",
                self.quant_method
            ));
        }
        let method = method_by_name(&self.method).map_err(|e| e.to_string())?;
        let expected = Self::of(method.as_ref());
        let claims = [
            ("bits", self.bits as usize, expected.bits as usize),
            ("activation_bits", self.activation_bits as usize, expected.activation_bits as usize),
            ("group_size", self.group_size.unwrap_or(0), expected.group_size.unwrap_or(0)),
        ];
        if let Some((key, found, wanted)) = claims.iter().find(|(_, found, wanted)| found != wanted) {
            return Err(format!("{key} is {found}, but method {} stores {wanted}", self.method));
        }
        Ok(method)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("{}: {error}", path.display())]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{}: the folder is not empty; choose a new one", .0.display())]
    NotEmpty(PathBuf),
    #[error("Q/K rows are in llama.cpp's interleaved order; call `use_neox_rope` before quantizing")]
    InterleavedRope,
    #[error("layer {layer} {module}: {error}")]
    Layer { layer: usize, module: &'static str, error: MethodError },
    #[error("{0}")]
    Format(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SaveError + '_ {
    move |error| SaveError::Io { path: path.to_path_buf(), error }
}

/// One tensor ready for the file.
struct Bytes {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Bytes {
    fn from_array(name: String, shape: Vec<usize>, data: &ArrayData) -> Self {
        let (dtype, data) = match data {
            ArrayData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            ArrayData::I8(v) => (Dtype::I8, v.iter().map(|&x| x as u8).collect()),
            ArrayData::U8(v) => (Dtype::U8, v.clone()),
            ArrayData::I32(v) => (Dtype::I32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        Self { name, dtype, shape, data }
    }
}

/// Writes `model`, whose block linear layers `method` made, to the new folder `dir` with
/// `tokenizer`'s files. `progress(done, total)` follows the layers. Returns the folder's size
/// in bytes.
pub fn save_quantized(
    model: &LlamaModel,
    method: &dyn QuantMethod,
    tokenizer: Option<&TokenizerBundle>,
    dir: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<u64, SaveError> {
    if model.config.rope_style != RopeStyle::Neox {
        return Err(SaveError::InterleavedRope);
    }
    if dir.exists() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(SaveError::NotEmpty(dir.to_path_buf()));
    }
    let mut quantization = QuantizationConfig::of(method);
    let mut tensors = Vec::new();
    for (name, shape, weight) in model.float_tensors() {
        let bytes = match weight {
            // Vectors (norms) stay f32; matrices are f16, as Hugging Face ships them.
            FloatWeight::F32(data) if shape.len() == 1 => Bytes::from_array(name, shape, &ArrayData::F32(data)),
            FloatWeight::F32(data) => {
                let data = data.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect();
                Bytes { name, dtype: Dtype::F16, shape, data }
            }
            FloatWeight::Ggml { ggml_type, bytes } => {
                quantization.ggml_tensors.insert(name.clone(), ggml_type.name().to_string());
                let rows = shape[0];
                Bytes { name, dtype: Dtype::U8, shape: vec![rows, bytes.len() / rows.max(1)], data: bytes }
            }
        };
        tensors.push(bytes);
    }
    let layers = model.config.num_layers;
    for layer in 0..layers {
        for module in LINEAR_MODULES {
            let linear = model.linear(layer, module).expect("LINEAR_MODULES name every block layer");
            let arrays = method.save(linear).map_err(|error| SaveError::Layer { layer, module, error })?;
            let prefix = format!("model.layers.{layer}.{module}");
            for (name, array) in arrays.iter() {
                if let ("outlier_channels", ArrayData::I32(channels)) = (name, &array.data) {
                    quantization.outlier_channels.insert(prefix.clone(), channels.clone());
                }
                tensors.push(Bytes::from_array(format!("{prefix}.{name}"), array.shape.clone(), &array.data));
            }
        }
        progress(layer + 1, layers);
    }

    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| SaveError::Format(format!("tensor {}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &weights)
        .map_err(|e| SaveError::Format(format!("{}: {e}", weights.display())))?;

    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = "float16".into();
    config["quantization_config"] = serde_json::to_value(&quantization).expect("plain data serializes");
    write_json(&dir.join("config.json"), &config)?;
    if let Some(bundle) = tokenizer {
        write_tokenizer(bundle, dir)?;
    }
    folder_size(dir)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), SaveError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    std::fs::write(path, text).map_err(io(path))
}

/// `tokenizer.json`, `tokenizer_config.json` (special tokens, chat template) and
/// `generation_config.json` (stop ids): what `tokenizer_from_hf_folder` reads back.
fn write_tokenizer(bundle: &TokenizerBundle, dir: &Path) -> Result<(), SaveError> {
    let path = dir.join("tokenizer.json");
    bundle.tokenizer.save(&path, false).map_err(|e| SaveError::Format(format!("{}: {e}", path.display())))?;
    let token = |id: Option<u32>| id.and_then(|id| bundle.tokenizer.id_to_token(id));
    let s = &bundle.special;
    let mut config = serde_json::json!({
        "add_bos_token": s.add_bos,
        "add_eos_token": s.add_eos,
    });
    for (key, id) in [("bos_token", s.bos), ("eos_token", s.eos), ("unk_token", s.unk), ("pad_token", s.pad)] {
        if let Some(text) = token(id) {
            config[key] = text.into();
        }
    }
    if let Some(template) = &bundle.chat_template {
        config["chat_template"] = template.clone().into();
    }
    write_json(&dir.join("tokenizer_config.json"), &config)?;
    let generation = serde_json::json!({ "bos_token_id": s.bos, "eos_token_id": s.stop });
    write_json(&dir.join("generation_config.json"), &generation)
}

/// Bytes of the files directly in `dir`.
pub fn folder_size(dir: &Path) -> Result<u64, SaveError> {
    let mut size = 0;
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let meta = entry.map_err(io(dir))?.metadata().map_err(io(dir))?;
        if meta.is_file() {
            size += meta.len();
        }
    }
    Ok(size)
}
