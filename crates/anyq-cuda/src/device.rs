use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
};

use crate::compile::{self, KernelSource};
use crate::{CudaError, Result};

/// One GPU with its stream and the kernel modules compiled for it so far.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    name: String,
    arch: (i32, i32),
    sm_count: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    resident: Mutex<HashMap<(String, u32), u32>>,
    workspaces: Mutex<HashMap<&'static str, CudaSlice<u8>>>,
}

impl CudaDevice {
    /// Opens GPU `ordinal`, or explains why it cannot (no driver, no such GPU, too old a GPU).
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        // cudarc panics when a library is missing; ask first so the user gets an error instead.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)?;
        let name = ctx.name()?;
        let arch = ctx.compute_capability()?;
        if arch.0 < 8 {
            return Err(CudaError::UnsupportedArch { name, major: arch.0, minor: arch.1 });
        }
        let sm_count = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        // One stream: cudarc's per-allocation event tracking only costs time here.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        Ok(Arc::new(Self {
            ctx,
            stream,
            name,
            arch,
            sm_count,
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            resident: Mutex::new(HashMap::new()),
            workspaces: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether a CUDA driver and at least one GPU are present, without opening anything.
    pub fn available() -> bool {
        let driver = unsafe { sys::is_culib_present() };
        driver && CudaContext::device_count().is_ok_and(|n| n > 0)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.arch
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Kernel `function` of `source`, compiling (or reading from the disk cache) the source on
    /// first use; `dynamic_smem` above the default 48 KiB is allowed once, when it is loaded.
    pub(crate) fn function(&self, source: &KernelSource, function: &str, dynamic_smem: u32) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = functions.get(function) {
            return Ok(f.clone());
        }
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
            match modules.get(source.name) {
                Some(module) => module.clone(),
                None => {
                    let image = compile::cubin(source, self.arch)?;
                    let module = self.ctx.load_module(cudarc::nvrtc::Ptx::from_binary(image))?;
                    modules.insert(source.name, module.clone());
                    module
                }
            }
        };
        let f = module.load_function(function)?;
        if dynamic_smem > 48 * 1024 {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem as i32,
            )?;
        }
        functions.insert(function.to_string(), f.clone());
        Ok(f)
    }

    /// Blocks of 256 threads of kernel `function` (with `dynamic_smem` bytes) that fit on one SM
    /// at once, asked of the driver once per kernel and size.
    pub(crate) fn resident_blocks(&self, function: &str, kernel: &CudaFunction, dynamic_smem: u32) -> Result<u32> {
        let mut resident = self.resident.lock().unwrap_or_else(|e| e.into_inner());
        let key = (function.to_string(), dynamic_smem);
        if let Some(&blocks) = resident.get(&key) {
            return Ok(blocks);
        }
        let blocks = kernel.occupancy_max_active_blocks_per_multiprocessor(256, dynamic_smem as usize, None)?.max(1);
        resident.insert(key, blocks);
        Ok(blocks)
    }

    /// Device address of workspace `name`, at least `bytes` long: zeroed when made, then kept for
    /// the device's life, so kernels using it leave it as they need to find it. A larger request
    /// replaces it (the stream frees the old one after the work queued before).
    pub(crate) fn workspace(&self, name: &'static str, bytes: usize) -> Result<u64> {
        let mut workspaces = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let buffer = match workspaces.remove(name) {
            Some(buffer) if buffer.len() >= bytes => buffer,
            _ => self.stream.alloc_zeros::<u8>(bytes.max(1))?,
        };
        let address = buffer.device_ptr(&self.stream).0;
        workspaces.insert(name, buffer);
        Ok(address)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, device: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(device)?)
    }

    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(len.max(1))?)
    }

    /// Makes the device's context current on this thread (for raw driver calls).
    pub(crate) fn bind(&self) -> Result<()> {
        Ok(self.ctx.bind_to_thread()?)
    }

    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }
}

/// Times work on the device's stream with events, so host-side launch costs stay out.
pub struct Timer {
    start: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    pub fn start(device: &CudaDevice) -> Result<Self> {
        let start = device.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        Ok(Self { start, stream: device.stream.clone() })
    }

    /// Milliseconds since `start`, waiting for the work queued since.
    pub fn elapsed_ms(&self) -> Result<f32> {
        let end = self.stream.record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        Ok(self.start.elapsed_ms(&end)?)
    }
}
