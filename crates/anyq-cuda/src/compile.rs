//! Run-time compilation of the CUDA C kernels with NVRTC, cached on disk by source hash so that
//! only the first run on a machine pays for it.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::{CudaError, Result};

/// A kernel file with the shared header in front; `name` appears in compile errors and cache names.
pub(crate) struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
}

macro_rules! kernel_source {
    ($name:literal) => {
        $crate::compile::KernelSource {
            name: $name,
            code: concat!(include_str!("../kernels/common.cuh"), include_str!(concat!("../kernels/", $name, ".cu"))),
        }
    };
}
pub(crate) use kernel_source;

/// The NVRTC target for a compute capability; Hopper gets `sm_90a` for its warpgroup MMA.
fn target(arch: (i32, i32)) -> String {
    match arch {
        (9, 0) => "sm_90a".to_string(),
        (major, minor) => format!("sm_{major}{minor}"),
    }
}

/// Machine code for `source` on a GPU of compute capability `arch`.
pub(crate) fn cubin(source: &KernelSource, arch: (i32, i32)) -> Result<Vec<u8>> {
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(CudaError::NoNvrtc);
    }
    let target = target(arch);
    let code = source_code(source, std::env::var_os("ANYQ_KERNEL_DIR").map(PathBuf::from))?;
    let options =
        vec![format!("--gpu-architecture={target}"), "--std=c++17".to_string(), "-default-device".to_string()];
    let version = nvrtc_version();
    let key = fnv1a(&[code.as_bytes(), options.join(" ").as_bytes(), version.as_bytes()]);
    let cached = cache_dir().map(|dir| dir.join(format!("{}-{target}-{key:016x}.cubin", source.name)));
    if let Some(image) = cached.as_ref().and_then(|path| std::fs::read(path).ok()) {
        return Ok(image);
    }
    let image = compile(source.name, &code, &target, &options)?;
    if let Some(path) = cached {
        // A cache that cannot be written only costs the next run a compile.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::create_dir_all(path.parent().unwrap_or(&path)).is_ok() && std::fs::write(&tmp, &image).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(image)
}

/// The built-in source, or the files of `dir` (common.cuh and NAME.cu; `ANYQ_KERNEL_DIR`): kernels
/// can then be changed on a GPU machine without rebuilding the binaries.
fn source_code(source: &KernelSource, dir: Option<PathBuf>) -> Result<std::borrow::Cow<'static, str>> {
    let Some(dir) = dir else {
        return Ok(source.code.into());
    };
    let read = |file: String| {
        let path = dir.join(&file);
        std::fs::read_to_string(&path).map_err(|source| CudaError::KernelSource { path, source })
    };
    Ok((read("common.cuh".to_string())? + &read(format!("{}.cu", source.name))?).into())
}

fn compile(kernel: &'static str, code: &str, target: &str, options: &[String]) -> Result<Vec<u8>> {
    let code = CString::new(code).map_err(|_| CudaError::Compile {
        kernel,
        arch: target.to_string(),
        log: "the source holds a NUL byte".to_string(),
    })?;
    let name = CString::new(format!("{kernel}.cu")).expect("kernel names hold no NUL byte");
    let failed = |log: String| CudaError::Compile { kernel, arch: target.to_string(), log };
    let program = nvrtc::create_program(&code, Some(&name)).map_err(|e| failed(e.to_string()))?;
    let compiled = unsafe { nvrtc::compile_program(program, options) };
    let result = match compiled {
        Ok(()) => unsafe { cubin_of(program) }.map_err(|e| failed(format!("reading the compiled image: {e:?}"))),
        Err(e) => {
            let log = unsafe { nvrtc::get_program_log(program) }
                .map(|raw| unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned())
                .unwrap_or_default();
            Err(failed(format!("{e:?}\n{log}")))
        }
    };
    let _ = unsafe { nvrtc::destroy_program(program) };
    result
}

unsafe fn cubin_of(program: nvrtc_sys::nvrtcProgram) -> std::result::Result<Vec<u8>, nvrtc_sys::nvrtcResult> {
    let mut size = 0usize;
    nvrtc_sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| e.0)?;
    let mut image = vec![0u8; size];
    nvrtc_sys::nvrtcGetCUBIN(program, image.as_mut_ptr() as *mut c_char).result().map_err(|e| e.0)?;
    Ok(image)
}

fn nvrtc_version() -> String {
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    let _ = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    format!("{major}.{minor}")
}

/// `ANYQ_KERNEL_CACHE`, else the user's cache folder.
fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ANYQ_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("anyq").join("kernels"))
}

/// FNV-1a: stable across runs and toolchains, unlike std's hasher.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in part.iter().chain(&[0xff]) {
            hash = (hash ^ byte as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{mixq, ops};

    /// Where NVRTC is installed (with or without a GPU), every kernel source compiles for Hopper
    /// and for the GPUs before it (Ampere, Ada: the Hopper kernels' entry points must still
    /// compile, empty), and a broken one fails with its name and NVRTC's log.
    #[test]
    fn kernels_compile_for_hopper_and_earlier_gpus() {
        if !crate::testing::nvrtc_or_skip() {
            return;
        }
        for arch in [(9, 0), (8, 0), (8, 9)] {
            for source in [&mixq::MIXQ, &mixq::FILL, &ops::MODEL] {
                let image = cubin(source, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(image.starts_with(b"\x7fELF"), "{} for {arch:?}: not a cubin", source.name);
            }
        }
        let broken = KernelSource { name: "broken", code: "extern \"C\" __global__ void f() { undeclared(); }" };
        let err = cubin(&broken, (9, 0)).expect_err("a broken kernel must not compile");
        assert!(
            matches!(&err, CudaError::Compile { kernel: "broken", .. }) && err.to_string().contains("undeclared"),
            "{err}"
        );
    }

    #[test]
    fn kernel_sources_come_from_a_folder_when_one_is_given() {
        let source = KernelSource { name: "probe", code: "built in" };
        assert_eq!(source_code(&source, None).unwrap(), "built in");
        let dir = std::env::temp_dir().join(format!("anyq-kernel-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("common.cuh"), "header;").unwrap();
        let missing = source_code(&source, Some(dir.clone())).expect_err("probe.cu is missing");
        assert!(missing.to_string().contains("probe.cu"), "{missing}");
        std::fs::write(dir.join("probe.cu"), "kernel;").unwrap();
        assert_eq!(source_code(&source, Some(dir.clone())).unwrap(), "header;kernel;");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hopper_gets_the_arch_specific_target() {
        assert_eq!(target((9, 0)), "sm_90a");
        assert_eq!(target((8, 6)), "sm_86");
    }

    #[test]
    fn cache_key_depends_on_every_part_and_their_boundaries() {
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_ne!(fnv1a(&[b"kernel", b"sm_90a"]), fnv1a(&[b"kernel", b"sm_89"]));
        assert_eq!(fnv1a(&[b"kernel"]), fnv1a(&[b"kernel"]));
    }
}
