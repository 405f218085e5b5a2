//! Run-time compilation of CUDA sources that only a run-time graph produces (fused kernels of a
//! config that is not shipped), with an on-disk cache keyed by the source's hash and the target
//! architecture, so each kernel is compiled once per machine.
//!
//! NVRTC is loaded dynamically. cudarc panics when the library is missing, so it is probed with
//! `libloading` first (ZEROCONV_NVRTC_LIB, then the names cudarc tries) and a missing NVRTC is a
//! clear error.

use crate::error::{Error, Result};
use crate::kernels::Arch;
use std::path::{Path, PathBuf};

/// Where compiled kernels are cached: $ZEROCONV_KERNEL_CACHE, else $XDG_CACHE_HOME/zeroconv/kernels,
/// else ~/.cache/zeroconv/kernels.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = crate::knobs::path(crate::knobs::KERNEL_CACHE) {
        return d;
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("zeroconv").join("kernels")
}

/// Checks that NVRTC can be loaded (without letting cudarc panic).
pub fn probe_nvrtc() -> Result<()> {
    if let Some(path) = crate::knobs::raw(crate::knobs::NVRTC_LIB) {
        // SAFETY: loading NVRTC runs no initialisers with preconditions; the handle is dropped.
        unsafe { libloading::Library::new(&path) }.map_err(|e| {
            Error::CudaUnavailable(format!("NVRTC at {} does not load: {e}", Path::new(&path).display()))
        })?;
        // Keep the library loaded under its path so cudarc's dlopen by name finds the same one.
        // SAFETY: as above.
        if let Ok(lib) = unsafe { libloading::Library::new(&path) } {
            std::mem::forget(lib);
        }
    }
    // SAFETY: only tries to dlopen cudarc's candidate names and drops what it opens.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(
            "NVRTC (libnvrtc.so.12) not found: run `eval \"$(scripts/setup-cuda-tools)\"` or set ZEROCONV_NVRTC_LIB"
                .into(),
        ))
    }
}

/// PTX for `source` (includes of the shipped headers are inlined) at `arch`, from the cache when
/// this source was compiled before. Returns the PTX and whether it came from the cache.
pub fn compile_cached(source: &str, arch: Arch, cache_dir: &Path) -> Result<(String, bool)> {
    let full = crate::kernels::self_contained(source);
    let hash = crate::hash::fnv1a64(full.as_bytes());
    let path = cache_dir.join(format!("{hash:016x}-{}.ptx", arch.name()));
    if let Ok(ptx) = std::fs::read_to_string(&path) {
        if ptx.contains(".entry") {
            return Ok((ptx, true));
        }
    }
    probe_nvrtc()?;
    let compute = match arch {
        Arch::Sm80 => "compute_80",
        Arch::Sm90 => "compute_90",
    };
    let opts = cudarc::nvrtc::CompileOptions {
        options: vec![format!("--gpu-architecture={compute}"), "--std=c++17".into()],
        name: Some("generated.cu".into()),
        ..Default::default()
    };
    let ptx = match cudarc::nvrtc::compile_ptx_with_opts(&full, opts) {
        Ok(p) => p.to_src(),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            return Err(Error::msg(format!("NVRTC rejected a generated kernel:\n{}", log.to_string_lossy())))
        }
        Err(e) => return Err(Error::msg(format!("NVRTC failed: {e:?}"))),
    };
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::file(cache_dir, e.to_string()))?;
    // Write then rename, so a concurrent reader never sees half a file; the temporary name is unique per
    // process and call, since threads of one process may compile the same source at once.
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, &ptx).map_err(|e| Error::file(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::file(&path, e.to_string()))?;
    Ok((ptx, false))
}
