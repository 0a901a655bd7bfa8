//! A dense, row-major `f32` tensor: the owned form of weights after loading.

use std::fmt;

#[derive(Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
#[error("shape {shape:?} holds {expected} elements, but {actual} were given")]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub actual: usize,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, ShapeError> {
        let expected = shape.iter().product();
        if expected != data.len() {
            return Err(ShapeError { shape, expected, actual: data.len() });
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, data: vec![0.0; n] }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Rows and columns of a 2-D tensor (a 1-D tensor is one row).
    pub fn dims2(&self) -> Option<(usize, usize)> {
        match self.shape[..] {
            [n] => Some((1, n)),
            [r, c] => Some((r, c)),
            _ => None,
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?}", self.shape)
    }
}
