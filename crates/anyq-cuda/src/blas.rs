//! The peers our kernels are measured against, and the dense GEMMs of the FP16/BF16 model:
//! cuBLAS for 16-bit floats, cuBLASLt for INT8 x INT8 -> INT32.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as cublas, sys as cublas_sys, CudaBlas};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use crate::ops::F16Storage;
use crate::{CudaDevice, CudaError, Result};

fn blas_error(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Blas(format!("{what}: {e:?}"))
}

/// Row-major `y[m][n] = x[m][k] · w[n][k]ᵀ` in 16-bit floats with f32 accumulation, through cuBLAS.
pub struct BlasGemm {
    blas: CudaBlas,
    device: Arc<CudaDevice>,
}

impl BlasGemm {
    pub fn new(device: &Arc<CudaDevice>) -> Result<Self> {
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        let blas = CudaBlas::new(device.stream().clone()).map_err(|e| blas_error("creating a cuBLAS handle", e))?;
        Ok(Self { blas, device: device.clone() })
    }

    pub fn bf16(
        &self,
        x: &CudaSlice<half::bf16>,
        w: &CudaSlice<half::bf16>,
        y: &mut CudaSlice<half::bf16>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let bf16 = cublas_sys::cudaDataType_t::CUDA_R_16BF;
        self.gemm(x, w, y, (m, n, k), bf16, bf16)
    }

    /// Activations as `f16` or as their bits (see [`F16Storage`]).
    pub fn f16(
        &self,
        x: &CudaSlice<impl F16Storage>,
        w: &CudaSlice<half::f16>,
        y: &mut CudaSlice<impl F16Storage>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let f16 = cublas_sys::cudaDataType_t::CUDA_R_16F;
        self.gemm(x, w, y, (m, n, k), f16, f16)
    }

    /// f16 inputs, f32 outputs: for products that must not round to f16 or overflow it (the
    /// residual stream's deltas, logits).
    pub fn f16_to_f32(
        &self,
        x: &CudaSlice<impl F16Storage>,
        w: &CudaSlice<half::f16>,
        y: &mut CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        let (f16, f32) = (cublas_sys::cudaDataType_t::CUDA_R_16F, cublas_sys::cudaDataType_t::CUDA_R_32F);
        self.gemm(x, w, y, (m, n, k), f16, f32)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm<X, W, Y>(
        &self,
        x: &CudaSlice<X>,
        w: &CudaSlice<W>,
        y: &mut CudaSlice<Y>,
        (m, n, k): (usize, usize, usize),
        dtype: cublas_sys::cudaDataType_t,
        out_dtype: cublas_sys::cudaDataType_t,
    ) -> Result<()> {
        check_len("x", x.len(), m * k)?;
        check_len("w", w.len(), n * k)?;
        check_len("y", y.len(), m * n)?;
        let stream = self.device.stream();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _x) = x.device_ptr(stream);
        let (wp, _w) = w.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        // Column-major view: yᵀ (n x m) = w (k x n)ᵀ · xᵀ (k x m).
        unsafe {
            cublas::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                dtype,
                k as i32,
                xp as *const c_void,
                dtype,
                k as i32,
                &beta as *const f32 as *const c_void,
                yp as *mut c_void,
                out_dtype,
                n as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error("cublasGemmEx", e))
    }
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got < want {
        return Err(CudaError::Shape(format!("{name} holds {got} elements, the GEMM needs {want}")));
    }
    Ok(())
}

/// cuBLASLt's INT8 GEMM, row-major `y[m][n] (i32) = x[m][k] (i8) · w[n][k]ᵀ (i8)`, planned once
/// per shape (descriptors and the heuristic's algorithm).
pub struct Int8Gemm {
    handle: lt_sys::cublasLtHandle_t,
    desc: lt_sys::cublasLtMatmulDesc_t,
    layouts: [lt_sys::cublasLtMatrixLayout_t; 3],
    algo: lt_sys::cublasLtMatmulAlgo_t,
    workspace: CudaSlice<u8>,
    shape: (usize, usize, usize),
    device: Arc<CudaDevice>,
}

const LT_WORKSPACE: usize = 32 << 20;

impl Int8Gemm {
    pub fn new(device: &Arc<CudaDevice>, (m, n, k): (usize, usize, usize)) -> Result<Self> {
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(CudaError::NoCublas);
        }
        let err = |what: &'static str| move |e| blas_error(what, e);
        let handle = lt::create_handle().map_err(err("cublasLtCreate"))?;
        let desc =
            lt::create_matmul_desc(lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32I, lt_sys::cudaDataType::CUDA_R_32I)
                .map_err(err("cublasLtMatmulDescCreate"))?;
        let transpose = cublas_sys::cublasOperation_t::CUBLAS_OP_T;
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const _ as *const c_void,
                std::mem::size_of_val(&transpose),
            )
        }
        .map_err(err("setting TRANSA"))?;
        let i8 = lt_sys::cudaDataType::CUDA_R_8I;
        let layouts = [
            lt::create_matrix_layout(i8, k as u64, n as u64, k as i64).map_err(err("layout of w"))?,
            lt::create_matrix_layout(i8, k as u64, m as u64, k as i64).map_err(err("layout of x"))?,
            lt::create_matrix_layout(lt_sys::cudaDataType::CUDA_R_32I, n as u64, m as u64, n as i64)
                .map_err(err("layout of y"))?,
        ];
        let pref = lt::create_matmul_pref().map_err(err("cublasLtMatmulPreferenceCreate"))?;
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &LT_WORKSPACE as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
            .map_err(err("setting the workspace size"))?;
            let found =
                lt::get_matmul_algo_heuristic(handle, desc, layouts[0], layouts[1], layouts[2], layouts[2], pref);
            let _ = lt::destroy_matmul_pref(pref);
            found.map_err(err("cublasLtMatmulAlgoGetHeuristic (no INT8 algorithm for this shape)"))?
        };
        let workspace = device.zeros::<u8>(LT_WORKSPACE)?;
        Ok(Self { handle, desc, layouts, algo: heuristic.algo, workspace, shape: (m, n, k), device: device.clone() })
    }

    pub fn run(&mut self, x: &CudaSlice<i8>, w: &CudaSlice<i8>, y: &mut CudaSlice<i32>) -> Result<()> {
        let (m, n, k) = self.shape;
        check_len("x", x.len(), m * k)?;
        check_len("w", w.len(), n * k)?;
        check_len("y", y.len(), m * n)?;
        let stream = self.device.stream();
        let (alpha, beta) = (1i32, 0i32);
        let (xp, _x) = x.device_ptr(stream);
        let (wp, _w) = w.device_ptr(stream);
        let (yp, _y) = y.device_ptr_mut(stream);
        let (workspace, _ws) = self.workspace.device_ptr_mut(stream);
        unsafe {
            lt::matmul(
                self.handle,
                self.desc,
                &alpha as *const i32 as *const c_void,
                &beta as *const i32 as *const c_void,
                wp as *const c_void,
                self.layouts[0],
                xp as *const c_void,
                self.layouts[1],
                yp as *const c_void,
                self.layouts[2],
                yp as *mut c_void,
                self.layouts[2],
                &self.algo,
                workspace as *mut c_void,
                LT_WORKSPACE,
                stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| blas_error("cublasLtMatmul (INT8)", e))
    }
}

impl Drop for Int8Gemm {
    fn drop(&mut self) {
        unsafe {
            for layout in self.layouts {
                let _ = lt::destroy_matrix_layout(layout);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
