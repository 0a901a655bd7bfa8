//! Tensors and CPU kernels: the bottom layer of anyq. Kernels work on row-major `f32` slices
//! with explicit shapes in their names and arguments (`m, n, k`), so each reads like its math.

pub mod cpu;
pub mod linear;
pub mod tensor;
pub mod testing;

pub use cpu::{ActivationScan, ChannelSet, ScanRequest};
pub use linear::{DenseLinear, Linear};
pub use tensor::Tensor;
