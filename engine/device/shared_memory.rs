//! Dynamic shared memory above 48 KiB: the one rule both devices apply to a launch.
//!
//! CUDA lets a kernel use up to 48 KiB of dynamic shared memory per block by default; more needs the function's
//! `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` raised first (once per function), and never more than the
//! device's per-block opt-in limit (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`). Without the attribute
//! the launch fails with an unhelpful "invalid argument"; above the limit no attribute helps. The flash-attention
//! kernels need the opt-in from head dim 128 (forward and backward), so both devices go
//! through [`SharedOptIns::check`]: the real device sets the attribute when it answers [`OptIn::Raise`], the
//! emulated one records it, and both refuse a launch above the limit with the same message.

use crate::error::{Error, Result};
use std::collections::HashMap;

/// Dynamic shared memory any launch may use without the opt-in.
pub const DEFAULT_DYNAMIC_SHARED_BYTES: u32 = 48 * 1024;

/// The per-block opt-in limit of an architecture, as the driver reports it
/// (`cudaDevAttrMaxSharedMemoryPerBlockOptin`): 163 KiB on sm_80/sm_87, 99 KiB on sm_86/sm_89, 227 KiB on sm_90
/// (CUDA C Programming Guide, "Technical Specifications per Compute Capability"). The real device asks the driver;
/// this table is for the emulated device, which has no driver to ask, and is `None` for architectures it does not
/// know.
pub fn opt_in_limit(compute_capability: (u32, u32)) -> Option<u32> {
    match compute_capability {
        (8, 0) | (8, 7) => Some(163 * 1024),
        (8, 6) | (8, 9) => Some(99 * 1024),
        (9, 0) => Some(227 * 1024),
        _ => None,
    }
}

/// What a launch needs before it can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptIn {
    /// Nothing: within 48 KiB, or the function's attribute was already raised far enough.
    None,
    /// Raise the function's maximum dynamic shared size to this many bytes, then launch.
    Raise(u32),
}

/// The dynamic shared memory each function was opted in to, per device (what the driver keeps per `CUfunction`).
#[derive(Debug, Default)]
pub struct SharedOptIns {
    raised: HashMap<(String, String), u32>,
}

impl SharedOptIns {
    /// What a launch of `kernel` (in `module`) with `bytes` of dynamic shared memory needs on a device `device`
    /// whose opt-in limit is `limit`. Call [`SharedOptIns::raised`] once the attribute is set.
    pub fn check(&self, module: &str, kernel: &str, bytes: u32, limit: u32, device: &str) -> Result<OptIn> {
        if bytes <= DEFAULT_DYNAMIC_SHARED_BYTES {
            return Ok(OptIn::None);
        }
        if bytes > limit {
            return Err(Error::msg(format!(
                "kernel `{kernel}` asks for {bytes} bytes of dynamic shared memory per block, more than {device} \
                 allows ({limit} bytes with the opt-in above {DEFAULT_DYNAMIC_SHARED_BYTES})"
            )));
        }
        match self.raised.get(&(module.to_string(), kernel.to_string())) {
            Some(&set) if set >= bytes => Ok(OptIn::None),
            _ => Ok(OptIn::Raise(bytes)),
        }
    }

    /// Records that `kernel`'s attribute now allows `bytes`.
    pub fn raised(&mut self, module: &str, kernel: &str, bytes: u32) {
        self.raised.insert((module.to_string(), kernel.to_string()), bytes);
    }

    /// How many functions were opted in above 48 KiB.
    pub fn count(&self) -> usize {
        self.raised.len()
    }

    /// The bytes `kernel` was opted in to, if it was.
    pub fn get(&self, module: &str, kernel: &str) -> Option<u32> {
        self.raised.get(&(module.to_string(), kernel.to_string())).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_opt_in_is_needed_above_48_kib_once_per_function_and_refused_above_the_limit() {
        let mut s = SharedOptIns::default();
        let limit = opt_in_limit((9, 0)).unwrap();
        assert_eq!(s.check("m", "k", 48 * 1024, limit, "sm_90").unwrap(), OptIn::None);
        assert_eq!(s.check("m", "k", 48 * 1024 + 1, limit, "sm_90").unwrap(), OptIn::Raise(48 * 1024 + 1));
        s.raised("m", "k", 60_000);
        assert_eq!(s.check("m", "k", 60_000, limit, "sm_90").unwrap(), OptIn::None);
        assert_eq!(s.check("m", "k", 50_000, limit, "sm_90").unwrap(), OptIn::None);
        // A bigger launch of the same function raises it again; another function needs its own.
        assert_eq!(s.check("m", "k", 70_000, limit, "sm_90").unwrap(), OptIn::Raise(70_000));
        assert_eq!(s.check("m", "other", 60_000, limit, "sm_90").unwrap(), OptIn::Raise(60_000));
        let err = s.check("m", "k", limit + 1, limit, "the emulated sm_90").unwrap_err().to_string();
        assert!(err.contains("`k`") && err.contains(&limit.to_string()) && err.contains("sm_90"), "{err}");
        assert_eq!(opt_in_limit((8, 0)), Some(166_912));
        assert_eq!(opt_in_limit((9, 0)), Some(232_448));
    }
}
