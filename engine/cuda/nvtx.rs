//! NVTX ranges, so Nsight Systems shows which node each kernel and library call of a profiled step belongs to.
//!
//! NVTX is optional: a missing library turns the ranges off (one `ZEROCONV_DEBUG` line says why), never the run.
//!
//! What is loaded, and why: NVTX calls do nothing by themselves; a profiler receives them only when the program's
//! NVTX implementation loads the tool's injection library, which the tool names in `NVTX_INJECTION64_PATH` (nsys
//! sets it for the processes it launches). NVTX 3 is header-only: every C program carries that loader inline. A
//! Rust program has no header, so it needs a compiled implementation, and the one NVIDIA ships is
//! `libnvToolsExt.so.1` (CUDA 12 toolkits' lib64, and pip's `nvidia-nvtx-cu12` wheel, which PyTorch installs): its
//! exported `nvtxRangePushA` / `nvtxRangePop` run that same loader at their first call, so loading it is all the
//! injection needs. Writing the loader here instead (dlopen `NVTX_INJECTION64_PATH`, call its
//! `InitializeInjectionNvtx2` with an export table the tool fills with its callbacks) would mean restating NVTX's
//! private table layouts, which no test without the tool could check; it is not done, so an install that has no
//! `libnvToolsExt.so.1` (CUDA 13 dropped it) gets no ranges.
//!
//! The library is looked for by name on the loader's path, then in the CUDA library folders
//! ([`super::libs::search_dirs_for`], with the wheel's `nvidia/nvtx/lib`); both symbols are checked before either is
//! called.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The names NVTX is opened by, the runtime's soname first.
pub const LIBRARY_NAMES: [&str; 2] = ["libnvToolsExt.so.1", "libnvToolsExt.so"];

/// Where pip's wheel puts it, relative to a site-packages folder.
const WHEEL_DIRS: [&str; 1] = ["nvidia/nvtx/lib"];

/// Every function zeroconv calls.
pub const SYMBOLS: [&str; 2] = ["nvtxRangePushA", "nvtxRangePop"];

// nvToolsExt.h: `int nvtxRangePushA(const char* message)`, `int nvtxRangePop(void)`. The return values (the nesting
// level, or a negative value without a tool) carry no error the caller could act on, and NVTX asks programs not to
// depend on them.
type RangePushA = unsafe extern "C" fn(*const c_char) -> c_int;
type RangePop = unsafe extern "C" fn() -> c_int;

/// A loaded NVTX library.
pub struct Nvtx {
    push: RangePushA,
    pop: RangePop,
    /// The name or path it was opened by.
    pub opened_as: String,
    // Last: the function pointers above point into it.
    _library: libloading::Library,
}

impl std::fmt::Debug for Nvtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NVTX ({})", self.opened_as)
    }
}

impl Nvtx {
    /// The process's NVTX, loaded at the first call; `None` when it is missing (one line at `ZEROCONV_DEBUG` >= 1).
    pub fn get() -> Option<&'static Nvtx> {
        static LOADED: OnceLock<Option<Nvtx>> = OnceLock::new();
        LOADED
            .get_or_init(|| match Nvtx::load_from(&LIBRARY_NAMES, &super::libs::search_dirs_for(&WHEEL_DIRS)) {
                Ok(n) => Some(n),
                Err(e) => {
                    if crate::knobs::debug_level() >= 1 {
                        eprintln!("[nvtx] no NVTX ranges (Nsight Systems will not show node names): {e}");
                    }
                    None
                }
            })
            .as_ref()
    }

    /// The first of `names` that loads by name, else from one of `dirs`, with both functions checked.
    pub fn load_from(names: &[&str], dirs: &[PathBuf]) -> Result<Nvtx> {
        let (opened_as, library) = super::libs::open_first(names, dirs).map_err(|tried| {
            Error::CudaUnavailable(format!(
                "NVTX not found: tried {} on the loader's path and in {} folders (pip install nvidia-nvtx-cu12, or \
                 name the folder of libnvToolsExt.so.1 in ZEROCONV_CUDA_LIB_DIRS)",
                tried.join(", "),
                dirs.len()
            ))
        })?;
        super::libs::require_symbols(&library, &SYMBOLS, "NVTX", &opened_as)?;
        // SAFETY: both symbols exist (checked above) with the signatures nvToolsExt.h declares, which the types
        // spell; the pointers stay valid while `_library` is loaded, and it lives as long as they do.
        unsafe {
            Ok(Nvtx {
                push: *library.get(b"nvtxRangePushA").map_err(sym)?,
                pop: *library.get(b"nvtxRangePop").map_err(sym)?,
                opened_as,
                _library: library,
            })
        }
    }

    /// Opens a range named `name` on the calling thread (a NUL inside the name ends it early).
    pub fn push(&self, name: &str) {
        let name = CString::new(name.split('\0').next().unwrap_or_default()).unwrap_or_default();
        // SAFETY: a valid NUL-terminated string, which NVTX copies before returning.
        unsafe { (self.push)(name.as_ptr()) };
    }

    /// Closes the calling thread's innermost range.
    pub fn pop(&self) {
        // SAFETY: takes no arguments; without an open range NVTX returns an error value, touching nothing.
        unsafe { (self.pop)() };
    }
}

fn sym(e: libloading::Error) -> Error {
    Error::CudaUnavailable(format!("NVTX: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_line_naming_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let e = Nvtx::load_from(&["libzeroconv-test-no-nvtx.so.1"], &[dir.path().to_path_buf()]).unwrap_err();
        assert!(matches!(e, Error::CudaUnavailable(_)));
        let m = e.to_string();
        assert!(m.contains("NVTX not found") && m.contains("libzeroconv-test-no-nvtx.so.1"), "{m}");
        assert!(m.contains("nvidia-nvtx-cu12") && !m.contains('\n'), "{m}");
    }

    #[test]
    fn a_file_that_is_not_a_library_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libzeroconv-test-nvtx.so.1"), b"not a library").unwrap();
        let m = Nvtx::load_from(&["libzeroconv-test-nvtx.so.1"], &[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(m.contains("does not load") && m.contains(&dir.path().display().to_string()), "{m}");
    }

    #[test]
    fn a_library_without_the_functions_is_named() {
        // The C library loads everywhere zeroconv runs, and exports neither NVTX function.
        let m = Nvtx::load_from(&["libc.so.6"], &[]).unwrap_err().to_string();
        assert!(m.contains("lacks 2 of the functions") && m.contains("nvtxRangePushA, nvtxRangePop"), "{m}");
    }
}
