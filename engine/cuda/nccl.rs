//! NCCL, the GPUs' all-reduce, for data-parallel training on `CudaDevice`.
//!
//! Loaded at run time with libloading by its own soname, not through cudarc: cudarc opens NCCL only as `libnccl.so`
//! (the development symlink) or under CUDA-version suffixes (`.so.12`, `.so.11`, ...), while NCCL's runtime (the
//! distributions' `libnccl2` package, pip's `nvidia-nccl-cu12` wheel) ships `libnccl.so.2` alone, and cudarc panics
//! when neither loads. Six functions are needed; their C signatures below are those of `nccl.h` (NCCL 2.x, stable
//! since 2.0). The library is looked for by name on the loader's path, then in the folders the other CUDA libraries
//! are searched in ([`super::libs::search_dirs_for`], with pip's `nvidia/nccl/lib`); every symbol is checked before
//! anything is called. Nothing here panics: a missing or wrong library is one error line naming what was tried.
//!
//! Rank 0 makes the communicator's unique id ([`Nccl::unique_id`]) before the rendezvous, which hands it to every
//! rank; each rank then joins with [`NcclComm::init`] on its own GPU. NCCL sums in its own order (rings, trees) in
//! the buffer's type, so GPU ranks agree with each other but not bit for bit with the CPU communicators' rank-order
//! f64 sum.

use crate::error::{Error, Result};
use crate::graph::DType;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// `sizeof(ncclUniqueId)`: the blob the rendezvous hands out (`engine::dist::BLOB_LEN`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// The names NCCL is opened by, the runtime's soname first.
pub const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Where pip's wheel puts it, relative to a site-packages folder.
const WHEEL_DIRS: [&str; 1] = ["nvidia/nccl/lib"];

/// Every function zeroconv calls.
pub const SYMBOLS: [&str; 6] =
    ["ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRank", "ncclAllReduce", "ncclCommDestroy", "ncclGetErrorString"];

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId([u8; UNIQUE_ID_BYTES]);

type NcclResult = c_int;
type Comm = *mut c_void;
// `ncclDataType_t` and `ncclRedOp_t` values from nccl.h.
const NCCL_FLOAT32: c_int = 7;
const NCCL_FLOAT64: c_int = 8;
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> NcclResult;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> NcclResult;
type CommInitRank = unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> NcclResult;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> NcclResult;
type CommDestroy = unsafe extern "C" fn(Comm) -> NcclResult;
type GetErrorString = unsafe extern "C" fn(NcclResult) -> *const c_char;

/// A loaded NCCL with every function zeroconv calls.
pub struct Nccl {
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    /// `major.minor.patch`, from `ncclGetVersion`.
    pub version: String,
    /// The name or path it was opened by.
    pub opened_as: String,
    // Last: the function pointers above point into it.
    _library: libloading::Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NCCL {} ({})", self.version, self.opened_as)
    }
}

impl Nccl {
    /// NCCL from the loader's path or the CUDA library folders, loaded once per process.
    pub fn load() -> Result<Arc<Nccl>> {
        static LOADED: OnceLock<std::result::Result<Arc<Nccl>, String>> = OnceLock::new();
        LOADED
            .get_or_init(|| {
                Nccl::load_from(&LIBRARY_NAMES, &super::libs::search_dirs_for(&WHEEL_DIRS))
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::CudaUnavailable)
    }

    /// The first of `names` that loads by name, else from one of `dirs`; checks every symbol and reads the version.
    pub fn load_from(names: &[&str], dirs: &[PathBuf]) -> Result<Nccl> {
        let (opened_as, library) = super::libs::open_first(names, dirs).map_err(|tried| {
            let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            Error::CudaUnavailable(format!(
                "NCCL not found (data-parallel training on GPUs needs it): tried {} on the loader's path and in {}; \
                 install NCCL (the libnccl2 package, or pip install nvidia-nccl-cu12) or name its folder in \
                 ZEROCONV_CUDA_LIB_DIRS",
                tried.join(", "),
                if dirs.is_empty() { "no other folder".to_string() } else { dirs.join(", ") }
            ))
        })?;
        super::libs::require_symbols(&library, &SYMBOLS, "NCCL", &opened_as)?;
        // SAFETY: every symbol exists (checked above) and has the signature nccl.h declares, which the types spell;
        // the pointers stay valid while `_library` is loaded, and it lives as long as they do.
        unsafe {
            let get_version = *library.get::<GetVersion>(b"ncclGetVersion").map_err(sym)?;
            let mut v: c_int = 0;
            let version = if get_version(&mut v) == 0 {
                // NCCL >= 2.9 encodes major*10000 + minor*100 + patch (earlier: major*1000 + minor*100 + patch).
                let (major, rest) = if v >= 10000 { (v / 10000, v % 10000) } else { (v / 1000, v % 1000) };
                format!("{major}.{}.{}", rest / 100, rest % 100)
            } else {
                "version unknown".into()
            };
            Ok(Nccl {
                get_unique_id: *library.get(b"ncclGetUniqueId").map_err(sym)?,
                comm_init_rank: *library.get(b"ncclCommInitRank").map_err(sym)?,
                all_reduce: *library.get(b"ncclAllReduce").map_err(sym)?,
                comm_destroy: *library.get(b"ncclCommDestroy").map_err(sym)?,
                get_error_string: *library.get(b"ncclGetErrorString").map_err(sym)?,
                version,
                opened_as,
                _library: library,
            })
        }
    }

    /// A fresh communicator id (rank 0, before the rendezvous hands it out).
    pub fn unique_id(&self) -> Result<[u8; UNIQUE_ID_BYTES]> {
        let mut id = UniqueId([0; UNIQUE_ID_BYTES]);
        // SAFETY: `id` is a valid out-pointer of the size nccl.h declares.
        self.check(unsafe { (self.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(id.0)
    }

    fn check(&self, r: NcclResult, what: &str) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
        let msg = unsafe { CStr::from_ptr((self.get_error_string)(r)) }.to_string_lossy().into_owned();
        Err(Error::msg(format!("NCCL {what}: {msg} (error {r}); NCCL_DEBUG=INFO tells more")))
    }
}

fn sym(e: libloading::Error) -> Error {
    Error::CudaUnavailable(format!("NCCL: {e}"))
}

/// One rank's NCCL communicator, on the GPU whose context was current when it was made. Destroyed on drop (before
/// the context: `CudaDevice` declares it first).
pub struct NcclComm {
    nccl: Arc<Nccl>,
    comm: Comm,
    pub rank: usize,
    pub world_size: usize,
}

// SAFETY: the communicator is used from one thread at a time (through `&mut CudaDevice`), with the device's context
// made current first, which is all NCCL asks of a communicator used from another thread.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins rank `rank` of `world_size` to the communicator `id` names; every rank must call it (it waits for all).
    ///
    /// # Safety
    /// The CUDA context of the GPU this rank uses must be current on the calling thread.
    pub unsafe fn init(nccl: Arc<Nccl>, id: &[u8; UNIQUE_ID_BYTES], rank: usize, world_size: usize) -> Result<Self> {
        let mut comm: Comm = std::ptr::null_mut();
        let (n, r) = (c_int::try_from(world_size), c_int::try_from(rank));
        let (Ok(n), Ok(r)) = (n, r) else {
            return Err(Error::msg(format!("NCCL: rank {rank} of {world_size} does not fit a C int")));
        };
        // SAFETY: `comm` is a valid out-pointer; the id is passed by value as nccl.h declares; the caller made a
        // context current.
        nccl.check(unsafe { (nccl.comm_init_rank)(&mut comm, n, UniqueId(*id), r) }, "ncclCommInitRank")?;
        Ok(NcclComm { nccl, comm, rank, world_size })
    }

    /// Enqueues the in-place sum (or mean) of `count` elements at device address `buf` over the ranks on `stream`.
    ///
    /// # Safety
    /// `buf` must hold `count` elements of `dtype` on this rank's GPU, `stream` must be a live stream of its context,
    /// and that context must be current.
    pub unsafe fn all_reduce(
        &self,
        buf: u64,
        count: u64,
        dtype: DType,
        average: bool,
        stream: *mut c_void,
    ) -> Result<()> {
        let t = match dtype {
            DType::F32 => NCCL_FLOAT32,
            DType::F64 => NCCL_FLOAT64,
            other => return Err(Error::msg(format!("NCCL all-reduce of {other}: gradients are f32"))),
        };
        let op = if average { NCCL_AVG } else { NCCL_SUM };
        let p = buf as *mut c_void;
        // SAFETY: the caller's guarantees; send and receive buffers are the same (in place), which NCCL allows.
        let r = unsafe { (self.nccl.all_reduce)(p, p, count as usize, t, op, self.comm, stream) };
        self.nccl.check(r, "ncclAllReduce")
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is destroyed once.
        let r = unsafe { (self.nccl.comm_destroy)(self.comm) };
        if let Err(e) = self.nccl.check(r, "ncclCommDestroy") {
            eprintln!("warning: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_line_naming_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let e = Nccl::load_from(&["libzeroconv-test-no-nccl.so.2"], &[dir.path().to_path_buf()]).unwrap_err();
        assert!(matches!(e, Error::CudaUnavailable(_)));
        let m = e.to_string();
        assert!(m.contains("NCCL not found") && m.contains("libzeroconv-test-no-nccl.so.2"), "{m}");
        assert!(m.contains(&dir.path().display().to_string()) && m.contains("nvidia-nccl-cu12"), "{m}");
    }

    #[test]
    fn a_file_that_is_not_a_library_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("libzeroconv-test-nccl.so.2"), b"not a library").unwrap();
        let m = Nccl::load_from(&["libzeroconv-test-nccl.so.2"], &[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(m.contains("does not load"), "{m}");
    }

    #[test]
    fn a_library_without_the_functions_is_named() {
        // The C library loads everywhere zeroconv runs, and exports none of NCCL's functions.
        let m = Nccl::load_from(&["libc.so.6"], &[]).unwrap_err().to_string();
        assert!(m.contains("lacks 6 of the functions") && m.contains("ncclAllReduce"), "{m}");
    }
}
