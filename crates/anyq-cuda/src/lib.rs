//! NVIDIA GPUs: the CUDA half of anyq's bottom layer. The driver, NVRTC and cuBLAS are loaded at
//! run time, so this crate builds and its users run on machines without CUDA; [`CudaDevice::open`]
//! says clearly why a GPU cannot be used. Kernels are CUDA C files in `kernels/`, compiled by
//! NVRTC for the device's architecture on first use and cached on disk by source hash.

mod blas;
mod compile;
mod device;
mod error;
pub mod mixq;
pub mod ops;
pub mod testing;
mod tma;

pub use blas::{BlasGemm, Int8Gemm};
pub use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
pub use device::{CudaDevice, Timer};
pub use error::{CudaError, Result};
