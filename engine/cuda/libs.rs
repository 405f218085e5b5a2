//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc (dynamic loading) opens each library by a fixed list of names derived from the compile-time CUDA
//! version (`cuda-12080`: `libX.so`, `libX.so.12`, `.so.11`, `.so.10`, `.so.9`, `.so.1`, ...) and *panics* when
//! none loads, or when a function's symbol is missing at its first call. So, for every library the CUDA executor
//! uses, [`probe_library`]:
//! 1. opens the first of cudarc's own candidate names that loads, exactly as cudarc will;
//! 2. if none does, looks for the library where CUDA 12 and 13 installs put it (LD_LIBRARY_PATH, $CUDA_HOME /
//!    /usr/local/cuda, the pip `nvidia-*` wheels in site-packages, `ZEROCONV_CUDA_LIB_DIRS`) and, when its soname is
//!    one cudarc asks for (`.so.12`, `.so.9`, `.so.1`), loads it by full path and keeps it loaded: the dynamic
//!    loader then hands the same object to cudarc's open by soname. A CUDA 13 file (`.so.13`) is reported with the
//!    fix (a symlink farm on LD_LIBRARY_PATH, which `scripts/gpu-check --run` sets up), since no name cudarc tries
//!    matches it;
//! 3. checks that every symbol the executor calls is exported, and reads the library's version.
//!
//! Nothing here panics; a failure is one line naming the library, the names and folders tried, and what is missing.

use crate::error::{Error, Result};
use std::ffi::c_int;
use std::path::{Path, PathBuf};

/// A library the CUDA executor loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lib {
    Driver,
    CublasLt,
    Cublas,
    Cudnn,
    Nvrtc,
}

impl Lib {
    pub const ALL: [Lib; 5] = [Lib::Driver, Lib::CublasLt, Lib::Cublas, Lib::Cudnn, Lib::Nvrtc];

    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "CUDA driver",
            Lib::CublasLt => "cuBLASLt",
            Lib::Cublas => "cuBLAS",
            Lib::Cudnn => "cuDNN",
            Lib::Nvrtc => "NVRTC",
        }
    }

    /// The stem cudarc builds its candidate names from.
    fn stem(self) -> &'static str {
        match self {
            Lib::Driver => "cuda",
            Lib::CublasLt => "cublasLt",
            Lib::Cublas => "cublas",
            Lib::Cudnn => "cudnn",
            Lib::Nvrtc => "nvrtc",
        }
    }

    /// File names a CUDA 12 or 13 install uses, newest first.
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1", "libcuda.so"],
            Lib::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            Lib::Cublas => &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
            Lib::Cudnn => &["libcudnn.so.9", "libcudnn.so"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
        }
    }

    /// Folders, relative to a site-packages folder, where NVIDIA's pip wheels put the library (CUDA 12 wheels:
    /// `nvidia/<component>/lib`; CUDA 13 wheels: `nvidia/cu13/lib`).
    fn wheel_dirs(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &[],
            Lib::CublasLt | Lib::Cublas => &["nvidia/cublas/lib", "nvidia/cu13/lib"],
            Lib::Cudnn => &["nvidia/cudnn/lib"],
            Lib::Nvrtc => &["nvidia/cuda_nvrtc/lib", "nvidia/cu13/lib"],
        }
    }

    /// Every symbol the CUDA executor calls in this library (cudarc resolves each by name at its first call and
    /// panics when it is missing).
    pub fn symbols(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &[
                "cuInit",
                "cuDriverGetVersion",
                "cuDeviceGet",
                "cuDeviceGetCount",
                "cuDeviceGetName",
                "cuDeviceTotalMem_v2",
                "cuDeviceGetAttribute",
                "cuDevicePrimaryCtxRetain",
                "cuDevicePrimaryCtxRelease_v2",
                "cuCtxSetCurrent",
                "cuStreamCreate",
                "cuStreamDestroy_v2",
                "cuStreamSynchronize",
                "cuEventCreate",
                "cuEventDestroy_v2",
                "cuEventRecord",
                "cuStreamWaitEvent",
                "cuEventElapsedTime",
                "cuStreamBeginCapture_v2",
                "cuStreamEndCapture",
                "cuGraphInstantiateWithFlags",
                "cuGraphLaunch",
                "cuGraphExecDestroy",
                "cuGraphDestroy",
                "cuMemAlloc_v2",
                "cuMemFree_v2",
                "cuMemcpyHtoDAsync_v2",
                "cuMemcpyDtoHAsync_v2",
                "cuMemcpy2DAsync_v2",
                "cuMemsetD8Async",
                "cuModuleLoadData",
                "cuModuleUnload",
                "cuModuleGetFunction",
                "cuLaunchKernel",
                "cuFuncSetAttribute",
                "cuGetErrorName",
                "cuGetErrorString",
            ],
            Lib::CublasLt => &[
                "cublasLtGetVersion",
                "cublasLtCreate",
                "cublasLtDestroy",
                "cublasLtMatmulDescCreate",
                "cublasLtMatmulDescDestroy",
                "cublasLtMatmulDescSetAttribute",
                "cublasLtMatrixLayoutCreate",
                "cublasLtMatrixLayoutDestroy",
                "cublasLtMatrixLayoutSetAttribute",
                "cublasLtMatmulPreferenceCreate",
                "cublasLtMatmulPreferenceDestroy",
                "cublasLtMatmulPreferenceSetAttribute",
                "cublasLtMatmulAlgoGetHeuristic",
                "cublasLtMatmul",
            ],
            Lib::Cublas => &[
                "cublasGetProperty",
                "cublasCreate_v2",
                "cublasDestroy_v2",
                "cublasSetStream_v2",
                "cublasSetWorkspace_v2",
                "cublasSetMathMode",
                "cublasGemmStridedBatchedEx",
            ],
            Lib::Cudnn => &[
                "cudnnGetVersion",
                "cudnnGetErrorString",
                "cudnnCreate",
                "cudnnDestroy",
                "cudnnSetStream",
                "cudnnCreateTensorDescriptor",
                "cudnnSetTensor4dDescriptor",
                "cudnnDestroyTensorDescriptor",
                "cudnnCreateFilterDescriptor",
                "cudnnSetFilter4dDescriptor",
                "cudnnDestroyFilterDescriptor",
                "cudnnCreateConvolutionDescriptor",
                "cudnnSetConvolution2dDescriptor",
                "cudnnSetConvolutionMathType",
                "cudnnGetConvolution2dForwardOutputDim",
                "cudnnDestroyConvolutionDescriptor",
                "cudnnGetConvolutionForwardAlgorithm_v7",
                "cudnnGetConvolutionBackwardDataAlgorithm_v7",
                "cudnnGetConvolutionBackwardFilterAlgorithm_v7",
                "cudnnConvolutionForward",
                "cudnnConvolutionBackwardData",
                "cudnnConvolutionBackwardFilter",
            ],
            Lib::Nvrtc => &[
                "nvrtcVersion",
                "nvrtcCreateProgram",
                "nvrtcCompileProgram",
                "nvrtcGetPTXSize",
                "nvrtcGetPTX",
                "nvrtcGetProgramLogSize",
                "nvrtcGetProgramLog",
                "nvrtcDestroyProgram",
            ],
        }
    }

    /// The names cudarc tries, in its order (the first that loads is the one it uses).
    pub fn cudarc_names(self) -> Vec<String> {
        let mut names = cudarc::get_lib_name_candidates(self.stem());
        if self == Lib::Driver {
            names.extend(cudarc::get_lib_name_candidates("nvcuda"));
        }
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(n.clone()));
        names
    }
}

/// A library that cudarc will load, with every needed symbol present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibReport {
    pub lib: Lib,
    /// The name cudarc opens it by.
    pub opened_as: String,
    /// The file it was preloaded from, when it was found outside the loader's search path.
    pub preloaded_from: Option<PathBuf>,
    /// The library's own version, as it reports it.
    pub version: String,
}

impl std::fmt::Display for LibReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({}", self.lib.name(), self.version, self.opened_as)?;
        if let Some(p) = &self.preloaded_from {
            write!(f, " from {}", p.display())?;
        }
        f.write_str(")")
    }
}

/// Folders to look in when cudarc's names do not load, in order: `ZEROCONV_CUDA_LIB_DIRS` (colon-separated),
/// LD_LIBRARY_PATH, $CUDA_HOME / $CUDA_PATH and /usr/local/cuda (lib64 and targets/*/lib), the pip wheel folders
/// under every site-packages folder found from $VIRTUAL_ENV, $CONDA_PREFIX, ~/.local, /usr/local/lib, /usr/lib and
/// /opt/conda, and the distribution's library folders.
pub fn search_dirs(lib: Lib) -> Vec<PathBuf> {
    search_dirs_for(lib.wheel_dirs())
}

/// [`search_dirs`] for a library whose pip wheel puts it in `wheel_dirs` (relative to site-packages).
pub fn search_dirs_for(wheel_dirs: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for v in [crate::knobs::raw(crate::knobs::CUDA_LIB_DIRS), std::env::var_os("LD_LIBRARY_PATH")].into_iter().flatten()
    {
        dirs.extend(std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()));
    }
    let mut cuda_roots: Vec<PathBuf> =
        ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    cuda_roots.push(PathBuf::from("/usr/local/cuda"));
    for root in cuda_roots {
        dirs.push(root.join("lib64"));
        dirs.push(root.join("targets/x86_64-linux/lib"));
        dirs.push(root.join("targets/sbsa-linux/lib"));
    }
    for sp in site_packages() {
        dirs.extend(wheel_dirs.iter().map(|w| sp.join(w)));
    }
    dirs.extend(
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib"]
            .map(PathBuf::from),
    );
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// site-packages / dist-packages folders of the Python installs a GPU machine is likely to have.
fn site_packages() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> =
        ["VIRTUAL_ENV", "CONDA_PREFIX"].iter().filter_map(std::env::var_os).map(PathBuf::from).collect();
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    let mut out = Vec::new();
    for p in prefixes {
        let Ok(entries) = std::fs::read_dir(p.join("lib")) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pythons.sort();
        for py in pythons {
            out.push(py.join("site-packages"));
            out.push(py.join("dist-packages"));
        }
    }
    if let Some(pp) = std::env::var_os("PYTHONPATH") {
        out.extend(std::env::split_paths(&pp));
    }
    out
}

/// The first of `names` that loads by name (from the loader's search path), else the first that loads from one of
/// `dirs`, with the name or path it was opened by. For a library zeroconv opens itself (not through cudarc). `Err`
/// lists what was tried: the names, and files that exist but do not load, with the reason.
pub fn open_first(names: &[&str], dirs: &[PathBuf]) -> std::result::Result<(String, libloading::Library), Vec<String>> {
    let mut tried = Vec::new();
    for name in names {
        // SAFETY: loading an NVIDIA library runs only its own initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(*name) } {
            Ok(l) => return Ok((name.to_string(), l)),
            Err(_) => tried.push(name.to_string()),
        }
    }
    for dir in dirs {
        for name in names {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            // SAFETY: as above.
            match unsafe { libloading::Library::new(&path) } {
                Ok(l) => return Ok((path.display().to_string(), l)),
                Err(e) => tried.push(format!("{} (does not load: {e})", path.display())),
            }
        }
    }
    Err(tried)
}

/// Checks that `library` (`name`, opened as `opened_as`) exports every one of `symbols`; the error lists those
/// missing.
pub fn require_symbols(library: &libloading::Library, symbols: &[&str], name: &str, opened_as: &str) -> Result<()> {
    let missing: Vec<&str> = symbols
        .iter()
        .copied()
        // SAFETY: only looks the symbol up; the pointer is never called or dereferenced.
        .filter(|s| unsafe { library.get::<*const std::ffi::c_void>(s.as_bytes()) }.is_err())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::CudaUnavailable(format!(
        "{name} ({opened_as}) lacks {} of the functions zeroconv calls: {}",
        missing.len(),
        missing.join(", ")
    )))
}

/// The first of cudarc's names for `lib` that loads, with its handle: what cudarc's own loader will pick.
fn open_like_cudarc(lib: Lib) -> Option<(String, libloading::Library)> {
    lib.cudarc_names().into_iter().find_map(|name| {
        // SAFETY: loading a CUDA library runs only its own initialisers, which have no preconditions.
        unsafe { libloading::Library::new(&name) }.ok().map(|l| (name, l))
    })
}

/// Whether cudarc would ask for a file of this name (its soname), so a copy loaded by path satisfies it.
fn cudarc_asks_for(lib: Lib, file: &str) -> bool {
    lib.cudarc_names().iter().any(|n| n == file)
}

/// Loads `lib` so that cudarc finds it, checks its symbols and reads its version. One line on failure.
pub fn probe_library(lib: Lib) -> Result<LibReport> {
    let mut preloaded_from = None;
    if open_like_cudarc(lib).is_none() {
        let mut elsewhere = Vec::new();
        'search: for dir in search_dirs(lib) {
            for file in lib.file_names() {
                let path = dir.join(file);
                if !path.exists() {
                    continue;
                }
                if !cudarc_asks_for(lib, file) {
                    elsewhere.push(path);
                    continue;
                }
                // SAFETY: as in `open_like_cudarc`; loaded by full path and kept for the life of the process, so
                // the dynamic loader resolves cudarc's later open of the same soname to this object.
                match unsafe { libloading::Library::new(&path) } {
                    Ok(handle) => {
                        std::mem::forget(handle);
                        preloaded_from = Some(path);
                        break 'search;
                    }
                    Err(e) => elsewhere.push(PathBuf::from(format!("{} (does not load: {e})", path.display()))),
                }
            }
        }
        if preloaded_from.is_none() || open_like_cudarc(lib).is_none() {
            return Err(not_found(lib, &elsewhere));
        }
    }
    let (opened_as, handle) = open_like_cudarc(lib).ok_or_else(|| not_found(lib, &[]))?;
    require_symbols(&handle, lib.symbols(), lib.name(), &opened_as)?;
    let version = version(lib, &handle);
    Ok(LibReport { lib, opened_as, preloaded_from, version })
}

fn not_found(lib: Lib, elsewhere: &[PathBuf]) -> Error {
    let mut msg = format!(
        "{} not found: none of {} loads from the loader's search path, and no {} is in LD_LIBRARY_PATH, \
         ZEROCONV_CUDA_LIB_DIRS, $CUDA_HOME, /usr/local/cuda or pip's nvidia-* wheels",
        lib.name(),
        lib.cudarc_names()
            .iter()
            .filter(|n| n
                .strip_prefix(&format!("lib{}.so", lib.stem()))
                .is_some_and(|v| v.is_empty() || v.starts_with('.')))
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        lib.file_names().join(" / ")
    );
    if !elsewhere.is_empty() {
        let list: Vec<String> = elsewhere.iter().map(|p| p.display().to_string()).collect();
        msg.push_str(&format!(
            "; found {} but this build (CUDA 12.8 bindings) opens it only by the names above: link it as lib{}.so \
             in a folder on LD_LIBRARY_PATH before starting (scripts/gpu-check --run does)",
            list.join(", "),
            lib.stem()
        ));
    }
    Error::CudaUnavailable(msg)
}

/// The library's version through its own query function, called through `handle` (not cudarc, whose lookup
/// would panic on a missing symbol; the symbols were checked before).
fn version(lib: Lib, handle: &libloading::Library) -> String {
    // SAFETY: every call below: the symbol exists (checked by the caller) and has the C signature declared here,
    // from the library's header; the out-pointers are valid locals.
    unsafe {
        match lib {
            Lib::Driver => {
                let mut v: c_int = 0;
                match handle.get::<unsafe extern "C" fn(*mut c_int) -> c_int>(b"cuDriverGetVersion") {
                    Ok(f) if f(&mut v) == 0 => format!("supports CUDA {}.{}", v / 1000, (v % 1000) / 10),
                    _ => "version unknown".into(),
                }
            }
            Lib::CublasLt => match handle.get::<unsafe extern "C" fn() -> usize>(b"cublasLtGetVersion") {
                Ok(f) => dotted(f(), 10000, 100),
                Err(_) => "version unknown".into(),
            },
            Lib::Cublas => {
                let get = handle.get::<unsafe extern "C" fn(c_int, *mut c_int) -> c_int>(b"cublasGetProperty");
                match get {
                    Ok(f) => {
                        let mut parts = [0 as c_int; 3];
                        for (i, p) in parts.iter_mut().enumerate() {
                            f(i as c_int, p);
                        }
                        format!("{}.{}.{}", parts[0], parts[1], parts[2])
                    }
                    Err(_) => "version unknown".into(),
                }
            }
            Lib::Cudnn => match handle.get::<unsafe extern "C" fn() -> usize>(b"cudnnGetVersion") {
                // cuDNN 9 encodes major*10000 + minor*100 + patch (cuDNN 8: major*1000 + minor*100 + patch).
                Ok(f) => {
                    let v = f();
                    if v >= 10000 {
                        dotted(v, 10000, 100)
                    } else {
                        dotted(v, 1000, 100)
                    }
                }
                Err(_) => "version unknown".into(),
            },
            Lib::Nvrtc => {
                let (mut a, mut b): (c_int, c_int) = (0, 0);
                match handle.get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(b"nvrtcVersion") {
                    Ok(f) if f(&mut a, &mut b) == 0 => format!("{a}.{b}"),
                    _ => "version unknown".into(),
                }
            }
        }
    }
}

fn dotted(v: usize, major: usize, minor: usize) -> String {
    format!("{}.{}.{}", v / major, (v % major) / minor, v % minor)
}

/// Probes every library the CUDA executor needs (NVRTC only when `nvrtc`: generated kernels missing from the
/// disk cache). One error line naming everything that is missing.
pub fn probe_all(nvrtc: bool) -> Result<Vec<LibReport>> {
    let mut found = Vec::new();
    let mut problems = Vec::new();
    for lib in Lib::ALL {
        if lib == Lib::Nvrtc && !nvrtc {
            continue;
        }
        match probe_library(lib) {
            Ok(r) => found.push(r),
            Err(Error::CudaUnavailable(m)) => problems.push(m),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(found)
    } else {
        let ok: Vec<String> = found.iter().map(|r| r.to_string()).collect();
        Err(Error::CudaUnavailable(format!(
            "probed {}: {}{}",
            Lib::ALL.iter().filter(|l| nvrtc || **l != Lib::Nvrtc).map(|l| l.name()).collect::<Vec<_>>().join(", "),
            problems.join("; "),
            if ok.is_empty() { String::new() } else { format!("; found {}", ok.join(", ")) }
        )))
    }
}

/// Whether `dir` holds a file of `lib` (for reports).
pub fn present_in(lib: Lib, dir: &Path) -> Option<PathBuf> {
    lib.file_names().iter().map(|f| dir.join(f)).find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cudarc_asks_for_cuda_12_sonames_but_not_cuda_13_ones() {
        assert!(cudarc_asks_for(Lib::CublasLt, "libcublasLt.so.12"));
        assert!(cudarc_asks_for(Lib::Cudnn, "libcudnn.so.9"));
        assert!(cudarc_asks_for(Lib::Driver, "libcuda.so.1"));
        assert!(!cudarc_asks_for(Lib::CublasLt, "libcublasLt.so.13"));
        assert!(!cudarc_asks_for(Lib::Nvrtc, "libnvrtc.so.13"));
    }

    #[test]
    fn pip_wheel_folders_are_searched() {
        let dirs = search_dirs(Lib::Cudnn);
        assert!(dirs.iter().any(|d| d.ends_with("nvidia/cudnn/lib")) || site_packages().is_empty(), "{dirs:?}");
        assert!(dirs.iter().any(|d| d == Path::new("/usr/local/cuda/lib64")));
    }

    #[test]
    fn a_cuda_13_file_is_reported_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libcublasLt.so.13"), b"not a library").unwrap();
        let e = not_found(Lib::CublasLt, &[dir.path().join("libcublasLt.so.13")]).to_string();
        assert!(e.contains("libcublasLt.so.13") && e.contains("LD_LIBRARY_PATH"), "{e}");
        assert_eq!(present_in(Lib::CublasLt, dir.path()), Some(dir.path().join("libcublasLt.so.13")));
    }

    #[test]
    fn versions_are_dotted() {
        assert_eq!(dotted(90800, 10000, 100), "9.8.0");
        assert_eq!(dotted(120803, 10000, 100), "12.8.3");
    }
}
