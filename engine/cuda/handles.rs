//! Owned library handles and statuses as errors.
//!
//! cudarc's safe wrappers `unwrap()` in their `Drop`s (and abort the process after a sticky CUDA error); these own
//! the raw handles instead and log a failed destroy on stderr. Every status becomes an [`Error`] naming the call.

use crate::error::{Error, Result};
use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::sys as lt_sys;
use cudarc::cudnn::sys as dnn_sys;
use cudarc::driver::sys as drv;

/// A CUDA driver status as a result naming `call`.
pub fn drv_check(status: drv::CUresult, call: &str) -> Result<()> {
    if status == drv::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::msg(format!("CUDA: {call} failed: {status:?}")))
    }
}

pub fn lt_check(status: lt_sys::cublasStatus_t, call: &str) -> Result<()> {
    if status == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::msg(format!("cuBLASLt: {call} failed: {status:?}")))
    }
}

pub fn blas_check(status: blas_sys::cublasStatus_t, call: &str) -> Result<()> {
    if status == blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::msg(format!("cuBLAS: {call} failed: {status:?}")))
    }
}

pub fn dnn_check(status: dnn_sys::cudnnStatus_t, call: &str) -> Result<()> {
    if status == dnn_sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::msg(format!("cuDNN: {call} failed: {status:?}")))
    }
}

/// A raw handle destroyed once, on drop, by the function it was built with. A failure is logged, never a panic.
pub struct Owned<T: Copy> {
    raw: T,
    what: &'static str,
    destroy: unsafe fn(T) -> Result<()>,
}

impl<T: Copy> Owned<T> {
    /// # Safety
    /// `raw` was created by the library call that `destroy` undoes, is not owned by anything else, and `destroy`'s
    /// own contract holds for it once, at drop, while the CUDA context it belongs to exists (the owner drops it
    /// before the context).
    pub unsafe fn new(raw: T, what: &'static str, destroy: unsafe fn(T) -> Result<()>) -> Self {
        Owned { raw, what, destroy }
    }

    pub fn raw(&self) -> T {
        self.raw
    }
}

impl<T: Copy> Drop for Owned<T> {
    fn drop(&mut self) {
        // SAFETY: `Owned::new`'s contract: `raw` came from the call `destroy` undoes and is destroyed only here.
        if let Err(e) = unsafe { (self.destroy)(self.raw) } {
            eprintln!("warning: releasing {}: {e}", self.what);
        }
    }
}
