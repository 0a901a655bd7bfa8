use thiserror::Error;

/// Everything that can go wrong between the host and an NVIDIA GPU, each with what a user needs
/// to act on it.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("no CUDA driver on this machine (libcuda was not found); run on CPU with `--device cpu`")]
    NoDriver,
    #[error("the CUDA driver reports {count} GPU(s); device {ordinal} does not exist")]
    NoDevice { ordinal: usize, count: usize },
    #[error("NVRTC (libnvrtc) was not found: it compiles anyq's kernels at run time; install the CUDA toolkit or the nvidia-cuda-nvrtc package and put its lib folder on LD_LIBRARY_PATH")]
    NoNvrtc,
    #[error("cuBLAS (libcublas/libcublasLt) was not found: install the CUDA toolkit's math libraries")]
    NoCublas,
    #[error("CUDA driver call failed: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS call failed: {0}")]
    Blas(String),
    #[error("cannot read kernel source {path} (ANYQ_KERNEL_DIR): {source}")]
    KernelSource { path: std::path::PathBuf, source: std::io::Error },
    #[error("NVRTC failed to compile kernel source `{kernel}` for {arch}:\n{log}")]
    Compile { kernel: &'static str, arch: String, log: String },
    #[error("GPU {name} has compute capability {major}.{minor}; anyq's kernels need 8.0 or newer")]
    UnsupportedArch { name: String, major: i32, minor: i32 },
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, CudaError>;
