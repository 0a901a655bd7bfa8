//! What the GPU tests share: without a GPU (or NVRTC) they say so and return, unless
//! ANYQ_REQUIRE_GPU is set (scripts/gpu-check sets it), which turns the absence into a failure.

use std::sync::Arc;

use crate::CudaDevice;

/// Whether a missing GPU, NVRTC or model file must fail the tests instead of skipping them.
pub fn gpu_required() -> bool {
    std::env::var_os("ANYQ_REQUIRE_GPU").is_some()
}

/// GPU 0, or `None` (after saying so) where there is none and none is required.
pub fn gpu_or_skip() -> Option<Arc<CudaDevice>> {
    if CudaDevice::available() {
        return Some(CudaDevice::open(0).expect("a GPU is present but cannot be opened"));
    }
    assert!(!gpu_required(), "ANYQ_REQUIRE_GPU is set but no GPU is usable");
    eprintln!("no CUDA GPU: skipped");
    None
}

/// Whether NVRTC is here to compile kernels (it can be, without a GPU).
pub fn nvrtc_or_skip() -> bool {
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return true;
    }
    assert!(!gpu_required(), "ANYQ_REQUIRE_GPU is set but NVRTC is missing");
    eprintln!("no NVRTC: skipped");
    false
}
