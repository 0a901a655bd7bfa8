//! Quantization formats and algorithms; knows nothing of models.

pub mod calibration;
pub mod dequant_matmul;
pub mod ggml;
pub mod ggml_linear;
pub mod gptq;
pub mod layer_arrays;
pub mod methods;
pub mod packing;
pub mod quantizer;
