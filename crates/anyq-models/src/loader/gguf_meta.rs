//! GGUF metadata values (the key/value section of a GGUF file) and typed accessors.

use std::collections::BTreeMap;

use crate::error::LoadError;

/// One metadata value, as stored in GGUF (type ids 0..=12).
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) if v >= 0 => Some(v as u64),
            MetaValue::I16(v) if v >= 0 => Some(v as u64),
            MetaValue::I32(v) if v >= 0 => Some(v as u64),
            MetaValue::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The metadata of a GGUF file, with accessors that name the missing or mistyped key.
#[derive(Debug, Clone, Default)]
pub struct GgufMetadata {
    pub values: BTreeMap<String, MetaValue>,
}

impl GgufMetadata {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.values.get(key)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        kind: &str,
        f: impl Fn(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<T>, LoadError> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => {
                f(v).map(Some).ok_or_else(|| LoadError::Metadata(format!("key {key}: expected {kind}, found {v:?}")))
            }
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, LoadError> {
        self.typed(key, "an unsigned integer", MetaValue::as_u64)
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, LoadError> {
        self.typed(key, "a number", MetaValue::as_f64)
    }

    pub fn str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        self.typed(key, "a string", MetaValue::as_str)
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        self.typed(key, "a boolean", MetaValue::as_bool)
    }

    pub fn array(&self, key: &str) -> Result<Option<&[MetaValue]>, LoadError> {
        self.typed(key, "an array", MetaValue::as_array)
    }

    /// A required key: absent is an error that names it.
    pub fn require<T>(&self, key: &str, value: Result<Option<T>, LoadError>) -> Result<T, LoadError> {
        value?.ok_or_else(|| LoadError::Metadata(format!("missing key {key}")))
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Option<Vec<&str>>, LoadError> {
        let Some(items) = self.array(key)? else { return Ok(None) };
        items
            .iter()
            .map(|v| v.as_str().ok_or_else(|| LoadError::Metadata(format!("key {key}: expected strings, found {v:?}"))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}
