//! Quantization formats and algorithms; knows nothing of models.

pub mod ggml;
pub mod ggml_linear;
