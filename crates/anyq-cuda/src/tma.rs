//! Hopper's copy engine (TMA) and thread-block clusters from the host: tensor maps describing
//! 2-D tiles of a row-major matrix, and launches with a cluster shape (which cudarc's launch
//! builder does not cover).

use std::ffi::c_void;

use cudarc::driver::{sys, CudaFunction, DeviceRepr};

use crate::{CudaDevice, CudaError, Result};

/// `CUtensorMap`: 128 opaque bytes, passed by value as a `__grid_constant__` kernel parameter.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(crate) struct TensorMap([u64; 16]);

unsafe impl DeviceRepr for TensorMap {}

/// Element types the maps describe.
#[derive(Clone, Copy)]
pub(crate) enum Element {
    U8,
    F16,
    U32,
}

/// How a box lands in shared memory.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Box rows of 128 bytes with the 128-byte swizzle that wgmma's descriptors expect.
    Swizzled128,
    /// Box rows as they are in memory, one after another.
    Dense,
}

/// A map of the row-major `[rows][cols]` matrix at device address `base` (rows `row_bytes`
/// apart), read or written in boxes of `box_rows` x `box_cols` laid out as `layout` says. Rows
/// past `rows` read as zeros and are not written.
pub(crate) fn tile_map(
    base: u64,
    element: Element,
    (rows, cols): (usize, usize),
    row_bytes: usize,
    (box_rows, box_cols): (u32, u32),
    layout: Layout,
) -> Result<TensorMap> {
    let (dtype, size) = match element {
        Element::U8 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, 1),
        Element::F16 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2),
        Element::U32 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT32, 4),
    };
    let box_row_bytes = box_cols as usize * size;
    let box_fits = match layout {
        Layout::Swizzled128 => box_row_bytes == 128,
        Layout::Dense => box_row_bytes.is_multiple_of(16) && box_cols <= 256,
    };
    if !box_fits || !base.is_multiple_of(16) || !row_bytes.is_multiple_of(16) || rows == 0 || cols == 0 {
        return Err(CudaError::Shape(format!(
            "no tensor map for a {rows} x {cols} matrix ({row_bytes}-byte rows) in {box_rows} x {box_cols} boxes"
        )));
    }
    let swizzle = match layout {
        Layout::Swizzled128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        Layout::Dense => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
    };
    encode(dtype, base, &[cols as u64, rows as u64], &[row_bytes as u64], &[box_cols, box_rows], swizzle)
}

/// A map of the row-major int8 `[rows][k]` matrix at `base` (rows `row_bytes` apart) as 128-byte
/// column blocks: a box is `blocks` consecutive blocks of `box_rows` rows, block after block in
/// shared memory, each row 128 bytes with the 128-byte swizzle. Rows past `rows` read as zeros.
pub(crate) fn block_map(
    base: u64,
    (rows, k): (usize, usize),
    row_bytes: usize,
    (box_rows, blocks): (u32, u32),
) -> Result<TensorMap> {
    if !k.is_multiple_of(128) || !base.is_multiple_of(16) || !row_bytes.is_multiple_of(16) || rows == 0 || k == 0 {
        return Err(CudaError::Shape(format!(
            "no block map for a {rows} x {k} int8 matrix ({row_bytes}-byte rows) in {box_rows} x {blocks} x 128 boxes"
        )));
    }
    encode(
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        base,
        &[128, rows as u64, (k / 128) as u64],
        &[row_bytes as u64, 128],
        &[128, box_rows, blocks],
        sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    )
}

fn encode(
    dtype: sys::CUtensorMapDataType,
    base: u64,
    dims: &[u64],
    strides: &[u64],
    boxes: &[u32],
    swizzle: sys::CUtensorMapSwizzle,
) -> Result<TensorMap> {
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let element_strides = [1u32; 5];
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            dims.len() as u32,
            base as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()?;
    }
    Ok(TensorMap(map.opaque))
}

/// What a [`launch_ex`] asks of the driver beyond a plain launch.
#[derive(Clone, Copy)]
pub(crate) struct LaunchOptions {
    /// Blocks per cluster along x (1: no clusters).
    pub cluster: u32,
    /// Programmatic dependent launch: the kernel may start while the previous kernel on the
    /// stream finishes, and waits (`griddepcontrol.wait`) before it reads what that kernel wrote.
    pub early_start: bool,
}

/// Launches `function` on the device's stream with `options`; `params` point at each kernel
/// argument in order.
pub(crate) fn launch_ex(
    device: &CudaDevice,
    function: &CudaFunction,
    (blocks, threads): (u32, u32),
    shared_bytes: u32,
    options: LaunchOptions,
    params: &mut [*mut c_void],
) -> Result<()> {
    let mut attributes: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut count = 0;
    if options.cluster > 1 {
        attributes[count].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attributes[count].value.clusterDim =
            sys::CUlaunchAttributeValue_union__bindgen_ty_1 { x: options.cluster, y: 1, z: 1 };
        count += 1;
    }
    if options.early_start {
        attributes[count].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attributes[count].value.programmaticStreamSerializationAllowed = 1;
        count += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: blocks,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: threads,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shared_bytes,
        hStream: device.stream().cu_stream(),
        attrs: attributes.as_mut_ptr(),
        numAttrs: count as u32,
    };
    device.bind()?;
    unsafe {
        sys::cuLaunchKernelEx(&config, function.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()?
    };
    Ok(())
}
