//! GGUF (llama.cpp's single-file format), versions 2 and 3: header, metadata, tensor table and
//! tensor data, memory-mapped. Every read is bounds-checked, so a truncated or corrupt file is an
//! error that names the file and the part being read, never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyq_core::Tensor;
use anyq_quant::ggml::GgmlType;
use memmap2::Mmap;

use super::gguf_meta::{GgufMetadata, MetaValue};
use crate::error::LoadError;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the contiguous (innermost) dimension.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    pub n_bytes: usize,
}

impl GgufTensorInfo {
    /// Row-major shape, outermost first (ggml's dims reversed): `[out, in]` for a linear weight.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }

    pub fn n_elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: GgufMetadata,
    pub tensors: Vec<GgufTensorInfo>,
    index: HashMap<String, usize>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GgufFile({}, v{}, {} tensors)", self.path.display(), self.version, self.tensors.len())
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, message: String) -> LoadError {
        LoadError::Format { path: self.path.to_path_buf(), message }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LoadError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(|| {
            self.error(format!(
                "truncated: {what} needs {n} bytes at offset {}, file has {}",
                self.pos,
                self.bytes.len()
            ))
        })?;
        let slice = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], LoadError> {
        Ok(self.take(N, what)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, LoadError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, LoadError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length or count, checked against what the rest of the file could hold, so a corrupt
    /// value cannot ask for a huge allocation.
    fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize, LoadError> {
        let n = self.u64(what)?;
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > remaining {
            return Err(self.error(format!(
                "{what} {n} at offset {} needs more bytes than the rest of the file (truncated or corrupt)",
                self.pos - 8
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, LoadError> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(format!("{what} at offset {} is not UTF-8", self.pos - n)))
    }

    fn value(&mut self, type_id: u32, key: &str) -> Result<MetaValue, LoadError> {
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>(key)?[0]),
            1 => MetaValue::I8(self.array::<1>(key)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.error(format!("key {key}: invalid boolean byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                let item_type = self.u32(key)?;
                let n = self.count(key, 1)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_type, key)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.error(format!("key {key}: unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = File::open(path).map_err(LoadError::io(path))?;
        // SAFETY: the map is read-only; anyq never writes model files while they are loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(LoadError::io(path))?;
        let mut cur = Cursor { bytes: &mmap, pos: 0, path };

        if cur.take(4, "magic")? != MAGIC {
            return Err(cur.error("not a GGUF file (bad magic)".into()));
        }
        let version = cur.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(cur.error(format!("GGUF version {version} is not supported (2 and 3 are)")));
        }
        // Smallest tensor-table entry: name length (8) + n_dims (4) + type (4) + offset (8).
        let n_tensors = cur.count("tensor count", 24)?;
        // Smallest metadata entry: key length (8) + value type (4) + a 1-byte value.
        let n_kv = cur.count("metadata count", 13)?;

        let mut metadata = GgufMetadata::default();
        for _ in 0..n_kv {
            let key = cur.string("metadata key")?;
            let type_id = cur.u32(&key)?;
            let value = cur.value(type_id, &key)?;
            metadata.values.insert(key, value);
        }

        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = cur.string("tensor name")?;
            let n_dims = cur.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(tensor_error(path, &name, format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(cur.u64(&name)? as usize);
            }
            let type_id = cur.u32(&name)?;
            let ggml_type = GgmlType::from_id(type_id)
                .ok_or_else(|| tensor_error(path, &name, format!("unknown or unsupported ggml type id {type_id}")))?;
            let offset = cur.u64(&name)?;
            infos.push((name, dims, ggml_type, offset));
        }

        let alignment = metadata.u64("general.alignment")?.unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(cur.error(format!("general.alignment {alignment} is not a power of two")));
        }
        let data_start = (cur.pos as u64).next_multiple_of(alignment) as usize;
        let data_len = mmap.len().saturating_sub(data_start);

        let mut tensors = Vec::with_capacity(infos.len());
        let mut index = HashMap::with_capacity(infos.len());
        for (name, dims, ggml_type, offset) in infos {
            let n_elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let n_bytes = n_elements
                .ok_or_else(|| tensor_error(path, &name, format!("dimensions {dims:?} overflow")))
                .and_then(|n| ggml_type.bytes_for(n).map_err(|e| tensor_error(path, &name, e.to_string())))?;
            if offset % alignment != 0 {
                return Err(tensor_error(path, &name, format!("data offset {offset} is not aligned to {alignment}")));
            }
            let end = offset.checked_add(n_bytes as u64);
            if end.is_none_or(|end| end > data_len as u64) {
                return Err(tensor_error(
                    path,
                    &name,
                    format!("data at offset {offset} ({n_bytes} bytes) runs past the end of the file (data section is {data_len} bytes; truncated?)"),
                ));
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(tensor_error(path, &name, "appears twice in the tensor table".into()));
            }
            tensors.push(GgufTensorInfo { name, dims, ggml_type, offset: offset as usize, n_bytes });
        }

        Ok(Self { path: path.to_path_buf(), mmap, version, metadata, tensors, index, data_start })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of a tensor, in its ggml type.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = self.data_start + info.offset;
        &self.mmap[start..start + info.n_bytes]
    }

    /// A tensor dequantized to f32, in row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor, LoadError> {
        let info =
            self.tensor_info(name).ok_or_else(|| tensor_error(&self.path, name, "missing from the file".into()))?;
        let mut data = vec![0.0f32; info.n_elements()];
        info.ggml_type
            .dequantize(self.tensor_bytes(info), &mut data)
            .map_err(|e| tensor_error(&self.path, name, e.to_string()))?;
        Tensor::new(info.shape(), data).map_err(|e| tensor_error(&self.path, name, e.to_string()))
    }
}

fn tensor_error(path: &Path, tensor: &str, message: String) -> LoadError {
    LoadError::Tensor { path: path.to_path_buf(), tensor: tensor.to_string(), message }
}

/// Writes GGUF v3 files with F32 tensors: used to export models and to build small test models.
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl GgufWriter {
    pub fn metadata(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// `shape` is row-major (outermost first), as `GgufTensorInfo::shape` returns it.
    pub fn tensor(&mut self, name: &str, shape: &[usize], data: Vec<f32>) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "GgufWriter: tensor {name} shape");
        self.tensors.push((name.to_string(), shape.to_vec(), data));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        for (name, shape, data) in &self.tensors {
            write_string(&mut out, name);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&GgmlType::F32.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + 4 * data.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        for (_, _, data) in &self.tensors {
            out.resize((out.len() as u64).next_multiple_of(DEFAULT_ALIGNMENT) as usize, 0);
            for v in data {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out
    }

    pub fn write(&self, path: &Path) -> Result<(), LoadError> {
        File::create(path).and_then(|mut f| f.write_all(&self.to_bytes())).map_err(LoadError::io(path))
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type_id(value: &MetaValue) -> u32 {
    match value {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::String(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn write_value(out: &mut Vec<u8>, value: &MetaValue) {
    out.extend_from_slice(&value_type_id(value).to_le_bytes());
    write_payload(out, value);
}

fn write_payload(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.push(*v as u8),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(*v as u8),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(items) => {
            // GGUF arrays are homogeneous: the first item's type stands for all.
            let item_type = items.first().map_or(4, value_type_id);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_payload(out, item);
            }
        }
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
