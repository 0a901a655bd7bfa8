//! Quantization formats and algorithms; knows nothing of models.

pub mod ggml;
