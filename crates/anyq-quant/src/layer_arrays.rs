//! The named arrays a quantized layer is stored as (`qweight`, `scales`, `zeros`, ...), before a
//! file format gives them tensor names: methods save a layer into `LayerArrays` and load it back
//! from them, checking every shape, so that a corrupt or mismatched checkpoint is an error that
//! names the array rather than a wrong model.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq)]
pub enum ArrayData {
    F32(Vec<f32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I32(Vec<i32>),
}

impl ArrayData {
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U8(v) => v.len(),
            Self::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> &'static str {
        match self {
            Self::F32(_) => "F32",
            Self::I8(_) => "I8",
            Self::U8(_) => "U8",
            Self::I32(_) => "I32",
        }
    }
}

/// A row-major array with its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

impl Array {
    /// `None` when the data does not fill the shape.
    pub fn new(shape: Vec<usize>, data: ArrayData) -> Option<Self> {
        (shape.iter().product::<usize>() == data.len()).then_some(Self { shape, data })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArrayError {
    #[error("array {0:?} is missing")]
    Missing(String),
    #[error("array {name:?} is {found}, expected {expected}")]
    Mismatch { name: String, expected: String, found: String },
    #[error("unexpected array {0:?}")]
    Unexpected(String),
    #[error("array {name:?}: {message}")]
    Invalid { name: String, message: String },
}

/// A layer's arrays by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerArrays(BTreeMap<String, Array>);

macro_rules! typed_access {
    ($take:ident, $take_opt:ident, $put:ident, $ty:ty, $variant:ident) => {
        /// Removes the array `name`, which must have this type and `shape`.
        pub fn $take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<$ty>, ArrayError> {
            self.$take_opt(name, shape)?.ok_or_else(|| ArrayError::Missing(name.to_string()))
        }

        /// As the required form, `None` when the layer has no such array.
        pub fn $take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Vec<$ty>>, ArrayError> {
            let Some(array) = self.0.remove(name) else { return Ok(None) };
            let mismatch = |found: String| ArrayError::Mismatch {
                name: name.to_string(),
                expected: format!("{} {shape:?}", stringify!($variant)),
                found,
            };
            if array.shape != shape {
                return Err(mismatch(format!("{} {:?}", array.data.dtype(), array.shape)));
            }
            match array.data {
                ArrayData::$variant(v) => Ok(Some(v)),
                other => Err(mismatch(format!("{} {:?}", other.dtype(), array.shape))),
            }
        }

        pub fn $put(&mut self, name: &str, shape: Vec<usize>, data: Vec<$ty>) {
            let array = Array::new(shape, ArrayData::$variant(data)).expect("a layer's own arrays fill their shapes");
            self.0.insert(name.to_string(), array);
        }
    };
}

impl LayerArrays {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: String, array: Array) {
        self.0.insert(name, array);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Array)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The length of the 1-D array `name` (whose length only the array itself knows).
    pub fn vector_len(&self, name: &str) -> Result<usize, ArrayError> {
        match self.0.get(name).map(|a| &a.shape[..]) {
            Some(&[len]) => Ok(len),
            Some(shape) => Err(ArrayError::Mismatch {
                name: name.to_string(),
                expected: "a vector".into(),
                found: format!("shape {shape:?}"),
            }),
            None => Err(ArrayError::Missing(name.to_string())),
        }
    }

    typed_access!(take_f32, take_f32_opt, put_f32, f32, F32);
    typed_access!(take_i8, take_i8_opt, put_i8, i8, I8);
    typed_access!(take_u8, take_u8_opt, put_u8, u8, U8);
    typed_access!(take_i32, take_i32_opt, put_i32, i32, I32);

    /// After a layer took its arrays: anything left over means the checkpoint is not of the
    /// method it claims.
    pub fn finish(self) -> Result<(), ArrayError> {
        match self.0.into_keys().next() {
            Some(name) => Err(ArrayError::Unexpected(name)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_checks_presence_type_and_shape() {
        let mut a = LayerArrays::new();
        a.put_f32("scales", vec![2, 1], vec![1.0, 2.0]);
        a.put_i8("qweight", vec![2, 2], vec![1, 2, 3, 4]);
        assert_eq!(a.take_f32("missing", &[1]), Err(ArrayError::Missing("missing".into())));
        assert!(matches!(a.take_f32("qweight", &[2, 2]), Err(ArrayError::Mismatch { .. })));
        let mut b = LayerArrays::new();
        b.put_f32("scales", vec![2, 1], vec![1.0, 2.0]);
        assert!(matches!(b.take_f32("scales", &[1, 2]), Err(ArrayError::Mismatch { .. })));
        assert_eq!(a.take_f32("scales", &[2, 1]).unwrap(), vec![1.0, 2.0]);
        assert_eq!(a.take_f32_opt("bias", &[2]).unwrap(), None);
        let mut c = LayerArrays::new();
        c.put_u8("extra", vec![1], vec![0]);
        assert_eq!(c.finish(), Err(ArrayError::Unexpected("extra".into())));
    }
}
