//! Hugging Face model folders: `config.json` plus `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. F32, F16 and BF16 tensors are widened to f32; the integer
//! arrays of quantized layers (I8, U8, I32) are read as stored.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyq_core::Tensor;
use anyq_quant::ggml::GgmlType;
use anyq_quant::layer_arrays::{Array, ArrayData, LayerArrays};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::{StoredTensor, WeightSource};
use crate::error::LoadError;

pub struct SafetensorsWeights {
    files: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `files`
    index: HashMap<String, usize>,
    /// Tensors stored as GGML blocks (U8 `[rows, bytes per row]`), by name.
    ggml_types: HashMap<String, GgmlType>,
}

impl SafetensorsWeights {
    /// Opens `model.safetensors` or the shards named by `model.safetensors.index.json` in `dir`.
    pub fn open_folder(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(LoadError::io(&index_path))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| LoadError::Format { path: index_path.clone(), message: e.to_string() })?;
            let map = json["weight_map"].as_object().ok_or_else(|| LoadError::Format {
                path: index_path.clone(),
                message: "no weight_map object".into(),
            })?;
            let names: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            names.into_iter().collect()
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for name in shard_names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(LoadError::io(&path))?;
            // SAFETY: read-only map of a file anyq does not modify while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(LoadError::io(&path))?;
            let tensors = SafeTensors::deserialize(&mmap)
                .map_err(|e| LoadError::Format { path: path.clone(), message: e.to_string() })?;
            for tensor_name in tensors.names() {
                index.insert(tensor_name.to_string(), files.len());
            }
            files.push((path, mmap));
        }
        Ok(Self { files, index, ggml_types: HashMap::new() })
    }

    /// Declares tensors that hold GGML blocks (a quantized checkpoint's `ggml_tensors`).
    pub fn with_ggml_types(mut self, types: HashMap<String, GgmlType>) -> Self {
        self.ggml_types = types;
        self
    }
}

impl SafetensorsWeights {
    /// The tensor `name` as stored, widened to f32 if it is a float, or `None` if absent.
    fn array(&self, name: &str) -> Result<Option<Array>, LoadError> {
        let Some(&file) = self.index.get(name) else { return Ok(None) };
        let (path, mmap) = &self.files[file];
        let err = |message: String| LoadError::Tensor { path: path.clone(), tensor: name.to_string(), message };
        let tensors = SafeTensors::deserialize(mmap).map_err(|e| err(e.to_string()))?;
        let view = tensors.tensor(name).map_err(|e| err(e.to_string()))?;
        let bytes = view.data();
        let data = match view.dtype() {
            Dtype::F32 => {
                ArrayData::F32(bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
            }
            Dtype::F16 => {
                ArrayData::F32(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            Dtype::BF16 => {
                ArrayData::F32(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
            }
            Dtype::I8 => ArrayData::I8(bytes.iter().map(|&b| b as i8).collect()),
            Dtype::U8 => ArrayData::U8(bytes.to_vec()),
            Dtype::I32 => {
                ArrayData::I32(bytes.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect())
            }
            other => return Err(err(format!("dtype {other:?} is not supported (F32, F16, BF16, I8, U8, I32 are)"))),
        };
        Array::new(view.shape().to_vec(), data).map(Some).ok_or_else(|| err("data does not fill its shape".into()))
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, LoadError> {
        let err = |message: String| LoadError::Tensor { path: self.source_path(), tensor: name.to_string(), message };
        if let Some(stored) = self.stored(name) {
            let mut data = vec![0.0; stored.shape.iter().product()];
            stored.ggml_type.dequantize(stored.bytes, &mut data).map_err(|e| err(e.to_string()))?;
            return Tensor::new(stored.shape, data).map(Some).map_err(|e| err(e.to_string()));
        }
        let Some(array) = self.array(name)? else { return Ok(None) };
        match array.data {
            ArrayData::F32(data) => Tensor::new(array.shape, data).map(Some).map_err(|e| err(e.to_string())),
            other => Err(err(format!("dtype {} where a float tensor belongs", other.dtype()))),
        }
    }

    /// GGML blocks declared by `with_ggml_types`, if the tensor is a U8 matrix of whole blocks.
    fn stored(&self, name: &str) -> Option<StoredTensor<'_>> {
        let ggml_type = *self.ggml_types.get(name)?;
        let (_, mmap) = &self.files[*self.index.get(name)?];
        let view = SafeTensors::deserialize(mmap).ok()?.tensor(name).ok()?;
        let &[rows, row_bytes] = view.shape() else { return None };
        if view.dtype() != Dtype::U8 || row_bytes % ggml_type.type_size() != 0 {
            return None;
        }
        let shape = vec![rows, row_bytes / ggml_type.type_size() * ggml_type.block_size()];
        Some(StoredTensor { ggml_type, shape, bytes: view.data() })
    }

    fn source_path(&self) -> PathBuf {
        self.files.first().map(|(p, _)| p.clone()).unwrap_or_default()
    }

    fn arrays(&self, prefix: &str) -> Result<LayerArrays, LoadError> {
        let mut arrays = LayerArrays::new();
        let dotted = format!("{prefix}.");
        for name in self.index.keys().filter(|n| n.starts_with(&dotted)) {
            let array = self.array(name)?.expect("indexed tensors exist");
            arrays.insert(name[dotted.len()..].to_string(), array);
        }
        Ok(arrays)
    }
}
