//! Is there a usable CUDA device, and what is it?

use cudarc::driver::{result, sys, DriverError};

use crate::error::{Error, Result};

/// What the driver reports about one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Devices visible to this process (all of them, not just this one).
    pub device_count: usize,
    pub ordinal: usize,
    pub name: String,
    /// (major, minor), e.g. (9, 0) for H100/H200.
    pub compute_capability: (u32, u32),
    pub total_memory_bytes: usize,
    /// The CUDA version the driver supports, e.g. (12, 8).
    pub driver_version: (u32, u32),
}

/// The names cudarc tries for the driver library, in its order. Checking these same names is what guarantees
/// that cudarc's own load (which panics on failure) succeeds after [`probe`] has.
pub fn driver_library_names() -> Vec<String> {
    let mut names: Vec<String> =
        ["cuda", "nvcuda"].iter().flat_map(|lib| cudarc::get_lib_name_candidates(lib)).collect();
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Device 0; see [`probe_device`].
pub fn probe() -> Result<DeviceInfo> {
    probe_device(0)
}

/// Initialises the driver and describes device `ordinal`, creating no context. Returns
/// `Error::CudaUnavailable` when no driver library loads (naming those tried), when the driver fails to
/// initialise, or when there is no such device.
pub fn probe_device(ordinal: usize) -> Result<DeviceInfo> {
    ensure_driver_library()?;
    result::init().map_err(|e| unavailable("the CUDA driver failed to initialise (cuInit)", e))?;
    let count = result::device::get_count().map_err(|e| unavailable("cuDeviceGetCount failed", e))?;
    let count = usize::try_from(count).unwrap_or(0);
    if count == 0 {
        return Err(Error::CudaUnavailable("the CUDA driver loaded but reports no device".into()));
    }
    if ordinal >= count {
        return Err(Error::CudaUnavailable(format!("device {ordinal} requested, but only {count} visible")));
    }
    let dev = result::device::get(ordinal as i32).map_err(|e| unavailable("cuDeviceGet failed", e))?;
    let name = result::device::get_name(dev).map_err(|e| unavailable("cuDeviceGetName failed", e))?;
    // SAFETY: `dev` is a valid device handle from cuDeviceGet on an initialised driver.
    let total_memory_bytes =
        unsafe { result::device::total_mem(dev) }.map_err(|e| unavailable("cuDeviceTotalMem failed", e))?;
    let attribute = |attr: sys::CUdevice_attribute, what: &str| -> Result<u32> {
        // SAFETY: as above; the attribute is a valid enum value.
        let v = unsafe { result::device::get_attribute(dev, attr) }.map_err(|e| unavailable(what, e))?;
        Ok(u32::try_from(v).unwrap_or(0))
    };
    let major = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "compute capability")?;
    let minor = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "compute capability")?;
    let mut version: std::ffi::c_int = 0;
    // SAFETY: the driver library is loaded (checked above); the call writes one int through a valid pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| unavailable("cuDriverGetVersion failed", e))?;
    let version = u32::try_from(version).unwrap_or(0);
    Ok(DeviceInfo {
        device_count: count,
        ordinal,
        name,
        compute_capability: (major, minor),
        total_memory_bytes,
        driver_version: (version / 1000, (version % 1000) / 10),
    })
}

/// Fails with the list of names tried when no driver library loads; cudarc would panic in that case.
fn ensure_driver_library() -> Result<()> {
    let names = driver_library_names();
    for name in &names {
        // SAFETY: loading the CUDA driver runs only its own initialisers, which have no preconditions. The handle
        // is dropped right away; cudarc opens the library again (same name list) and keeps it.
        if unsafe { libloading::Library::new(name) }.is_ok() {
            return Ok(());
        }
    }
    Err(Error::CudaUnavailable(format!(
        "no CUDA driver found: none of these libraries could be loaded: {} (is the NVIDIA driver installed and \
         its library folder on the loader's search path?)",
        names.join(", ")
    )))
}

fn unavailable(what: &str, e: DriverError) -> Error {
    Error::CudaUnavailable(format!("{what}: {e:?}"))
}
